"""A model folder with fewer exits than it was trained with: :func:`keep_exits`.

A run trained with exits at many depths (e.g. every layer from L/4) is a pool to choose from: decoding checks
a token at every exit it passes, and a few well-placed exits can keep most of the saving at a fraction of
the checks (``benchmarks/ceiling_per_exit.py --set`` scores any subset).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from ..errors import LiteError
from .card import write_model_card
from .config import LiteConfig, validate_exit_layers
from .exit_modules import EXIT_MODULES_FILE, ExitModules

# what calibration wrote for a model's exits: a copy with other exits is calibrated afresh
CALIBRATION_FILES = ("exit_gate.safetensors", "draft_vocab.json", "ceiling.md", "ceiling.png")


def keep_exits(run: str | os.PathLike[str], out: str | os.PathLike[str], layers: list[int]) -> Path:
    """Copy the exit-module model folder ``run`` to the new folder ``out`` with the modules of ``layers``
    only: ``exit_layers`` becomes those plus L, calibration is dropped (``lite calibrate`` it next), the
    training record stays, and ``provenance.kept_exits`` names ``run`` and the layers. Written beside
    ``out`` and renamed into place, so ``out`` is whole or absent.

    Raises:
        LiteError: ``run`` has no exit modules, ``out`` exists, or a layer is out of range or has no module.
    """
    run, out = Path(run), Path(out)
    cfg = LiteConfig.load(run)
    if cfg is None or not cfg.exit_modules:
        raise LiteError(f"{run} has no exit modules (its lite_config.json names none): nothing to keep some of")
    if out.exists():
        raise LiteError(f"{out} exists; give a new folder")
    if cfg.exit_modules == "attention":
        raise LiteError("keeping some attention exit modules needs the backbone's blocks; not supported: "
                        "retrain with --exit-layers")
    layers = sorted(set(int(k) for k in layers) - {cfg.num_layers})
    validate_exit_layers(layers + [cfg.num_layers], cfg.num_layers, "the layers to keep")
    kept = ExitModules.load(run, hidden=None, num_layers=cfg.num_layers).keep(layers)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(run, tmp, ignore=shutil.ignore_patterns(EXIT_MODULES_FILE, *CALIBRATION_FILES))
        kept.save(tmp)
        dataclasses.replace(
            cfg, exit_layers=layers + [cfg.num_layers], thresholds={}, calibration={}, gate_file=None,
            default_exit=None, exit_vocab=None,
            provenance={**(cfg.provenance or {}), "kept_exits": {"of": str(run), "layers": layers}}).save(tmp)
        write_model_card(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
