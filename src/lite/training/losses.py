"""The LITE loss: cross-entropy at several exit layers through the model's shared final norm and LM head.

A small pure function (hidden states in, total and per-layer losses out), in the spirit of torchtune's
early-exit loss. Conventions:

* ``states`` are *normed* exit states ``{layer: (B, T, D)}`` (see ``LiteModel.forward_exit_states``);
  layer k = output of decoder block k, 1-indexed.
* ``labels`` are ``(B, T)`` token ids aligned with the inputs, -100 where no loss is taken (prompt,
  padding). Position t predicts token t+1 (the usual shift), so the target of position t is
  ``labels[:, t + 1]``.
* The loss of an exit is the mean cross-entropy over the response positions of the batch; the total is
  ``sum_k w_k * loss_k`` with weights normalised to sum to 1 (``lite.model.config.loss_weights``). A baseline
  run (standard instruction tuning) is the same function with the final layer alone.

Memory: the response positions are gathered first, then the head runs over chunks of ``chunk_size``
rows, so logits for [exits, batch, seq, vocab] never exist at once. What backward keeps depends on
``mode``:

* ``"fused"`` (default): each chunk's logits are turned into gradients for the hidden rows and the head
  weight right away (softmax minus one-hot), in the forward pass; backward only scales them. Peak memory
  is one chunk of logits plus one head-sized gradient buffer; no recomputation. Needs a bias-free
  ``nn.Linear`` head (every Llama-family model); other heads fall back to ``"checkpoint"``.
* ``"checkpoint"``: each chunk runs under ``torch.utils.checkpoint``; backward recomputes its logits
  (one extra head forward per exit).
* ``"plain"``: ordinary autograd; keeps every chunk's (rows, V) logits alive until backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
LOSS_MODES = ("fused", "checkpoint", "plain")
DEFAULT_CHUNK_SIZE = 512


@dataclass
class ExitLoss:
    """Result of :func:`lite_loss`.

    Attributes:
        total: scalar weighted loss (differentiable).
        per_layer: {layer: mean cross-entropy at that exit} as detached scalars (nats per token).
        num_tokens: number of response positions the losses average over.
    """

    total: torch.Tensor
    per_layer: dict[int, torch.Tensor]
    num_tokens: int


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i row_weight_i * CE(h_i @ W^T, target_i), with gradients computed chunk by chunk in forward.

    Returns (weighted total, per-row CE); the per-row losses are not differentiable.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, row_weights, chunk_size):  # h (N, D), weight (V, D), targets (N,)
        ctx.weight_dtype = weight.dtype
        n = h.shape[0]
        per_row = torch.empty(n, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        w = weight.to(h.dtype) if weight.dtype != h.dtype else weight
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            hc, tc = h[s:e], targets[s:e]
            logits = (hc @ w.T).float()  # (n_c, V): the only logits alive
            lse = torch.logsumexp(logits, dim=-1)
            per_row[s:e] = lse - logits.gather(1, tc[:, None]).squeeze(1)
            if grad_h is None and grad_w is None:
                continue
            # d(sum_i a_i CE_i)/d logits_i = a_i * (softmax_i - onehot_i)
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(e - s, device=h.device), tc] -= 1.0
            probs.mul_(row_weights[s:e, None])
            dlogits = probs.to(h.dtype)
            if grad_h is not None:
                grad_h[s:e] = dlogits @ w
            if grad_w is not None:
                grad_w.addmm_(dlogits.T.float(), hc.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(per_row)
        total = (per_row * row_weights).sum()
        return total, per_row

    @staticmethod
    def backward(ctx, grad_total, _grad_rows):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_total).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def _rows_ce(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of ``head(h)`` in float32: (n, D), (n,) -> (n,)."""
    return F.cross_entropy(head(h).float(), targets, reduction="none")


