"""Affine exit modules started in closed form (``lite train --exit-init fit``).

An affine exit module maps the exit's unit-RMS state ``r_k`` to ``W r_k + b``, which the final norm and the
head then read (:class:`lite.model.exit_modules.AffineExit`). Before any gradient step, ``W`` and ``b`` can be
set to the least-squares map from ``r_k`` to ``r_L``, the unit-RMS input of the final norm (what the full
model's head reads, up to the norm's own weight), over the response positions of training sequences: one
pass of the frozen backbone and one ``(D+1) x (D+1)`` solve per exit. The final norm ignores the scale of its
input, so matching ``r_L`` matches the full model's normed state. Training by KL then starts from there
instead of from the raw exit (the identity).

Ordinary least squares gives the same map whatever metric the output error is measured in (each output
coordinate is its own regression), so weighting the error by the head's geometry would not change it; a
small ridge term (``ridge`` x the mean diagonal of ``X^T X``, not on the bias) keeps the solve stable where a
direction of the state is barely used.

Memory: two accumulators per exit, ``(D+1)^2`` and ``(D+1) D`` numbers (float64 on the CPU, float32 on an
accelerator): 5.3 MB per exit at D = 576, 268 MB at D = 4096 (float64).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..model.exit_modules import unit_rms
from .config import TrainError
from .data import PadCollator
from .losses import response_mask


def fit_affine_exits(lm, modules, dataset, *, max_sequences: int = 512, batch_size: int = 8,
                     ridge: float = 1e-3) -> dict[str, Any]:
    """Set every module of ``modules`` (kind ``affine``) to its least-squares map on ``dataset``.

    Args:
        lm: the :class:`lite.model.LiteModel` whose frozen backbone produces the states.
        modules: the :class:`lite.model.exit_modules.ExitModules` to set (in place).
        dataset: items with ``input_ids`` and ``labels`` (-100 outside the response), as lite train's.
        max_sequences: at most this many sequences are read, spread evenly over the dataset (so that every
            source of a run on several files is seen).
        batch_size: sequences per forward pass (right-padded).
        ridge: the ridge term, relative to the mean diagonal of ``X^T X``.

    Returns:
        {"sequences", "tokens", "seconds", "ridge"}: what the fit read and how long it took.
    """
    if modules.kind != "affine":
        raise TrainError(f"--exit-init fit fits affine exit modules (got {modules.kind}); use --exit-modules affine")
    start = time.perf_counter()
    n = min(max_sequences, len(dataset))
    chosen = sorted({round(i * (len(dataset) - 1) / max(n - 1, 1)) for i in range(n)})
    width = lm.hidden_size + 1
    acc = torch.float64 if lm.device.type == "cpu" else torch.float32
    xtx = {k: torch.zeros(width, width, dtype=acc, device=lm.device) for k in modules.layers}
    xty = {k: torch.zeros(width, width - 1, dtype=acc, device=lm.device) for k in modules.layers}
    collate = PadCollator(lm.tokenizer.pad_token_id)
    final_input: list[torch.Tensor] = []
    hook = lm.final_norm.register_forward_pre_hook(lambda _norm, args: final_input.append(args[0]))
    tokens = 0
    try:
        with torch.no_grad():
            for at in range(0, len(chosen), batch_size):
                batch = collate([dataset[i] for i in chosen[at:at + batch_size]])
                mask = response_mask(batch["labels"]).to(lm.device)  # state at t predicts token t + 1
                final_input.clear()
                out = lm.decoder(input_ids=batch["input_ids"].to(lm.device),
                                 attention_mask=batch["attention_mask"].to(lm.device),
                                 output_hidden_states=True, use_cache=False)
                target = unit_rms(final_input[-1][:, :-1][mask].float()).to(acc)
                tokens += len(target)
                for k in modules.layers:
                    x = unit_rms(out.hidden_states[k][:, :-1][mask].float()).to(acc)
                    x = torch.cat([x, torch.ones(len(x), 1, dtype=acc, device=x.device)], dim=1)
                    xtx[k] += x.T @ x
                    xty[k] += x.T @ target
    finally:
        hook.remove()
    if tokens == 0:
        raise TrainError("--exit-init fit found no response tokens in the training sequences to fit on")
    for k in modules.layers:
        penalty = ridge * xtx[k].diagonal()[:-1].mean() * torch.eye(width, dtype=acc, device=lm.device)
        penalty[-1, -1] = 0  # the bias is not shrunk
        solution = torch.linalg.solve(xtx[k] + penalty, xty[k])  # (D+1, D): rows of W^T, then b
        proj = modules.per_layer[str(k)].proj
        with torch.no_grad():
            proj.weight.copy_(solution[:-1].T.to(proj.weight.dtype))
            proj.bias.copy_(solution[-1].to(proj.bias.dtype))
    return {"sequences": len(chosen), "tokens": tokens, "seconds": round(time.perf_counter() - start, 3),
            "ridge": ridge}
