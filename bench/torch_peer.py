#!/usr/bin/python3
"""PyTorch CPU peer benchmark for moetune's training throughput.

A float32 PyTorch implementation of the model of MODEL.md section 2 (embedding,
RMSNorm, GQA attention with Hugging Face RoPE and a causal + document mask, dense
SwiGLU layers, DeepSeek-V3 MoE layers with sigmoid/softmax scoring, noaux_tc bias,
top-K, norm_topk_prob, sorted expert dispatch, shared expert, LM head), trained with
the losses of section 3 (cross-entropy with -100 ignored, sequence-wise balance loss,
and the switch / z-loss when their coefficients are non-zero), clip_grad_norm_ and
torch.optim.AdamW, plus the aux-loss-free bias update of section 4. It is written to
be a reasonably efficient eager-mode peer (batched, no per-token Python loops), so that
tokens/s of `moetune train` can be compared with it on the same machine and shapes.
It is a speed peer only: correctness is checked by tests/reference/, not here.

Usage (Debian's python3-torch lives in /usr/bin/python3):
  /usr/bin/python3 bench/torch_peer.py --config examples/small.json --threads 1 --steps 20 --warmup 3
Prints one JSON line {"impl": "pytorch", "threads", "tokens_per_s_median", "step_s_median",
"torch_version", "blas", ...} and one human-readable line.

Shapes in comments: B rows, S seq_len, T = B*S tokens, d hidden, H / Hkv heads,
hd head_dim, E experts, K experts per token, F expert width, V vocab.
"""
import argparse
import json
import math
import os
import re
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="examples/small.json",
                   help="moetune run config JSON (its model section, data.seq_len, "
                        "train.micro_batch_size and train.grad_accum_steps are used)")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP / OpenBLAS threads")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-seq-aux", action="store_true",
                   help="turn the sequence-wise balance loss off (default: seq_aux_loss_coeff of the config, 1e-4)")
    p.add_argument("--foreach", choices=["on", "off"], default="on",
                   help="torch.optim.AdamW foreach= (multi-tensor) implementation; default on")
    p.add_argument("--doc-len", type=int, nargs=2, default=[8, 48], metavar=("MIN", "MAX"),
                   help="random document lengths packed into each row (like `moetune gen-data`), "
                        "so RoPE positions restart and the document mask is exercised")
    p.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                   help="tuned (default): re-run under glibc MALLOC_MMAP_THRESHOLD_=32 MiB and "
                        "MALLOC_TRIM_THRESHOLD_=1 GiB so freed activations are reused instead of being "
                        "returned to the kernel and page-faulted in again every step (the role a caching "
                        "allocator such as jemalloc plays); default: glibc as it comes")
    p.add_argument("--blas-core", default="avx512",
                   help="OpenBLAS kernel family (OPENBLAS_CORETYPE). avx512 (default): SkylakeX, OpenBLAS's "
                        "AVX-512 kernels, when the CPU has avx512f (OpenBLAS 0.3.21 does not detect AMD Zen 4/5 "
                        "as AVX-512 capable and uses its AVX2 Haswell kernels; moetune is compared in its "
                        "-march=native build); this overrides OPENBLAS_CORETYPE from the environment. "
                        "env: leave OPENBLAS_CORETYPE as the environment has it. Any other value is used as "
                        "OPENBLAS_CORETYPE.")
    p.add_argument("--omp-wait", default="passive",
                   help="OMP_WAIT_POLICY for more than one thread. passive (default): libgomp's idle "
                        "threads sleep at once instead of spinning, so they do not take the cores from "
                        "OpenBLAS's own pthread pool (with both spinning, 2 threads on 2 cores run several "
                        "times slower than 1); env: leave OMP_WAIT_POLICY as the environment has it; any "
                        "other value is used as OMP_WAIT_POLICY")
    return p.parse_args(argv)


def cpu_has_avx512f():
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


