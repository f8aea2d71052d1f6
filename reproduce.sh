#!/usr/bin/env bash
# reproduce.sh: the map from each table of the paper to the command that produces it.
#
#   bash reproduce.sh --quick                 every table below, tiny, on generated textures, on a CPU
#   bash reproduce.sh MVTEC_ROOT [VISA_ROOT]  the paper's runs: preset paper, 2000 epochs, 128^2,
#                                             class-conditional, K = T = 10, min aggregator (GPU)
#
# Tables land in $OUT (default repro/): OUT/<table>/table.md for a plain `test` (per category),
# OUT/<table>/sweep.md for an ablation (a row per setting, mean over categories, images/s).
# --quick: measured 103 s on 2 AMD EPYC cores shared with another job (torch 2.13 CPU); the
# quick times below are from that run, each including ~4 s of Python start-up. Paper-scale times
# were not measured here; the scoring ones follow the paper's Table 6 (3.87 images/s at
# K = T = 10 on its GPU, i.e. ~7.5 min per MVTec-AD test pass of 1725 images).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-repro}
PY=${PYTHON:-python3}  # the interpreter that runs every step (the tests pass their own)
FM=("$PY" flow_mismatch.py)
names() { "$PY" -c "import flow_mismatch as fm; print(','.join(fm.$1))"; }  # a choice's values as the file names them

if [[ "${1:-}" == "--quick" ]]; then
  # Generated data: two textures (weave, grid) with scratches and stains, 32^2, 32 normal
  # training images and 16 test images per category; `tiny` preset, 20 epochs (160 steps), K = T = 3.
  # --calib-fraction 0: as in the paper, every training image trains (the CPU recipe would hold out 0.2).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny tensors: one thread, no slow-down when the CPU is shared
  rm -rf "$OUT"
  mkdir -p "$OUT"
  "$PY" -c "import flow_mismatch as fm, pathlib; fm.make_demo_dataset(pathlib.Path('$OUT/data/demo'), size=32, n_train=32, n_test=8)"
  DATA=("$OUT/data/demo")
  NAMES=(demo)
  TRAIN=(--preset tiny --image-size 32 --epochs 20 --batch-size 8 --calib-fraction 0 --device cpu)
  EPOCHS=5,10,20
  SCORE=(-K 3 -T 3 --ode-steps 3 --device cpu --no-overlays)
  GRID=(--grid-K 1,2,3 --grid-T 1,2,3)
else
  DATA=("${1:?usage: reproduce.sh --quick | reproduce.sh MVTEC_ROOT [VISA_ROOT]}" ${2:+"$2"})
  NAMES=(mvtec visa)
  TRAIN=(--preset paper)  # TrainConfig defaults: 2000 epochs, 128^2, batch 32, StableAdamW (App. C.2)
  EPOCHS=100,200,300,400,500,600,700,800,900,1000,1100,1200,1300,1400,1500,1600,1700,1800,1900,2000
  SCORE=(-K 10 -T 10)
  GRID=()
fi
MVTEC=${DATA[0]}  # MVTec-AD, or the generated data with --quick
RUNS=$OUT/runs

# Training (Eq. 1). One class-conditional model per dataset (§5.1), keeping the snapshots of
# Table 9, and one pooled unconditional model (Table 8). quick: ~20 s each; paper: 2000 epochs, not measured here.
for i in "${!DATA[@]}"; do
  run=$RUNS/${NAMES[$i]}
  [[ -f $run/ckpt.pt ]] || "${FM[@]}" train --data "${DATA[$i]}" --out "$run" "${TRAIN[@]}" --save-epochs "$EPOCHS"
  [[ -f $run-pooled/ckpt.pt ]] || "${FM[@]}" train --data "${DATA[$i]}" --out "$run-pooled" --pooled "${TRAIN[@]}"
done

