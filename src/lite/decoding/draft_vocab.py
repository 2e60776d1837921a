"""Exit vocabularies: the N most frequent tokens, whose head is what a cheap exit reads.

On a small model the LM head dominates an exit check: SmolLM2-135M's head (576 x 49152) costs as much as
4 to 8 decoder blocks on a CPU. An exit below the final layer can instead read the head restricted to the
N most frequent tokens (FR-Spec's idea, Zhao et al. 2025): N/V of the cost; its confidence is measured
over those N and a token that leaves there is one of them (``--exit-vocab N``). The final layer always
reads the full head. Speculative drafts read an exit vocabulary too (``--draft-vocab N``, default the exit
vocabulary); the full model still verifies every draft with the full head, so the output is unchanged
(greedy: identical tokens; sampling: the rejection rule with a draft distribution that is zero outside
the vocabulary keeps the full model's distribution exactly).

The ranking is counted once, by ``lite calibrate --draft-vocab``, over the tokens of the responses of the
model's training rows (the sources recorded in ``lite_config.json``) and of the calibration rows, and saved
beside the model as ``draft_vocab.json``; an exit vocabulary of N tokens is its first N ids. The
tokenizer's special tokens (end of sequence) are always in it. The model adapter's
:meth:`lite.model.adapter.LiteModel.vocab_head` is the head over such ids.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import LiteError
from ..files import write_atomic

FILE = "draft_vocab.json"


def rank_tokens(tokenizer, texts: Iterable[str]) -> tuple[list[int], int]:
    """Token ids seen in ``texts``, most frequent first (ties: lower id first), and the token count."""
    counts: Counter[int] = Counter()
    for text in texts:
        counts.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    ranking = sorted(counts, key=lambda t: (-counts[t], t))
    return ranking, sum(counts.values())


def save_ranking(folder: str | Path, ranking: list[int], tokens: int, source: str) -> Path:
    """Write ``draft_vocab.json`` (atomically) into the model folder."""
    path = Path(folder) / FILE
    payload = {"ranking": [int(t) for t in ranking], "tokens_counted": int(tokens), "source": source,
               "note": "token ids by frequency in the responses of these rows; lite uses the first N as the "
                       "draft head of --speculative --draft-vocab N"}
    write_atomic(path, json.dumps(payload) + "\n")
    return path


def load_ranking(folder: str | Path | None) -> list[int] | None:
    """The saved ranking of a model folder, or None when there is none."""
    if folder is None:
        return None
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        ranking = json.loads(path.read_text())["ranking"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LiteError(f"{path} is not a draft vocabulary ({exc}); re-create it with "
                        f"'lite calibrate --model {folder} --draft-vocab'") from None
    return [int(t) for t in ranking]


def vocab_ids(ranking: list[int] | None, size: int, vocab: int, always: Iterable[int] = (),
              where: str | None = None, flag: str = "--exit-vocab") -> list[int]:
    """An exit vocabulary: the first ``size`` ids of ``ranking`` plus the ``always`` ids (end of
    sequence), sorted. Fewer than ``size`` ids were ranked: the rest are the lowest unranked ids (BPE
    tokenizers number frequent merges first)."""
    if ranking is None:
        raise LiteError(f"{flag} needs the token ranking of {where or 'this model'} (draft_vocab.json); "
                        f"create it with 'lite calibrate --model {where or 'MODEL'} --draft-vocab', or drop "
                        f"{flag}")
    if not isinstance(size, int) or not 1 <= size <= vocab:
        raise LiteError(f"{flag} must be an integer in 1..{vocab} (the vocabulary size), got {size!r}")
    ids = [t for t in ranking if 0 <= t < vocab][:size]
    chosen = set(ids)
    filler = (t for t in range(vocab) if t not in chosen)
    while len(ids) < size:
        t = next(filler)
        ids.append(t)
        chosen.add(t)
    return sorted(chosen | {int(t) for t in always if 0 <= int(t) < vocab})


def widen(logits: torch.Tensor, ids: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """Exit-vocabulary logits (..., N) over ``ids`` as (..., vocab), -inf outside it (so that a token
    picked from them is one of the N); full-vocabulary logits pass through."""
    if ids is None or logits.shape[-1] == vocab:
        return logits
    full = logits.new_full((*logits.shape[:-1], vocab), float("-inf"))
    return full.index_copy_(-1, ids, logits)
