"""Exit modules: a small trainable map per exit layer, between the layer-k state and the shared norm and head.

The EE-Tuning / tuned-lens / Balcony family: the backbone stays frozen, so the full model's
output is untouched, and each exit k < L gets its own module ``m_k``; the exit's logits become
``head(final_norm(m_k(h_k)))`` instead of ``head(final_norm(h_k))``. The final layer L never has one.

Kinds (``--exit-modules KIND``):

* ``affine``: ``W r + b`` with ``r = h / rms(h)``; W starts as the identity and b at zero, so an untrained
  module gives the raw exit (the final RMSNorm ignores the scale of its input). D*D + D parameters.
* ``mlp``: ``r + W2 silu(W1 r)`` (width 2D), W2 starts at zero: also the raw exit at first. 4*D*D + 3*D
  parameters (with biases on W1, W2).

The input is normalised (``r``) because middle-layer states of Llama-family models have norms that vary
by orders of magnitude across layers and positions; the module then learns on a fixed scale.

Saved as ``exit_modules.safetensors`` in the checkpoint folder (tensors ``<layer>.<param>``, metadata:
kind, layers, hidden size) and named in ``lite_config.json`` (``exit_modules``); loaded with the model.
FLOPs per position are :meth:`ExitModules.flops`; the decoder counts them for every evaluation.

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import LiteError
from ..files import write_atomic

EXIT_MODULE_KINDS = ("affine", "mlp")
EXIT_MODULES_FILE = "exit_modules.safetensors"


def _unit_rms(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
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
        return self.proj(_unit_rms(h))

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
        r = _unit_rms(h)
        return r + self.down(torch.nn.functional.silu(self.up(r)))

    def flops(self) -> int:
        d, w = self.up.in_features, self.up.out_features
        return 2 * d * w * 2 + 4 * w + 6 * d


_KINDS = {"affine": AffineExit, "mlp": MLPExit}


class ExitModules(nn.Module):
    """One exit module per exit layer below L.

    Attributes:
        kind: "affine" or "mlp".
        layers: the exit layers that have a module (each < L), increasing.
    """

    def __init__(self, kind: str, layers: list[int], hidden: int) -> None:
        super().__init__()
        if kind not in _KINDS:
            raise LiteError(f"--exit-modules must be one of {EXIT_MODULE_KINDS}, got {kind!r}")
        self.kind = kind
        self.hidden = int(hidden)
        self.layers = sorted(int(k) for k in layers)
        self.per_layer = nn.ModuleDict({str(k): _KINDS[kind](hidden) for k in self.layers})

    def has(self, layer: int) -> bool:
        return str(layer) in self.per_layer

    def apply_at(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``m_layer(h)``, or ``h`` itself for a layer without a module (L, or a layer not trained)."""
        module = self.per_layer[str(layer)] if str(layer) in self.per_layer else None
        return h if module is None else module(h)

    def flops(self, layer: int) -> int:
        """FLOPs of the module of ``layer`` for one position (0 where there is none)."""
        return self.per_layer[str(layer)].flops() if self.has(layer) else 0

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

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
    def load(cls, folder: str | os.PathLike[str], *, hidden: int, num_layers: int) -> ExitModules:
        """Read ``exit_modules.safetensors`` from ``folder``; checks it fits a model of this shape.

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
        if size != hidden or not all(1 <= k < num_layers for k in layers):
            raise LiteError(f"{path} was made for hidden size {size} and layers {layers}, not for this model "
                            f"(hidden {hidden}, layers 1..{num_layers}); it belongs to another model")
        modules = cls(kind, layers, hidden)
        for k, module in modules.per_layer.items():
            own = {key[len(k) + 1:]: value for key, value in tensors.items() if key.startswith(f"{k}.")}
            try:
                module.load_state_dict(own)
            except RuntimeError as exc:
                raise LiteError(f"{path}: the module of layer {k} does not match its kind {kind!r} ({exc})") \
                    from None
        return modules.eval()
