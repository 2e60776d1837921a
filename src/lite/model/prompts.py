"""Prompt formats: the Stanford Alpaca template (the paper's) and the tokenizer's chat template.

Training and decoding share these functions so that a model is prompted at inference exactly as it was
trained. The format a checkpoint was trained with is ``prompt_format`` in its ``lite_config.json``.
"""

from __future__ import annotations

from ..errors import LiteError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
FORMATS = ("alpaca", "chat", "raw")


def check_text(text: str, what: str = "the prompt") -> str:
    """``text`` when it is Unicode text a tokenizer can encode; else a LiteError naming the fault.

    A command-line argument in bytes that are not UTF-8 reaches Python as surrogate escapes (``0xe9`` of a
    Latin-1 ``é`` becomes ``\\udce9``), and JSON can hold lone surrogates (``"\\ud800"``): neither is text.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, kept by the surrogateescape handler
            raise LiteError(f"{what} holds bytes that are not UTF-8 (0x{code - 0xDC00:02x} at character "
                            f"{exc.start}); pass it as UTF-8 text (convert it first, e.g. iconv -t UTF-8, or set "
                            f"the terminal to UTF-8)") from None
        raise LiteError(f"{what} holds a lone surrogate (\\u{code:04x} at character {exc.start}), which is not "
                        f"Unicode text; pass the text itself") from None
    return text


def default_format(lm) -> str:
    """The prompt format a model is used with when none is asked for: the ``prompt_format`` of its
    ``lite_config.json`` when its folder has one (it was trained or calibrated by lite), else the
    tokenizer's chat template when there is one, else Alpaca. Every verb uses this one rule."""
    from pathlib import Path

    from .config import CONFIG_NAME

    if lm.folder is not None and (Path(lm.folder) / CONFIG_NAME).is_file():
        return lm.lite_config.prompt_format
    return "chat" if getattr(lm.tokenizer, "chat_template", None) else "alpaca"


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca prompt; the no-input variant when ``input`` is empty."""
    if input and input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def prompt_text(tokenizer, instruction: str, input: str = "", fmt: str = "alpaca") -> str:
    """The full prompt string, ending where the response starts.

    Args:
        fmt: "alpaca" (template above), "chat" (the tokenizer's chat template with a generation prompt;
            instruction and input joined by a blank line as the user turn), or "raw" (the text as is).
    """
    if fmt == "alpaca":
        return alpaca_prompt(instruction, input)
    if fmt == "raw":
        return instruction if not input else f"{instruction}\n\n{input}"
    if fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise LiteError("--prompt-format chat: this tokenizer has no chat template; use --prompt-format alpaca")
        user = instruction if not input else f"{instruction}\n\n{input}"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    raise LiteError(f"--prompt-format must be one of {FORMATS}, got {fmt!r}")


def encode_prompt(tokenizer, instruction: str, input: str = "", fmt: str = "alpaca") -> list[int]:
    """Token ids of the formatted prompt. Special tokens of a chat template are kept as written; the
    Alpaca and raw formats get the tokenizer's usual BOS handling."""
    check_text(instruction)
    check_text(input, "the prompt's input")
    text = prompt_text(tokenizer, instruction, input, fmt)
    add_special = fmt != "chat"
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def check_messages(messages: object, what: str = "messages") -> list[dict[str, str]]:
    """A conversation as chat templates take it: a non-empty list of ``{"role": ..., "content": ...}``
    dicts with string values and at least one user turn.

    Raises:
        LiteError: anything else, naming ``what`` and the first bad message.
    """
    if not isinstance(messages, list) or not messages:
        raise LiteError(f"{what}: give a non-empty list of {{'role': ..., 'content': ...}} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LiteError(f"{what}[{i}]: each message is a dict with a string 'role' and a string 'content', "
                            f"got {m!r:.80}")
        check_text(m["content"], f"{what}[{i}]")
    if not any(m["role"] == "user" for m in messages):
        raise LiteError(f"{what}: the conversation has no 'user' message")
    return messages


def encode_messages(tokenizer, messages: list[dict[str, str]], fmt: str = "chat") -> list[int]:
    """Token ids of a conversation, ending where the assistant's reply starts.

    ``chat`` applies the tokenizer's chat template with a generation prompt (a one-message conversation
    gives exactly :func:`encode_prompt` of its text). ``alpaca`` makes the last user message the
    instruction and puts earlier turns (``role: content`` paragraphs) in the Input. ``raw`` has no notion
    of turns and is refused.
    """
    check_messages(messages)
    if fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise LiteError("--prompt-format chat: this tokenizer has no chat template; use --prompt-format alpaca")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if fmt == "alpaca":
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        earlier = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages[:last_user])
        return list(tokenizer(alpaca_prompt(messages[last_user]["content"], earlier))["input_ids"])
    raise LiteError(f"chat messages need --prompt-format chat or alpaca, not {fmt!r}")
