#!/usr/bin/env bash
# The GPU work of the demo-model and photo issues, one stage per device call (each under 10 min).
# Prepare with bench/gpu_prepare.sh; the order of calls and what each carries is in bench/GPU.md.
#   bash bench/gpu_issue5.sh install            # the first call on a fresh machine (quick when it is warm)
#   bash bench/gpu_issue5.sh train 8 [--resume] # 8 minutes of training; the model goes to $OUT/demo-lfw128
#   bash bench/gpu_issue5.sh train-latent 3 4.5 [--resume]  # step 5: 3 minutes of autoencoder, then 4.5 of
#                                               # latent UNet; the model goes to $OUT/demo-lfw128-latent
#   bash bench/gpu_issue5.sh eval-transform     # the dev split's genuine pairs through the model, in chunks
#   bash bench/gpu_issue5.sh eval-score         # dlib on 16 cores for the transformed chunks, then the summary
#   bash bench/gpu_issue5.sh eval               # both, where everything fits in one call (a CPU smoke run)
#   bash bench/gpu_issue5.sh photos             # the README's photo example, crop-mode recovery budget and drift
#   bash bench/gpu_issue5.sh photo-recovery     # photo-mode recovery figures (needs the recognizer)
# A call carries at most 64 MiB with the checkout, so the data comes in pieces over consecutive calls
# (bench/gpu_prepare.sh checks the sizes): what a call carried stays on the machine while it is warm, and
# each stage gathers the pieces it needs from .data/ and says which is missing. At most 8 files come back
# from $OUT: each stage writes a few, logs included.
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/out}
# EVAL_FIRST=800 starts eval-transform and eval-score at that pair: a window finishing an earlier one's evaluation.
# overridable for a CPU smoke run of this script: PYTHON, DEVICE, WORK, SITE, MODEL, EVAL_PAIRS, EVAL_CHUNK,
# EVAL_BATCH, EVAL_ARGS, TRAIN_ARGS, AUTOENCODER_ARGS, PHOTOS, EXAMPLE_ARGS, BUDGET_ARGS, DRIFT_ARGS, DRIFT_STEPS, WHEELS, DATA
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/rt}
SITE=${SITE:-/tmp/site}
MODEL=${MODEL:-$WORK/models/demo-lfw128}
EVAL_FIRST=${EVAL_FIRST:-0}
EVAL_PAIRS=${EVAL_PAIRS:-1200}
EVAL_CHUNK=${EVAL_CHUNK:-200}
EVAL_BATCH=${EVAL_BATCH:-64}
EVAL_ARGS=${EVAL_ARGS:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
AUTOENCODER_ARGS=${AUTOENCODER_ARGS:-}
PHOTOS=${PHOTOS:-12}
EXAMPLE_ARGS=${EXAMPLE_ARGS:-}
BUDGET_ARGS=${BUDGET_ARGS:---count 32 --steps 50 200}
DRIFT_ARGS=${DRIFT_ARGS:---count 16}
DRIFT_STEPS=${DRIFT_STEPS:-50 200}
WHEELS=${WHEELS-.whl .whl-dlib}
DATA=${DATA:-.data}
FACE_MODELS=$WORK/face-models
export PYTHONPATH=$SITE:$FACE_MODELS${PYTHONPATH:+:$PYTHONPATH}
# the checkout's revanon_rt/ (without the engines/ and export/ it installs with) must not shadow $SITE,
# in this script's commands or in the processes they start; logs must reach $OUT as they are written
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
RT="$PYTHON -m revanon_rt"
name=$(basename "$MODEL")
dev=$DATA/lfw-dev
stage=$1; shift

need() {  # need FILE WHAT: stop with the call that carries it
  [ -e "$1" ] || { echo "missing $1: carry $2 in this call or an earlier one on this warm machine (bench/GPU.md)" >&2; exit 2; }
}

# dlib finds its models inside a face_recognition_models package; the 5-point model and the recognizer
# travel in different calls, so the package is put together here from whatever has arrived
gather_face_models() {
  mkdir -p $FACE_MODELS/face_recognition_models/models
  : > $FACE_MODELS/face_recognition_models/__init__.py
  for folder in $DATA/dlib-5pt $DATA/dlib-recognizer; do
    if [ -d $folder ]; then cp $folder/*.dat $FACE_MODELS/face_recognition_models/models/; fi
  done
  for model in "$@"; do
    case $model in dlib_face_recognition*) carried=.data/dlib-recognizer ;; *) carried=.data/dlib-5pt ;; esac
    need $FACE_MODELS/face_recognition_models/models/$model $carried
  done
}

train_zip() {  # the three parts of train-128.zip, joined and checked once per machine
  local zip=$WORK/data/train-128.zip parts=() part
  if [ ! -f $zip ]; then
    for part in 1 2 3; do
      parts+=($DATA/lfw-train-$part/train-128.zip.part$part)
      need ${parts[-1]} .data/lfw-train-$part
    done
    mkdir -p $WORK/data
    cat "${parts[@]}" > $zip.tmp
    [ "$(sha256sum < $zip.tmp | cut -d' ' -f1)" = "$(cut -d' ' -f1 $DATA/lfw-train-1/train-128.zip.sha256)" ] \
      || { echo "the joined train-128.zip does not match its sha256" >&2; exit 2; }
    mv $zip.tmp $zip
  fi
  echo $zip
}

chunk_starts() { seq $EVAL_FIRST $EVAL_CHUNK $((EVAL_PAIRS - 1)); }

chunk_dir() {
  local start=$1 end=$(($1 + EVAL_CHUNK < EVAL_PAIRS ? $1 + EVAL_CHUNK : EVAL_PAIRS))
  echo $WORK/eval/chunk-$(printf %05d $start)-$(printf %05d $end)
}

eval_args() { echo --pairs $dev/dev_pairs.txt --images $dev/dev-128.zip --start $1 --limit $EVAL_CHUNK --out $WORK/eval; }

eval_transform() {
  need $dev/dev-128.zip .data/lfw-dev
  gather_face_models shape_predictor_5_face_landmarks.dat
  mkdir -p $WORK/eval $OUT/eval
  # a chunk is done once its transform.json is written (last): a call cut short keeps the chunks it finished
  for start in $(chunk_starts); do
    [ -f $(chunk_dir $start)/transform.json ] && continue
    $RT eval $(eval_args $start) --model $MODEL --masker landmarks --stage transform --batch $EVAL_BATCH \
      --device $DEVICE --genuine-only $EVAL_ARGS 2>&1 | tee -a $OUT/eval/transform.log
  done
}

eval_score() {
  need $dev/dev-128.zip .data/lfw-dev
  gather_face_models shape_predictor_5_face_landmarks.dat dlib_face_recognition_resnet_model_v1.dat
  mkdir -p $OUT/eval
  local pids=() scored=()
  for start in $(chunk_starts); do
    local chunk=$(chunk_dir $start)
    [ -f $chunk/transform.json ] || continue
    scored+=($(basename $chunk))
    [ -f $chunk/features.npz ] && continue
    $RT eval $(eval_args $start) --stage score > $chunk.score.log 2>&1 &
    pids+=($!)
  done
  [ ${#scored[@]} -gt 0 ] || { echo "no transformed chunk to score: run eval-transform first" >&2; exit 2; }
  local failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  cat $WORK/eval/chunk-*.score.log > $OUT/eval/score.log 2>/dev/null || true
  [ $failed = 0 ] || { tail -n 40 $OUT/eval/score.log; exit 1; }
  $RT eval-merge $WORK/eval
  cp $WORK/eval/metrics.json $WORK/eval/metrics.md $OUT/eval/
  # what a later window's eval-merge --extend needs of these chunks: no image leaves the machine
  (cd $WORK/eval && tar czf $OUT/eval/chunks.tgz $(for c in "${scored[@]}"; do echo $c/transform.json $c/features.npz; done))
  echo "scored: ${scored[*]}"
}

case $stage in
install)
  # the project is copied, not built: a bare machine needs no setuptools, and the copy is never stale
  mkdir -p $SITE
  for wheels in $WHEELS; do
    if [ -d $wheels ] && [ ! -f $SITE/.installed$wheels ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE $wheels/*.whl
      touch $SITE/.installed$wheels
    fi
  done
  rm -rf $SITE/revanon_rt && cp -r revanon_rt $SITE/ && cp -r engines export $SITE/revanon_rt/
  $PYTHON -c "import revanon_rt.engines, diffusers, torch; print('ready on', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')"
  $PYTHON -c "import dlib" 2>/dev/null || echo "no dlib: carry .whl-dlib in an install call before eval or photos"
  ;;
train)
  minutes=$1; shift
  zip=$(train_zip)
  $RT train --data $zip --out $MODEL --minutes "$minutes" --device $DEVICE $TRAIN_ARGS "$@"
  mkdir -p $OUT/demo-lfw128
  cp -r $MODEL/unet $MODEL/scheduler $MODEL/README.md $MODEL/loss.png $MODEL/samples.png $OUT/demo-lfw128/
  tar czf $OUT/demo-lfw128/training-log.tgz -C $MODEL/checkpoint loss.csv pieces.jsonl
  ;;
eval-transform) eval_transform ;;
eval-score) eval_score ;;
eval) eval_transform; eval_score ;;
photos)
  need $dev/dev-128.zip .data/lfw-dev
  gather_face_models shape_predictor_5_face_landmarks.dat mmod_human_face_detector.dat
  mkdir -p $OUT/results
  # what goes back must be this call's: the checkout may hold earlier runs' results under the same names
  made=(bench/results/recovery-budget-$name.{md,json})
  for steps in $DRIFT_STEPS; do made+=(bench/results/inversion-drift-$name-$steps.{md,json}); done
  rm -f "${made[@]}"
  # each part runs whatever happened to the one before (a model whose samples dlib misses still gets its
  # recovery budget and drift measured); the README's figure first, since what a timeout cuts is the tail
  failed=()
  run_part() { "$@" 2>&1 | tee -a $OUT/photos.log || failed+=("$(basename $2)"); }
  run_part $PYTHON docs/draw_photo_example.py --model $MODEL --device $DEVICE --out $OUT/photo-example.png \
    $EXAMPLE_ARGS
  run_part $PYTHON bench/recovery_budget.py --model $MODEL --device $DEVICE --images $dev/dev-128.zip $BUDGET_ARGS
  for steps in $DRIFT_STEPS; do
    run_part $PYTHON bench/inversion_drift.py --model $MODEL --device $DEVICE --images $dev/dev-128.zip $DRIFT_ARGS \
      --steps $steps
  done
  for result in "${made[@]}"; do [ ! -f $result ] || cp $result $OUT/results/; done
  [ ${#failed[@]} = 0 ] || { echo "failed: ${failed[*]} (photos.log)" >&2; exit 1; }
  ;;
photo-recovery)  # identities too: the recognizer, which travels in a call of its own
  need $DATA/lfw-photos/dev-250-originals.zip .data/lfw-photos
  gather_face_models shape_predictor_5_face_landmarks.dat dlib_face_recognition_resnet_model_v1.dat
  mkdir -p $OUT/results
  rm -f bench/results/photo-recovery-$name.*
  $PYTHON bench/photo_recovery.py --model $MODEL --device $DEVICE --photos $PHOTOS \
    --originals $DATA/lfw-photos/dev-250-originals.zip
  cp bench/results/photo-recovery-$name.* $OUT/results/
  ;;
train-latent)
  # the paper's design at 128 px, in an 8 x 32 x 32 latent: with an ideal ε it recovers 67% against 48% in
  # 8 x 16 x 16 (bench/results/eval-oracle-latent128-*-fold1-dev.md). The autoencoder cannot change once a UNet
  # sits beside it, so a --resume call (its minutes ignored) only trains the UNet further
  autoencoder_minutes=$1 unet_minutes=$2; shift 2
  zip=$(train_zip)
  model=$WORK/models/demo-lfw128-latent
  mkdir -p $OUT/demo-lfw128-latent
  log=$OUT/demo-lfw128-latent/train.log
  if [ ! -d $model/vae ]; then
    # the last 40% of the autoencoder's minutes at consistency weight 10 and lr 2e-4, as on the CPU at 64 px,
    # where the weight raised right-key TAR from 28.2% to 43.7% (bench/results/eval-lfw64-latent-c10-dev.md) and
    # the lower rate then took reconstruction from 27.6 to 29.8 dB (oracle-recovery-c10b-autoencoder.md)
    read -r early_minutes late_minutes <<< "$(awk -v m="$autoencoder_minutes" 'BEGIN { print m * 0.6, m * 0.4 }')"
    $RT train-autoencoder --data $zip --out $model --resolution 128 --channels 32,64,128 --batch 64 \
      --minutes "$early_minutes" --device $DEVICE $AUTOENCODER_ARGS 2>&1 | tee -a $log
    $RT train-autoencoder --data $zip --out $model --resume --consistency-weight 10 --lr 2e-4 \
      --minutes "$late_minutes" --device $DEVICE $AUTOENCODER_ARGS 2>&1 | tee -a $log
  fi
  $RT train --data $zip --out $model --resolution 128 --architecture latent --batch 128 \
    --minutes "$unet_minutes" --device $DEVICE $TRAIN_ARGS "$@" 2>&1 | tee -a $log
  # at most 8 files come back: the two weight files as they are, everything small in one archive
  for part in unet vae; do
    mkdir -p $OUT/demo-lfw128-latent/$part && cp $model/$part/*.safetensors $OUT/demo-lfw128-latent/$part/
  done
  cp $model/loss.png $model/samples.png $OUT/demo-lfw128-latent/
  tar czf $OUT/demo-lfw128-latent/model-small-files.tgz -C $model unet/config.json vae/config.json scheduler \
    README.md -C checkpoint loss.csv pieces.jsonl autoencoder-loss.csv autoencoder-pieces.jsonl
  ;;
train-zip) train_zip ;;  # for commands of your own that need the joined zip
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
