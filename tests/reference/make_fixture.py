#!/usr/bin/python3
"""Produces the parity fixture that the C++ tests compare against (see README.md).

    make_fixture.py --ckpt DIR --batch BATCH.json --out OUT.safetensors
        DIR: config.json + model.safetensors (or shards + model.safetensors.index.json).
        BATCH.json: {"micro_batches": [{"rows", "seq_len", "input_ids", "labels", "doc_ids"}, ...],
                     "optim": {"lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm"},
                     "steps": N,
                     "initial_bias": {"<bias name>": [E floats], ...}}   (optional, overrides DIR)
        Writes, all F64: loss.{ce,aux,seq_aux,z,mtp,total} [1], logits.<m> (T_m, V) (and
        mtp_logits.<m> with an MTP block), grad.<param>,
        min_margin [1] (+ min_margin.{topk,group,capacity}), expert_counts.<layer> (E),
        dropped_pairs [1], clamped_values [1] (swiglu_limit clamps at the initial weights), step<k>.loss / step<k>.grad_norm [1] for k = 1..N,
        final.<param> and final.<bias name>; tid2eid.<layer> (V, K) of each hash-routed layer
        (the table the reference routed by, never trained).

    make_fixture.py --make-ckpt DIR --config CFG.json --seed S [--random-bias [SCALE]]
        Writes a random checkpoint (config.json with every key explicit, model.safetensors in
        F32) with the counter-based initialisation of moe/init.cpp, so it should equal what
        `moetune init --seed S` writes. --random-bias sets the routing biases to
        SCALE * counter_normal (rounded to float32) instead of 0. Hash-routed layers get the
        default tid2eid table of moe/init.cpp (I32), and no bias.

Run with /usr/bin/python3 (Debian's python with torch).
"""
import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_ref as ref  # noqa: E402
from safetensors_io import load_checkpoint_tensors, write_safetensors  # noqa: E402


def load_config(path):
    with open(path) as f:
        return ref.Config.from_dict(json.load(f), where=path)


def make_ckpt(out_dir, config_path, seed, random_bias):
    cfg = load_config(config_path)
    os.makedirs(out_dir, exist_ok=True)
    tensors = ref.init_params(cfg, seed)
    for name, shape in ref.bias_shapes(cfg):
        if random_bias:
            vals = [random_bias * x for x in ref.counter_normal(seed + 1, name, shape[0])]
            tensors[name] = torch.tensor(vals, dtype=torch.float64).to(torch.float32)
        else:
            tensors[name] = torch.zeros(shape, dtype=torch.float32)
    for l in cfg.moe_layers():
        if cfg.is_hash_layer(l):
            tensors[ref.tid2eid_name(l)] = ref.init_tid2eid(cfg, seed, l)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, metadata={"format": "pt"})
    print(f"wrote {out_dir}: {sum(t.numel() for t in tensors.values())} elements")


def load_batch(path, cfg):
    with open(path) as f:
        spec = json.load(f)
    mbs = [ref.MicroBatch.from_dict(m, cfg, where=f"{path}: micro_batches[{i}]")
           for i, m in enumerate(spec["micro_batches"])]
    optim = {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0, "max_grad_norm": 1.0}
    optim.update(spec.get("optim", {}))
    unknown = set(optim) - {"lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm", "name", "muon_lr",
                            "muon_momentum", "muon_weight_decay"}
    if unknown or "lr" not in optim:
        raise ValueError(f"{path}: 'optim' needs 'lr' and only knows lr, beta1, beta2, eps, weight_decay, "
                         f"max_grad_norm, name, muon_lr, muon_momentum, muon_weight_decay "
                         f"(got unknown {sorted(unknown)})")
    return mbs, optim, int(spec.get("steps", 0)), spec.get("initial_bias", {})


def scalar(x):
    return torch.tensor([float(x)], dtype=torch.float64)


