"""Exit specs: the text forms of an exit policy that ``lite serve`` accepts, and their parsing.

Kinds: ``none``, ``static:K``, ``dynamic`` (the calibrated thresholds of ``lite_config.json``, times the
threshold scale), ``gate`` (the learned exit gate saved by ``lite calibrate --gate``), ``speculative[:N]``
(lossless self-speculative decoding drafted by the dynamic exits, when the engine has it) and ``auto``
(dynamic when the model is calibrated, else none). They live in a registry so that a new policy plugs in
with :func:`register_policy` without touching the server. Every spec is checked against
the model with :func:`lite.decoding.resolve_policy` when parsed, so a bad one is refused before decoding.

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

from . import decoding
from .decoding import ExitPolicy
from .errors import LiteError
from .model import LiteModel

PolicyParser = Callable[[LiteModel, str, float], ExitPolicy]
_POLICY_PARSERS: dict[str, PolicyParser] = {}


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
    policy = decoding.parse_exit(spec, lm.num_layers)
    policy.threshold_scale = scale
    return policy


register_policy("none", lambda lm, arg, scale: _engine_policy(lm, arg, scale, "none"))
register_policy("static", lambda lm, arg, scale: _engine_policy(lm, arg, scale, "static"))
register_policy("dynamic", lambda lm, arg, scale: _engine_policy(lm, arg, scale, "dynamic"))
if "speculative" in decoding.POLICIES:  # lossless self-speculative decoding, "speculative[:N]" (N drafts)
    register_policy("speculative", lambda lm, arg, scale: _engine_policy(lm, arg, scale, "speculative"))

_GATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GATES_LOCK = threading.Lock()


def _gate_policy(lm: LiteModel, arg: str, scale: float) -> ExitPolicy:
    if arg:
        raise LiteError(f"exit policy 'gate' takes no argument, got 'gate:{arg}'")
    with _GATES_LOCK:  # read the gate file once per model; the gate is only read afterwards
        if lm not in _GATES:
            from .gate import load_gate

            _GATES[lm] = load_gate(lm)
        gate = _GATES[lm]
    if gate is None:
        raise LiteError("exit policy 'gate': this model has no learned exit gate; run 'lite calibrate --gate' "
                        "on it, or use 'dynamic'")
    return ExitPolicy(kind="dynamic", gate=gate, threshold_scale=scale)


register_policy("gate", _gate_policy)


def is_calibrated(lm: LiteModel) -> bool:
    """True when every exit layer below L has a threshold in ``lite_config.json``."""
    cfg = lm.lite_config
    return all(cfg.threshold_for(k) is not None for k in cfg.exit_layers if k < lm.num_layers)


def resolve_exit_spec(lm: LiteModel, spec: str) -> str:
    """``auto`` becomes ``dynamic`` on a calibrated model and ``none`` otherwise; others pass through."""
    spec = spec.strip()
    if spec == "auto":
        return "dynamic" if is_calibrated(lm) else "none"
    return spec


def parse_exit(lm: LiteModel, spec: str, threshold_scale: float = 1.0) -> ExitPolicy:
    """Turn an exit spec into a policy for ``lm``, checked against it.

    Args:
        spec: "none", "static:K", "dynamic", "gate", "auto", or a kind added with :func:`register_policy`.
        threshold_scale: multiplies every dynamic threshold (>1 exits less, <1 more).
    Raises:
        LiteError: unknown kind, K out of range, dynamic without calibrated thresholds, bad scale.
    """
    if not threshold_scale > 0:
        raise LiteError(f"the threshold scale must be > 0, got {threshold_scale}")
    spec = resolve_exit_spec(lm, spec)
    kind, _, arg = spec.partition(":")
    parser = _POLICY_PARSERS.get(kind)
    if parser is None:
        shown = ["static:K" if k == "static" else k for k in policy_kinds()]
        raise LiteError(f"unknown exit policy {spec!r}: use one of {', '.join(shown)}")
    policy = parser(lm, arg.strip(), threshold_scale)
    if policy.kind in decoding.POLICIES:  # a kind the engine knows: validate it now, not mid-request
        decoding.resolve_policy(lm, policy)
    return policy
