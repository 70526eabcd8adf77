#!/usr/bin/env bash
# The CPU training of the CIFAR-10 ResNet-20 pair (CSG, then its STD twin), one thread, resumable.
# Interrupt it at any point and rerun: each model continues from its last epoch (--resume).
# The unfinished CSG run is committed under benchmarks/cpu-runs/ so it survives the machine.
#   OMP_NUM_THREADS=1 bash benchmarks/cpu_cifar.sh [CIFAR_ROOT]     (default ../shared/data/cifar10-jpeg)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10-jpeg}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for kind in csg std; do
  out=benchmarks/cpu-runs/cifar10-resnet20-$kind
  flag=$([ $kind = std ] && echo --no-gate || echo --gate)
  [ -f $out/summary.json ] && continue
  res=$([ -f $out/checkpoint.safetensors ] && echo --resume || true)
  .venv/bin/csgguard train --data cifar10 --data-root "$DATA" $flag --out $out $res --format json --no-progress
done