def make_fixture(ckpt_dir, batch_path, out_path):
    cfg = load_config(os.path.join(ckpt_dir, "config.json"))
    params, biases = ref.split_checkpoint(cfg, load_checkpoint_tensors(ckpt_dir), where=ckpt_dir)
    mbs, optim, steps, initial_bias = load_batch(batch_path, cfg)
    for name, values in initial_bias.items():
        if name not in biases or name.endswith(".tid2eid") or len(values) != cfg.n_routed_experts:
            raise ValueError(f"{batch_path}: initial_bias '{name}' is not a bias of E = {cfg.n_routed_experts}")
        biases[name] = torch.tensor(values, dtype=torch.float64).to(torch.float32).to(torch.float64)

    out = {}
    # --- At the initial weights: losses, logits, gradients of the total loss, routing facts.
    loss = ref.compute_gradients(cfg, params, biases, mbs)
    for key in ("ce", "aux", "seq_aux", "z", "mtp", "total"):
        out[f"loss.{key}"] = scalar(getattr(loss, key))
    for m, f in enumerate(loss.forwards):
        out[f"logits.{m}"] = f.logits.detach().clone()
        if f.mtp_logits is not None:
            out[f"mtp_logits.{m}"] = f.mtp_logits.detach().clone()
    for name, p in params.items():
        out[f"grad.{name}"] = p.grad.detach().clone()
    margins = loss.min_margins()
    for key, v in margins.items():
        out[f"min_margin.{key}"] = scalar(v)
    for l, c in zip(cfg.moe_layers(), loss.expert_counts()):
        out[f"expert_counts.{l}"] = c.to(torch.float64)
    dropped = sum(r.dropped for f in loss.forwards for r in f.routings)
    out["dropped_pairs"] = scalar(dropped)
    out["clamped_values"] = scalar(sum(r.clamped for f in loss.forwards for r in f.routings))
    for l in cfg.moe_layers():
        if cfg.is_hash_layer(l):
            out[f"tid2eid.{l}"] = biases[ref.tid2eid_name(l)].to(torch.float64)

    # --- Training steps on the same global batch. Step k's forward also feeds min_margin:
    # a consumer comparing steps needs routing away from ties at every step.
    if optim.get("name", "adamw") == "muon":  # the run-config keys of docs/config.md; muon_lr 0 = lr
        ratio = optim["muon_lr"] / optim["lr"] if optim.get("muon_lr", 0) > 0 else 1.0
        opt = ref.MuonWithAdamW(params, optim["lr"], optim["beta1"], optim["beta2"], optim["eps"],
                                optim["weight_decay"], optim.get("muon_momentum", 0.95),
                                optim.get("muon_weight_decay", 0.1), ratio)
    else:
        opt = ref.make_optimizer(params, optim["lr"], optim["beta1"], optim["beta2"], optim["eps"],
                                 optim["weight_decay"])
    for k in range(1, steps + 1):
        res = ref.train_step(cfg, params, biases, opt, mbs, optim["lr"], optim["max_grad_norm"])
        out[f"step{k}.loss"] = scalar(res.loss.ce)
        out[f"step{k}.mtp_loss"] = scalar(res.loss.mtp)
        out[f"step{k}.grad_norm"] = scalar(res.grad_norm)
        for key, v in res.loss.min_margins().items():
            margins[key] = min(margins.get(key, math.inf), v)
    if steps > 0:
        for name, p in params.items():
            out[f"final.{name}"] = p.detach().clone()
        for name, b in biases.items():
            if not name.endswith(".tid2eid"):
                out[f"final.{name}"] = b.clone()
    out["min_margin"] = scalar(min(margins.values(), default=math.inf))

    write_safetensors(out_path, out, metadata={"ckpt": ckpt_dir, "batch": batch_path})
    if float(out["min_margin"]) <= 1e-4:
        print(f"warning: min_margin {float(out['min_margin']):.3g} <= 1e-4: routing is close to a tie, "
              "an implementation may legitimately route differently; pick another seed", file=sys.stderr)
    print(f"{out_path}: ce {float(loss.ce):.6f} total {float(loss.total):.6f} targets {loss.n_targets} "
          f"dropped {dropped} min_margin {float(out['min_margin']):.3g} "
          f"({', '.join(f'{k} {v:.3g}' for k, v in sorted(margins.items()))})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="checkpoint directory to compute the fixture at")
    ap.add_argument("--batch", help="batch JSON (micro_batches, optim, steps)")
    ap.add_argument("--out", help="output .safetensors")
    ap.add_argument("--make-ckpt", metavar="DIR", help="write a random checkpoint to DIR instead")
    ap.add_argument("--config", help="config JSON for --make-ckpt")
    ap.add_argument("--seed", type=int, default=0, help="seed for --make-ckpt")
    ap.add_argument("--random-bias", type=float, nargs="?", const=0.05, default=0.0, metavar="SCALE",
                    help="--make-ckpt: biases SCALE * N(0,1) instead of 0 (default SCALE 0.05)")
    a = ap.parse_args()
    torch.set_grad_enabled(True)
    try:
        if a.make_ckpt:
            if not a.config:
                ap.error("--make-ckpt needs --config")
            make_ckpt(a.make_ckpt, a.config, a.seed, a.random_bias)
        else:
            if not (a.ckpt and a.batch and a.out):
                ap.error("needs --ckpt, --batch and --out (or --make-ckpt)")
            make_fixture(a.ckpt, a.batch, a.out)
    except (ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
