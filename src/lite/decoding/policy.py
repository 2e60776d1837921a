"""Exit policies: where each token may leave the network.

:class:`ExitPolicy` is the one object every decoder takes: frozen and hashable (requests that share a
policy decode in one batch), complete (thresholds already scaled, the exit vocabulary's ids already read),
so that nothing is looked up or re-validated while decoding. It is built from the exit flags by
:func:`lite.decoding.spec.build_policy` (CLI, server, evaluator, Python API); tools and tests may also
construct one directly with explicit thresholds, and :func:`check_policy` refuses one that does not fit the
model. :class:`ExitGate` is the protocol of a learned exit classifier (implemented in
:mod:`lite.decoding.gate`).

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from ..errors import LiteError

if TYPE_CHECKING:
    from ..model.adapter import LiteModel

KINDS = ("none", "static", "dynamic", "gate", "speculative")
CONFIDENCES = ("max_prob", "margin", "entropy", "state_cosine")


@runtime_checkable
class ExitGate(Protocol):
    """A learned exit classifier (implemented by calibration in :mod:`lite.decoding.gate`).

    ``should_exit(layer, normed_state)`` gets ``final_norm(hidden)`` of the current token at exit layer
    ``layer`` (shape ``(D,)``) and says whether the token leaves there; ``flops(layer)`` is the cost of one
    such check, charged by :mod:`lite.decoding.cost`. A gate may add ``should_exit_rows(layer, states)``
    for ``(b, D)`` states, one decision per row in one call.
    """

    def should_exit(self, layer: int, normed_state: torch.Tensor) -> bool: ...

    def flops(self, layer: int) -> int: ...


@dataclass(frozen=True)
class ExitPolicy:
    """Where each token may leave the network (frozen, hashable).

    Attributes:
        kind: "none" (all L layers), "static" (always leave at ``layer``), "dynamic" (leave at the first
            checked exit whose confidence reaches its threshold), "gate" (leave where the learned ``gate``
            says so), "speculative" (lossless: tokens drafted by the thresholds, or by ``gate`` when it is
            set, are verified by the full model, :mod:`lite.decoding.speculative`).
        layer: the static exit layer K (1..L), only for ``static``.
        thresholds: {exit layer: threshold}, already multiplied by any threshold scale (stored as sorted
            ``(layer, threshold)`` pairs; a dict is accepted); every checked exit below L needs one.
        confidence: the measure the thresholds are for: "max_prob" (paper), "margin", "entropy",
            "state_cosine" (see :mod:`lite.decoding.confidence`).
        gate: the learned exit gate (:class:`ExitGate`) of ``gate`` and gate-drafted ``speculative``.
        exit_layers: the exit layers below L that are checked; None = the model's exit layers
            (``lite_config.exit_layers``).
        exit_ids: the exit vocabulary: every exit below L reads the head over these token ids only (its
            confidence is measured over them, and a token that leaves there is one of them); the final
            layer always reads the full head. None = the full head everywhere.
        max_draft_tokens: ``speculative`` only: tokens drafted per round at most.
        draft_stop_confidence: ``speculative`` only: a draft token whose confidence at a checked exit is
            below this checks no further exits and goes straight to the verify pass (0 = never).
    """

    kind: str = "none"
    layer: int | None = None
    thresholds: tuple[tuple[int, float], ...] = field(default=())
    confidence: str = "max_prob"
    gate: object | None = None
    exit_layers: tuple[int, ...] | None = None
    exit_ids: tuple[int, ...] | None = None
    max_draft_tokens: int = 4
    draft_stop_confidence: float = 0.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalise to hashable forms once, at construction
        if isinstance(self.thresholds, Mapping):
            set_(self, "thresholds", tuple(sorted((int(k), float(v)) for k, v in self.thresholds.items())))
        else:
            set_(self, "thresholds", tuple(sorted((int(k), float(v)) for k, v in self.thresholds)))
        if self.exit_layers is not None:
            set_(self, "exit_layers", tuple(sorted({int(k) for k in self.exit_layers})))
        if self.exit_ids is not None:
            set_(self, "exit_ids", tuple(int(i) for i in self.exit_ids))
        if self.kind == "dynamic" and self.gate is not None:
            raise LiteError("a policy decided by a learned gate is kind 'gate', not 'dynamic' (--exit gate)")

    @property
    def checks(self) -> dict[int, float]:
        """{layer: threshold} as a dict."""
        return dict(self.thresholds)

    @property
    def decides_by_threshold(self) -> bool:
        """True for the kinds whose exits are decided by thresholds (dynamic, threshold-drafted speculative)."""
        return self.kind == "dynamic" or (self.kind == "speculative" and self.gate is None)

    def check_layers(self, lm: LiteModel) -> list[int]:
        """The exit layers below L this policy checks, in increasing order (none for none and static)."""
        L = lm.num_layers
        if self.kind in ("none", "static"):
            return []
        layers = lm.exit_layers if self.exit_layers is None else self.exit_layers
        return sorted(k for k in layers if k < L)

    def stop_layer(self, lm: LiteModel) -> int:
        """The deepest block any token runs: K for static, else L."""
        return int(self.layer) if self.kind == "static" else lm.num_layers

    def describe(self) -> str:
        """The policy as an exit spec: ``none``, ``static:K``, ``dynamic``, ``gate`` or ``speculative:N``."""
        if self.kind == "static":
            return f"static:{self.layer}"
        if self.kind == "speculative":
            return f"speculative:{self.max_draft_tokens}"
        return self.kind


def check_policy(lm: LiteModel, policy: ExitPolicy) -> None:
    """Refuse a policy that does not fit ``lm``, naming the flag to fix. No file is read.

    Raises:
        LiteError: an unknown kind or measure, a layer out of range, a checked exit without a threshold, a
            threshold that is not finite, a gate kind without a gate, bad draft settings, exit ids outside
            the vocabulary.
    """
    L = lm.num_layers
    if policy.kind not in KINDS:
        raise LiteError(f"--exit {policy.kind!r} is not a policy: use none, static:K, dynamic, gate or speculative")
    if policy.kind == "static" and (policy.layer is None or not 1 <= policy.layer <= L):
        raise LiteError(f"--exit static:{policy.layer}: K is out of range; this model has layers 1..{L}")
    if policy.confidence not in CONFIDENCES:
        raise LiteError(f"--confidence must be one of {CONFIDENCES}, got {policy.confidence!r}")
    if policy.kind == "gate" and policy.gate is None:
        raise LiteError("--exit gate: no learned gate given; run 'lite calibrate --gate' on the model")
    layers = [k for k in (policy.exit_layers or ())] + [k for k, _ in policy.thresholds]
    bad = sorted({k for k in layers if not 1 <= k <= L})
    if bad:
        raise LiteError(f"--exit-layers {bad} out of range: this model has layers 1..{L}")
    if policy.decides_by_threshold:
        checked = policy.check_layers(lm)
        if not policy.thresholds:
            raise LiteError(
                "--exit dynamic needs thresholds: this model's lite_config.json has none; run 'lite calibrate', "
                "or give --thresholds like '8:0.9,11:0.85', or use --exit gate")
        values = policy.checks
        missing = [k for k in checked if k not in values]
        if missing:
            raise LiteError(f"--exit {policy.kind}: exit layers {missing} have no threshold (exits checked: "
                            f"{checked}); add them to --thresholds, or choose the layers to check with --exit-layers")
        nan = {k: v for k, v in values.items() if not math.isfinite(v)}
        if nan:
            raise LiteError(f"--thresholds: {nan}: thresholds must be finite numbers")
    if policy.kind == "speculative":
        n = policy.max_draft_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise LiteError(f"--max-draft must be an integer >= 1 (tokens drafted per round), got {n!r}")
        c = policy.draft_stop_confidence
        if not isinstance(c, (int, float)) or not math.isfinite(c):
            raise LiteError(f"--draft-stop must be a number (0 = never stop drafting on low confidence), got {c!r}")
    if policy.exit_ids is not None:
        if policy.kind in ("none", "static"):
            raise LiteError(f"--exit-vocab applies to --exit dynamic, gate and speculative, not --exit {policy.kind}")
        if not policy.exit_ids or not all(0 <= i < lm.vocab_size for i in policy.exit_ids):
            raise LiteError(f"the exit vocabulary must hold token ids in 0..{lm.vocab_size - 1}")
