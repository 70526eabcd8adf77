#!/usr/bin/env bash
# The confirmation of docs/detectors.md's seventh question (csg-robust as `csgguard fit`'s default),
# on the CIFAR-10 pair shipped when it runs: both models at once, one thread each, then the rule.
#
#   BRANCH=current bash benchmarks/confirm_robust_default.sh   # the pair shipped when the rule was
#       written: only the cells no earlier run scored with cross-fitted csg-robust are judged
#   BRANCH=new bash benchmarks/confirm_robust_default.sh       # a newly shipped pair: every cell,
#       C&W and DeepFool included
#
# About 80 minutes per model with both running (estimated from the development grid's timings).
# Outputs: runs/confirm-robust/{csg,std}.{md,json,err} and runs/confirm-robust/rule.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BRANCH=${BRANCH:?set BRANCH=current or BRANCH=new}
OUT=runs/confirm-robust
mkdir -p "$OUT"
case "$BRANCH" in
  current) ATTACKS=fgsm,pgd,bim
           CELLS=fgsm@2/255,fgsm@4/255,fgsm@8/255,fgsm@16/255,bim@2/255,bim@4/255,bim@8/255,bim@16/255,pgd@4/255,pgd@16/255 ;;
  new)     ATTACKS=fgsm,pgd,bim,cw,deepfool
           CELLS= ;;
  *) echo "BRANCH must be current or new, got $BRANCH" >&2; exit 2 ;;
esac
for k in csg std; do
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/detection_sweep.py --run "csgguard/pretrained/cifar10-resnet20-$k" \
    --data-root ../shared/data/cifar10-jpeg --limit 3000 --attacks "$ATTACKS" --eps 2/255,4/255,8/255,16/255 \
    --adaptive-eps 2/255 --detectors csg-clean,csg-robust --adaptive-targets all --json "$OUT/$k.json" \
    > "$OUT/$k.md" 2> "$OUT/$k.err" &
done
wait
.venv/bin/python benchmarks/robust_default_rule.py "$OUT/csg.json:natural" "$OUT/std.json:natural" \
  --adaptive-cell adaptive-pgd@2/255 ${CELLS:+--cells "$CELLS"} | tee "$OUT/rule.md"
