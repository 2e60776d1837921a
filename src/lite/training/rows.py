"""The shapes of training rows lite reads, and the one record they all become (:class:`Example`).

Three shapes, told apart row by row (a file may mix them):

* Alpaca: ``{"instruction", "input", "output"}`` (``input`` may be missing or empty);
* chat (TRL's "conversational language modeling"): ``{"messages": [{"role", "content"}, ...]}``; every
  ``assistant`` message is trained on, everything else (system, user, tool messages) is context;
* prompt/completion (TRL's): ``{"prompt": str, "completion": str}``, the prompt being the user's request;
  or TRL's conversational form, ``{"prompt": [messages], "completion": [messages]}``, where only the
  completion's ``assistant`` messages are trained on (assistant turns inside the prompt are context).

A prompt-only row (an Alpaca row without ``output``, or a TRL row with a string ``prompt`` and no
``completion``) has no response of its own: it can be trained on only where the targets are the model's own
answers (:mod:`lite.training.own_answers`), which supply the response; :attr:`Example.prompt_only` marks it.

A conversation keeps its messages (:attr:`Example.messages`); ``instruction`` and ``output`` then hold the
last user message before the last trained turn and that turn's text, so code that shows or counts single
answers keeps working.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import LiteError

SHAPES_HELP = ("Alpaca rows need instruction, output (and input); chat rows need messages (a list of "
               "{role, content}); TRL rows need prompt and completion (output or completion may be left out "
               "when training on the model's own answers)")


class DataError(LiteError):
    """The training data cannot be used as given; the message names the file, line or row."""


@dataclass(frozen=True)
class Example:
    """One training row.

    Attributes:
        row_id: ``"<source index>:<row index>"``, 0-based, row index before filtering.
        instruction: the task (a conversation: its last user message before the last trained turn).
        input: optional context ("" when absent).
        output: the reference response, the training target (a conversation: its last trained turn).
        response_ids: when set, the training response as token ids instead of ``output`` (the model's own
            answer, :mod:`lite.training.own_answers`), used as they are (no EOS added).
        messages: a conversation (chat and conversational prompt/completion rows), or None.
        prompt_turns: how many leading messages are context only (a conversational prompt); the
            ``assistant`` messages after them are trained on.
        prompt_only: the row has no response (``output`` is ""): only the model's own answer can be its
            training response.
    """

    row_id: str
    instruction: str
    input: str
    output: str
    response_ids: tuple[int, ...] | list[int] | None = None
    messages: tuple[dict[str, str], ...] | None = None
    prompt_turns: int = 0
    prompt_only: bool = False

    @property
    def trained_turns(self) -> list[int]:
        """Indices of the messages trained on (``assistant`` messages after the prompt turns)."""
        if self.messages is None:
            return []
        return [i for i, m in enumerate(self.messages) if i >= self.prompt_turns and m["role"] == "assistant"]


def _messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    """A list of ``{"role": str, "content": str}`` dicts (extra keys dropped), or a DataError naming the row."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {field!r} must be a non-empty list of {{role, content}} messages, got "
                        f"{type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: {field}[{j}] must be a dict with a string 'role' and 'content', got {m!r:.80}")
        if not isinstance(m.get("content"), str):
            kind = type(m.get("content")).__name__
            raise DataError(f"{where}: {field}[{j}] ({m['role']}) has {kind} content; lite trains on text "
                            f"messages only (no tool calls or image parts)")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _conversation(row_id: str, messages: list[dict[str, str]], prompt_turns: int, where: str) -> Example:
    example = Example(row_id, "", "", "", messages=tuple(messages), prompt_turns=prompt_turns)
    trained = example.trained_turns
    if not trained:
        part = "completion" if prompt_turns else "conversation"
        raise DataError(f"{where}: the {part} has no 'assistant' message to train on")
    users = [i for i, m in enumerate(messages[:trained[0]]) if m["role"] == "user"]
    if not users:
        raise DataError(f"{where}: no 'user' message comes before the first trained 'assistant' message")
    last = trained[-1]
    last_user = max(i for i, m in enumerate(messages[:last]) if m["role"] == "user")
    return dataclasses.replace(example, instruction=messages[last_user]["content"], output=messages[last]["content"])


def parse_row(row: Any, row_id: str, where: str) -> Example:
    """One raw row (a dict from JSON or ``datasets``) as an :class:`Example`.

    Args:
        row: the raw row.
        row_id: its id (``"<source index>:<row index>"``).
        where: how errors name it, e.g. ``"data.jsonl: row 3 (0-based)"``.
    Raises:
        DataError: the row fits none of the shapes, or a field has the wrong type; the message names ``where``.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where} is not a JSON object")
    if row.get("messages") is not None:
        return _conversation(row_id, _messages(row["messages"], where, "messages"), 0, where)
    if row.get("prompt") is not None or row.get("completion") is not None:
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            return Example(row_id, prompt, "", completion)
        if isinstance(prompt, str) and completion is None:
            return Example(row_id, prompt, "", "", prompt_only=True)
        if isinstance(prompt, list) and isinstance(completion, list):
            turns = _messages(prompt, where, "prompt")
            return _conversation(row_id, turns + _messages(completion, where, "completion"), len(turns), where)
        raise DataError(f"{where}: 'prompt' and 'completion' must both be strings, or both lists of "
                        f"{{role, content}} messages (TRL's conversational form); got "
                        f"{type(prompt).__name__} and {type(completion).__name__}")
    # an Alpaca row without any output is a prompt-only row; an output of another type is a mistake
    if not isinstance(row.get("instruction"), str) or not isinstance(row.get("output", ""), str | None):
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
        raise DataError(f"{where} lacks string field(s) {missing}; {SHAPES_HELP}")
    inp = row.get("input") or ""
    if not isinstance(inp, str):
        raise DataError(f"{where}: field 'input' must be a string, got {type(inp).__name__}")
    if row.get("output") is None:
        return Example(row_id, row["instruction"], inp, "", prompt_only=True)
    return Example(row_id, row["instruction"], inp, row["output"])


def split_turns(example: Example) -> list[Example]:
    """A conversation as one example per trained turn, each ending at that turn with only it trained (how
    a format without turns, Alpaca, trains every assistant turn); any other example as it is."""
    if example.messages is None or example.response_ids is not None:
        return [example]
    out = []
    for a in example.trained_turns:
        messages = list(example.messages[:a + 1])
        last_user = max(i for i, m in enumerate(messages[:a]) if m["role"] == "user")
        out.append(dataclasses.replace(example, messages=tuple(messages), prompt_turns=a,
                                       instruction=messages[last_user]["content"], output=messages[a]["content"]))
    return out


def response_texts(example: Example) -> list[str]:
    """The texts a row trains on: its output, or every trained assistant turn of a conversation (none for
    a prompt-only row)."""
    if getattr(example, "prompt_only", False):
        return []
    if getattr(example, "messages", None) is None:  # any row with an ``output``
        return [example.output]
    return [example.messages[i]["content"] for i in example.trained_turns]
