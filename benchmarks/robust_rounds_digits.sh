#!/usr/bin/env bash
# csg-robust's adaptive rounds (3, the default, against 6 and 10) on the three digits pairs of
# benchmarks/robust_seeds_digits.sh: PGD and C&W at Linf 0.1 and the adaptive PGD 0.1 aimed at each
# detector, into OUT/rounds-sS.json (OUT default runs/seeds). The rule that reads it: docs/adaptive.md,
# "More adaptive rounds"; its script: benchmarks/robust_rounds_rule.py.
#   OMP_NUM_THREADS=1 bash benchmarks/robust_rounds_digits.sh
NAME=rounds exec bash "$(dirname "$0")/robust_seeds_digits.sh" --attacks pgd,cw --eps 0.1 \
  --detectors csg-clean,csg-robust,robust-r6,robust-r10 \
  --detector-params '{"robust-r6": {"detector": "csg-robust", "rounds": 6}, "robust-r10": {"detector": "csg-robust", "rounds": 10}}'
