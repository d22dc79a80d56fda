#!/usr/bin/env bash
# Rehearse bench/GPU.md's device calls on this CPU, in the device image's Python: 3.12 with torch 2.11.0
# and the versions .library/device/KINDS.md lists, without diffusers, facexlib or dlib, which travel as
# wheels. Each call runs over a copy of the checkout (tracked and untracked files that git does not
# ignore) plus what it carries, in a machine folder that keeps what earlier calls carried and wrote, as a
# warm machine does; each window starts on a fresh one. Sizes are tiny: this checks the plumbing, the
# carried pieces and the environment before a window pays for them, not the numbers.
#   bash bench/gpu_prepare.sh && bash bench/gpu_rehearse.sh [A] [B] [P] [4] [L]   # default: all five windows
# The venv (about 5 GB, from PyPI) is made once, in $REHEARSAL/venv.
set -uo pipefail
cd "$(dirname "$0")/.."
CHECKOUT=$PWD
REHEARSAL=${REHEARSAL:-/tmp/revanon-rehearsal}
PYTHON312=${PYTHON312:-python3.12}
VENV=$REHEARSAL/venv
WINDOWS=${*:-A B P 4 L}

if [ ! -x $VENV/bin/python ]; then
  # pyenv's shim answers python3.12 even where 3.12 is not the selected version, and then fails
  $PYTHON312 -c '' 2>/dev/null || PYTHON312=$(ls -d ${PYENV_ROOT:-$HOME/.pyenv}/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)
  [ -n "$PYTHON312" ] || { echo "no Python 3.12 found: set PYTHON312" >&2; exit 2; }
  $PYTHON312 -m venv $VENV && $VENV/bin/pip install -q torch==2.11.0 torchvision==0.26.0 numpy==2.5.2 \
    huggingface_hub==1.33.0 safetensors==0.8.0 onnx==1.23.1 onnx-ir==1.0.0 onnxruntime==1.30.0 onnxscript==0.7.2 \
    pillow typer rich tqdm scipy opencv-python-headless numba filelock regex requests || exit 2
fi
export PATH=$VENV/bin:$PATH  # python3 there is the image's interpreter, as on the device

machine=""
fresh_machine() { machine=$REHEARSAL/machine-$1; rm -rf $machine; mkdir -p $machine/tree; }
failures=0
call() {  # call NAME "CARRIED PATHS" COMMAND
  local name=$1 carry=$2 command=$3 out=$machine/out-$1
  rm -rf $out; mkdir -p $out
  git -C $CHECKOUT ls-files -co --exclude-standard -z | (cd $CHECKOUT && xargs -0 cp --parents -t $machine/tree)
  for path in $carry; do
    [ -e $CHECKOUT/$path ] || { echo "$path is missing: run bench/gpu_prepare.sh" >&2; exit 2; }
    mkdir -p $machine/tree/$(dirname $path); rm -rf $machine/tree/$path; cp -r $CHECKOUT/$path $machine/tree/$path
  done
  local start=$SECONDS
  (cd $machine/tree && OUT=$out DEVICE=cpu WORK=$machine/rt SITE=$machine/site bash -c "$command") \
    > $machine/$name.log 2>&1
  local rc=$? sent=$(find $out -type f | wc -l)
  echo "call $name: exit $rc, $((SECONDS - start)) s, $sent files back (at most 8); log $machine/$name.log"
  [ $sent -le 8 ] || { echo "  more than 8 files under \$OUT" >&2; rc=1; }
  [ $rc = 0 ] || { tail -n 15 $machine/$name.log | sed 's/^/  | /'; failures=$((failures + 1)); }
}
# the trained model, where bench/GPU.md has it committed: models/demo-lfw128 in the checkout
with_model() { echo "mkdir -p models && cp -r $REHEARSAL/demo-lfw128 models/ && MODEL=models/demo-lfw128 $1"; }

