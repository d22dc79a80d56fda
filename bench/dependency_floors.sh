#!/usr/bin/env bash
# The edge install (no extras) at the oldest versions pyproject.toml admits, on the oldest and newest
# Pythons it admits. uv's lowest-direct resolution picks, for each Python, the oldest release of each
# direct dependency that has a wheel there, so the floors pyproject.toml states are the ones checked.
# In each venv and for each engine: every command's --help, keygen, an anonymization and its recovery,
# info, and recoveries across builds: this venv recovers what the main venv anonymized and the other way
# round (an edge box recovers what a server made). Needs PyPI.
#   bash bench/dependency_floors.sh [PYTHON...]    # default: pyenv's 3.10 and 3.13
# With --extras, it instead pins every dependency of the torch, faces and test extras at its floor too
# (torch at $TORCH, default the 2.14.1 on this machine's disk; torch 2.11, the floor, is what
# bench/gpu_rehearse.sh runs), in the main venv's Python, and runs the whole test suite there (20 minutes).
# Writes bench/results/dependency-floors.md (--extras: dependency-floors-extras.md); work files go to
# $FLOORS (default /tmp/revanon-floors).
set -uo pipefail
cd "$(dirname "$0")/.."
CHECKOUT=$PWD
FLOORS=${FLOORS:-/tmp/revanon-floors}
if [ "${1:-}" = "--extras" ]; then
  venv=$FLOORS/extras; results=$CHECKOUT/bench/results/dependency-floors-extras.md
  pins=$(.venv/bin/python - "${TORCH:-2.14.1}" <<'EOF_PINS'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
pins = ["torchvision==0.29.1" if sys.argv[1] == "2.14.1" else "torchvision"]  # facexlib imports torchvision
for requirement in project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]:
    name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()
    pins.append(f"torch=={sys.argv[1]}" if name == "torch" else f"{name}=={floor}.*")
print(" ".join(pins))
EOF_PINS
  ) || exit 2
  rm -rf $venv && mkdir -p $FLOORS && python3 -m venv $venv || exit 2
  echo "pip install $pins"
  $venv/bin/pip install -q $pins > $FLOORS/extras-install.log 2>&1 && $venv/bin/pip install -q --no-deps -e . \
    >> $FLOORS/extras-install.log 2>&1 || { grep -v "is ignored" $FLOORS/extras-install.log | tail; exit 1; }
  start=$SECONDS
  $venv/bin/python -m pytest -q -n auto --dist loadfile -p no:cacheprovider > $FLOORS/extras-tests.log 2>&1
  rc=$?
  {
    echo "# The extras at their dependency floors"
    echo
    echo "\`bash bench/dependency_floors.sh --extras\`, $(date -u +%Y-%m-%d), Python $($venv/bin/python -c 'import platform; print(platform.python_version())'), on this 2-core x86-64 CPU: every dependency of the base install and of the torch, faces and test extras pinned at the floor pyproject.toml states (torch at ${TORCH:-2.14.1}), then the whole test suite."
    echo
    echo "Installed: $($venv/bin/pip list 2>/dev/null | awk 'NR > 2 && tolower($1) ~ /^(torch|torchvision|diffusers|safetensors|facexlib|onnx|onnxscript|onnx-ir|onnx_ir|polygraphy|onnx.graphsurgeon|onnx_graphsurgeon|dlib-bin|face.recognition.models|face_recognition_models|numpy|pillow|typer|click|rich|onnxruntime|pytest|pytest-xdist)$/ {printf "%s %s, ", $1, $2}' | sed 's/, $//')."
    echo
    echo "Test suite: exit $rc, $(tail -1 $FLOORS/extras-tests.log | sed 's/=//g; s/^ *//; s/ *$//') ($((SECONDS - start)) s)."
  } > $results
  cat $results
  exit $rc
fi
PYTHONS=${*:-$(ls -d /root/.pyenv/versions/3.10.*/bin/python /root/.pyenv/versions/3.13.*/bin/python 2>/dev/null)}
MODELS="demo-lfw64 demo-lfw64-latent"  # pixel space (a UNet graph), and latent (encoder and decoder too)
MAIN=$CHECKOUT/.venv/bin
[ -x $MAIN/revanon-rt ] || { echo "make the main venv first (the README's install line)" >&2; exit 2; }
mkdir -p $FLOORS
[ -x $FLOORS/uv/bin/uv ] || { python3 -m venv $FLOORS/uv && $FLOORS/uv/bin/pip install -q uv; } || exit 2
UV=$FLOORS/uv/bin/uv

must() { "$@" > $FLOORS/step.log 2>&1 || { echo "failed: $*"; tail -5 $FLOORS/step.log; exit 1; }; }
compare() {  # compare A B: the largest per-pixel difference (0-255) of two PNGs
  $MAIN/python -c "import sys, numpy as np; from PIL import Image; a, b = (np.asarray(Image.open(p), np.int16) for p in sys.argv[1:]); print(int(abs(a - b).max()))" "$@"
}
versions() { $UV pip list --python $1 2>/dev/null | awk 'tolower($1) ~ /^(numpy|pillow|typer|click|rich|onnxruntime)$/ {printf "%s %s, ", $1, $2}' | sed 's/, $//'; }

