#!/usr/bin/env python3
"""Reference values for the Muon tests (tests/test_muon.cpp), MODEL.md section 12.

Writes tests/fixtures/optim_muon.json with
  - "ns": Newton-Schulz of a few matrices (wide, tall, square, a row, a column), a plain
    numpy implementation of the spec, in float64 and in float32;
  - a 3-step run of optim.name = "muon" over the parameter tensors of a tiny moetune
    model: clip_grad_norm_ (torch) over every tensor, then Muon (numpy, below) for every
    rank-2 tensor except the embedding and the LM head, and torch.optim.AdamW
    (foreach=False) for the rest, in float64 and in float32.
The C++ test rebuilds the tensors with ParamLayout::build(model_config), replays the
steps and compares.

Rerun (with a python3 that has torch and numpy, e.g. Debian's /usr/bin/python3):
    /usr/bin/python3 tests/reference/muon_fixture.py
The inputs come from a seeded numpy generator, so the output is reproducible.
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from optim_fixture import layout  # noqa: E402  (ParamLayout's order, same tensors)

# Matrices of every shape kind: 4x4 attention, 6x4 (tall: transposed) and 4x6 dense FFN,
# 2x4 router, 3x4 / 4x3 experts; the embedding and the untied head (7x4) stay AdamW.
MODEL_CONFIG = {
    "vocab_size": 7,
    "hidden_size": 4,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "head_dim": 2,
    "intermediate_size": 6,
    "first_k_dense_replace": 1,
    "n_routed_experts": 2,
    "num_experts_per_tok": 1,
    "moe_intermediate_size": 3,
    "n_shared_experts": 1,
    "tie_word_embeddings": False,
}
ADAMW = {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
MUON = {"momentum": 0.95, "weight_decay": 0.05, "lr_ratio": 0.5}
MAX_GRAD_NORM = 1.0
LR = [2e-2, 3e-2, 1e-2]
GRAD_SCALE = [0.05, 0.5, 0.1]  # step 2 is clipped
STEPS = len(LR)
NS_SHAPES = [(3, 5), (5, 3), (4, 4), (1, 6), (6, 1)]
ZERO_AT_STEP1 = "model.layers.1.mlp.experts.1.up_proj.weight"  # no token reached it: NS(0) = 0


def is_muon(name, shape):
    return len(shape) == 2 and name not in ("model.embed_tokens.weight", "lm_head.weight")


def newton_schulz(g, dtype):
    """MODEL.md section 12: X = G/||G||_F (transposed when rows > cols), then ten times
    X = aX + b(XX^T)X + c(XX^T)^2 X, eight with (3.4445, -4.7750, 2.0315) and two with
    (2, -1.5, 0.5). All arithmetic in dtype; an all-zero G gives zero."""
    x = np.array(g, dtype=dtype)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T.copy()
    norm = np.sqrt(np.sum(x.astype(np.float64) ** 2))
    if norm == 0:
        return np.zeros(g.shape, dtype=dtype)
    x = x / dtype(norm)
    for i in range(10):
        a, b, c = (3.4445, -4.7750, 2.0315) if i < 8 else (2.0, -1.5, 0.5)
        A = x @ x.T
        B = dtype(b) * A + dtype(c) * (A @ A)
        x = dtype(a) * x + B @ x
    return x.T.copy() if transposed else x


def muon_step(p, g, m, lr, dtype):
    """M = mu M + G; O = NS(mu M + G); O *= 0.18 sqrt(max(rows, cols));
    W = W (1 - lr wd) - lr O, with lr = lr_ratio * the scheduled lr (scalars in double, cast)."""
    mu = dtype(MUON["momentum"])
    m = mu * m + g
    o = newton_schulz(mu * m + g, dtype)
    o = o * dtype(0.18 * np.sqrt(max(p.shape)))
    lr_m = MUON["lr_ratio"] * lr
    p = p * dtype(1.0 - lr_m * MUON["weight_decay"]) - dtype(lr_m) * o
    return p, m


def make_inputs(tensors):
    rng = np.random.default_rng(20261202)
    init, grads = {}, {}
    for name, shape, _ in tensors:
        n = int(np.prod(shape))
        init[name] = rng.uniform(-1.0, 1.0, n).astype(np.float32)
        g = np.stack([rng.standard_normal(n) * s for s in GRAD_SCALE]).astype(np.float32)
        if name == ZERO_AT_STEP1:
            g[0] = 0.0
        grads[name] = g
    return init, grads


def run(tensors, init, grads, dtype):
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    params = {n: torch.nn.Parameter(torch.tensor(init[n], dtype=tdt)) for n, _, _ in tensors}
    adam = [(n, dec) for n, s, dec in tensors if not is_muon(n, s)]
    groups = [
        {"params": [params[n] for n, dec in adam if dec], "weight_decay": ADAMW["weight_decay"]},
        {"params": [params[n] for n, dec in adam if not dec], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR[0], betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"],
                            foreach=False)
    momentum = {n: np.zeros(s, dtype=dtype) for n, s, _ in tensors if is_muon(n, s)}
    ordered = [params[n] for n, _, _ in tensors]
    norms, after = [], {n: [] for n, _, _ in tensors}
    for step in range(STEPS):
        for n, _, _ in tensors:
            params[n].grad = torch.tensor(grads[n][step], dtype=tdt)
        norms.append(float(torch.nn.utils.clip_grad_norm_(ordered, MAX_GRAD_NORM)))
        for group in opt.param_groups:
            group["lr"] = LR[step]
        opt.step()
        with torch.no_grad():
            for n, s, _ in tensors:
                if not is_muon(n, s):
                    continue
                p = params[n].detach().numpy().reshape(s)
                g = params[n].grad.numpy().reshape(s)
                p, momentum[n] = muon_step(p, g, momentum[n], LR[step], dtype)
                params[n].copy_(torch.from_numpy(p.reshape(-1).copy()))
        for n, _, _ in tensors:
            after[n].append([float(x) for x in params[n].detach().reshape(-1)])
    exp_avg, exp_avg_sq = {}, {}
    for n, s, _ in tensors:
        if is_muon(n, s):
            exp_avg[n] = [float(x) for x in momentum[n].reshape(-1)]
        else:
            st = opt.state[params[n]]
            exp_avg[n] = [float(x) for x in st["exp_avg"].reshape(-1)]
            exp_avg_sq[n] = [float(x) for x in st["exp_avg_sq"].reshape(-1)]
    return {"grad_norm": norms, "params": after, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def ns_cases():
    rng = np.random.default_rng(7)
    out = []
    for r, c in NS_SHAPES:
        x = rng.standard_normal((r, c)).astype(np.float32)
        out.append({"rows": r, "cols": c, "input": [float(v) for v in x.reshape(-1)],
                    "float64": [float(v) for v in newton_schulz(x, np.float64).reshape(-1)],
                    "float32": [float(v) for v in newton_schulz(x, np.float32).reshape(-1)]})
    return out


def main():
    tensors = layout(MODEL_CONFIG)
    init, grads = make_inputs(tensors)
    out = {
        "generator": "tests/reference/muon_fixture.py",
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "ns": ns_cases(),
        "model_config": MODEL_CONFIG,
        "adamw": ADAMW,
        "muon": MUON,
        "max_grad_norm": MAX_GRAD_NORM,
        "lr": LR,
        "tensors": [{"name": n, "shape": s, "muon": is_muon(n, s), "init": [float(x) for x in init[n]],
                     "grads": [[float(x) for x in g] for g in grads[n]]} for n, s, _ in tensors],
        "expected": {"float64": run(tensors, init, grads, np.float64),
                     "float32": run(tensors, init, grads, np.float32)},
    }
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "fixtures", "optim_muon.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} (torch {torch.__version__}, numpy {np.__version__})")


if __name__ == "__main__":
    main()
