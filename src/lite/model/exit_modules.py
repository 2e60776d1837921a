"""Exit modules: a small trainable map per exit layer, between the layer-k state and the shared norm and head.

The EE-Tuning / tuned-lens / Balcony family: the backbone stays frozen, so the full model's
output is untouched, and each exit k < L gets its own module ``m_k``; the exit's logits become
``head(final_norm(m_k(h_k)))`` instead of ``head(final_norm(h_k))``. The final layer L never has one.

Kinds (``--exit-modules KIND``):

* ``affine``: ``W r + b`` with ``r = h / rms(h)``; W starts as the identity and b at zero, so an untrained
  module gives the raw exit (the final RMSNorm ignores the scale of its input). D*D + D parameters.
* ``mlp``: ``r + W2 silu(W1 r)`` (width 2D), W2 starts at zero: also the raw exit at first. 4*D*D + 3*D
  parameters (with biases on W1, W2).
* ``attention``: one decoder block of the model's own class and config (Balcony's exit), started as a
  copy of backbone block k+1, so that an untrained module at k is close to the raw exit at k+1. It reads
  the raw layer-k state of the current token and attends over its own keys and values of every earlier
  position, which it keeps in the decode cache beside the backbone's (:class:`lite.model.adapter.KVCache`):
  every token whose layer-k state exists writes them; the block itself (query, attention, MLP) runs only
  where the exit state is read. Running it is the adapter's work (it holds the rotary embedding and the
  cache); this module only holds the block.

The affine and MLP inputs are normalised (``r``) because middle-layer states of Llama-family models have
norms that vary by orders of magnitude across layers and positions; the module then learns on a fixed
scale. The attention block has its own input norm, and keeps the raw state on its residual path as the
backbone's next block does.

Saved as ``exit_modules.safetensors`` in the checkpoint folder (tensors ``<layer>.<param>``, metadata:
kind, layers, hidden size) and named in ``lite_config.json`` (``exit_modules``); loaded with the model.
FLOPs per evaluation are :meth:`ExitModules.flops` (for ``attention`` they grow with the position read);
the decoder counts them for every evaluation, and the attention kind's K/V writes separately.

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import LiteError
from ..files import write_atomic

EXIT_MODULE_KINDS = ("affine", "mlp", "attention")
EXIT_MODULES_FILE = "exit_modules.safetensors"


def unit_rms(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``h / rms(h)`` over the last axis, computed in float32."""
    x = h.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


class AffineExit(nn.Module):
    """``W r + b``, identity at initialisation."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(hidden))
            self.proj.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        return self.proj(unit_rms(h))

    def flops(self) -> int:
        d = self.proj.in_features
        return 2 * d * d + 4 * d  # the matrix-vector product, bias and the rms scaling


class MLPExit(nn.Module):
    """``r + W2 silu(W1 r)``, the identity map at initialisation (W2 = 0)."""

    def __init__(self, hidden: int, width: int | None = None) -> None:
        super().__init__()
        width = width or 2 * hidden
        self.up = nn.Linear(hidden, width)
        self.down = nn.Linear(width, hidden)
        with torch.no_grad():
            self.down.weight.zero_()
            self.down.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = unit_rms(h)
        return r + self.down(torch.nn.functional.silu(self.up(r)))

    def flops(self) -> int:
        d, w = self.up.in_features, self.up.out_features
        return 2 * d * w * 2 + 4 * w + 6 * d


class AttentionExit(nn.Module):
    """One decoder block over the raw layer-k state, a copy of backbone block k+1 at first (``block``).

    Its ``forward`` is never called by itself: the adapter runs ``block`` with the rotary embedding and the
    exit's own K/V (:meth:`lite.model.adapter.LiteModel.exit_normed`)."""

    reads_context = True

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = copy.deepcopy(block).requires_grad_(True)  # the backbone's copy is frozen, this one trains

    def flops(self, position: int = 0) -> int:
        """The exit's read for one query at absolute ``position``: q and o projections, attention scores and
        weighted values over ``position + 1`` positions, and the MLP. Its own K/V for the position are
        written when the token passes the layer and are counted there (:meth:`kv_flops`). (Where blocks run
        as transformers modules instead of on their weights, not plain Llama blocks, the module's attention
        also projects k and v of the position it reads, which the cache view discards: uncounted work of
        that slower path, one K/V write's worth.)"""
        attn, mlp = self.block.self_attn, self.block.mlp
        weights = attn.q_proj.weight.numel() + attn.o_proj.weight.numel() + \
            sum(m.weight.numel() for m in mlp.modules() if isinstance(m, nn.Linear))
        query_width = attn.q_proj.weight.shape[0]
        return 2 * weights + 2 * 2 * query_width * (position + 1)

    def kv_flops(self) -> int:
        """Its key and value projections for one position (a K/V write)."""
        attn = self.block.self_attn
        return 2 * (attn.k_proj.weight.numel() + attn.v_proj.weight.numel())


_KINDS = {"affine": AffineExit, "mlp": MLPExit, "attention": AttentionExit}


