#!/usr/bin/env bash
# The GPU check in one command, for a machine with torch, transformers, peft, accelerate, timm and
# pytest but no hub and no package index (see benchmarks/gpu_check.py for the wheel download):
#
#     bash benchmarks/gpu_check.sh [gpu_check.py arguments, e.g. --stages timing --layers 8]
#
# Installs the wheels in gpu_wheels/ and the repo, then writes gpu_check.json, gpu_check.md and
# tests.log into ${OUT:-out/gpu_check}. GPU_CHECK_TIMEOUT (default 470 s) sends SIGINT, which the
# script records before it stops: the 8-minute limit holds even if a stage hangs.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G "gpu_wheels/*.whl" > /dev/null; then
    # --no-deps: everything else they need is installed there, and no index could supply it anyway
    "$PYTHON" -m pip install -q --no-index --no-deps --find-links gpu_wheels gpu_wheels/*.whl \
        || echo "gpu_check.sh: installing gpu_wheels failed; the lab's tests will say what is missing"
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || echo "gpu_check.sh: editable install failed; importing the repo through PYTHONPATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
timeout -s INT -k 10 "${GPU_CHECK_TIMEOUT:-470}" \
    "$PYTHON" benchmarks/gpu_check.py --output-dir "${OUT:-out/gpu_check}" "$@"
