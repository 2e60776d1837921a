"""Early-exit decoding: the public contract (types and entry points).

CONTRACT SKELETON: the types and signatures below are what calibration, evaluation, serving and the CLI
code against. The engine bodies are filled in by the decoding issue; keep these names and fields stable
(add fields at the end with defaults if needed).

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .model import LiteModel

POLICIES = ("none", "static", "dynamic")
CONFIDENCES = ("max_prob", "margin", "entropy", "state_cosine")
KV_STRATEGIES = ("copy", "recompute")


@dataclass
class ExitPolicy:
    """Where each token may leave the network.

    Attributes:
        kind: "none" (all L layers), "static" (always leave at ``layer``), "dynamic" (leave at the first
            exit layer whose confidence reaches its threshold).
        layer: the static exit layer K (1..L), only for ``static``.
        thresholds: {exit layer: threshold} for ``dynamic``; every exit layer below L needs one.
        confidence: "max_prob" (paper), "margin", "entropy", "state_cosine".
        threshold_scale: multiplies every threshold (``--threshold-scale``): >1 exits less, <1 more.
        gate: optional learned exit gate (from calibration); when set, the head is evaluated only at the
            layer where the gate says leave.
    """

    kind: str = "none"
    layer: int | None = None
    thresholds: dict[int, float] = field(default_factory=dict)
    confidence: str = "max_prob"
    threshold_scale: float = 1.0
    gate: object | None = None


@dataclass
class GenerationSettings:
    """Sampling and stopping. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    kv: str = "copy"  # what later tokens see at skipped layers: "copy" or "recompute"


@dataclass
class TokenRecord:
    """One generated token and where it left the network."""

    id: int
    text: str
    exit_layer: int
    confidence: float | None  # confidence at the exit layer (None when exits are off)


@dataclass
class GenerationResult:
    """A generated sequence with its per-token exits and cost (see :mod:`lite.cost`)."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    tokens: list[TokenRecord]
    num_layers: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    seconds: float
    layer_cost_improvement: float  # 1 - mean(exit layer) / L
    compute_cost_improvement: float  # 1 - FLOPs(early exit, incl. head checks and K/V work) / FLOPs(full)
    cost: object | None = None  # the detailed cost record (lite.cost)


def stream(lm: LiteModel, prompt_ids: list[int], policy: ExitPolicy, settings: GenerationSettings,
           on_token: Callable[[TokenRecord], None] | None = None) -> Iterator[TokenRecord]:
    """Yield one :class:`TokenRecord` per generated token (streaming)."""
    raise NotImplementedError("filled in by the decoding issue")


def generate(lm: LiteModel, prompt_ids: list[int], policy: ExitPolicy, settings: GenerationSettings,
             on_token: Callable[[TokenRecord], None] | None = None) -> GenerationResult:
    """Generate from ``prompt_ids`` (already formatted, see :mod:`lite.prompts`) with early exit.

    ``on_token`` is called once per token as it is produced (streaming: the server pushes it to a queue).
    """
    raise NotImplementedError("filled in by the decoding issue")
