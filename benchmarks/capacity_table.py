"""The capacity comparison: recipes of exits side by side, from the reports of ``ceiling_per_exit.py``.

Each ``--run LABEL=REPORT.json[@SET]`` names one report of ``benchmarks/ceiling_per_exit.py`` (the same held-out
rows and answers for all) and, after ``@``, the exit set to read from it (a name of its table, e.g.
``every third``; default: every exit of the model). A row: the recipe's label, its exits, training minutes
and steps, the oracle saving, max-prob's saving at 0.90 and 0.95 agreement, agreement at layer 15, how much of
the frozen model's greedy output its final layer keeps (where the answers were another model's: a trained
backbone), and the size of its trained weights.

    python benchmarks/capacity_table.py --run "affine, every layer=benchmarks/results/ceiling_per_exit.json" \
        --run "affine, every third=benchmarks/results/ceiling_per_exit.json@every third" \
        --out benchmarks/results/capacity.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

from lite.errors import LiteError
from lite.files import write_atomic
from lite.model.loading import resolve_model


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def weights_mb(model: str, share: float = 1.0) -> float | None:
    """Size of the trained weights in a model folder (exit modules, adapter, or a full model), in MB; exit
    modules are one per exit, so a subset of ``share`` of them weighs that share (an adapter is shared)."""
    try:
        folder = Path(resolve_model(model))
    except LiteError:  # a folder that is gone: the size is unknown
        return None
    files = [p for p in folder.glob("*.safetensors") if p.name != "exit_gate.safetensors"]
    modules = (folder / "exit_modules.safetensors").is_file()
    return sum(p.stat().st_size for p in files) / 2**20 * (share if modules else 1.0) if files else None


def row(label: str, spec: str) -> dict:
    path, _, wanted = spec.partition("@")
    report = json.loads(Path(path).read_text())
    sets = report["sets"]
    chosen = next((s for s in sets if wanted and s["exits"].startswith(wanted)), None) if wanted else None
    if wanted and chosen is None:
        raise SystemExit(f"--run {label}={spec}: no exit set starting {wanted!r} in {path} "
                         f"(its sets: {[s['exits'] for s in sets]})")
    if chosen is None:  # every exit of the model: the last set (ceiling_per_exit lists it last)
        chosen = sets[-1]
    t = report.get("training") or {}
    return {"label": label, "exits": chosen["exits"], "n": chosen["n"],
            "minutes": None if not t.get("train_seconds") else t["train_seconds"] / 60, "steps": t.get("steps"),
            "oracle": chosen["oracle"], "mp90": chosen.get("max_prob@0.90"), "mp95": chosen.get("max_prob@0.95"),
            "l15": chosen.get("agreement_l15"), "kept": report.get("final_layer_keeps_answers")
            if report.get("answers_from") else None, "mb": weights_mb(report["model"], chosen["n"] / sets[-1]["n"]),
            "report": path, "prompts": report["prompts"], "tokens": report["tokens"]}


def render(rows: list[dict], command: str) -> str:
    lines = [f"# Capacity: recipes of exits compared ({datetime.date.today().isoformat()})", "",
             f"Each row is read from a report of `benchmarks/ceiling_per_exit.py` ({rows[0]['prompts']} held-out "
             f"prompts, {rows[0]['tokens']} answer tokens teacher-forced, float32, every exit reading the full head; "
             "the file is named in the last column). Oracle: each token leaves at the first exit whose argmax is "
             "layer 30's. Max-prob @a: the largest layer saving of one cut at every exit whose emitted tokens "
             "equal layer 30's at a share >= a. Final layer kept: where the backbone was trained, the share of "
             "the frozen model's greedy tokens its layer 30 still gives (teacher-forced).", "",
             "| recipe | exits | training minutes (steps) | oracle | max-prob @0.90 | max-prob @0.95 | agreement at 15 "
             "| final layer kept | trained weights | report |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        minutes = "-" if r["minutes"] is None else f"{r['minutes']:.0f} ({r['steps']})"
        mb = "-" if r["mb"] is None else f"{r['mb']:.1f} MB"
        lines.append(f"| {r['label']} | {r['exits']} ({r['n']}) | {minutes} | {_pct(r['oracle'])} | {_pct(r['mp90'])} "
                     f"| {_pct(r['mp95'])} | {_pct(r['l15'])} | {_pct(r['kept'])} | {mb} | `{r['report']}` |")
    lines += ["", f"Made by `{command}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=REPORT.json[@SET]")
    ap.add_argument("--out", default="benchmarks/results/capacity.md")
    args = ap.parse_args(argv)
    rows = []
    for spec in args.run:
        label, sep, rest = spec.partition("=")
        if not sep or not rest:
            raise SystemExit(f"--run {spec!r}: give LABEL=REPORT.json[@SET]")
        rows.append(row(label, rest))
    text = render(rows, "python benchmarks/capacity_table.py " + shlex.join(argv or sys.argv[1:]))
    write_atomic(Path(args.out), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
