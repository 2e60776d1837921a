#!/usr/bin/env bash
# Exit modules on a frozen backbone: one affine module per exit of the embedded default
# (SmolLM2-135M-Instruct, layers 15, 19, 23, 26), trained by self-distillation (KL toward the model's own
# final layer) on the model's own greedy answers to the MIT-licensed alpaca-libre "ok" instructions. The
# backbone is untouched, so the full model's output is identical; the output folder holds 5 MB of modules.
# The held-out split (seed 0, 5%) is the shipped LITE adapter's, so benchmarks/exit_agreement.py compares
# both on the same rows. Resumable: re-run the same command (lite train resumes from $OUT.partial, and the
# own answers are cached there). Every SNAPSHOT_MINUTES of training (default 30) a copy of the modules is kept in
# $OUT.snapshots; at the end all of them are scored on the same held-out rows for the curve of agreement
# against training minutes (benchmarks/results/agreement_curve_$KIND.md).
#   LITE_HOME=/path/outside/the/checkout bash scripts/train_exit_modules.sh
# The long run of the shipped default (affine won the recipe comparison, benchmarks/results/ablation.md),
# as run on 2026-11-30: 10 epochs, a snapshot every 10 minutes, at most 58 minutes of training (the fused loss
# and the state cache make an epoch after the first about 0.43x the step time the comparison ran at: 1.43 s against 3.32):
#   LITE_HOME=... EPOCHS=10 SNAPSHOT_MINUTES=10 MAX_MINUTES=58 OUT=$LITE_HOME/runs/winner-affine \
#       OWN_ANSWERS=$LITE_HOME/own_answers-smollm2-135m-instruct-64tok.jsonl bash scripts/train_exit_modules.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-${LITE_HOME:-$HOME/.cache/lite}/runs}
DATA=${DATA:-../shared/data/train}
KIND=${KIND:-affine}
EPOCHS=${EPOCHS:-1}
ANSWER_TOKENS=${ANSWER_TOKENS:-64}
SNAPSHOT_MINUTES=${SNAPSHOT_MINUTES:-30}
OUT=${OUT:-$RUNS/exit-modules-$KIND}
CACHE=(${OWN_ANSWERS:+--own-answers-cache "$OWN_ANSWERS"})
BUDGET=(${MAX_MINUTES:+--max-minutes "$MAX_MINUTES"})  # optional: end training at this many minutes
export OMP_NUM_THREADS=${THREADS:-2}
LITE=${LITE:-.venv/bin/lite}

if [ ! -d "$OUT" ]; then
    "$LITE" train --model smollm2-135m-instruct \
        --data "$DATA/alpaca_libre_v1.jsonl" "$DATA/alpaca_libre_v3.jsonl" --filter status=ok \
        --out "$OUT" --exit-modules "$KIND" --targets distill --own-answers --own-answer-tokens "$ANSWER_TOKENS" \
        --prompt-format chat --exit-layers 15,19,23,26,30 --epochs "$EPOCHS" --batch-size 8 --max-length 320 \
        --lr 1e-3 --bf16 --save-steps 20 --logging-steps 5 --no-progress-bar \
        --snapshot-minutes "$SNAPSHOT_MINUTES" "${CACHE[@]}" "${BUDGET[@]}"
fi
# agreement with the final layer on held-out rows, beside the shipped default (same rows)
.venv/bin/python benchmarks/exit_agreement.py --model "$OUT" --model smollm2-135m-lite \
    --heldout-from smollm2-135m-lite --limit 40 --threads "$OMP_NUM_THREADS" \
    --out "benchmarks/results/exit_agreement_modules_$KIND.md"
# agreement against training minutes: the untuned model, every snapshot and the finished run, same rows
if [ -d "$OUT.snapshots" ]; then
    SNAPS=()
    for snap in "$OUT".snapshots/step-*; do SNAPS+=(--model "$snap"); done
    .venv/bin/python benchmarks/exit_agreement.py --model smollm2-135m-instruct "${SNAPS[@]}" --model "$OUT" \
        --heldout-from "$OUT" --limit 40 --threads "$OMP_NUM_THREADS" --out "$OUT.snapshots/agreement.md"
    .venv/bin/python benchmarks/agreement_curve.py --agreement "$OUT.snapshots/agreement.json" \
        --out "benchmarks/results/agreement_curve_$KIND.md"
fi
