#!/usr/bin/env bash
# The CPU training of the CIFAR-10 ResNet-20 pair (CSG, then its STD twin), one thread, resumable.
# The default recipe is 200 epochs with cutout 16 since that pair (EPOCHS=200 TAG=cutout16, shipped)
# beat the earlier ones by its rule (README "CIFAR-10"); the untagged folders hold the first pair,
# 100 epochs without cutout (rerunning them now would train the default recipe instead).
# Interrupt it at any point and rerun: each model continues from its last epoch (--resume).
# The unfinished run is committed under benchmarks/cpu-runs/ so it survives the machine.
#   OMP_NUM_THREADS=1 bash benchmarks/cpu_cifar.sh [CIFAR_ROOT]     (default ../shared/data/cifar10-jpeg)
#   EPOCHS=200 KINDS=csg bash benchmarks/cpu_cifar.sh             (a longer schedule: ...-csg-e200)
#   TAG=cutout16 EXTRA="--cutout 16" KINDS=csg bash benchmarks/cpu_cifar.sh   (a recipe variant: ...-csg-cutout16)
#   SWA=30 TAG=cutout16 EPOCHS=200 KINDS=csg bash benchmarks/cpu_cifar.sh
#       (weight averaging: 30 more epochs on top of the finished run, into ...-csg-e200-cutout16-swa30)
#   SWA=30 SWA_LR=0.1 TAG=cutout16 EPOCHS=200 KINDS=csg bash benchmarks/cpu_cifar.sh   (into ...-swa30-lr0.1)
#   KD=benchmarks/cifar10-teachers.txt SWA=30 SWA_LR=0.1 TAG=cutout16 EPOCHS=200 KINDS=csg bash benchmarks/cpu_cifar.sh
#       (the averaging epochs distil the runs listed in that file, one per line: into ...-swa30-lr0.1-kd14)
#   KD=benchmarks/cifar10-teachers.txt EPOCHS=200 KINDS=csg bash benchmarks/cpu_cifar.sh
#       (the default recipe, 200 + 30 epochs, distilling those runs from the first epoch: ...-csg-e200-kd14)
#   EXTRA=--compile ... bash benchmarks/cpu_cifar.sh
#       (torch.compile the training step: how a run is stepped, not what it learns, so a resumed run
#       may add or drop it; 1.1-1.28x per step on an AVX2 host, benchmarks/results/train-speed-compile-avx2.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10-jpeg}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
EPOCHS=${EPOCHS:-}
TAG=${TAG:-}
for kind in ${KINDS:-csg std}; do
  out=benchmarks/cpu-runs/cifar10-resnet20-$kind${EPOCHS:+-e$EPOCHS}${TAG:+-$TAG}
  flag=$([ $kind = std ] && echo --no-gate || echo --gate)
  if [ -n "${SWA:-}" ]; then
    base=$out out=$out-swa$SWA${SWA_LR:+-lr$SWA_LR}
    teach=()
    if [ -n "${KD:-}" ]; then
      while read -r t; do [ -n "$t" ] && teach+=(--teacher "$t"); done < "$KD"
      out=$out-kd$(( ${#teach[@]} / 2 ))
    fi
    [ -f $out/summary.json ] && continue
    res=$([ -f $out/checkpoint.safetensors ] && echo --resume || true)
    .venv/bin/csgguard train --extend $base --swa-epochs $SWA ${SWA_LR:+--swa-lr $SWA_LR} "${teach[@]}" --data-root "$DATA" --out $out $res \
      --format json --no-progress
    continue
  fi
  teach=()
  if [ -n "${KD:-}" ]; then  # distil from the first epoch on (the teachers' targets are kept in the checkpoint)
    while read -r t; do [ -n "$t" ] && teach+=(--teacher "$t"); done < "$KD"
    out=$out-kd$(( ${#teach[@]} / 2 ))
  fi
  [ -f $out/summary.json ] && continue
  res=$([ -f $out/checkpoint.safetensors ] && echo --resume || true)
  .venv/bin/csgguard train --data cifar10 --data-root "$DATA" $flag --out $out $res ${EPOCHS:+--epochs $EPOCHS} \
    "${teach[@]}" ${EXTRA:-} --format json --no-progress
done
