"""The one teacher-forced scorer of exits: what every exit layer predicts at the answer positions of given sequences.

Calibration, the ceiling, the held-out loss and the exit-agreement measurements all read the same thing: a
sequence (prompt + answer token ids) goes once through the adapter's blocks (:meth:`LiteModel.run_block`, the
path the engine decodes with), and at every position that predicts an answer token, each scored exit k gives

* its argmax and whether it equals layer L's (agreement),
* every confidence measure of :mod:`lite.decoding.confidence`, computed exactly as the engine computes it,
* optionally its cross-entropy against the answer token and KL(layer L || exit k) (nats, float32 log-softmax),
* optionally the features a learned gate reads (:func:`lite.decoding.gate.gate_features`).

Sequences are scored one at a time (no padding: each position's numbers are those of the sequence alone).
Teacher forcing means every position sees the full model's cache; during early-exit decoding earlier tokens may
have left early, which this cannot see (a known, documented gap).

Sequences come from :func:`answer_sequences` (prompts and the model's own answers,
:func:`lite.training.own_answers.own_answers`) or :func:`reference_sequences` (rows' reference responses + EOS).
Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..decoding import confidence as conf_mod
from ..decoding.gate import check_features, gate_features
from ..errors import LiteError

TokenSequence = tuple[list[int], list[int]]  # (token ids, positions scored: each predicts the token after it)


@dataclass
class ExitScores:
    """Per scored exit layer and per answer position (E layers, N positions over all scored sequences).

    Attributes:
        layers: the E scored layers, increasing (1-indexed; may include L, which then agrees with itself).
        num_layers: L.
        agree: (E, N) bool, exit k's argmax equals layer L's (over the exit vocabulary when one was given).
        answer_agree: (E, N) bool, exit k's argmax equals the answer token at that position (the sequence's
            next token): at layer L, how often a model keeps the greedy tokens of the model that answered.
        confidences: {measure: (E, N) float32}, larger = more confident (:mod:`lite.decoding.confidence`).
        index: (N,) int64, which scored sequence each position belongs to (0-based over scored sequences).
        ce: (E, N) float32, -log p_k(answer token) in nats, or None (not asked).
        kl: (E, N) float32, KL(layer L || exit k) in nats, or None (not asked).
        states: {feature kind: (E, N, F) float32 gate features}, empty when not asked.
        sequences: how many sequences had positions scored. skipped: how many had none (None entries).
        seconds: wall-clock time of the scoring.
    """

    layers: list[int]
    num_layers: int
    agree: np.ndarray
    confidences: dict[str, np.ndarray]
    index: np.ndarray
    answer_agree: np.ndarray | None = None
    ce: np.ndarray | None = None
    kl: np.ndarray | None = None
    states: dict[str, np.ndarray] = field(default_factory=dict)
    sequences: int = 0
    skipped: int = 0
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        """N, the answer positions scored."""
        return int(self.agree.shape[1])

    def per_sequence(self, values: np.ndarray) -> np.ndarray:
        """Sums over each sequence's positions: (E, N) -> (E, S), or (N,) -> (S,) (S = :attr:`sequences`);
        with :meth:`per_sequence` of ones, the inputs of :func:`lite.evaluation.metrics.bootstrap_interval`."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim == 1:
            return np.bincount(self.index, weights=values, minlength=self.sequences)
        return np.stack([np.bincount(self.index, weights=v, minlength=self.sequences) for v in values])

    def pooled(self, values: np.ndarray) -> dict[int, float]:
        """{layer: the mean of (E, N) ``values`` over all answer positions} (e.g. :attr:`ce`: nats per answer
        token), summed in float64. Every scored position counts once, whichever sequence it is in."""
        values = np.asarray(values, dtype=np.float64)
        return {k: float(values[i].sum() / max(values.shape[1], 1)) for i, k in enumerate(self.layers)}

    def agreement(self) -> dict[int, float]:
        """{layer: agreeing answer positions / answer positions}, pooled over all sequences: the one
        teacher-forced token agreement of an exit with the final layer; its denominator is the answer tokens
        (every scored position counts once, whichever sequence it is in)."""
        return self.pooled(self.agree)