# The thread count must reach OpenMP and OpenBLAS before torch loads them:
# torch.set_num_threads alone does not change OpenBLAS's own pthread pool.
ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    # OPENBLAS_CORETYPE as the caller's environment had it (kept across the re-exec below)
    os.environ.setdefault("TORCH_PEER_ENV_CORETYPE", os.environ.get("OPENBLAS_CORETYPE", "unset"))
    if ARGS.blas_core == "avx512":
        if cpu_has_avx512f():
            os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    elif ARGS.blas_core != "env":
        os.environ["OPENBLAS_CORETYPE"] = ARGS.blas_core
    if ARGS.threads > 1 and ARGS.omp_wait != "env":
        os.environ["OMP_WAIT_POLICY"] = ARGS.omp_wait.upper()
    if ARGS.malloc == "tuned" and os.environ.get("TORCH_PEER_REEXEC") != "1":
        # glibc reads these only at start-up: run this script again with them set.
        env = dict(os.environ, TORCH_PEER_REEXEC="1")
        for k, v in MALLOC_TUNING.items():
            env.setdefault(k, v)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# ----------------------------------------------------------------------------- config
DEFAULTS = {
    "vocab_size": 512, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": None, "head_dim": None, "max_position_embeddings": 256,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "first_k_dense_replace": 1,
    "intermediate_size": None, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": None, "n_shared_experts": 1, "scoring_func": "sigmoid",
    "norm_topk_prob": True, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
    "topk_method": "noaux_tc", "bias_update_rate": 1e-3, "aux_loss_coeff": 0.0,
    "seq_aux_loss_coeff": 1e-4, "z_loss_coeff": 0.0, "capacity_factor": 0.0,
    "tie_word_embeddings": False, "initializer_range": 0.02,
}


