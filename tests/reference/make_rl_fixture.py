#!/usr/bin/python3
"""float64 reference of RL updates through the whole model (MODEL.md section 11) and the
fixture maker for tests/fixtures/rl_parity/ (compared by the C++ tests RlParity.*).

An RL optimizer step is: forward of every micro-batch of completion rows (routing live, or
replaying a given selection), the section-11 loss head of rl_ref.py on its logits, plus the
balance losses of section 3 on all tokens of those rows (normalised over the step's
micro-batches and rows, as training), backward by autograd, global-norm clipping, AdamW,
then the expert-bias update of section 4 with the counts of the routing used. The fixture
runs `steps` such steps on the same completions with the same lp_old / lp_ref /
advantages / weights (what `rl.mu = steps` with one minibatch does), so later steps have
ratios away from 1 and exercise the clipping on weights that moved.

    make_rl_fixture.py --batch tests/fixtures/rl_parity/batch.json --out tests/fixtures/rl_parity
        computes <case>.safetensors for every case of the batch file
    make_rl_fixture.py --make-batch tests/fixtures/rl_parity/batch.json
        (re)writes the batch file: rows, lp_old/lp_ref drawn around the checkpoints' own
        log-probs, advantages and weights from rl_ref.py, replay selections; each case is
        redrawn until routing and clipping are decisive (margins below)

Batch file: {"cases": [case, ...]}, case =
  {"name", "ckpt" (directory relative to tests/fixtures), "initial_bias" {bias name: E floats},
   "rl": {"loss_type", "importance_sampling_level", "epsilon", "epsilon_high", "beta",
          "temperature", "max_new_tokens"},
   "optim": {"lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm"}, "steps",
   "micro_batches": [{"rows", "seq_len", "input_ids", "labels", "doc_ids",       (R*S each)
                      "lp_old", "lp_ref", "advantage", "weight", "seq",           (R*S each)
                      "replay": {"idx": [[R*S*K] per MoE layer], "kept": [[R*S*K] ...]}}]}
  The per-position arrays are indexed by the position whose logits predict the token
  (position t predicts labels[t+1], Hugging Face convention), as RlTokens in
  train/rl_loss.hpp: nonzero exactly where the target is not -100; seq is the completion
  id (the row within its micro-batch), -1 elsewhere. "replay" is optional (route live).

Output <case>.safetensors (every tensor F64):
  step<k>.{loss, pg_loss, kl_sum, entropy_sum, ratio_sum, ratio_min, ratio_max, lp_sum, tokens,
           clipped_low, clipped_high}  [1]  RL head terms summed over the micro-batches of
                                            step k's forward (k = 1..steps), before its update
  step<k>.{aux, seq_aux, z, total, grad_norm}  [1]  balance losses (all MoE layers), total
                                            = loss + aux + seq_aux + z, norm before clipping
  step<k>.expert_counts.<layer>  (E)        pairs per expert over the step's batch, before drops
  lp.<m>  (R*S)                             log-probs at the loss positions at the initial
                                            weights (0 elsewhere), micro-batch m
  grad.<param>                              gradient of step1.total, before clipping
  final.<param>, final.<bias name>          after the last step
  min_margin [1]  smallest top-K / group gap of the live routing over every forward (inf
                  when every layer is replayed); clip_margin [1]  smallest distance of a
                  ratio from 1-epsilon or 1+epsilon_high over every step
Run with /usr/bin/python3 (Debian's python with torch).
"""
import argparse
import json
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "fixtures")
sys.path.insert(0, HERE)
import moe_ref as ref  # noqa: E402
import rl_ref  # noqa: E402
from safetensors_io import load_checkpoint_tensors, write_safetensors  # noqa: E402

D = torch.float64
RL_KEYS = ("loss_type", "importance_sampling_level", "epsilon", "epsilon_high", "beta", "temperature",
           "max_new_tokens")
HEAD_TERMS = ("loss", "pg_loss", "kl_sum", "entropy_sum", "ratio_sum", "lp_sum", "tokens", "clipped_low",
              "clipped_high")
POSITION_KEYS = ("lp_old", "lp_ref", "advantage", "weight", "seq")


# ------------------------------------------------------------------------------------------
# Loading a case
# ------------------------------------------------------------------------------------------

