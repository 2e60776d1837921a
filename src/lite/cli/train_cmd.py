"""`lite train`: train the exits. By default exit modules on the frozen model by self-distillation on its own
answers (``--recipe exit-modules``); ``--recipe paper`` is LITE instruction tuning as the paper does it (or
the final-layer baseline), full or LoRA.

Runs in one process, or in several with ``torchrun --nproc_per_node N -m lite train ...`` (only rank 0
writes the output). Re-running a killed command resumes from ``<out>.partial``'s last checkpoint.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from ..training.config import TrainConfig
from . import add_device_argument, add_dtype_argument, add_threads_argument

EXAMPLE = ("lite train --data rows.jsonl --epochs 3 --out runs/mine   (the paper's recipe: lite train --recipe paper "
           "--data rows.jsonl --lora --max-steps 200 --out runs/paper; or: lite train --config run.yaml)")

# The typed configuration behind this verb: every field is the dest of one flag (spelled as the field, or as
# its metadata says: --filter for filters). The flags are built from the fields; tests/test_cli.py and
# tests/test_train_config.py fail when a field has no flag or another default, so the two cannot drift apart.
CONTRACT = {"lite.training.TrainConfig": {}}


def field_flag(f) -> str:
    """The flag of a :class:`lite.training.TrainConfig` field: ``--max-steps`` for ``max_steps``, unless its
    metadata names another (``--filter`` for ``filters``)."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`lite.training.TrainConfig` field, from its metadata (help, argparse type and
    keywords), with the field's default; then the verb's own --threads and --no-progress-bar."""
    from . import numbers

    for f in fields(TrainConfig):
        meta = dict(f.metadata)
        meta.pop("flag", None)
        shared = meta.pop("shared", None)
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        if shared == "dtype":  # spelled, explained and checked the same on every verb
            add_dtype_argument(p, default)
            continue
        if shared == "device":
            add_device_argument(p)
            add_threads_argument(p)
            continue
        kwargs = {"dest": f.name, "default": default, "help": meta.pop("help")}
        if "type" in meta:
            kwargs["type"] = getattr(numbers, meta.pop("type"))
        if meta.get("action") == "optional":  # --x / --no-x, None when neither is given
            meta["action"] = argparse.BooleanOptionalAction
        p.add_argument(field_flag(f), **kwargs, **meta)
    p.add_argument("--no-progress-bar", action="store_true", help="no tqdm bar (logs still print)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`lite.training.TrainConfig` of parsed flags (every field is a flag's ``dest``)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def run(args: argparse.Namespace) -> int:
    from ..training import loss_summary, train
    from ..training.hf_trainer import process_rank
    from . import progress

    result = train(config_from_args(args), progress=progress, show_progress_bar=not args.no_progress_bar)
    if process_rank() == 0:
        progress(f"done: {result.steps} steps, {loss_summary(result)}")
        print(result.output_dir)
    return 0
