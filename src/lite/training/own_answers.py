"""The model's own answers as training responses (on-policy data).

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
from .data import DataError, Example, answer_budget, prompt_ids

ANSWERS_FILE = "own_answers.jsonl"


def _prompt_key(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """row id -> cached line, from whole batches only.

    A batch is appended in one write, each of its lines naming the batch (``batch``: its first row id) and
    its size (``batch_rows``). A kill during that write leaves a torn last line, or fewer lines than the
    batch has: that batch is cut off the file here, so its rows are generated again together, in the same
    batch (greedy answers can differ in the last bit with the batch they are padded in). Lines of older
    files, without a batch, count one by one.
    """
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    raw = path.read_bytes()
    good_end = offset = 0
    group: list[dict[str, Any]] = []
    for line in raw.splitlines(keepends=True):
        offset += len(line)
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
        if not line.endswith(b"\n") or not isinstance(entry, dict) or "row_id" not in entry:
            break
        if "batch" not in entry:
            done[entry["row_id"]] = entry
            good_end = offset
            continue
        if group and group[0]["batch"] != entry["batch"]:
            break  # the batch before was cut short
        group.append(entry)
        if len(group) == entry["batch_rows"]:
            done.update((e["row_id"], e) for e in group)
            good_end, group = offset, []
    if good_end != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


def generate_own_answers(lm, examples: list[Example], *, prompt_format: str, cache: Path,
                         max_new_tokens: int = 128, max_length: int | None = None, batch_size: int = 16,
                         model_id: str | None = None, bf16: bool = False,
                         progress: Callable[[str], None] | None = None) -> tuple[list[Example], dict[str, Any]]:
    """Replace each example's response by ``lm``'s own greedy answer, generated once and cached.

    Args:
        lm: the starting model (a :class:`lite.model.adapter.LiteModel`), exits off.
        examples: training rows.
        prompt_format: the format the rows are trained in (the answer follows the same prompt).
        cache: the ``own_answers.jsonl`` file (created, or resumed).
        max_new_tokens: cap per answer.
        max_length: the cut of the training sequences (``--max-length``): an answer gets at most the tokens
            left after its prompt (:func:`lite.training.data.answer_budget`); a row whose prompt alone
            reaches it gets no answer (an empty response: the row is dropped as too long, and never goes
            through the model). None: no cut.
        batch_size: prompts per ``generate`` call (left-padded).
        model_id: what the model was loaded from (recorded per answer; answers of another model are refused).
        bf16: generate under bf16 autocast (``--bf16``; 2-3x faster on CPUs with native bf16). Greedy answers
            can then differ from float32 ones at near-ties; they are still the model's own answers.
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
    budgets = [answer_budget(len(p), max_new_tokens, max_length if max_length is not None else len(p) +
                             max_new_tokens) for p in prompts]
    eos_set = eos_ids(tok, getattr(lm.model, "generation_config", None))
    for e, budget in zip(examples, budgets):  # greedy answers are prefixes of longer ones: a longer one is cut
        entry = done.get(e.row_id)
        if entry is None or budget == 0:
            continue
        made_with = entry.get("max_new_tokens", budget)
        ended = bool(entry["ids"]) and entry["ids"][-1] in eos_set
        if len(entry["ids"]) > budget:
            entry["ids"] = entry["ids"][:budget]
        elif made_with < budget and not ended:  # cut shorter than asked now: generate again
            entry["stale"] = True
    todo = [i for i, e in enumerate(examples)
            if budgets[i] > 0 and (e.row_id not in done or done[e.row_id].get("stale"))]
    start = time.perf_counter()
    if todo:
        say(f"generating the model's own answers for {len(todo)} of {len(examples)} rows "
            f"(batches of {batch_size}, cached in {cache})")
    cache.parent.mkdir(parents=True, exist_ok=True)
    # longest prompts first: batches of similar length waste less on padding
    todo.sort(key=lambda i: -len(prompts[i]))
    for b in range(0, len(todo), batch_size):
        chunk = todo[b:b + batch_size]
        answers, _ = hf_generate_batch(lm, [prompts[i] for i in chunk], max(budgets[i] for i in chunk), bf16=bf16)
        lines = []
        for i, answer in zip(chunk, answers):
            entry = {"row_id": examples[i].row_id, "prompt_key": _prompt_key(prompts[i]), "model": model_id,
                     "max_new_tokens": budgets[i], "ids": answer[:budgets[i]],
                     "batch": examples[chunk[0]].row_id, "batch_rows": len(chunk)}
            done[entry["row_id"]] = entry
            lines.append(json.dumps(entry))
        with cache.open("a", encoding="utf-8") as f:  # one append per batch: a kill loses one batch at most
            f.write("\n".join(lines) + "\n")
        say(f"own answers: {min(b + batch_size, len(todo))}/{len(todo)}")
    answered = [dataclasses.replace(e, response_ids=tuple(done[e.row_id]["ids"]) if budget else ())
                for e, budget in zip(examples, budgets)]
    lengths = [len(e.response_ids) for e in answered if e.response_ids]
    provenance = {
        "responses": "own answers", "file": ANSWERS_FILE, "rows": len(answered),
        "max_new_tokens": max_new_tokens, "greedy": True, "prompt_format": prompt_format,
        "autocast": "bfloat16" if bf16 else None,
        "mean_tokens": round(sum(lengths) / max(len(lengths), 1), 1),
        "rows_prompt_too_long": budgets.count(0),
        "generated_seconds": round(time.perf_counter() - start, 1),
    }
    return answered, provenance


