#!/usr/bin/env bash
# Exit modules started at the identity against started from the closed-form fit (lite train --exit-init),
# at equal optimiser steps: exit modules at every layer 8..29 of the embedded default (L = 30), the default
# recipe otherwise (frozen backbone, KL toward layer 30 on the model's own greedy answers, 64 tokens, chat
# template, batch 8, lr 1e-3), then benchmarks/ceiling_per_exit.py on the 40 first rows smollm2-135m-lite
# held out (the capacity table's prompts, benchmarks/results/capacity.md). Results: benchmarks/results/exit_init.md.
#
#   LITE_HOME=/work/lite_home STEPS=30 bash scripts/compare_exit_init.sh          # both starts, 30 steps each
#   LITE_HOME=/work/lite_home INITS=fit STEPS=663 MAX_MINUTES=30 SNAPSHOT_MINUTES=0.5 bash scripts/compare_exit_init.sh
#
# SUBSET=1 (what the figures of 2026-12-08 used): instead of all alpaca-libre "ok" rows, only those training
# rows (none of the 93 held out) whose own answers are already in OWN_ANSWERS (the Dolly dense run's cache,
# scripts/train_dense_exits.sh), copied to one file, so that no answer is generated; the output's
# lite_config.json then records the shipped default's held-out rows (the subset holds none of them), which
# ceiling_per_exit.py checks. Without SUBSET, the runs hold out exactly the shipped default's rows and
# generate the answers they miss (about 4 s a row here).
set -euo pipefail
cd "$(dirname "$0")/.."
HOME_DIR=${LITE_HOME:-$HOME/.cache/lite}
DATA=${DATA:-/work/shared/data/train}
WORK=${WORK:-$HOME_DIR/runs/exit-init}
OWN_ANSWERS=${OWN_ANSWERS:-$HOME_DIR/own_answers-dense-dolly-smollm2-135m-instruct-64tok-fp32.jsonl}
STEPS=${STEPS:-30}
INITS=${INITS:-"fit identity"}
LITE=${LITE:-.venv/bin/lite}
PY=${PY:-.venv/bin/python}
mkdir -p "$WORK"
if [ "${SUBSET:-0}" = 1 ]; then
    "$PY" - "$DATA" "$OWN_ANSWERS" "$WORK" <<'PY'
import json, sys
from lite.model.config import LiteConfig
from lite.model.loading import resolve_model
from lite.training.data import load_heldout, read_examples
data, cache_file, work = sys.argv[1:]
files = [f"{data}/alpaca_libre_v1.jsonl", f"{data}/alpaca_libre_v3.jsonl"]
held = {e.row_id for e in load_heldout(LiteConfig.load(resolve_model("smollm2-135m-lite")))}
examples, _ = read_examples(files, ["status=ok"])
cache = {}
for line in open(cache_file):
    entry = json.loads(line)
    cache[entry["row_id"]] = entry
raw = [open(f).read().splitlines() for f in files]
rows, answers = [], []
for e in examples:  # row ids are "file:line"; the Dolly run's cache names these two files 0 and 1 too
    if e.row_id in held or e.row_id not in cache:
        continue
    f, i = map(int, e.row_id.split(":"))
    entry = {k: v for k, v in cache[e.row_id].items() if k not in ("batch", "batch_rows")}
    answers.append(dict(entry, row_id=f"0:{len(rows)}"))  # the subset file's own row ids
    rows.append(json.loads(raw[f][i]))
open(f"{work}/rows.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in rows))
open(f"{work}/answers.jsonl", "w").write("".join(json.dumps(a) + "\n" for a in answers))
print(f"{len(rows)} training rows with cached own answers", file=sys.stderr)
PY
    ROWS=("$WORK/rows.jsonl") SPLIT=(--heldout-fraction 0)
else
    ROWS=("$DATA/alpaca_libre_v1.jsonl" "$DATA/alpaca_libre_v3.jsonl" --filter status=ok)
    SPLIT=(--heldout-from smollm2-135m-lite)
    [ -f "$WORK/answers.jsonl" ] || cp "$OWN_ANSWERS" "$WORK/answers.jsonl"
fi
for init in $INITS; do
    OUT=$WORK/$init-$STEPS
    cp "$WORK/answers.jsonl" "$WORK/answers-$init-$STEPS.jsonl"  # a copy per run: never two writers on one file
    "$LITE" train --model smollm2-135m-instruct --data "${ROWS[@]}" "${SPLIT[@]}" \
        --out "$OUT" --exit-modules affine --exit-init "$init" --targets distill --own-answers \
        --own-answer-tokens 64 --own-answers-cache "$WORK/answers-$init-$STEPS.jsonl" --prompt-format chat \
        --exit-layers "$(seq -s, 8 30)" --max-steps "$STEPS" ${MAX_MINUTES:+--max-minutes "$MAX_MINUTES"} \
        --batch-size 8 --max-length 320 --lr 1e-3 --save-steps 20 --logging-steps 5 --no-progress-bar \
        --state-cache-gb 0 --threads "${THREADS:-2}" ${SNAPSHOT_MINUTES:+--snapshot-minutes "$SNAPSHOT_MINUTES"}
    if [ "${SUBSET:-0}" = 1 ]; then  # the subset holds none of the shipped default's held-out rows: say so
        "$PY" - "$OUT" <<'PY'
import json, sys
from lite.model.config import LiteConfig
from lite.model.loading import resolve_model
path = f"{sys.argv[1]}/lite_config.json"
config = json.load(open(path))
config["data"]["heldout_ids"] = LiteConfig.load(resolve_model("smollm2-135m-lite")).data["heldout_ids"]
json.dump(config, open(path, "w"), indent=1)
PY
    fi
    "$PY" benchmarks/ceiling_per_exit.py --model "$OUT" --limit 40 --threads "${THREADS:-2}" \
        --out "benchmarks/results/ceiling_exit_init_$init-$STEPS.md"
done
