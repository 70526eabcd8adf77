#!/usr/bin/env bash
# The one prepared GPU check: the CIFAR-10 ResNet-20 recipe (`csgguard train --data cifar10`,
# cosine, bf16, channels-last) for EPOCHS epochs (default 40, no weight averaging: the default
# recipe's 200 + 30 epochs side by side take about 1,150 s on an H100, past one call's limit), CSG
# and STD trained side by side on the one GPU, then benchmarks/speed.py on CUDA. VARIANTS adds
# recipe variants trained at the same time, each "tag:kind:extra train options" separated by ';'
# (e.g. "ls:csg:--label-smoothing 0.1;ls:std:--label-smoothing 0.1"): a ResNet-20 leaves the card
# mostly idle, so a few more runs cost little wall time. Results land in $OUT: gpu.txt, the speed
# figures, and cifar_runs.tar (every run directory with its train_*.json / train_*.log).
#
# Run from the repository root on a machine with one CUDA GPU. Needs, carried beside
# the working tree (both git-ignored; see docs/scaling.md):
#   .whl/                  foolbox, eagerpy, GitPython, gitdb, smmap (foolbox and its dependencies),
#                          as wheels (the GPU image has torch, sklearn, click, rich ...)
#   .data/cifar10-jpeg/    train.tar.gz + test.tar.gz (the shared JPEG q75 copy)
# Whole run budget: about 8 minutes on an H100; every step has its own timeout.
# SCREEN_ONLY=1 instead measures only `csgguard screen --compile` (the detector's overhead with the
# screening pass compiled, modes default and reduce-overhead): 5-8 minutes.
#
# RESUME=FOLDER instead continues one checkpointed run (e.g. a CPU run under benchmarks/cpu-runs/)
# on the GPU: the speed figures first, then `csgguard train --resume` until DEADLINE seconds after
# the start (default 540); the run folder comes back as resumed_run.tar, finished (model.safetensors,
# summary.json) or with its checkpoint at the last whole epoch, for the CPU to finish with --resume.
# A second RESUME call on a machine still warm from the first goes on from the first one's checkpoint.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CSGGUARD_NO_PROGRESS=1 CSGGUARD_CACHE=/tmp/csgguard-cache
PY=${PYTHON:-python3}
DATA=${CIFAR_ROOT:-.data/cifar10-jpeg}
DEVICE=${DEVICE:-cuda}          # DEVICE=cpu + TRAIN_EXTRA give a CPU dry run of this script
EPOCHS=${EPOCHS:-40}
SWA_EPOCHS=${SWA_EPOCHS:-0}
VARIANTS=${VARIANTS:-}
TRAIN_EXTRA=${TRAIN_EXTRA:-}    # e.g. "--train-limit 500" (EPOCHS=2 for a dry run)
SPEED_EXTRA=${SPEED_EXTRA:-}    # e.g. "--quick"
RUNS=/tmp/runs
RESUME=${RESUME:-}
DEADLINE=${DEADLINE:-540}
start=$(date +%s)

# 1. dependencies the image lacks, and csgguard itself (attacks/ and detectors/ are
#    sub-packages csgguard.attacks / csgguard.detectors: assemble them without a build)
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r csgguard /tmp/pkg/ && cp -r attacks /tmp/pkg/csgguard/attacks \
  && cp -r detectors /tmp/pkg/csgguard/detectors || exit 1
# -P below: the checkout's own csgguard/ (no attacks/ inside) must not shadow the assembled one
export PYTHONPATH=/tmp/pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  $PY -P -c "import torch, foolbox, csgguard, csgguard.attacks, csgguard.detectors; print('torch', torch.__version__, \
'| cuda', torch.version.cuda, '|', torch.cuda.is_available() and torch.cuda.get_device_name(), \
'| foolbox', foolbox.__version__, '| csgguard', csgguard.__file__)" || exit 1
  nproc; free -g | head -2
  # decode the JPEG tarballs once into the cache, so the two trainings below only read it
  $PY -P -c "from csgguard import load_dataset; d = load_dataset('cifar10', '$DATA'); print('cifar10', len(d.train), len(d.val), len(d.test))"
} 2>&1 | tee "$OUT/gpu.txt"

# the detector's overhead with the screening pass compiled (`csgguard screen --compile`), on the
# shipped CIFAR-10 CSG run, once per torch.compile mode given (reduce-overhead adds CUDA graphs)
screen_compile() {
  for mode in "$@"; do
    timeout ${SCREEN_TIMEOUT:-200} $PY benchmarks/screen_speed.py --device "$DEVICE" \
      --run csgguard/pretrained/cifar10-resnet20-csg --data-root "$DATA" --n ${SCREEN_N:-8192} --batch-size 256 \
      --compile --compile-mode $mode --skip-end-to-end > "$OUT/screen_compile_$mode.log" 2>&1
    echo "screen --compile ($mode) rc=$? after $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
    grep -E "overhead|compiled|compiling" "$OUT/screen_compile_$mode.log" | tee -a "$OUT/gpu.txt"
  done
}

