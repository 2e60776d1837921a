"""`lite demo`."""

from __future__ import annotations

import argparse

from ..errors import LiteError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder, LoRA adapter folder, hub id, or smollm2-135m-instruct")


def run(args: argparse.Namespace) -> int:
    raise LiteError("'lite demo' is not implemented yet (tracked in the project's issues)")
