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
NEVER_EXIT = 1.0e6  # a threshold no confidence reaches (confidences lie in [-1, 1]): the token never leaves
# The range of each confidence measure (lite.decoding.confidence): a threshold outside it is a mistake.
CONFIDENCE_RANGES = {"max_prob": (0.0, 1.0), "margin": (0.0, 1.0), "entropy": (0.0, 1.0),
                     "state_cosine": (-1.0, 1.0)}


class LiteConfigError(LiteError):
    """A configuration value is invalid; the message names the CLI flag that sets it."""


def default_exit_layers(num_layers: int) -> list[int]:
    """Default exits for a model of depth L: every L/8 layers starting at L/4, plus L.

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


def validate_exit_layers(layers: list[int], num_layers: int, name: str = "--exit-layers") -> None:
    """Exit layers must be strictly increasing, within 1..L, and end at L (the final layer); ``name`` is
    what the message calls them (the flag, or a field of a file)."""
    if not layers:
        raise LiteConfigError(f"{name} is empty: give at least the final layer")
    bad = [k for k in layers if not 1 <= k <= num_layers]
    if bad:
        raise LiteConfigError(
            f"{name} {bad} out of range: this model has layers 1..{num_layers} (layer k is the output "
            f"of decoder block k)"
        )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise LiteConfigError(f"{name} must be strictly increasing, got {layers}")
    if layers[-1] != num_layers:
        raise LiteConfigError(
            f"{name} must end with the final layer {num_layers} (its loss keeps the model itself "
            f"trained), got {layers}"
        )


def threshold_problem(value: Any, measure: str, allow_never: bool = True) -> str | None:
    """Why ``value`` cannot be an exit threshold of ``measure``, or None when it can.

    A threshold is a finite number in the measure's range (:data:`CONFIDENCE_RANGES`), or
    :data:`NEVER_EXIT` (what calibration writes for a layer no threshold makes good enough) when
    ``allow_never``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value!r} is not a number"
    if not math.isfinite(value):
        return f"{value} is not a finite number"
    if allow_never and value == NEVER_EXIT:
        return None
    low, high = CONFIDENCE_RANGES.get(measure, (-1.0, 1.0))
    if not low <= value <= high:
        never = ", or 1e6 for never" if allow_never else ""
        return f"{value:g} is outside [{low:g}, {high:g}], the range of {measure}{never}"
    return None


# lite_config.json: each field's JSON type (None: null allowed), checked when the file is read.
_FIELD_TYPES: dict[str, tuple[type | None, ...]] = {
    "num_layers": (int,), "exit_layers": (list,), "loss_weighting": (str,), "loss_weights": (list,),
    "prompt_format": (str,), "base_model": (str, None), "adapter": (bool,), "training": (dict,),
    "data": (dict,), "thresholds": (dict,), "confidence": (str,), "calibration": (dict,),
    "gate_file": (str, None), "exit_modules": (str, None), "provenance": (dict,), "lite_version": (str,),
    "default_exit": (str, None), "exit_vocab": (int, None),
}
_JSON_NAMES = {int: "an integer", list: "a list", str: "a string", bool: "true or false", dict: "an object",
               None: "null"}


def check_config_fields(data: Any) -> None:
    """Check what a ``lite_config.json`` holds, field by field, before it becomes a :class:`LiteConfig`.

    Raises:
        LiteConfigError: ``field 'NAME': what is wrong`` (the caller adds the file and the fix).
    """
    if not isinstance(data, dict):
        raise LiteConfigError(f"expected a JSON object, got {type(data).__name__}")
    for name, kinds in _FIELD_TYPES.items():
        if name not in data:
            continue
        value = data[name]
        ok = any(value is None if k is None else (isinstance(value, k) and not (k is int and isinstance(value, bool)))
                 for k in kinds)
        if not ok:
            wanted = " or ".join(_JSON_NAMES[k] for k in kinds)
            raise LiteConfigError(f"field {name!r} must be {wanted}, got {json.dumps(value)[:60]}")
    for name in ("num_layers", "exit_layers"):
        if name not in data:
            raise LiteConfigError(f"field {name!r} is missing")
    num_layers = data["num_layers"]
    if num_layers < 1:
        raise LiteConfigError(f"field 'num_layers' must be >= 1, got {num_layers}")
    layers = data["exit_layers"]
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in layers):
        raise LiteConfigError(f"field 'exit_layers' must be a list of integers, got {json.dumps(layers)[:60]}")
    validate_exit_layers(layers, num_layers, name="field 'exit_layers'")
    for name, choices in (("loss_weighting", LOSS_WEIGHTINGS), ("prompt_format", PROMPT_FORMATS),
                          ("confidence", tuple(CONFIDENCE_RANGES))):
        if name in data and data[name] not in choices:
            raise LiteConfigError(f"field {name!r} must be one of {choices}, got {data[name]!r}")
    weights = data.get("loss_weights", [])
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
               for w in weights):
        raise LiteConfigError(f"field 'loss_weights' must hold finite numbers >= 0, got {json.dumps(weights)[:60]}")
    measure = data.get("confidence", "max_prob")
    below = [k for k in layers if k < num_layers]
    for key, value in data.get("thresholds", {}).items():
        layer = int(key) if key.strip().isdigit() else None
        if layer not in below:
            raise LiteConfigError(f"field 'thresholds' has an entry for layer {key!r}, which is not an exit below "
                                  f"the final layer (exits {below})")
        problem = threshold_problem(value, measure)
        if problem:
            raise LiteConfigError(f"field 'thresholds', layer {layer}: {problem}")


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


