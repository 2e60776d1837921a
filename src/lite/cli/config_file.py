"""``--config FILE`` for every verb: a run written as a file people can share.

The file is a mapping from flag names to values, YAML when PyYAML is installed (JSON is YAML too), else
JSON; a ``.json`` file is always read as JSON. Keys are a verb's long flag names without the dashes, with
``-`` or ``_`` (``max_steps`` or ``max-steps``); values are what the flag takes: a number or text, true or
false for a switch, a list for a flag that takes several values or may be repeated; null means the default.

The file is turned into command-line arguments before parsing, so every value goes through the flag's own
``type=`` check and ``choices`` (:mod:`lite.cli.numbers`), exactly as if typed; a flag given on the command
line wins over the same key in the file (for a repeatable flag, the command line's values replace the
file's). A key that is no flag of the verb, or a value its flag refuses, is refused with exit status 2,
naming the file and the key, before anything is loaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

FLAG = "--config"
HELP = ("read flags from a YAML or JSON file: keys are this verb's long flag names (max_steps or max-steps), "
        "values as on the command line (true/false for switches, lists for flags taking several values); flags "
        "given on the command line win")
NOT_IN_FILES = {"config", "help", "version"}


class ConfigFileError(Exception):
    """The config file cannot be used; the message names the file (and the key)."""


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in ``path`` (YAML when PyYAML is installed, else JSON; ``.json`` always as JSON)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigFileError(f"{FLAG} {path}: not UTF-8 text; give a YAML or JSON file") from None
    except OSError as exc:
        raise ConfigFileError(f"{FLAG} {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        import yaml
    except ImportError:
        yaml = None
    try:
        if yaml is None or file.suffix.lower() == ".json":
            values = json.loads(text) if text.strip() else {}
        else:
            values = yaml.safe_load(text) or {}
    except ValueError as exc:  # json.JSONDecodeError
        hint = "" if yaml is not None else " (PyYAML is not installed: only JSON is read)"
        raise ConfigFileError(f"{FLAG} {path}: malformed JSON{hint}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 -- yaml.YAMLError and its kin, without importing yaml here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigFileError(f"{FLAG} {path}: malformed YAML: {first}") from None
    if not isinstance(values, dict):
        raise ConfigFileError(f"{FLAG} {path}: expected a mapping of flag names to values, got a "
                              f"{type(values).__name__}")
    return values


def _long_option(action: argparse.Action) -> str:
    return next(s for s in action.option_strings if s.startswith("--"))


def _check(action: argparse.Action, text: str, where: str) -> None:
    """The flag's own type= check and choices, as argparse applies them."""
    value: Any = text
    if action.type is not None:
        try:
            value = action.type(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ConfigFileError(f"{where}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigFileError(f"{where}: must be one of {', '.join(map(str, action.choices))}, got {text!r}")


def _as_text(value: Any, where: str) -> str:
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise ConfigFileError(f"{where}: takes one value (a number or text), got {json.dumps(value)}; quote "
                              f"text such as 'off' or 'yes' in YAML")
    return str(value)


def config_arguments(parser: argparse.ArgumentParser, values: dict[str, Any], path: str
                     ) -> list[tuple[argparse.Action, list[str]]]:
    """Each key of a config file as (its flag's action, the command-line words it stands for), checked.

    Raises:
        ConfigFileError: an unknown key, or a value its flag refuses; naming the file and the key.
    """
    out = []
    for key, value in values.items():
        name = str(key).strip().lstrip("-").replace("_", "-")
        action = parser._option_string_actions.get(f"--{name}")  # noqa: SLF001 -- argparse has no public lookup
        if action is None or action.dest in NOT_IN_FILES or not action.option_strings:
            raise ConfigFileError(f"{FLAG} {path}: unknown key {key!r}: '{parser.prog}' has no flag --{name} (keys "
                                  f"are its long flag names)")
        where = f"{FLAG} {path}: {key}"
        if value is None:
            continue
        flag = _long_option(action)
        if action.nargs == 0:  # a switch: store_true / store_false / store_const / --x and --no-x
            if not isinstance(value, bool):
                raise ConfigFileError(f"{where}: is a switch, give true or false, got {json.dumps(value)}")
            if isinstance(action, argparse.BooleanOptionalAction):  # own-answers: false means --no-own-answers
                yes, no = action.option_strings[:2]
                out.append((action, [yes if value != (f"--{name}" == no) else no]))
            else:
                out.append((action, [flag] if value == bool(action.const) else []))
            continue
        many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)  # noqa: SLF001
        items = value if many and isinstance(value, list) else [value]
        texts = [_as_text(v, where) for v in items]
        if many and not texts:
            raise ConfigFileError(f"{where}: give at least one value")
        for text in texts:
            _check(action, text, where)
        if isinstance(action, argparse._AppendAction):  # noqa: SLF001
            out.append((action, [w for t in texts for w in (flag, t)]))
        else:
            out.append((action, [flag, *texts]))
    return out


def _given(parser: argparse.ArgumentParser, words: list[str]) -> set[str]:
    """The dests of the flags present in command-line words (also abbreviated, as argparse allows)."""
    options = parser._option_string_actions  # noqa: SLF001
    given = set()
    for word in words:
        if word == "--":
            break
        if not word.startswith("--"):
            continue
        name = word.split("=", 1)[0]
        matches = [name] if name in options else [o for o in options if o.startswith(name)]
        if len({options[m].dest for m in matches}) == 1:
            given.add(options[matches[0]].dest)
    return given


def expand(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """A verb's command-line words with ``--config FILE`` replaced by the file's flags (those the command
    line does not give itself); unchanged when there is no ``--config``."""
    paths, rest, i = [], [], 0
    while i < len(words):
        word = words[i]
        if word == "--":
            rest += words[i:]
            break
        if word == FLAG:
            if i + 1 >= len(words):
                raise ConfigFileError(f"{FLAG}: give a file")
            paths.append(words[i + 1])
            i += 2
            continue
        if word.startswith(FLAG + "="):
            paths.append(word[len(FLAG) + 1:])
            i += 1
            continue
        rest.append(word)
        i += 1
    if not paths:
        return words
    if len(paths) > 1:
        raise ConfigFileError(f"{FLAG} given {len(paths)} times ({', '.join(paths)}); give one file")
    pairs = config_arguments(parser, read_config_file(paths[0]), paths[0])
    given = _given(parser, rest)
    from_file = [w for action, ws in pairs if action.dest not in given for w in ws]
    cut = rest.index("--") if "--" in rest else len(rest)
    return rest[:cut] + from_file + rest[cut:]
