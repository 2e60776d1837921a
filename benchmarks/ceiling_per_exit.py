"""What each added exit buys: the oracle saving and the decision rules' frontiers for sets of exits of one
dense-exit model (:mod:`lite.calibration.ceiling`), on held-out prompts' own greedy answers.

The model's own greedy answers (exits off, float32) to held-out rows (``--heldout-from``'s recorded split;
never a test set) are made once and teacher-forced once through every exit of ``--model``; each exit set is
then read from the same statistics: the dense model's exits restricted to today's four layers, every third,
every second and every layer, plus a greedy order (each step adds the exit that raises the oracle most). With
``--compare``, other models (e.g. the shipped default with its own four exits) are scored on the same answers.
All exits read the full head (no exit vocabulary), so the sets compare like with like.

    .venv/bin/python benchmarks/ceiling_per_exit.py --model $LITE_HOME/runs/dense-affine.snapshots/step-NNNNNN \
        --compare smollm2-135m-lite --limit 60 --out benchmarks/results/ceiling_per_exit.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from lite.calibration.calibrate import collect_sequences
from lite.calibration.ceiling import AGREEMENT_BARS, model_ceiling, oracle_saving
from lite.calibration.scoring import answer_sequences, score_sequences
from lite.files import write_atomic, write_json_atomic
from lite.model.config import LiteConfig
from lite.model.loading import load_model, resolve_model
from lite.model.prompts import default_format, encode_prompt
from lite.training.data import load_heldout
from lite.training.own_answers import own_answers

RULES = ("max_prob", "margin", "entropy")


def exit_sets(layers: list[int]) -> dict[str, list[int]]:
    """Named subsets of the dense model's exits (those present)."""
    def keep(wanted):
        return [k for k in wanted if k in layers]

    return {"15, 19, 23, 26 (the shipped set)": keep([15, 19, 23, 26]),
            "every third, 9..27": keep(range(9, 28, 3)), "every second, 9..29": keep(range(9, 30, 2)),
            f"every layer, {layers[0]}..{layers[-1]}": list(layers)}


