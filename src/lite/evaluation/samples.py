"""Sample answers with their exit layers marked, for ``lite report``: which prompts to show, and each
early-exit answer as markdown with a superscript layer after every piece of text whose token left early.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LiteError

SAMPLE_RULE = ("among the prompts whose early-exit answer is at least the median similarity to the full "
               "answer, those with the most tokens that left before the final layer (ties: record order).")
MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]#|~])")


def pick_samples(per_prompt: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The documented rule: among prompts whose similarity to the full answer is at least the median, those
    with the most early-exited tokens (ties: the order of the records)."""
    if not per_prompt or count <= 0:
        return []
    median = float(np.median([p["similarity"] for p in per_prompt]))
    kept = [(i, p) for i, p in enumerate(per_prompt) if p["similarity"] >= median]
    kept.sort(key=lambda item: (-item[1]["exited_tokens"], item[0]))
    return [p for _, p in kept[:count]]


def load_tokenizer(source: str):
    """The tokenizer of an eval's model without loading its weights: the resolved folder's own tokenizer,
    else (an adapter or exit-module folder) its base model's, followed as `lite.load_model` does."""
    from transformers import AutoTokenizer

    from ..model.config import LiteConfig
    from ..model.loading import adapter_base, resolve_model

    spec, seen = source, set()
    while spec not in seen:
        seen.add(spec)
        folder = Path(resolve_model(spec))
        if not folder.is_dir() or (folder / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        config = LiteConfig.load(folder)
        spec = (config.base_model if config is not None and config.base_model else None) or \
            adapter_base(str(folder))
        if spec is None:
            break
    raise LiteError(f"the model {source!r} has no tokenizer files and names no base model; the "
                           f"samples need its tokenizer")


def token_pieces(tokenizer, token_ids: list[int]) -> list[str]:
    """The text each token added, as the engine streams it (a partial UTF-8 character waits for the token
    that completes it; special tokens add nothing)."""
    from ..decoding.sampling import TextStream

    stream = TextStream(tokenizer)
    pieces = [stream.push(t)[0] for t in token_ids]
    if pieces:
        pieces[-1] += stream.flush()
    return pieces


def escape_markdown(text: str) -> str:
    return MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(text, quote=False))


def mark_exits(pieces: list[str], exit_layers: list[int], num_layers: int) -> str:
    """Markdown of an answer with ``<sup>k</sup>`` after every piece whose token left at k < L (a token that
    added no text, such as end-of-sequence, passes its mark to the next piece; a piece of line breaks only
    that left early is shown as ↵ before them)."""
    out, pending = [], []
    for piece, k in zip(pieces, exit_layers):
        if k < num_layers:
            pending.append(str(k))
        if not piece:
            continue
        body = piece.rstrip("\n")
        sup = f"<sup>{','.join(pending)}</sup>" if pending else ""
        shown = "↵" if sup and not body else escape_markdown(body)  # a line break that left early stays visible
        out.append(shown + sup + piece[len(body):])
        pending = []
    if pending:
        out.append(f"<sup>{','.join(pending)}</sup>")
    return "".join(out)


def blockquote(text: str) -> str:
    """Markdown text as a block quote that keeps its line breaks and indentation (leading spaces as
    non-breaking ones, so that an indented line does not turn into a code block)."""
    lines = []
    for line in text.split("\n"):
        body = line.lstrip(" ")
        lines.append(f"> {'&nbsp;' * (len(line) - len(body))}{body}  " if line.strip() else ">")
    return "\n".join(lines)