def _chunked_ce(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor,
                chunk_size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted total, detached per-row CE) over rows of ``h`` (N, D)."""
    if mode == "fused":
        return _FusedLinearCrossEntropy.apply(h, head.weight, targets, row_weights, chunk_size)
    totals, rows = [], []
    for s in range(0, h.shape[0], chunk_size):
        hc, tc = h[s:s + chunk_size], targets[s:s + chunk_size]
        if mode == "checkpoint" and torch.is_grad_enabled() and hc.requires_grad:
            ce = checkpoint(_rows_ce, head, hc, tc, use_reentrant=False)
        else:
            ce = _rows_ce(head, hc, tc)
        totals.append((ce * row_weights[s:s + chunk_size]).sum())
        rows.append(ce.detach())
    return torch.stack(totals).sum(), torch.cat(rows)


def lite_loss(states: dict[int, torch.Tensor], labels: torch.Tensor, head: nn.Module,
              weights: dict[int, float], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
              mode: str = "fused") -> ExitLoss:
    """Weighted cross-entropy over exit layers at response positions.

    Args:
        states: {layer: (B, T, D)} normed exit states (every key must be in ``weights``).
        labels: (B, T) token ids aligned with the inputs, -100 where no loss is taken.
        head: the LM head (shared by all exits), (.., D) -> (.., V).
        weights: {layer: weight}; normalised here to sum to 1. ``{L: 1.0}`` is the baseline.
        chunk_size: rows (response positions of one exit or several) per head evaluation.
        mode: "fused", "checkpoint" or "plain" (see the module docstring).

    Returns:
        :class:`ExitLoss`; with no response position at all the total is a differentiable zero.
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"loss mode must be one of {LOSS_MODES}, got {mode!r}")
    if mode == "fused" and not (isinstance(head, nn.Linear) and head.bias is None):
        mode = "checkpoint"
    layers = sorted(weights)
    missing = [k for k in layers if k not in states]
    if missing:
        raise ValueError(f"no hidden states for exit layers {missing}")
    norm = sum(weights[k] for k in layers)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    mask = targets != IGNORE_INDEX
    tgt = targets[mask]  # (N,)
    n = int(tgt.numel())
    if n == 0:
        zero = sum(states[k].sum() * 0.0 for k in layers)
        return ExitLoss(zero, {k: torch.tensor(float("nan")) for k in layers}, 0)
    # gather response positions of every exit into one (E*N, D) matrix: the head runs once over all of them
    h = torch.cat([states[k][:, :-1][mask] for k in layers])  # (E*N, D)
    row_weights = torch.cat([
        torch.full((n,), weights[k] / norm / n, dtype=torch.float32, device=h.device) for k in layers
    ])
    total, per_row = _chunked_ce(head, h, tgt.repeat(len(layers)), row_weights, chunk_size, mode)
    per_layer = {k: per_row[i * n:(i + 1) * n].mean() for i, k in enumerate(layers)}
    return ExitLoss(total, per_layer, n)


def _kl_rows(head: nn.Module, h: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || exit) per row for one chunk: h (R, D) normed exit states, teacher_logp (R, V)."""
    logp = F.log_softmax(head(h).float(), dim=-1)  # (R, V)
    return (teacher_logp.exp() * (teacher_logp - logp)).sum(-1)  # (R,)


def distill_loss(states: dict[int, torch.Tensor], teacher: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                 weights: dict[int, float], *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ExitLoss:
    """Self-distillation: weighted KL(teacher || exit) over exit layers at response positions (SPEC §7).

    Each exit is trained toward the distribution of a frozen teacher (the starting model's final layer)
    instead of the dataset's next token, so that it learns to agree with the final layer, which is what
    lets a token leave early at the same output.

    Args:
        states: {layer: (B, T, D)} normed exit states (every key must be in ``weights``).
        teacher: (B, T, D) the teacher's normed final-layer states at the same positions (no gradient is
            taken through it); its distribution is ``softmax(head(teacher))``.
        labels: (B, T) as in :func:`lite_loss`; only their mask is used (position t counts where
            ``labels[:, t + 1] != -100``).
        head: the LM head shared by exits and teacher.
        weights: {layer: weight}; normalised here to sum to 1.
        chunk_size: rows per head evaluation; each chunk runs under ``torch.utils.checkpoint``, so
            backward recomputes its (rows, V) logits instead of keeping them.

    Returns:
        :class:`ExitLoss` with ``per_layer`` = mean KL in nats per response token.
    """
    layers = sorted(weights)
    missing = [k for k in layers if k not in states]
    if missing:
        raise ValueError(f"no hidden states for exit layers {missing}")
    norm = sum(weights[k] for k in layers)
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    n = int(mask.sum())
    if n == 0:
        zero = sum(states[k].sum() * 0.0 for k in layers)
        return ExitLoss(zero, {k: torch.tensor(float("nan")) for k in layers}, 0)
    with torch.no_grad():
        t_rows = teacher[:, :-1][mask]  # (N, D)
        teacher_logp = torch.cat([F.log_softmax(head(t_rows[s:s + chunk_size]).float(), dim=-1)
                                  for s in range(0, n, chunk_size)])  # (N, V)
    total = torch.zeros((), dtype=torch.float32, device=teacher.device)
    per_layer: dict[int, torch.Tensor] = {}
    for k in layers:
        h = states[k][:, :-1][mask]  # (N, D)
        rows = []
        for s in range(0, n, chunk_size):
            part = (h[s:s + chunk_size], teacher_logp[s:s + chunk_size])
            rows.append(checkpoint(_kl_rows, head, *part, use_reentrant=False) if h.requires_grad
                        else _kl_rows(head, *part))
        kl = torch.cat(rows)  # (N,)
        total = total + weights[k] / norm * kl.mean()
        per_layer[k] = kl.detach().mean()
    return ExitLoss(total, per_layer, n)