class Cfg:
    """Model config of MODEL.md section 1 with its defaults and derived values."""

    def __init__(self, model_json):
        unknown = set(model_json) - set(DEFAULTS)
        if unknown:
            raise SystemExit(f"error: model config: unknown key(s) {sorted(unknown)}")
        v = dict(DEFAULTS)
        v.update(model_json)
        for k, x in v.items():
            setattr(self, k, x)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.hidden_size
        if self.capacity_factor and self.capacity_factor > 0:
            raise SystemExit("error: model.capacity_factor > 0 is not implemented by the PyTorch peer (dropless only)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise SystemExit("error: model.num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise SystemExit("error: model.head_dim must be even for RoPE")


def load_run_config(path):
    with open(path) as f:
        rc = json.load(f)
    model = rc.get("model", rc)  # a run config, or a bare model config.json
    data = rc.get("data", {})
    train = rc.get("train", {})
    optim = rc.get("optim", {})
    return (Cfg(model), int(data.get("seq_len", 128)), int(train.get("micro_batch_size", 8)),
            int(train.get("grad_accum_steps", 1)), optim)


# ----------------------------------------------------------------------------- model
def rms_norm(x, w, eps):
    # x (..., d), w (d)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.H, self.Hkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        d = c.hidden_size
        # q, k, v projections fused into one (H*hd + 2*Hkv*hd, d) matrix: one GEMM.
        self.qkv = nn.Parameter(torch.empty((self.H + 2 * self.Hkv) * self.hd, d))
        self.o = nn.Parameter(torch.empty(d, self.H * self.hd))
        self.scale = 1.0 / math.sqrt(self.hd)

    def forward(self, a, cos, sin, mask_bias):
        # a (B,S,d); cos, sin (B,1,S,hd); mask_bias (B,1,S,S): 0 where a query may attend, -inf elsewhere
        B, S, _ = a.shape
        H, Hkv, hd = self.H, self.Hkv, self.hd
        rep = H // Hkv
        qkv = F.linear(a, self.qkv)
        q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = q.view(B, S, H, hd).transpose(1, 2)  # (B,H,S,hd)
        k = k.view(B, S, Hkv, hd).transpose(1, 2)  # (B,Hkv,S,hd)
        v = v.view(B, S, Hkv, hd).transpose(1, 2)
        # 1/sqrt(hd) folded into q's RoPE factors (T*H*hd elements, not B*H*S*S scores)
        q = q * (cos * self.scale) + rotate_half(q) * (sin * self.scale)
        k = k * cos + rotate_half(k) * sin
        # GQA without repeating k/v: query head h = kh*rep + r uses key head kh, so the
        # rep query heads of one key head are stacked along the row axis.
        q = q.reshape(B, Hkv, rep * S, hd)
        scores = torch.matmul(q, k.transpose(-1, -2))  # (B,Hkv,rep*S,S)
        # additive mask (0 / -inf), broadcast over key heads and the rep query heads;
        # an add has a free backward, unlike masked_fill
        scores = scores.view(B, Hkv, rep, S, S) + mask_bias.unsqueeze(2)
        probs = torch.softmax(scores, dim=-1).view(B, Hkv, rep * S, S)
        out = torch.matmul(probs, v)  # (B,Hkv,rep*S,hd)
        out = out.view(B, H, S, hd).transpose(1, 2).reshape(B, S, H * hd)
        return F.linear(out, self.o)


def swiglu(u, w_gate_up, w_down):
    # u (N,d); w_gate_up (2I,d) = [gate; up]; w_down (d,I)
    g, up = F.linear(u, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(g) * up, w_down)


class DenseMLP(nn.Module):
    def __init__(self, d, inter):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(2 * inter, d))  # gate_proj and up_proj fused
        self.down = nn.Parameter(torch.empty(d, inter))

    def forward(self, u):
        return swiglu(u, self.gate_up, self.down)


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, E, Fw = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
        self.c = c
        self.E, self.K = E, c.num_experts_per_tok
        self.gate = nn.Parameter(torch.empty(E, d))
        self.register_buffer("bias", torch.zeros(E))  # e_score_correction_bias, not trained
        # Experts stacked: (E, 2F, d) and (E, d, F); unbind() gives per-expert views whose
        # gradients are stacked back in one copy by autograd.
        self.experts_gate_up = nn.Parameter(torch.empty(E, 2 * Fw, d))
        self.experts_down = nn.Parameter(torch.empty(E, d, Fw))
        self.shared = DenseMLP(d, c.n_shared_experts * Fw) if c.n_shared_experts > 0 else None

    def route(self, x):
        # x (T,d) -> scores s (T,E), logits (T,E), idx (T,K), weights w (T,K)
        c = self.c
        logits = F.linear(x, self.gate)
        s = torch.sigmoid(logits) if c.scoring_func == "sigmoid" else torch.softmax(logits, dim=-1)
        with torch.no_grad():
            sel = s + self.bias if c.topk_method == "noaux_tc" else s.clone()
            if c.n_group > 1:
                T = x.shape[0]
                g = sel.view(T, c.n_group, -1)
                if c.topk_method == "noaux_tc":
                    gs = g.topk(min(2, g.shape[-1]), dim=-1).values.sum(-1)
                else:
                    gs = g.max(-1).values
                keep = torch.zeros_like(gs, dtype=torch.bool)
                keep.scatter_(1, gs.topk(c.topk_group, dim=-1).indices, True)
                sel = g.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(T, -1)
            idx = sel.topk(self.K, dim=-1).indices  # (T,K)
        w = s.gather(1, idx)
        if c.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * c.routed_scaling_factor
        return s, logits, idx, w

    def forward(self, x, B, S):
        # x (T,d), T = B*S -> y (T,d), aux loss (scalar), expert counts (E)
        T, d = x.shape
        E, K, c = self.E, self.K, self.c
        s, logits, idx, w = self.route(x)
        flat = idx.reshape(-1)  # (T*K) expert of each token-slot pair
        order = torch.sort(flat, stable=True).indices  # pairs grouped by expert
        tok = order // K  # token of each sorted pair
        counts = torch.bincount(flat, minlength=E)
        xs = x.index_select(0, tok)  # (T*K, d)
        outs = []
        start = 0
        for e, (wgu, wd, n) in enumerate(zip(self.experts_gate_up.unbind(0), self.experts_down.unbind(0),
                                              counts.tolist())):
            if n:
                outs.append(swiglu(xs[start:start + n], wgu, wd))
            start += n
        ys = torch.cat(outs, 0) * w.reshape(-1).index_select(0, order).unsqueeze(1)  # (T*K, d)
        y = torch.zeros(T, d, dtype=x.dtype).index_add(0, tok, ys)
        if self.shared is not None:
            y = y + self.shared(x)

        aux = x.new_zeros(())
        if c.seq_aux_loss_coeff:
            # per row: f_i = E/(K*S) * n_i (constant), P_i = mean_t s_ti / sum_j s_tj
            n_row = torch.zeros(B, E).scatter_add_(1, idx.view(B, S * K), torch.ones(B, S * K))
            p = s / s.sum(-1, keepdim=True)
            P = p.view(B, S, E).mean(1)
            aux = aux + c.seq_aux_loss_coeff * ((n_row * (E / (K * S))) * P).sum(-1).mean()
        if c.aux_loss_coeff:
            f = counts.to(x.dtype) / (T * K)
            P = (s / s.sum(-1, keepdim=True)).mean(0)
            aux = aux + c.aux_loss_coeff * E * (f * P).sum()
        if c.z_loss_coeff:
            aux = aux + c.z_loss_coeff * torch.logsumexp(logits, -1).pow(2).mean()
        return y, aux, counts