class Micro:
    """One micro-batch of completion rows with its per-position RL inputs."""

    def __init__(self, d, cfg, where):
        self.mb = ref.MicroBatch.from_dict(d, cfg, where=where)
        T = self.mb.tokens
        for key in POSITION_KEYS:
            if len(d.get(key, [])) != T:
                raise ValueError(f"{where}: '{key}' needs rows*seq_len = {T} entries")
        self.lp_old = torch.tensor(d["lp_old"], dtype=D)
        self.lp_ref = torch.tensor(d["lp_ref"], dtype=D)
        self.adv = torch.tensor(d["advantage"], dtype=D)
        self.weight = torch.tensor(d["weight"], dtype=D)
        self.seq = torch.tensor(d["seq"], dtype=torch.long)
        self.targets = self.mb.targets()
        mask = self.targets != ref.IGNORE_INDEX
        if not torch.equal(mask, self.seq >= 0):
            raise ValueError(f"{where}: 'seq' must be >= 0 exactly at the positions that have a target")
        self.replay = None
        if "replay" in d:
            K = cfg.num_experts_per_tok
            idx, kept = d["replay"]["idx"], d["replay"]["kept"]
            if len(idx) != len(cfg.moe_layers()) or len(kept) != len(idx):
                raise ValueError(f"{where}: replay needs idx and kept for each of the {len(cfg.moe_layers())} MoE layers")
            self.replay = []
            for j, (i, k) in enumerate(zip(idx, kept)):
                if len(i) != T * K or len(k) != T * K:
                    raise ValueError(f"{where}: replay layer {j} needs rows*seq_len*K = {T * K} entries")
                ii = torch.tensor(i, dtype=torch.long).view(T, K)
                if any(len(set(row.tolist())) != K for row in ii):
                    raise ValueError(f"{where}: replay layer {j}: a token selects the same expert twice")
                self.replay.append((ii, torch.tensor(k, dtype=torch.bool).view(T, K)))


def load_case(case, root=FIXTURES):
    ckpt = os.path.join(root, case["ckpt"])
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = ref.Config.from_dict(json.load(f), where=ckpt)
    params, biases = ref.split_checkpoint(cfg, load_checkpoint_tensors(ckpt), where=ckpt)
    for name, values in case.get("initial_bias", {}).items():
        if name not in biases or len(values) != cfg.n_routed_experts:
            raise ValueError(f"{case['name']}: initial_bias '{name}' is not a bias of E = {cfg.n_routed_experts}")
        biases[name] = torch.tensor(values, dtype=D).to(torch.float32).to(D)
    rl = {k: case["rl"][k] for k in RL_KEYS}
    micros = [Micro(m, cfg, f"{case['name']}: micro_batches[{i}]") for i, m in enumerate(case["micro_batches"])]
    return cfg, params, biases, rl, micros


# ------------------------------------------------------------------------------------------
# The RL step
# ------------------------------------------------------------------------------------------

def rl_step_loss(cfg, params, biases, rl, micros):
    """Forward of one optimizer step's micro-batches: the RL head terms (summed), the balance
    losses of section 3 with the training normalisers, the per-layer expert counts."""
    zero = torch.zeros((), dtype=D)
    head = {k: zero for k in HEAD_TERMS}
    ratio_min, ratio_max = math.inf, -math.inf
    aux = seq_aux = z = zero
    counts = [torch.zeros(cfg.n_routed_experts, dtype=torch.long) for _ in cfg.moe_layers()]
    lps, margins, ratios = [], {}, []
    for m in micros:
        out = ref.forward(cfg, params, biases, m.mb, replay=m.replay)
        h = rl_ref.loss_head(out.logits, m.targets, m.lp_old, m.lp_ref, m.adv, m.weight, m.seq, rl)
        for k in HEAD_TERMS:
            head[k] = head[k] + h[k]
        ratio_min = min(ratio_min, float(h["ratio_min"]))
        ratio_max = max(ratio_max, float(h["ratio_max"]))
        lps.append(h["lp"].detach())
        ratios.append((h["_ratio"], m.targets != ref.IGNORE_INDEX))
        for j, r in enumerate(out.routings):
            aux = aux + ref.switch_aux_loss(cfg, r)
            seq_aux = seq_aux + ref.seq_aux_loss_sum(cfg, r, m.mb.rows, m.mb.seq_len)
            z = z + ref.z_loss(cfg, r)
            counts[j] += r.counts
            for k, v in r.margins.items():
                margins[k] = min(margins.get(k, math.inf), v)
    n_micro = len(micros)
    n_rows = sum(m.mb.rows for m in micros)
    res = dict(head)
    res["aux"], res["seq_aux"], res["z"] = aux / n_micro, seq_aux / n_rows, z / n_micro
    res["total"] = res["loss"] + res["aux"] + res["seq_aux"] + res["z"]
    res["ratio_min"], res["ratio_max"] = ratio_min, ratio_max
    clip = min((rl_ref.clip_margin(r, mask, rl) for r, mask in ratios if mask.any()), default=math.inf)
    return res, counts, lps, margins, clip


