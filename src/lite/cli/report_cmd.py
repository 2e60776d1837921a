"""`lite report`: several `lite eval` folders side by side (report.md, report.json, plots), nothing decoded."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..errors import LiteError
from .numbers import nonnegative_int

EXAMPLE = ("lite report winner=runs/eval-gate,runs/eval baseline=runs/eval-baseline --out runs/report")

# The typed function behind this verb; see lite.cli.train_cmd.CONTRACT (checked by tests/test_cli.py).
CONTRACT = {"lite.evaluation.comparison.compare_evals": {"folders": "folder", "agreement_labels": "agreement_label",
                                                         "embedder": None, "command": None}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add = p.add_argument
    add("folder", nargs="+", metavar="FOLDER",
        help="a `lite eval --out` folder (labelled by its name), or LABEL=DIR[,DIR...]: one model's folders "
             "(runs of the same model on the same prompts) merged under LABEL")
    add("--out", required=True, metavar="DIR",
        help="where report.md, report.json and plots/ go (a new folder, or one lite report wrote before)")
    add("--agreement", default=None, metavar="FILE.json",
        help="the JSON of benchmarks/exit_agreement.py over the same models (held-out loss and agreement "
             "with the final layer per exit)")
    add("--agreement-label", action="append", default=None, metavar="LABEL=MODELKEY",
        help="which model of the --agreement JSON (its --model spec) a label is (repeatable; a label without "
             "folders is shown by its agreement alone; 'untuned' is drawn dashed)")
    add("--samples", type=nonnegative_int, default=3, metavar="N", help="sample answers to show")
    add("--title", default=None, help="the report's title (default: a generic one)")


def check_out(out: str, folders: dict[str, list[Path]]) -> Path:
    """``--out``: a new folder or an earlier report's, never one of the eval folders (their report.json)."""
    from ..files import check_output_folder

    path = Path(out).expanduser()
    inputs = {p.resolve() for paths in folders.values() for p in paths}
    if path.resolve() in inputs or (path / "records.jsonl").is_file():
        raise LiteError(f"--out {out} is a `lite eval` folder: its report.json would be overwritten; give a new "
                        f"folder, e.g. --out {path.parent / 'report'}")
    return check_output_folder(path, ("report.md", "report.json"))


def run(args: argparse.Namespace) -> int:
    from ..evaluation.comparison import compare_evals, parse_folders, parse_pairs
    from ..evaluation.comparison_report import write_comparison

    folders = parse_folders(args.folder)
    labels = parse_pairs(args.agreement_label or [], "--agreement-label", "LABEL=MODELKEY", "LITE=runs/lite-lora")
    out = check_out(args.out, folders)
    command = shlex.join(["lite", "report", *args.folder, "--out", args.out]
                         + (["--agreement", args.agreement] if args.agreement else [])
                         + [w for label in args.agreement_label or [] for w in ("--agreement-label", label)]
                         + ["--samples", str(args.samples)] + (["--title", args.title] if args.title else []))
    res = compare_evals(folders, agreement=args.agreement, agreement_labels=labels, samples=args.samples,
                        command=command, title=args.title)
    written = write_comparison(out, res)
    if res.get("samples") and res["samples"].get("tokenizer_error"):
        print(f"lite report: no exit marks in the samples: {res['samples']['tokenizer_error']}", file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0
