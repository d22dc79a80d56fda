#!/usr/bin/env bash
# Prepare what the GPU machine lacks, in git-ignored folders that the device tool can carry:
#   .whl/   diffusers and facexlib wheels (pure Python; the machine has torch, safetensors, cv2, ...)
#   .data/  the CompVis/ldm-celebahq-256 configs from ../shared
# Then, on the device (carry [".whl", ".data"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
#   python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . && \
#   PYTHONPATH=/tmp/site python3 bench/gpu.py --out $OUT --configs .data/compvis-configs
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.data/' .git/info/exclude 2>/dev/null || echo '/.data/' >> .git/info/exclude
mkdir -p .whl .data/compvis-configs
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "diffusers==$(.venv/bin/python -c 'import diffusers; print(diffusers.__version__)')" facexlib==0.3.0
cp ../shared/spec/compvis-ldm-celebahq-256/*.json .data/compvis-configs/
ls -la .whl .data/compvis-configs
