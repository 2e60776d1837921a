"""The ground floor: a Hugging Face model seen as decoder blocks with exits, and how it is found and loaded.

Modules: :mod:`.adapter` (:class:`LiteModel`, the only module of lite that touches transformers
internals), :mod:`.loading` (folders, adapters, hub ids, the embedded default, devices, ``$LITE_HOME``),
:mod:`.config` (``lite_config.json``), :mod:`.prompts` (prompt formats). Nothing here imports another part
of lite. The adapter and loader import torch, so they load on first use: ``import lite`` stays fast.
"""

from __future__ import annotations

from .config import CONFIG_NAME, LiteConfig, LiteConfigError, default_exit_layers, parse_exit_layers

_LAZY = {"LiteModel": "adapter", "KVCache": "adapter", "cache_keyword": "adapter",
         "load_model": "loading", "DEFAULT_MODEL": "loading", "ModelNotFoundError": "loading"}

__all__ = ["CONFIG_NAME", "LiteConfig", "LiteConfigError", "default_exit_layers", "parse_exit_layers", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
