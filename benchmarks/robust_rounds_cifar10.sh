#!/usr/bin/env bash
# The CIFAR-10 check of docs/adaptive.md "More adaptive rounds": csg-robust at its default 3 rounds
# against ROUNDS on the shipped CIFAR-10 CSG model, 1,500 test images: PGD 2/255 and 8/255, C&W, and
# the adaptive PGD 2/255 aimed at each csg-robust. Several hours of one thread (each csg-robust fit
# attacks the fit images once per round).
#   ROUNDS=10 OMP_NUM_THREADS=1 bash benchmarks/robust_rounds_cifar10.sh [CIFAR_ROOT] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10-jpeg}
OUT=${2:-runs/seeds}
R=${ROUNDS:?set ROUNDS to the value chosen on digits}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python benchmarks/detection_sweep.py --run csgguard/pretrained/cifar10-resnet20-csg \
  --data-root "$DATA" --limit 1500 --attacks pgd,cw --eps 2/255,8/255 --adaptive-eps 2/255 \
  --detectors csg-clean,csg-robust,robust-r$R \
  --detector-params "{\"robust-r$R\": {\"detector\": \"csg-robust\", \"rounds\": $R}}" \
  --adaptive-targets csg-robust,robust-r$R --json $OUT/rounds-cifar10.json --out $OUT/rounds-cifar10
