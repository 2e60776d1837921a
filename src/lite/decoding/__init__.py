"""Early-exit decoding: the exit policies, the engine, and the entry points that pick the engine.

Modules: :mod:`.policy` (what an exit policy is and how it is checked against a model), :mod:`.spec` (the
one parser from text and flags to a policy, for the CLI, the server and the evaluator), :mod:`.engine`
(the per-sequence decoder), :mod:`.speculative` (the lossless self-speculative decoder, a subclass),
:mod:`.confidence`, :mod:`.gate` (the learned exit gate), :mod:`.draft_vocab`, :mod:`.sampling`,
:mod:`.cost` (what every token cost), :mod:`.reference` (transformers' ``generate``, the timing reference),
:mod:`.batch` (many sequences at once, each row leaving at its own layer).

This module is the public entry point: :func:`generate`, :func:`stream` and :func:`make_decoder` choose
the decoder for a policy, so that neither decoder imports the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..model.adapter import LiteModel
from .batch import BatchDecoder
from .engine import KV_STRATEGIES, Decoder, GenerationResult, GenerationSettings, TokenRecord, check_settings
from .policy import (
    CONFIDENCES,
    POLICIES,
    ExitGate,
    ExitPolicy,
    ResolvedPolicy,
    parse_exit,
    parse_thresholds,
    resolve_policy,
)
from .speculative import SpeculativeDecoder

__all__ = [
    "CONFIDENCES", "KV_STRATEGIES", "POLICIES", "BatchDecoder", "Decoder", "ExitGate", "ExitPolicy", "GenerationResult",
    "GenerationSettings", "ResolvedPolicy", "SpeculativeDecoder", "TokenRecord", "check_settings",
    "generate", "generate_batch", "make_decoder", "parse_exit", "parse_thresholds", "resolve_policy", "stream", "stream_batch",
]


def make_decoder(lm: LiteModel, prompt_ids: list[int], policy: ExitPolicy, settings: GenerationSettings
                 ) -> Decoder:
    """The engine for ``policy``: :class:`Decoder`, or :class:`SpeculativeDecoder` for ``speculative``
    (same interface)."""
    engine = SpeculativeDecoder if policy.kind == "speculative" else Decoder
    return engine(lm, prompt_ids, policy, settings)


def stream(lm: LiteModel, prompt_ids: list[int], policy: ExitPolicy, settings: GenerationSettings,
           on_token: Callable[[TokenRecord], None] | None = None) -> Iterator[TokenRecord]:
    """Yield one :class:`TokenRecord` per generated token (streaming); the texts concatenate to the final
    text. Bad input raises :class:`LiteError` here, before the first token."""
    decoder = make_decoder(lm, prompt_ids, policy, settings)
    return decoder.run(on_token)


def generate(lm: LiteModel, prompt_ids: list[int], policy: ExitPolicy, settings: GenerationSettings,
             on_token: Callable[[TokenRecord], None] | None = None) -> GenerationResult:
    """Generate from ``prompt_ids`` (already formatted, see :mod:`lite.model.prompts`) with early exit.

    ``on_token`` is called once per token as it is produced (streaming: the server pushes it to a queue).
    The result's ``compute_cost_improvement`` charges the full model for the same number of tokens; with
    the full model's own answer length at hand use ``result.cost.improvement_against(shape, n)``.
    """
    decoder = make_decoder(lm, prompt_ids, policy, settings)
    for _ in decoder.run(on_token):
        pass
    return decoder.result()


def stream_batch(lm: LiteModel, prompts: list[list[int]], policy: ExitPolicy,
                 settings: GenerationSettings | list[GenerationSettings],
                 on_token: Callable[[int, TokenRecord], None] | None = None,
                 regroup: bool | None = None) -> Iterator[tuple[int, TokenRecord]]:
    """Decode ``prompts`` together (:class:`BatchDecoder`); yield ``(row, TokenRecord)`` as tokens come.
    ``settings``: one for every row, or one per row; ``regroup``: what rows that leave early do
    (:func:`lite.decoding.batch.rides_along`; None chooses by batch size). Bad input raises :class:`LiteError` before
    decoding."""
    return BatchDecoder(lm, prompts, policy, settings, regroup).run(on_token)


def generate_batch(lm: LiteModel, prompts: list[list[int]], policy: ExitPolicy,
                   settings: GenerationSettings | list[GenerationSettings],
                   on_token: Callable[[int, TokenRecord], None] | None = None,
                   regroup: bool | None = None) -> list[GenerationResult]:
    """:func:`generate` for many prompts at once: one :class:`GenerationResult` per prompt, in order, each
    what the prompt gets alone (exit layers, tokens, cost), each row exiting at its own layer
    (``regroup``: see :func:`stream_batch`)."""
    decoder = BatchDecoder(lm, prompts, policy, settings, regroup)
    for _ in decoder.run(on_token):
        pass
    return decoder.results()
