"""Typed configuration saved next to every checkpoint as ``lite_config.json``.

Layer numbering everywhere in lite: layer k is the output of decoder block k, 1 <= k <= L, where L is the
model's number of decoder layers. An "exit layer" is a layer whose hidden state is turned into
next-token logits through the model's own final norm and LM head.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LiteError
from ..files import write_json_atomic

CONFIG_NAME = "lite_config.json"
LOSS_WEIGHTINGS = ("uniform", "increasing")
PROMPT_FORMATS = ("alpaca", "chat")


class LiteConfigError(LiteError):
    """A configuration value is invalid; the message names the CLI flag that sets it."""


def default_exit_layers(num_layers: int) -> list[int]:
    """Default exits for a model of depth L: every L/8 layers starting at L/4, plus L (SPEC §1).

    For L=32 this gives [8, 12, 16, 20, 24, 28, 32], the layers of the LITE paper. Fractions are rounded
    half up, duplicates removed: L=30 gives [8, 11, 15, 19, 23, 26, 30]; L=4 gives [1, 2, 3, 4].
    """
    if num_layers < 1:
        raise LiteConfigError(f"a model needs at least one decoder layer, got {num_layers}")
    picks = {math.floor(num_layers / 4 + i * num_layers / 8 + 0.5) for i in range(6)}
    return sorted({k for k in picks if 1 <= k < num_layers} | {num_layers})


def parse_exit_layers(text: str | list[int] | None, num_layers: int) -> list[int]:
    """Parse and validate ``--exit-layers`` ("8,12,16" or a list); None gives the default exits."""
    if text is None or text == "":
        return default_exit_layers(num_layers)
    if isinstance(text, str):
        try:
            layers = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise LiteConfigError(
                f"--exit-layers must be comma-separated integers like '8,16,{num_layers}', got {text!r}"
            ) from None
    else:
        layers = [int(t) for t in text]
    validate_exit_layers(layers, num_layers)
    return layers


def validate_exit_layers(layers: list[int], num_layers: int) -> None:
    """Exit layers must be strictly increasing, within 1..L, and end at L (the final layer)."""
    if not layers:
        raise LiteConfigError("--exit-layers is empty: give at least the final layer")
    bad = [k for k in layers if not 1 <= k <= num_layers]
    if bad:
        raise LiteConfigError(
            f"--exit-layers {bad} out of range: this model has layers 1..{num_layers} (layer k is the output "
            f"of decoder block k)"
        )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise LiteConfigError(f"--exit-layers must be strictly increasing, got {layers}")
    if layers[-1] != num_layers:
        raise LiteConfigError(
            f"--exit-layers must end with the final layer {num_layers} (its loss keeps the model itself "
            f"trained), got {layers}"
        )


def loss_weights(exit_layers: list[int], weighting: str) -> list[float]:
    """Normalised loss weights per exit layer (they sum to 1).

    ``uniform`` is the paper's mean over exits; ``increasing`` weights layer k proportionally to k
    (deeper exits count more, as in CALM/LayerSkip-style schedules).
    """
    if weighting == "uniform":
        raw = [1.0] * len(exit_layers)
    elif weighting == "increasing":
        raw = [float(k) for k in exit_layers]
    else:
        raise LiteConfigError(f"--loss-weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    total = sum(raw)
    return [w / total for w in raw]


@dataclass
class LiteConfig:
    """What lite knows about a checkpoint; saved as ``lite_config.json`` in the model folder.

    Attributes:
        num_layers: L, the number of decoder layers of the model.
        exit_layers: layers trained (or used) as exits, strictly increasing, ending at L.
        loss_weighting: "uniform" (paper) or "increasing"; the weights themselves are in ``loss_weights``.
        loss_weights: normalised weight per exit layer used in training (empty if not trained by lite).
        prompt_format: "alpaca" (Stanford Alpaca template) or "chat" (the tokenizer's chat template).
        base_model: the model this checkpoint was trained from (path, hub id or alias).
        adapter: True when the folder holds a LoRA adapter (peft) rather than full weights.
        training: training settings (steps, lr, batch, lora, baseline mode, ...), free-form for provenance.
        data: data provenance (paths, row counts, filters, held-out split).
        thresholds: per exit layer (as a string key, JSON-safe) the confidence threshold for dynamic exit.
        confidence: the confidence measure the thresholds belong to ("max_prob", "margin", ...).
        calibration: how the thresholds were set (rule, parameters, data seen, per-layer agreement).
        gate_file: file name (in the model folder) of the learned exit gate, if one was trained.
        exit_modules: the kind of the exit modules saved in the folder (``exit_modules.safetensors``,
            :mod:`lite.model.exit_modules`), or None when the exits are raw (norm and head only).
        provenance: free-form record of how the checkpoint was made and may be shared (the command that
            made it, the licenses of its base model and data); kept as is by every verb.
    """

    num_layers: int
    exit_layers: list[int]
    loss_weighting: str = "uniform"
    loss_weights: list[float] = field(default_factory=list)
    prompt_format: str = "alpaca"
    base_model: str | None = None
    adapter: bool = False
    training: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    confidence: str = "max_prob"
    calibration: dict[str, Any] = field(default_factory=dict)
    gate_file: str | None = None
    exit_modules: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    lite_version: str = "0.1.0"

    def __post_init__(self) -> None:
        validate_exit_layers(self.exit_layers, self.num_layers)
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise LiteConfigError(
                f"--loss-weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}"
            )
        if self.prompt_format not in PROMPT_FORMATS:
            raise LiteConfigError(f"--prompt-format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")

    @classmethod
    def default_for(cls, num_layers: int, **kwargs: Any) -> LiteConfig:
        """A config with the default exits for depth ``num_layers``."""
        kwargs.setdefault("exit_layers", default_exit_layers(num_layers))
        return cls(num_layers=num_layers, **kwargs)

    def threshold_for(self, layer: int) -> float | None:
        """The calibrated threshold of ``layer``, or None when it has none."""
        value = self.thresholds.get(str(layer))
        return None if value is None else float(value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LiteConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``lite_config.json`` atomically (temporary file, then rename) into ``folder``."""
        path = Path(folder) / CONFIG_NAME
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> LiteConfig | None:
        """Read ``lite_config.json`` from ``folder``; None when the folder has none."""
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise LiteConfigError(f"{path} is not valid JSON ({exc}); delete it or restore it") from None
        return cls.from_dict(data)
