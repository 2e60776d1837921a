"""Exit policies: where each token may leave the network, and how a policy is checked against a model.

:class:`ExitPolicy` is what callers (CLI, evaluation, serving, calibration) build; :func:`resolve_policy`
validates it for one model, fills in calibrated thresholds from ``lite_config.json`` and returns the
:class:`ResolvedPolicy` the engine (:mod:`lite.decoding`) runs. :class:`ExitGate` is the protocol of a
learned exit classifier (implemented in :mod:`lite.decoding.gate`). Everything here is re-exported by
:mod:`lite.decoding`, the public entry point.

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from ..errors import LiteError

if TYPE_CHECKING:
    from ..model.adapter import LiteModel

POLICIES = ("none", "static", "dynamic", "speculative")
CONFIDENCES = ("max_prob", "margin", "entropy", "state_cosine")


@runtime_checkable
class ExitGate(Protocol):
    """A learned exit classifier (implemented by calibration in :mod:`lite.decoding.gate`).

    ``should_exit(layer, normed_state)`` gets ``final_norm(hidden)`` of the current token at exit layer
    ``layer`` (shape ``(D,)``) and says whether the token leaves there; ``flops(layer)`` is the cost of one
    such check, charged by :mod:`lite.decoding.cost`.
    """

    def should_exit(self, layer: int, normed_state: torch.Tensor) -> bool: ...

    def flops(self, layer: int) -> int: ...


@dataclass
class ExitPolicy:
    """Where each token may leave the network.

    Attributes:
        kind: "none" (all L layers), "static" (always leave at ``layer``), "dynamic" (leave at the first
            exit layer whose confidence reaches its threshold), "speculative" (lossless: tokens drafted by
            the dynamic exits are verified by the full model, :mod:`lite.decoding.speculative`).
        layer: the static exit layer K (1..L), only for ``static``.
        thresholds: {exit layer: threshold} for ``dynamic``; every checked exit layer below L needs one.
            Empty: the calibrated thresholds of ``lite_config.json`` and their confidence measure.
        confidence: "max_prob" (paper), "margin", "entropy", "state_cosine" (see :mod:`lite.decoding.confidence`).
        threshold_scale: multiplies every threshold (``--threshold-scale``): >1 exits less, <1 more.
        gate: optional learned exit gate (:class:`ExitGate`); when set, thresholds are not used and the head
            is evaluated only at the layer where the gate says leave (or at L).
        exit_layers: the exit layers to check (default: the model's, ``lite_config.exit_layers``).
        max_draft_tokens: ``speculative`` only (``--max-draft``): tokens drafted per round at most.
        draft_stop_confidence: ``speculative`` only (``--draft-stop``): a draft token whose confidence at a
            checked exit is below this checks no further exits and goes straight to the verify pass
            (0 = never; saves head evaluations on hopeless tokens).
        draft_vocab: ``speculative`` only (``--draft-vocab N``): drafts use the head restricted to the N
            most frequent tokens of the model's ``draft_vocab.json`` (:mod:`lite.decoding.draft_vocab`); None = the
            exit vocabulary (below). The verify pass always uses the full head, so the output does not change.
        exit_vocab: ``dynamic`` and ``speculative`` (``--exit-vocab N``): every exit below L reads the head
            restricted to the N most frequent tokens (its confidence is measured over them, and a token that
            leaves there is one of them); the final layer reads the full head. None = what calibration
            recorded (``lite_config.json``'s ``exit_vocab``, for its own thresholds and gate), 0 = the full head.
    """

    kind: str = "none"
    layer: int | None = None
    thresholds: dict[int, float] = field(default_factory=dict)
    confidence: str = "max_prob"
    threshold_scale: float = 1.0
    gate: object | None = None
    exit_layers: list[int] | None = None
    max_draft_tokens: int = 4
    draft_stop_confidence: float = 0.0
    draft_vocab: int | None = None
    exit_vocab: int | None = None


def parse_exit(text: str, num_layers: int) -> ExitPolicy:
    """``--exit none|static:K|dynamic|speculative[:N]`` -> an :class:`ExitPolicy` (thresholds are added
    separately; N = max draft tokens)."""
    text = (text or "").strip()
    if text in ("none", "dynamic", "speculative"):
        return ExitPolicy(kind=text)
    if text.startswith("speculative:"):
        try:
            return ExitPolicy(kind="speculative", max_draft_tokens=int(text.split(":", 1)[1]))
        except ValueError:
            raise LiteError(f"--exit {text!r}: N (max draft tokens) must be an integer, e.g. speculative:4") from None
    if text.startswith("static:"):
        try:
            k = int(text.split(":", 1)[1])
        except ValueError:
            raise LiteError(f"--exit {text!r}: K must be an integer layer, e.g. static:{num_layers // 2}") from None
        _check_static(k, num_layers)
        return ExitPolicy(kind="static", layer=k)
    raise LiteError(f"--exit {text!r} is not a policy: use none, static:K (1 <= K <= {num_layers}), dynamic "
                    f"or speculative")


def parse_thresholds(text: str) -> dict[int, float]:
    """``--thresholds "8:0.9,11:0.85"`` -> {8: 0.9, 11: 0.85}."""
    out: dict[int, float] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        try:
            layer, value = part.split(":")
            out[int(layer)] = float(value)
        except ValueError:
            raise LiteError(f"--thresholds: {part!r} is not LAYER:VALUE; write e.g. '8:0.9,11:0.85'") from None
        if not math.isfinite(out[int(layer)]):
            raise LiteError(f"--thresholds: {part!r}: a threshold must be a finite number, e.g. '8:0.9'")
    if not out:
        raise LiteError("--thresholds is empty; write e.g. '8:0.9,11:0.85'")
    return out


def check_draft_settings(policy: ExitPolicy) -> None:
    """Reject bad draft settings with the flag to fix (called by :func:`resolve_policy`)."""
    n = policy.max_draft_tokens
    if not isinstance(n, int) or n < 1:
        raise LiteError(f"--max-draft must be an integer >= 1 (tokens drafted per round), got {n!r}")
    c = policy.draft_stop_confidence
    if not isinstance(c, (int, float)) or not math.isfinite(c):
        raise LiteError(f"--draft-stop must be a number (0 = never stop drafting on low confidence), got {c!r}")


def _check_static(k: int | None, num_layers: int) -> None:
    if k is None or not 1 <= k <= num_layers:
        raise LiteError(f"--exit static:{k}: K is out of range; this model has layers 1..{num_layers}")


@dataclass
class ResolvedPolicy:
    """An :class:`ExitPolicy` checked against a model: what the engine will actually do.

    Attributes:
        stop_layer: the deepest block run for any token (K for static, else L).
        checks: {layer: threshold already multiplied by the scale} for dynamic exits below L (for a gate:
            the layers it is asked at, with threshold NaN).
        confidence: the measure used for checks and recorded confidences.
        gate: the learned gate, or None.
        draft_ids: speculative with ``draft_vocab`` or an exit vocabulary: the sorted token ids of the draft
            head, else None.
        check_ids: dynamic with an exit vocabulary: the sorted token ids of the head every exit below L
            reads, else None (the full head).
    """

    kind: str
    stop_layer: int
    checks: dict[int, float]
    confidence: str
    gate: ExitGate | None = None
    draft_ids: list[int] | None = None
    check_ids: list[int] | None = None


def shortlist_ids(lm: LiteModel, size: int, flag: str, ranking: list[int] | None = None) -> list[int]:
    """The first ``size`` ids of ``ranking`` (default: the model's ``draft_vocab.json``), plus its special
    tokens."""
    from .draft_vocab import load_ranking, shortlist
    from .sampling import eos_ids

    always = set(eos_ids(lm.tokenizer, getattr(lm.model, "generation_config", None)))
    always |= set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    ranking = load_ranking(lm.folder) if ranking is None else ranking
    return shortlist(ranking, size, lm.vocab_size, always, where=lm.folder, flag=flag)


def resolve_policy(lm: LiteModel, policy: ExitPolicy) -> ResolvedPolicy:
    """Validate ``policy`` for ``lm`` and fill in calibrated thresholds; raises :class:`LiteError`."""
    L = lm.num_layers
    if policy.kind not in POLICIES:
        raise LiteError(f"--exit {policy.kind!r} is not a policy: use none, static:K, dynamic or speculative")
    if policy.kind == "speculative":  # drafts exit exactly as dynamic tokens do
        check_draft_settings(policy)
        plan = resolve_policy(lm, replace(policy, kind="dynamic", draft_vocab=None))
        draft_ids = plan.check_ids  # drafts leave where dynamic tokens would, over the same vocabulary
        if policy.draft_vocab is not None:
            draft_ids = shortlist_ids(lm, policy.draft_vocab, "--draft-vocab")
        return replace(plan, kind="speculative", draft_ids=draft_ids, check_ids=None)
    if policy.draft_vocab is not None:
        raise LiteError(f"--draft-vocab applies to --speculative (the draft head), not --exit {policy.kind}")
    if policy.exit_vocab is not None and policy.kind != "dynamic":
        raise LiteError(f"--exit-vocab applies to --exit dynamic, gate and speculative, not --exit {policy.kind}")
    if policy.kind == "none":
        return ResolvedPolicy("none", L, {}, policy.confidence)
    if policy.kind == "static":
        _check_static(policy.layer, L)
        return ResolvedPolicy("static", int(policy.layer), {}, "max_prob")
    layers = list(policy.exit_layers) if policy.exit_layers else lm.exit_layers
    bad = [k for k in layers if not 1 <= k <= L]
    if bad:
        raise LiteError(f"--exit-layers {bad} out of range: this model has layers 1..{L}")
    below = sorted({int(k) for k in layers if k < L})
    if policy.gate is not None:
        if not isinstance(policy.gate, ExitGate):
            raise LiteError("ExitPolicy.gate must have should_exit(layer, normed_state) and flops(layer)")
        return ResolvedPolicy("dynamic", L, {k: float("nan") for k in below}, "max_prob", policy.gate,
                              check_ids=_check_ids(lm, policy.exit_vocab))
    thresholds, measure = dict(policy.thresholds), policy.confidence
    if thresholds:  # given by the caller: finite, and only for the exits this policy checks
        bad = {k: v for k, v in thresholds.items() if not math.isfinite(v)}
        if bad:
            raise LiteError(f"--thresholds: {bad}: thresholds must be finite numbers")
        stray = sorted(k for k in thresholds if k not in below)
        if stray:
            raise LiteError(f"--thresholds: layers {stray} are not exits checked here (exits: {below}, the final "
                            f"layer {L} needs none); remove them, or add them to --exit-layers")
    else:
        cfg = lm.lite_config
        thresholds = {int(k): float(v) for k, v in cfg.thresholds.items()}
        measure = cfg.confidence
        if not thresholds:
            raise LiteError(
                "--exit dynamic needs thresholds: this model's lite_config.json has none; run "
                "'lite calibrate', or give --thresholds like '8:0.9,11:0.85', or use --gate"
            )
    if measure not in CONFIDENCES:
        raise LiteError(f"--confidence must be one of {CONFIDENCES}, got {measure!r}")
    missing = [k for k in below if k not in thresholds]
    if missing:
        raise LiteError(
            f"--exit dynamic: exit layers {missing} have no threshold (exits checked: {below}); add them to "
            f"--thresholds, or choose the layers to check with --exit-layers"
        )
    if not (policy.threshold_scale > 0 and math.isfinite(policy.threshold_scale)):
        raise LiteError(f"--threshold-scale must be a finite number > 0, got {policy.threshold_scale}")
    checks = {k: thresholds[k] * policy.threshold_scale for k in below}
    # the recorded exit vocabulary belongs to the recorded thresholds: thresholds given here read the full
    # head unless an exit vocabulary is given with them
    vocab = policy.exit_vocab if policy.exit_vocab is not None or not policy.thresholds else 0
    return ResolvedPolicy("dynamic", L, checks, measure, check_ids=_check_ids(lm, vocab))


def _check_ids(lm: LiteModel, exit_vocab: int | None) -> list[int] | None:
    """The exit vocabulary of a dynamic policy: ``exit_vocab`` (0 = the full head), or None = the one the
    model's calibration recorded (``lite_config.json``'s ``exit_vocab``)."""
    flag = "--exit-vocab"
    if exit_vocab is None:
        exit_vocab, flag = lm.lite_config.exit_vocab, "the exit vocabulary recorded in lite_config.json (exit_vocab; --exit-vocab 0 = the full head)"
    if exit_vocab is not None and (not isinstance(exit_vocab, int) or isinstance(exit_vocab, bool) or exit_vocab < 0):
        raise LiteError(f"--exit-vocab must be an integer >= 0 (0 = the full head), got {exit_vocab!r}")
    if not exit_vocab or exit_vocab >= lm.vocab_size:
        return None
    return shortlist_ids(lm, exit_vocab, flag)
