#!/usr/bin/env bash
# The one prepared GPU check: the CIFAR-10 ResNet-20 recipe (`csgguard train --data cifar10`,
# cosine, bf16, channels-last) for EPOCHS epochs (default 40: the default recipe's 200 epochs
# side by side take about 1,000 s on an H100, past one call's limit), CSG and STD trained side by side on the
# one GPU, then benchmarks/speed.py on CUDA. Results land in $OUT; the two run directories
# come back as $OUT/cifar_runs.tar.
#
# Run from the repository root on a machine with one CUDA GPU. Needs, carried beside
# the working tree (both git-ignored; see docs/scaling.md):
#   .whl/                  foolbox, eagerpy, GitPython, gitdb, smmap (foolbox and its dependencies),
#                          as wheels (the GPU image has torch, sklearn, click, rich ...)
#   .data/cifar10-jpeg/    train.tar.gz + test.tar.gz (the shared JPEG q75 copy)
# Whole run budget: about 8 minutes on an H100; every step has its own timeout.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CSGGUARD_NO_PROGRESS=1 CSGGUARD_CACHE=/tmp/csgguard-cache
PY=${PYTHON:-python3}
DATA=${CIFAR_ROOT:-.data/cifar10-jpeg}
DEVICE=${DEVICE:-cuda}          # DEVICE=cpu + TRAIN_EXTRA give a CPU dry run of this script
EPOCHS=${EPOCHS:-40}
TRAIN_EXTRA=${TRAIN_EXTRA:-}    # e.g. "--train-limit 500" (EPOCHS=2 for a dry run)
SPEED_EXTRA=${SPEED_EXTRA:-}    # e.g. "--quick"
RUNS=/tmp/runs
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

# 2. the shipped recipe, CSG and STD side by side (one small network leaves the GPU mostly idle)
for kind in csg std; do
  flag=$([ $kind = std ] && echo --no-gate || echo --gate)
  timeout 400 $PY -P -m csgguard train --data cifar10 --data-root "$DATA" --device "$DEVICE" $flag --epochs $EPOCHS $TRAIN_EXTRA \
    --out $RUNS/cifar10-resnet20-$kind --format json --no-progress > "$OUT/train_$kind.json" 2> "$OUT/train_$kind.log" &
done
wait
echo "training done after $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
tar -C $RUNS -cf "$OUT/cifar_runs.tar" . 2>&1 | tee -a "$OUT/gpu.txt"

# 3. speed figures on CUDA (CIFAR-10 ResNet-20)
timeout 100 $PY benchmarks/speed.py --device "$DEVICE" --data cifar10 --data-root "$DATA" $SPEED_EXTRA \
  --json "$OUT/speed_cuda_cifar10.json" > "$OUT/speed_cuda_cifar10.log" 2>&1
echo "speed cifar10 rc=$? after $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
