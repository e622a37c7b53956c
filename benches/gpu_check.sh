#!/usr/bin/env bash
# The prepared GPU check: one command for a CUDA machine with torch preinstalled and no network.
#
#   bash benches/gpu_check.sh                 # on the GPU machine, from anywhere
#   PYTHON=/work/venv/bin/python bash benches/gpu_check.sh --scale 0.05   # CPU dry run
#
# It installs nothing from the network: fnnet runs from this checkout through PYTHONPATH, and
# wheels carried in .whl/ (optree, which the GPU image lacks) are installed offline into
# /tmp/site. Then `python benches/gpu_check.py` runs, within one time budget,
#   1. pytest -m cuda tests                      (skipped, with a message, without CUDA)
#   2. fnnet bench --workloads linreg            (interleaved medians, the chapter's size)
#   3. fnnet bench --workloads matmul,cnn        (matmul vs peak; 60,000-sample epochs)
#   4. pytest benches (parallel, memory, optim)  (the CUDA cases)
# and writes gpu-check-<date>-<gpu>.{json,md,log} plus the raw JSONs into $OUT when set,
# else benches/results/. Extra arguments go to benches/gpu_check.py (e.g. --scale, --budget).
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    echo "[gpu-check] installing carried wheels from .whl/ into /tmp/site (offline)"
    if "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        # e.g. wheels built for the GPU machine's Python on a dry run elsewhere: go on with what
        # this Python has; the check below stops with a clear message if something is missing.
        echo "[gpu-check] warning: the wheels in .whl/ did not install for this Python; using its own packages" >&2
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

"$PY" - <<'PY' || exit 1
import importlib, sys
missing = [m for m in ("torch", "optree", "pytest", "pytest_benchmark") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"[gpu-check] error: missing Python packages {missing}; carry their wheels in .whl/ (see benches/README.md)")
import torch
print(f"[gpu-check] torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    print("[gpu-check] no CUDA device: this is a dry run; the CUDA tests and CUDA benchmark cases will be skipped")
PY

# 8 minutes in all: the steps share the budget (GPU_CHECK_BUDGET, 440 s by default) and the
# summary is written even when a step runs out of time; `timeout` (the budget plus 40 s) is the
# backstop, so the budget is set here, not with --budget.
for arg in "$@"; do
    case $arg in --budget*) echo "[gpu-check] error: set the budget with GPU_CHECK_BUDGET=SECONDS, not --budget" >&2; exit 2;; esac
done
BUDGET=${GPU_CHECK_BUDGET:-440}
LIMIT=${GPU_CHECK_TIMEOUT:-$(( ${BUDGET%.*} + 40 ))}
timeout -k 10 "$LIMIT" "$PY" benches/gpu_check.py --budget "$BUDGET" "$@"
rc=$?
[ $rc -eq 124 ] && echo "[gpu-check] error: the check ran past $LIMIT s and was stopped" >&2
exit $rc