def run_case(case, root=FIXTURES):
    """All outputs of one case (dict of F64 tensors) and its margins."""
    cfg, params, biases, rl, micros = load_case(case, root)
    o = case["optim"]
    steps = int(case["steps"])
    opt = ref.make_optimizer(params, o["lr"], o["beta1"], o["beta2"], o["eps"], o["weight_decay"])
    out, margins, clip = {}, {}, math.inf
    scalar = lambda x: torch.tensor([float(x)], dtype=D)
    for k in range(1, steps + 1):
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        res, counts, lps, mg, cm = rl_step_loss(cfg, params, biases, rl, micros)
        res["total"].backward()
        for p in params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norm = ref.global_grad_norm(params)
        for key, v in res.items():
            out[f"step{k}.{key}"] = scalar(v.detach() if torch.is_tensor(v) else v)
        out[f"step{k}.grad_norm"] = scalar(norm)
        for l, c in zip(cfg.moe_layers(), counts):
            out[f"step{k}.expert_counts.{l}"] = c.to(D)
        if k == 1:
            for name, p in params.items():
                out[f"grad.{name}"] = p.grad.detach().clone()
            for m, lp in enumerate(lps):
                out[f"lp.{m}"] = lp.clone()
            first_clipped = int(res["clipped_low"] + res["clipped_high"])
            first_tokens = int(res["tokens"])
        for key, v in mg.items():
            margins[key] = min(margins.get(key, math.inf), v)
        clip = min(clip, cm)
        coef = ref.clip_coefficient(norm, o["max_grad_norm"])
        with torch.no_grad():
            for p in params.values():
                p.grad.mul_(coef)
        for g in opt.param_groups:
            g["lr"] = o["lr"]
        opt.step()
        ref.update_bias(cfg, biases, counts)
    for name, p in params.items():
        out[f"final.{name}"] = p.detach().clone()
    for name, b in biases.items():
        out[f"final.{name}"] = b.clone()
    min_margin = min(margins.values(), default=math.inf)
    out["min_margin"] = scalar(min_margin)
    out["clip_margin"] = scalar(clip)
    info = dict(min_margin=min_margin, clip_margin=clip, clipped=first_clipped, tokens=first_tokens)
    return out, info


def write_fixtures(batch_path, out_dir, root=FIXTURES):
    with open(batch_path) as f:
        spec = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    for case in spec["cases"]:
        out, info = run_case(case, root)
        path = os.path.join(out_dir, case["name"] + ".safetensors")
        meta = {"case": case["name"], "ckpt": case["ckpt"], "replay": str("replay" in case["micro_batches"][0])}
        meta.update({k: repr(v) if isinstance(v, float) else str(v) for k, v in case["rl"].items()})
        write_safetensors(path, out, metadata=meta)
        if info["min_margin"] <= 1e-4 or info["clip_margin"] < 1e-3:
            print(f"warning: {case['name']}: routing margin {info['min_margin']:.3g} or clip margin "
                  f"{info['clip_margin']:.3g} too small: an implementation may decide differently", file=sys.stderr)
        print(f"{path}: {os.path.getsize(path)} bytes, loss {float(out['step1.loss']):.6g}, total "
              f"{float(out['step1.total']):.6g}, clipped {info['clipped']}/{info['tokens']} at step 1, "
              f"routing margin {info['min_margin']:.3g}, clip margin {info['clip_margin']:.3g}")


# ------------------------------------------------------------------------------------------
# Making the batch file
# ------------------------------------------------------------------------------------------

PAD = 0


