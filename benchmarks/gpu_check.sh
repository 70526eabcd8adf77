#!/usr/bin/env bash
# The one prepared GPU check (issue 6): CIFAR-10 ResNet-20 CSG + STD (~30 epochs each,
# bf16, channels-last, batch 256) and benchmarks/speed.py on CUDA; results land in $OUT.
#
# Run from the repository root on a machine with one CUDA GPU. Needs, carried beside
# the working tree (both git-ignored; see docs/scaling.md):
#   .whl/                  foolbox, eagerpy, GitPython, gitdb, smmap (foolbox and its dependencies),
#                          as wheels (the GPU image has torch, sklearn, click, rich ...)
#   .data/cifar10-jpeg/    train.tar.gz + test.tar.gz (the shared JPEG q75 copy)
# Whole run budget: well inside 8 minutes on an H100; every step has its own timeout.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CSGGUARD_NO_PROGRESS=1 CSGGUARD_CACHE=/tmp/csgguard-cache
PY=${PYTHON:-python3}
DATA=${CIFAR_ROOT:-.data/cifar10-jpeg}
EPOCHS=${EPOCHS:-30}
DEVICE=${DEVICE:-cuda}          # DEVICE=cpu + the two knobs below give a CPU dry run of this script
CIFAR_EXTRA=${CIFAR_EXTRA:-}    # e.g. "--train-limit 500 --warmup 0 --period 2 --csg-from 1"
SPEED_EXTRA=${SPEED_EXTRA:-}    # e.g. "--quick"
start=$(date +%s)

# 1. dependencies the image lacks, and csgguard itself (attacks/ and detectors/ are
#    sub-packages csgguard.attacks / csgguard.detectors: assemble them without a build)
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r csgguard /tmp/pkg/ && cp -r attacks /tmp/pkg/csgguard/attacks \
  && cp -r detectors /tmp/pkg/csgguard/detectors || exit 1
export PYTHONPATH=/tmp/pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  $PY -c "import torch, foolbox, csgguard, csgguard.attacks, csgguard.detectors; print('torch', torch.__version__, \
'| cuda', torch.version.cuda, '|', torch.cuda.is_available() and torch.cuda.get_device_name(), \
'| foolbox', foolbox.__version__, '| csgguard', csgguard.__file__)" || exit 1
  nproc; free -g | head -2
} 2>&1 | tee "$OUT/gpu.txt"

# 2. the recipe: CSG then STD, same settings (the first load decodes the JPEGs once)
timeout 330 $PY benchmarks/cifar_resnet20.py --device "$DEVICE" --data-root "$DATA" --epochs "$EPOCHS" \
  --batch-size 256 --lr 0.1 $CIFAR_EXTRA --out /tmp/runs/cifar_resnet20 --json "$OUT/cifar_resnet20.json" \
  2>&1 | tee "$OUT/cifar_resnet20.log"
echo "cifar_resnet20 rc=$? after $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"

# 3. speed figures on CUDA: CIFAR-10 (ResNet-20) and digits (the CPU table's dataset)
timeout 100 $PY benchmarks/speed.py --device "$DEVICE" --data cifar10 --data-root "$DATA" $SPEED_EXTRA \
  --json "$OUT/speed_cuda_cifar10.json" 2>&1 | tee "$OUT/speed_cuda_cifar10.log"
echo "speed cifar10 rc=$? after $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
timeout 45 $PY benchmarks/speed.py --device "$DEVICE" --data digits $SPEED_EXTRA --json "$OUT/speed_cuda_digits.json" \
  2>&1 | tee "$OUT/speed_cuda_digits.log"
echo "speed digits rc=$? after $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
