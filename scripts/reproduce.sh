#!/usr/bin/env bash
# Reproduce LITE at small scale (issue 6): baseline (final-layer loss) vs LITE LoRA on the embedded default,
# calibrate LITE on its held-out rows, evaluate both on the paper's four test sets (a fixed subset: the
# first $LIMIT prompts of each set, the same for every configuration). Never trains on the test sets.
# Resumable: every step is skipped when its output exists; lite train and lite eval resume themselves.
# Results: $RUNS/eval-lite (LITE, with the baseline as --compare-model), committed as results/reproduce/.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
DATA=${DATA:-../shared/data/train}
TESTS=${TESTS:-../shared/data/testsets}
STEPS=${STEPS:-150}
LIMIT=${LIMIT:-5}
MAX_NEW=${MAX_NEW:-64}   # new tokens per answer
LITE=${LITE:-.venv/bin/lite}
THREADS=${THREADS:-1}   # torch threads per job; 1 is fastest for this model on a shared 2-core CPU
export OMP_NUM_THREADS=$THREADS
TRAIN_DATA=("$DATA/alpaca_libre_v1.jsonl" "$DATA/alpaca_libre_v3.jsonl" "$DATA/alpaca_en_demo.json")
COMMON=(--data "${TRAIN_DATA[@]}" --filter status=ok --lora --lora-rank 8 --prompt-format chat
        --max-steps "$STEPS" --lr 3e-4 --save-steps 10 --logging-steps 5 --no-progress-bar)

[ -d "$RUNS/baseline-lora" ] || "$LITE" train "${COMMON[@]}" --baseline --out "$RUNS/baseline-lora"
[ -d "$RUNS/lite-lora" ] || "$LITE" train "${COMMON[@]}" --out "$RUNS/lite-lora"
grep -q '"rule"' "$RUNS/lite-lora/lite_config.json" ||
    "$LITE" calibrate --model "$RUNS/lite-lora" --rule agreement --target 0.9 --source generated \
        --max-examples 40 --gate
"$LITE" eval --model "$RUNS/lite-lora" --compare-model "$RUNS/baseline-lora" \
    --testset vicuna="$TESTS/vicuna.jsonl" --testset koala="$TESTS/koala.jsonl" \
    --testset wizardlm="$TESTS/wizardlm.jsonl" --testset self_instruct="$TESTS/self_instruct.jsonl" \
    --limit "$LIMIT" --exit dynamic --static-layers --threshold-scales 0.9,1.0,1.1 --max-new-tokens "$MAX_NEW" \
    --threads "$THREADS" --out "$RUNS/eval-lite"
# The learned gate (head evaluated only where the gate passes), on the same prompts.
"$LITE" eval --model "$RUNS/lite-lora" --exit gate \
    --testset vicuna="$TESTS/vicuna.jsonl" --testset koala="$TESTS/koala.jsonl" \
    --testset wizardlm="$TESTS/wizardlm.jsonl" --testset self_instruct="$TESTS/self_instruct.jsonl" \
    --limit "$LIMIT" --max-new-tokens "$MAX_NEW" --threads "$THREADS" --out "$RUNS/eval-lite-gate"
# teacher-forced loss at every exit on the held-out rows: LITE vs baseline (vs the un-tuned model)
mkdir -p results/reproduce/gate
"$(dirname "$LITE")/python" benchmarks/heldout_exit_loss.py --model baseline="$RUNS/baseline-lora" \
    --model LITE="$RUNS/lite-lora" --model untuned=smollm2-135m-instruct --threads "$THREADS" \
    --out heldout_exit_loss --out-dir results/reproduce
"$(dirname "$LITE")/python" benchmarks/final_layer_compare.py "$RUNS/eval-lite/records.jsonl" \
    results/reproduce/final_layer.md
cp -r "$RUNS/eval-lite"/report.json "$RUNS/eval-lite"/report.md "$RUNS/eval-lite"/plots results/reproduce/
cp -r "$RUNS/eval-lite-gate"/report.json "$RUNS/eval-lite-gate"/report.md "$RUNS/eval-lite-gate"/plots results/reproduce/gate/