# Table 1 (and the "Ours" columns of Tables 4, 5): the seven metrics per category, then beside
# the paper's numbers. quick: ~8 s; paper: ~7.5 min for MVTec-AD.
for i in "${!DATA[@]}"; do
  "${FM[@]}" test --ckpt "$RUNS/${NAMES[$i]}/ckpt.pt" --data "${DATA[$i]}" --out "$OUT/table1/${NAMES[$i]}" "${SCORE[@]}"
  "${FM[@]}" compare "$OUT/table1/${NAMES[$i]}/metrics.json" --dataset "${NAMES[$i]/demo/mvtec}"
done

# Table 2 (inference-only rows): Flow Mismatching vs ReconFlow (App. C.2, t0 = 0.5, 10 Euler
# steps) vs a RADAR-style one-step scorer, on the same model. quick: ~7 s.
"${FM[@]}" test --ckpt "$RUNS/${NAMES[0]}/ckpt.pt" --data "$MVTEC" --out "$OUT/table2" "${SCORE[@]}" \
  --scores "$(names SCORERS)"

# Table 6: test-time compute, K x T. quick: the full 3 x 3 grid, ~9 s. paper: the three slices
# of the table (K = 5 with T = 2..20, T = 5 with K = 2..20, K = T = 2..20), hours in all.
if [[ ${#GRID[@]} -gt 0 ]]; then
  "${FM[@]}" test --ckpt "$RUNS/${NAMES[0]}/ckpt.pt" --data "$MVTEC" --out "$OUT/table6" "${SCORE[@]}" "${GRID[@]}"
else
  EVEN=2,4,6,8,10,12,14,16,18,20
  "${FM[@]}" test --ckpt "$RUNS/mvtec/ckpt.pt" --data "$MVTEC" --out "$OUT/table6/fix-K" --grid-K 5 --grid-T $EVEN
  "${FM[@]}" test --ckpt "$RUNS/mvtec/ckpt.pt" --data "$MVTEC" --out "$OUT/table6/fix-T" --grid-K $EVEN --grid-T 5
  for n in ${EVEN//,/ }; do
    "${FM[@]}" test --ckpt "$RUNS/mvtec/ckpt.pt" --data "$MVTEC" --out "$OUT/table6/joint-$n" --grid-K "$n" --grid-T "$n"
  done
fi

# Table 7: path aggregator, per dataset, with K = 10 paths as in the paper (quantile:ALPHA keeps
# the ceil(ALPHA K)-th smallest path). quick: ~25 s each.
for i in "${!DATA[@]}"; do
  "${FM[@]}" test --ckpt "$RUNS/${NAMES[$i]}/ckpt.pt" --data "${DATA[$i]}" --out "$OUT/table7/${NAMES[$i]}" \
    "${SCORE[@]}" -K 10 --aggregators mean,quantile:0.3,quantile:0.2,quantile:0.1,min
done

# Table 8: pooled unconditional vs class-conditional model, per dataset (per-category rows are
# in sweep.json). quick: ~7 s each.
for i in "${!DATA[@]}"; do
  "${FM[@]}" test --ckpt "$RUNS/${NAMES[$i]}-pooled/ckpt.pt" --ckpt "$RUNS/${NAMES[$i]}/ckpt.pt" \
    --data "${DATA[$i]}" --out "$OUT/table8/${NAMES[$i]}" "${SCORE[@]}"
done

# Table 9: metrics against training epochs, the snapshots ckpt_epochE.pt. quick: ~8 s.
CKPTS=()
for e in ${EPOCHS//,/ }; do CKPTS+=(--ckpt "$RUNS/${NAMES[0]}/ckpt_epoch$e.pt"); done
"${FM[@]}" test "${CKPTS[@]}" --data "$MVTEC" --out "$OUT/table9" "${SCORE[@]}"

# Time weighting w(t) of Eq. (4), every one in WEIGHTS: 1, t, t^2 (default, Prop. 4.4), t^2 / (1 - t)^2. quick: ~9 s.
"${FM[@]}" test --ckpt "$RUNS/${NAMES[0]}/ckpt.pt" --data "$MVTEC" --out "$OUT/weights" "${SCORE[@]}" \
  --weights "$(names WEIGHTS)"

echo "reproduce.sh: tables under $OUT/"
