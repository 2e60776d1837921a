"""The ``lite`` command line: one subcommand per verb, each a thin wrapper over a library function.

Each verb lives in its own module here with ``add_arguments(parser)`` and ``run(args) -> int``. Exit
status, the same for every verb:

* 0: done;
* 2: a clean refusal: a bad flag (argparse, numbers checked by :mod:`lite.cli.numbers`) or a library error
  (:class:`lite.errors.LiteError`: bad input, a missing or damaged file, named with the fix), one line on
  stderr;
* 1: an unexpected error (a bug, or a fault lite does not check for yet): one line naming it;
* 130: interrupted (Ctrl-C).

No traceback reaches the user unless ``lite --debug VERB ...`` (or ``LITE_DEBUG=1``) asks for it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from ..errors import LiteError
from .config_file import FLAG as CONFIG_FLAG
from .config_file import HELP as CONFIG_HELP

VERBS = {
    "train": "LITE instruction tuning (or the final-layer baseline), full or LoRA",
    "calibrate": "per-layer exit thresholds (and an exit gate) from held-out data",
    "generate": "early-exit generation with per-token exit layers and cost",
    "eval": "cost and quality against the full model on the paper's test sets",
    "report": "several lite eval folders side by side: tables, plots, sample answers (nothing decoded)",
    "serve": "OpenAI-compatible HTTP server that decodes with early exit",
    "demo": "the whole story on the embedded default model, offline",
}
DEBUG_ENV = "LITE_DEBUG"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help, as ArgumentDefaultsHelpFormatter writes it, unless the help
    already says it or there is none to show (a switch, or None: the help says what happens then); the
    epilog's example keeps its line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default in (None, False, [])
                or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with refusals on one line, like every other lite error (the usage is one --help away); the
    top-level parser (``verbs`` set) also replaces a verb's ``--config FILE`` by the file's flags
    (:mod:`lite.cli.config_file`) before parsing, so file values meet the flags' own checks."""

    verbs: dict[str, argparse.ArgumentParser] | None = None

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def parse_known_args(self, args=None, namespace=None):
        if not self.verbs:
            return super().parse_known_args(args, namespace)
        from .config_file import ConfigFileError, expand

        words = list(sys.argv[1:] if args is None else args)
        at = next((i for i, w in enumerate(words) if w in self.verbs), None)
        if at is not None:
            try:
                words = words[:at + 1] + expand(self.verbs[words[at]], words[at + 1:])
            except ConfigFileError as exc:
                self.verbs[words[at]].error(str(exc))
        parsed, extras = super().parse_known_args(words, namespace)
        if getattr(parsed, "config", None) is not None:  # an abbreviation argparse resolved: not expanded
            self.verbs[parsed.verb].error("write --config in full")
        return parsed, extras


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lite", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version="lite 0.1.0")
    parser.add_argument("--debug", action="store_true", default=False,
                        help=f"show the full traceback of an error (also ${DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    parser.verbs = {}
    for verb, help_text in VERBS.items():
        module = importlib.import_module(f".{verb}_cmd", __name__)
        p = sub.add_parser(verb, help=help_text, description=help_text, formatter_class=_HelpFormatter,
                           epilog=f"example:\n  {module.EXAMPLE}")
        module.add_arguments(p)
        p.add_argument(CONFIG_FLAG, default=None, metavar="FILE", help=CONFIG_HELP)
        parser.verbs[verb] = p
        # also accepted after the verb; SUPPRESS keeps a top-level --debug from being reset by the default
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.set_defaults(_run=module.run)
    return parser


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    """``--debug`` was given, or ``$LITE_DEBUG`` is set to anything but empty or 0."""
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Run one verb; returns the exit status (see the module docstring), never raises for bad input."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help/--version (0), or argparse refused a flag (2, message printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 2
    debug = debug_requested(args)
    try:
        if getattr(args, "threads", None):  # --threads, for every verb alike, before anything runs
            import torch

            torch.set_num_threads(args.threads)
        return int(args._run(args) or 0)
    except LiteError as exc:
        if debug:
            traceback.print_exc()
        print(f"lite {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lite {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 -- the last resort: one line, the traceback only on request
        if debug:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"lite {args.verb}: unexpected error: {type(exc).__name__}{': ' + first if first else ''}"
              + ("" if debug else f" (run again with --debug, or {DEBUG_ENV}=1, for the traceback)"),
              file=sys.stderr)
        return 1


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """``--device``, spelled, explained and checked the same way on every verb that loads a model."""
    from .numbers import device_name

    p.add_argument("--device", default=None, metavar="DEVICE", type=device_name,
                   help="cpu, cuda, cuda:1, mps, xpu, ... (default: the accelerator torch reports, else cpu)")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads``, the same on every verb that loads a model (:func:`main` applies it before the verb)."""
    from .numbers import positive_int

    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's own choice; 1 is much faster on a CPU shared with "
                        "other jobs)")


def _exit_field_help() -> dict:
    from dataclasses import fields

    from ..decoding.spec import ExitOptions

    return {f.name: f for f in fields(ExitOptions)}


def add_exit_argument(p: argparse.ArgumentParser, default: str | None = "auto", more: str = "") -> None:
    """``--exit``, spelled, explained and checked the same way on every verb that decodes (``default`` None
    where the verb tells 'not given' from auto, e.g. beside ``--speculative``; it then means auto). Its help
    is :class:`lite.decoding.spec.ExitOptions`'s."""
    from .numbers import exit_spec

    meta = _exit_field_help()["exit"].metadata
    p.add_argument("--exit", default=default, type=exit_spec, metavar=meta["metavar"],
                   help=meta["help"] + ("" if default is None else f" (default {default})") + more)


def add_exit_flags(p: argparse.ArgumentParser) -> None:
    """Every exit flag, generated from :class:`lite.decoding.spec.ExitOptions` (names, defaults, help), with
    ``--speculative`` as an alias of ``--exit speculative``. :func:`exit_options` reads them back."""
    from . import numbers

    for name, f in _exit_field_help().items():
        meta = dict(f.metadata)
        flag, help_ = meta.pop("flag"), meta.pop("help")
        if name == "exit":
            add_exit_argument(p, default=None)
            continue
        kwargs = {"default": f.default, "help": help_}
        if "type" in meta:
            kwargs["type"] = getattr(numbers, meta.pop("type"))
        kwargs.update(meta)
        p.add_argument(flag, **kwargs)
    p.add_argument("--speculative", action="store_true",
                   help="lossless self-speculative decoding: the exits draft, the full model verifies (same as "
                        "--exit speculative; output identical to --exit none when greedy)")


def exit_options(args: argparse.Namespace):
    """The :class:`lite.decoding.spec.ExitOptions` of flags added by :func:`add_exit_flags`."""
    from ..decoding.spec import ExitOptions
    from ..errors import LiteError

    if args.speculative and args.exit and not args.exit.startswith("speculative"):
        raise LiteError(f"--speculative conflicts with --exit {args.exit}: give one of them")
    values = {name: getattr(args, name) for name in _exit_field_help()}
    if args.speculative and not args.exit:
        values["exit"] = "speculative"
    return ExitOptions(**values)


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