class Layer(nn.Module):
    def __init__(self, c, l):
        super().__init__()
        d = c.hidden_size
        self.eps = c.rms_norm_eps
        self.in_norm = nn.Parameter(torch.ones(d))
        self.post_norm = nn.Parameter(torch.ones(d))
        self.attn = Attention(c)
        self.is_moe = l >= c.first_k_dense_replace
        self.mlp = MoE(c) if self.is_moe else DenseMLP(d, c.intermediate_size)

    def forward(self, h, cos, sin, mask_bias):
        B, S, d = h.shape
        h = h + self.attn(rms_norm(h, self.in_norm, self.eps), cos, sin, mask_bias)
        u = rms_norm(h, self.post_norm, self.eps).view(B * S, d)
        if self.is_moe:
            y, aux, counts = self.mlp(u, B, S)
        else:
            y, aux, counts = self.mlp(u), None, None
        return h + y.view(B, S, d), aux, counts


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed = nn.Parameter(torch.empty(c.vocab_size, c.hidden_size))
        self.layers = nn.ModuleList(Layer(c, l) for l in range(c.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(c.hidden_size))
        self.lm_head = None if c.tie_word_embeddings else nn.Parameter(torch.empty(c.vocab_size, c.hidden_size))
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
        ang = torch.arange(c.max_position_embeddings, dtype=torch.float64)[:, None] * inv_freq[None, :]
        ang = torch.cat((ang, ang), dim=-1)  # (P, hd)
        self.register_buffer("cos_table", ang.cos().float())
        self.register_buffer("sin_table", ang.sin().float())
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, c.initializer_range)

    def forward(self, ids, pos, doc, targets, n_targets_total):
        # ids, pos, doc, targets (B,S) int64 -> (total loss, ce sum / n_targets_total, counts list)
        B, S = ids.shape
        h = F.embedding(ids, self.embed)  # (B,S,d)
        cos = self.cos_table[pos].unsqueeze(1)  # (B,1,S,hd)
        sin = self.sin_table[pos].unsqueeze(1)
        causal = torch.ones(S, S, dtype=torch.bool).tril_()
        allowed = causal & (doc.unsqueeze(2) == doc.unsqueeze(1))  # (B,S,S)
        mask_bias = torch.zeros(B, 1, S, S).masked_fill_(~allowed.unsqueeze(1), float("-inf"))
        aux_total = h.new_zeros(())
        counts = []
        for layer in self.layers:
            h, aux, cnt = layer(h, cos, sin, mask_bias)
            if aux is not None:
                aux_total = aux_total + aux
                counts.append(cnt)
        head = self.embed if self.lm_head is None else self.lm_head
        logits = F.linear(rms_norm(h, self.norm, self.c.rms_norm_eps), head)  # (B,S,V)
        ce = F.cross_entropy(logits.view(B * S, -1), targets.view(-1), ignore_index=-100,
                             reduction="sum") / max(n_targets_total, 1)
        return ce, aux_total, counts


