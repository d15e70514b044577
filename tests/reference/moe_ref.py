"""PyTorch (float64) reference of the moetune model: MODEL.md sections 1-5 and 8, and the
DeepSeek-V4 parts of section 12 (sqrtsoftplus scores, hash-routed layers, swiglu_limit,
mHC hyper-connections, the MTP block, and attention_type "v4": low-rank q, shared kv head,
partial interleaved RoPE, sinks, sliding window, grouped output projection).

Written to be read, not to be fast: every formula of the spec appears once, in the
order the spec gives it, and autograd provides the gradients. The C++ implementation
is tested against fixtures produced from this file (see make_fixture.py, README.md).

Shapes in comments: R rows, S seq_len, T = R*S tokens of a micro-batch, d hidden,
H / H_kv heads, hd head_dim, V vocab, E experts, K experts per token, G groups.
Parameters are a dict {Hugging Face name: float64 tensor}; the aux-loss-free routing
biases are a dict {bias name: float64 tensor holding float32 values} (no gradient) that
also holds the hash-routing tables {tid2eid name: (V, K) int64 tensor} of hash layers.
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DTYPE = torch.float64


# ----------------------------------------------------------------------------------
# 1. Configuration
# ----------------------------------------------------------------------------------

@dataclass
class Config:
    """config.json keys of MODEL.md section 1 (-1 = derived, resolved by from_dict)."""
    vocab_size: int = 512
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = -1      # -> num_attention_heads
    head_dim: int = -1                 # -> hidden_size // num_attention_heads
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    first_k_dense_replace: int = 1
    intermediate_size: int = -1        # -> 4 * hidden_size
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = -1    # -> hidden_size
    n_shared_experts: int = 1
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    bias_update_rate: float = 1e-3
    aux_loss_coeff: float = 0.0
    seq_aux_loss_coeff: float = 1e-4
    z_loss_coeff: float = 0.0
    capacity_factor: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    num_hash_layers: int = 0           # MODEL.md 12: leading MoE layers routed by mlp.gate.tid2eid
    swiglu_limit: float = 0.0          # MODEL.md 12: clamp of the experts' SwiGLU (0 = off)
    hc_mult: int = 1                   # MODEL.md 12: mHC residual streams (1 = none)
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    num_nextn_predict_layers: int = 0  # MODEL.md 12: 1 = one MTP block predicting token t+2
    mtp_loss_weight: float = 0.3
    attention_type: str = "llama"      # MODEL.md 12: "llama" (section 2) or "v4"; the keys below are V4's
    q_lora_rank: int = 128
    qk_rope_head_dim: int = 32
    sliding_window: int = 0            # 0 = every earlier key of the document
    o_groups: int = 2
    o_lora_rank: int = 128

    # Keys Hugging Face config files carry that mean nothing to the model.
    IGNORED_KEYS = ("model_type", "architectures", "torch_dtype", "transformers_version",
                    "_name_or_path", "moetune_version")

    @classmethod
    def from_dict(cls, d, where="config"):
        c = cls()
        types = {f.name: f.type for f in fields(cls)}
        for key, value in d.items():
            if key in cls.IGNORED_KEYS:
                continue
            if key not in types:
                raise ValueError(f"{where}: key '{key}': unknown model config key")
            want = types[key]
            ok = {int: isinstance(value, int) and not isinstance(value, bool),
                  float: isinstance(value, (int, float)) and not isinstance(value, bool),
                  bool: isinstance(value, bool),
                  str: isinstance(value, str)}[want]
            if not ok:
                raise ValueError(f"{where}: key '{key}': expected {want.__name__}, got {value!r}")
            setattr(c, key, want(value))
        if c.num_key_value_heads == -1:
            c.num_key_value_heads = c.num_attention_heads
        if c.head_dim == -1:
            c.head_dim = c.hidden_size // c.num_attention_heads
        if c.intermediate_size == -1:
            c.intermediate_size = 4 * c.hidden_size
        if c.moe_intermediate_size == -1:
            c.moe_intermediate_size = c.hidden_size
        c.validate(where)
        return c

    def to_dict(self):
        d = {"model_type": "moetune_moe"}
        d.update({f.name: getattr(self, f.name) for f in fields(self)})
        return d

    def validate(self, where="config"):
        def bad(key, msg):
            raise ValueError(f"{where}: key '{key}': {msg}")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings", "intermediate_size",
                    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"):
            if getattr(self, key) <= 0:
                bad(key, "must be positive")
        if self.head_dim % 2:
            bad("head_dim", "must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", "must divide num_attention_heads")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad("first_k_dense_replace", "must be in [0, num_hidden_layers]")
        if self.n_shared_experts < 0:
            bad("n_shared_experts", "must be >= 0")
        if self.scoring_func not in ("softmax", "sigmoid", "sqrtsoftplus"):
            bad("scoring_func", "must be softmax, sigmoid or sqrtsoftplus")
        if self.topk_method not in ("greedy", "noaux_tc"):
            bad("topk_method", "must be greedy or noaux_tc")
        if self.num_experts_per_tok > self.n_routed_experts:
            bad("num_experts_per_tok", "exceeds n_routed_experts")
        if self.n_routed_experts % self.n_group:
            bad("n_group", "must divide n_routed_experts")
        if self.topk_group > self.n_group:
            bad("topk_group", "exceeds n_group")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            bad("num_experts_per_tok", "exceeds the experts selectable in topk_group groups")
        for key in ("rope_theta", "rms_norm_eps", "routed_scaling_factor", "initializer_range"):
            if not getattr(self, key) > 0:
                bad(key, "must be positive")
        for key in ("bias_update_rate", "aux_loss_coeff", "seq_aux_loss_coeff", "z_loss_coeff", "capacity_factor",
                    "num_hash_layers", "swiglu_limit"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if self.num_hash_layers > len(self.moe_layers()):
            bad("num_hash_layers", "exceeds the number of MoE layers")
        if self.hc_mult < 1:
            bad("hc_mult", "must be >= 1")
        if self.hc_sinkhorn_iters < 1:
            bad("hc_sinkhorn_iters", "must be >= 1")
        if not self.hc_eps >= 0:
            bad("hc_eps", "must be >= 0")
        if self.num_nextn_predict_layers not in (0, 1):
            bad("num_nextn_predict_layers", "must be 0 or 1")
        if not self.mtp_loss_weight >= 0:
            bad("mtp_loss_weight", "must be >= 0")
        if self.attention_type not in ("llama", "v4"):
            bad("attention_type", 'must be "llama" or "v4"')
        if self.sliding_window < 0:
            bad("sliding_window", "must be >= 0")
        if self.attention_type != "v4" and self.sliding_window != 0:
            bad("sliding_window", 'applies to attention_type "v4" only')
        if self.attention_type == "v4":
            for key in ("q_lora_rank", "o_lora_rank", "o_groups"):
                if getattr(self, key) <= 0:
                    bad(key, "must be positive")
            if self.qk_rope_head_dim < 0 or self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
                bad("qk_rope_head_dim", "must be even and in [0, head_dim]")
            if self.num_attention_heads % self.o_groups:
                bad("o_groups", "must divide num_attention_heads")

    def is_moe_layer(self, l):
        return l == MTP or l >= self.first_k_dense_replace

    def moe_layers(self):
        """Model layers with a MoE FFN, in order; the MTP block's (MTP) comes last."""
        main = [l for l in range(self.num_hidden_layers) if self.is_moe_layer(l)]
        return main + ([MTP] if self.num_nextn_predict_layers > 0 else [])

    def is_hash_layer(self, l):
        """Model layer l is one of the first num_hash_layers MoE layers (MODEL.md 12)."""
        return l != MTP and self.is_moe_layer(l) and l - self.first_k_dense_replace < self.num_hash_layers


