"""The OpenAI wire format that ``lite serve`` speaks: requests, responses, stream chunks, errors.

Requests are validated strictly (a string where a number belongs is an error, not a coercion; every
number must be finite, so ``1e999``, which JSON parsers read as infinity, is refused like ``Infinity``)
and every problem becomes an :class:`APIError`, which the server turns into the OpenAI error object
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status. Fields the OpenAI API has but lite
does not use (``user``, ``logit_bias``, ...) are ignored; fields lite cannot honour (``n > 1``,
``logprobs``) are refused rather than silently dropped.

The early-exit extension travels in a ``lite`` object: in a request it chooses the exit policy
(``{"exit": "none" | "static:K" | "dynamic", "kv": "copy" | "recompute", "threshold_scale": S}``), in a
response it reports where the tokens left the network (see :func:`exit_stats`). With the official client
send it as ``extra_body={"lite": {...}}`` and read it back as ``response.lite`` (or ``model_extra``).

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_STRINGS = 4  # the OpenAI API's own limit


class APIError(Exception):
    """An error answered to the client as an OpenAI error object.

    Attributes:
        status: HTTP status code (4xx for the client's mistakes, 5xx for the server's).
        message: what went wrong and how to fix it.
        type: OpenAI error type ("invalid_request_error", "authentication_error", ...).
        param: the request field at fault (dotted, e.g. "lite.exit"), or None.
        code: a short machine-readable code ("model_not_found", "context_length_exceeded", ...), or None.
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------- requests
class LiteOptions(BaseModel):
    """The ``lite`` request extension: the exit policy of this one request (server defaults otherwise)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    exit: str | None = None  # "none", "static:K", "dynamic", or a kind registered later (speculative)
    kv: Literal["copy", "recompute"] | None = None
    threshold_scale: float | None = Field(default=None, gt=0)


class _Request(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    logprobs: Any = None
    lite: LiteOptions | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
        if any(s == "" for s in stops):
            raise APIError(400, "stop: stop strings must not be empty", param="stop")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """``POST /v1/completions``: ``prompt`` is raw text, tokenized as is (no template)."""

    prompt: str | list[str]
    echo: bool | None = False
    suffix: str | None = None

    def prompt_text(self) -> str:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: lite serves one prompt per request, got a list of {len(prompt)}; "
                               f"send one request per prompt", param="prompt")
            prompt = prompt[0]
        if not prompt.strip():
            raise APIError(400, "prompt: the prompt is empty", param="prompt", code="empty_prompt")
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    """``POST /v1/chat/completions``: ``messages`` go through the chat template (or Alpaca)."""

    messages: list[Message]
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def message_dicts(self) -> list[dict[str, str]]:
        if not self.messages:
            raise APIError(400, "messages: the list of messages is empty; send at least one user message",
                           param="messages", code="empty_messages")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
        if not any(m["content"].strip() for m in msgs):
            raise APIError(400, "messages: every message is empty", param="messages", code="empty_messages")
        return msgs


_FIELD_NAMES = {name for cls in (LiteOptions, CompletionRequest, ChatRequest, Message, TextPart)
                for name in cls.model_fields}


# OpenAI fields lite does not implement, with the value that means "not used" (accepted, as clients send
# defaults): anything else is refused with a 400 that names the field, never silently ignored.
UNSUPPORTED = {
    "tools": lambda v: v in (None, []), "tool_choice": lambda v: v in (None, "none", "auto"),
    "functions": lambda v: v in (None, []), "function_call": lambda v: v in (None, "none", "auto"),
    "parallel_tool_calls": lambda v: True,
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "presence_penalty": lambda v: v in (None, 0), "frequency_penalty": lambda v: v in (None, 0),
    "repetition_penalty": lambda v: v in (None, 1), "logit_bias": lambda v: v in (None, {}),
    "best_of": lambda v: v in (None, 1), "logprobs": lambda v: v in (None, False, 0),
    "top_logprobs": lambda v: v in (None, 0), "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]), "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
}


class _Constant:
    """Where the body held ``NaN``, ``Infinity`` or ``-Infinity``: Python's JSON parser accepts them, the
    JSON standard does not, and no field of a request may be one."""

    def __init__(self, name: str) -> None:
        self.name = name


def _find_bad_value(value: Any, path: tuple[str, ...] = ()) -> tuple[tuple[str, ...], str] | None:
    """The first value of the parsed body no request may hold, with the field path to it (keys and list
    indices) and what is wrong: a :class:`_Constant`, or text with a lone surrogate (``"\\ud800"``, which
    JSON lets through and no tokenizer can encode)."""
    if isinstance(value, _Constant):
        return path, f"{value.name} is not a JSON number; send a finite number (JSON has no NaN or Infinity)"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, (f"the text holds a lone surrogate (\\u{ord(value[exc.start]):04x} at character "
                          f"{exc.start}), which is not Unicode text; send the text itself")
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and path == () and key not in _FIELD_NAMES and key not in UNSUPPORTED:
            continue  # fields lite ignores are not checked
        found = _find_bad_value(item, (*path, str(key)))
        if found is not None:
            return found
    return None


def parse_request(body: bytes, model_cls: type[_Request]) -> _Request:
    """Parse and validate a request body; raises :class:`APIError` (400) naming the field at fault.

    Refused: bodies that are not JSON (``NaN`` and ``Infinity`` are refused naming the field that holds them),
    JSON nested too deeply to parse,
    unknown ``lite`` options, and OpenAI fields lite does not implement set to anything but their default.
    """
    try:
        data = json.loads(body, parse_constant=_Constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply to parse", code="invalid_json") from None
    try:
        bad = _find_bad_value(data)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply to parse", code="invalid_json") from None
    if bad is not None:
        param = ".".join(bad[0]) or None
        raise APIError(400, f"{param or 'the request body'}: {bad[1]}", param=param, code="invalid_value")
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    for name, unused in UNSUPPORTED.items():
        if name in data and not unused(data[name]):
            raise APIError(400, f"{name}: lite serve does not implement {name!r}; leave it out (got "
                           f"{json.dumps(data[name])[:80]})", param=name, code="unsupported_parameter")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        # keep field names and list indices; drop pydantic's union-member tags ("str", "list[str]", ...)
        loc = [str(p) for p in err["loc"] if isinstance(p, int) or p in _FIELD_NAMES]
        if err["type"] == "extra_forbidden":  # the unknown field itself
            loc.append(str(err["loc"][-1]))
        param = ".".join(loc) or None
        code = "missing_required_parameter" if err["type"] == "missing" else "invalid_value"
        got = "" if err["type"] == "missing" else f" (got {json.dumps(err.get('input'))[:80]})"
        raise APIError(400, f"{param}: {err['msg']}{got}", param=param, code=code) from None


# ---------------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def exit_stats(result, exit_spec: str, kv: str) -> dict[str, Any]:
    """The ``lite`` response extension: where this response's tokens left the network.

    Args:
        result: a :class:`lite.decoding.GenerationResult`.
        exit_spec: the policy used ("none", "static:K", "dynamic", ...).
        kv: the skipped-layer strategy used ("copy" or "recompute").
    Returns:
        ``exit``, ``kv``, ``num_layers`` (L), ``mean_exit_layer`` (None for an empty answer),
        ``layer_cost_improvement`` (1 - mean exit layer / L), ``compute_cost_improvement`` (FLOPs, all head
        checks and K/V work included), ``exit_counts`` ({layer k as a string: tokens that left at k}),
        ``seconds`` (decode wall-clock, queueing excluded).
    """
    layers = [int(t.exit_layer) for t in result.tokens]
    counts = Counter(layers)
    return {
        "exit": exit_spec,
        "kv": kv,
        "num_layers": int(result.num_layers),
        "mean_exit_layer": (sum(layers) / len(layers)) if layers else None,
        "layer_cost_improvement": float(result.layer_cost_improvement),
        "compute_cost_improvement": float(result.compute_cost_improvement),
        "exit_counts": {str(k): counts[k] for k in sorted(counts)},
        "seconds": float(result.seconds),
    }


def completion_body(rid: str, model: str, created: int, text: str, finish_reason: str | None,
                    use: dict[str, int], lite: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": "lite", "choices": [{"index": 0, "text": text, "logprobs": None,
                                                       "finish_reason": finish_reason}],
            "usage": use, "lite": lite}


def chat_body(rid: str, model: str, created: int, text: str, finish_reason: str | None,
              use: dict[str, int], lite: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": "lite",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": use, "lite": lite}


def chunk(kind: str, rid: str, model: str, created: int, text: str | None, finish_reason: str | None = None,
          role: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One stream chunk. ``kind`` is "chat" or "completion"; ``text`` None gives an empty-choices chunk
    (the OpenAI usage chunk); ``extra`` adds top-level fields (usage, lite) to the final chunk."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": "lite",
            "choices": [] if text is None and not role and finish_reason is None else [choice]}
    body.update(extra or {})
    return body


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event line pair: ``data: {...}\\n\\n`` (or ``data: [DONE]``)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


def now() -> int:
    return int(time.time())
