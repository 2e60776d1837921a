#!/usr/bin/env bash
# The capacity candidates against the dense affine exits (scripts/train_dense_exits.sh): the same rows, own
# answers (that run's cache), held-out rows, batch and epochs, and the same training minutes (--max-minutes
# 273, that run's total), so benchmarks/ceiling_per_exit.py compares them by oracle saving and by the
# frontier at 0.90/0.95 agreement. One heavy job at a time on 2 cores. The attention run began 2026-12-07
# 15:56 UTC.
# Resumable: re-run the same command (it goes on from $OUT.partial); snapshots every SNAPSHOT_MINUTES of
# training in $OUT.snapshots (the curve against training minutes).
#   LITE_HOME=/work/lite_home nohup nice -n 19 bash scripts/train_capacity.sh lora-kl >> $LITE_HOME/lora-kl.log 2>&1 &
#   LITE_HOME=/work/lite_home nohup nice -n 19 bash scripts/train_capacity.sh attention >> $LITE_HOME/attention.log 2>&1 &
#
# lora-kl, "the backbone learns too": a LoRA adapter (rank 16 on every attention and MLP projection) with the
# shared head at every layer 8..30, self-distilled toward the frozen starting model's final layer (the
# paper's LITE with KL targets). The KL term on layer 30 holds the final layer to the frozen model at
# FINAL_WEIGHT of the loss (--final-weight; the 22 exits share the rest); how far its greedy output moved is
# measured by ceiling_per_exit.py --answers-from smollm2-135m-instruct. A first run with layer 30 as one
# exit among 23 (weight 0.043) let it drift: KL at layer 30 rose to 0.43 nats by step 40 and its final layer
# kept 59.5% of the frozen model's greedy tokens (3 held-out prompts); stopped there (kept as
# $LITE_HOME/runs/dense-lora-kl-uniform.*). With FINAL_WEIGHT 0.5 (begun 15:30 UTC, commit c23d1fb) KL at
# layer 30 still rose to 0.26-0.31 nats by step 40, and at step 30 (15 training minutes) its final layer kept
# 72.9% of the frozen model's greedy tokens (8 held-out prompts, 32 tokens) while layer 15 agreed with layer
# 30 on 7.8% (the affine modules: 38%): stopped there too (kept as $LITE_HOME/runs/dense-lora-kl-w05.*), for
# the attention run. Third try (begun 2026-12-07 19:50 UTC, resumable with the same command):
#   FINAL_WEIGHT=0.9 LR=5e-5 OUT=$LITE_HOME/runs/dense-lora-kl-w09 nohup nice -n 19 bash scripts/train_capacity.sh lora-kl >> $LITE_HOME/lora-kl-w09.log 2>&1 &
# by epoch 1.4 (~315 steps, 2h45) KL at layer 30 held at 0.075-0.09 nats but KL at layer 15 only fell 19.4 -> 9.3
# nats (each exit weighs 0.005). 32 s a step on 1 thread (no state cache: the backbone runs every step).
# Measured at step 320 (173 training minutes; benchmarks/results/ceiling_lora_kl_w09_step320.md): its final
# layer keeps 85.9% of the frozen model's greedy tokens (the stop rule asks >= 95%), oracle 21.4%, layer 15
# agreeing 9.5% (the affine exits: 42.6%, 38.2%): stopped for good there (kept as
# $LITE_HOME/runs/dense-lora-kl-w09.*); the LoRA+KL recipe is not pursued further on this model.
#
# attention, "exits with attention": one decoder block per exit (a copy of backbone block k+1, with K/V of
# its own; docs/train.md#attention-exit-modules) at every third layer 9..27 on the frozen backbone, compared
# with the affine exits at the same seven layers. Every third, not every layer: a block is ~3.5M parameters
# (14 MB in float32), so 7 exits are 98 MB (over the 48 MB the package ships: a measure of capacity, not a
# shipping candidate as is), and the backbone-state cache keeps those layers' states at every position (~4.8
# MB a sequence in float32: ~8.5 GB for the 1,763 rows, capped at 7.5 GB; the rest run the backbone).
# Done 2026-12-07 (resumed once; 663 steps in 143 training minutes, the state cache making epochs 2-3 fast):
# oracle 29.4%, max-prob 15.2% / 10.7% at 0.90 / 0.95, layer 15 agreeing 23.2%, flat since 109 minutes
# (28.9%); the affine exits at the same layers: 37.5 / 21.6 / 15.5%, 38.2% (benchmarks/results/capacity.md).
set -euo pipefail
cd "$(dirname "$0")/.."
CANDIDATE=${1:?give the candidate: lora-kl or attention}
HOME_DIR=${LITE_HOME:-$HOME/.cache/lite}
DATA=${DATA:-/work/shared/data/train}
export OMP_NUM_THREADS=${THREADS:-1}
LITE=${LITE:-.venv/bin/lite}
case "$CANDIDATE" in
    lora-kl) OUT=${OUT:-$HOME_DIR/runs/dense-lora-kl}
        MORE=(--recipe paper --lora ${LR:+--lr "$LR"} --exit-layers 8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30
              --final-weight "${FINAL_WEIGHT:-0.5}") ;;
    attention) OUT=${OUT:-$HOME_DIR/runs/attention-exits}
        MORE=(--exit-modules attention --exit-layers 9,12,15,18,21,24,27,30 --lr "${LR:-1e-4}"
              --state-cache-gb "${STATE_CACHE_GB:-7.5}") ;;
    *) echo "unknown candidate $CANDIDATE: lora-kl or attention" >&2; exit 2 ;;
esac

"$LITE" train --model smollm2-135m-instruct \
    --data "$DATA/alpaca_libre_v1.jsonl" "$DATA/alpaca_libre_v3.jsonl" --filter status=ok \
    --heldout-from smollm2-135m-lite --out "$OUT" "${MORE[@]}" --targets distill --own-answers \
    --own-answer-tokens 64 --own-answers-batch-size 32 --prompt-format chat \
    --own-answers-cache "${OWN_ANSWERS:-$HOME_DIR/own_answers-dense-smollm2-135m-instruct-64tok-fp32.jsonl}" \
    --epochs 3 --batch-size 8 --max-length 320 --save-steps 10 --logging-steps 5 --threads "$OMP_NUM_THREADS" \
    --no-progress-bar --snapshot-minutes "${SNAPSHOT_MINUTES:-15}" --max-minutes "${MAX_MINUTES:-273}"
