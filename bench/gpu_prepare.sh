#!/usr/bin/env bash
# Prepare what the GPU machine lacks, in git-ignored folders that the device tool can carry.
# A call carries at most 64 MiB, so each job below names only what it needs; what one call
# carried stays on the machine while it is warm. Steps and commands: bench/GPU.md.
#   .whl/                diffusers and facexlib wheels (pure Python; the machine has torch, safetensors, ...)
#   .whl-dlib/           dlib-bin for the machine's Python (3.12), for the landmark masker and the recognizer
#   .data/compvis-configs  the CompVis/ldm-celebahq-256 configs from ../shared          (issue 4)
#   .data/lfw-train/     train-128.zip                                                 (issue 5: train, 40 MB)
#   .data/lfw-dev/       dev-128.zip, dev_pairs.txt, dev-250-originals.zip             (issues 5, 6: eval, photos)
#   .data/face-models/   a face_recognition_models package with only the CC0 models we use (32 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
for path in /.whl/ /.whl-dlib/ /.data/; do
  grep -qx "$path" .gitignore || { echo "$path must be git-ignored" >&2; exit 1; }
done
LFW=../shared/data/lfw
mkdir -p .whl .whl-dlib .data/compvis-configs .data/lfw-train .data/lfw-dev .data/face-models/face_recognition_models/models
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
  "diffusers==$(.venv/bin/python -c 'import diffusers; print(diffusers.__version__)')" facexlib==0.3.0
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 -d .whl-dlib dlib-bin==20.0.1.post1
cp ../shared/spec/compvis-ldm-celebahq-256/*.json .data/compvis-configs/
cp $LFW/train-128.zip .data/lfw-train/
cp $LFW/dev-128.zip $LFW/dev_pairs.txt $LFW/dev-250-originals.zip .data/lfw-dev/
MODELS=$(.venv/bin/python -c "import importlib.util as u; print(u.find_spec('face_recognition_models').submodule_search_locations[0])")/models
: > .data/face-models/face_recognition_models/__init__.py
for name in dlib_face_recognition_resnet_model_v1.dat shape_predictor_5_face_landmarks.dat mmod_human_face_detector.dat; do
  cp "$MODELS/$name" .data/face-models/face_recognition_models/models/
done
du -sh .whl .whl-dlib .data/*
