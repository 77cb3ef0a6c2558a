#!/usr/bin/env bash
# Make (or reuse) a virtualenv holding Cornac, the peer that benchmarks/peers/cornac_vbpr.py runs in
# (VBPR against pixelrec's --model vbpr on the same split and the same frozen features).
#
#   bash benchmarks/peers/make_cornac_venv.sh [DIR]      (default /work/peers/cornac, outside the repo)
#
# Cornac's VBPR is written in PyTorch, so the venv gets a CPU-only torch wheel (CORNAC_TORCH chooses
# another, as RECBOLE_TORCH does for make_recbole_venv.sh) and h5py to read pixelrec's cache.
# Idempotent: an existing venv is reused, pip skips what is there.
set -euo pipefail
DIR="${1:-/work/peers/cornac}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${CORNAC_TORCH:-}"

if [ ! -x "$DIR/bin/python" ]; then
    echo "creating venv $DIR"
    "$PY" -m venv "$DIR"
else
    echo "reusing venv $DIR"
fi
PIP=("$DIR/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" wheel
if [ -n "$TORCH_SPEC" ]; then
    # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
    "${PIP[@]}" $TORCH_SPEC
elif ! "${PIP[@]}" "torch==2.13.0+cpu" 2>/dev/null; then
    echo "no CPU-only torch wheel found; installing the default torch"
    "${PIP[@]}" torch
fi
# cornac 3.0.1 (numpy 2): the 2.3.0 wheel pip picks under numpy<2 needs GLIBCXX_3.4.32 (libstdc++ of GCC 13)
"${PIP[@]}" "cornac==3.0.1" "numpy>=2" pandas h5py tqdm
"$DIR/bin/python" - <<'PY'
import importlib.metadata as md
from cornac.models import VBPR  # noqa: F401  fails here, not mid-benchmark
for name in ("cornac", "torch", "numpy", "pandas", "h5py"):
    print(f"{name}=={md.version(name)}")
PY
echo "Cornac venv ready: $DIR/bin/python"
