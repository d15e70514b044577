#!/usr/bin/env bash
# Scaling sweep of `moetune bench` (bench/README.md): one `mpirun -np R moetune bench
# --json` per point of the cartesian product of the lists, then a table (markdown and
# CSV), every point's JSON in one file, and a PNG plot of tokens/s.
#
#   scripts/bench_sweep.sh --config examples/small.json --out runs/sweep \
#       --sweep ranks=1,2 ep=1,2 threads=1,2 micro_batch=4,8 [-- extra moetune bench args]
#
# Sweep keys: ranks (MPI processes), ep (parallel.ep), threads (OpenMP threads per
# rank), micro_batch (train.micro_batch_size), global_batch (train.global_batch_size).
# A point that is not a valid layout (ep not dividing ranks, ...) is skipped with the
# error moetune gave. A single process cannot change its MPI size, hence this script.
# MOETUNE=... points at another binary (default build/moetune), STEPS/WARMUP set the
# timed and warm-up steps (default 5 and 2). Runs as root are allowed (OMPI_ALLOW_RUN_AS_ROOT
# is set) and --oversubscribe is added when ranks x threads exceed the cores.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
MOETUNE=${MOETUNE:-$here/build/moetune}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
PY=${PYTHON:-/usr/bin/python3}
config="" out="" extra=()
declare -A lists=()
order=()
die() { echo "error: $*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config=${2:?}; shift 2 ;;
    --out) out=${2:?}; shift 2 ;;
    --sweep)
      shift
      [[ $# -gt 0 && "$1" != --* ]] || die "--sweep: expected key=v1,v2,... (keys: ranks, ep, threads, micro_batch, global_batch)"
      while [[ $# -gt 0 && "$1" != --* ]]; do
        kv=$1; shift
        [[ "$kv" == *=* ]] || die "--sweep: '$kv' is not key=v1,v2,..."
        key=${kv%%=*} vals=${kv#*=}
        case "$key" in
          ranks|ep|threads|micro_batch|global_batch) ;;
          *) die "--sweep: unknown key '$key' (keys: ranks, ep, threads, micro_batch, global_batch)" ;;
        esac
        [[ "$vals" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--sweep: $key: '$vals' is not a list of positive integers"
        [[ -z "${lists[$key]:-}" ]] && order+=("$key")
        lists[$key]=${vals//,/ }
        done ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1' (usage: $0 --config CFG --out DIR --sweep key=v1,v2 ... [-- bench args])" ;;
  esac
done
[[ -n "$config" ]] || die "--config is required"
[[ -n "$out" ]] || die "--out is required"
[[ ${#order[@]} -gt 0 ]] || die "--sweep is required (e.g. --sweep ranks=1,2 threads=1,2)"
[[ -x "$MOETUNE" ]] || die "no moetune binary at $MOETUNE (build it, or set MOETUNE=...)"
mpirun=$(command -v mpirun) || die "mpirun not found on PATH"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cores=$(nproc)
mkdir -p "$out/points"
: > "$out/points.txt"

# Cartesian product of the lists, in the order the keys were given.
points=("")
for key in "${order[@]}"; do
  next=()
  for p in "${points[@]}"; do
    for v in ${lists[$key]}; do next+=("$p $key=$v"); done
  done
  points=("${next[@]}")
done

i=0
for p in "${points[@]}"; do
  i=$((i + 1))
  ranks=1 threads=1 args=()
  for kv in $p; do
    k=${kv%%=*} v=${kv#*=}
    case "$k" in
      ranks) ranks=$v ;;
      threads) threads=$v; args+=(--threads "$v") ;;
      ep) args+=(--ep "$v") ;;
      micro_batch) args+=(--set "train.micro_batch_size=$v") ;;
      global_batch) args+=(--set "train.global_batch_size=$v") ;;
    esac
  done
  name=$(printf 'p%03d' "$i")
  over=()
  (( ranks * threads > cores )) && over=(--oversubscribe)
  echo "[$i/${#points[@]}]$p"
  if "$mpirun" -np "$ranks" "${over[@]}" --bind-to none -x OMP_NUM_THREADS="$threads" \
      -x OMPI_ALLOW_RUN_AS_ROOT -x OMPI_ALLOW_RUN_AS_ROOT_CONFIRM \
      "$MOETUNE" bench --config "$config" --steps "$STEPS" --warmup "$WARMUP" --quiet \
      --json "$out/points/$name.json" "${args[@]}" "${extra[@]}" > "$out/points/$name.log" 2>&1; then
    echo "$name$p" >> "$out/points.txt"
  else
    echo "  skipped: $(grep -m1 '^error:' "$out/points/$name.log" || tail -n1 "$out/points/$name.log")"
    echo "$name$p SKIPPED $(grep -m1 '^error:' "$out/points/$name.log" || true)" >> "$out/points.txt"
  fi
done

"$PY" - "$out" <<'EOF'
import csv, json, os, sys
out = sys.argv[1]
rows, skipped = [], []
for line in open(os.path.join(out, "points.txt")):
    parts = line.split()
    name, kv = parts[0], [p for p in parts[1:] if "=" in p and not p.startswith("error")]
    if "SKIPPED" in parts:
        skipped.append(line.strip())
        continue
    r = json.load(open(os.path.join(out, "points", name + ".json")))
    ph = r["phases"]
    def s(*keys): return sum(ph[k]["s"] for k in keys)
    rows.append({
        "ranks": r["layout"]["world_size"], "ep": r["layout"]["ep"], "threads": r["threads"],
        "micro_batch": r["micro_batch_size"], "tokens_per_step": r["tokens_per_step"],
        "step_ms": 1e3 * r["step_s"], "tokens_per_s": r["tokens_per_s"], "mfu_pct": 100 * r["mfu"],
        "forward_ms": 1e3 * s("embedding", "attention", "dense_ffn", "router", "dispatch", "experts", "combine",
                              "shared_expert", "lm_head_loss"),
        "backward_ms": 1e3 * s("embedding_bwd", "attention_bwd", "dense_ffn_bwd", "router_bwd", "dispatch_bwd",
                               "experts_bwd", "combine_bwd", "shared_expert_bwd", "lm_head_loss_bwd"),
        "a2a_ms": 1e3 * (r["all_to_all"]["dispatch_s"] + r["all_to_all"]["combine_s"]),
        "a2a_mib": (r["all_to_all"]["dispatch_bytes"] + r["all_to_all"]["combine_bytes"]) / 2**20,
        "rank_wait_ms": 1e3 * ph["rank_wait"]["s"] if "rank_wait" in ph else 0.0,
        "grad_reduce_ms": 1e3 * r["grad_reduce"]["s"], "optimizer_ms": 1e3 * ph["optimizer"]["s"],
        "peak_rss_mib": r["memory_rank0"]["peak_rss_bytes"] / 2**20, "isa": r["isa"],
        "_json": r})
cols = [c for c in (rows[0].keys() if rows else []) if not c.startswith("_")]
with open(os.path.join(out, "sweep.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows: w.writerow(r)
json.dump([r["_json"] for r in rows], open(os.path.join(out, "sweep.json"), "w"), indent=1)
def fmt(v): return f"{v:.1f}" if isinstance(v, float) else str(v)
md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
md += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
if skipped: md += ["", "Skipped points:"] + ["- " + s for s in skipped]
open(os.path.join(out, "sweep.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
print(f"\nwrote {out}/sweep.md, {out}/sweep.csv, {out}/sweep.json")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("note: python3-matplotlib is not installed; no plot (apt-get install python3-matplotlib)")
    sys.exit(0)
if not rows: sys.exit(0)
fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows) + 2), 4))
labels = [f"W{r['ranks']} ep{r['ep']}\nt{r['threads']} mb{r['micro_batch']}" for r in rows]
ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows], color="tab:blue")
for k, r in enumerate(rows):
    ax.text(k, r["tokens_per_s"], f"{r['mfu_pct']:.1f}%", ha="center", va="bottom", fontsize=7)
ax.set_xticks(range(len(rows)))
ax.set_xticklabels(labels, fontsize=7)
ax.set_ylabel("tokens/s (global)")
ax.set_title("moetune bench: tokens/s per layout\n(bar labels: MFU against the measured FMA peak)", fontsize=10)
fig.tight_layout()
fig.savefig(os.path.join(out, "sweep.png"), dpi=120)
print(f"wrote {out}/sweep.png")
EOF
