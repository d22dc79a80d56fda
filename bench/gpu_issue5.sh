#!/usr/bin/env bash
# The GPU work of the demo-model and photo issues, one stage per device call (each under 10 min).
# Prepare with bench/gpu_prepare.sh; the order of calls and what each carries is in bench/GPU.md.
#   bash bench/gpu_issue5.sh install            # every call starts with it (a fresh machine has nothing)
#   bash bench/gpu_issue5.sh train 8 [--resume] # 8 minutes of training; the model goes to $OUT/demo-lfw128
#   bash bench/gpu_issue5.sh eval               # 1,200 dev pairs: transforms on the GPU, dlib on 16 cores
#   bash bench/gpu_issue5.sh photos             # photo-mode and crop-mode recovery figures, the README example
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD/.data/face-models
export OUT=${OUT:-/tmp/out}
WORK=/tmp/rt
MODEL=$WORK/models/demo-lfw128
RT="python3 -m revanon_rt"
stage=$1; shift

case $stage in
install)
  if [ ! -f /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .whl-dlib/*.whl
    python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site .
    touch /tmp/site/.installed
  fi
  python3 -c "import revanon_rt, diffusers, dlib, torch; print('ready:', torch.cuda.get_device_name())"
  ;;
train)
  minutes=$1; shift
  $RT train --data .data/lfw-train/train-128.zip --out $MODEL --minutes "$minutes" --device cuda "$@"
  mkdir -p $OUT/demo-lfw128
  cp -r $MODEL/unet $MODEL/scheduler $MODEL/README.md $MODEL/loss.png $MODEL/samples.png $OUT/demo-lfw128/
  cp $MODEL/checkpoint/loss.csv $MODEL/checkpoint/pieces.jsonl $OUT/demo-lfw128/
  ;;
eval)
  dev=.data/lfw-dev
  rm -rf $WORK/eval && mkdir -p $WORK/eval
  for start in 0 200 400 600 800 1000; do   # the model work, one process on the GPU
    $RT eval --pairs $dev/dev_pairs.txt --images $dev/dev-128.zip --model $MODEL --masker landmarks \
      --stage transform --start $start --limit 200 --batch 64 --device cuda --out $WORK/eval
  done
  for start in 0 200 400 600 800 1000; do   # dlib, one process per chunk on the CPU cores
    $RT eval --pairs $dev/dev_pairs.txt --images $dev/dev-128.zip --model $MODEL --masker landmarks \
      --stage score --start $start --limit 200 --out $WORK/eval > $WORK/eval/score-$start.log 2>&1 &
  done
  wait
  $RT eval-merge $WORK/eval
  mkdir -p $OUT/eval && cp $WORK/eval/metrics.json $WORK/eval/metrics.md $OUT/eval/
  ;;
photos)
  python3 bench/photo_recovery.py --model $MODEL --device cuda --photos 12 --originals .data/lfw-dev/dev-250-originals.zip
  python3 bench/recovery_budget.py --model $MODEL --device cuda --images .data/lfw-dev/dev-128.zip --count 32 --steps 50 200
  python3 docs/draw_photo_example.py --model $MODEL --device cuda --out $OUT/photo-example.png
  mkdir -p $OUT/results && cp bench/results/photo-recovery-demo-lfw128.* bench/results/recovery-budget-demo-lfw128.* $OUT/results/
  ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