# ----------------------------------------------------------------------------- data
def random_micro_batch(gen, B, S, V, doc_min, doc_max):
    """Uniform random token ids packed as random-length documents into B rows of S.
    Returns ids, pos (RoPE position, restarts per document), doc ids, targets (B,S):
    target[t] = ids[t+1] inside a document, -100 across a boundary and at the row end."""
    ids = torch.randint(0, V, (B, S), generator=gen)
    lens = torch.randint(doc_min, doc_max + 1, (B, S), generator=gen)  # enough documents for any row
    starts = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):  # data preparation, outside the timed step
        t = 0
        for n in lens[b].tolist():
            if t >= S:
                break
            starts[b, t] = True
            t += n
    doc = starts.long().cumsum(1)
    idx = torch.arange(S).expand(B, S)
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values
    pos = idx - first
    targets = torch.full((B, S), -100, dtype=torch.long)
    same = doc[:, 1:] == doc[:, :-1]
    targets[:, :-1] = torch.where(same, ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    return ids, pos, doc, targets


# ----------------------------------------------------------------------------- train step
def train_step(model, opt, micro_batches, bias_rate, max_grad_norm):
    n_targets = sum(int((mb[3] != -100).sum()) for mb in micro_batches)
    opt.zero_grad(set_to_none=True)
    ce_total = 0.0
    total_counts = None
    for ids, pos, doc, tg in micro_batches:
        ce, aux, counts = model(ids, pos, doc, tg, n_targets)
        (ce + aux / len(micro_batches)).backward()
        ce_total += float(ce)
        c = torch.stack(counts) if counts else None
        total_counts = c if total_counts is None else total_counts + c
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    if total_counts is not None and model.c.topk_method == "noaux_tc":  # MODEL.md section 4
        with torch.no_grad():
            moes = [l.mlp for l in model.layers if l.is_moe]
            cf = total_counts.float()
            upd = bias_rate * torch.sign(cf.mean(1, keepdim=True) - cf)
            for m, u in zip(moes, upd):
                m.bias.add_(u)
    return ce_total


def blas_line():
    m = re.search(r"BLAS_INFO=[^,\s]*", torch.__config__.show())
    info = m.group(0) if m else "BLAS_INFO=?"
    libs = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "blas" in path.lower() and path not in libs:
                    libs.append(path)
    except OSError:
        pass
    return info + (" (loaded: " + ", ".join(os.path.basename(p) for p in libs) + ")" if libs else "")


def main(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    c, S, B, accum, optim = load_run_config(args.config)
    if args.no_seq_aux:
        c.seq_aux_loss_coeff = 0.0
    model = Model(c)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    wd = float(optim.get("weight_decay", 0.1))
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=float(optim.get("lr", 1e-3)),
                            betas=(float(optim.get("beta1", 0.9)), float(optim.get("beta2", 0.95))),
                            eps=float(optim.get("eps", 1e-8)), foreach=(args.foreach == "on"))
    max_norm = float(optim.get("max_grad_norm", 1.0))
    gen = torch.Generator().manual_seed(args.seed)
    n_batches = 4  # a few distinct batches, cycled; speed does not depend on the data
    batches = [[random_micro_batch(gen, B, S, c.vocab_size, *args.doc_len) for _ in range(accum)]
               for _ in range(n_batches)]
    tokens = B * S * accum
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = train_step(model, opt, batches[step % n_batches], c.bias_update_rate, max_norm)
        dt = time.perf_counter() - t0
        losses.append(loss)
        if step >= args.warmup:
            times.append(dt)
    step_med = statistics.median(times)
    out = {
        "impl": "pytorch",
        "threads": args.threads,
        "tokens_per_s_median": tokens / step_med,
        "step_s_median": step_med,
        "steps": args.steps,
        "warmup": args.warmup,
        "tokens_per_step": tokens,
        "shape": {"micro_batch_size": B, "seq_len": S, "grad_accum_steps": accum},
        "seq_aux_loss_coeff": c.seq_aux_loss_coeff,
        "adamw_foreach": args.foreach == "on",
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "blas": blas_line(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "unset (OpenBLAS detection)"),
        "openblas_coretype_in_env": os.environ.get("TORCH_PEER_ENV_CORETYPE", "unset"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "malloc": {k: os.environ[k] for k in MALLOC_TUNING if k in os.environ} or "glibc default",
        "config": args.config,
    }
    print(json.dumps(out))
    print(f"pytorch {torch.__version__}: {args.threads} thread(s), {tokens} tokens/step, "
          f"median step {step_med * 1e3:.1f} ms, {tokens / step_med:.0f} tok/s "
          f"(loss {losses[0]:.3f} -> {losses[-1]:.3f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
