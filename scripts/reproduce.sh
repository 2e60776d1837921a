#!/usr/bin/env bash
# The paper's experiment at small scale, three models on the embedded default
# (SmolLM2-135M-Instruct, exits 15, 19, 23, 26, L = 30):
#   baseline  LoRA r8 fine-tuned with the final layer's loss only (--baseline)
#   LITE      the paper's recipe: the same LoRA, data and steps, CE at every exit, uniform weights
#   winner    our recipe, the shipped default smollm2-135m-lite (exit modules on the frozen backbone,
#             self-distillation on the model's own answers; scripts/ablation.sh chose it)
# baseline and LITE use scripts/ablation.sh's paper-lora flags and its step count (STEPS, 619 = 40 minutes on a
# 2-core CPU); LITE_RUN= points at a finished LITE run to reuse (e.g. the ablation's paper-lora, the same
# recipe). LITE is calibrated on its held-out rows as the winner was (thresholds at 90% agreement + gate, the
# 4096-token exit vocabulary), so both decode the same way and differ only in training.
# Every model is evaluated on the first $LIMIT prompts of each of the paper's four test sets (never trained
# on), greedy, float32, $MAX_NEW new tokens, batch 8: max-prob thresholds at three scales with static exit at
# every exit layer, and the learned gate; the agreement benchmark scores every exit on the held-out rows.
# lite report then writes results/reproduce/ (report.md, report.json, plots).
# Resumable: every step is skipped when its output exists; lite train and lite eval resume themselves.
#   LITE_HOME=/path/outside/the/checkout bash scripts/reproduce.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-${LITE_HOME:-$HOME/.cache/lite}/runs}/reproduce
DATA=${DATA:-../shared/data/train}
TESTS=${TESTS:-../shared/data/testsets}
STEPS=${STEPS:-619}
LIMIT=${LIMIT:-20}
MAX_NEW=${MAX_NEW:-64}
WINNER=${WINNER:-smollm2-135m-lite}
LITE_RUN=${LITE_RUN:-$RUNS/lite-lora}
BASELINE_RUN=${BASELINE_RUN:-$RUNS/baseline-lora}
OUT=${OUT:-results/reproduce}
export OMP_NUM_THREADS=${THREADS:-2}
LITE=${LITE:-.venv/bin/lite}
PY=${PY:-.venv/bin/python}
mkdir -p "$RUNS"

TRAIN=(--model smollm2-135m-instruct --data "$DATA/alpaca_libre_v1.jsonl" "$DATA/alpaca_libre_v3.jsonl"
       --filter status=ok --prompt-format chat --exit-layers 15,19,23,26,30 --loss-weighting uniform
       --batch-size 8 --max-length 320 --bf16 --seed 0 --epochs 20 --recipe paper --lora --lora-rank 8 --targets data --lr 1e-3
       --max-steps "$STEPS" --save-steps 20 --logging-steps 10 --no-progress-bar)
[ -d "$BASELINE_RUN" ] || "$LITE" train "${TRAIN[@]}" --baseline --out "$BASELINE_RUN"
[ -d "$LITE_RUN" ] || "$LITE" train "${TRAIN[@]}" --out "$LITE_RUN"
grep -q '"exit_vocab": 4096' "$LITE_RUN/lite_config.json" ||
    "$LITE" calibrate --model "$LITE_RUN" --rule agreement --target 0.9 --source generated --max-examples 100 --gate \
        --draft-vocab --exit-vocab 4096

SETS=(--testset vicuna="$TESTS/vicuna.jsonl" --testset koala="$TESTS/koala.jsonl"
      --testset wizardlm="$TESTS/wizardlm.jsonl" --testset self_instruct="$TESTS/self_instruct.jsonl")
EVAL=("${SETS[@]}" --limit "$LIMIT" --max-new-tokens "$MAX_NEW" --dtype float32 --batch-size 8
      --threads "$OMP_NUM_THREADS")
evaluate() {  # MODEL OUT_FOLDER EXIT_FLAGS...: one lite eval, skipped once its report is complete
    local model=$1 out=$2
    shift 2
    grep -q '"complete": true' "$out/report.json" 2>/dev/null || "$LITE" eval --model "$model" "$@" "${EVAL[@]}" --out "$out"
}
# the winner last: its evals read the shipped default as it is when they start
evaluate "$BASELINE_RUN" "$RUNS/eval-baseline" --exit static:26 --static-layers
for pair in "lite=$LITE_RUN" "winner=$WINNER"; do
    name=${pair%%=*} model=${pair#*=}
    evaluate "$model" "$RUNS/eval-$name-gate" --exit gate
    evaluate "$model" "$RUNS/eval-$name" --exit dynamic --threshold-scales 1.0,0.9,1.1 --static-layers
done

# agreement with the final layer and held-out loss at every exit, on LITE's held-out rows (the split of
# every run here: seed 0, 5%)
mkdir -p "$OUT"
[ -f "$RUNS/agreement.json" ] ||
    "$PY" benchmarks/exit_agreement.py --model "$BASELINE_RUN" --model "$LITE_RUN" --model "$WINNER" \
        --model smollm2-135m-instruct --heldout-from "$LITE_RUN" --limit 40 --threads "$OMP_NUM_THREADS" \
        --out "$RUNS/agreement.md"
"$LITE" report winner="$RUNS/eval-winner-gate,$RUNS/eval-winner" LITE="$RUNS/eval-lite-gate,$RUNS/eval-lite" \
    baseline="$RUNS/eval-baseline" --agreement "$RUNS/agreement.json" \
    --agreement-label baseline="$BASELINE_RUN" --agreement-label LITE="$LITE_RUN" \
    --agreement-label winner="$WINNER" --agreement-label untuned=smollm2-135m-instruct \
    --title "The paper's experiment: baseline, LITE and our recipe" --out "$OUT"
cp "$RUNS/agreement.md" "$RUNS/agreement.json" "$OUT/"
