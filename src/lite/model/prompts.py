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
    text = prompt_text(tokenizer, instruction, input, fmt)
    add_special = fmt != "chat"
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