def quality_measure_label(measure: str) -> str:
    """A quality bar's measure as ``calibration.quality`` records it (e.g. ``rouge_l_vs_references``), in words."""
    return measure.replace("rouge_l", "ROUGE-L").replace("_", " ")


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
        default_exit: the exit policy every verb uses for this model unless told otherwise (``--exit auto``,
            the default): the best policy calibration found ("gate" when it trained a gate, else
            "dynamic"), recorded by ``lite calibrate``; None = decided from what the folder holds.
        exit_vocab: the exit vocabulary the calibration was measured with (``lite calibrate --exit-vocab N``):
            a dynamic exit below L (thresholds or gate) reads the head restricted to the N most frequent
            tokens of ``draft_vocab.json`` (:mod:`lite.decoding.draft_vocab`) and can emit only those; the
            final layer always reads the full head. None = the full head everywhere.
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
    default_exit: str | None = None
    exit_vocab: int | None = None

    def __post_init__(self) -> None:
        validate_exit_layers(self.exit_layers, self.num_layers)
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise LiteConfigError(
                f"--loss-weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}"
            )
        if self.prompt_format not in PROMPT_FORMATS:
            raise LiteConfigError(f"--prompt-format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if self.exit_vocab is not None and self.exit_vocab < 1:
            raise LiteConfigError(f"exit_vocab must be a token count >= 1 (or null for the full head), got "
                                  f"{self.exit_vocab}")

    @classmethod
    def default_for(cls, num_layers: int, **kwargs: Any) -> LiteConfig:
        """A config with the default exits for depth ``num_layers``."""
        kwargs.setdefault("exit_layers", default_exit_layers(num_layers))
        return cls(num_layers=num_layers, **kwargs)

    def threshold_for(self, layer: int) -> float | None:
        """The calibrated threshold of ``layer``, or None when it has none."""
        value = self.thresholds.get(str(layer))
        return None if value is None else float(value)

    def quality_choice(self) -> dict[str, Any] | None:
        """The candidate ``lite calibrate --quality-bar`` chose (from ``calibration.quality``: its name, kind,
        exit rates, savings and quality ratios), or None when no bar chose one."""
        quality = (self.calibration or {}).get("quality") or {}
        return next((c for c in quality.get("candidates", []) if c["name"] == quality.get("chosen")), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LiteConfig:
        """A config from its JSON form, every field checked (:func:`check_config_fields`); unknown keys are
        ignored (files written by later versions)."""
        check_config_fields(data)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``lite_config.json`` atomically (temporary file, then rename) into ``folder``."""
        path = Path(folder) / CONFIG_NAME
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> LiteConfig | None:
        """Read ``lite_config.json`` from ``folder``; None when the folder has none.

        Raises:
            LiteConfigError: the file is unreadable, not JSON, or a field is wrong; the message names the
                file and the field (never a flag: the file, not the command line, is what to fix).
        """
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LiteConfigError(f"{path} cannot be read as JSON ({exc}); restore it from a copy, or delete it "
                                  f"(the folder then loads as a plain model: no calibration)") from None
        try:
            return cls.from_dict(data)
        except LiteConfigError as exc:
            fix = ("run 'lite calibrate' again, or delete the field" if "'thresholds'" in str(exc)
                   else "fix it by hand or restore the file")
            raise LiteConfigError(f"{path}: {exc}; {fix}") from None