# The main venv builds each engine, and anonymizes and recovers a drawn face with it.
REF=$FLOORS/reference
rm -rf $REF && mkdir -p $REF
must $MAIN/python -c "
import sys; from PIL import Image; from revanon_rt.demo import synthetic_face
face, mask = synthetic_face(64, seed=3)
Image.fromarray(face).save('$REF/face.png'); Image.fromarray(mask).save('$REF/mask.png')"
must $MAIN/revanon-rt keygen $REF/k.key
for model in $MODELS; do
  must $MAIN/revanon-rt build --model models/$model --out $REF/$model/engine
  must $MAIN/revanon-rt run anonymize $REF/face.png --engine $REF/$model/engine --mask $REF/mask.png --key $REF/k.key --out $REF/$model/anon
  must $MAIN/revanon-rt run deanonymize $REF/$model/anon --engine $REF/$model/engine --key $REF/k.key --out $REF/$model/recovered
done

results=$CHECKOUT/bench/results/dependency-floors.md
{
  echo "# The edge install at its dependency floors"
  echo
  echo "\`bash bench/dependency_floors.sh\`, $(date -u +%Y-%m-%d), on this 2-core x86-64 CPU: \`uv pip install --resolution lowest-direct\` of the checkout with no extras, per Python. The engines are the demo models exported by the main venv (Python 3.11; $(versions $MAIN/python)). Each anonymization draws its own nonce, so two builds' anonymized images differ; their recoveries of one image must agree. Max diff: the largest per-pixel difference (0–255) between the two builds' recoveries."
  echo
  echo "| Python | versions resolved | engine | torch imported | --help, keygen, run, info | main venv recovers its image (max diff) | it recovers the main venv's image (max diff) |"
  echo "|---|---|---|---|---|---|---|"
} > $results
failures=0
for python in $PYTHONS; do
  version=$($python -c 'import platform; print(platform.python_version())')
  venv=$FLOORS/py$version
  rm -rf $venv
  echo "== Python $version"
  if ! { $UV venv -q -p $python $venv && $UV pip install -q --python $venv/bin/python --resolution lowest-direct \
      --only-binary numpy --only-binary onnxruntime --only-binary pillow $CHECKOUT; } > $FLOORS/install.log 2>&1; then
    cat $FLOORS/install.log; echo "| $version | install failed | | | | | |" >> $results; failures=$((failures + 1)); continue
  fi
  help_ok=yes
  for command in "" keygen build verify run "run anonymize" "run deanonymize" info demo train eval eval-merge; do
    $venv/bin/revanon-rt $command --help > /dev/null 2> $FLOORS/help.err || { echo "--help of '$command' failed:"; tail -3 $FLOORS/help.err; help_ok=no; }
  done
  for model in $MODELS; do
    engine=$REF/$model/engine; work=$FLOORS/work-$version-$model
    rm -rf $work && mkdir -p $work && cd $work
    ok=$help_ok
    steps=(
      "$venv/bin/revanon-rt keygen k.key"
      "$venv/bin/revanon-rt run anonymize $REF/face.png --engine $engine --mask $REF/mask.png --key $REF/k.key --out anon"
      "$venv/bin/revanon-rt run deanonymize anon --engine $engine --key $REF/k.key --out recovered"
      "$venv/bin/revanon-rt info anon/face.png"
      # -X importtime lists every module the run imports: an edge run must not import torch.
      "$venv/bin/python -X importtime -m revanon_rt run deanonymize $REF/$model/anon --engine $engine --key $REF/k.key --out recovered-main"
    )
    for step in "${steps[@]}"; do
      $step > step.log 2>&1 || { echo "failed: $step"; tail -5 step.log; ok=no; }
    done
    torch=$(grep -qE '\| +torch$' step.log && echo yes || echo no)
    $MAIN/revanon-rt run deanonymize anon --engine $engine --key $REF/k.key --out recovered-by-main > step.log 2>&1 \
      || { echo "the main venv failed to recover this venv's image"; tail -5 step.log; ok=no; }
    by_main=$( [ -f recovered-by-main/face.png ] && compare recovered-by-main/face.png recovered/face.png || echo "-")
    of_main=$( [ -f recovered-main/face.png ] && compare recovered-main/face.png $REF/$model/recovered/face.png || echo "-")
    echo "| $version | $(versions $venv/bin/python) | $model | $torch | $ok | $by_main | $of_main |" >> $results
    [ $ok = yes ] && [ $torch = no ] || failures=$((failures + 1))
    cd $CHECKOUT
  done
done
cat $results
exit $((failures > 0))
