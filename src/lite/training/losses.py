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

Self-distillation (:func:`distill_loss`) takes the same modes; fused, each chunk's teacher distribution
is computed once for every exit and d KL / d logits = softmax(logits) - teacher is formed in forward, so
a chunk costs the head twice per exit (logits, then the gradient of the rows) where the checkpointed
form costs it three times, and the (rows, V) float32 passes are fewer. The ``*_rows_loss`` functions take
response positions already gathered ({layer: (N, D)}), e.g. from a cache of a frozen backbone's states.
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
    mask = response_mask(labels)
    return lite_rows_loss(_response_rows(states, mask, weights), labels[:, 1:][mask], head, weights,
                          chunk_size=chunk_size, mode=mode)


def lite_rows_loss(rows: dict[int, torch.Tensor], targets: torch.Tensor, head: nn.Module,
                   weights: dict[int, float], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   mode: str = "fused") -> ExitLoss:
    """:func:`lite_loss` over gathered response positions: ``rows`` {layer: (N, D)} normed exit states and
    ``targets`` (N,) the token each position predicts, in the same order."""
    mode = _head_mode(mode, head)
    layers, n = sorted(weights), int(targets.numel())
    if n == 0:
        return _no_positions(rows, layers)
    # every exit's rows in one (E*N, D) matrix: the head runs once over all of them
    h = torch.cat([rows[k] for k in layers])  # (E*N, D)
    total, per_row = _chunked_ce(head, h, targets.repeat(len(layers)), _row_weights(weights, n, h.device),
                                 chunk_size, mode)
    return _exit_loss(total, per_row, layers, n)


def _head_mode(mode: str, head: nn.Module) -> str:
    """``mode`` checked; "fused" needs a bias-free ``nn.Linear`` head, others fall back to "checkpoint"."""
    if mode not in LOSS_MODES:
        raise ValueError(f"loss mode must be one of {LOSS_MODES}, got {mode!r}")
    if mode == "fused" and not (isinstance(head, nn.Linear) and head.bias is None):
        return "checkpoint"
    return mode


def _response_rows(states: dict[int, torch.Tensor], mask: torch.Tensor, weights: dict[int, float]
                   ) -> dict[int, torch.Tensor]:
    """{layer: (N, D)}: each weighted layer's states at the positions of ``mask`` (:func:`response_mask`)."""
    missing = [k for k in sorted(weights) if k not in states]
    if missing:
        raise ValueError(f"no hidden states for exit layers {missing}")
    return {k: states[k][:, :-1][mask] for k in sorted(weights)}


def _row_weights(weights: dict[int, float], n: int, device) -> torch.Tensor:
    """(E*N,) exit-major: each of an exit's ``n`` rows weighs its share of the normalised weights / n."""
    norm = sum(weights.values())
    return torch.cat([torch.full((n,), weights[k] / norm / n, dtype=torch.float32, device=device)
                      for k in sorted(weights)])


def _exit_loss(total: torch.Tensor, per_row: torch.Tensor, layers: list[int], n: int) -> ExitLoss:
    """:class:`ExitLoss` from the weighted total and the (E*N,) exit-major per-row losses."""
    return ExitLoss(total, {k: per_row[i * n:(i + 1) * n].mean() for i, k in enumerate(layers)}, n)


def _no_positions(rows: dict[int, torch.Tensor], layers: list[int]) -> ExitLoss:
    """No response position at all: a differentiable zero, NaN per layer."""
    zero = sum(rows[k].sum() * 0.0 for k in layers)
    return ExitLoss(zero, {k: torch.tensor(float("nan")) for k in layers}, 0)


