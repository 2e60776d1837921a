"""Exit specs: the one place where text and flags become an exit policy, for every verb and the server.

An exit spec is a kind with an optional argument: ``none``, ``static:K``, ``dynamic`` (thresholds: the
calibrated ones of ``lite_config.json`` or ``--thresholds``, times the threshold scale), ``gate`` (the
learned exit gate saved by ``lite calibrate --gate``), ``speculative[:N]`` (lossless self-speculative
decoding drafted by the dynamic exits) and ``auto`` (the model's own best policy: the one calibration recorded,
else the gate, else dynamic when calibrated, else none).
Kinds live in a registry, so a new policy plugs in with :func:`register_policy` without touching the
server, the evaluator or the CLI.

:class:`ExitOptions` are the exit flags, spelled the same on every verb (``--exit``, ``--thresholds``,
``--threshold-scale``, ``--confidence``, ``--exit-layers``, ``--gate``, ``--max-draft``, ``--draft-stop``,
``--draft-vocab``, ``--exit-vocab``); :func:`build_policy` turns them into an :class:`ExitPolicy` checked against the model
(:func:`lite.decoding.policy.resolve_policy`), so a bad combination is refused, naming the flag, before
anything is decoded. :func:`parse_exit` is the text-only form the server and the demo use.

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LiteError
from ..model.adapter import LiteModel
from ..model.config import parse_exit_layers, threshold_problem
from . import policy as policy_mod
from .policy import POLICIES, ExitPolicy, parse_thresholds, resolve_policy

PolicyParser = Callable[[LiteModel, str, float], ExitPolicy]
_POLICY_PARSERS: dict[str, PolicyParser] = {}
THRESHOLD_KINDS = ("dynamic", "speculative")  # kinds whose exits are decided by thresholds (or a gate)


def register_policy(kind: str, parser: PolicyParser) -> None:
    """Make ``kind[:ARG]`` a valid exit spec.

    ``parser(lm, arg, threshold_scale)`` gets the text after the first colon ("" when there is none) and
    returns the policy, or raises :class:`LiteError` naming the problem. It must not change ``lm``.
    """
    _POLICY_PARSERS[kind] = parser


def policy_kinds() -> list[str]:
    """The registered kinds, plus ``auto``."""
    return sorted(_POLICY_PARSERS) + ["auto"]


def _engine_policy(lm: LiteModel, arg: str, scale: float, kind: str) -> ExitPolicy:
    spec = f"{kind}:{arg}" if arg or kind == "static" else kind
    policy = policy_mod.parse_exit(spec, lm.num_layers)
    policy.threshold_scale = scale
    return policy


for _kind in POLICIES:  # none, static:K, dynamic, speculative[:N]: the kinds the engine runs
    register_policy(_kind, lambda lm, arg, scale, kind=_kind: _engine_policy(lm, arg, scale, kind))

_GATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GATES_LOCK = threading.Lock()


def model_gate(lm: LiteModel):
    """The learned exit gate saved with ``lm`` (read once per model, then shared), or None."""
    with _GATES_LOCK:  # the gate is only read afterwards
        if lm not in _GATES:
            from .gate import load_gate

            _GATES[lm] = load_gate(lm)
        return _GATES[lm]


def _require_gate(lm: LiteModel, what: str):
    gate = model_gate(lm)
    if gate is None:
        raise LiteError(f"{what}: this model has no learned exit gate; run 'lite calibrate --gate' on it, or "
                        f"use 'dynamic'")
    return gate


def _gate_policy(lm: LiteModel, arg: str, scale: float) -> ExitPolicy:
    if arg:
        raise LiteError(f"exit policy 'gate' takes no argument, got 'gate:{arg}'")
    return ExitPolicy(kind="dynamic", gate=_require_gate(lm, "exit policy 'gate'"), threshold_scale=scale)


register_policy("gate", _gate_policy)


def is_calibrated(lm: LiteModel) -> bool:
    """True when every exit layer below L has a threshold in ``lite_config.json``."""
    cfg = lm.lite_config
    return all(cfg.threshold_for(k) is not None for k in cfg.exit_layers if k < lm.num_layers)


def default_exit(lm: LiteModel) -> str:
    """The model's own best exit policy, what ``auto`` means: the one calibration recorded
    (``lite_config.json``'s ``default_exit``), else the learned gate when the folder has one, else
    ``dynamic`` when it has calibrated thresholds, else ``none`` (an uncalibrated model decodes in full)."""
    cfg = lm.lite_config
    has_gate = bool(cfg.gate_file)
    recorded = (cfg.default_exit or "").strip()
    if recorded and recorded != "auto" and (recorded != "gate" or has_gate) and \
            (recorded != "dynamic" or is_calibrated(lm)):
        return recorded
    if has_gate:
        return "gate"
    return "dynamic" if is_calibrated(lm) else "none"


def resolve_exit_spec(lm: LiteModel, spec: str) -> str:
    """``auto`` becomes the model's own best policy (:func:`default_exit`); others pass through."""
    spec = spec.strip()
    if spec == "auto":
        return default_exit(lm)
    return spec


def threshold_values(lm: LiteModel, text: str | dict[int, float] | None, measure: str = "max_prob",
                     layers: list[int] | None = None) -> dict[int, float]:
    """``--thresholds``: one value for every checked exit below L ("0.9") or per layer ("8:0.9,11:0.85");
    {} = the calibrated ones from ``lite_config.json``.

    Args:
        measure: the confidence measure the values belong to; each value must lie in its range
            (:data:`lite.model.config.CONFIDENCE_RANGES`).
        layers: the exit layers checked (``--exit-layers``); None = the model's.
    Raises:
        LiteError: not numbers, not finite, or outside the measure's range (names ``--thresholds``).
    """
    if not text:
        return {}
    if isinstance(text, dict):
        values = {int(k): float(v) for k, v in text.items()}
    elif ":" not in text:
        try:
            value = float(text)
        except ValueError:
            raise LiteError(f"--thresholds {text!r}: give one number or LAYER:VALUE pairs like '8:0.9'") from None
        values = {k: value for k in (layers or lm.exit_layers) if k < lm.num_layers}
    else:
        values = parse_thresholds(text)
    for layer, value in values.items():
        problem = threshold_problem(value, measure)
        if problem:
            raise LiteError(f"--thresholds: layer {layer}: {problem}")
    return values


@dataclass
class ExitOptions:
    """The exit-policy flags, the same on every verb (CLI), request (server) and run (evaluator).

    Attributes:
        exit: an exit spec (see the module docstring); None = ``dynamic`` when thresholds or a gate are
            asked for, else ``auto`` (the model's own best policy, :func:`default_exit`).
        threshold_scale: multiplies every threshold (``--threshold-scale``, > 0; > 1 exits less).
        thresholds: ``--thresholds`` ("0.9" for every exit, or "8:0.9,11:0.85"), or {layer: value};
            None = the calibrated ones.
        confidence: the measure of ``thresholds`` (``--confidence``; default max_prob, or the calibrated one).
        exit_layers: ``--exit-layers`` ("8,15" or a list; L is added), None = the model's exits.
        gate: ``--gate``: the learned exit gate decides (dynamic exit, or speculative drafts).
        max_draft, draft_stop, draft_vocab: speculative only (``--max-draft``, ``--draft-stop``,
            ``--draft-vocab``), see :class:`ExitPolicy`.
        exit_vocab: ``--exit-vocab N``: dynamic, gate and speculative exits below L read the head over the N
            most frequent tokens (0 = the full head); None = what calibration recorded, see :class:`ExitPolicy`.
    """

    exit: str | None = None
    threshold_scale: float = 1.0
    thresholds: str | dict[int, float] | None = None
    confidence: str | None = None
    exit_layers: str | list[int] | None = None
    gate: bool = False
    max_draft: int | None = None
    draft_stop: float | None = None
    draft_vocab: int | None = None
    exit_vocab: int | None = None


def _exit_layers(lm: LiteModel, value: str | list[int]) -> list[int]:
    L = lm.num_layers
    if isinstance(value, str):
        parts = [t.strip() for t in value.split(",") if t.strip()]
        if not parts or not all(t.isdigit() for t in parts):
            raise LiteError(f"--exit-layers must be comma-separated integers like '8,15', got {value!r}")
        value = [int(t) for t in parts]
    layers = [int(k) for k in value]
    return parse_exit_layers(layers if layers and layers[-1] == L else layers + [L], L)


def build_policy(lm: LiteModel, options: ExitOptions | None = None) -> ExitPolicy:
    """The :class:`ExitPolicy` that ``options`` ask for, checked against ``lm``.

    Raises:
        LiteError: unknown kind, K out of range, flags that do not apply to the kind, thresholds missing or
            for another confidence measure, a gate the model does not have, bad draft settings; each names
            the flag to fix.
    """
    o = options or ExitOptions()
    if not (o.threshold_scale > 0 and math.isfinite(o.threshold_scale)):  # also refuses NaN
        raise LiteError(f"--threshold-scale must be a finite number > 0, got {o.threshold_scale}")
    calibrated = bool(lm.lite_config.thresholds)
    spec = o.exit.strip() if o.exit is not None else ("dynamic" if (o.thresholds or o.gate) else "auto")
    spec = resolve_exit_spec(lm, spec)
    kind, _, arg = spec.partition(":")
    parser = _POLICY_PARSERS.get(kind)
    if parser is None:
        shown = ["static:K" if k == "static" else k for k in policy_kinds()]
        raise LiteError(f"--exit {spec!r}: unknown exit policy; use one of {', '.join(shown)}")
    policy = parser(lm, arg.strip(), o.threshold_scale)
    if policy.kind == "speculative":
        if o.max_draft is not None:
            policy.max_draft_tokens = o.max_draft
        if o.draft_stop is not None:
            policy.draft_stop_confidence = o.draft_stop
        policy.draft_vocab = o.draft_vocab
    elif o.max_draft is not None or o.draft_stop is not None or o.draft_vocab is not None:
        raise LiteError(f"--max-draft/--draft-stop/--draft-vocab apply to --speculative, not --exit {spec}")
    if (o.gate or o.thresholds or o.confidence or o.exit_vocab is not None) and policy.kind not in THRESHOLD_KINDS:
        raise LiteError(f"--gate/--thresholds/--confidence/--exit-vocab apply to --exit dynamic, not --exit {spec}")
    policy.exit_vocab = o.exit_vocab
    if o.exit_layers:
        policy.exit_layers = _exit_layers(lm, o.exit_layers)
    if o.thresholds:
        policy.confidence = o.confidence or "max_prob"
        policy.thresholds = threshold_values(lm, o.thresholds, policy.confidence, policy.exit_layers)
    elif (o.confidence and policy.kind in THRESHOLD_KINDS and not o.gate and policy.gate is None
          and (o.confidence != lm.lite_config.confidence or not calibrated)):
        raise LiteError(
            f"--confidence {o.confidence}: the calibrated thresholds are for "
            f"{lm.lite_config.confidence if calibrated else 'nothing (not calibrated)'}; give --thresholds "
            f"for {o.confidence}"
        )
    if o.gate:
        policy.gate = _require_gate(lm, "--gate")
    if policy.kind in POLICIES:  # a kind the engine knows: validate it now, not mid-request
        resolve_policy(lm, policy)
    return policy


def parse_exit(lm: LiteModel, spec: str, threshold_scale: float = 1.0) -> ExitPolicy:
    """An exit spec as text (the server's ``exit`` field, ``lite demo --exit``) -> a checked policy.

    Args:
        spec: "none", "static:K", "dynamic", "gate", "auto", "speculative[:N]", or a registered kind.
        threshold_scale: multiplies every dynamic threshold (>1 exits less, <1 more).
    Raises:
        LiteError: see :func:`build_policy`.
    """
    if not (threshold_scale > 0 and math.isfinite(threshold_scale)):
        raise LiteError(f"the threshold scale must be a finite number > 0, got {threshold_scale}")
    return build_policy(lm, ExitOptions(exit=spec, threshold_scale=threshold_scale))
