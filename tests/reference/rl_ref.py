#!/usr/bin/python3
"""float64 PyTorch reference of the RL objective (MODEL.md section 11) and the fixture maker
for tests/fixtures/rl_head/ (compared by the C++ test RlLoss.ParityWithPyTorchReference).

Written from the formulas, not from train/rl_loss.cpp: the loss is built from whole-tensor
torch ops over masks and the gradient is autograd's.

    rl_ref.py --out tests/fixtures/rl_head      writes one <name>.safetensors per config

Each fixture (every tensor F64; integer tensors hold exact integers):
  inputs   logits (N,V) (float32-representable values), targets (N) (-100 = no loss),
           lp_old, lp_ref, advantage, weight (N), seq (N) (completion id, -1 at no-loss
           positions), completion (N) (index 0..C-1 of the completion, -1 elsewhere),
           rewards (C), loss_tokens (C)
  expected adv_completion (C) = advantages(rewards), weight_completion (C) = token_weights,
           loss, pg_loss, kl_sum, entropy_sum, ratio_sum, ratio_min, ratio_max, lp_sum,
           tokens, clipped_low, clipped_high [1], lp (N) (0 at no-loss positions),
           dlogits (N,V) = d loss / d logits
  metadata loss_type, importance_sampling_level, epsilon, epsilon_high, beta, temperature,
           max_new_tokens, num_generations, scale_rewards, clip_margin (smallest distance of
           a ratio from a clip boundary: the fixtures keep it >= 1e-3 so that float
           arithmetic makes the same clipping decisions)
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_io import write_safetensors  # noqa: E402

D = torch.float64
IGNORE = -100


def advantages(rewards, G, scale_rewards):
    """rewards (B*G) in group order -> advantages (B*G); torch.std is Bessel-corrected."""
    r = rewards.to(D).view(-1, G)
    mean = r.mean(dim=1, keepdim=True)
    if scale_rewards == "none":
        return (r - mean).reshape(-1)
    if scale_rewards == "group":
        if G < 2:
            raise ValueError("scale_rewards='group' needs num_generations >= 2")
        std = r.std(dim=1, keepdim=True)
    elif scale_rewards == "batch":
        std = rewards.to(D).std()
    else:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}")
    return ((r - mean) / (std + 1e-4)).reshape(-1)


def token_weights(loss_tokens, loss_type, max_new_tokens):
    """Per-token aggregation weight of each completion for one optimizer step."""
    n = loss_tokens.to(D)
    C = n.numel()
    has = n > 0
    if loss_type == "token_mean":
        w = torch.full_like(n, 1.0) / n.sum().clamp(min=1.0)
    elif loss_type == "seq_mean_token_mean":
        w = 1.0 / (C * n.clamp(min=1.0))
    elif loss_type == "seq_mean_token_sum_norm":
        w = torch.full_like(n, 1.0 / (C * max_new_tokens))
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return torch.where(has, w, torch.zeros_like(w))


def loss_head(logits, targets, lp_old, lp_ref, adv, weight, seq, cfg):
    """The section-11 loss of one micro-batch. logits (N,V) float64 (requires_grad for the
    gradient), targets (N) long with -100 for no loss; the rest (N) float64 / long.
    Returns a dict of scalar tensors plus 'lp' (N)."""
    tau = cfg["temperature"] if cfg["temperature"] != 0 else 1.0
    mask = targets >= 0
    maskd = mask.to(D)
    logp_all = torch.log_softmax(logits / tau, dim=-1)
    safe_t = torch.where(mask, targets, torch.zeros_like(targets))
    lp = logp_all.gather(1, safe_t[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    log_ratio = torch.where(mask, lp - lp_old, torch.zeros_like(lp))
    if cfg["importance_sampling_level"] == "token":
        ratio = torch.exp(log_ratio)
    else:  # GSPO: exp(mean log-ratio of the completion), shared by its tokens
        ids = torch.unique(seq[mask])
        member = (seq[None, :] == ids[:, None]).to(D) * maskd[None, :]  # (S, N)
        seq_mean = (member @ log_ratio) / member.sum(1)
        ratio = (member.T @ torch.exp(seq_mean))  # 0 at no-loss positions
        ratio = torch.where(mask, ratio, torch.ones_like(ratio))
    lo, hi = 1.0 - cfg["epsilon"], 1.0 + cfg["epsilon_high"]
    pg = -torch.min(ratio * adv, torch.clamp(ratio, lo, hi) * adv)
    if cfg["beta"] > 0:
        x = lp_ref - lp
        kl = torch.exp(x) - x - 1
    else:
        kl = torch.zeros_like(lp)
    w = weight * maskd
    out = {
        "loss": (w * (pg + cfg["beta"] * kl)).sum(),
        "pg_loss": (w * pg).sum(),
        "kl_sum": (kl * maskd).sum(),
        "entropy_sum": (entropy * maskd).sum(),
        "ratio_sum": (ratio * maskd).sum(),
        "ratio_min": ratio[mask].min() if mask.any() else torch.tensor(math.inf, dtype=D),
        "ratio_max": ratio[mask].max() if mask.any() else torch.tensor(-math.inf, dtype=D),
        "lp_sum": (lp * maskd).sum(),
        "tokens": maskd.sum(),
        "clipped_low": ((ratio < lo) & (adv < 0) & mask).to(D).sum(),
        "clipped_high": ((ratio > hi) & (adv > 0) & mask).to(D).sum(),
        "lp": torch.where(mask, lp, torch.zeros_like(lp)),
        "_ratio": ratio.detach(),
    }
    return out


# Fixture configs: every loss_type x both IS levels x beta 0 / 0.04, with eps_high != eps,
# two temperatures, each scale_rewards, and (in half of them) a completion with no loss tokens.
def fixture_configs():
    cfgs = []
    i = 0
    for loss_type in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        for level in ("token", "sequence"):
            for beta in (0.0, 0.04):
                cfgs.append({
                    "name": f"{loss_type}.{level}.beta{beta:g}",
                    "loss_type": loss_type, "importance_sampling_level": level,
                    "epsilon": 0.2, "epsilon_high": 0.28 if i % 2 == 0 else 0.25, "beta": beta,
                    "temperature": 0.7 if i % 3 == 1 else 1.0, "max_new_tokens": 6,
                    "num_generations": 2, "scale_rewards": ("group", "batch", "none")[i % 3],
                    "masked_completion": i % 2 == 1, "seed": 100 + i,
                })
                i += 1
    return cfgs


def clip_margin(ratio, mask, cfg):
    r = ratio[mask]
    lo, hi = 1.0 - cfg["epsilon"], 1.0 + cfg["epsilon_high"]
    return float(torch.min(torch.minimum((r - lo).abs(), (r - hi).abs())))


def make_case(cfg, attempt=0):
    """A micro-batch of C = 4 completions (2 groups of 2), one per row of S = 6 positions:
    1-2 prompt positions, 1-4 completion tokens, padding; V = 8."""
    g = torch.Generator().manual_seed(cfg["seed"] * 1000 + attempt)
    C, S, V = 4, 6, 8
    N = C * S
    logits = (1.5 * torch.randn(N, V, generator=g, dtype=D)).float().double()
    targets = torch.full((N,), IGNORE, dtype=torch.long)
    seq = torch.full((N,), -1, dtype=torch.long)
    completion = torch.full((N,), -1, dtype=torch.long)
    loss_tokens = torch.zeros(C, dtype=torch.long)
    for c in range(C):
        start = 1 + int(torch.randint(0, 2, (1,), generator=g))
        n = 1 + int(torch.randint(0, 4, (1,), generator=g))
        if cfg["masked_completion"] and c == 2:
            n = 0  # a truncated completion under mask_truncated: no loss tokens, still counts in C
        for t in range(n):
            p = c * S + start + t
            targets[p] = int(torch.randint(0, V, (1,), generator=g))
            seq[p] = 7 + 5 * c
            completion[p] = c
        loss_tokens[c] = n
    rewards = torch.randint(0, 3, (C,), generator=g).to(D) * 0.5 + 0.1 * torch.randn(C, generator=g, dtype=D)
    adv_c = advantages(rewards, cfg["num_generations"], cfg["scale_rewards"])
    w_c = token_weights(loss_tokens, cfg["loss_type"], cfg["max_new_tokens"])
    mask = targets >= 0
    idx = completion.clamp(min=0)
    adv = torch.where(mask, adv_c[idx], torch.zeros(N, dtype=D))
    weight = torch.where(mask, w_c[idx], torch.zeros(N, dtype=D))
    tau = cfg["temperature"] if cfg["temperature"] != 0 else 1.0
    with torch.no_grad():
        lp_now = torch.log_softmax(logits / tau, -1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
    lp_old = torch.where(mask, lp_now - 0.35 * torch.randn(N, generator=g, dtype=D), torch.zeros(N, dtype=D))
    lp_ref = torch.where(mask, lp_now + 0.3 * torch.randn(N, generator=g, dtype=D), torch.zeros(N, dtype=D))
    return dict(logits=logits, targets=targets, seq=seq, completion=completion, loss_tokens=loss_tokens,
                rewards=rewards, adv_c=adv_c, w_c=w_c, adv=adv, weight=weight, lp_old=lp_old, lp_ref=lp_ref)


def run_case(case, cfg):
    z = case["logits"].clone().requires_grad_(True)
    out = loss_head(z, case["targets"], case["lp_old"], case["lp_ref"], case["adv"], case["weight"], case["seq"],
                    cfg)
    out["loss"].backward()
    out["dlogits"] = z.grad.detach()
    return out


def write_fixture(out_dir, cfg):
    for attempt in range(100):
        case = make_case(cfg, attempt)
        out = run_case(case, cfg)
        margin = clip_margin(out["_ratio"], case["targets"] >= 0, cfg)
        clipped = out["clipped_low"] + out["clipped_high"]
        # Keep ratios away from the clip boundaries, and have clipped and unclipped tokens.
        if margin >= 1e-3 and 0 < clipped < out["tokens"]:
            break
    else:
        raise RuntimeError(f"{cfg['name']}: no case with clip margin >= 1e-3 in 100 attempts")
    tensors = {k: case[k].to(D) for k in ("logits", "targets", "seq", "completion", "loss_tokens", "rewards",
                                          "lp_old", "lp_ref")}
    tensors["advantage"] = case["adv"]
    tensors["weight"] = case["weight"]
    tensors["adv_completion"] = case["adv_c"]
    tensors["weight_completion"] = case["w_c"]
    for k in ("loss", "pg_loss", "kl_sum", "entropy_sum", "ratio_sum", "ratio_min", "ratio_max", "lp_sum", "tokens",
              "clipped_low", "clipped_high"):
        tensors[k] = out[k].detach().reshape(1)
    tensors["lp"] = out["lp"].detach()
    tensors["dlogits"] = out["dlogits"]
    meta = {k: cfg[k] for k in ("loss_type", "importance_sampling_level", "epsilon", "epsilon_high", "beta",
                                "temperature", "max_new_tokens", "num_generations", "scale_rewards")}
    meta = {k: repr(v) if isinstance(v, float) else str(v) for k, v in meta.items()}
    meta["clip_margin"] = repr(margin)
    path = os.path.join(out_dir, cfg["name"] + ".safetensors")
    write_safetensors(path, tensors, metadata=meta)
    return path, out, margin


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the <config>.safetensors fixtures")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for cfg in fixture_configs():
        path, out, margin = write_fixture(args.out, cfg)
        print(f"{path}: {os.path.getsize(path)} bytes, tokens {int(out['tokens'])}, clipped "
              f"{int(out['clipped_low'])}/{int(out['clipped_high'])}, loss {float(out['loss']):.6g}, "
              f"clip margin {margin:.2e}")


if __name__ == "__main__":
    main()