def answer_sequences(pairs: Iterable[tuple[list[int], list[int]]]) -> list[TokenSequence | None]:
    """(prompt ids, answer ids) pairs -> (prompt + answer, the positions predicting each answer token); None
    for an empty answer or prompt (nothing to score)."""
    return [(list(p) + list(a), list(range(len(p) - 1, len(p) + len(a) - 1))) if a and p else None
            for p, a in pairs]


def reference_sequences(tokenizer, examples: list, prompt_format: str, max_length: int | None = None
                        ) -> list[TokenSequence | None]:
    """Each row's prompt + reference response + EOS (:func:`lite.training.data.tokenize_example`, cut at
    ``max_length``; None: its default) and the positions predicting the response tokens; None for a row with
    no response token left."""
    from ..training.data import DEFAULT_MAX_LENGTH, IGNORE_INDEX, tokenize_example

    out: list[TokenSequence | None] = []
    for example in examples:
        item = tokenize_example(tokenizer, example, prompt_format,
                                DEFAULT_MAX_LENGTH if max_length is None else max_length)
        if item is None:
            out.append(None)
            continue
        ids, labels = item["input_ids"], item["labels"]
        positions = [j - 1 for j in range(1, len(ids)) if labels[j] != IGNORE_INDEX]
        out.append((ids, positions) if positions else None)
    return out


def score_sequences(lm, sequences: Iterable[TokenSequence | None], *, layers: list[int] | None = None,
                    losses: bool = False, states: tuple[str, ...] = (), vocab: list[int] | None = None,
                    total: int | None = None, progress: Callable[[int, int], None] | None = None) -> ExitScores:
    """Teacher-force each sequence once through ``lm`` and score every exit at its answer positions.

    Args:
        lm: a :class:`lite.model.adapter.LiteModel` (with its exit modules, if any).
        sequences: (ids, positions) per sequence, or None (nothing to score: counted as skipped).
        layers: the layers to score (default: the model's exit layers below L); L may be among them.
        losses: also the cross-entropy against the answer tokens and KL(layer L || exit) (full head only).
        states: the gate feature kinds to keep (:data:`lite.decoding.gate.FEATURES`), E*N*F float32 each.
        vocab: an exit vocabulary's token ids: the exits below L read the head over those ids, as the engine
            reads them (confidences over them, their argmax mapped back to token ids); layer L always reads
            the full head.
        total: how many sequences there are (for ``progress``; default: ``len(sequences)``).
        progress: called as ``progress(done, total)`` after every sequence.
    Returns:
        :class:`ExitScores`.
    Raises:
        LiteError: no sequence had a position to score; losses asked over an exit vocabulary.
    """
    L = lm.num_layers
    layers = sorted(set(layers)) if layers is not None else [k for k in lm.exit_layers if k < L]
    if not layers or layers[0] < 1 or layers[-1] > L:
        raise LiteError(f"layers to score must be within 1..{L}, got {layers}")
    for kind in states:
        check_features(kind)
    if losses and vocab is not None:
        raise LiteError("cross-entropy and KL are over the full vocabulary: score them without an exit vocabulary")
    check = None if vocab is None else (torch.tensor(vocab, dtype=torch.long, device=lm.device), lm.vocab_head(list(vocab)))
    if total is None:
        sequences = list(sequences)
        total = len(sequences)
    start = time.perf_counter()
    parts: dict[str, list[np.ndarray]] = {m: [] for m in conf_mod.MEASURES}
    agree_parts, answer_parts, index_parts, ce_parts, kl_parts = [], [], [], [], []
    state_parts: dict[str, list[np.ndarray]] = {kind: [] for kind in states}
    used = skipped = 0
    with torch.inference_mode():
        for i, seq in enumerate(sequences):
            if seq is None:
                skipped += 1
            else:
                out = _score_one(lm, seq[0], seq[1], layers, losses, states, check)
                for m, v in out["measures"].items():
                    parts[m].append(v.cpu().numpy())
                agree_parts.append(out["agree"].cpu().numpy())
                answer_parts.append(out["answer_agree"].cpu().numpy())
                index_parts.append(np.full(len(seq[1]), used, dtype=np.int64))
                if losses:
                    ce_parts.append(out["ce"].cpu().numpy())
                    kl_parts.append(out["kl"].cpu().numpy())
                for kind in states:
                    state_parts[kind].append(out["states"][kind].cpu().numpy())
                used += 1
            if progress:
                progress(i + 1, total)
    if not used:
        raise LiteError(f"none of the {total} examples had a token to score (prompts longer than --max-length, "
                        f"or empty answers?); raise --max-length or give other data")
    return ExitScores(
        layers=layers, num_layers=L, agree=np.concatenate(agree_parts, axis=1),
        confidences={m: np.concatenate(v, axis=1).astype(np.float32) for m, v in parts.items()},
        index=np.concatenate(index_parts), answer_agree=np.concatenate(answer_parts, axis=1),
        ce=np.concatenate(ce_parts, axis=1) if losses else None,
        kl=np.concatenate(kl_parts, axis=1) if losses else None,
        states={kind: np.concatenate(v, axis=1) for kind, v in state_parts.items()},
        sequences=used, skipped=skipped, seconds=time.perf_counter() - start,
    )


