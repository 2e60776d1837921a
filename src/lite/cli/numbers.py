"""Argparse types for every number (and a few texts) the verbs take: checked where they enter.

Each flag that takes a number names one of these as its ``type=``, so a value that is not a number, not
finite (``nan``, ``inf``) or out of range is refused by argparse itself, before anything is loaded, as
``lite VERB: error: argument --lr: must be a finite number > 0, got 'nan'`` with exit status 2. The library
functions check their arguments again (for Python callers); the CLI never relies on that.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

SEED_MAX = 2**32 - 1  # numpy's seed range, the narrowest of the generators lite seeds


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def number(kind: type = float, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], int | float]:
    """An argparse type: ``kind`` (int or float), finite, within [low, high] (open ends when asked).

    Args:
        kind: ``int`` (no fractions, no exponents) or ``float`` (NaN and infinities refused).
        low, high: the bounds, None for none.
        low_open, high_open: exclude the bound itself.
    """
    noun = "an integer" if kind is int else "a finite number"
    where = _interval(low, high, low_open, high_open)
    wanted = f"{noun} {where}".strip()

    def parse(text: str) -> int | float:
        try:
            value = kind(text.strip())
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        too_low = low is not None and (value < low or (low_open and value == low))
        too_high = high is not None and (value > high or (high_open and value == high))
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    parse.__name__ = wanted  # what argparse would show for an unexpected failure
    return parse


positive_int = number(int, 1)
nonnegative_int = number(int, 0)
positive_float = number(float, 0, low_open=True)
nonnegative_float = number(float, 0)
finite_float = number(float)
probability = number(float, 0, 1)  # [0, 1]
fraction = number(float, 0, 1, high_open=True)  # [0, 1): a share that cannot be all
open_unit = number(float, 0, 1, low_open=True, high_open=True)  # (0, 1)
seed = number(int, 0, SEED_MAX)
port = number(int, 0, 65535)


def nonempty_text(text: str) -> str:
    """A prompt: UTF-8 text with something in it besides spaces."""
    from ..errors import LiteError
    from ..model.prompts import check_text

    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty: give some text")
    try:
        return check_text(text)
    except LiteError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def report_targets(text: str) -> list[str]:
    """``--report-to``: ``none``, or comma-separated ``tensorboard``/``wandb`` (whether each is installed is
    checked by :func:`lite.training.config.report_destinations`, before the model loads)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in ("none", "tensorboard", "wandb")]
    if not names or bad or ("none" in names and len(names) > 1):
        raise argparse.ArgumentTypeError(f"give none, tensorboard, wandb or tensorboard,wandb; got {text!r}")
    return [n for n in names if n != "none"]


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names (``--lora-targets q_proj,v_proj``), spaces and empty items dropped."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def positive_floats(text: str) -> list[float]:
    """Comma-separated finite numbers > 0, at least one (``--threshold-scales 0.8,0.9,1.0``)."""
    parts = [t for t in text.split(",") if t.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("give at least one number > 0, e.g. 1.0")
    try:
        return [positive_float(t) for t in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be finite numbers > 0 like 0.8,0.9,1.0, got {text!r}") from None


def thresholds(text: str) -> str:
    """``--thresholds``: one finite number for every exit (``0.9``) or ``LAYER:VALUE`` pairs, each value a
    confidence in [-1, 1] (the measure decides the exact range, checked once the model is known). The
    text itself is returned: :func:`lite.decoding.spec.build_policy` turns it into thresholds."""
    from ..decoding.spec import parse_thresholds
    from ..errors import LiteError

    try:
        values = parse_thresholds(text) if ":" in text else {0: float(text)}
    except ValueError as exc:  # LiteError is a ValueError
        message = str(exc).removeprefix("--thresholds").lstrip(": ")
        raise argparse.ArgumentTypeError(message if isinstance(exc, LiteError) else
                                         f"give one number or LAYER:VALUE pairs like '8:0.9', got {text!r}") \
            from None
    bad = {k: v for k, v in values.items() if not (math.isfinite(v) and -1.0 <= v <= 1.0)}
    if bad:
        shown = ", ".join(f"{v}" if k == 0 else f"{k}:{v}" for k, v in bad.items())
        raise argparse.ArgumentTypeError(f"thresholds are confidences in [-1, 1] (max_prob, margin and entropy "
                                         f"in [0, 1]), got {shown}")
    return text


def device_name(text: str) -> str:
    """``--device``: a torch device name this machine has (``auto`` = the accelerator torch reports, else
    the CPU), checked with :func:`lite.model.loading.parse_device` before anything is loaded; the text is
    returned as given."""
    from ..errors import LiteError
    from ..model.loading import parse_device

    try:
        parse_device(text)
    except LiteError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device").lstrip(" :")) from None
    return text


BUILTIN_EXITS = ("auto", "none", "dynamic", "gate", "static", "speculative")


def exit_spec(text: str) -> str:
    """``--exit``: ``auto``, ``none``, ``dynamic``, ``gate``, ``static:K`` (K >= 1) or ``speculative[:N]``
    (N >= 1). Whether K is a layer of the model is checked once it is loaded; the text is returned as given."""
    kind, sep, arg = text.strip().partition(":")
    if kind not in BUILTIN_EXITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a policy: use auto, none, dynamic, gate, static:K or "
                                         f"speculative[:N]")
    if kind == "static" or (kind == "speculative" and sep):
        try:
            number(int, 1)(arg)
        except argparse.ArgumentTypeError:
            what = "K (the exit layer)" if kind == "static" else "N (tokens drafted per round)"
            raise argparse.ArgumentTypeError(f"{text!r}: {what} must be an integer >= 1, e.g. {kind}:4") from None
    elif sep:
        raise argparse.ArgumentTypeError(f"{text!r}: {kind} takes no ':' argument")
    return text
