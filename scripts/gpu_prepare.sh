#!/usr/bin/env bash
# Prepare what a lent GPU machine needs beside the checkout, in .gpu/ (ignored by git; name it
# in the device call's `carry`):
#   .gpu/wheels/         wheels of qualiclip's dependencies that machine lacks (ftfy, wcwidth)
#   .gpu/shared/data/pristine/   a few pristine photos for the benchmarks (from the shared folder)
# Usage: bash scripts/gpu_prepare.sh [PHOTOS]    (PHOTOS: how many, default 12; about 7 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
photos=${1:-12}
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
mkdir -p .gpu/wheels .gpu/shared/data/pristine
# Pure-Python wheels; the platform arguments match the GPU machine's Python 3.12 all the same.
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels $("$py" - <<'PY'
import importlib.metadata as m  # the versions this checkout's tests pass with
print(" ".join(f"{n}=={m.version(n)}" for n in ("ftfy", "wcwidth")))
PY
)
shared=${QUALICLIP_SHARED:-../shared}
if [ -d "$shared/data/pristine" ]; then
    find "$shared/data/pristine" -maxdepth 1 -name '*.png' | sort | head -n "$photos" |
        while read -r f; do cp "$f" .gpu/shared/data/pristine/; done
else
    echo "gpu_prepare: no $shared/data/pristine: the benchmarks will use scikit-image's photos"
fi
du -sh .gpu