def case_specs():
    """The committed cases: (name, ckpt, rl config, optim, replay?, seed, options)."""
    optim_clip = {"lr": 0.02, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "max_grad_norm": 0.3}
    optim_free = {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.05, "max_grad_norm": 0.0}
    # eps 1e-8 here: with eps 1e-6 a few expert-weight gradients of this case sit below eps,
    # where AdamW's first update lr * g / (|g| + eps) amplifies float's gradient error
    # (~1e-6 of the tensor's scale) to ~1e-4 in the weights: conditioning, not a bug.
    optim_free8 = dict(optim_free, eps=1e-8)
    rl = lambda lt, lvl, beta, eps_high, tau: {"loss_type": lt, "importance_sampling_level": lvl, "epsilon": 0.2,
                                               "epsilon_high": eps_high, "beta": beta, "temperature": tau,
                                               "max_new_tokens": 5}
    return [
        dict(name="token_mean.token.beta0.04", ckpt="rl_parity/ckpt_sigmoid", rl=rl("token_mean", "token", 0.04, 0.28, 1.0),
             optim=optim_clip, replay=False, seed=1, scale_rewards="group", masked=False, pad_row=False),
        dict(name="seq_mean_token_mean.sequence.beta0", ckpt="rl_parity/ckpt_sigmoid",
             rl=rl("seq_mean_token_mean", "sequence", 0.0, 0.25, 0.7), optim=optim_free, replay=False, seed=2,
             scale_rewards="batch", masked=True, pad_row=True),
        dict(name="token_mean.sequence.beta0.04.replay", ckpt="rl_parity/ckpt_sigmoid",
             rl=rl("token_mean", "sequence", 0.04, 0.28, 1.0), optim=optim_clip, replay=True, seed=3,
             scale_rewards="none", masked=False, pad_row=False),
        dict(name="seq_mean_token_sum_norm.token.beta0.04.replay", ckpt="rl_parity/ckpt_softmax",
             rl=rl("seq_mean_token_sum_norm", "token", 0.04, 0.28, 1.3), optim=optim_free8, replay=True, seed=4,
             scale_rewards="group", masked=True, pad_row=True),
    ]


def fixed_selection(T, E, K, layer, seed):
    """A selection the router would not make: distinct experts per token, some pairs dropped."""
    idx, kept = [], []
    for t in range(T):
        first = (5 * t + 3 * layer + seed) % E
        chosen = [first]
        step = 1 + (t + layer) % (E - 1)
        while len(chosen) < K:
            nxt = (chosen[-1] + step) % E
            while nxt in chosen:
                nxt = (nxt + 1) % E
            chosen.append(nxt)
        idx += chosen
        kept += [0 if (t % 7 == 3 and k == K - 1) else 1 for k in range(K)]
    return idx, kept


def draw_case(spec, attempt, root=FIXTURES):
    """Rows, RL inputs and replay of one case. 2 micro-batches x 2 rows x 10 positions; each
    completion row = prompt of 2-4 tokens + completion of 2-5 tokens + padding (pad id 0,
    doc id 1, as the RL trainer lays rows out); with pad_row the last row is empty."""
    g = torch.Generator().manual_seed(1000 * spec["seed"] + attempt)
    ckpt = os.path.join(root, spec["ckpt"])
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = ref.Config.from_dict(json.load(f), where=ckpt)
    V, S, R, M = cfg.vocab_size, 10, 2, 2
    rl = spec["rl"]
    rint = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    # Completions: every row but (optionally) the last row of the last micro-batch.
    rows = []  # (prompt, completion, loss)
    n_rows = R * M - (1 if spec["pad_row"] else 0)
    for i in range(n_rows):
        prompt = [rint(1, V - 1) for _ in range(rint(2, 4))]
        comp = [rint(1, V - 1) for _ in range(rint(2, rl["max_new_tokens"]))]
        loss = not (spec["masked"] and i == 1)  # a truncated completion under mask_truncated
        rows.append((prompt, comp, loss))
    # Groups of G completions in order: G = 2, or one group of 3 when a padding row leaves 3.
    G = 2 if len(rows) % 2 == 0 else 3
    rewards = torch.randint(0, 3, (len(rows),), generator=g).to(D) * 0.5 + \
        0.1 * torch.randn(len(rows), generator=g, dtype=D)
    adv_c = rl_ref.advantages(rewards, G, spec["scale_rewards"])
    loss_tokens = torch.tensor([len(c) if loss else 0 for _, c, loss in rows], dtype=torch.long)
    w_c = rl_ref.token_weights(loss_tokens, rl["loss_type"], rl["max_new_tokens"])
    micro = []
    for m in range(M):
        d = {"rows": R, "seq_len": S, "input_ids": [PAD] * (R * S), "labels": [ref.IGNORE_INDEX] * (R * S),
             "doc_ids": [1] * (R * S), "advantage": [0.0] * (R * S), "weight": [0.0] * (R * S), "seq": [-1] * (R * S)}
        for r in range(R):
            i = m * R + r
            if i >= len(rows):
                continue  # an empty row, as the trainer pads a minibatch
            prompt, comp, loss = rows[i]
            o = r * S
            for t, tok in enumerate(prompt + comp):
                d["input_ids"][o + t] = tok
                d["doc_ids"][o + t] = 0
                if t >= len(prompt) and loss:
                    d["labels"][o + t] = tok
            if loss:
                for j in range(len(comp)):  # position Lp-1+j predicts completion token j
                    t = o + len(prompt) - 1 + j
                    d["advantage"][t] = float(adv_c[i])
                    d["weight"][t] = float(w_c[i])
                    d["seq"][t] = r
        micro.append(d)
    # lp_old / lp_ref around the log-probs of the initial weights (routing as in the update).
    params, biases = ref.split_checkpoint(cfg, load_checkpoint_tensors(ckpt), where=ckpt)
    initial_bias = {}
    if cfg.topk_method == "noaux_tc":
        for name, shape in ref.bias_shapes(cfg):
            vals = (0.05 * torch.randn(shape, generator=g, dtype=D)).to(torch.float32)
            initial_bias[name] = [float(v) for v in vals]
            biases[name] = vals.to(D)
    tau = rl["temperature"] if rl["temperature"] != 0 else 1.0
    shift = 0.3 if rl["importance_sampling_level"] == "token" else 0.2
    for m, d in enumerate(micro):
        if spec["replay"]:
            T, K = R * S, cfg.num_experts_per_tok
            sel = [fixed_selection(T, cfg.n_routed_experts, K, j, 7 * m + spec["seed"])
                   for j in range(len(cfg.moe_layers()))]
            d["replay"] = {"idx": [s[0] for s in sel], "kept": [s[1] for s in sel]}
        mb = ref.MicroBatch.from_dict(d, cfg)
        rp = None
        if spec["replay"]:
            K = cfg.num_experts_per_tok
            rp = [(torch.tensor(i).view(-1, K), torch.tensor(k, dtype=torch.bool).view(-1, K))
                  for i, k in zip(d["replay"]["idx"], d["replay"]["kept"])]
        with torch.no_grad():
            logits = ref.forward(cfg, params, biases, mb, replay=rp).logits
            tgt = mb.targets()
            lp = torch.log_softmax(logits / tau, -1).gather(1, tgt.clamp(min=0)[:, None])[:, 0]
        mask = tgt != ref.IGNORE_INDEX
        n = mb.tokens
        old = lp + shift * torch.randn(n, generator=g, dtype=D)
        refp = lp + 0.3 * torch.randn(n, generator=g, dtype=D)
        d["lp_old"] = [float(x) if mk else 0.0 for x, mk in zip(old, mask)]
        d["lp_ref"] = [float(x) if mk else 0.0 for x, mk in zip(refp, mask)]
    case = {"name": spec["name"], "ckpt": spec["ckpt"]}
    if initial_bias:
        case["initial_bias"] = initial_bias
    case.update({"rl": rl, "optim": spec["optim"], "steps": 2, "micro_batches": micro})
    return case


