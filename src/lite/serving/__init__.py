"""Serving: an OpenAI-compatible HTTP server that decodes with early exit (``lite serve``).

Modules: :mod:`.app` (the FastAPI app and its routes), :mod:`.queue` (the decode worker the requests
share), :mod:`.schema` (the OpenAI request and response shapes).
"""

from .app import (
    API_KEY_ENV,
    ServeConfig,
    chat_prompt_ids,
    completion_prompt_ids,
    config_from_env,
    create_app,
    describe,
    resolve_chat_format,
    serve,
    serve_in_thread,
)

__all__ = ["API_KEY_ENV", "ServeConfig", "chat_prompt_ids", "completion_prompt_ids", "config_from_env",
           "create_app", "describe", "resolve_chat_format", "serve", "serve_in_thread"]
