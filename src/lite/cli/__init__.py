"""The ``lite`` command line: one subcommand per verb, each a thin wrapper over a library function.

Each verb lives in its own module here with ``add_parser(subparsers)`` and ``run(args) -> int``. Library
errors (:class:`lite.errors.LiteError`) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import LiteError

VERBS = {
    "train": "LITE instruction tuning (or the final-layer baseline), full or LoRA",
    "calibrate": "per-layer exit thresholds (and an exit gate) from held-out data",
    "generate": "early-exit generation with per-token exit layers and cost",
    "eval": "cost and quality against the full model on the paper's test sets",
    "serve": "OpenAI-compatible HTTP server that decodes with early exit",
    "demo": "the whole story on the embedded default model, offline",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lite", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version="lite 0.1.0")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, help_text in VERBS.items():
        module = importlib.import_module(f".{verb}_cmd", __name__)
        p = sub.add_parser(verb, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except LiteError as exc:
        print(f"lite {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lite {args.verb}: interrupted", file=sys.stderr)
        return 130


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """``--device``, spelled and explained the same way on every verb that loads a model."""
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="cpu, cuda, cuda:1, mps, xpu, ... (default: the accelerator torch reports, else cpu)")


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def add_dtype_argument(p: argparse.ArgumentParser, default: str) -> None:
    """``--dtype``, with the same choices and meaning on every verb (only the default differs: ``auto`` for
    the decode verbs, float32 where numbers are learned or calibrated)."""
    p.add_argument("--dtype", default=default, choices=DTYPE_CHOICES,
                   help=f"weights dtype: auto = bfloat16 where the hardware runs it natively (CPUs with "
                        f"AVX512-BF16/AMX, recent GPUs), else float32 (default {default}); every comparison in "
                        f"one run uses one dtype")


def progress(message: str) -> None:
    """Status lines for humans go to stderr so that --json output on stdout stays clean."""
    print(f"[lite] {message}", file=sys.stderr, flush=True)
