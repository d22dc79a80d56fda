#!/usr/bin/env bash
# Prepare what the GPU machine lacks, in git-ignored folders that the device tool can carry, then check
# that every call bench/GPU.md plans fits what one call may carry: 64 MiB, the checkout included (28 MB
# in December 2026, about 42 MB once the 128 px demo model is committed). What one call carried stays on
# the machine while it is warm, so data that cannot travel together goes in consecutive calls.
#   .whl/                    diffusers and facexlib wheels (pure Python; the machine has torch, safetensors, ...)
#   .whl-dlib/               dlib-bin for the machine's Python (3.12): the landmark masker and the recognizer
#   .data/compvis-configs/   the CompVis/ldm-celebahq-256 configs                        (issue 4)
#   .data/lfw-train-1/ .. -3/ train-128.zip cut in three parts, and its sha256           (issue 5: train)
#   .data/lfw-dev/           dev-128.zip and dev_pairs.txt                               (issue 5: eval, photos)
#   .data/lfw-photos/        dev-250-originals.zip                                       (photos)
#   .data/dlib-5pt/          dlib's 5-point landmark model and CNN detector (CC0)         (landmark masker)
#   .data/dlib-recognizer/   dlib's face recognizer (CC0)                                 (eval scoring)
# bench/gpu_issue5.sh puts the halves and the dlib models back together on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
for path in /.whl/ /.whl-dlib/ /.data/; do
  grep -qx "$path" .gitignore || { echo "$path must be git-ignored" >&2; exit 1; }
done
LFW=../shared/data/lfw
PYTHON=${PYTHON:-.venv/bin/python}
rm -rf .data/lfw-train .data/face-models  # the earlier layout, whose calls no longer fit beside the checkout
mkdir -p .whl .whl-dlib .data/compvis-configs .data/lfw-train-{1,2,3} .data/lfw-dev .data/lfw-photos \
  .data/dlib-5pt .data/dlib-recognizer
if [ -z "${SKIP_DOWNLOADS:-}" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
    "diffusers==$($PYTHON -c 'import diffusers; print(diffusers.__version__)')" facexlib==0.3.0
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 -d .whl-dlib dlib-bin==20.0.1.post1
fi
cp ../shared/spec/compvis-ldm-celebahq-256/*.json .data/compvis-configs/
# three parts since the 128 px model is committed: a half beside the checkout and the wheels is over 64 MiB
rm -f .data/lfw-train-*/train-128.zip.part*
(cd .data && split -n 3 -d -a 1 --numeric-suffixes=1 ../$LFW/train-128.zip train-128.zip.part)
for part in 1 2 3; do mv .data/train-128.zip.part$part .data/lfw-train-$part/; done
(cd $LFW && sha256sum train-128.zip) > .data/lfw-train-1/train-128.zip.sha256
cp $LFW/dev-128.zip $LFW/dev_pairs.txt .data/lfw-dev/
cp $LFW/dev-250-originals.zip .data/lfw-photos/
MODELS=$($PYTHON -c "import importlib.util as u; print(u.find_spec('face_recognition_models').submodule_search_locations[0])")/models
cp "$MODELS/shape_predictor_5_face_landmarks.dat" "$MODELS/mmod_human_face_detector.dat" .data/dlib-5pt/
cp "$MODELS/dlib_face_recognition_resnet_model_v1.dat" .data/dlib-recognizer/

# Each planned call: its name, whether it comes after the 128 px model is committed, and what it carries.
$PYTHON - <<'EOF'
import subprocess
from pathlib import Path

CALLS = [
    ("issue 4, first call", False, [".whl", ".data/compvis-configs"]),
    ("issue 5 train (window A or L), call 1: install", False, [".whl", ".data/lfw-train-1"]),
    ("issue 5 train (window A or L), call 2: install", False, [".data/lfw-train-2"]),
    ("issue 5 train (window A or L), call 3: train", False, [".data/lfw-train-3"]),
    ("issue 5 eval, call 1: install", True, [".whl", ".whl-dlib", ".data/lfw-dev"]),
    ("issue 5 eval, call 2: transform", True, [".data/dlib-5pt"]),
    ("issue 5 eval, call 3: score", True, [".data/dlib-recognizer"]),
    ("photos, call 1: install", True, [".whl", ".whl-dlib", ".data/lfw-dev", ".data/lfw-photos"]),
    ("photos, call 2: photos", True, [".data/dlib-5pt"]),
    ("photos, call 3: photo-recovery", True, [".data/dlib-recognizer"]),
]
MODEL_BYTES = 15 * 10**6  # the committed 128 px model: fp16 weights under 15 MB, card and PNGs
LIMIT = 64 * 2**20


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, check=True).stdout.split(b"\0")
tree = sum(Path(p.decode()).stat().st_size for p in listed if p and Path(p.decode()).is_file())
model_missing = not Path("models/demo-lfw128").is_dir()
print(f"checkout: {tree / 2**20:.1f} MiB" + ("; calls marked * add 15 MB for the 128 px model" if model_missing else ""))
over = False
for name, after_model, carry in CALLS:
    total = tree + sum(size(Path(c)) for c in carry) + (MODEL_BYTES if after_model and model_missing else 0)
    over |= total > LIMIT
    mark = "*" if after_model and model_missing else " "
    print(f"  {total / 2**20:5.1f} MiB{mark} {'OVER 64 MiB ' if total > LIMIT else ''}{name}: carry {' '.join(carry)}")
raise SystemExit("a planned call would be refused: carry less in it" if over else 0)
EOF