class ExitModules(nn.Module):
    """One exit module per exit layer below L.

    Attributes:
        kind: "affine", "mlp" or "attention".
        layers: the exit layers that have a module (each < L), increasing.
        context_layers: the layers whose module attends over earlier positions (``attention``: all of
            ``layers``; else none), in order: each keeps K/V of its own in the decode cache.
    """

    def __init__(self, kind: str, layers: list[int], hidden: int, blocks: nn.ModuleList | None = None) -> None:
        """``blocks``: the backbone's decoder blocks, which the ``attention`` kind copies (block k+1 for the
        exit of layer k); the other kinds do not read them."""
        super().__init__()
        if kind not in _KINDS:
            raise LiteError(f"--exit-modules must be one of {EXIT_MODULE_KINDS}, got {kind!r}")
        self.kind = kind
        self.hidden = int(hidden)
        self.layers = sorted(int(k) for k in layers)
        if kind == "attention":
            if blocks is None or not all(1 <= k < len(blocks) for k in self.layers):
                raise ValueError("attention exit modules copy backbone block k+1 for layer k: give the blocks")
            made = {str(k): AttentionExit(blocks[k]) for k in self.layers}  # blocks[k] is block k+1
        else:
            made = {str(k): _KINDS[kind](hidden) for k in self.layers}
        self.per_layer = nn.ModuleDict(made)
        self.context_layers = list(self.layers) if kind == "attention" else []

    def has(self, layer: int) -> bool:
        return str(layer) in self.per_layer

    def reads_context(self, layer: int) -> bool:
        """Whether the module of ``layer`` attends over earlier positions (it needs their K/V or the whole
        sequence, not the state of one position)."""
        return layer in self.context_layers

    def block(self, layer: int) -> nn.Module:
        """The decoder block of the attention module of ``layer``."""
        return self.per_layer[str(layer)].block

    def apply_at(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``m_layer(h)``, or ``h`` itself for a layer without a module (L, or a layer not trained). Not for
        a module that reads context (the adapter runs those, with positions and K/V)."""
        module = self.per_layer[str(layer)] if str(layer) in self.per_layer else None
        if module is not None and getattr(module, "reads_context", False):
            raise RuntimeError(f"the attention exit module of layer {layer} runs through LiteModel.exit_normed")
        return h if module is None else module(h)

    def flops(self, layer: int, position: int = 0) -> int:
        """FLOPs of one evaluation of the module of ``layer`` (0 where there is none); ``position``: the
        absolute position read, which the attention kind's cost grows with (the others ignore it)."""
        if not self.has(layer):
            return 0
        module = self.per_layer[str(layer)]
        return module.flops(position) if self.reads_context(layer) else module.flops()

    def kv_flops(self, layer: int) -> int:
        """FLOPs of one K/V write of the module of ``layer`` for one position (0 for a module without K/V)."""
        return self.per_layer[str(layer)].kv_flops() if self.reads_context(layer) else 0

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def keep(self, layers: list[int]) -> ExitModules:
        """A copy holding the modules of ``layers`` only: a model trained with exits at many depths, decoded
        with fewer checks per token.

        Raises:
            LiteError: a layer has no module (names the layers that have one).
        """
        wanted = sorted(set(int(k) for k in layers))
        missing = [k for k in wanted if k not in self.layers]
        if missing or not wanted:
            raise LiteError(f"no exit module at layer(s) {missing or '(none given)'}; this model has modules at "
                            f"{self.layers}: keep some of those")
        kept = copy.deepcopy(self)
        for k in self.layers:
            if k not in wanted:
                del kept.per_layer[str(k)]
        kept.layers = wanted
        kept.context_layers = [k for k in self.context_layers if k in wanted]
        return kept

    # ------------------------------------------------------------------ files
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``exit_modules.safetensors`` into ``folder`` atomically; returns its path."""
        from safetensors.torch import save

        tensors = {f"{k}.{name}": p.detach().to("cpu", torch.float32).contiguous()
                   for k, module in self.per_layer.items() for name, p in module.state_dict().items()}
        meta = {"kind": self.kind, "layers": json.dumps(self.layers), "hidden": str(self.hidden)}
        path = Path(folder) / EXIT_MODULES_FILE
        write_atomic(path, save(tensors, metadata=meta))
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, hidden: int | None, num_layers: int,
             blocks: nn.ModuleList | None = None) -> ExitModules:
        """Read ``exit_modules.safetensors`` from ``folder``; checks it fits a model of this shape
        (``hidden`` None: the file's own width, for copying modules without their model).
        ``blocks``: the backbone's decoder blocks (the ``attention`` kind is built on copies of them, then
        its saved weights are loaded).

        Raises:
            LiteError: the file is missing, unreadable, or made for another model (names the file).
        """
        from safetensors import safe_open

        path = Path(folder) / EXIT_MODULES_FILE
        if not path.is_file():
            raise LiteError(f"{path} is missing but lite_config.json names exit modules; restore the file, "
                            f"or remove 'exit_modules' from lite_config.json to use the raw exits")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            kind, layers, size = meta["kind"], json.loads(meta["layers"]), int(meta["hidden"])
        except Exception as exc:  # truncated or foreign files: name the file, not the library's internals
            raise LiteError(f"{path} is not a readable exit-module file ({type(exc).__name__}: {exc}); "
                            f"retrain the exit modules or restore the file") from None
        if hidden not in (None, size) or not all(1 <= k < num_layers for k in layers):
            raise LiteError(f"{path} was made for hidden size {size} and layers {layers}, not for this model "
                            f"(hidden {hidden}, layers 1..{num_layers}); it belongs to another model")
        if kind not in _KINDS:
            raise LiteError(f"{path} holds exit modules of kind {kind!r}, which this lite does not know "
                            f"({', '.join(EXIT_MODULE_KINDS)}); retrain them or update lite")
        modules = cls(kind, layers, size, blocks)
        for k, module in modules.per_layer.items():
            own = {key[len(k) + 1:]: value for key, value in tensors.items() if key.startswith(f"{k}.")}
            try:
                module.load_state_dict(own)
            except RuntimeError as exc:
                raise LiteError(f"{path}: the module of layer {k} does not match its kind {kind!r} ({exc})") \
                    from None
        return modules.eval()

