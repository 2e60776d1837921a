"""Confidence measures for dynamic early exit: how sure is an exit layer of its next token?

Every measure is oriented so that LARGER = MORE CONFIDENT and lies in [0, 1] (cosine in [-1, 1]), so one
rule serves them all: a token leaves at the first checked exit layer whose confidence is at least that
layer's threshold (times ``--threshold-scale``).

* ``max_prob`` (the paper's): the largest softmax probability of the exit's next-token distribution.
* ``margin``: top-1 probability minus top-2 probability.
* ``entropy``: ``1 - H(p) / log V``, the entropy of the distribution normalised by its maximum (the
  entropy of the uniform distribution over the V vocabulary entries) and flipped, so that a one-hot
  distribution scores 1 and the uniform one scores 0.
* ``state_cosine`` (CALM "state"): the cosine similarity between the raw hidden state at this exit layer
  and the raw hidden state at the previous checked exit layer (for the first checked exit: the token's
  input embedding, "layer 0"). It needs no LM head: the head is evaluated only once, where the token
  leaves. A state that stops moving between exits is taken as settled.

The head-based measures take logits of shape ``(..., V)`` and return a tensor of shape ``(...)`` in
float32; nothing here calls ``.item()`` (the engine makes the one exit decision).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

HEAD_MEASURES = ("max_prob", "margin", "entropy")
STATE_MEASURES = ("state_cosine",)
MEASURES = HEAD_MEASURES + STATE_MEASURES


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """Largest softmax probability, ``exp(max - logsumexp)`` (no full softmax materialised)."""
    x = logits.float()
    return torch.exp(x.amax(-1) - torch.logsumexp(x, -1))


def margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 probability minus top-2 probability."""
    x = logits.float()
    top2 = x.topk(2, dim=-1).values
    lse = torch.logsumexp(x, -1)
    return torch.exp(top2[..., 0] - lse) - torch.exp(top2[..., 1] - lse)


def entropy_confidence(logits: torch.Tensor) -> torch.Tensor:
    """``1 - H(p) / log V`` in [0, 1]; 1 for a one-hot distribution, 0 for the uniform one."""
    x = logits.float()
    logp = torch.log_softmax(x, -1)
    h = -(logp.exp() * logp).sum(-1)
    return 1.0 - h / math.log(x.shape[-1])


def state_cosine(state: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two raw hidden states ``(..., D)`` -> ``(...)`` in float32."""
    return torch.nn.functional.cosine_similarity(state.float(), previous.float(), dim=-1)


HEAD_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max_prob": max_prob,
    "margin": margin,
    "entropy": entropy_confidence,
}


def needs_head(measure: str) -> bool:
    """True when the measure is computed from the exit's logits (one head evaluation per check)."""
    return measure in HEAD_MEASURES
