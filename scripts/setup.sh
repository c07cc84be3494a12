#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with qualiclip (editable) and its extras.
#
# Usage: bash scripts/setup.sh [--cpu] [--dry-run] [EXTRAS]   (default extras: dev,eval,serve,ray,onnx,metric)
#
# Which torch (the pin, torch==X, is in constraints.txt):
#   default                       torch as pip resolves it: on plain PyPI that is the CUDA build,
#                                 which brings ~19 nvidia-*/cuda-*/triton packages (about 2.7 GB
#                                 to download); where pip is configured with a local CPU wheel
#                                 (this project's machines), that wheel, offline.
#   --cpu or QUALICLIP_TORCH=cpu  the pinned torch from PyTorch's CPU-only wheel index first
#                                 (about 190 MB to download, no CUDA packages), then the rest.
# --dry-run prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
cpu_index="https://download.pytorch.org/whl/cpu"
choice="${QUALICLIP_TORCH:-default}"
dry_run=0
extras="dev,eval,serve,ray,onnx,metric"
for arg in "$@"; do
    case "$arg" in
        --cpu) choice=cpu ;;
        --dry-run) dry_run=1 ;;
        -*) echo "setup.sh: unknown option $arg (options: --cpu, --dry-run)" >&2; exit 2 ;;
        *) extras="$arg" ;;
    esac
done
case "$choice" in
    default|cpu) ;;
    *) echo "setup.sh: QUALICLIP_TORCH must be 'default' or 'cpu', got '$choice'" >&2; exit 2 ;;
esac
torch_pin="$(grep -E '^torch==' constraints.txt)"

run() {
    if [ "$dry_run" -eq 1 ]; then echo "$*"; else "$@"; fi
}

run python3 -m venv .venv
run .venv/bin/python -m pip install -q --upgrade pip
if [ "$choice" = cpu ]; then
    # Installed first, so that resolving qualiclip finds the pin satisfied and pulls no CUDA build.
    run .venv/bin/python -m pip install -q --index-url "$cpu_index" "$torch_pin"
fi
run .venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]"
if [ "$dry_run" -eq 0 ]; then
    echo "qualiclip set up in .venv (torch: $choice): activate with 'source .venv/bin/activate'"
fi