for window in $WINDOWS; do
  case $window in
  A)
    fresh_machine A
    call A1 ".whl .data/lfw-train-1" "bash bench/gpu_issue5.sh install"
    call A2 ".data/lfw-train-2" "bash bench/gpu_issue5.sh install"
    call A3 ".data/lfw-train-3" "TRAIN_ARGS='--batch 4 --max-steps 2 --samples 1' bash bench/gpu_issue5.sh train 1"
    # the optional fourth call: a second piece from the checkpoint the third left on the machine
    call A4 "" "TRAIN_ARGS='--max-steps 4 --samples 1' bash bench/gpu_issue5.sh train 1 --resume && grep -q 'Training:.. 4 steps' \$OUT/demo-lfw128/README.md"
    rm -rf $REHEARSAL/demo-lfw128 && cp -r $machine/out-A4/demo-lfw128 $REHEARSAL/ 2>/dev/null
    ;;
  B | P)
    [ -d $REHEARSAL/demo-lfw128 ] || { echo "window $window needs window A's model: rehearse A first" >&2; exit 2; }
    fresh_machine $window
    if [ $window = B ]; then
      call B1 ".whl .whl-dlib .data/lfw-dev" "bash bench/gpu_issue5.sh install"
      eval="EVAL_PAIRS=4 EVAL_CHUNK=2 EVAL_BATCH=2 EVAL_ARGS='--steps 3 --candidates 3'"
      call B2 ".data/dlib-5pt" "$(with_model "$eval bash bench/gpu_issue5.sh eval-transform")"
      call B3 ".data/dlib-recognizer" "$(with_model "$eval bash bench/gpu_issue5.sh eval-score")"
    else
      call P1 ".whl .whl-dlib .data/lfw-dev .data/lfw-photos" "bash bench/gpu_issue5.sh install"
      small="EXAMPLE_ARGS='--tries 1' BUDGET_ARGS='--count 2 --steps 2' DRIFT_ARGS='--count 2' DRIFT_STEPS='2 3'"
      # an untrained model's samples hold no face dlib can find: the example part fails, the rest must not
      call P2 ".data/dlib-5pt" "$(with_model "$small bash bench/gpu_issue5.sh photos; test \$? = 1 && grep -q 'dlib did not find all' \$OUT/photos.log && test \$(ls \$OUT/results | wc -l) = 6")"
      # window B's last pairs first, as bench/GPU.md's call 3 runs them; each part runs whatever the other did
      eval="EVAL_FIRST=2 EVAL_PAIRS=4 EVAL_CHUNK=2 EVAL_BATCH=2 EVAL_ARGS='--steps 3 --candidates 3'"
      call P3 ".data/dlib-recognizer" "$(with_model "$eval bash bench/gpu_issue5.sh eval; e=\$?; MODEL=models/demo-lfw128 PHOTOS=1 bash bench/gpu_issue5.sh photo-recovery && test \$e = 0 && tar tzf \$OUT/eval/chunks.tgz | grep -q chunk-00002-00004/features.npz")"
    fi
    ;;
  4)
    fresh_machine 4
    G="PYTHONPATH=$machine/site python3 bench/gpu.py --configs .data/compvis-configs --work $machine/rt-gpu --out \$OUT --tiny --device cpu --steps 2 --replays 2"
    call 4a ".whl .data/compvis-configs" "bash bench/gpu_issue5.sh install && { $G --compiler eager --only eager,fp32-b1 && $G --compiler eager --only fp32-b8 --verify-all && CUDNN_CONV_WSCAP_DBG=1024 $G --compiler eager --only fp32-b8 --no-verify; }"
    call 4b "" "$G --compiler jit --only fp32-b1 && python3 bench/gpu.py --merge $machine/out-4a/gpu-results.jsonl \$OUT/gpu-results.jsonl --out \$OUT/merged && grep -q 'cuDNN workspace ≤ 1024 MiB' \$OUT/merged/gpu-results.md"
    ;;
  L)
    fresh_machine L
    call L1 ".whl .data/lfw-train-1" "bash bench/gpu_issue5.sh install"
    call L2 ".data/lfw-train-2" "bash bench/gpu_issue5.sh install"
    tiny="AUTOENCODER_ARGS='--batch 2 --max-steps 2' TRAIN_ARGS='--batch 4 --max-steps 2 --samples 1'"
    call L3 ".data/lfw-train-3" "$tiny bash bench/gpu_issue5.sh train-latent 1 1"
    # the optional last call: more UNet from the checkpoint L3 left, the autoencoder untouched
    call L4 "" "TRAIN_ARGS='--batch 4 --max-steps 4 --samples 1' bash bench/gpu_issue5.sh train-latent 1 1 --resume"
    # what comes back, unpacked as bench/GPU.md says, must load as a latent model
    rm -rf $machine/model && mkdir -p $machine/model && cp -r $machine/out-L4/demo-lfw128-latent/. $machine/model/ \
      && tar xzf $machine/model/model-small-files.tgz -C $machine/model && rm $machine/model/model-small-files.tgz \
      && (cd $machine/tree && PYTHONSAFEPATH=1 PYTHONPATH=$machine/site python3 -m revanon_rt demo --model $machine/model \
            --device cpu --steps 2 --face sampled --out $machine/demo > $machine/L-demo.log 2>&1) \
      && grep -q 'Training:.. 4 steps' $machine/model/README.md && grep -q '8×32×32 latent' $machine/model/README.md \
      && echo "L: the model sent back runs the demo as an 8 x 32 x 32 latent model after 4 UNet steps" \
      || { echo "L: the model sent back does not load as planned" >&2; failures=$((failures + 1)); }
    ;;
  *) echo "unknown window $window (A, B, P, 4 or L)" >&2; exit 2 ;;
  esac
done
echo "$failures failed calls"
[ $failures = 0 ]
