"""What lite refuses to load, and how a failure to load becomes one message that names the file.

:func:`lite.model.loading.load_model` calls :func:`check_loadable` on every local folder before
transformers reads it (custom code is refused outright, so transformers never asks "run this code?"; a
folder without tokenizer files is named), and turns any exception from transformers or peft into
:func:`load_error`'s :class:`LiteError`: a damaged or truncated safetensors file (found by reading every
header), a pickle that torch's ``weights_only`` guard refused, custom code, or no network.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LiteError


class ModelNotFoundError(LiteError):
    """The model argument names no local folder, known alias or reachable hub id."""


class ModelLoadError(LiteError):
    """A model folder exists but cannot be loaded (a damaged file, no tokenizer, code lite will not run)."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt")


def check_loadable(folder: str, flag: str, tokenizer: bool = True) -> None:
    """Refuse, before transformers reads it, a local folder that lite will not or cannot load.

    Refused: a model or tokenizer that needs its own Python code (``auto_map``; lite never runs code from
    a model folder), and, when ``tokenizer``, a folder without tokenizer files.

    Raises:
        ModelLoadError: naming the folder (and ``flag``) and the fix.
    """
    path = Path(folder)
    if not path.is_dir():
        return  # a hub id: transformers' own checks (trust_remote_code=False) apply
    for name in ("config.json", "tokenizer_config.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{flag}: {file} cannot be read as JSON ({exc}); copy the model again") from None
        if isinstance(data, dict) and data.get("auto_map"):
            raise ModelLoadError(
                f"{flag}: {file} asks for custom code ({', '.join(sorted(data['auto_map']))} in auto_map); lite "
                f"never runs code from a model folder (trust_remote_code=False): use a model of an architecture "
                f"transformers ships (LLaMA family)"
            )
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{flag}: {path} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); "
                             f"copy them from the model it was made from (tokenizer.save_pretrained(folder))")


def _damaged_safetensors(folder: str) -> Path | None:
    """The first ``*.safetensors`` file in ``folder`` whose header cannot be read, or None."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception:  # noqa: BLE001 -- any failure to read the header means the file is damaged
            return file
    return None


def load_error(exc: Exception, flag: str, spec, folders: list[str]) -> LiteError:
    """One clean :class:`LiteError` for a failure inside transformers or peft while loading ``folders``:
    it names the file and the fix (a damaged safetensors file, an unsafe pickle, custom code, no network)."""
    text = str(exc).strip()
    first = (text.splitlines() or [""])[0][:300]
    for folder in folders:
        damaged = _damaged_safetensors(folder)
        if damaged is not None:
            return ModelLoadError(f"{flag} {spec}: {damaged} is damaged or truncated (its header cannot be read); "
                                  f"copy or save the model again")
    if type(exc).__name__ == "UnpicklingError" or "weights_only" in text or "Weights only load failed" in text:
        return ModelLoadError(
            f"{flag} {spec}: a pickled checkpoint (.bin/.pt) in {' or '.join(folders)} holds more than plain "
            f"weights; lite loads pickles only under torch's weights_only guard and refuses it: convert the model "
            f"to safetensors from a copy you trust"
        )
    if "trust_remote_code" in text or "custom code" in text:
        return ModelLoadError(f"{flag} {spec}: the model needs custom code; lite never runs code from a model "
                              f"(trust_remote_code=False): use a model of an architecture transformers ships")
    if isinstance(exc, OSError):
        local = [f for f in folders if Path(f).is_dir()]
        if len(local) == len(folders):  # nothing to fetch: a file of the folder is missing or unreadable
            return ModelLoadError(f"{flag} {spec}: could not load {' / '.join(local)} ({first}); copy or save "
                                  f"the model again")
        return ModelNotFoundError(f"{flag} {spec}: could not load it ({first}). Without network only local "
                                  f"folders and the embedded default work.")
    return ModelLoadError(f"{flag} {spec}: could not load {' / '.join(folders)} ({type(exc).__name__}: {first})")
