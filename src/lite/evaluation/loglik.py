"""The full model's own judgement of an answer: its mean per-token log-likelihood under the full model.

Teacher-forced, exits off: prompt + answer go through the model once (one ordinary transformers forward,
:meth:`lite.model.adapter.LiteModel.hidden_states` at layer L), and the LM head is evaluated only at the
positions that predict the answer's tokens. The forward runs in the model's dtype (the run's ``--dtype``);
the head's logits are cast to float32 before the log-softmax, so the logsumexp over the vocabulary is
taken in float32.

    loglik(answer) = (1 / n) * sum_j [ logit_j(a_j) - logsumexp_v logit_j(v) ],   j = 1..n answer tokens

in nats per token (<= 0; 0 = the model was certain of every token). The answer's tokens are exactly those
generated, end-of-sequence token included when the answer stopped on one (the model's judgement of
stopping there). An empty answer has no token to score: None, never NaN.

Identical (prompt, answer) pairs are scored once, so an early-exit answer equal to the full model's gets
exactly the full answer's value, not one that differs by float rounding across batch layouts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..errors import LiteError

HEAD_ROWS = 1024  # answer positions whose (rows, V) float32 logits are held at once: 200 MB at V = 49152


@dataclass
class Scores:
    """What :func:`answer_logliks` returns.

    Attributes:
        values: per pair, in order: mean log-likelihood per answer token (nats), None for an empty answer.
        scored: distinct non-empty (prompt, answer) pairs put through the model.
        tokens: answer tokens scored (over the distinct pairs).
        seconds: wall time of the scoring.
        dtype: how it was computed, e.g. "forward bfloat16, log-softmax float32".
    """

    values: list[float | None]
    scored: int
    tokens: int
    seconds: float
    dtype: str


def answer_logliks(lm, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8) -> Scores:
    """Mean per-token log-likelihood of each answer given its prompt, under ``lm`` with exits off.

    Args:
        lm: the :class:`lite.model.adapter.LiteModel` whose full model judges.
        pairs: (prompt ids, answer ids) per answer, the prompt formatted as the answer was generated with.
        batch_size: sequences per forward (right-padded; similar lengths are batched together).
    Returns:
        :class:`Scores` (see the module docstring for the formula and conventions).
    Raises:
        LiteError: a prompt with no token (nothing to condition the first answer token on), or a
            sequence longer than the model's context.
    """
    if batch_size < 1:
        raise LiteError(f"--batch-size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    keys = [(tuple(p), tuple(a)) for p, a in pairs]
    todo = [k for k in dict.fromkeys(keys) if k[1]]  # distinct, non-empty answers
    for prompt, answer in todo:
        if not prompt:
            raise LiteError("an answer to score has an empty prompt: the first answer token has nothing to "
                            "be predicted from; encode the prompt with its template "
                            "(lite.model.prompts.encode_prompt)")
        if len(prompt) + len(answer) > lm.max_context:
            raise LiteError(f"prompt + answer is {len(prompt) + len(answer)} tokens, the model's context "
                            f"{lm.max_context}: score a shorter answer (lower --max-new-tokens)")
    todo.sort(key=lambda k: len(k[0]) + len(k[1]))  # less padding per batch
    found: dict[tuple, float] = {}
    with torch.inference_mode():
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            for key, value in zip(batch, _score_batch(lm, batch)):
                found[key] = value
    return Scores(values=[found.get(k) for k in keys], scored=len(todo), tokens=sum(len(a) for _, a in todo),
                  seconds=time.perf_counter() - start,
                  dtype=f"forward {str(lm.dtype).replace('torch.', '')}, log-softmax float32")


def _score_batch(lm, batch: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[float]:
    """One right-padded forward over ``batch``; the head only at the answer-predicting positions."""
    width = max(len(p) + len(a) for p, a in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long, device=lm.device)
    mask = torch.zeros(len(batch), width, dtype=torch.long, device=lm.device)
    rows, cols, targets = [], [], []
    for i, (prompt, answer) in enumerate(batch):
        n = len(prompt) + len(answer)
        ids[i, :n] = torch.tensor(prompt + answer, device=lm.device)
        mask[i, :n] = 1
        rows += [i] * len(answer)
        cols += range(len(prompt) - 1, n - 1)  # position t predicts token t + 1
        targets += answer
    L = lm.num_layers
    final = lm.hidden_states(ids, mask, layers=[L])[L]  # (B, T, D), normed by the model's final norm
    picked = final[torch.tensor(rows, device=lm.device), torch.tensor(cols, device=lm.device)]  # (N, D)
    target = torch.tensor(targets, device=lm.device)
    logp = torch.empty(len(targets), dtype=torch.float32, device=lm.device)
    for s in range(0, len(targets), HEAD_ROWS):
        logits = lm.head_logits(picked[s:s + HEAD_ROWS]).float()  # (n, V)
        logp[s:s + HEAD_ROWS] = logits.gather(-1, target[s:s + HEAD_ROWS, None])[:, 0] - logits.logsumexp(-1)
    sums = torch.zeros(len(batch), dtype=torch.float64, device=lm.device)
    sums.index_add_(0, torch.tensor(rows, device=lm.device), logp.double())
    return [float(s) / len(a) for s, (_, a) in zip(sums.tolist(), batch)]
