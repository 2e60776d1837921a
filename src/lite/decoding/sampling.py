"""Choosing the next token, and turning a growing list of token ids into safe-to-show text.

* :func:`pick_token`: greedy (``temperature == 0``) or sampling with temperature and nucleus (top-p),
  driven by an explicit ``torch.Generator`` so that a seed reproduces a run.
* :class:`TextStream`: incremental detokenisation with end-of-sequence ids and stop strings. It holds back
  text that might still become a stop string, and incomplete UTF-8 sequences, so that the pieces it
  releases concatenate to exactly the final text (which never contains the stop string).
"""

from __future__ import annotations

import torch


def pick_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token id from ``(V,)`` or ``(1, V)`` logits, as a 0-d long tensor (no host sync here).

    Args:
        temperature: 0 for greedy (argmax); otherwise logits are divided by it before the softmax.
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (1 = all).
        generator: the random source for sampling (seeded by the caller).
    """
    logits = logits.reshape(-1)
    if temperature <= 0:
        return logits.argmax()
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep a token if the mass of the tokens strictly before it is < top_p (the top token is always kept)
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return order[choice[0]]
    return torch.multinomial(probs, 1, generator=generator)[0]


def eos_ids(tokenizer, generation_config=None) -> set[int]:
    """End-of-sequence ids: the tokenizer's eos token plus the model's ``generation_config.eos_token_id``
    (an int or a list)."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    extra = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    return ids


class TextStream:
    """Detokenise token by token in O(1) per token; detect stop strings; release only text that is final.

    ``push(id)`` returns ``(piece, stopped)``: the newly releasable text and whether a stop string
    completed. After a stop, ``text`` is everything before the stop string. ``flush()`` releases what was
    held back (call it when generation ends for another reason).

    Incremental decoding (the offset scheme of text-generation servers): only a short window of ids is
    decoded per token, ``ids[prefix:]`` against ``ids[prefix:read]``; the difference is the new text, unless
    it ends in an incomplete UTF-8 character (U+FFFD), which is held until the bytes that complete it
    arrive. Decoding a window this way gives the same text as decoding every id so far for byte-level and
    SentencePiece tokenizers (tested), at a cost independent of the answer's length.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self._longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # final text released so far
        self._full = ""  # every character decoded so far (released or held back)
        self._prefix = 0  # ids[_prefix:_read] decode to the tail of _full the window is diffed against
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self) -> str:
        """The text the ids pushed since the last complete character add (held while incomplete)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still incomplete: wait for more bytes
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def _held(self, full: str) -> int:
        """How many trailing characters of ``full`` might still start a stop string, and so must not be
        released yet."""
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:n]):
                    held = max(held, n)
                    break
        return held

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        self._full += self._advance()
        full = self._full
        if self.stop:
            # search only where a new match can be: from just before the released text's end
            start = max(0, len(self.text) - self._longest)
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                piece = full[len(self.text):cut] if cut >= len(self.text) else ""
                self.text += piece
                return piece, True
        end = len(full) - self._held(full)
        if end <= len(self.text):
            return "", False
        piece = full[len(self.text):end]
        self.text += piece
        return piece, False

    def flush(self) -> str:
        """Release the held-back tail (generation ended without a stop string), an incomplete character
        included as the tokenizer decodes it."""
        tail = self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
        self._prefix = self._read = len(self.ids)
        self._full += tail
        piece = self._full[len(self.text):] if self._full.startswith(self.text) else ""
        self.text += piece
        return piece
