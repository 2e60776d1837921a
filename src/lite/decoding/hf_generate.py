"""lite's early-exit loop inside transformers' ``model.generate``, as a ``custom_generate`` callable.

transformers (5.0 on) lets a caller replace the decoding loop of ``generate``: with
``model.generate(**inputs, custom_generate=fn, ...)`` it prepares the inputs, the generation config, the
logits processors and the stopping criteria as usual, then calls ``fn(model, input_ids, ...)`` instead of
its own greedy/sampling loop. Keyword arguments named in ``fn``'s signature (and not in the usual loop's)
are handed to ``fn``; here those are lite's exit flags, so

    out = model.generate(**inputs, custom_generate=lite.custom_generate, exit="dynamic", max_new_tokens=64)

returns what ``generate`` returns (the prompt ids followed by the new ids, rows that finished early padded
with the pad token), decoded by :mod:`lite.decoding`'s one decoder (a left- or right-padded batch as rows of
their own, :func:`lite.decoding.batch_limit` at a time), each row exactly as it decodes alone. With
``return_dict_in_generate=True`` the result is a :class:`LiteGenerateOutput` that adds each row's exit layers
and full :class:`GenerationResult` (exit layers, confidences, FLOPs); ``exit_record=[]`` collects the same
results beside a plain tensor. With exits off, greedy output is transformers' own, token for token.

What the loop honours from the generation config: ``max_length``/``max_new_tokens``, ``eos_token_id``,
``pad_token_id``, ``do_sample`` with ``temperature`` and ``top_p``. Everything else that would change the
tokens (beam search, ``top_k`` other than 0, repetition penalties, min length, stop strings, a caller's
processors or criteria, per-step scores or hidden states) is refused with a :class:`LiteError` that names
it, rather than silently ignored. A ``streamer`` never reaches a ``custom_generate`` callable
(transformers keeps it for its own loops): stream with :meth:`lite.api.LiteLM.generate` instead.

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from ..errors import LiteError
from ..model.adapter import LiteModel
from . import batch_limit, decoder_for
from .engine import GenerationResult, GenerationSettings
from .spec import ExitOptions, build_policy


@dataclass
class LiteGenerateOutput(GenerateDecoderOnlyOutput):
    """``generate``'s usual output (``sequences``; scores and states stay None) plus lite's exit record.

    Attributes:
        exit_layers: per row, the layer each new token left at (L = the full model).
        results: per row, the :class:`GenerationResult` (tokens, confidences, cost record).
    """

    exit_layers: list[list[int]] | None = None
    results: list[GenerationResult] | None = None


class _IdsOnly:
    """Stands in for a tokenizer when the model's own cannot be found: ``generate`` returns ids, so the
    loop needs no text (the results' ``text`` stays empty); end-of-sequence ids come from the config."""

    eos_token_id = None
    pad_token_id = None

    def decode(self, ids, **kwargs) -> str:
        return ""


def wrap_for_generate(model: torch.nn.Module) -> LiteModel:
    """``model`` as a :class:`LiteModel`, with the tokenizer and ``lite_config.json`` (thresholds, gate) of
    the local folder it was loaded from when there is one."""
    from ..model.loading import wrap_model

    folder = getattr(model, "name_or_path", None)
    tokenizer = _IdsOnly()
    if folder and (Path(folder) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    return wrap_model(model, tokenizer)


def _check_supported(generation_config, logits_processor, stopping_criteria) -> None:
    """Refuse, by name, what the loop would otherwise ignore (see the module docstring)."""
    g = generation_config
    if (g.num_beams or 1) > 1 or (getattr(g, "num_return_sequences", None) or 1) > 1:
        raise LiteError("custom_generate=lite: beam search and num_return_sequences > 1 are not early-exit "
                        "decoding; use num_beams=1")
    native = (TemperatureLogitsWarper, TopPLogitsWarper) if g.do_sample else ()
    for p in logits_processor or []:
        if isinstance(p, TopKLogitsWarper):
            raise LiteError("custom_generate=lite samples with temperature and top_p only: pass top_k=0")
        if not isinstance(p, native):
            raise LiteError(f"custom_generate=lite does not apply {type(p).__name__} (set by the generation "
                            f"config or the call); drop it, or use plain generate")
    for c in stopping_criteria or []:
        if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria)):
            raise LiteError(f"custom_generate=lite stops at max_new_tokens and eos_token_id only, not at "
                            f"{type(c).__name__}")
    if g.return_dict_in_generate and any(getattr(g, f, False) for f in
                                         ("output_scores", "output_logits", "output_attentions", "output_hidden_states")):
        raise LiteError("custom_generate=lite returns sequences and exit layers, not per-step scores, logits, "
                        "attentions or hidden states")


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def custom_generate(model: torch.nn.Module, input_ids: torch.Tensor, logits_processor=None, stopping_criteria=None,
                    generation_config=None, synced_gpus: bool = False, *, exit: str | None = None,
                    threshold_scale: float = 1.0, thresholds: str | dict[int, float] | None = None,
                    confidence: str | None = None, exit_layers: str | list[int] | None = None, gate: bool = False,
                    kv: str = "copy", max_draft: int | None = None, draft_stop: float | None = None,
                    draft_vocab: int | None = None, exit_vocab: int | None = None, exit_record: list | None = None,
                    lite_model: LiteModel | None = None, **model_kwargs) -> torch.Tensor | LiteGenerateOutput:
    """The decoding loop ``model.generate(..., custom_generate=custom_generate)`` runs (see the module
    docstring); transformers calls it, not the user.

    Args:
        model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus: from
            ``generate``. ``model_kwargs`` too: only ``attention_mask`` is read (which positions are
            padding); lite keeps its own per-layer cache.
        exit, threshold_scale, thresholds, confidence, exit_layers, gate, kv, max_draft, draft_stop,
            draft_vocab, exit_vocab: lite's exit flags, spelled as on the CLI (:class:`lite.decoding.spec.ExitOptions`);
            ``exit=None`` is dynamic on a calibrated model, else none.
        exit_record: a list that receives one :class:`GenerationResult` per row.
        lite_model: the :class:`LiteModel` of ``model`` (``LiteLM.custom_generate`` passes its own);
            default: ``model`` wrapped with its folder's tokenizer and ``lite_config.json``.

    Returns:
        ``(B, prompt + new)`` token ids, or a :class:`LiteGenerateOutput` with ``return_dict_in_generate``.

    Raises:
        LiteError: a setting the loop cannot honour, a bad exit flag (naming it).
    """
    g = generation_config if generation_config is not None else model.generation_config
    _check_supported(g, logits_processor, stopping_criteria)
    lm = lite_model if lite_model is not None else wrap_for_generate(model)
    if lm.config is not getattr(model, "config", None):
        raise LiteError("custom_generate: this LiteLM's custom_generate runs on its own model (lm.model.generate)")
    policy = build_policy(lm, ExitOptions(
        exit=exit, threshold_scale=threshold_scale, thresholds=thresholds, confidence=confidence,
        exit_layers=exit_layers, gate=gate, max_draft=max_draft, draft_stop=draft_stop, draft_vocab=draft_vocab,
        exit_vocab=exit_vocab,
    ), batch=int(input_ids.shape[0]))  # auto is priced at the rows decoded together
    width = input_ids.shape[1]
    max_new = int(g.max_length) - width
    if max_new < 1:
        return input_ids
    eos = set(_ids(g.eos_token_id))
    pad_ids = _ids(getattr(g, "_pad_token_tensor", None)) or _ids(g.pad_token_id) or sorted(eos) or [0]
    mask = model_kwargs.get("attention_mask")
    if mask is None:
        rows = [ids.tolist() for ids in input_ids]
    else:  # padding (left or right) is dropped: each row decodes from its own first token, at position 0
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, mask)]
    settings = GenerationSettings(max_new_tokens=max_new, kv=kv,
                                  temperature=(g.temperature if g.temperature is not None else 1.0) if g.do_sample else 0.0,
                                  top_p=(g.top_p if g.top_p is not None else 1.0) if g.do_sample else 1.0)
    size = batch_limit(policy, len(rows))
    results: list[GenerationResult] = []
    for start in range(0, len(rows), size):
        decoder = decoder_for(policy)(lm, rows[start:start + size], policy, settings)
        decoder.eos = eos  # generate's end-of-sequence ids (its config, or the call), not only the tokenizer's
        for _ in decoder.run():
            pass
        results += decoder.results()
    new = max(len(r.token_ids) for r in results)
    sequences = torch.full((len(rows), width + new), pad_ids[0], dtype=input_ids.dtype, device=input_ids.device)
    sequences[:, :width] = input_ids
    for row, result in enumerate(results):  # rows that stopped early are padded, as generate pads them
        sequences[row, width:width + len(result.token_ids)] = torch.tensor(result.token_ids, dtype=input_ids.dtype)
    if exit_record is not None:
        exit_record.extend(results)
    if g.return_dict_in_generate:
        return LiteGenerateOutput(sequences=sequences, exit_layers=[r.exit_layers for r in results], results=results)
    return sequences
