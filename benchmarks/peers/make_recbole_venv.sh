#!/usr/bin/env bash
# Make (or reuse) a virtualenv holding RecBole 1.2.1, the peer that benchmarks/ml100k.py --peer recbole runs.
#
#   bash benchmarks/peers/make_recbole_venv.sh [DIR]      (default /work/peers/recbole, outside the repo)
#
# RecBole 1.2.1 predates numpy 2, pandas 2.2 and setuptools 81 (it uses np.float_ / pkg_resources), hence
# the pins. It needs no torchvision, so a CPU-only torch wheel is enough: set RECBOLE_TORCH to choose one
# (default: "torch==2.13.0+cpu" where pip finds that CPU wheel, e.g. in a --find-links folder or with
# RECBOLE_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"; else plain "torch",
# whatever pip resolves). Idempotent: an existing venv is reused, pip skips what is there.
set -euo pipefail
DIR="${1:-/work/peers/recbole}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${RECBOLE_TORCH:-}"

if [ ! -x "$DIR/bin/python" ]; then
    echo "creating venv $DIR"
    "$PY" -m venv "$DIR"
else
    echo "reusing venv $DIR"
fi
PIP=("$DIR/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" "setuptools<81" wheel
if [ -n "$TORCH_SPEC" ]; then
    # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
    "${PIP[@]}" $TORCH_SPEC
elif ! "${PIP[@]}" "torch==2.13.0+cpu" 2>/dev/null; then
    echo "no CPU-only torch wheel found; installing the default torch"
    "${PIP[@]}" torch
fi
# RecBole imports these at run time (recbole.utils: tensorboard, thop, texttable, colorlog; ray only
# for its hyper-parameter tuning, which the peer script does not use).
"${PIP[@]}" "recbole==1.2.1" "numpy<2" "pandas<2.2" "scipy<1.14" "setuptools<81" \
    tensorboard thop texttable colorlog colorama tabulate plotly psutil pyyaml tqdm
"$DIR/bin/python" - <<'PY'
import importlib.metadata as md
import recbole.quick_start  # noqa: F401  fails here, not mid-benchmark, when a run-time import is missing
for name in ("recbole", "torch", "numpy", "pandas", "scipy", "setuptools"):
    print(f"{name}=={md.version(name)}")
PY
echo "RecBole venv ready: $DIR/bin/python"
