#!/usr/bin/env bash
# Which way of training the exits of the embedded default (SmolLM2-135M-Instruct,
# exits 15, 19, 23, 26) makes them agree with the final layer, at the same training time for each.
#
# Recipes (same data: the MIT-licensed alpaca-libre "ok" rows; same held-out split: seed 0, 5%; chat format;
# bf16 autocast; batch 8 x 320 tokens):
#   paper-lora      the paper's recipe (CE against the dataset's responses, uniform weights), LoRA r8 as shipped
#   paper-full      the paper's recipe, full fine-tuning
#   distill-full    self-distillation (KL toward the frozen starting model) on the model's own answers, full FT
#   modules-affine  affine exit modules on the frozen backbone, self-distillation on own answers
#   modules-mlp     MLP exit modules on the frozen backbone, self-distillation on own answers
# Each recipe gets MINUTES of training (default 40): a 3-step and a 12-step probe measure its steady step
# time (lite_config.json's train_seconds, differenced), the run plans the steps that fit plus 10% (its
# cosine schedule spans them), and lite train --max-minutes ends it at MINUTES of training. Then exit_agreement.py scores every
# run and the untuned model on the same held-out rows, and ablation_table.py writes
# benchmarks/results/ablation.md (agreement and KL per exit, final-layer held-out loss against the untuned
# model, training minutes, artefact size).
#
# Resumable: a finished run is skipped, an unfinished one resumes from its checkpoint (re-run the command);
# the training clock resumes with it, so an interrupted recipe still gets and reports MINUTES of training.
# The model's own answers are generated once (64 tokens) into $ROOT/own_answers.jsonl (or $OWN_ANSWERS) and
# shared by the recipes that use them (lite train --own-answers-cache).
#   LITE_HOME=/path/outside/the/checkout bash scripts/ablation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${RUNS:-${LITE_HOME:-$HOME/.cache/lite}/runs}/ablation
DATA=${DATA:-../shared/data/train}
MINUTES=${MINUTES:-40}
ANSWER_TOKENS=${ANSWER_TOKENS:-64}
RECIPES=${RECIPES:-"paper-lora paper-full distill-full modules-affine modules-mlp"}
TABLE=${TABLE:-benchmarks/results/ablation}  # writes $TABLE.md and ${TABLE}_agreement.{md,json}
export OMP_NUM_THREADS=${THREADS:-2}
LITE=${LITE:-.venv/bin/lite}
PY=${PY:-.venv/bin/python}
mkdir -p "$ROOT"

COMMON=(--model smollm2-135m-instruct --data "$DATA/alpaca_libre_v1.jsonl" "$DATA/alpaca_libre_v3.jsonl"
        --filter status=ok --prompt-format chat --exit-layers 15,19,23,26,30 --loss-weighting uniform
        --batch-size 8 --max-length 320 --bf16 --seed 0 --epochs 20 --save-steps 20 --logging-steps 10
        --no-progress-bar)
OWN=(--own-answers --own-answer-tokens "$ANSWER_TOKENS" --own-answers-cache "${OWN_ANSWERS:-$ROOT/own_answers.jsonl}")

flags() {  # the recipe's own flags
    case "$1" in
        paper-lora) echo --recipe paper --lora --lora-rank 8 --targets data --lr 1e-3 ;;
        paper-full) echo --recipe paper --targets data --lr 5e-5 ;;
        distill-full) echo --recipe paper --targets distill --lr 5e-5 "${OWN[@]}" ;;
        modules-affine) echo --recipe exit-modules --exit-modules affine --targets distill --lr 1e-3 "${OWN[@]}" ;;
        modules-mlp) echo --recipe exit-modules --exit-modules mlp --targets distill --lr 1e-3 "${OWN[@]}" ;;
        *) echo "unknown recipe $1" >&2; exit 2 ;;
    esac
}

step_seconds() {  # steady seconds per optimiser step of a recipe: the difference between a 12-step and a
    # 3-step probe over their 9 extra steps (the first steps also pay for allocation and warm-up: a 3-step
    # probe alone gave paper-full 5.5 s per step where it runs at 3.8); the probes are kept for re-runs
    local short="$ROOT/probe-$1" long="$ROOT/probe12-$1"
    # shellcheck disable=SC2046
    [ -d "$short" ] || "$LITE" train "${COMMON[@]}" $(flags "$1") --max-steps 3 --save-steps 1000 --out "$short" >&2
    # shellcheck disable=SC2046
    [ -d "$long" ] || "$LITE" train "${COMMON[@]}" $(flags "$1") --max-steps 12 --save-steps 1000 --out "$long" >&2
    "$PY" -c "import json,sys; s=[json.load(open(p))['training']['train_seconds'] for p in sys.argv[1:]]; print((s[1]-s[0])/9)" \
        "$short/lite_config.json" "$long/lite_config.json"
}

# Every unfinished recipe's probe first, back to back: step times are measured on the same quiet machine,
# and a later interruption (the training resumes from its checkpoint) never lands in a probe.
for recipe in $RECIPES; do
    [ -d "$ROOT/$recipe" ] || step_seconds "$recipe" >/dev/null
done

MODELS=()
for recipe in $RECIPES; do
    out="$ROOT/$recipe"
    if [ ! -d "$out" ]; then
        per_step=$(step_seconds "$recipe")
        # the steps that fit, plus 10% (a probe misjudges a run by about that much; the step time depends on the
        # batches' lengths); --max-minutes ends every run at MINUTES of training whichever comes first
        steps=$("$PY" -c "import sys; print(max(1, int(1.1 * $MINUTES * 60 / float(sys.argv[1]))))" "$per_step")
        echo "[ablation] $recipe: $per_step s per step -> $steps steps planned, stopped at $MINUTES minutes" >&2
        # shellcheck disable=SC2046
        "$LITE" train "${COMMON[@]}" $(flags "$recipe") --max-steps "$steps" --max-minutes "$MINUTES" --out "$out"
    fi
    MODELS+=(--model "$out")
done

# every run and the untuned model, scored on the same held-out rows (the split every recipe kept aside)
first=$(echo "$RECIPES" | awk '{print $1}')
"$PY" benchmarks/exit_agreement.py --model smollm2-135m-instruct "${MODELS[@]}" --heldout-from "$ROOT/$first" \
    --limit "${LIMIT:-40}" --threads "$OMP_NUM_THREADS" --out "${TABLE}_agreement.md"
"$PY" benchmarks/ablation_table.py --agreement "${TABLE}_agreement.json" \
    --untuned smollm2-135m-instruct --out "$TABLE.md"