def _score_one(lm, ids: list[int], positions: list[int], layers: list[int], losses: bool,
               states: tuple[str, ...], check: tuple[torch.Tensor, Callable] | None) -> dict:
    """One teacher-forced pass over ``ids``; everything at ``positions`` (P of them), per scored layer (E)."""
    L = lm.num_layers
    x = torch.tensor([ids], device=lm.device)
    cache = lm.new_cache(len(ids))
    pos = torch.tensor(positions, device=lm.device)
    h = lm.embed(x)  # (1, T, D)
    prev = h[0, pos]  # raw "layer 0" state: the engine's previous state for the first check
    measures: dict[str, list[torch.Tensor]] = {m: [] for m in conf_mod.MEASURES}
    normed_at, feats = [], {kind: [] for kind in states}
    for layer in range(1, L + 1):
        before = h[0, pos]  # the block's input, for the gate's features
        h = lm.run_block(layer, h, cache)
        if layer not in layers:
            continue
        raw = h[0, pos]  # (P, D)
        # through the exit module, when the model has them; layer L: the plain norm (it reads the full head)
        # (an attention exit reads the whole sequence of layer-k states, causally)
        normed = lm.final_norm(raw) if layer == L else lm.exit_normed(h, layer, positions=pos)[0]
        normed_at.append(normed)
        measures["state_cosine"].append(conf_mod.state_cosine(raw, prev))
        prev = raw
        for kind in states:
            feats[kind].append((normed if kind == "exit" else gate_features(lm, kind, layer, raw, before)).float())
    final_logits = lm.exit_logits(h[0, pos], L)  # (P, V)
    final = final_logits.argmax(-1)  # (P,)
    if losses:
        target = torch.tensor(ids, device=lm.device)[pos + 1]  # (P,) the answer tokens
        final_logp = F.log_softmax(final_logits.float(), dim=-1)
    argmaxes, ce, kl = [], [], []
    for layer, normed in zip(layers, normed_at):  # one (P, V) logits at a time
        if layer == L:
            logits, top = final_logits, final
        else:
            logits = lm.lm_head(normed) if check is None else check[1](normed)  # (P, V) or (P, |vocab|)
            top = logits.argmax(-1) if check is None else check[0][logits.argmax(-1)]
        argmaxes.append(top)
        for name, fn in conf_mod.HEAD_FUNCTIONS.items():
            measures[name].append(fn(logits))
        if losses:
            logp = F.log_softmax(logits.float(), dim=-1)
            ce.append(-logp.gather(-1, target[:, None])[:, 0])
            kl.append((final_logp.exp() * (final_logp - logp)).sum(-1))
    out = {"measures": {m: torch.stack(v).float() for m, v in measures.items()},
           "agree": torch.stack(argmaxes) == final,  # (E, P)
           "answer_agree": torch.stack(argmaxes) == torch.tensor(ids, device=lm.device)[pos + 1],  # (E, P)
           "states": {kind: torch.stack(v) for kind, v in feats.items()}}
    if losses:
        out["ce"], out["kl"] = torch.stack(ce), torch.stack(kl)
    return out
