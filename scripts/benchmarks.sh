#!/usr/bin/env bash
# The device-agnostic benchmarks of batched and served early exit, one after the other, each a
# ratio measured in one run, results into benchmarks/results/ (or $RESULTS). The same command measures the
# same tables on a GPU: every script takes --device (default: the accelerator torch reports, else the CPU).
#   bash scripts/benchmarks.sh                  # all, on the shipped default smollm2-135m-lite
#   ONLY="engine serve" bash scripts/benchmarks.sh
# About 25 minutes on a 2-core CPU; a few on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-smollm2-135m-lite}
RESULTS=${RESULTS:-benchmarks/results}
THREADS=${THREADS:-$(nproc)}
DEVICE=${DEVICE:-}
ONLY=${ONLY:-"engine serve eval"}
dev=(); [ -n "$DEVICE" ] && dev=(--device "$DEVICE")
export OMP_NUM_THREADS=$THREADS

for what in $ONLY; do
    case "$what" in
        engine)  # the engine at batch 1 and 8, float32 and bfloat16: exits off, --exit auto, thresholds vs HF generate
            "$PY" benchmarks/bench_engine.py --model "$MODEL" --threads "$THREADS" "${dev[@]}" \
                --out "$RESULTS/engine.md" ;;
        serve)  # lite serve, 1 and 16 concurrent streaming clients, continuous batching
            "$PY" benchmarks/bench_serve.py --model "$MODEL" --clients 1,16 --duration 45 --max-tokens 32 \
                --max-batch 16 --threads "$THREADS" --dtype float32 "${dev[@]}" --out "$RESULTS/serve" ;;
        eval)   # lite eval of 20 prompts per test set at batch 8 vs batch 1
            "$PY" benchmarks/bench_eval_batch.py --model "$MODEL" --limit 20 --batch-size 8 --dtype float32 \
                --threads "$THREADS" "${dev[@]}" --out "$RESULTS/eval_batch.md" ;;
        *) echo "unknown benchmark $what (engine, serve, eval)" >&2; exit 2 ;;
    esac
done
