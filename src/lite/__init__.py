"""lite: LITE instruction tuning and token-level early-exit decoding for Llama-family models."""

from .model.config import LiteConfig, default_exit_layers  # light: no torch

__all__ = ["DEFAULT_MODEL", "LiteConfig", "LiteLM", "custom_generate", "default_exit_layers", "load", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # torch and transformers load on first use, so that `lite --help` and `import lite.cli` stay fast
    if name in ("load_model", "DEFAULT_MODEL"):
        from .model import loading  # torch and transformers load here

        return getattr(loading, name)
    if name in ("load", "LiteLM"):  # the one-call Python API (lite.api)
        from . import api

        return getattr(api, name)
    if name == "custom_generate":  # model.generate(..., custom_generate=lite.custom_generate, exit=...)
        from .decoding import hf_generate

        return hf_generate.custom_generate
    raise AttributeError(f"module 'lite' has no attribute {name!r}")