class _FusedKL(torch.autograd.Function):
    """sum_k sum_i row_weight_k,i * KL(teacher_i || softmax(h_k,i @ W^T)) over exits k, chunk by chunk, with
    the gradients computed in forward: d KL / d logits = softmax(logits) - teacher, so backward only scales
    them (no logits recomputed, none kept). The teacher's distribution of each chunk is computed once
    for every exit. Returns (weighted total, per-row KL of each exit as one (E*N,) tensor, exit-major).
    """

    @staticmethod
    def forward(ctx, teacher, weight, row_weights, chunk_size, *hs):  # teacher, h_k (N, D); weight (V, D)
        n, e = teacher.shape[0], len(hs)
        per_row = torch.empty(e * n, dtype=torch.float32, device=teacher.device)
        grads_h = [torch.empty_like(h) if ctx.needs_input_grad[4 + i] else None for i, h in enumerate(hs)]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        w = weight.to(hs[0].dtype) if weight.dtype != hs[0].dtype else weight
        for s in range(0, n, chunk_size):
            stop = min(s + chunk_size, n)
            with torch.no_grad():
                t_logp = F.log_softmax((teacher[s:stop].to(w.dtype) @ w.T).float(), dim=-1)  # (n_c, V)
                t_p = t_logp.exp()
                t_entropy = (t_p * t_logp).sum(-1)  # sum_v p log p, shared by every exit
            for i, h in enumerate(hs):
                hc = h[s:stop]
                logits = (hc @ w.T).float()
                logq = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
                rows = slice(i * n + s, i * n + stop)
                per_row[rows] = t_entropy - (t_p * logq).sum(-1)
                if grads_h[i] is None and grad_w is None:
                    continue
                dlogits = logq.exp_().sub_(t_p).mul_(row_weights[rows, None]).to(hc.dtype)  # a (q - p)
                if grads_h[i] is not None:
                    grads_h[i][s:stop] = dlogits @ w
                if grad_w is not None:
                    grad_w.addmm_(dlogits.T.float(), hc.float())
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_w, *[g for g in grads_h if g is not None])
        ctx.has_grad_h = [g is not None for g in grads_h]
        ctx.mark_non_differentiable(per_row)
        return (per_row * row_weights).sum(), per_row

    @staticmethod
    def backward(ctx, grad_total, _grad_rows):
        grad_w, *saved = ctx.saved_tensors
        saved = iter(saved)
        dhs = []
        for has in ctx.has_grad_h:
            g = next(saved) if has else None
            dhs.append(g * grad_total.to(g.dtype) if g is not None else None)
        dw = (grad_w * grad_total).to(ctx.weight_dtype) if grad_w is not None else None
        return (None, dw, None, None, *dhs)


def _kl_rows(head: nn.Module, h: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || exit) per row for one chunk: h (R, D) normed exit states, teacher_logp (R, V)."""
    logp = F.log_softmax(head(h).float(), dim=-1)  # (R, V)
    return (teacher_logp.exp() * (teacher_logp - logp)).sum(-1)  # (R,)


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T-1) bool: position t is trained where ``labels[:, t + 1] != -100``."""
    return labels[:, 1:] != IGNORE_INDEX


def distill_loss(states: dict[int, torch.Tensor], teacher: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                 weights: dict[int, float], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 mode: str = "fused") -> ExitLoss:
    """Self-distillation: weighted KL(teacher || exit) over exit layers at response positions.

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
        chunk_size: rows per head evaluation.
        mode: as in :func:`lite_loss`: "fused" (default) computes each chunk's gradients in forward
            (d KL / d logits = softmax - teacher), "checkpoint" recomputes each chunk's logits in backward,
            "plain" keeps them; the same loss and gradients up to rounding.

    Returns:
        :class:`ExitLoss` with ``per_layer`` = mean KL in nats per response token.
    """
    mask = response_mask(labels)
    return distill_rows_loss(_response_rows(states, mask, weights), teacher[:, :-1][mask], head, weights,
                             chunk_size=chunk_size, mode=mode)


def distill_rows_loss(rows: dict[int, torch.Tensor], teacher: torch.Tensor, head: nn.Module,
                      weights: dict[int, float], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                      mode: str = "fused") -> ExitLoss:
    """:func:`distill_loss` over gathered response positions: ``rows`` {layer: (N, D)} normed exit states
    and ``teacher`` (N, D) the teacher's normed states at the same positions, in the same order."""
    mode = _head_mode(mode, head)
    layers, n = sorted(weights), int(teacher.shape[0])
    if n == 0:
        return _no_positions(rows, layers)
    teacher = teacher.detach()
    if mode == "fused":
        total, per_row = _FusedKL.apply(teacher, head.weight, _row_weights(weights, n, teacher.device), chunk_size,
                                        *[rows[k] for k in layers])
        return _exit_loss(total, per_row, layers, n)
    norm = sum(weights.values())
    with torch.no_grad():
        teacher_logp = torch.cat([F.log_softmax(head(teacher[s:s + chunk_size]).float(), dim=-1)
                                  for s in range(0, n, chunk_size)])  # (N, V)
    total = torch.zeros((), dtype=torch.float32, device=teacher.device)
    per_layer: dict[int, torch.Tensor] = {}
    for k in layers:
        h = rows[k]
        parts = []
        for s in range(0, n, chunk_size):
            part = (h[s:s + chunk_size], teacher_logp[s:s + chunk_size])
            parts.append(checkpoint(_kl_rows, head, *part, use_reentrant=False)
                         if mode == "checkpoint" and h.requires_grad else _kl_rows(head, *part))
        kl = torch.cat(parts)  # (N,)
        total = total + weights[k] / norm * kl.mean()
        per_layer[k] = kl.detach().mean()
    return ExitLoss(total, per_layer, n)
