#!/usr/bin/env bash
# Every figure still owed to a GPU, in one run of under 8.5 minutes on one GPU:
#
#   env        torch / CUDA / GPUs / FAISS GPU support
#   encode     ViT-B-32 at 224 px: images/s of the model alone and of the whole encode, AMP and fp32
#   fit        s/epoch of partial (top 2 blocks) and side (every layer's cached class token) against
#              e2e (top 2 blocks), AMP and fp32
#   faiss      FAISS Flat and IVF on the GPU against the CPU; Flat results equal? (skipped without faiss-gpu);
#              exact search (torch) per batch size against FAISS and torch.mm, identical for every batch?
#   pixel200k  a Pixel200K-shaped epoch of id and partial (benchmarks/pixel200k.py's data)
#   torchrun   fit with 2 processes against 1 (only with 2 GPUs)
#
# Usage, from anywhere, with pixelrec's virtualenv active (or PYTHON=/path/to/python):
#
#   benchmarks/gpu_check.sh [--out DIR] [--dry-run]
#
# Writes DIR/gpu_check.json and DIR/gpu_check.md (default DIR: gpu-check), plus DIR/sections/*.json
# (one per section, kept as it goes) and DIR/logs/*.log. Each section runs in its own process
# under its own time limit (the limits add up to 8 minutes); one that fails or runs out of time
# is marked so, keeps what it measured, and the others still run. --dry-run: tiny sizes, the tiny
# ViT, the CPU; it checks the whole script without a GPU in about a minute.
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="gpu-check"
dry=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --dry-run) dry="--dry-run"; shift ;;
    -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "error: unknown argument $1 (expected --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-python}"
mkdir -p "$out/logs" "$out/sections" || exit 2
export PIXELREC_QUIET=1
if [ -n "$dry" ]; then export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1; fi  # tiny CPU work: one thread each

# section name, time limit in seconds
sections=("env 15" "encode 60" "fit 110" "faiss 80" "pixel200k 125" "torchrun 90")
started=$SECONDS
for entry in "${sections[@]}"; do
  set -- $entry
  name=$1 limit=$2
  printf '%-10s ' "$name"
  timeout -k 10 "$limit" "$python" "$here/gpu_check.py" "$name" --out "$out" $dry >"$out/logs/$name.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    "$python" "$here/gpu_check.py" failed --section "$name" --rc $rc --out "$out"
    echo "stopped (exit $rc, see $out/logs/$name.log)"
  else
    echo "done"
  fi
done
"$python" "$here/gpu_check.py" report --out "$out" $dry >"$out/logs/report.log" 2>&1 || {
  echo "error: the report failed, see $out/logs/report.log" >&2; exit 1; }
echo "wrote $out/gpu_check.json and $out/gpu_check.md in $((SECONDS - started)) s"
