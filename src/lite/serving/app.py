"""``lite serve``: an OpenAI-compatible HTTP server that decodes with early exit.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` gives server-sent events in the OpenAI chunk format, ending with ``data: [DONE]``).
Every answer carries ``usage`` and a ``lite`` object with the exit statistics (the last chunk of a stream).

The model is loaded once and only read; decoding runs in the single worker of
:mod:`lite.serving.queue`; the wire format and error objects are in :mod:`lite.serving.schema`; exit specs in
:mod:`lite.decoding.spec`. :func:`serve_in_thread` starts a server inside the current process on a free
loopback port (tests, and clients such as an LLM judge, use it).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import socket
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decoding import KV_STRATEGIES, GenerationSettings, check_settings
from ..decoding.spec import parse_exit, resolve_exit_spec
from ..decoding.engine import default_invariant
from ..errors import LiteError
from ..model.adapter import LiteModel
from ..model.prompts import default_format, encode_messages
from .queue import DecodeWorker, Job, QueueFull
from .schema import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_body,
    chunk,
    completion_body,
    exit_stats,
    new_id,
    now,
    parse_request,
    sse,
    usage,
)

CHAT_FORMATS = ("auto", "chat", "alpaca")
API_KEY_ENV = "LITE_API_KEY"
POLL_SECONDS = 0.5  # how often a waiting request checks whether its client is still there


@dataclass
class ServeConfig:
    """Server settings (the ``lite serve`` flags).

    Attributes:
        model_name: the id clients send as ``model`` (``--served-model-name``); others get 404.
        exit: default exit spec (``--exit``): "auto" (dynamic when calibrated, else none), "none",
            "static:K", "dynamic"; a request's ``lite.exit`` overrides it.
        kv: default skipped-layer strategy (``--kv``): "copy" or "recompute".
        threshold_scale: default multiplier of the dynamic thresholds (``--threshold-scale``).
        max_tokens_cap: largest ``max_tokens`` a request may ask for (``--max-tokens-cap``).
        default_max_tokens: used when a request gives no ``max_tokens`` (clipped to the context).
        default_temperature: used when a request gives none; 0 (greedy, the paper's decoding) unlike
            OpenAI's 1.
        max_queue: requests that may wait while the batch is full (``--max-queue``); more get 503.
        max_batch: sequences decoded together, continuously batched (``--max-batch``); 1 = one at a time.
        batch_invariant: every request is computed exactly as it is alone, so a greedy request gets the
            same tokens whatever else is running (``--batch-invariant``); False batches the matrix products
            of the rows, faster under load, answers may then differ at near-ties (``--no-batch-invariant``);
            None (the default): on in bfloat16/float16, off in float32
            (:func:`lite.decoding.engine.default_invariant`). Speculative requests verify one position at a
            time (lossless) when on.
        chat_format: "auto", "chat" (tokenizer template) or "alpaca" (``--chat-format``).
        api_key: when set, every /v1 request needs ``Authorization: Bearer <key>`` (from $LITE_API_KEY).
        max_body_bytes: larger request bodies get 413.
    """

    model_name: str = "smollm2-135m-instruct"
    exit: str = "auto"
    kv: str = "copy"
    threshold_scale: float = 1.0
    max_tokens_cap: int = 1024
    default_max_tokens: int = 256
    default_temperature: float = 0.0
    max_queue: int = 16
    max_batch: int = 8
    batch_invariant: bool | None = None
    chat_format: str = "auto"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20

    def check(self, lm: LiteModel) -> None:
        """Validate against the model; raises :class:`LiteError` naming the flag."""
        try:
            parse_exit(lm, self.exit, self.threshold_scale)
        except LiteError as exc:
            raise LiteError(f"--exit {self.exit} / --threshold-scale {self.threshold_scale}: {exc}") from None
        if self.kv not in KV_STRATEGIES:
            raise LiteError(f"--kv must be one of {KV_STRATEGIES}, got {self.kv!r}")
        if self.max_tokens_cap < 1 or self.default_max_tokens < 1:
            raise LiteError("--max-tokens-cap and the default max tokens must be >= 1")
        if self.max_queue < 0:
            raise LiteError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.max_batch < 1:
            raise LiteError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.batch_invariant is not None and not isinstance(self.batch_invariant, bool):
            raise LiteError(f"batch_invariant (--batch-invariant / --no-batch-invariant) must be True, False or "
                            f"None (by dtype), got {self.batch_invariant!r}")
        resolve_chat_format(lm, self.chat_format)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes: from its
    Content-Length before anything is read, else while it streams in (chunked uploads), so an oversized
    body is never held in memory whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared)} bytes; the limit is {limit}")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"the request body is over {limit} bytes, the limit; send a smaller one")
        parts.append(part)
    return b"".join(parts)


# ------------------------------------------------------------------------------------------------ prompts
def resolve_chat_format(lm: LiteModel, fmt: str) -> str:
    """``auto``: the model's own format (:func:`lite.model.prompts.default_format`: its ``lite_config.json``, else
    the tokenizer's chat template when it has one, else Alpaca)."""
    if fmt not in CHAT_FORMATS:
        raise LiteError(f"--chat-format must be one of {CHAT_FORMATS}, got {fmt!r}")
    has_template = bool(getattr(lm.tokenizer, "chat_template", None))
    if fmt == "chat" and not has_template:
        raise LiteError("--chat-format chat: this tokenizer has no chat template; use --chat-format alpaca")
    if fmt != "auto":
        return fmt
    resolved = default_format(lm)  # the one rule every verb uses (lite.model.prompts)
    return resolved if resolved in ("chat", "alpaca") else "alpaca"


def chat_prompt_ids(lm: LiteModel, messages: list[dict[str, str]], fmt: str) -> list[int]:
    """Token ids for a conversation, ending where the assistant's reply starts (``chat``: the tokenizer's
    chat template; ``alpaca``: the last user message as instruction, earlier turns as Input), the same
    as ``lite.load(...).generate(messages)`` (:func:`lite.model.prompts.encode_messages`)."""
    return encode_messages(lm.tokenizer, messages, fmt)


def completion_prompt_ids(lm: LiteModel, prompt: str) -> list[int]:
    """Token ids of a raw completion prompt (the tokenizer's usual special-token handling)."""
    return list(lm.tokenizer(prompt)["input_ids"])


# ------------------------------------------------------------------------------------------------ the app
def create_app(lm: LiteModel, config: ServeConfig | None = None,
               on_step: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI application serving ``lm``; its decode worker starts and stops with the app.

    Args:
        lm: the loaded model; only read, never changed per request.
        config: server settings (defaults: :class:`ServeConfig`).
        on_step: called by the decode thread after every round of steps (tests slow it down with it).
    """
    config = config or ServeConfig()
    config.check(lm)
    chat_fmt = resolve_chat_format(lm, config.chat_format)
    invariant = default_invariant(lm) if config.batch_invariant is None else config.batch_invariant
    rows = 1 if invariant else config.max_batch  # what --exit auto is priced at: every row alone, or the batch
    started = now()
    worker: DecodeWorker | None = None

    @asynccontextmanager
    async def lifespan(app):
        nonlocal worker
        worker = DecodeWorker(lm, config.max_queue, config.max_batch, on_step, invariant=invariant)
        app.state.worker = worker
        try:
            yield
        finally:
            await asyncio.to_thread(worker.close)

    app = FastAPI(title="lite serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                       code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    def check_auth(request: Request) -> None:
        if not config.api_key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), config.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>' with the key "
                           f"the server was started with (${API_KEY_ENV})", type="authentication_error",
                           code="invalid_api_key")

    def model_card() -> dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": started, "owned_by": "lite",
                "lite": {"num_layers": lm.num_layers, "exit_layers": lm.exit_layers,
                         "default_exit": resolve_exit_spec(lm, config.exit, rows), "kv": config.kv,
                         "threshold_scale": config.threshold_scale, "chat_format": chat_fmt,
                         "max_tokens_cap": config.max_tokens_cap, "context": lm.max_context,
                         "batch_invariant": invariant, "dtype": str(lm.dtype).replace("torch.", "")}}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "queue": worker.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        check_auth(request)
        if model_id != config.model_name:
            raise _unknown_model(model_id, config.model_name, param=None)
        return model_card()

    def build_job(req, prompt_ids: list[int]) -> tuple[Job, str, str, float]:
        if req.model is not None and req.model != config.model_name:
            raise _unknown_model(req.model, config.model_name)
        if req.logprobs:
            raise APIError(400, "logprobs: not supported by lite serve", param="logprobs")
        if getattr(req, "echo", False) or getattr(req, "suffix", None):
            raise APIError(400, "echo/suffix: not supported by lite serve", param="echo")
        max_new = _max_new_tokens(req, len(prompt_ids), config.max_tokens_cap, config.default_max_tokens,
                                  lm.max_context)
        opts = req.lite
        spec = (opts.exit if opts and opts.exit is not None else config.exit).strip()
        kv = opts.kv if opts and opts.kv else config.kv
        scale = opts.threshold_scale if opts and opts.threshold_scale else config.threshold_scale
        spec = resolve_exit_spec(lm, spec, rows)  # auto, priced once per request
        try:
            policy = parse_exit(lm, spec, scale, batch=rows)
        except LiteError as exc:
            raise APIError(400, f"lite.exit: {exc}", param="lite.exit", code="invalid_exit_policy") from None
        settings = GenerationSettings(
            max_new_tokens=max_new,
            temperature=config.default_temperature if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=req.stop_list(), kv=kv,
        )
        try:
            check_settings(lm, prompt_ids, settings)
        except LiteError as exc:
            raise APIError(400, str(exc)) from None
        job = Job(prompt_ids, policy, settings, asyncio.get_running_loop(), stream=bool(req.stream))
        try:
            worker.submit(job)
        except QueueFull as exc:
            raise APIError(503, f"the server is busy: {exc}; retry shortly", type="server_error",
                           code="queue_full") from None
        return job, spec, kv, scale

    async def handle(request: Request, kind: str):
        check_auth(request)
        body = await _read_body(request, config.max_body_bytes)
        if kind == "chat":
            req = parse_request(body, ChatRequest)
            messages = req.message_dicts()
            try:  # off the event loop: templates and long prompts take a moment
                prompt_ids = await asyncio.to_thread(chat_prompt_ids, lm, messages, chat_fmt)
            except Exception as exc:  # e.g. a template that insists on alternating roles
                raise APIError(400, f"messages: the chat template refused them ({exc})", param="messages") from None
        else:
            req = parse_request(body, CompletionRequest)
            prompt_ids = await asyncio.to_thread(completion_prompt_ids, lm, req.prompt_text())
        job, spec, kv, scale = build_job(req, prompt_ids)
        rid, created = new_id("chatcmpl" if kind == "chat" else "cmpl"), now()

        def lite_stats(result) -> dict[str, Any]:
            stats = exit_stats(result, spec, kv)
            if job.policy.kind in ("dynamic", "speculative") and job.policy.gate is None:
                stats["threshold_scale"] = scale
            return stats

        if not req.stream:
            try:
                event = await _next_event(job, request)
            finally:
                worker.cancel(job)  # no-op when finished; frees the slot when the client left
            if event is None or event[0] == "cancelled":
                raise APIError(499, "the client closed the request", code="client_closed")
            if event[0] == "error":
                raise _generation_error(event[1])
            result = event[1]
            make = chat_body if kind == "chat" else completion_body
            return make(rid, config.model_name, created, result.text, result.finish_reason,
                        usage(len(prompt_ids), len(result.token_ids)), lite_stats(result))

        async def events():
            sent = ""
            try:
                if kind == "chat":
                    yield sse(chunk(kind, rid, config.model_name, created, "", role=True))
                while True:
                    event = await _next_event(job, request)
                    if event is None or event[0] == "cancelled":
                        return
                    name, payload = event
                    if name == "token":
                        if payload.text:
                            sent += payload.text
                            yield sse(chunk(kind, rid, config.model_name, created, payload.text))
                        continue
                    if name == "error":
                        yield sse(_generation_error(payload).body())
                    else:
                        result = payload
                        use = usage(len(prompt_ids), len(result.token_ids))
                        # token pieces may differ from the final text at its end (a stop string is cut
                        # off, a held-back tail is released): send what makes the stream equal the text
                        rest = result.text[len(sent):] if result.text.startswith(sent) else ""
                        yield sse(chunk(kind, rid, config.model_name, created, rest, result.finish_reason,
                                        extra={"usage": use, "lite": lite_stats(result)}))
                        if req.include_usage():
                            yield sse(chunk(kind, rid, config.model_name, created, None, extra={"usage": use}))
                    yield sse("[DONE]")
                    return
            finally:
                worker.cancel(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "chat")

    return app


def _unknown_model(name: str, served: str, param: str | None = "model") -> APIError:
    return APIError(404, f"model {name!r} is not served here; this server serves {served!r} (GET /v1/models)",
                    param=param, code="model_not_found")


def _generation_error(exc: Exception) -> APIError:
    if isinstance(exc, LiteError):  # the engine refused the request's settings
        return APIError(400, str(exc))
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")


def _max_new_tokens(req, prompt_len: int, cap: int, default: int, context: int) -> int:
    """The request's ``max_tokens`` checked against the cap and the context, or the default clipped."""
    asked = req.max_tokens if req.max_tokens is not None else getattr(req, "max_completion_tokens", None)
    room = context - prompt_len
    if asked is not None:
        if asked > cap:
            raise APIError(400, f"max_tokens: {asked} is above this server's cap of {cap} (--max-tokens-cap)",
                           param="max_tokens", code="max_tokens_exceeded")
        if asked > room:
            raise APIError(400, f"max_tokens: the prompt has {prompt_len} tokens and the context holds {context}, "
                           f"so at most {max(room, 0)} new tokens fit; got {asked}", param="max_tokens",
                           code="context_length_exceeded")
        return asked
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens; the context holds {context}",
                       param="messages" if hasattr(req, "messages") else "prompt", code="context_length_exceeded")
    return min(default, cap, room)


async def _next_event(job: Job, request) -> tuple[str, Any] | None:
    """The worker's next event for ``job``, or None once the client has disconnected (checked every
    :data:`POLL_SECONDS` while waiting, so a client that leaves while queued frees its slot)."""
    getter = asyncio.ensure_future(job.events.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=POLL_SECONDS)
            if done:
                return getter.result()
            if await request.is_disconnected():
                return None
    finally:
        if not getter.done():
            getter.cancel()


# --------------------------------------------------------------------------------------------- running it
def _uvicorn_server(app, log_level: str, host: str = "127.0.0.1", port: int = 0):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                         timeout_graceful_shutdown=5, access_log=log_level == "info"))


