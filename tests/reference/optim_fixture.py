#!/usr/bin/env python3
"""Reference values for the AdamW + clip_grad_norm_ test (tests/test_optim.cpp).

Runs torch.optim.AdamW (foreach=False, the single-tensor path) and
torch.nn.utils.clip_grad_norm_ for 5 steps on the parameter tensors of a tiny
moetune model config, in float64 and in float32, and writes every input and the
expected results to tests/fixtures/optim_adamw.json. The C++ test rebuilds the
same tensors with ParamLayout::build(model_config) (and fails if the names,
shapes or decay flags listed here no longer match), replays the steps and
compares.

Rerun (with a python3 that has torch, e.g. Debian's /usr/bin/python3):
    /usr/bin/python3 tests/reference/optim_fixture.py
The inputs come from a seeded numpy generator, so the output is reproducible.
"""
import json
import os
import sys

import numpy as np
import torch

# The tiny model whose ParamLayout the test builds (94 trainable elements):
# layer 0 dense, layer 1 MoE with 2 routed experts of width 1 and 1 shared expert.
MODEL_CONFIG = {
    "vocab_size": 3,
    "hidden_size": 2,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "head_dim": 2,
    "intermediate_size": 3,
    "first_k_dense_replace": 1,
    "n_routed_experts": 2,
    "num_experts_per_tok": 1,
    "moe_intermediate_size": 1,
    "n_shared_experts": 1,
    "tie_word_embeddings": False,
}
ADAMW = {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
MAX_GRAD_NORM = 1.0
LR = [1e-2, 2e-2, 3e-2, 2.5e-2, 1e-2]  # one learning rate per step
# Gradient scale per step: steps 2 and 4 exceed MAX_GRAD_NORM and are clipped.
GRAD_SCALE = [0.05, 0.5, 0.08, 1.0, 0.02]
STEPS = len(LR)


def layout(c):
    """(name, shape, decay) in ParamLayout::build's canonical order (MODEL.md section 7)."""
    V, d = c["vocab_size"], c["hidden_size"]
    q = c["num_attention_heads"] * c["head_dim"]
    kv = q  # num_key_value_heads defaults to num_attention_heads
    F = c["moe_intermediate_size"]
    S = c["n_shared_experts"] * F
    out = [("model.embed_tokens.weight", [V, d], True)]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", [d], False),
                (p + "self_attn.q_proj.weight", [q, d], True),
                (p + "self_attn.k_proj.weight", [kv, d], True),
                (p + "self_attn.v_proj.weight", [kv, d], True),
                (p + "self_attn.o_proj.weight", [d, q], True),
                (p + "post_attention_layernorm.weight", [d], False)]
        if l < c["first_k_dense_replace"]:
            I = c["intermediate_size"]
            out += [(p + "mlp.gate_proj.weight", [I, d], True),
                    (p + "mlp.up_proj.weight", [I, d], True),
                    (p + "mlp.down_proj.weight", [d, I], True)]
        else:
            out += [(p + "mlp.gate.weight", [c["n_routed_experts"], d], True)]
            for e in range(c["n_routed_experts"]):
                out += [(p + f"mlp.experts.{e}.gate_proj.weight", [F, d], True),
                        (p + f"mlp.experts.{e}.up_proj.weight", [F, d], True),
                        (p + f"mlp.experts.{e}.down_proj.weight", [d, F], True)]
            if c["n_shared_experts"] > 0:
                out += [(p + "mlp.shared_experts.gate_proj.weight", [S, d], True),
                        (p + "mlp.shared_experts.up_proj.weight", [S, d], True),
                        (p + "mlp.shared_experts.down_proj.weight", [d, S], True)]
    out += [("model.norm.weight", [d], False)]
    if not c["tie_word_embeddings"]:
        out += [("lm_head.weight", [V, d], True)]
    return out


def make_inputs(tensors):
    """Initial values and per-step gradients, all exactly representable in float32."""
    rng = np.random.default_rng(20240611)
    init, grads = {}, {}
    for name, shape, decay in tensors:
        n = int(np.prod(shape))
        init[name] = rng.uniform(-1.0, 1.0, n).astype(np.float32)
        g = np.stack([rng.standard_normal(n) * s for s in GRAD_SCALE]).astype(np.float32)
        if name == "model.layers.1.mlp.experts.1.up_proj.weight":
            g[2] = 0.0  # an expert no token reached at step 3 (MODEL.md 8.7): decay still applies
        if name == "model.norm.weight":
            g *= np.float32(1e-8)  # sqrt(v) comparable to eps: the order of + eps matters
        grads[name] = g
    return init, grads


def run(tensors, init, grads, dtype):
    params = {n: torch.nn.Parameter(torch.tensor(init[n], dtype=dtype)) for n, _, _ in tensors}
    groups = [
        {"params": [params[n] for n, _, dec in tensors if dec], "weight_decay": ADAMW["weight_decay"]},
        {"params": [params[n] for n, _, dec in tensors if not dec], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR[0], betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"],
                            foreach=False)
    ordered = [params[n] for n, _, _ in tensors]
    norms, after = [], {n: [] for n, _, _ in tensors}
    for step in range(STEPS):
        for n, _, _ in tensors:
            params[n].grad = torch.tensor(grads[n][step], dtype=dtype)
        norms.append(float(torch.nn.utils.clip_grad_norm_(ordered, MAX_GRAD_NORM)))
        for group in opt.param_groups:
            group["lr"] = LR[step]
        opt.step()
        for n, _, _ in tensors:
            after[n].append([float(x) for x in params[n].detach().reshape(-1)])
    state = {n: opt.state[params[n]] for n, _, _ in tensors}
    return {
        "grad_norm": norms,
        "params": after,
        "exp_avg": {n: [float(x) for x in state[n]["exp_avg"].reshape(-1)] for n in state},
        "exp_avg_sq": {n: [float(x) for x in state[n]["exp_avg_sq"].reshape(-1)] for n in state},
    }


def main():
    tensors = layout(MODEL_CONFIG)
    init, grads = make_inputs(tensors)
    out = {
        "generator": "tests/reference/optim_fixture.py",
        "torch_version": torch.__version__,
        "model_config": MODEL_CONFIG,
        "adamw": ADAMW,
        "max_grad_norm": MAX_GRAD_NORM,
        "lr": LR,
        "tensors": [{"name": n, "shape": s, "decay": dec, "init": [float(x) for x in init[n]],
                     "grads": [[float(x) for x in g] for g in grads[n]]} for n, s, dec in tensors],
        "expected": {"float64": run(tensors, init, grads, torch.float64),
                     "float32": run(tensors, init, grads, torch.float32)},
    }
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "fixtures", "optim_adamw.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
