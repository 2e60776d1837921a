"""The model's own answers as training responses (SPEC §7, on-policy data).

Exits are used on the tokens the model itself generates, so they are best trained on those: for every
training instruction, the starting model's greedy answer (exits off) replaces the dataset's response.
Answers are generated once, in batches (transformers' ``generate`` with left padding), and cached next to
the run (``own_answers.jsonl``: one line per row, appended batch by batch, so a killed run resumes where
it stopped). Each line records the row id, a hash of the prompt ids, the model, the token budget and the
answer's token ids; the token ids themselves are the training response (no decode/re-encode round trip).
Greedy answers are prefix-consistent, so answers cached with a larger budget are cut to a smaller one.

A conversation (a chat or conversational prompt/completion row) gets one answer: to the conversation up to
its last trained assistant turn, which it replaces; that answer is then the row's only trained response,
the earlier turns (the dataset's own assistant turns included) being context. Training on the dataset's
earlier assistant turns would bring back the other model's tokens that own answers are meant to avoid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..decoding.reference import hf_generate_batch
from ..decoding.sampling import eos_ids
from .data import DataError, Example, prompt_ids

ANSWERS_FILE = "own_answers.jsonl"


def _prompt_key(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """row id -> cached line; a torn last line (a kill mid-write) is ignored and regenerated."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[entry["row_id"]] = entry
    return done


def generate_own_answers(lm, examples: list[Example], *, prompt_format: str, cache: Path,
                         max_new_tokens: int = 128, batch_size: int = 16, model_id: str | None = None,
                         bf16: bool = False, max_prompt_tokens: int | None = None,
                         progress: Callable[[str], None] | None = None) -> tuple[list[Example], dict[str, Any]]:
    """Replace each example's response by ``lm``'s own greedy answer, generated once and cached.

    Args:
        lm: the starting model (a :class:`lite.model.adapter.LiteModel`), exits off.
        examples: training rows.
        prompt_format: the format the rows are trained in (the answer follows the same prompt).
        cache: the ``own_answers.jsonl`` file (created, or resumed).
        max_new_tokens: cap per answer.
        batch_size: prompts per ``generate`` call (left-padded).
        model_id: what the model was loaded from (recorded per answer; answers of another model are refused).
        bf16: generate under bf16 autocast (``--bf16``; 2-3x faster on CPUs with native bf16). Greedy answers
            can then differ from float32 ones at near-ties; they are still the model's own answers.
        max_prompt_tokens: rows whose prompt has at least this many tokens get no answer (an empty response,
            which tokenisation drops): with ``--max-length`` this many, none of their answer would be kept.
    Returns:
        (examples with ``response_ids`` set to the answers, provenance for ``lite_config.json``).
    """
    say = progress or (lambda _m: None)
    tok = lm.tokenizer
    prompts = [prompt_ids(tok, e, prompt_format) for e in examples]
    done = _read_cache(cache)
    stale = [e.row_id for e, p in zip(examples, prompts) if e.row_id in done and (
        done[e.row_id]["prompt_key"] != _prompt_key(p) or done[e.row_id].get("model", model_id) != model_id)]
    if stale:
        raise DataError(f"{cache} holds answers to other prompts (rows {stale[:3]}...); it belongs to another "
                        f"model or prompt format: delete it to generate afresh")
    eos_set = eos_ids(tok, getattr(lm.model, "generation_config", None))
    for entry in done.values():  # greedy answers are prefixes of longer ones: a longer cached answer is cut
        made_with = entry.get("max_new_tokens", max_new_tokens)
        ended = bool(entry["ids"]) and entry["ids"][-1] in eos_set
        if len(entry["ids"]) > max_new_tokens:
            entry["ids"] = entry["ids"][:max_new_tokens]
        elif made_with < max_new_tokens and not ended:  # cut shorter than asked now: generate again
            entry["stale"] = True
    too_long = {i for i, p in enumerate(prompts) if max_prompt_tokens is not None and len(p) >= max_prompt_tokens}
    todo = [i for i, e in enumerate(examples) if i not in too_long and (
        e.row_id not in done or done[e.row_id].get("stale"))]
    start = time.perf_counter()
    if todo:
        say(f"generating the model's own answers for {len(todo)} of {len(examples)} rows "
            f"(batches of {batch_size}, cached in {cache})")
    cache.parent.mkdir(parents=True, exist_ok=True)
    # longest prompts first: batches of similar length waste less on padding
    todo.sort(key=lambda i: -len(prompts[i]))
    for b in range(0, len(todo), batch_size):
        chunk = todo[b:b + batch_size]
        answers, _ = hf_generate_batch(lm, [prompts[i] for i in chunk], max_new_tokens, bf16=bf16)
        lines = []
        for i, answer in zip(chunk, answers):
            entry = {"row_id": examples[i].row_id, "prompt_key": _prompt_key(prompts[i]), "model": model_id,
                     "max_new_tokens": max_new_tokens, "ids": answer}
            done[entry["row_id"]] = entry
            lines.append(json.dumps(entry))
        with cache.open("a", encoding="utf-8") as f:  # one append per batch: a kill loses one batch at most
            f.write("\n".join(lines) + "\n")
        say(f"own answers: {min(b + batch_size, len(todo))}/{len(todo)}")
    answered = [dataclasses.replace(e, response_ids=() if i in too_long else tuple(done[e.row_id]["ids"]))
                for i, e in enumerate(examples)]
    lengths = [len(e.response_ids) for e in answered]
    provenance = {
        "responses": "own answers", "file": ANSWERS_FILE, "rows": len(answered),
        "max_new_tokens": max_new_tokens, "greedy": True, "prompt_format": prompt_format,
        "autocast": "bfloat16" if bf16 else None,
        "mean_tokens": round(sum(lengths) / max(len(lengths) - len(too_long), 1), 1),
        "rows_prompt_too_long": len(too_long),
        "generated_seconds": round(time.perf_counter() - start, 1),
    }
    return answered, provenance