def serve_in_thread(lm: LiteModel, config: ServeConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                    on_step: Callable[[], None] | None = None, log_level: str = "warning",
                    timeout: float = 60.0) -> tuple[str, Callable[[], None]]:
    """Start a server for ``lm`` in a background thread of this process.

    Args:
        port: 0 picks a free port.
        timeout: seconds to wait for the server to accept connections.
    Returns:
        ``(url, stop)``: the root URL (``http://127.0.0.1:PORT``; OpenAI clients take ``url + "/v1"``) and a
        function that shuts the server down and waits for it.
    """
    server = _uvicorn_server(create_app(lm, config, on_step), log_level)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lite-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the lite server did not start (see the log above)")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(30)
        sock.close()

    return f"http://{host}:{sock.getsockname()[1]}", stop


def serve(lm: LiteModel, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Serve ``lm`` until interrupted (blocking; ``lite serve``)."""
    _uvicorn_server(create_app(lm, config), log_level, host, port).run()


def config_from_env(**kwargs: Any) -> ServeConfig:
    """A :class:`ServeConfig` whose ``api_key`` comes from ``$LITE_API_KEY`` unless given."""
    kwargs.setdefault("api_key", os.environ.get(API_KEY_ENV) or None)
    return ServeConfig(**kwargs)


def describe(config: ServeConfig) -> dict[str, Any]:
    """The settings without the secret, for logs."""
    d = asdict(config)
    d["api_key"] = "set" if config.api_key else None
    return d
