#!/usr/bin/env bash
# One command for a lent GPU machine: every CUDA test and GPU benchmark of qualiclip in under
# 8 minutes, one JSON report ($OUT/gpu_check.json there, .gpu/gpu_check.json elsewhere).
# Without CUDA it is a dry run that says what it would run and exits 0.
#
# The GPU machine has PyTorch and torchvision but not all of qualiclip's dependencies: wheels
# prepared by scripts/gpu_prepare.sh in .gpu/wheels are installed into a temporary folder first,
# and .gpu/shared is the shared folder (a few pristine photos). See docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && ! command -v nvidia-smi >/dev/null; then
    py=.venv/bin/python  # a development checkout: its own environment
fi
site=${TMPDIR:-/tmp}/qualiclip-gpu-site
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .gpu/wheels/*.whl || { echo "gpu_check: installing .gpu/wheels failed"; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .gpu/shared ] && [ -z "${QUALICLIP_SHARED:-}" ]; then
    export QUALICLIP_SHARED="$PWD/.gpu/shared"
fi
exec "$py" scripts/gpu_check.py "$@"
