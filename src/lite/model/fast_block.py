"""Llama decoder blocks called on their weights, without ``nn.Module`` dispatch.

A decode step of a small model on a CPU spends a fifth of its time outside the matrix products: module
``__call__`` wrappers, hooks, keyword-deprecation decorators and attribute lookups, about 25 Python calls
per block. :class:`FastBlocks` runs the same tensor operations as transformers' ``LlamaDecoderLayer``, in
the same order, on the same weights (read at call time, so they are never stale), so its outputs are
bitwise equal to the module's (tested in float32 and bfloat16); only the dispatch around them goes.

It applies only where that equality is known to hold: every block exactly transformers' Llama layer,
attention, MLP and RMS norms, plain ``nn.Linear`` projections without bias (no LoRA or quantised layer
wrapped around them), SiLU, the SDPA attention, no hub kernels. Anything else runs the model's own
modules (:func:`fast_blocks` returns None), which is always correct.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

LLAMA = ("LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm")


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, op for op."""
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(dtype)


class FastBlocks:
    """The blocks of one model as plain functions over their weights (see the module docstring)."""

    def __init__(self, blocks: nn.ModuleList, sdpa) -> None:
        self.blocks = list(blocks)
        self.sdpa = sdpa
        first = self.blocks[0]
        self.rotary = sys.modules[type(first.self_attn).__module__].apply_rotary_pos_emb
        self.head_dim = first.self_attn.head_dim

    def __call__(self, index: int, hidden: torch.Tensor, mask: torch.Tensor | None, cos_sin, cache) -> torch.Tensor:
        """Block ``index`` (0-based) over ``hidden`` (b, T, D); ``cache`` is the block call's cache view."""
        block = self.blocks[index]
        attn, mlp = block.self_attn, block.mlp
        norm_in, norm_post = block.input_layernorm, block.post_attention_layernorm
        b, t, _ = hidden.shape
        shape = (b, t, -1, self.head_dim)
        x = _rms(hidden, norm_in.weight, norm_in.variance_epsilon)
        query = F.linear(x, attn.q_proj.weight).view(shape).transpose(1, 2)
        cos, sin = cos_sin
        if getattr(cache, "reads", False):  # an exit block whose K/V for these positions are cached: no k, v
            query, _ = self.rotary(query, query, cos, sin)
            key, value = cache.update(None, None, index)
        else:
            key = F.linear(x, attn.k_proj.weight).view(shape).transpose(1, 2)
            value = F.linear(x, attn.v_proj.weight).view(shape).transpose(1, 2)
            query, key = self.rotary(query, key, cos, sin)
            key, value = cache.update(key, value, index)
        out, _ = self.sdpa(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling)
        out = F.linear(out.reshape(b, t, -1).contiguous(), attn.o_proj.weight)
        hidden = hidden + out
        x = _rms(hidden, norm_post.weight, norm_post.variance_epsilon)
        x = F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight), mlp.down_proj.weight)
        return hidden + x


def fast_blocks(model: nn.Module, blocks: nn.ModuleList) -> FastBlocks | None:
    """:class:`FastBlocks` for ``blocks`` when every one is a plain transformers Llama block (see the module
    docstring), else None. Cheap: checked when a decode starts, so a model wrapped later (LoRA) is seen."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or getattr(model, "use_kernels", False) \
            or model.training:
        return None
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "attention_bias", True) \
            or getattr(config, "mlp_bias", True) or getattr(config, "pretraining_tp", 1) != 1:
        return None
    for block in blocks:
        parts = (block, getattr(block, "self_attn", None), getattr(block, "mlp", None),
                 getattr(block, "input_layernorm", None))
        if tuple(type(p).__name__ for p in parts) != LLAMA:
            return None
        if type(block.post_attention_layernorm).__name__ != LLAMA[3] or block._forward_hooks or block._forward_pre_hooks:
            return None
        linears = (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.self_attn.o_proj,
                   block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj)
        if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
            return None
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:
        return None
    return FastBlocks(blocks, sdpa_attention_forward)
