"""`lite serve`: an OpenAI-compatible HTTP server that decodes with early exit (see docs/serve.md)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket

from ..errors import LiteError
from . import add_device_argument, add_dtype_argument, add_exit_argument, add_threads_argument
from .numbers import nonnegative_int, port, positive_float, positive_int

EXAMPLE = "lite serve --model runs/mine --port 8000 --max-batch 8"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder, LoRA adapter folder, hub id, or smollm2-135m-instruct")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="the id clients send as 'model' (default: the --model text, or smollm2-135m-instruct)")
    add_exit_argument(p, "auto", more="; the server's default, a request overrides it with lite.exit")
    p.add_argument("--kv", default="copy", choices=["copy", "recompute"],
                   help="what later tokens see at skipped layers (default copy)")
    p.add_argument("--threshold-scale", type=positive_float, default=1.0,
                   help="multiply every dynamic threshold (>1 exits less, <1 more; default 1)")
    p.add_argument("--max-tokens-cap", type=positive_int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=positive_int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--max-queue", type=nonnegative_int, default=16,
                   help="requests that may wait while the batch is full; more are answered 503 (default 16)")
    p.add_argument("--max-batch", type=positive_int, default=8,
                   help="sequences decoded together: requests join the running batch at the next token and "
                        "leave it when done (continuous batching; 1 = one at a time; default 8)")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                   help="compute every request exactly as it is computed alone, so a greedy request gets the "
                        "same tokens whatever else is running (default: on in bfloat16/float16, off in float32; "
                        "--no-batch-invariant batches the rows' matrix products: more tokens/s under load, "
                        "answers may differ at near-ties; see docs/serve.md for the measured cost)")
    p.add_argument("--chat-format", default="auto", choices=["auto", "chat", "alpaca"],
                   help="prompt format of chat requests (auto: the Alpaca template for a lite checkpoint trained "
                        "on it, else the tokenizer's chat template, else Alpaca)")
    add_dtype_argument(p, "auto")
    add_device_argument(p)
    add_threads_argument(p)
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every /v1 request (default: $LITE_API_KEY; the "
                        "variable keeps the key out of the process list)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")


def check_address(host: str, port: int) -> None:
    """Refuse a ``--host`` that does not resolve to an address of this machine, or a ``--port`` already
    taken there, naming the flag (uvicorn would fail only after the model is loaded, with a log line)."""
    if not host.strip() or any(c.isspace() for c in host):
        raise LiteError(f"--host {host!r} is not a host name or address; e.g. --host 127.0.0.1 or --host 0.0.0.0")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise LiteError(f"--host {host}: cannot resolve it ({exc}); give an address of this machine, e.g. "
                        f"127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise LiteError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); pick "
                            f"another --port, or an address of this machine for --host") from None


def run(args: argparse.Namespace) -> int:
    from ..model.loading import DEFAULT_MODEL, load_model
    from ..serving import API_KEY_ENV, config_from_env, describe, serve
    from . import progress

    if args.default_max_tokens > args.max_tokens_cap:
        raise LiteError(f"--default-max-tokens {args.default_max_tokens} is above --max-tokens-cap "
                        f"{args.max_tokens_cap}: lower it, or raise the cap")
    check_address(args.host, args.port)  # before the model is loaded: a typo fails at once
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not (args.api_key or os.environ.get(API_KEY_ENV)):
        progress(f"warning: binding {args.host} without ${API_KEY_ENV}: anyone who can reach it can use it")
    lm = load_model(args.model, dtype=args.dtype, device=args.device, progress=progress)
    config = config_from_env(
        model_name=args.served_model_name or args.model or DEFAULT_MODEL, exit=args.exit, kv=args.kv,
        threshold_scale=args.threshold_scale, max_tokens_cap=args.max_tokens_cap,
        default_max_tokens=args.default_max_tokens, max_queue=args.max_queue, max_batch=args.max_batch,
        batch_invariant=args.batch_invariant, chat_format=args.chat_format,
        **({"api_key": args.api_key} if args.api_key else {}),
    )
    config.check(lm)
    progress(f"serving {config.model_name} on http://{args.host}:{args.port}/v1 with {describe(config)}")
    serve(lm, config, host=args.host, port=args.port, log_level=args.log_level)
    return 0
