#!/usr/bin/env python3
"""Plot the curves of a `moetune rl` run from its metrics.jsonl.

usage: python3 scripts/plot_rl.py runs/demo/rl/metrics.jsonl [--out DIR]

Writes DIR/rl_curves.png (all panels) and one DIR/rl_<metric>.png per metric found
(DIR defaults to the directory of metrics.jsonl). Needs matplotlib (Debian:
python3-matplotlib); moetune itself does not need Python.
"""
import argparse
import json
import math
import os
import sys

# (key in metrics.jsonl, panel title); missing keys are skipped.
METRICS = [
    ("reward", "mean reward (train rollouts)"),
    ("accuracy", "accuracy (train rollouts)"),
    ("valid/pass@1", "held-out greedy pass@1"),
    ("kl", "KL to the reference (k3)"),
    ("clip_ratio/region_mean", "clipped ratio (tokens)"),
    ("entropy", "entropy of the policy (nats/token)"),
    ("completions/mean_length", "mean completion length (tokens)"),
]


def read_metrics(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"plot_rl.py: {path}:{n}: not JSON ({e})")
    return rows


def series(rows, key):
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and "step" in r:
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def smooth(ys, window):
    if window <= 1 or len(ys) < window:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics", help="metrics.jsonl of a moetune rl run")
    ap.add_argument("--out", help="output directory (default: next to metrics.jsonl)")
    args = ap.parse_args()

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_rl.py: matplotlib is not installed (Debian: apt-get install python3-matplotlib)")

    rows = read_metrics(args.metrics)
    out = args.out or os.path.dirname(os.path.abspath(args.metrics))
    os.makedirs(out, exist_ok=True)
    panels = [(k, t, *series(rows, k)) for k, t in METRICS]
    panels = [p for p in panels if p[2]]
    if not panels:
        sys.exit(f"plot_rl.py: none of the plotted metrics is in {args.metrics}")

    def draw(ax, key, title, xs, ys):
        sparse = key.startswith("valid/")
        if sparse:
            ax.plot(xs, ys, "o-", color="tab:green")
        else:
            w = max(1, len(ys) // 20)
            ax.plot(xs, ys, color="tab:blue", alpha=0.3 if w > 1 else 1.0, lw=1)
            if w > 1:
                ax.plot(xs, smooth(ys, w), color="tab:blue", lw=2, label=f"mean of {w} steps")
                ax.legend(loc="best", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)

    written = []
    cols = 2
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 3.2 * rows_n), squeeze=False)
    for ax, p in zip(axes.flat, panels):
        draw(ax, *p)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"moetune rl: {args.metrics}", fontsize=11)
    fig.tight_layout()
    path = os.path.join(out, "rl_curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    for p in panels:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        draw(ax, *p)
        fig.tight_layout()
        path = os.path.join(out, "rl_" + p[0].replace("/", "_").replace("@", "") + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    print("plot_rl.py: wrote " + " ".join(written))


if __name__ == "__main__":
    main()
