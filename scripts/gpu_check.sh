#!/usr/bin/env bash
# lite on an accelerator, as one command of at most a few minutes (run it where a GPU is lent; nothing
# here needs one): the engine's contracts on a tiny random model on the device (exits off = transformers'
# generate at batch 1 and 4, batched rows = alone for static and dynamic exits in both K/V strategies,
# speculative = exits off), then the decode step on a random-weight model of LLaMA-2-7B's shape (32
# layers, hidden 4096, vocab 32000, bfloat16): exits off, static:20 and static:12 against generate, with
# the host synchronisations per token. On a CPU it runs the same at a tiny shape.
#   bash scripts/gpu_check.sh                      # cuda if torch sees one, else the CPU at a tiny shape
#   PY=python3 bash scripts/gpu_check.sh --out gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec "$PY" benchmarks/device_check.py "$@"
