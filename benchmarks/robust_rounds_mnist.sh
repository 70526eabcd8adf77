#!/usr/bin/env bash
# The MNIST confirmation of docs/adaptive.md "More adaptive rounds": csg-robust at its default 3
# rounds against ROUNDS (the value chosen on digits), on the MNIST pair (trained here if absent),
# 1,500 test images, PGD and C&W at Linf 0.1 and the adaptive PGD 0.1 aimed at each detector.
#   ROUNDS=10 OMP_NUM_THREADS=1 bash benchmarks/robust_rounds_mnist.sh [MNIST_ROOT] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/mnist}
OUT=${2:-runs/seeds}
R=${ROUNDS:?set ROUNDS to the value chosen on digits}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for kind in csg std; do
  run=$OUT/mnist-$kind
  [ -f $run/model.json ] || .venv/bin/csgguard train --data mnist --data-root "$DATA" \
    $([ $kind = std ] && echo --no-gate) --out $run --no-progress --format json > /dev/null
done
.venv/bin/python benchmarks/detection_sweep.py --run $OUT/mnist-csg --compare-run $OUT/mnist-std \
  --data-root "$DATA" --limit 1500 --attacks pgd,cw --eps 0.1 --detectors csg-clean,csg-robust,robust-r$R \
  --detector-params "{\"robust-r$R\": {\"detector\": \"csg-robust\", \"rounds\": $R}}" \
  --adaptive-targets all --json $OUT/rounds-mnist.json --out $OUT/rounds-mnist
