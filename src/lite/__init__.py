"""lite: LITE instruction tuning and token-level early-exit decoding for Llama-family models."""

from .config import LiteConfig, default_exit_layers
from .loading import DEFAULT_MODEL, load_model

__all__ = ["LiteConfig", "default_exit_layers", "load_model", "DEFAULT_MODEL"]
__version__ = "0.1.0"
