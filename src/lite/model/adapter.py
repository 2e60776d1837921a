"""The model adapter: the one module that touches Hugging Face internals.

It wraps a transformers causal LM of the Llama family (Llama, Mistral, Qwen2/3, SmolLM: an embedding, a
list of decoder blocks, a rotary embedding, a final RMSNorm and an LM head) and exposes what LITE needs:

* the depth L and the exit layers (layer k = output of decoder block k, 1-indexed);
* hidden states of chosen layers, and exit logits through the model's *own* final norm and head, with the
  norm applied exactly once per exit, and through the exit's module first when it has one
  (:mod:`lite.model.exit_modules`; the final layer never has one);
* decode-time primitives: embed, rotary embeddings, one decoder block over a slice of positions with a
  per-layer cache, and the K/V projections of a block (for the "copy" strategy of skipped layers);
* attention exit modules (decoder blocks that attend over earlier positions): their K/V writes
  (:meth:`LiteModel.write_exit_kv`) and their reads, from the decode cache or over whole sequences.

It never copies a transformers forward: blocks are called as modules, the cache is handed to them through
the ``cache.update(key, value, layer_idx)`` protocol the attention modules use.

Checked against transformers 5.0 to 5.24 (``LlamaDecoderLayer.forward`` returns a tensor; the last entry of
``output_hidden_states`` is already normed). The keyword under which a decoder block takes its cache was
``past_key_values`` up to 5.23 and is ``cache`` from 5.24 on (the old name warns, and stops working at
5.40); :func:`cache_keyword` reads it once from the block's signature when the model is wrapped.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import LiteError
from .config import LiteConfig
from .exit_modules import ExitModules
from .fast_block import FastBlocks, fast_blocks

TRANSFORMERS_CHECKED = ("5.0", "5.24")  # the oldest and newest transformers the adapter was tested with


def cache_keyword(block: nn.Module) -> str:
    """The keyword a decoder block's ``forward`` takes its K/V cache under.

    ``cache`` from transformers 5.24 on, ``past_key_values`` before. Read from the signature (the
    deprecation decorator of 5.24 keeps the wrapped signature visible), so the choice follows the installed
    block, not a version number, and is made once per model.
    """
    params = inspect.signature(block.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(
        f"{type(block).__name__}.forward takes neither 'cache' nor 'past_key_values': this transformers "
        f"version is newer than lite knows (checked {TRANSFORMERS_CHECKED[0]} to {TRANSFORMERS_CHECKED[-1]})"
    )


class KVCache:
    """Key/value cache for B sequences that advance independently: one length per (block, row).

    Early exit makes blocks fall behind each other (a token that left at layer 8 has no K/V in blocks 9..L
    until they are filled or recomputed), and the rows of a batch advance at their own pace, so every
    (block, row) keeps its own length. Row r keeps its positions at slots 0, 1, ... (no left padding):
    slot = absolute position. A call of a block over some rows writes each row's new positions at that
    row's own length and attends under a mask that hides every slot past the row's own positions, so rows
    of different lengths, and rows that skipped blocks, share one buffer. Buffers are
    ``(B, H_kv, max_len, head_dim)`` per block, allocated once (they grow only for continuous batching).
    A batch of one is B = 1. Attention exit modules (:mod:`lite.model.exit_modules`) keep their K/V in
    extra layers after the L blocks, one per exit with such a module, in increasing exit order
    (:meth:`LiteModel.exit_kv_index`); they follow the same rules.

    ``exact`` (batch-invariant decoding, :class:`lite.decoding.Decoder` ``invariant=True``): every block call
    attends over a contiguous copy of its row's K/V, exactly its own positions long, so that what attention
    reads does not depend on how many rows share the buffer or how long the buffer is (``max_len`` grows
    with the longest row); that is the layout transformers' own cache hands the attention kernel.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [[0] * batch for _ in range(num_layers)]  # lengths[block][row], host-side
        self.batch = batch
        self.max_len = max_len
        self.exact = False  # attention over contiguous copies of one row's own positions (see the docstring)
        self._memo: dict[tuple, Any] = {}  # per-step tables shared by the blocks (see memo)

    def memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()`` once per ``key``: the index tensors, masks and rotary tables of one decode step are the
        same for every block the same rows go through, so they are built once, not once per block. Keys
        hold the rows and their positions, so a later step never sees an earlier step's table."""
        value = self._memo.get(key)
        if value is None:
            if len(self._memo) > 256:  # earlier steps' entries: never asked for again
                self._memo.clear()
            value = self._memo[key] = make()
        return value

    def grow(self, batch: int, max_len: int) -> None:
        """Reallocate to ``batch`` rows of ``max_len`` slots (neither smaller than now), keeping every
        cached position (continuous batching: a new row, or a row that needs more room)."""
        if batch < self.batch or max_len < self.max_len:
            raise ValueError(f"a cache only grows: {self.batch}x{self.max_len} -> {batch}x{max_len}")
        for store in (self.keys, self.values):
            for b, old in enumerate(store):
                new = old.new_zeros((batch, old.shape[1], max_len, old.shape[3]))
                new[:self.batch, :, :self.max_len] = old
                store[b] = new
        for lengths in self.lengths:
            lengths.extend([0] * (batch - self.batch))
        self.batch, self.max_len = batch, max_len

    def truncate(self, row: int, length: int) -> None:
        """Roll every block of ``row`` back to at most ``length`` positions (a speculative rejection)."""
        for lengths in self.lengths:
            lengths[row] = min(lengths[row], length)

    def reset(self, row: int) -> None:
        """Forget every position of ``row`` (its slot goes to a new sequence)."""
        for lengths in self.lengths:
            lengths[row] = 0

    def view(self, block: int, rows: list[int], new: int, reads: bool = False) -> _RowsView:
        """The cache as one block call over ``rows`` sees it (``new`` positions per row); ``reads``: the
        call's positions are each row's last ``new`` cached ones, whose K/V it reads and does not write
        (an attention exit reading its state after the token's K/V were written)."""
        starts = [self.lengths[block][r] - (new if reads else 0) for r in rows]
        return _RowsView(self, block, rows, starts, new, reads)

    def row(self, r: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of row ``r`` in ``block`` over its cached positions: ``(H_kv, n, head_dim)`` each."""
        n = self.lengths[block][r]
        return self.keys[block][r, :, :n], self.values[block][r, :, :n]


class _RowsView:
    """The cache protocol the attention modules call (``update``), for one block call over some rows."""

    def __init__(self, cache: KVCache, block: int, rows: list[int], starts: list[int], new: int,
                 reads: bool = False) -> None:
        self.cache, self.block, self.rows, self.starts, self.new = cache, block, rows, starts, new
        self.reads = reads  # the K/V of these positions are cached already: update only reads
        self.span = max(starts) + new  # slots the call attends over
        self.same_start = min(starts) == self.span - new  # every row writes the same slots
        self.every_row = len(rows) == cache.batch and rows == list(range(cache.batch))
        if self.span > cache.max_len:
            raise RuntimeError(f"cache overflow at block {block}: {self.span} positions > {cache.max_len}")

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        c, b, t = self.cache, self.block, self.new
        keys, values = c.keys[b], c.values[b]
        if self.reads:  # an exit's read: these positions' K/V are there already
            pass
        elif self.every_row and self.same_start:  # a plain slice: no index tensors
            s = self.starts[0]
            keys[:, :, s:s + t] = key
            values[:, :, s:s + t] = value
        elif t == 1:  # one position per row, each at its own slot
            index = self._index(keys.device)
            slots = c.memo(("starts", tuple(self.starts), keys.device),
                           lambda: torch.tensor(self.starts, device=keys.device))
            keys[index, :, slots] = key[:, :, 0]
            values[index, :, slots] = value[:, :, 0]
        else:
            for i, (r, s) in enumerate(zip(self.rows, self.starts)):
                keys[r, :, s:s + t] = key[i]
                values[r, :, s:s + t] = value[i]
        for r, s in zip(self.rows, self.starts):
            c.lengths[b][r] = s + t  # unchanged when it reads
        if c.exact:
            if len(self.rows) != 1:
                raise RuntimeError("a batch-invariant cache runs one row per block call")
            r = self.rows[0]
            return keys[r:r + 1, :, :self.span].contiguous(), values[r:r + 1, :, :self.span].contiguous()
        if self.every_row:  # every row, in order: views, no copy
            return keys[:, :, :self.span], values[:, :, :self.span]
        if len(self.rows) == 1:
            r = self.rows[0]
            return keys[r:r + 1, :, :self.span], values[r:r + 1, :, :self.span]
        index = self._index(keys.device)
        return keys[index, :, :self.span], values[index, :, :self.span]

    def _index(self, device: torch.device) -> torch.Tensor:
        return self.cache.memo(("rows", tuple(self.rows), device), lambda: torch.tensor(self.rows, device=device))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.starts)

    def mask(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The additive mask of this call (:meth:`_build_mask`), built once per step for the blocks that see
        the same rows and positions; None when the attention kernel needs none: one new position per row,
        all at the last slot (each query sees everything cached), or every row starting at slot 0 (plain
        causal, SDPA's own rule)."""
        if self.same_start and (self.new == 1 or self.starts[0] == 0):
            return None
        return self.cache.memo(("mask", tuple(self.starts), self.new, dtype, device),
                               lambda: self._build_mask(dtype, device))

    def _build_mask(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Additive mask ``(b, 1, new, span)``: query j of row i (at slot start_i + j) sees slots <= it."""
        starts = torch.tensor(self.starts, device=device)
        q_pos = starts[:, None] + torch.arange(self.new, device=device)[None]  # (b, new)
        k_pos = torch.arange(self.span, device=device)  # (span,)
        mask = torch.zeros(len(self.rows), 1, self.new, self.span, dtype=dtype, device=device)
        mask.masked_fill_((k_pos[None, None, :] > q_pos[:, :, None])[:, None], torch.finfo(dtype).min)
        return mask


class LiteModel:
    """A Hugging Face causal LM seen as L decoder blocks with exits.

    Attributes:
        model: the wrapped ``PreTrainedModel`` (possibly a peft model during training).
        tokenizer: its tokenizer.
        lite_config: exit layers, prompt format, thresholds (``lite_config.json``).
        source: what the model was loaded from (folder, hub id or alias), for provenance.
        folder: the local folder holding ``lite_config.json`` (the adapter folder for LoRA), or None for a
            model that came straight from the hub; calibration writes thresholds and gates here.
        exit_modules: the trained exit modules (:class:`ExitModules`), or None for raw exits.
    """

    def __init__(self, model: nn.Module, tokenizer, lite_config: LiteConfig | None = None,
                 source: str | None = None, folder: str | None = None,
                 exit_modules: ExitModules | None = None) -> None:
        self.model = model
        self.exit_modules = exit_modules
        self.tokenizer = tokenizer
        self.source = source
        self.folder = folder
        base = self._causal_lm()
        for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(base.model, part):
                raise TypeError(
                    f"{type(base).__name__} has no model.{part}: lite supports Llama-family decoders "
                    f"(Llama, Mistral, Qwen2, SmolLM) with embed_tokens, layers, norm, rotary_emb and lm_head"
                )
        self._cache_kw = cache_keyword(self.blocks[0])  # decided once, at wrap time
        self._fast: FastBlocks | None = None  # plain Llama blocks called on their weights (new_cache decides)
        self._fast_exits: FastBlocks | None = None  # the same for the attention exit modules' blocks
        self.lite_config = lite_config or LiteConfig.default_for(self.num_layers)
        if self.lite_config.num_layers != self.num_layers:
            raise ValueError(
                f"lite_config.json says {self.lite_config.num_layers} layers but the model has "
                f"{self.num_layers}; the config belongs to another model"
            )

    # ----------------------------------------------------------------- parts
    def _causal_lm(self) -> nn.Module:
        """The ``*ForCausalLM`` module under any peft wrapping."""
        m = self.model
        if hasattr(m, "get_base_model"):
            m = m.get_base_model()
        return m

    @property
    def decoder(self) -> nn.Module:
        return self._causal_lm().model

    @property
    def blocks(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.decoder.norm

    @property
    def lm_head(self) -> nn.Module:
        return self._causal_lm().lm_head

    @property
    def config(self):
        return self._causal_lm().config

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def exit_layers(self) -> list[int]:
        return list(self.lite_config.exit_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def head_dim(self) -> int:
        c = self.config
        return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)

    @property
    def kv_heads(self) -> int:
        c = self.config
        return int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    # ----------------------------------------------------------------- exits
    def exit_normed(self, hidden: torch.Tensor, layer: int, direct: bool = False, *, cache: KVCache | None = None,
                    rows: list[int] | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The normed exit state of a *raw* block output: the exit module of ``layer`` (if any), then the
        final norm, once. This is what the head and the learned gate read.

        An attention exit module (:meth:`exit_reads_context`) reads earlier positions too, so it needs to
        know where ``hidden`` sits: at decode time ``cache`` and ``rows`` (``hidden`` (b, D) is one position
        per cache row, each row's last one in the exit's K/V, written when the token passed the layer:
        :meth:`write_exit_kv`), else whole sequences from position 0 (``hidden`` (B, T, D), causal; right
        padding only). The other kinds map each position alone and ignore both.

        Args:
            hidden: (..., D) output of decoder block ``layer`` (un-normed).
            layer: k in 1..L; layer L (and any layer without a module) goes through the norm only.
            direct: run the norm's ``forward`` itself, without the module call's hooks (see
                :meth:`forward_exit_states`).
            cache, rows: the decode cache and the cache rows of ``hidden``'s rows (attention modules).
            positions: (P,) with whole sequences (B, T, D): return only these positions, (B, P, D) (the
                per-position kinds then run on those positions only).
        Returns:
            (..., D) normed state.
        """
        if self.exit_reads_context(layer):  # over every position, then the ones asked for
            hidden = self._attention_exit(layer, hidden, cache, rows)
            hidden = hidden if positions is None else hidden[:, positions]
        else:  # the ones asked for only
            hidden = hidden if positions is None else hidden[:, positions]
            if self.exit_modules is not None and layer < self.num_layers:
                hidden = self.exit_modules.apply_at(layer, hidden)
        return self.final_norm.forward(hidden) if direct else self.final_norm(hidden)

    def exit_reads_context(self, layer: int) -> bool:
        """Whether the exit module of ``layer`` attends over earlier positions (an attention module)."""
        return self.exit_modules is not None and layer < self.num_layers and self.exit_modules.reads_context(layer)

    def _attention_exit(self, layer: int, hidden: torch.Tensor, cache: KVCache | None, rows: list[int] | None
                        ) -> torch.Tensor:
        """The block of the attention exit module of ``layer`` over ``hidden`` (see :meth:`exit_normed`)."""
        block = self.exit_modules.block(layer)
        if cache is None:  # whole sequences from position 0: causal, as the prefill runs a block
            if hidden.dim() != 3:
                raise LiteError(f"the attention exit module of layer {layer} reads every earlier position: give "
                                f"whole sequences (B, T, D) from position 0, or a decode cache and rows")
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
            cos_sin = self.decoder.rotary_emb(hidden, positions)
            return block(hidden, attention_mask=None, position_embeddings=cos_sin, use_cache=False)
        rows = list(range(cache.batch)) if rows is None else rows
        view = cache.view(self.exit_kv_index(layer), rows, 1, reads=True)
        index = self.exit_modules.context_layers.index(layer)
        return self._call_block(self._fast_exits, index, block, hidden[:, None], view)[:, 0]

    def exit_module_flops(self, layer: int, position: int = 0) -> int:
        """FLOPs of one evaluation of the exit module of ``layer`` (0 without one); ``position``: the absolute
        position read (an attention module attends to ``position + 1`` positions; the others ignore it)."""
        if self.exit_modules is None or layer >= self.num_layers:
            return 0
        return self.exit_modules.flops(layer, position)

    @property
    def exit_kv_layers(self) -> list[int]:
        """The exit layers whose module keeps K/V of its own in the decode cache (attention modules)."""
        return [] if self.exit_modules is None else list(self.exit_modules.context_layers)

    def exit_kv_index(self, layer: int) -> int | None:
        """The cache layer (0-based, after the L blocks) holding the K/V of the exit module of ``layer``, or
        None when it has none."""
        kv_layers = self.exit_kv_layers
        return self.num_layers + kv_layers.index(layer) if layer in kv_layers else None

    def exit_logits(self, hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Next-token logits from a *raw* (un-normed) block output: :meth:`exit_normed`, then the LM head.

        Args:
            hidden: (..., D) output of decoder block ``layer`` (un-normed).
            layer: k in 1..L (None: L, the final layer).
        Returns:
            (..., V) logits in the model's dtype.
        """
        return self.head_logits(self.exit_normed(hidden, self.num_layers if layer is None else layer))

    def head_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """The LM head on normed states (..., D) -> (..., V).

        For 2..16 rows without gradients it computes (W @ x^T)^T instead of x @ W^T: with MKL on a CPU the
        second form takes a small-M GEMM path that costs 2-3x more for the 49152 x 576 head (measured:
        1 row 8.9 ms; 3 rows 30 ms as x @ W^T, 12 ms as W @ x^T), and a speculative verify evaluates the
        head on exactly such a handful of rows. Same values up to float rounding.
        """
        head = self.lm_head
        rows = normed.numel() // normed.shape[-1] if normed.shape[-1] else 0
        if 1 < rows <= 16 and type(head) is nn.Linear and not (torch.is_grad_enabled() and normed.requires_grad):
            out = torch.mm(head.weight, normed.reshape(rows, -1).T).T
            if head.bias is not None:
                out = out + head.bias
            return out.reshape(*normed.shape[:-1], out.shape[-1])
        return head(normed)

    def vocab_head(self, ids: list[int]):
        """The LM head restricted to the vocabulary rows ``ids``: the head of an exit vocabulary.

        Returns a function from a *normed* state (..., D) to logits (..., len(ids)) over those ids, in
        order; the rows are copied once so that each call reads only len(ids) x D weights. The last one
        made is kept, so that decoding request after request with the same vocabulary copies the rows once
        (a change of the head's weights makes a new copy).
        """
        head = self.lm_head
        key = (tuple(ids), head.weight.data_ptr(), head.weight._version)
        cached = getattr(self, "_vocab_head", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        index = torch.tensor(ids, dtype=torch.long, device=head.weight.device)
        weight = head.weight.detach().index_select(0, index).contiguous()
        bias = None if getattr(head, "bias", None) is None else head.bias.detach().index_select(0, index)
        fn = lambda normed: torch.nn.functional.linear(normed, weight, bias)
        self._vocab_head = (key, fn)
        return fn

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      layers: list[int] | None = None) -> dict[int, torch.Tensor]:
        """Normed exit states of the chosen layers from one ordinary transformers forward pass.

        Uses the decoder's ``output_hidden_states`` (L+1 entries: embeddings, blocks 1..L-1 raw, block L
        already normed in transformers 5.x), applying the final norm to layers below L only, so that every
        state comes out normed exactly once. Gradients flow (used by training).

        Returns:
            {layer: (B, T, D) normed state}; feed it to ``lm_head`` for logits.
        """
        layers = layers or self.exit_layers
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                           use_cache=False)
        return self._normed_exits(out.hidden_states, layers)

    def _normed_exits(self, states, layers: list[int], direct: bool = False) -> dict[int, torch.Tensor]:
        """transformers' ``hidden_states`` (L+1 entries, the last already normed) -> {layer: normed state},
        through the exit modules below L; ``direct``: see :meth:`forward_exit_states`."""
        L = self.num_layers
        return {k: states[k] if k == L else self.exit_normed(states[k], k, direct) for k in layers}

    def forward_exit_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                            layers: list[int] | None = None, module: nn.Module | None = None
                            ) -> dict[int, torch.Tensor]:
        """Normed exit states from one forward of the causal LM itself, without full-vocab logits.

        For training: the call goes through ``module`` (the model as wrapped by the trainer, e.g.
        DistributedDataParallel, or ``self.model``) so that wrappers see the forward; the head is skipped
        with ``logits_to_keep`` = no position, because the LITE loss evaluates the head itself at response
        positions only. Same normalisation rule as :meth:`hidden_states`.

        The final norm is applied to the intermediate states by its ``forward`` itself, not through the
        module call: under FSDP2 (``lite train --fsdp``) the norm and the head form a unit whose hooks
        gather its weights once per forward of the model; calling the module again after that forward
        re-enters those hooks and breaks the backward (a segmentation fault with torch 2.13 on gloo).
        The weights are still gathered then, so the direct call computes the same; without FSDP the two
        calls are the same.

        Returns:
            {layer: (B, T, D) normed state}.
        """
        layers = layers or self.exit_layers
        module = module if module is not None else self.model
        no_position = torch.empty(0, dtype=torch.long, device=input_ids.device)
        out = module(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                     use_cache=False, logits_to_keep=no_position)
        return self._normed_exits(out.hidden_states, layers, direct=True)

    # ----------------------------------------------------------------- decode primitives
    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        """A cache for ``batch`` independent sequences of up to ``max_len`` positions each, in the model's
        dtype and device."""
        self._fast = fast_blocks(self.model, self.blocks)  # seen afresh per decode: a model wrapped later runs its modules
        exit_blocks = [self.exit_modules.block(k) for k in self.exit_kv_layers]
        self._fast_exits = fast_blocks(self.model, exit_blocks) if exit_blocks else None
        return KVCache(self.num_layers + len(exit_blocks), batch, self.kv_heads, self.head_dim, max_len, self.dtype,
                       self.device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) input of block 1."""
        return self.decoder.embed_tokens(input_ids)

    def _rope_for(self, view: _RowsView) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary (cos, sin) ``(b, new, head_dim)`` at each row's own positions (slot = absolute position),
        built once per step for every block call over the same positions."""
        return view.cache.memo(("rope", tuple(view.starts), view.new), lambda: self._build_rope(view))

    def _build_rope(self, view: _RowsView) -> tuple[torch.Tensor, torch.Tensor]:
        if view.same_start:  # one run of positions shared by every row
            positions = torch.arange(view.starts[0], view.starts[0] + view.new, device=self.device)[None]
        else:
            starts = torch.tensor(view.starts, device=self.device)
            positions = starts[:, None] + torch.arange(view.new, device=self.device)[None]
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        return self.decoder.rotary_emb(probe, positions)

    def run_block(self, layer: int, hidden: torch.Tensor, cache: KVCache, rows: list[int] | None = None
                  ) -> torch.Tensor:
        """Run decoder block ``layer`` (1-indexed) for ``rows`` of the cache, each over its next positions,
        appending their K/V.

        Args:
            layer: k in 1..L.
            hidden: (b, T, D) inputs of block k (the outputs of block k-1) for the b = len(rows) rows, at the
                T positions that follow each row's cached ones in this block.
            cache: the cache; each row's length in block k grows by T.
            rows: which cache rows these are, in the order of ``hidden`` (None: every row, in order).
        Returns:
            (b, T, D) raw output of block k.
        """
        rows = list(range(cache.batch)) if rows is None else rows
        view = cache.view(layer - 1, rows, hidden.shape[1])
        return self._call_block(self._fast, layer - 1, self.blocks[layer - 1], hidden, view)

    def _call_block(self, fast: FastBlocks | None, index: int, block: nn.Module, hidden: torch.Tensor,
                    view: _RowsView) -> torch.Tensor:
        """``block`` (number ``index`` of ``fast``, when its blocks run on their weights) over ``hidden``
        (b, T, D) with the cache ``view``: its mask and rotary tables, its K/V."""
        if fast is not None:
            return fast(index, hidden, view.mask(self.dtype, self.device), self._rope_for(view), view)
        return block(hidden, attention_mask=view.mask(self.dtype, self.device),
                     position_embeddings=self._rope_for(view), use_cache=True, **{self._cache_kw: view})

    def fill_kv(self, layer: int, hidden: torch.Tensor, cache: KVCache, rows: list[int] | None = None) -> None:
        """Append K/V of block ``layer`` computed from ``hidden`` without running the block ("copy").

        For a token that exited below ``layer``, its exit state stands in for the input of every skipped
        block; only the key and value projections of the block run on it (input norm, k/v projections,
        optional per-head key norm, rotary on keys), so later tokens can attend to that position.

        Args:
            hidden: (b, T, D) stand-in inputs of block ``layer`` at each row's next T uncached positions.
            rows: which cache rows these are (None: every row, in order).
        """
        self._write_kv(self.blocks[layer - 1], layer - 1, hidden, cache, rows)

    def write_exit_kv(self, layer: int, hidden: torch.Tensor, cache: KVCache, rows: list[int] | None = None) -> bool:
        """Append the K/V of the attention exit module of ``layer`` at each row's next T positions, from
        their raw layer-``layer`` states (or, for a token that left below ``layer``, its exit state: the
        "copy" stand-in). Every token whose layer-``layer`` state exists writes them, whether or not it
        leaves there, so that later tokens' reads of the exit attend over every earlier position.

        Args:
            hidden: (b, T, D) raw states at each row's next T uncached positions in the exit's K/V.
            rows: which cache rows these are (None: every row, in order).
        Returns:
            Whether anything was written (False: ``layer`` has no attention module; nothing to do).
        """
        index = self.exit_kv_index(layer)
        if index is None:
            return False
        self._write_kv(self.exit_modules.block(layer), index, hidden, cache, rows)
        return True

    def _write_kv(self, block: nn.Module, index: int, hidden: torch.Tensor, cache: KVCache, rows: list[int] | None
                  ) -> None:
        """K/V projections of ``block`` over ``hidden`` (b, T, D), appended to cache layer ``index``."""
        rows = list(range(cache.batch)) if rows is None else rows
        view = cache.view(index, rows, hidden.shape[1])
        key, value = self._kv_projections(block, hidden, self._rope_for(view))
        view.update(key, value, index)

    def _kv_projections(self, block: nn.Module, hidden: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Key (rotated) and value of ``block`` for inputs (b, T, D): ``(b, H_kv, T, head_dim)`` each."""
        attn = block.self_attn
        b, t, _ = hidden.shape
        x = block.input_layernorm(hidden)
        key = attn.k_proj(x).view(b, t, -1, self.head_dim)
        value = attn.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if getattr(attn, "k_norm", None) is not None:  # Qwen3-style per-head key norm
            key = attn.k_norm(key)
        key = key.transpose(1, 2)
        cos, sin = cos_sin
        apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        key, _ = apply_rotary(key, key, cos, sin)
        return key, value
