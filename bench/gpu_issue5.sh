#!/usr/bin/env bash
# The GPU work of the demo-model and photo issues, one stage per device call (each under 10 min).
# Prepare with bench/gpu_prepare.sh; the order of calls and what each carries is in bench/GPU.md.
#   bash bench/gpu_issue5.sh install            # every call starts with it (a fresh machine has nothing)
#   bash bench/gpu_issue5.sh train 8 [--resume] # 8 minutes of training; the model goes to $OUT/demo-lfw128
#   bash bench/gpu_issue5.sh eval               # 1,200 dev pairs: genuine pairs transformed on the GPU, dlib on 16 cores
#   bash bench/gpu_issue5.sh photos             # photo-mode and crop-mode recovery figures, the README example
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD/.data/face-models
export OUT=${OUT:-/tmp/out}
# overridable for a CPU smoke run of this script: PYTHON, DEVICE, WORK, MODEL, EVAL_PAIRS, EVAL_CHUNK, PHOTOS
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/rt}
MODEL=${MODEL:-$WORK/models/demo-lfw128}
EVAL_PAIRS=${EVAL_PAIRS:-1200}
EVAL_CHUNK=${EVAL_CHUNK:-200}
PHOTOS=${PHOTOS:-12}
# the checkout's revanon_rt/ (without the engines/ and export/ it installs with) must not shadow /tmp/site,
# in this script's commands or in the processes they start; logs must reach $OUT as they are written
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
RT="$PYTHON -m revanon_rt"
name=$(basename "$MODEL")
stage=$1; shift

case $stage in
install)
  # the project is copied, not built: a bare machine needs no setuptools, and the copy is never stale
  mkdir -p /tmp/site
  for wheels in .whl .whl-dlib; do
    if [ -d $wheels ] && [ ! -f /tmp/site/.installed$wheels ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $wheels/*.whl
      touch /tmp/site/.installed$wheels
    fi
  done
  rm -rf /tmp/site/revanon_rt && cp -r revanon_rt /tmp/site/ && cp -r engines export /tmp/site/revanon_rt/
  python3 -c "import revanon_rt.engines, diffusers, torch; print('ready:', torch.cuda.get_device_name())"
  python3 -c "import dlib" 2>/dev/null || echo "no dlib yet: carry .whl-dlib in the first train, eval or photos call"
  ;;
train)
  minutes=$1; shift
  $RT train --data .data/lfw-train/train-128.zip --out $MODEL --minutes "$minutes" --device $DEVICE "$@"
  mkdir -p $OUT/demo-lfw128
  cp -r $MODEL/unet $MODEL/scheduler $MODEL/README.md $MODEL/loss.png $MODEL/samples.png $OUT/demo-lfw128/
  cp $MODEL/checkpoint/loss.csv $MODEL/checkpoint/pieces.jsonl $OUT/demo-lfw128/
  ;;
eval)
  # Each chunk's dlib scoring runs on the CPU cores while the GPU transforms the next chunk. A retry on a
  # warm machine keeps the chunks already done: transform.json and features.npz are written last.
  dev=.data/lfw-dev
  mkdir -p $WORK/eval $OUT/eval
  pids=()
  for start in $(seq 0 $EVAL_CHUNK $((EVAL_PAIRS - 1))); do
    end=$((start + EVAL_CHUNK < EVAL_PAIRS ? start + EVAL_CHUNK : EVAL_PAIRS))
    chunk=$WORK/eval/chunk-$(printf %05d $start)-$(printf %05d $end)
    args=(--pairs $dev/dev_pairs.txt --images $dev/dev-128.zip --masker landmarks --start $start
          --limit $EVAL_CHUNK --out $WORK/eval)
    if [ ! -f $chunk/transform.json ]; then
      $RT eval "${args[@]}" --model $MODEL --stage transform --batch 64 --device $DEVICE --genuine-only \
        2>&1 | tee $OUT/eval/transform-$start.log
    fi
    if [ ! -f $chunk/features.npz ]; then
      $RT eval "${args[@]}" --stage score > $OUT/eval/score-$start.log 2>&1 &
      pids+=($!)
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid" || { tail -n 20 $OUT/eval/score-*.log; exit 1; }; done
  $RT eval-merge $WORK/eval
  cp $WORK/eval/metrics.json $WORK/eval/metrics.md $OUT/eval/
  ;;
photos)
  mkdir -p $OUT/results
  # the README's figure first: what a timeout cuts is the tail
  $PYTHON docs/draw_photo_example.py --model $MODEL --device $DEVICE --out $OUT/photo-example.png
  $PYTHON bench/photo_recovery.py --model $MODEL --device $DEVICE --photos $PHOTOS \
    --originals .data/lfw-dev/dev-250-originals.zip
  cp bench/results/photo-recovery-$name.* $OUT/results/
  $PYTHON bench/recovery_budget.py --model $MODEL --device $DEVICE --images .data/lfw-dev/dev-128.zip --count 32 \
    --steps 50 200
  cp bench/results/recovery-budget-$name.* $OUT/results/
  for steps in 50 200; do
    $PYTHON bench/inversion_drift.py --model $MODEL --device $DEVICE --images .data/lfw-dev/dev-128.zip --count 16 \
      --steps $steps
  done
  cp bench/results/inversion-drift-$name-*.* $OUT/results/
  ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