def make_batch(path, root=FIXTURES):
    cases = []
    for spec in case_specs():
        for attempt in range(200):
            case = draw_case(spec, attempt, root)
            _, info = run_case(case, root)
            # Decisive routing and clipping at every step; clipped and unclipped tokens.
            if info["min_margin"] > 1e-3 and info["clip_margin"] >= 1e-3 and 0 < info["clipped"] < info["tokens"]:
                break
        else:
            raise RuntimeError(f"{spec['name']}: no decisive draw in 200 attempts")
        print(f"{spec['name']}: attempt {attempt}, routing margin {info['min_margin']:.3g}, clip margin "
              f"{info['clip_margin']:.3g}, clipped {info['clipped']}/{info['tokens']}")
        cases.append(case)
    with open(path, "w") as f:
        f.write(dump_batch({"cases": cases}))


def dump_batch(spec):
    """JSON with one line per array (readable diffs, small file); floats in repr (exact)."""
    def enc(x, indent):
        pad = "  " * indent
        if isinstance(x, dict):
            items = [f'{pad}  {json.dumps(k)}: {enc(v, indent + 1)}' for k, v in x.items()]
            return "{\n" + ",\n".join(items) + f"\n{pad}}}"
        if isinstance(x, list) and x and isinstance(x[0], (dict, list)):
            return "[\n" + ",\n".join(f"{pad}  {enc(v, indent + 1)}" for v in x) + f"\n{pad}]"
        return json.dumps(x)
    return enc(spec, 0) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", help="batch JSON to compute the fixtures of")
    ap.add_argument("--out", help="directory for the <case>.safetensors fixtures")
    ap.add_argument("--make-batch", metavar="JSON", help="write the batch file instead")
    ap.add_argument("--root", default=FIXTURES, help="directory the cases' ckpt paths are relative to "
                                                     "(default tests/fixtures)")
    a = ap.parse_args()
    torch.set_grad_enabled(True)
    try:
        if a.make_batch:
            make_batch(a.make_batch, a.root)
        else:
            if not (a.batch and a.out):
                ap.error("needs --batch and --out (or --make-batch)")
            write_fixtures(a.batch, a.out, a.root)
    except (ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