# SCREEN_ONLY=1: only the compiled-screening figures (both modes), a call of 5-8 minutes
if [ -n "${SCREEN_ONLY:-}" ]; then
  screen_compile default reduce-overhead
  exit 0
fi

speed() {
  timeout 100 $PY benchmarks/speed.py --device "$DEVICE" --data cifar10 --data-root "$DATA" $SPEED_EXTRA \
    --json "$OUT/speed_cuda_cifar10.json" > "$OUT/speed_cuda_cifar10.log" 2>&1
  echo "speed cifar10 rc=$? after $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
}

if [ -n "$RESUME" ]; then
  [ -f "$RESUME/checkpoint.safetensors" ] || { echo "$RESUME: no checkpoint.safetensors to resume" | tee -a "$OUT/gpu.txt"; exit 1; }
  [ -n "${SKIP_SPEED:-}" ] || speed
  name=$(basename "$RESUME")
  epochs_in() {  # how many epochs a checkpoint holds (0 if none)
    $PY -c "import sys; from csgguard.train import checkpoint_epochs; print(checkpoint_epochs(sys.argv[1]))" "$1"
  }
  # a second call on a still-warm machine goes on from where the first one stopped
  if [ "$(epochs_in "$RUNS/$name")" -le "$(epochs_in "$RESUME")" ]; then
    mkdir -p $RUNS && rm -rf "$RUNS/$name" && cp -r "$RESUME" "$RUNS/$name"
  fi
  rm -f "$RUNS/$name/.csgguard.lock"
  left=$(( DEADLINE - ($(date +%s) - start) ))
  echo "resuming $name at epoch $(epochs_in "$RUNS/$name") for at most $left s" | tee -a "$OUT/gpu.txt"
  # the newest checkpoint is copied into $OUT as it comes, so it returns even if the call is cut short
  ( while sleep 10; do cp "$RUNS/$name/checkpoint.safetensors" "$OUT/ckpt.partial" 2>/dev/null \
      && mv "$OUT/ckpt.partial" "$OUT/checkpoint.safetensors"; done ) &
  watcher=$!
  # the run's own settings come from its checkpoint; only where it trains changes
  timeout $left $PY -P -m csgguard train --resume --out "$RUNS/$name" --data-root "$DATA" --device "$DEVICE" \
    --format json --no-progress > "$RUNS/train_$name.json" 2> "$RUNS/train_$name.log"
  echo "$name rc=$? after $(( $(date +%s) - start )) s, at epoch $(epochs_in "$RUNS/$name") (124: stopped at the deadline, checkpoint kept)" | tee -a "$OUT/gpu.txt"
  kill $watcher 2>/dev/null; wait $watcher 2>/dev/null; rm -f "$OUT/ckpt.partial"
  rm -f "$RUNS/$name/.csgguard.lock" "$RUNS/$name"/.*.tmp
  tar -C $RUNS -cf "$OUT/resumed_run.tar" "$name" "train_$name.json" "train_$name.log" 2>&1 | tee -a "$OUT/gpu.txt"
  exit 0
fi

# 2. the shipped recipe, CSG and STD side by side (one small network leaves the GPU mostly idle),
#    and the VARIANTS beside them
mkdir -p $RUNS
train() {  # tag kind extra...
  local tag=$1 kind=$2; shift 2
  local name=cifar10-resnet20-$kind${tag:+-$tag}
  local flag=$([ $kind = std ] && echo --no-gate || echo --gate)
  timeout ${TRAIN_TIMEOUT:-400} $PY -P -m csgguard train --data cifar10 --data-root "$DATA" --device "$DEVICE" $flag \
    --epochs $EPOCHS --swa-epochs $SWA_EPOCHS $TRAIN_EXTRA "$@" --out $RUNS/$name --format json --no-progress \
    > "$RUNS/train_$name.json" 2> "$RUNS/train_$name.log"
  echo "$name rc=$? after $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
}
for kind in csg std; do train "" $kind & done
IFS=';' read -ra variants <<< "$VARIANTS"
for v in "${variants[@]}"; do
  IFS=':' read -r tag kind extra <<< "$v"
  train "$tag" "$kind" $extra &
done
wait
echo "training done after $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
tar -C $RUNS -cf "$OUT/cifar_runs.tar" . 2>&1 | tee -a "$OUT/gpu.txt"

# 3. speed figures on CUDA (CIFAR-10 ResNet-20); SKIP_SPEED=1 leaves them out (a second, shorter call)
[ -n "${SKIP_SPEED:-}" ] && exit 0
speed

# 4. the detector's overhead with the screening pass compiled (`csgguard screen --compile`): see
#    screen_compile above; a full call leaves it out unless SCREEN_COMPILE_MODES names modes
screen_compile ${SCREEN_COMPILE_MODES-}
