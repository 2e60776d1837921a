#!/usr/bin/env bash
# Capacity candidate "exits with attention": one decoder block per exit (a copy of backbone block k+1, with
# K/V of its own; docs/train.md#attention-exit-modules) at every third layer 9..27, on the frozen
# SmolLM2-135M-Instruct, self-distilled toward layer 30 on the model's own greedy answers. Same rows, own
# answers (the cache of scripts/train_dense_exits.sh), held-out rows, batch and epochs as the dense affine
# run, and the same training minutes (--max-minutes 273), so benchmarks/ceiling_per_exit.py compares it
# with the affine exits at the same seven layers (its "every third, 9..27" row) by oracle saving and by the
# frontier at 0.90/0.95 agreement.
# Every third layer, not every layer: a block is ~3.5M parameters (14 MB in float32), so 7 exits are 98 MB
# (over the 48 MB the package ships: this run measures capacity, it is not a shipping candidate as is), and
# the backbone-state cache keeps those layers' states at every position of a sequence (~4.8 MB a sequence
# in float32: ~8.5 GB for the 1,763 rows, capped at --state-cache-gb 7.5; the rest run the backbone).
# Start it after the run of scripts/train_lora_kl.sh has finished (one heavy job at a time on 2 cores):
#   LITE_HOME=/work/lite_home nohup nice -n 19 bash scripts/train_attention_exits.sh > $LITE_HOME/attention.log 2>&1 &
# Resumable: re-run the same command. Snapshots every SNAPSHOT_MINUTES in $OUT.snapshots (the curve).
set -euo pipefail
cd "$(dirname "$0")/.."
HOME_DIR=${LITE_HOME:-$HOME/.cache/lite}
DATA=${DATA:-/work/shared/data/train}
OUT=${OUT:-$HOME_DIR/runs/attention-exits}
OWN_ANSWERS=${OWN_ANSWERS:-$HOME_DIR/own_answers-dense-smollm2-135m-instruct-64tok-fp32.jsonl}
export OMP_NUM_THREADS=${THREADS:-1}
LITE=${LITE:-.venv/bin/lite}

"$LITE" train --model smollm2-135m-instruct \
    --data "$DATA/alpaca_libre_v1.jsonl" "$DATA/alpaca_libre_v3.jsonl" --filter status=ok \
    --heldout-from smollm2-135m-lite \
    --out "$OUT" --exit-modules attention --targets distill --own-answers --own-answer-tokens 64 \
    --own-answers-cache "$OWN_ANSWERS" --own-answers-batch-size 32 --prompt-format chat \
    --exit-layers 9,12,15,18,21,24,27,30 \
    --epochs 3 --batch-size 8 --max-length 320 --lr "${LR:-1e-4}" --save-steps 10 --logging-steps 5 \
    --threads "$OMP_NUM_THREADS" --no-progress-bar --snapshot-minutes "${SNAPSHOT_MINUTES:-15}" \
    --max-minutes "${MAX_MINUTES:-273}" --state-cache-gb "${STATE_CACHE_GB:-7.5}"