# ----------------------------------------------------------------------------------
# Parameter names and shapes (MODEL.md section 7), in the canonical order of moe/params.cpp
# ----------------------------------------------------------------------------------

MTP = "mtp.0"   # the "layer index" of the MTP block: its tensors are named mtp.0.<rest>


def layer_name(l, rest):
    return f"{MTP}.{rest}" if l == MTP else f"model.layers.{l}.{rest}"


def bias_name(l):
    return layer_name(l, "mlp.gate.e_score_correction_bias")


def tid2eid_name(l):
    return layer_name(l, "mlp.gate.tid2eid")


def param_shapes(cfg):
    """[(name, shape)] of every trainable tensor. Biases are not parameters (see bias_shapes)."""
    V, d, hd = cfg.vocab_size, cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    out = [("model.embed_tokens.weight", (V, d))]
    n = cfg.hc_mult
    hc = lambda prefix: [(f"{prefix}.fn", ((2 + n) * n, n * d)), (f"{prefix}.base", ((2 + n) * n,)),
                         (f"{prefix}.scale", (3,))] if n > 1 else []
    def block(l):
        out = hc(layer_name(l, "attn_hc"))
        out.append((layer_name(l, "input_layernorm.weight"), (d,)))
        if cfg.attention_type == "v4":   # transformers' deepseek_v4 names (MODEL.md 12)
            qr, G, r = cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank
            out += [(layer_name(l, "self_attn.q_a_proj.weight"), (qr, d)),
                    (layer_name(l, "self_attn.q_a_norm.weight"), (qr,)),
                    (layer_name(l, "self_attn.q_b_proj.weight"), (q, qr)),
                    (layer_name(l, "self_attn.kv_proj.weight"), (hd, d)),
                    (layer_name(l, "self_attn.kv_norm.weight"), (hd,)),
                    (layer_name(l, "self_attn.o_a_proj.weight"), (G * r, q // G)),
                    (layer_name(l, "self_attn.o_b_proj.weight"), (d, G * r)),
                    (layer_name(l, "self_attn.sinks"), (cfg.num_attention_heads,))]
        else:
            out += [(layer_name(l, "self_attn.q_proj.weight"), (q, d)),
                    (layer_name(l, "self_attn.k_proj.weight"), (kv, d)),
                    (layer_name(l, "self_attn.v_proj.weight"), (kv, d)),
                    (layer_name(l, "self_attn.o_proj.weight"), (d, q))]
        out.append((layer_name(l, "post_attention_layernorm.weight"), (d,)))
        out += hc(layer_name(l, "ffn_hc"))
        if not cfg.is_moe_layer(l):
            I = cfg.intermediate_size
            return out + [(layer_name(l, "mlp.gate_proj.weight"), (I, d)),
                          (layer_name(l, "mlp.up_proj.weight"), (I, d)),
                          (layer_name(l, "mlp.down_proj.weight"), (d, I))]
        Fm = cfg.moe_intermediate_size
        out.append((layer_name(l, "mlp.gate.weight"), (cfg.n_routed_experts, d)))
        for e in range(cfg.n_routed_experts):
            out += [(layer_name(l, f"mlp.experts.{e}.gate_proj.weight"), (Fm, d)),
                    (layer_name(l, f"mlp.experts.{e}.up_proj.weight"), (Fm, d)),
                    (layer_name(l, f"mlp.experts.{e}.down_proj.weight"), (d, Fm))]
        if cfg.n_shared_experts > 0:
            Sw = cfg.n_shared_experts * Fm
            out += [(layer_name(l, "mlp.shared_experts.gate_proj.weight"), (Sw, d)),
                    (layer_name(l, "mlp.shared_experts.up_proj.weight"), (Sw, d)),
                    (layer_name(l, "mlp.shared_experts.down_proj.weight"), (d, Sw))]
        return out

    def hc_head_shapes(prefix):
        return [(f"{prefix}.hc_fn", (n, n * d)), (f"{prefix}.hc_base", (n,)), (f"{prefix}.hc_scale", (1,))] \
            if n > 1 else []

    for l in range(cfg.num_hidden_layers):
        out += block(l)
    out += hc_head_shapes("model.hc_head")
    out.append(("model.norm.weight", (d,)))
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", (V, d)))
    if cfg.num_nextn_predict_layers > 0:   # the MTP block, after everything of the main model
        out += [(f"{MTP}.enorm.weight", (d,)), (f"{MTP}.hnorm.weight", (d,)),
                (f"{MTP}.e_proj.weight", (d, d)), (f"{MTP}.h_proj.weight", (d, d))]
        out += block(MTP)
        out += hc_head_shapes(f"{MTP}.hc_head")
        out.append((f"{MTP}.norm.weight", (d,)))
    return out


def bias_shapes(cfg):
    """Routing biases of the MoE layers that are not hash-routed (those have none)."""
    return [(bias_name(l), (cfg.n_routed_experts,)) for l in cfg.moe_layers() if not cfg.is_hash_layer(l)]


def table_shapes(cfg):
    """Hash-routing tables (V, K) of the hash-routed layers (I32 in a checkpoint)."""
    return [(tid2eid_name(l), (cfg.vocab_size, cfg.num_experts_per_tok)) for l in cfg.moe_layers()
            if cfg.is_hash_layer(l)]


def check_table(cfg, table, where):
    """Each row of a (V, K) table holds K distinct experts in [0, E)."""
    E = cfg.n_routed_experts
    if table.dtype != torch.int32:
        raise ValueError(f"{where}: dtype {table.dtype}, the hash-routing table must be int32 (I32)")
    for v, row in enumerate(table.tolist()):
        if not all(0 <= e < E for e in row):
            raise ValueError(f"{where}: row {v} holds an expert outside [0, {E})")
        if len(set(row)) != len(row):
            raise ValueError(f"{where}: row {v} repeats an expert")


def lm_head_weight(cfg, params):
    return params["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]


def split_checkpoint(cfg, tensors, where="checkpoint"):
    """{name: tensor} of a checkpoint -> (params, biases) as float64 (the tables as int64),
    checking names and shapes (and the tables' dtype and rows)."""
    expected = dict(param_shapes(cfg) + bias_shapes(cfg) + table_shapes(cfg))
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(f"{where}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise ValueError(f"{where}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"{where}: tensor '{name}' has shape {tuple(tensors[name].shape)}, expected {shape}")
    params = {n: tensors[n].to(DTYPE).clone() for n, _ in param_shapes(cfg)}
    # Biases are fp32 by contract (MODEL.md section 4): keep float32 values in float64 tensors.
    biases = {n: tensors[n].to(torch.float32).to(DTYPE).clone() for n, _ in bias_shapes(cfg)}
    for n, _ in table_shapes(cfg):
        check_table(cfg, tensors[n], f"{where}: tensor '{n}'")
        biases[n] = tensors[n].to(torch.long).clone()
    return params, biases


# ----------------------------------------------------------------------------------
# Batches (MODEL.md sections 3 and 8.6)
# ----------------------------------------------------------------------------------

@dataclass
class MicroBatch:
    """`rows` rows of `seq_len` tokens; flat row-major lists of length rows*seq_len."""
    rows: int
    seq_len: int
    input_ids: torch.Tensor   # (T,) int64
    labels: torch.Tensor      # (T,) int64, -100 = ignored
    doc_ids: torch.Tensor     # (T,) int64; a document is a maximal run of equal doc_id in a row

    @classmethod
    def from_dict(cls, d, cfg, where="micro-batch"):
        for key in ("rows", "seq_len", "input_ids", "labels"):
            if key not in d:
                raise ValueError(f"{where}: missing key '{key}'")
        R, S = d["rows"], d["seq_len"]
        T = R * S
        if R <= 0 or S <= 0:
            raise ValueError(f"{where}: rows and seq_len must be positive")
        if S > cfg.max_position_embeddings:
            raise ValueError(f"{where}: seq_len {S} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        doc_ids = d.get("doc_ids", [0] * T)
        for key, values in (("input_ids", d["input_ids"]), ("labels", d["labels"]), ("doc_ids", doc_ids)):
            if len(values) != T:
                raise ValueError(f"{where}: '{key}' has {len(values)} entries, expected rows*seq_len = {T}")
        if not all(0 <= x < cfg.vocab_size for x in d["input_ids"]):
            raise ValueError(f"{where}: 'input_ids' out of [0, vocab_size)")
        if not all(x == IGNORE_INDEX or 0 <= x < cfg.vocab_size for x in d["labels"]):
            raise ValueError(f"{where}: 'labels' must be -100 or in [0, vocab_size)")
        # Documents must be contiguous: a doc id may not come back after another one in the
        # same row. Then "same doc id" and "same document run" mean the same thing.
        for r in range(R):
            row = doc_ids[r * S:(r + 1) * S]
            seen = set()
            for t in range(S):
                if t > 0 and row[t] != row[t - 1] and row[t] in seen:
                    raise ValueError(f"{where}: row {r}: doc id {row[t]} reappears at position {t}")
                seen.add(row[t])
        as_long = lambda v: torch.tensor(v, dtype=torch.long)
        return cls(R, S, as_long(d["input_ids"]), as_long(d["labels"]), as_long(doc_ids))

    @property
    def tokens(self):
        return self.rows * self.seq_len

    def targets(self):
        """(T,) target of flat position i = (r, t): labels[i+1] if t+1 < S and the next token
        belongs to the same document, else -100."""
        S = self.seq_len
        tgt = torch.full((self.tokens,), IGNORE_INDEX, dtype=torch.long)
        for i in range(self.tokens):
            if (i % S) + 1 < S and self.doc_ids[i + 1] == self.doc_ids[i]:
                tgt[i] = self.labels[i + 1]
        return tgt

    def mtp_inputs(self):
        """(T,) the MTP block's input token of position i = (r, t): input_ids[i+1] if t+1 < S
        and it is in the same document, else input_ids[i] (a placeholder: such a position has
        no MTP target and no other position of its document sees it)."""
        S = self.seq_len
        nxt = self.input_ids.clone()
        for i in range(self.tokens):
            if (i % S) + 1 < S and self.doc_ids[i + 1] == self.doc_ids[i]:
                nxt[i] = self.input_ids[i + 1]
        return nxt

    def mtp_targets(self):
        """(T,) the MTP target of position i: labels[i+2] if t+2 < S and that token is in the
        same document, else -100."""
        S = self.seq_len
        tgt = torch.full((self.tokens,), IGNORE_INDEX, dtype=torch.long)
        for i in range(self.tokens):
            if (i % S) + 2 < S and self.doc_ids[i + 2] == self.doc_ids[i]:
                tgt[i] = self.labels[i + 2]
        return tgt

    def positions(self):
        """(R, S) RoPE positions: t minus the start of the token's document run in its row."""
        doc = self.doc_ids.view(self.rows, self.seq_len)
        pos = torch.zeros(self.rows, self.seq_len, dtype=torch.long)
        for r in range(self.rows):
            start = 0
            for t in range(self.seq_len):
                if t > 0 and doc[r, t] != doc[r, t - 1]:
                    start = t
                pos[r, t] = t - start
        return pos

    def attention_mask(self, window=0):
        """(R, S, S) bool: query i may attend key j iff j <= i and both are in the same document
        (and, window W > 0, i - j < W: the W most recent keys, the query's own included)."""
        doc = self.doc_ids.view(self.rows, self.seq_len)
        causal = torch.ones(self.seq_len, self.seq_len, dtype=torch.bool).tril()
        if window > 0:
            causal = causal & ~torch.ones(self.seq_len, self.seq_len, dtype=torch.bool).tril(-window)
        same_doc = doc[:, :, None] == doc[:, None, :]
        return causal[None] & same_doc


# ----------------------------------------------------------------------------------
# 2. Forward pass: building blocks
# ----------------------------------------------------------------------------------

def rms_norm(u, w, eps):
    """u (..., d), w (d): u / sqrt(mean(u^2) + eps) * w."""
    return u / torch.sqrt(u.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    """(..., hd): [x1, x2] -> [-x2, x1] on the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(positions, hd, theta):
    """positions (R, S) -> cos, sin (R, 1, S, hd), HF Llama: inv_freq_i = theta^(-2i/hd)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=DTYPE) / hd))   # (hd/2,)
    angles = positions.to(DTYPE)[..., None] * inv_freq                         # (R, S, hd/2)
    emb = torch.cat((angles, angles), dim=-1)                                    # (R, S, hd)
    return emb.cos()[:, None], emb.sin()[:, None]


def attention(cfg, params, l, a, mb):
    """a (R, S, d) normalised input -> (R, S, d). GQA: query head h uses kv head h // (H/H_kv)."""
    R, S, _ = a.shape
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    W = lambda name: params[layer_name(l, f"self_attn.{name}.weight")]
    q = (a @ W("q_proj").T).view(R, S, H, hd).transpose(1, 2)      # (R, H, S, hd)
    k = (a @ W("k_proj").T).view(R, S, Hkv, hd).transpose(1, 2)    # (R, Hkv, S, hd)
    v = (a @ W("v_proj").T).view(R, S, Hkv, hd).transpose(1, 2)    # (R, Hkv, S, hd)

    cos, sin = rope_cos_sin(mb.positions(), hd, cfg.rope_theta)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin

    k = k.repeat_interleave(H // Hkv, dim=1)                        # (R, H, S, hd)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)                # (R, H, S, S)
    scores = scores.masked_fill(~mb.attention_mask()[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v                          # (R, H, S, hd)
    out = out.transpose(1, 2).reshape(R, S, H * hd)
    return out @ W("o_proj").T


def rope_interleaved(x, positions, rd, theta, sign=1):
    """x (R, nh, S, hd): the last rd channels rotated in adjacent pairs (2f, 2f+1) by the angle
    sign * pos * theta^(-2f/rd) (DeepSeek-V4, MODEL.md 12); the first hd - rd are left alone.
    sign = -1 is the inverse rotation (position -pos)."""
    if rd == 0:
        return x
    inv_freq = 1.0 / (theta ** (torch.arange(0, rd, 2, dtype=DTYPE) / rd))     # (rd/2,)
    angles = sign * positions.to(DTYPE)[..., None] * inv_freq                   # (R, S, rd/2)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]                     # (R, 1, S, rd/2)
    nope, rope = x[..., :-rd], x[..., -rd:]
    x0, x1 = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((nope, rotated), dim=-1)


def attention_v4(cfg, params, l, a, mb):
    """DeepSeek-V4 attention (MODEL.md 12), a (R, S, d) normalised input -> (R, S, d)."""
    R, S, _ = a.shape
    H, hd, rd, eps = cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.rms_norm_eps
    G, r = cfg.o_groups, cfg.o_lora_rank
    P = lambda name: params[layer_name(l, f"self_attn.{name}")]
    qa = rms_norm(a @ P("q_a_proj.weight").T, P("q_a_norm.weight"), eps)        # (R, S, qr)
    q = (qa @ P("q_b_proj.weight").T).view(R, S, H, hd)
    q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + eps)                    # per head, no weight
    q = q.transpose(1, 2)                                                        # (R, H, S, hd)
    kv = rms_norm(a @ P("kv_proj.weight").T, P("kv_norm.weight"), eps)[:, None]  # (R, 1, S, hd)

    pos = mb.positions()
    q = rope_interleaved(q, pos, rd, cfg.rope_theta)
    kv = rope_interleaved(kv, pos, rd, cfg.rope_theta)

    scores = q @ kv.transpose(-1, -2) * hd ** -0.5                              # (R, H, S, S)
    scores = scores.masked_fill(~mb.attention_mask(cfg.sliding_window)[:, None], float("-inf"))
    sink = P("sinks").view(1, H, 1, 1).expand(R, H, S, 1)                       # denominator only
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    out = rope_interleaved(probs @ kv, pos, rd, cfg.rope_theta, sign=-1)        # (R, H, S, hd)

    out = out.transpose(1, 2).reshape(R, S, G, H * hd // G)                    # heads in o_groups groups
    w_a = P("o_a_proj.weight").view(G, r, H * hd // G)                          # group g: rows g*r..(g+1)*r
    o = torch.einsum("rsgi,goi->rsgo", out, w_a).reshape(R, S, G * r)
    return o @ P("o_b_proj.weight").T


def swiglu(u, gate, up, down, limit=0.0):
    """u (N, d), gate/up (I, d), down (d, I): down(silu(gate(u)) * up(u)). limit c > 0
    (swiglu_limit, MODEL.md 12): gate(u) = min(gate(u), c), up(u) = clamp(up(u), -c, c) first."""
    g, v = u @ gate.T, u @ up.T
    if limit > 0:
        g, v = torch.clamp(g, max=limit), torch.clamp(v, -limit, limit)
    return (F.silu(g) * v) @ down.T


def clamp_stats(params, prefix, u, limit):
    """(margin, clamped) of the MLP's gate / up pre-activations under swiglu_limit: the
    smallest distance to a clamp bound (inf when off; an implementation whose numerics
    differ by less clamps the same values) and how many values were clamped."""
    if limit <= 0 or u.shape[0] == 0:
        return math.inf, 0
    g = (u @ params[f"{prefix}.gate_proj.weight"].T).detach()
    v = (u @ params[f"{prefix}.up_proj.weight"].T).detach()
    margin = min((g - limit).abs().min().item(), (v.abs() - limit).abs().min().item())
    return margin, int((g > limit).sum()) + int((v.abs() > limit).sum())


def mlp(params, prefix, u, limit=0.0):
    """SwiGLU MLP whose weights are <prefix>.{gate,up,down}_proj.weight. The experts pass
    cfg.swiglu_limit; the dense FFN is never clamped."""
    return swiglu(u, params[f"{prefix}.gate_proj.weight"], params[f"{prefix}.up_proj.weight"],
                  params[f"{prefix}.down_proj.weight"], limit)


# ----------------------------------------------------------------------------------
# 2. MoE gate (DeepSeek-V3), capacity, experts
# ----------------------------------------------------------------------------------

def descending_order(x):
    """Indices sorting the last dim of x from largest to smallest; ties keep the lower index first."""
    return torch.sort(-x, dim=-1, stable=True).indices


def gap(sorted_desc, n):
    """Smallest gap between the n-th and (n+1)-th largest values over all rows (inf if none)."""
    if sorted_desc.shape[-1] <= n or sorted_desc.numel() == 0:
        return math.inf
    return (sorted_desc[..., n - 1] - sorted_desc[..., n]).min().item()


@dataclass
class Routing:
    """What the gate of one MoE layer decided for the T tokens of one micro-batch."""
    logits: torch.Tensor      # (T, E) router logits u Wg^T            (carries grad)
    scores: torch.Tensor      # (T, E) s = scores(logits)              (carries grad)
    idx: torch.Tensor         # (T, K) selected experts, best first    (int64)
    weights: torch.Tensor     # (T, K) combine weights w               (carries grad)
    keep: torch.Tensor        # (T, K) bool, False = pair dropped by capacity
    counts: torch.Tensor      # (E,) int64 pairs routed to each expert, before drops
    margins: dict = field(default_factory=dict)  # {"topk"|"group"|"capacity"|"clamp": smallest gap}
    clamped: int = 0          # expert pre-activations clamped by swiglu_limit in this layer

    @property
    def dropped(self):
        return int((~self.keep).sum())


def scores(cfg, logits):
    """s (T, E) = softmax, sigmoid or sqrt(softplus) of the router logits (scoring_func)."""
    if cfg.scoring_func == "softmax":
        return torch.softmax(logits, dim=-1)
    if cfg.scoring_func == "sqrtsoftplus":
        return torch.sqrt(F.softplus(logits))
    return torch.sigmoid(logits)


def route(cfg, logits, bias):
    """logits (T, E), bias (E,) -> Routing without capacity (keep all)."""
    T, E = logits.shape
    K = cfg.num_experts_per_tok
    s = scores(cfg, logits)
    # Selection is discrete: it uses the values of s, never its gradient.
    sel = (s + bias if cfg.topk_method == "noaux_tc" else s).detach()     # (T, E)
    margins = {}

    if cfg.n_group > 1:
        G = cfg.n_group
        per_group = sel.view(T, G, E // G)                                 # (T, G, E/G)
        if cfg.topk_method == "noaux_tc":
            group_score = per_group.topk(min(2, E // G), dim=-1).values.sum(-1)   # (T, G)
        else:
            group_score = per_group.max(dim=-1).values                      # (T, G)
        group_rank = descending_order(group_score)                          # (T, G)
        keep_group = torch.zeros(T, G, dtype=torch.bool)
        keep_group.scatter_(1, group_rank[:, :cfg.topk_group], True)
        margins["group"] = gap(group_score.gather(1, group_rank), cfg.topk_group)
        selectable = keep_group.repeat_interleave(E // G, dim=1)            # (T, E)
        sel = sel.masked_fill(~selectable, float("-inf"))

    order = descending_order(sel)                                           # (T, E)
    idx = order[:, :K].contiguous()                                         # (T, K)
    margins["topk"] = gap(sel.gather(1, order), K)

    w = s.gather(1, idx)                                                    # (T, K)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * cfg.routed_scaling_factor

    counts = torch.bincount(idx.reshape(-1), minlength=E)
    keep = torch.ones(T, K, dtype=torch.bool)
    return Routing(logits, s, idx, w, keep, counts, margins)


def route_replay(cfg, logits, idx, keep):
    """Routing replay (MODEL.md section 11, R2/R3): the selection idx (T, K) and its capacity
    decisions keep (T, K) bool are given (no top-K, no group limit, no capacity is applied);
    scores and weights are live: w = s[idx], normalised and scaled as in `route`. Counts are
    those of the replayed selection, before drops. No margins: nothing is decided here."""
    T, E = logits.shape
    K = cfg.num_experts_per_tok
    idx = torch.as_tensor(idx, dtype=torch.long).view(T, K)
    keep = torch.as_tensor(keep, dtype=torch.bool).view(T, K)
    if idx.min() < 0 or idx.max() >= E:
        raise ValueError("route_replay: expert index out of range")
    s = scores(cfg, logits)
    w = s.gather(1, idx)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * cfg.routed_scaling_factor
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    return Routing(logits, s, idx.clone(), w, keep.clone(), counts, {})


def route_hash(cfg, logits, input_ids, table):
    """Hash routing (MODEL.md 12): token t takes the K experts of row input_ids[t] of the
    (V, K) table, in the table's order; no bias, no group limit, no top-K (so no margin);
    the weights are live as in route_replay. Capacity is applied afterwards as usual."""
    T = logits.shape[0]
    return route_replay(cfg, logits, table[input_ids], torch.ones(T, cfg.num_experts_per_tok, dtype=torch.bool))


def expert_capacity(cfg, T):
    """ceil(c * T * K / E), evaluated in double in this order."""
    return math.ceil(cfg.capacity_factor * T * cfg.num_experts_per_tok / cfg.n_routed_experts)


def apply_capacity(cfg, r):
    """Drops pairs beyond each expert's capacity (MODEL.md 2, 8.4): per expert keep the
    pairs with the highest s, ties to the lower flat token index (row*seq_len + pos)."""
    if cfg.capacity_factor <= 0:
        return
    T = r.idx.shape[0]
    cap = expert_capacity(cfg, T)
    s = r.scores.detach()
    margin = math.inf
    for e in range(cfg.n_routed_experts):
        tok, slot = (r.idx == e).nonzero(as_tuple=True)     # tokens in ascending order
        if len(tok) <= cap:
            continue
        rank = descending_order(s[tok, e])                   # stable: lower token first on ties
        r.keep[tok[rank[cap:]], slot[rank[cap:]]] = False
        if cap > 0:
            margin = min(margin, (s[tok[rank[cap - 1]], e] - s[tok[rank[cap]], e]).item())
    r.margins["capacity"] = margin


def moe_ffn(cfg, params, l, u, bias, replay=None, table=None, input_ids=None):
    """u (T, d) -> y (T, d), Routing. y = sum_k w_k Expert_idx_k(u) + Shared(u).
    replay: None (route live) or (idx (T, K), keep (T, K)) to replay (route_replay).
    table: the (V, K) tid2eid of a hash-routed layer (then bias is None), with the tokens'
    input_ids (T,); a replay still wins."""
    logits = u @ params[layer_name(l, "mlp.gate.weight")].T                # (T, E)
    if replay is not None:
        r = route_replay(cfg, logits, *replay)
    elif table is not None:
        r = route_hash(cfg, logits, input_ids, table)
        apply_capacity(cfg, r)
    else:
        r = route(cfg, logits, bias)
        apply_capacity(cfg, r)

    y = torch.zeros_like(u)
    clamp = math.inf
    for e in range(cfg.n_routed_experts):
        tok, slot = ((r.idx == e) & r.keep).nonzero(as_tuple=True)
        if len(tok) == 0:
            continue
        prefix = layer_name(l, f"mlp.experts.{e}")
        out = mlp(params, prefix, u[tok], cfg.swiglu_limit)                  # (n_e, d)
        m, n = clamp_stats(params, prefix, u[tok], cfg.swiglu_limit)
        clamp, r.clamped = min(clamp, m), r.clamped + n
        y = y.index_add(0, tok, r.weights[tok, slot, None] * out)
    if cfg.n_shared_experts > 0:
        y = y + mlp(params, layer_name(l, "mlp.shared_experts"), u, cfg.swiglu_limit)
        m, n = clamp_stats(params, layer_name(l, "mlp.shared_experts"), u, cfg.swiglu_limit)
        clamp, r.clamped = min(clamp, m), r.clamped + n
    if cfg.swiglu_limit > 0:
        r.margins["clamp"] = clamp
    return y, r


# ----------------------------------------------------------------------------------
# 12. mHC hyper-connections
# ----------------------------------------------------------------------------------

def hc_coefficients(cfg, X, fn, base, scale):
    """X (T, n, d) streams -> pre (T, n), post (T, n), comb (T, n, n) of one sub-block's
    connection (fn ((2+n)n, n d), base ((2+n)n), scale (3)); for the head (fn (n, n d),
    base (n), scale (1)) only pre, and post = comb = None."""
    T, n, d = X.shape
    eps = cfg.hc_eps
    flat = X.reshape(T, n * d)
    mix = (flat @ fn.T) * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
    pre = torch.sigmoid(mix[:, :n] * scale[0] + base[:n]) + eps
    if fn.shape[0] == n:
        return pre, None, None
    post = 2 * torch.sigmoid(mix[:, n:2 * n] * scale[1] + base[n:2 * n])
    comb = torch.softmax((mix[:, 2 * n:] * scale[2] + base[2 * n:]).view(T, n, n), dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)          # columns
    for _ in range(cfg.hc_sinkhorn_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)      # rows
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)      # columns
    return pre, post, comb


def hc_collapse(pre, X):
    """u (T, d) = sum_j pre_j X_j."""
    return (pre[:, :, None] * X).sum(dim=1)


def hc_sub_block(cfg, params, prefix, X, block):
    """X (T, n, d) -> X' = post * block(u) + comb^T X, u = sum_j pre_j X_j; block (T, d) -> (T, d)."""
    pre, post, comb = hc_coefficients(cfg, X, params[f"{prefix}.fn"], params[f"{prefix}.base"],
                                      params[f"{prefix}.scale"])
    y = block(hc_collapse(pre, X))
    return post[:, :, None] * y[:, None, :] + torch.einsum("tji,tjd->tid", comb, X)


def hc_head(cfg, params, X, prefix="model.hc_head"):
    """The head's collapse of the streams X (T, n, d) -> (T, d)."""
    pre, _, _ = hc_coefficients(cfg, X, params[f"{prefix}.hc_fn"], params[f"{prefix}.hc_base"],
                                params[f"{prefix}.hc_scale"])
    return hc_collapse(pre, X)


# ----------------------------------------------------------------------------------
# 2. The whole model
# ----------------------------------------------------------------------------------

@dataclass
class ForwardOut:
    logits: torch.Tensor   # (T, V)
    routings: list         # one Routing per MoE layer, in layer order (the MTP block's last)
    mtp_logits: torch.Tensor = None   # (T, V) of the MTP block (predicting token t+2), if any


def forward(cfg, params, biases, mb, replay=None):
    """replay: None, or one (idx, keep) per MoE layer in layer order (see route_replay)."""
    R, S, d = mb.rows, mb.seq_len, cfg.hidden_size
    if replay is not None and len(replay) != len(cfg.moe_layers()):
        raise ValueError(f"replay: {len(replay)} MoE layers given, the model has {len(cfg.moe_layers())}")
    eps = cfg.rms_norm_eps
    T, n = R * S, cfg.hc_mult
    routings = []

    def attn_block(l):
        def block(h):   # (T, d) -> (T, d)
            a = rms_norm(h, params[layer_name(l, "input_layernorm.weight")], eps)
            attn = attention_v4 if cfg.attention_type == "v4" else attention
            return attn(cfg, params, l, a.view(R, S, d), mb).reshape(T, d)
        return block

    def ffn_block(l):
        def block(h):   # (T, d) -> (T, d)
            u = rms_norm(h, params[layer_name(l, "post_attention_layernorm.weight")], eps)
            if not cfg.is_moe_layer(l):
                return mlp(params, layer_name(l, "mlp"), u)
            rp = None if replay is None else replay[len(routings)]
            if cfg.is_hash_layer(l):
                y, r = moe_ffn(cfg, params, l, u, None, rp, biases[tid2eid_name(l)], mb.input_ids)
            else:
                y, r = moe_ffn(cfg, params, l, u, biases[bias_name(l)], rp)
            routings.append(r)
            return y
        return block

    def stack(h, layers, head_prefix):
        """The decoder blocks `layers` over h (T, d) -> the final hidden state (T, d) before
        the final norm: plain residual, or mHC streams collapsed by the head head_prefix."""
        if n == 1:
            for l in layers:
                h = h + attn_block(l)(h)
                h = h + ffn_block(l)(h)
            return h
        X = h[:, None, :].expand(T, n, d)      # mHC: n streams (T, n, d), the input repeated
        for l in layers:
            X = hc_sub_block(cfg, params, layer_name(l, "attn_hc"), X, attn_block(l))
            X = hc_sub_block(cfg, params, layer_name(l, "ffn_hc"), X, ffn_block(l))
        return hc_head(cfg, params, X, head_prefix)

    h = stack(params["model.embed_tokens.weight"][mb.input_ids], range(cfg.num_hidden_layers), "model.hc_head")
    logits = rms_norm(h, params["model.norm.weight"], eps) @ lm_head_weight(cfg, params).T
    mtp_logits = None
    if cfg.num_nextn_predict_layers > 0:
        # MTP (MODEL.md 12): h' = e_proj(enorm(embed(x_{t+1}))) + h_proj(hnorm(h_t)) through one
        # more block, its own norm and the shared LM head.
        e = params["model.embed_tokens.weight"][mb.mtp_inputs()]
        hp = (rms_norm(e, params[f"{MTP}.enorm.weight"], eps) @ params[f"{MTP}.e_proj.weight"].T +
              rms_norm(h, params[f"{MTP}.hnorm.weight"], eps) @ params[f"{MTP}.h_proj.weight"].T)
        hm = stack(hp, [MTP], f"{MTP}.hc_head")
        mtp_logits = rms_norm(hm, params[f"{MTP}.norm.weight"], eps) @ lm_head_weight(cfg, params).T
    return ForwardOut(logits, routings, mtp_logits)


# ----------------------------------------------------------------------------------
# 3. Losses
# ----------------------------------------------------------------------------------

def switch_aux_loss(cfg, r):
    """One layer, one micro-batch: coeff * E * sum_i f_i P_i, f_i = n_i / (T K) (constant)."""
    T, E = r.scores.shape
    f = r.counts.to(DTYPE) / (T * cfg.num_experts_per_tok)          # no grad: from integer counts
    p = r.scores / r.scores.sum(-1, keepdim=True)                     # s normalised over all E
    return cfg.aux_loss_coeff * E * (f * p.mean(0)).sum()


def seq_aux_loss_sum(cfg, r, rows, seq_len):
    """One layer, one micro-batch: sum over its rows of coeff * sum_i f_i P_i,
    f_i = E / (K T_s) * n_i (n_i counted in the row), P_i = mean_t s_ti / sum_j s_tj."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    p = (r.scores / r.scores.sum(-1, keepdim=True)).view(rows, seq_len, E)
    counts = F.one_hot(r.idx.reshape(rows, seq_len * K), E).sum(1).to(DTYPE)     # (rows, E)
    f = E / (K * seq_len) * counts
    return cfg.seq_aux_loss_coeff * (f * p.mean(1)).sum()


def z_loss(cfg, r):
    """One layer, one micro-batch: coeff * mean_t logsumexp(logits_t)^2."""
    return cfg.z_loss_coeff * torch.logsumexp(r.logits, dim=-1).pow(2).mean()


@dataclass
class GlobalLoss:
    ce: torch.Tensor
    aux: torch.Tensor
    seq_aux: torch.Tensor
    z: torch.Tensor
    forwards: list          # ForwardOut per micro-batch
    n_targets: int
    mtp: torch.Tensor = 0.0  # mtp_loss_weight * the MTP block's cross-entropy (global-batch mean)

    @property
    def total(self):
        return self.ce + self.aux + self.seq_aux + self.z + self.mtp

    def expert_counts(self):
        """[(E,) int64 per MoE layer]: pairs routed over the whole global batch, before drops."""
        return [sum(f.routings[j].counts for f in self.forwards) for j in range(len(self.forwards[0].routings))]

    def min_margins(self):
        out = {}
        for f in self.forwards:
            for r in f.routings:
                for k, v in r.margins.items():
                    out[k] = min(out.get(k, math.inf), v)
        return out


def global_batch_loss(cfg, params, biases, micro_batches):
    """All losses of MODEL.md section 3 over a global batch (list of MicroBatch)."""
    zero = torch.zeros((), dtype=DTYPE)
    ce_sum, n_targets = zero, 0
    aux, seq_aux, z = zero, zero, zero
    forwards = []
    mtp_sum, n_mtp = zero, 0
    for mb in micro_batches:
        out = forward(cfg, params, biases, mb)
        forwards.append(out)
        tgt = mb.targets()
        ce_sum = ce_sum + F.cross_entropy(out.logits, tgt, ignore_index=IGNORE_INDEX, reduction="sum")
        n_targets += int((tgt != IGNORE_INDEX).sum())
        if out.mtp_logits is not None:
            t2 = mb.mtp_targets()
            if int((t2 != IGNORE_INDEX).sum()) > 0:
                mtp_sum = mtp_sum + F.cross_entropy(out.mtp_logits, t2, ignore_index=IGNORE_INDEX, reduction="sum")
            n_mtp += int((t2 != IGNORE_INDEX).sum())
        for r in out.routings:
            aux = aux + switch_aux_loss(cfg, r)
            seq_aux = seq_aux + seq_aux_loss_sum(cfg, r, mb.rows, mb.seq_len)
            z = z + z_loss(cfg, r)
    n_micro = len(micro_batches)
    n_rows = sum(mb.rows for mb in micro_batches)
    ce = ce_sum / n_targets if n_targets > 0 else zero
    mtp = cfg.mtp_loss_weight * mtp_sum / n_mtp if n_mtp > 0 else zero
    return GlobalLoss(ce, aux / n_micro, seq_aux / n_rows, z / n_micro, forwards, n_targets, mtp)


# ----------------------------------------------------------------------------------
# 4-5. Training step: clipping, AdamW, aux-loss-free bias update
# ----------------------------------------------------------------------------------

def make_optimizer(params, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0):
    """torch.optim.AdamW with weight decay on rank-2 tensors only (not RMSNorm weights)."""
    decay = [p for p in params.values() if p.dim() == 2]
    no_decay = [p for p in params.values() if p.dim() != 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps, foreach=False)


def newton_schulz(g):
    """Muon's orthogonalisation (MODEL.md section 12): X = G/||G||_F (transposed when
    rows > cols), ten times X = aX + b(XX^T)X + c(XX^T)^2 X, eight with (3.4445, -4.7750,
    2.0315) then two with (2, -1.5, 0.5). An all-zero G gives 0."""
    x = g.T if g.shape[0] > g.shape[1] else g
    norm = x.norm()
    if float(norm) == 0.0:
        return torch.zeros_like(g)
    x = x / norm
    for i in range(10):
        a, b, c = (3.4445, -4.7750, 2.0315) if i < 8 else (2.0, -1.5, 0.5)
        A = x @ x.T
        x = a * x + (b * A + c * (A @ A)) @ x
    return x.T if g.shape[0] > g.shape[1] else x


class Muon(torch.optim.Optimizer):
    """MODEL.md section 12, per matrix: M = mu M + G; O = NS(mu M + G) * 0.18 sqrt(max(r, c));
    W = W (1 - lr wd) - lr O, lr = lr_ratio * the group's (scheduled) lr."""

    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0, lr_ratio=1.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, lr_ratio=lr_ratio))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr = group["lr_ratio"] * group["lr"]
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                o = newton_schulz(group["momentum"] * buf + p.grad) * (0.18 * math.sqrt(max(p.shape)))
                p.mul_(1.0 - lr * group["weight_decay"]).sub_(lr * o)


def is_muon_param(name, p):
    """Muon's tensors: rank 2, not the embedding, not the LM head (router and experts included)."""
    return p.dim() == 2 and name not in ("model.embed_tokens.weight", "lm_head.weight")


class MuonWithAdamW:
    """optim.name = "muon": Muon for is_muon_param, torch AdamW (make_optimizer) for the rest.
    param_groups lists both, so train_step's per-step lr reaches both."""

    def __init__(self, params, lr, beta1, beta2, eps, weight_decay, momentum, muon_weight_decay, lr_ratio):
        self.adamw = make_optimizer({n: p for n, p in params.items() if not is_muon_param(n, p)}, lr, beta1, beta2,
                                    eps, weight_decay)
        self.muon = Muon([p for n, p in params.items() if is_muon_param(n, p)], lr, momentum, muon_weight_decay,
                         lr_ratio)
        self.param_groups = self.adamw.param_groups + self.muon.param_groups

    def step(self):
        self.adamw.step()
        self.muon.step()


def clip_coefficient(norm, max_norm):
    """clip_grad_norm_: min(1, max_norm / (norm + 1e-6)); max_norm <= 0 turns clipping off."""
    return min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0


def compute_gradients(cfg, params, biases, micro_batches):
    """Forward + backward of the total loss; every parameter gets a .grad (zero if unreached)."""
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    loss = global_batch_loss(cfg, params, biases, micro_batches)
    loss.total.backward()
    for p in params.values():
        if p.grad is None:          # e.g. an expert no token reached: zero, still decayed (8.7)
            p.grad = torch.zeros_like(p)
    return loss


def global_grad_norm(params):
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params.values()))


def update_bias(cfg, biases, counts):
    """b_i += rate * sign(mean(c) - c_i), stored as float32: b = float32(b + rate * sign)."""
    if cfg.topk_method != "noaux_tc":
        return
    for l, c in zip(cfg.moe_layers(), counts):
        if cfg.is_hash_layer(l):    # no bias (MODEL.md 12)
            continue
        c = c.to(DTYPE)
        b = biases[bias_name(l)]
        b.copy_((b + cfg.bias_update_rate * torch.sign(c.mean() - c)).to(torch.float32).to(DTYPE))


@dataclass
class StepResult:
    loss: GlobalLoss
    grad_norm: float        # before clipping
    clip_coef: float


def train_step(cfg, params, biases, optimizer, micro_batches, lr, max_grad_norm):
    """One step as the trainer does it: gradients of the global-batch total loss, global-norm
    clipping, AdamW at learning rate lr, then the bias update from this step's routing."""
    loss = compute_gradients(cfg, params, biases, micro_batches)
    norm = global_grad_norm(params)
    coef = clip_coefficient(norm, max_grad_norm)
    with torch.no_grad():
        for p in params.values():
            p.grad.mul_(coef)
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    update_bias(cfg, biases, loss.expert_counts())
    return StepResult(loss, norm, coef)


# ----------------------------------------------------------------------------------
# Random initialisation, bit-compatible with moe/init.cpp (MODEL.md section 6)
# ----------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _fnv1a64(s):
    h = 0xCBF29CE484222325
    for ch in s.encode("utf-8"):
        h = ((h ^ ch) * 0x100000001B3) & _MASK64
    return h


def counter_normal(seed, name, n):
    """[N(0,1) for element 0..n-1 of tensor `name`]: the generator of moe/init.cpp
    (splitmix64 of (seed, fnv1a64(name), index), Box-Muller on two 53-bit uniforms)."""
    key = _splitmix64((seed ^ _splitmix64(_fnv1a64(name))) & _MASK64)
    out = []
    for i in range(n):
        a = _splitmix64(key ^ _splitmix64(2 * i))
        b = _splitmix64(key ^ _splitmix64(2 * i + 1))
        u1 = 1.0 - (a >> 11) * (1.0 / 9007199254740992.0)
        u2 = (b >> 11) * (1.0 / 9007199254740992.0)
        out.append(math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2))
    return out


def counter_bits(key, index):
    """64 random bits for (key, index): splitmix64(key ^ splitmix64(index)) (moe/init.cpp)."""
    return _splitmix64(key ^ _splitmix64(index))


def init_tid2eid(cfg, seed, l):
    """The default (V, K) int32 hash table of model layer l, as moe/init.cpp's init_tid2eid:
    per token v a partial Fisher-Yates shuffle of 0..E-1, the k-th swap partner
    k + counter_bits(key, v*K + k) % (E - k), key from (seed, tid2eid_name(l))."""
    V, K, E = cfg.vocab_size, cfg.num_experts_per_tok, cfg.n_routed_experts
    key = _splitmix64((seed ^ _splitmix64(_fnv1a64(tid2eid_name(l)))) & _MASK64)
    rows = []
    for v in range(V):
        perm = list(range(E))
        for k in range(K):
            j = k + counter_bits(key, v * K + k) % (E - k)
            perm[k], perm[j] = perm[j], perm[k]
        rows.append(perm[:K])
    return torch.tensor(rows, dtype=torch.int32)


def init_params(cfg, seed):
    """{name: float32 tensor}: matrices initializer_range * counter_normal, RMSNorm weights and
    mHC scales 1, mHC biases (.base, .hc_base) and V4 attention sinks 0."""
    params = {}
    for name, shape in param_shapes(cfg):
        if len(shape) == 1:
            zero = name.endswith(".base") or name.endswith(".hc_base") or name.endswith(".sinks")
            params[name] = (torch.zeros if zero else torch.ones)(shape, dtype=torch.float32)
        else:
            n = math.prod(shape)
            vals = [cfg.initializer_range * x for x in counter_normal(seed, name, n)]
            params[name] = torch.tensor(vals, dtype=DTYPE).to(torch.float32).view(shape)
    return params
