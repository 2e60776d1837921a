"""The one-call Python API: ``lm = lite.load(model)`` then ``lm.generate(prompts)``.

A thin face over the functions the CLI calls, with the CLI's defaults, so that a Python call and the same
``lite generate`` command give the same tokens: :func:`lite.model.loading.load_model` loads,
:func:`lite.decoding.spec.build_policy` turns the exit arguments into a policy (the flags' own parser),
:mod:`lite.model.prompts` formats prompts, and :func:`lite.decoding.generate` /
:func:`lite.decoding.generate_batch` decode (many prompts go through the batched engine together, each
row leaving at its own layer, as it would alone).

    import lite

    lm = lite.load("smollm2-135m-lite")
    out = lm.generate("Give three tips for staying healthy.", max_new_tokens=64)
    out.text, out.exit_layers, out.compute_cost_improvement

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence

import torch

from .decoding import GenerationResult, GenerationSettings, TokenRecord, check_settings
from .decoding import generate_batch as _generate_batch
from .decoding import stream_batch as _stream_batch
from .decoding.engine import default_invariant
from .decoding.spec import ExitOptions, build_policy
from .errors import LiteError
from .model.adapter import LiteModel
from .model.loading import load_model, wrap_model
from .model.prompts import FORMATS, check_messages, default_format, encode_messages, encode_prompt

Messages = list[dict[str, str]]
Prompt = str | Messages  # one prompt: an instruction, or a conversation
DEFAULT_BATCH_SIZE = 8  # as lite eval and lite calibrate


def load(model: str | os.PathLike[str] | torch.nn.Module | LiteModel | LiteLM | None = None, tokenizer=None, *,
         device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         progress=None) -> LiteLM:
    """Load a model for early-exit generation: everything ``lite generate --model`` accepts, or a model
    already in memory.

    Args:
        model: a Hugging Face model folder, a LoRA adapter folder or exit-module folder written by
            ``lite train``, a hub id (needs network), ``smollm2-135m-instruct`` (the embedded default, also
            for None) or ``smollm2-135m-lite`` (its shipped LITE adapter); or an already loaded transformers
            (or peft) causal LM with ``tokenizer``; or a :class:`LiteModel`.
        tokenizer: the tokenizer of an already loaded ``model`` (required then, refused otherwise).
        device: "cpu", "cuda", "cuda:1", "mps", ... (default: the accelerator torch reports, else the CPU).
            A model in memory is moved only when this is given.
        dtype: "auto", "float32", "bfloat16", "float16" or a torch dtype. None: the CLI's default for a
            model loaded here (``auto``: bfloat16 where the hardware runs it natively, else float32), and
            no change for a model in memory.
        progress: called with short status lines while loading (e.g. ``print``).

    Raises:
        LiteError: a model that cannot be found or loaded, a bad device or dtype (the message names it).
    """
    if isinstance(model, LiteLM):
        return model
    if isinstance(model, LiteModel):
        return LiteLM(model)
    if isinstance(model, torch.nn.Module):
        return LiteLM(wrap_model(model, tokenizer, dtype=dtype, device=device))
    if tokenizer is not None:
        raise LiteError("tokenizer= goes with a model already in memory; a folder, hub id or alias brings its own")
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise LiteError(f"lite.load: give a folder, hub id or alias, or a loaded model and its tokenizer; got "
                        f"{type(model).__name__}")
    return LiteLM(load_model(model, dtype="auto" if dtype is None else dtype, device=device, progress=progress))


class LiteLM:
    """A model ready for early-exit generation (what :func:`load` returns).

    Attributes:
        lite_model: the :class:`LiteModel` the decoding functions of :mod:`lite.decoding` take.
        model: the transformers model (e.g. for ``model.generate``), ``tokenizer`` its tokenizer.
    """

    def __init__(self, lite_model: LiteModel) -> None:
        self.lite_model = lite_model

    @property
    def model(self) -> torch.nn.Module:
        return self.lite_model.model

    @property
    def tokenizer(self):
        return self.lite_model.tokenizer

    @property
    def num_layers(self) -> int:
        """L, the number of decoder layers."""
        return self.lite_model.num_layers

    @property
    def exit_layers(self) -> list[int]:
        """The model's exit layers (ending with L), from its ``lite_config.json`` or the defaults."""
        return self.lite_model.exit_layers

    @property
    def custom_generate(self):
        """lite's early-exit loop for ``self.model.generate(..., custom_generate=lm.custom_generate, exit=...)``
        (:func:`lite.decoding.hf_generate.custom_generate` bound to this model, its tokenizer and its
        ``lite_config.json``): returns what ``generate`` returns, with the exit record on request."""
        from .decoding.hf_generate import custom_generate

        return functools.partial(custom_generate, lite_model=self.lite_model)

    def __repr__(self) -> str:
        return f"LiteLM({self.lite_model.source!r}, layers={self.num_layers}, exits={self.exit_layers})"

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: Prompt, prompt_format: str | None = None, *, what: str = "prompt") -> list[int]:
        """Token ids of one prompt, formatted as ``lite generate`` formats it: a string as an instruction
        (``--prompt-format``, default the model's own: its ``lite_config.json``, else the chat template when
        the tokenizer has one, else Alpaca), a list of chat messages through the chat template (or Alpaca).

        Raises:
            LiteError: an empty prompt, malformed messages, an unknown format (naming ``what``).
        """
        fmt = prompt_format or default_format(self.lite_model)
        if fmt not in FORMATS:
            raise LiteError(f"prompt_format must be one of {FORMATS}, got {fmt!r}")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise LiteError(f"{what}: the prompt is empty: give some text")
            return encode_prompt(self.tokenizer, prompt, fmt=fmt)
        return encode_messages(self.tokenizer, check_messages(prompt, what), fmt)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Prompt | Sequence[Prompt], exit: str | None = None, *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None, kv: str = "copy", threshold_scale: float = 1.0,
                 thresholds: str | dict[int, float] | None = None, confidence: str | None = None,
                 exit_layers: str | list[int] | None = None, gate: bool = False, max_draft: int | None = None,
                 draft_stop: float | None = None, draft_vocab: int | None = None, exit_vocab: int | None = None,
                 prompt_format: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE, stream: bool = False,
                 batch_invariant: bool | None = None,
                 ) -> GenerationResult | list[GenerationResult] | Iterator[TokenRecord] | Iterator[tuple[int, TokenRecord]]:
        """Generate with early exit; the arguments are ``lite generate``'s flags, with its defaults.

        Args:
            prompts: one prompt (a string, or a conversation: a list of ``{"role", "content"}`` dicts), or a
                list of prompts (strings and conversations may mix). A list is decoded by the batched
                engine, ``batch_size`` at a time, each row exactly as it decodes alone (speculative
                decoding runs one prompt at a time).
            exit: "none", "static:K", "dynamic", "gate", "speculative[:N]" or "auto"; None: dynamic when the
                model is calibrated (or ``thresholds``/``gate`` are given), else none (``--exit``).
            max_new_tokens, temperature, top_p, seed, stop, kv: sampling and stopping (temperature 0 is
                greedy; ``kv`` is "copy" or "recompute", what later tokens see at skipped layers).
            threshold_scale, thresholds, confidence, exit_layers, gate, max_draft, draft_stop, draft_vocab,
            exit_vocab: the exit flags of every verb (:class:`lite.decoding.spec.ExitOptions`).
            prompt_format: "chat", "alpaca" or "raw" for string prompts (default: the model's own).
            stream: yield tokens as they are produced instead of returning results: a
                :class:`TokenRecord` per token for one prompt, ``(index, TokenRecord)`` for a list.
            batch_invariant: every prompt of a list is computed exactly as it is alone (True): a greedy
                prompt gets the same tokens whatever it is batched with, and a speculative verify computes
                one position at a time, so it is lossless in every dtype. False batches the rows' matrix
                products (faster for long lists; tokens may then differ from the prompt alone at near-ties,
                mostly in bfloat16). None (the default, as ``lite serve``): on in bfloat16/float16, off in
                float32 (:func:`lite.decoding.engine.default_invariant`). One prompt is the same either way,
                but for speculative decoding.

        Returns:
            For one prompt a :class:`GenerationResult` (``text``, ``token_ids``, ``exit_layers`` per token,
            ``tokens`` with confidences, ``layer_cost_improvement``, ``compute_cost_improvement`` and the
            FLOPs record ``cost``); for a list, one per prompt in order; with ``stream`` an iterator.

        Raises:
            LiteError: before anything is decoded, for a bad prompt (naming its index), a bad exit
                argument or setting (naming the flag), or a prompt longer than the model's context.
        """
        items, single = _as_prompt_list(prompts)
        if batch_invariant is not None and not isinstance(batch_invariant, bool):
            raise LiteError(f"batch_invariant must be True, False or None (by dtype), got {batch_invariant!r}")
        if batch_size < 1:
            raise LiteError(f"batch_size must be >= 1, got {batch_size}")
        lm = self.lite_model
        if batch_invariant is None:
            batch_invariant = default_invariant(lm)
        policy = build_policy(lm, ExitOptions(
            exit=exit, threshold_scale=threshold_scale, thresholds=thresholds, confidence=confidence,
            exit_layers=exit_layers, gate=gate, max_draft=max_draft, draft_stop=draft_stop, draft_vocab=draft_vocab,
            exit_vocab=exit_vocab,
        ), batch=1 if batch_invariant else min(batch_size, len(items)))  # auto is priced at the rows run together
        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      seed=seed, stop=list(stop or []), kv=kv)
        ids = []
        for i, prompt in enumerate(items):
            what = "prompts" if single else f"prompts[{i}]"
            ids.append(self.encode(prompt, prompt_format, what=what))
            try:
                check_settings(lm, ids[-1], settings)  # every prompt is checked before the first is decoded
            except LiteError as exc:
                raise LiteError(f"{what}: {exc}") from None
        # batch_size at a time (speculative decoding: one at a time, lite.decoding.batch_limit); one prompt is a
        # batch of one
        if stream:
            records = _stream_batch(lm, ids, policy, settings, batch_size=batch_size, invariant=batch_invariant)
            return (record for _, record in records) if single else records
        results = _generate_batch(lm, ids, policy, settings, batch_size=batch_size, invariant=batch_invariant)
        return results[0] if single else results


def _as_prompt_list(prompts: object) -> tuple[list[Prompt], bool]:
    """``(prompts as a list, whether one prompt was given)``; a list of dicts is one conversation.

    Raises:
        LiteError: anything but a string, a conversation, or a non-empty list of those (naming the index).
    """
    if isinstance(prompts, str):
        return [prompts], True
    if isinstance(prompts, (list, tuple)) and prompts:
        if all(isinstance(p, dict) for p in prompts):
            return [list(prompts)], True
        for i, p in enumerate(prompts):
            if isinstance(p, dict):
                raise LiteError(f"prompts[{i}] is a message dict among other prompts: wrap each conversation in "
                                f"its own list, e.g. [[{{'role': 'user', 'content': ...}}], 'a string prompt']")
            if not isinstance(p, (str, list)):
                raise LiteError(f"prompts[{i}]: a prompt is a string or a list of chat messages, got "
                                f"{type(p).__name__}")
        return list(prompts), False
    what = "an empty list" if isinstance(prompts, (list, tuple)) else type(prompts).__name__
    raise LiteError(f"prompts: give a string, a list of chat messages, or a list of either; got {what}")
