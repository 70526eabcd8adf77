#!/usr/bin/env bash
# csg-robust's adaptive rounds (3, the default, against 6 and 10) on the three digits pairs of
# benchmarks/robust_seeds_digits.sh (trained there if absent): PGD and C&W at Linf 0.1 and the
# adaptive PGD 0.1 aimed at each detector. The rule that reads it: docs/adaptive.md, "More adaptive rounds".
#   OMP_NUM_THREADS=1 bash benchmarks/robust_rounds_digits.sh [OUT]   (default runs/seeds)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/seeds}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for s in 0 1 2; do
  for kind in csg std; do
    run=$OUT/digits-$kind-s$s
    [ -f $run/model.json ] || .venv/bin/csgguard train --seed $s $([ $kind = std ] && echo --no-gate) \
      --out $run --no-progress --format json > /dev/null
  done
  .venv/bin/python benchmarks/detection_sweep.py --run $OUT/digits-csg-s$s --compare-run $OUT/digits-std-s$s \
    --attacks pgd,cw --eps 0.1 --detectors csg-clean,csg-robust,robust-r6,robust-r10 \
    --detector-params '{"robust-r6": {"detector": "csg-robust", "rounds": 6}, "robust-r10": {"detector": "csg-robust", "rounds": 10}}' \
    --adaptive-targets all --json $OUT/rounds-s$s.json --out $OUT/rounds-s$s
done