def row(name: str, c) -> dict:
    return {"exits": name, "n": len(c.layers), "oracle": c.oracle_saving,
            **{f"{r}@{b:.2f}": c.saving_at(r, b) for r in RULES if r in c.frontiers for b in AGREEMENT_BARS},
            "agreement_l15": c.agreement.get(15)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the dense-exit model (a lite train output or snapshot)")
    ap.add_argument("--compare", action="append", default=[], help="other models, scored on the same answers")
    ap.add_argument("--heldout-from", default="smollm2-135m-lite", help="whose recorded held-out rows to use")
    ap.add_argument("--answers-from", default=None,
                    help="whose greedy answers are teacher-forced (default: --model's own). For a model whose "
                         "backbone was trained (LoRA), the untouched base: the report then says how often --model's "
                         "final layer keeps the base's greedy tokens")
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=K,K,...",
                    help="another subset of the model's exits to score, e.g. 'greedy six=8,9,11,16,21,24'")
    ap.add_argument("--out", default="benchmarks/results/ceiling_per_exit.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = load_heldout(LiteConfig.load(resolve_model(args.heldout_from)))[: args.limit]
    lm = load_model(args.model, dtype="float32", device="cpu")
    recorded = lm.lite_config.data.get("heldout_ids")
    held = LiteConfig.load(resolve_model(args.heldout_from)).data["heldout_ids"]
    if recorded is not None and recorded != held:
        raise SystemExit(f"{args.model}: its held-out split differs from {args.heldout_from}'s")
    fmt = default_format(lm)
    prompts = [encode_prompt(lm.tokenizer, r.instruction, r.input, fmt) for r in rows]
    answerer = lm if args.answers_from is None else load_model(args.answers_from, dtype="float32", device="cpu")
    answers = own_answers(answerer, prompts, max_new_tokens=args.max_new_tokens, batch_size=8).ids  # exits off
    print(f"{len(answers)} answers in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    sequences = answer_sequences(zip(prompts, answers))
    # another model's answers: how many of their greedy tokens the final layer gives (its own: all, by definition)
    final_kept = None if args.answers_from is None else \
        float(score_sequences(lm, sequences, layers=[lm.num_layers]).answer_agree[0].mean())

    def stats(model):
        return collect_sequences(model, sequences, len(sequences), source="generated", exit_vocab=None)

    data = stats(lm)
    print(f"scored {data.tokens} tokens in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    sets = exit_sets(data.layers)
    for spec in args.set:
        name, _, layers = spec.rpartition("=")
        wanted = sorted(int(k) for k in layers.split(","))
        if not name or not set(wanted) <= set(data.layers):
            raise SystemExit(f"--set {spec!r}: give NAME=K,K,... with exits of the model ({data.layers})")
        sets[name] = wanted
    table = [row(name, model_ceiling(lm, data, layers=subset)) for name, subset in sets.items() if subset]
    full = model_ceiling(lm, data)
    def oracle(layers: list[int]) -> float:
        layers = sorted(layers)
        rows = [data.layers.index(k) for k in layers]
        return oracle_saving(data.agree[rows], layers, data.num_layers)

    greedy, chosen = [], []
    for _ in data.layers:  # each step: the exit that raises the oracle saving most
        best = max((k for k in data.layers if k not in chosen), key=lambda k: oracle(chosen + [k]))
        chosen.append(best)
        prefix = model_ceiling(lm, data, layers=sorted(chosen))  # what a decision rule gets of that ceiling
        greedy.append({"added": best, "n": len(chosen), "oracle": oracle(chosen),
                       **{f"max_prob@{b:.2f}": prefix.saving_at("max_prob", b) for b in AGREEMENT_BARS}})
    compared = {}
    for spec in args.compare:
        other = load_model(spec, dtype="float32", device="cpu")
        compared[spec] = row(f"`{spec}` (its own exits {', '.join(map(str, exits_of(other)))})",
                             model_ceiling(other, stats(other)))
    result = {"model": args.model, "heldout_from": args.heldout_from, "prompts": len(rows), "tokens": data.tokens,
              "answers_from": args.answers_from, "final_layer_keeps_answers": final_kept,
              "max_new_tokens": args.max_new_tokens,
              "training": {k: lm.lite_config.training.get(k) for k in ("steps", "train_seconds", "snapshot")},
              "sets": table, "greedy": greedy, "compare": compared, "dense": full.record(),
              "seconds": round(time.perf_counter() - start, 1),
              "command": "python benchmarks/ceiling_per_exit.py " + shlex.join(argv or sys.argv[1:]),
              "date": datetime.date.today().isoformat()}
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), result)
    write_atomic(out, render(result))
    print(render(result))
    return 0


def exits_of(lm) -> list[int]:
    return [k for k in lm.exit_layers if k < lm.num_layers]


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render(r: dict) -> str:
    t = r["training"]
    minutes = "?" if not t.get("train_seconds") else f"{t['train_seconds'] / 60:.0f}"
    cols = [f"{rule} @{b:.2f}" for rule in RULES for b in AGREEMENT_BARS]
    head = "| exits | n | oracle saving | " + " | ".join(f"saving, {c}" for c in cols) + " | agreement at 15 |"
    lines = [f"# Early-exit ceiling per added exit ({r['date']})", "",
             f"Model `{r['model']}` ({t.get('steps')} steps, {minutes} training minutes); {r['prompts']} held-out "
             f"prompts (the rows `{r['heldout_from']}` held out; no test set), their own greedy answers "
             f"(exits off, float32, at most {r['max_new_tokens']} tokens), {r['tokens']} tokens teacher-forced once; every exit "
             f"reads the full head. Oracle saving: each token leaves at the first exit whose argmax is layer 30's. "
             f"'saving, rule @a': the largest layer saving of one cut at every exit whose emitted tokens equal "
             f"layer 30's at a share >= a (state cosine is left out: it compares consecutive exits, so it "
             f"changes with the set).", ""]
    if r.get("answers_from"):
        lines += [f"The answers are `{r['answers_from']}`'s (exits off); the model's final layer gives the same "
                  f"greedy token on {_pct(r['final_layer_keeps_answers'])} of their positions, teacher-forced.", ""]
    lines += [head, "|---|" + "---|" * (len(cols) + 3)]
    for s in r["sets"] + list(r["compare"].values()):
        lines.append(f"| {s['exits']} | {s['n']} | {_pct(s['oracle'])} | "
                     + " | ".join(_pct(s.get(c.replace(' @', '@'))) for c in cols) + f" | {_pct(s['agreement_l15'])} |")
    bars = [k for k in r["greedy"][0] if k.startswith("max_prob@")] if r["greedy"] else []
    lines += ["", "Greedy order (each step adds the exit that raises the oracle saving most; the max-prob "
              "columns: one cut at every exit of the set so far):", "",
              "| step | added exit | oracle saving | " + " | ".join(f"saving, {b.replace('@', ' @')}" for b in bars)
              + " |", "|---|---|---|" + "---|" * len(bars)]
    lines += [f"| {g['n']} | {g['added']} | {_pct(g['oracle'])} | " + " | ".join(_pct(g[b]) for b in bars) + " |"
              for g in r["greedy"]]
    lines += ["", f"Made by `{r['command']}` in {r['seconds']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
