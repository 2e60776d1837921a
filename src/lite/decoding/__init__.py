"""Early-exit decoding: the exit policy, the one decoder, and the entry points.

Modules: :mod:`.policy` (the frozen :class:`ExitPolicy` and its check against a model), :mod:`.spec` (the
exit flags, :class:`ExitOptions`, and the one function that turns them into a policy), :mod:`.step` (the
one decode step over a batch of rows), :mod:`.engine` (the :class:`Decoder`: rows, cache, the loop),
:mod:`.speculative` (the lossless self-speculative round on top of it), :mod:`.confidence`, :mod:`.gate`
(the learned exit gate), :mod:`.draft_vocab` (exit vocabularies), :mod:`.sampling`, :mod:`.cost` (what
every token cost), :mod:`.reference` (transformers' ``generate``, the timing reference).

This module is the public entry point. :func:`batch_limit` is the one rule of how a policy runs (a
speculative policy decodes one sequence at a time, any other as many as asked), and :func:`decoder_for`
the one choice of decoder class; the functions below, the Python API, ``custom_generate``, ``lite eval``
and ``lite serve`` all go through them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..errors import LiteError
from ..model.adapter import LiteModel
from .engine import (
    KV_STRATEGIES,
    Decoder,
    GenerationResult,
    GenerationSettings,
    TokenRecord,
    check_settings,
    rides_along,
)
from .policy import CONFIDENCES, KINDS, ExitGate, ExitPolicy, check_policy
from .spec import ExitOptions, build_policy, make_policy, parse_exit, parse_thresholds
from .speculative import SpeculativeDecoder

__all__ = [
    "CONFIDENCES", "KINDS", "KV_STRATEGIES", "Decoder", "ExitGate", "ExitOptions", "ExitPolicy", "GenerationResult",
    "GenerationSettings", "SpeculativeDecoder", "TokenRecord", "batch_limit", "build_policy", "check_policy",
    "check_settings", "decoder_for", "generate", "generate_batch", "make_policy", "open_decoder", "parse_exit",
    "parse_thresholds", "rides_along", "stream", "stream_batch",
]


def batch_limit(policy: ExitPolicy, batch_size: int) -> int:
    """How many sequences decode together under ``policy`` when ``batch_size`` are asked for: 1 for
    ``speculative`` (its verify pass rolls back one sequence's cache), else ``batch_size``."""
    limit = SpeculativeDecoder.max_rows if policy.kind == "speculative" else None
    return batch_size if limit is None else min(limit, batch_size)


def decoder_for(policy: ExitPolicy) -> type[Decoder]:
    """The decoder class of ``policy``: :class:`SpeculativeDecoder` for ``speculative``, else :class:`Decoder`."""
    return SpeculativeDecoder if policy.kind == "speculative" else Decoder


def _mode(invariant: bool | None) -> dict:
    """The ``invariant`` keyword of a decoder: None keeps the class's own default (batched for
    :class:`Decoder`, one position at a time, so lossless, for :class:`SpeculativeDecoder`)."""
    return {} if invariant is None else {"invariant": invariant}


def open_decoder(lm: LiteModel, policy: ExitPolicy, kv: str = "copy", regroup: bool | None = None,
                 invariant: bool | None = None) -> Decoder:
    """An empty decoder of the right class for continuous batching (``lite serve``); ``invariant``: every
    row computed exactly as it is alone (see :class:`Decoder`)."""
    return decoder_for(policy).open(lm, policy, kv, regroup, **_mode(invariant))


def _per_row(prompts: list[list[int]], settings: GenerationSettings | list[GenerationSettings]
             ) -> list[GenerationSettings]:
    per_row = settings if isinstance(settings, list) else [settings] * len(prompts)
    if not prompts:
        raise LiteError("no prompts to decode: give at least one")
    if len(per_row) != len(prompts):
        raise LiteError(f"{len(prompts)} prompts but {len(per_row)} settings: give one per prompt, or one")
    return per_row


def stream_batch(lm: LiteModel, prompts: list[list[int]], policy: ExitPolicy,
                 settings: GenerationSettings | list[GenerationSettings],
                 on_token: Callable[[int, TokenRecord], None] | None = None, regroup: bool | None = None,
                 batch_size: int | None = None, invariant: bool | None = None) -> Iterator[tuple[int, TokenRecord]]:
    """Decode ``prompts``, ``batch_limit(policy, batch_size)`` at a time (all at once by default); yield
    ``(index, TokenRecord)`` as tokens come. ``settings``: one for every prompt, or one per prompt;
    ``regroup``: what rows that leave early do (:func:`rides_along`; None chooses by batch size);
    ``invariant``: each row computed exactly as it is alone (batch-invariant, see :class:`Decoder`; None:
    the decoder class's default). Bad input raises :class:`LiteError` before decoding."""
    per_row = _per_row(prompts, settings)
    size = batch_limit(policy, batch_size or max(len(prompts), 1))
    chunks = [(start, decoder_for(policy)(lm, prompts[start:start + size], policy, per_row[start:start + size],
                                          regroup, **_mode(invariant))) for start in range(0, len(prompts), size)]  # checks all now

    def records() -> Iterator[tuple[int, TokenRecord]]:
        for start, decoder in chunks:
            for r, record in decoder.run():
                if on_token is not None:
                    on_token(start + r, record)
                yield start + r, record

    return records()


def generate_batch(lm: LiteModel, prompts: list[list[int]], policy: ExitPolicy,
                   settings: GenerationSettings | list[GenerationSettings],
                   on_token: Callable[[int, TokenRecord], None] | None = None, regroup: bool | None = None,
                   batch_size: int | None = None, invariant: bool | None = None) -> list[GenerationResult]:
    """:func:`generate` for many prompts: one :class:`GenerationResult` per prompt, in order, each what the
    prompt gets alone (exit layers, tokens, cost), each row exiting at its own layer (``regroup``,
    ``batch_size``, ``invariant``: see :func:`stream_batch`)."""
    results: list[GenerationResult] = []
    per_row = _per_row(prompts, settings)
    size = batch_limit(policy, batch_size or max(len(prompts), 1))
    for ids, s in zip(prompts, per_row):
        check_settings(lm, ids, s)  # every prompt before the first is decoded
    for start in range(0, len(prompts), size):
        decoder = decoder_for(policy)(lm, prompts[start:start + size], policy, per_row[start:start + size], regroup,
                                      **_mode(invariant))
        for r, record in decoder.run():
            if on_token is not None:
                on_token(start + r, record)
        results += decoder.results()
    return results


def stream(lm: LiteModel, prompt_ids: list[int], policy: ExitPolicy, settings: GenerationSettings,
           on_token: Callable[[TokenRecord], None] | None = None) -> Iterator[TokenRecord]:
    """Yield one :class:`TokenRecord` per generated token of one prompt (streaming); the texts concatenate
    to the final text. Bad input raises :class:`LiteError` here, before the first token."""
    decoder = decoder_for(policy)(lm, [prompt_ids], policy, settings)

    def records() -> Iterator[TokenRecord]:
        for _, record in decoder.run():
            if on_token is not None:
                on_token(record)
            yield record

    return records()


def generate(lm: LiteModel, prompt_ids: list[int], policy: ExitPolicy, settings: GenerationSettings,
             on_token: Callable[[TokenRecord], None] | None = None) -> GenerationResult:
    """Generate from ``prompt_ids`` (already formatted, see :mod:`lite.model.prompts`) with early exit.

    ``on_token`` is called once per token as it is produced (streaming: the server pushes it to a queue).
    The result's ``compute_cost_improvement`` charges the full model for the same number of tokens; with
    the full model's own answer length at hand use ``result.cost.improvement_against(shape, n)``.
    """
    decoder = decoder_for(policy)(lm, [prompt_ids], policy, settings)
    for _, record in decoder.run():
        if on_token is not None:
            on_token(record)
    return decoder.result(0)
