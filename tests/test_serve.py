"""`lite serve` over real HTTP: the official openai client against live servers on 127.0.0.1.

One server per module (a tiny random model with hand-set thresholds, so ``auto`` means dynamic exit), plus
two small ones for the API key and for queueing/disconnects. All decoding goes through the real engine.
"""

from __future__ import annotations

import json
import shutil
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from lite import LiteConfig, load_model
from lite.cli import main as cli_main
from lite.decoding import ExitPolicy, GenerationSettings, generate, parse_exit
from lite.serving import (
    ServeConfig,
    chat_prompt_ids,
    completion_prompt_ids,
    resolve_chat_format,
    serve_in_thread,
)

MODEL = "tiny"
CAP = 64


@pytest.fixture(scope="module")
def lm(tiny_model_dir, tmp_path_factory):
    """The tiny model, calibrated by hand: the threshold of exit k in 1..3 is the median max-prob of layer k
    over a few greedy tokens, so that dynamic exit leaves at several layers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model: more threads only fight the other processes for the CPU
    plain = load_model(tiny_model_dir, device="cpu")
    thresholds = {}
    for k in (1, 2, 3):
        confs = sorted(t.confidence for text in ("Question 1", "Say something.") for t in generate(
            plain, completion_prompt_ids(plain, text), ExitPolicy(kind="static", layer=k),
            GenerationSettings(max_new_tokens=6)).tokens)
        thresholds[str(k)] = confs[len(confs) // 2]
    folder = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(tiny_model_dir, folder)
    LiteConfig.default_for(4, thresholds=thresholds).save(folder)
    yield load_model(folder, device="cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(lm):
    url, stop = serve_in_thread(lm, ServeConfig(model_name=MODEL, max_tokens_cap=CAP, max_queue=32))
    yield url
    stop()


# Every HTTP client here shares one TLS context: each client would otherwise build its own from the CA bundle
# (34 ms here; the servers are plain HTTP on 127.0.0.1, so it is never used), which was 4% of the suite
TLS = ssl.create_default_context()


def client(url: str, key: str = "unused") -> openai.OpenAI:
    """A client of its own (its own connections), as a separate user would have."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                         http_client=httpx.Client(verify=TLS, timeout=60))


def alone(lm, prompt_ids, exit="dynamic", **settings) -> str:
    """What the engine answers for one request on its own (no server)."""
    from lite.decoding import parse_exit

    policy = parse_exit(lm, exit)  # the spec the server parses, resolved the same way
    return generate(lm, prompt_ids, policy, GenerationSettings(**settings)).text


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", verify=TLS).json()["queue"]


# --------------------------------------------------------------------------------------------- answers
def test_models_and_health(server, lm):
    models = client(server).models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].lite["num_layers"] == 4 and models[0].lite["default_exit"] == "dynamic"
    assert httpx.get(f"{server}/health", verify=TLS).json()["status"] == "ok"


def test_completion_equals_the_engine_and_reports_usage_and_exits(server, lm):
    r = client(server).completions.create(model=MODEL, prompt="The answer is", max_tokens=8, temperature=0)
    ids = completion_prompt_ids(lm, "The answer is")
    assert r.choices[0].text == alone(lm, ids, max_new_tokens=8)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 8
    assert r.choices[0].finish_reason == "length"
    stats = r.lite
    assert stats["exit"] == "dynamic" and stats["num_layers"] == 4
    counts = {int(k): v for k, v in stats["exit_counts"].items()}
    assert sum(counts.values()) == 8 and set(counts) <= {1, 2, 3, 4}
    mean = sum(k * v for k, v in counts.items()) / 8
    assert stats["mean_exit_layer"] == pytest.approx(mean)
    assert stats["layer_cost_improvement"] == pytest.approx(1 - mean / 4)
    assert "compute_cost_improvement" in stats


def test_chat_uses_the_chat_template_and_the_request_policy(server, lm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    r = client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                               extra_body={"lite": {"exit": "static:2", "kv": "recompute"}})
    ids = chat_prompt_ids(lm, messages, "chat")
    assert r.choices[0].message.content == alone(lm, ids, "static:2", max_new_tokens=6, kv="recompute")
    assert r.choices[0].message.role == "assistant"
    assert r.lite["exit_counts"] == {"2": 6} and r.lite["layer_cost_improvement"] == pytest.approx(0.5)
    assert r.lite["kv"] == "recompute" and r.lite["compute_cost_improvement"] > 0
    # a huge threshold scale keeps every token to the last layer
    r = client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                               extra_body={"lite": {"threshold_scale": 100.0}})
    assert r.lite["exit_counts"] == {"4": 4} and r.lite["threshold_scale"] == 100.0


def test_speculative_through_the_server_is_lossless(server):
    c = client(server)
    kw = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    full = c.completions.create(**kw, extra_body={"lite": {"exit": "none"}})
    spec = c.completions.create(**kw, extra_body={"lite": {"exit": "speculative:3"}})
    assert spec.choices[0].text == full.choices[0].text and spec.lite["exit"] == "speculative:3"
    streamed, last = stream_text(c.completions.create(**kw, stream=True, extra_body={"lite": {"exit": "speculative"}}))
    assert streamed == full.choices[0].text and last.usage.completion_tokens == 8


def stream_text(stream) -> tuple[str, object]:
    parts, last = [], None
    for ch in stream:
        if ch.choices:
            delta = ch.choices[0].delta.content if hasattr(ch.choices[0], "delta") else ch.choices[0].text
            parts.append(delta or "")
            last = ch
    return "".join(parts), last


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_text_equals_non_streamed_text(server, kind):
    c = client(server)
    if kind == "chat":
        call = c.chat.completions.create
        kw = {"messages": [{"role": "user", "content": "Say something."}]}
    else:
        call = c.completions.create
        kw = {"prompt": "Once upon a time"}
    plain = call(model=MODEL, max_tokens=10, temperature=0, **kw)
    text = plain.choices[0].message.content if kind == "chat" else plain.choices[0].text
    streamed, last = stream_text(call(model=MODEL, max_tokens=10, temperature=0, stream=True, **kw))
    assert streamed == text and len(text) > 0
    assert last.choices[0].finish_reason == plain.choices[0].finish_reason
    assert last.usage.completion_tokens == plain.usage.completion_tokens
    assert last.lite["exit_counts"] == plain.lite["exit_counts"]
    # seeded sampling with a stop string taken from the middle of the answer: cut before it in both
    # modes, and never streamed (the server holds back what may still become the stop string)
    for seed in range(20):
        full = call(model=MODEL, max_tokens=12, temperature=1.0, seed=seed, **kw)
        text = full.choices[0].message.content if kind == "chat" else full.choices[0].text
        starts = [i for i in range(2, len(text) - 2) if "\ufffd" not in text[i:i + 2] and text.index(text[i:i + 2]) == i]
        if starts:
            break
    stop, at = text[starts[0]:starts[0] + 2], starts[0]
    plain = call(model=MODEL, max_tokens=12, temperature=1.0, seed=seed, stop=[stop], **kw)
    cut = plain.choices[0].message.content if kind == "chat" else plain.choices[0].text
    assert cut == text[:at] and plain.choices[0].finish_reason == "stop"
    streamed, last = stream_text(call(model=MODEL, max_tokens=12, temperature=1.0, seed=seed, stop=stop,
                                      stream=True, **kw))
    assert streamed == cut and last.choices[0].finish_reason == "stop"


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, verify=TLS) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3  # the usage chunk
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and "lite" in chunks[-2]


def test_sixteen_concurrent_clients_get_their_own_answers(server, lm):
    """Distinct prompts, greedy and seeded sampling mixed: each answer equals the one the same request
    gets alone (crossed caches, positions or random generators would show)."""
    requests = []
    for i in range(16):
        req = {"messages": [{"role": "user", "content": f"Question {i}: what is {7 * i}?"}], "max_tokens": 6}
        req.update({"temperature": 0} if i % 2 else {"temperature": 1.0, "seed": 1000 + i})
        requests.append(req)

    def ask(req):
        r = client(server).chat.completions.create(model=MODEL, **req)
        return r.choices[0].message.content, r.lite["exit_counts"]

    solo = [ask(req) for req in requests]
    assert len({text for text, _ in solo}) > 4  # the requests really differ, so crossing would be visible
    assert len({layer for _, counts in solo for layer in counts}) > 1  # and tokens leave at several layers
    bad = [("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
           ("response_format", {"type": "json_object"}), ("logit_bias", {"5": 10}), ("presence_penalty", 0.5),
           ("frequency_penalty", 1.0), ("best_of", 2)]
    barrier = threading.Barrier(len(requests) + len(bad))

    def ask_together(req):
        barrier.wait()
        return ask(req)

    def ask_badly(field_value):
        name, value = field_value
        barrier.wait()
        with pytest.raises(openai.BadRequestError) as err:
            client(server).chat.completions.create(model=MODEL, messages=USER, max_tokens=2, extra_body={name: value})
        return name, err.value.body

    with ThreadPoolExecutor(len(requests) + len(bad)) as pool:
        refused = pool.map(ask_badly, bad)  # mixed in with the good ones
        together = list(pool.map(ask_together, requests))
        refused = list(refused)
    assert together == solo  # 0 errors, no crossed answers
    for name, body in refused:
        assert body["param"] == name and name in body["message"] and body["code"] == "unsupported_parameter"
    assert health(server)["peak_batch"] > 1  # the requests really were decoded together
    ids = chat_prompt_ids(lm, requests[1]["messages"], "chat")
    assert solo[1][0] == alone(lm, ids, max_new_tokens=6)


# ----------------------------------------------------------------------------------------- bad input
def post(url: str, path: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **(headers or {})}
    return httpx.post(f"{url}{path}", content=content, headers=headers, verify=TLS)


CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]
BAD = [
    ("malformed json", CHAT, b'{"model": "tiny", "messages": [', 400, None),
    ("body not an object", CHAT, b'[1, 2]', 400, None),
    ("max_tokens a string", CHAT, {"messages": USER, "max_tokens": "5"}, 400, "max_tokens"),
    ("temperature a string", COMP, {"prompt": "Hi", "temperature": "hot"}, 400, "temperature"),
    ("stop a number", COMP, {"prompt": "Hi", "stop": 5}, 400, "stop"),
    ("messages not a list", CHAT, {"messages": "Hi"}, 400, "messages"),
    ("content a number", CHAT, {"messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content"),
    ("unknown role", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("lite.exit a number", CHAT, {"messages": USER, "lite": {"exit": 3}}, 400, "lite.exit"),
    ("unknown lite field", CHAT, {"messages": USER, "lite": {"exits": "none"}}, 400, "lite.exits"),
    ("max_tokens above the cap", CHAT, {"messages": USER, "max_tokens": CAP + 1}, 400, "max_tokens"),
    ("max_tokens above the context", COMP, {"prompt": "a " * 480, "max_tokens": CAP}, 400, "max_tokens"),
    ("max_tokens zero", COMP, {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    ("unknown model", CHAT, {"model": "gpt-4", "messages": USER}, 404, "model"),
    ("empty messages", CHAT, {"messages": []}, 400, "messages"),
    ("only empty content", CHAT, {"messages": [{"role": "user", "content": "  "}]}, 400, "messages"),
    ("empty prompt", COMP, {"prompt": ""}, 400, "prompt"),
    ("missing prompt", COMP, {"max_tokens": 3}, 400, "prompt"),
    ("unknown exit policy", CHAT, {"messages": USER, "lite": {"exit": "sometimes"}}, 400, "lite.exit"),
    ("gate on a model without one", CHAT, {"messages": USER, "lite": {"exit": "gate"}}, 400, "lite.exit"),
    ("static layer out of range", CHAT, {"messages": USER, "lite": {"exit": "static:9"}}, 400, "lite.exit"),
    ("n above one", CHAT, {"messages": USER, "n": 2}, 400, "n"),
    ("negative threshold scale", CHAT, {"messages": USER, "lite": {"threshold_scale": -1.0}}, 400,
     "lite.threshold_scale"),
    ("infinite threshold scale", CHAT, b'{"messages": [{"role": "user", "content": "Hi"}], '
     b'"lite": {"threshold_scale": Infinity}}', 400, "lite.threshold_scale"),
    ("NaN temperature", COMP, b'{"prompt": "Hi", "temperature": NaN}', 400, "temperature"),
    ("JSON nested too deeply", COMP, b'{"prompt": "Hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    ("tools", CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("response_format json", CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("presence_penalty", COMP, {"prompt": "Hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("frequency_penalty", CHAT, {"messages": USER, "frequency_penalty": -1}, 400, "frequency_penalty"),
    ("logit_bias", COMP, {"prompt": "Hi", "logit_bias": {"50": 10}}, 400, "logit_bias"),
    ("best_of", COMP, {"prompt": "Hi", "best_of": 3}, 400, "best_of"),
    ("logprobs", CHAT, {"messages": USER, "logprobs": True}, 400, "logprobs"),
]


@pytest.mark.parametrize("field,value", [("presence_penalty", 0), ("response_format", {"type": "text"}),
                                         ("tools", []), ("logit_bias", {}), ("best_of", 1), ("logprobs", False)])
def test_default_values_of_unimplemented_fields_are_accepted(server, field, value):
    """Clients that send an unimplemented field at its no-op default are served as usual."""
    r = post(server, CHAT, {"messages": USER, "max_tokens": 2, field: value})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("name,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, name, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    ok = post(server, COMP, {"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_openai_client_raises_the_matching_errors(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4", messages=USER)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.chat.completions.create(model=MODEL, messages=USER, max_tokens=10_000)
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nothing")


def test_dynamic_without_thresholds_is_refused(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu")  # not calibrated: auto means none, dynamic is a 400
    url, stop = serve_in_thread(lm, ServeConfig(model_name=MODEL))
    try:
        r = post(url, CHAT, {"messages": USER, "max_tokens": 2, "lite": {"exit": "dynamic"}})
        assert r.status_code == 400 and "calibrate" in r.json()["error"]["message"]
        r = post(url, CHAT, {"messages": USER, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["lite"]["exit"] == "none"
    finally:
        stop()


def test_api_key_is_enforced_when_set(lm):
    url, stop = serve_in_thread(lm, ServeConfig(model_name=MODEL, api_key="s3cret"))
    try:
        for key in ("wrong", ""):
            with pytest.raises(openai.AuthenticationError):
                client(url, key or "x").completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        r = post(url, COMP, {"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = client(url, "s3cret").completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert r.usage.completion_tokens == 2
        assert httpx.get(f"{url}/health", verify=TLS).status_code == 200  # liveness stays open
    finally:
        stop()


# ------------------------------------------------------------------------------ queueing, disconnects
def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_full_queue_is_refused_and_disconnected_clients_free_their_slots(lm):
    """The real engine, one sequence at a time (--max-batch 1), slowed to 100 ms per token so that requests
    overlap on purpose."""
    url, stop = serve_in_thread(lm, ServeConfig(model_name=MODEL, max_queue=1, max_batch=1),
                                on_step=lambda: time.sleep(0.1))
    body = {"model": MODEL, "messages": USER, "max_tokens": CAP, "stream": True}
    try:
        with httpx.Client(timeout=30, verify=TLS) as a, httpx.Client(timeout=30, verify=TLS) as b:
            with a.stream("POST", f"{url}{CHAT}", json=body) as ra:  # running
                assert ra.status_code == 200
                assert wait_for(lambda: health(url)["running"] == 1)
                with b.stream("POST", f"{url}{CHAT}", json=body) as rb:  # waiting behind it
                    assert rb.status_code == 200
                    assert wait_for(lambda: health(url)["waiting"] == 1)
                    full = post(url, CHAT, {"messages": USER, "max_tokens": 2})
                    assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
                    assert full.headers["retry-after"] == "1"
                # b left while queued: its slot is free again, and it never ran
                assert wait_for(lambda: health(url)["waiting"] == 0)
                assert health(url)["cancelled"] == 1 and health(url)["running"] == 1
            # a left mid-stream: generation stops long before its 64 tokens (over 6 s at this pace)
            assert wait_for(lambda: health(url)["running"] == 0, timeout=2.0)
        q = health(url)
        assert q["cancelled"] == 2 and q["served"] == 0 and q["rejected"] == 1
        ok = post(url, CHAT, {"messages": USER, "max_tokens": 2})
        assert ok.status_code == 200 and health(url)["served"] == 1
    finally:
        stop()


def test_requests_join_and_leave_the_running_batch(lm):
    """Continuous batching, --max-batch 2: two streams decode together, a third waits, a fourth is refused;
    when one client leaves mid-stream, the waiting request takes its row at the next token boundary. The
    worker runs at 100 ms a round only until c has joined (so that the requests overlap on purpose), then
    at full speed."""
    slow = threading.Event()
    slow.set()
    url, stop = serve_in_thread(lm, ServeConfig(model_name=MODEL, max_queue=1, max_batch=2),
                                on_step=lambda: slow.is_set() and time.sleep(0.1))
    body = {"model": MODEL, "messages": USER, "max_tokens": CAP, "stream": True}
    ids = chat_prompt_ids(lm, USER, resolve_chat_format(lm, "auto"))  # in the server's own prompt format
    expected = generate(lm, ids, parse_exit(lm, "dynamic"), GenerationSettings(max_new_tokens=CAP))  # c alone
    try:
        with (httpx.Client(timeout=30, verify=TLS) as a, httpx.Client(timeout=30, verify=TLS) as b,
              httpx.Client(timeout=30, verify=TLS) as c):
            with a.stream("POST", f"{url}{CHAT}", json=body) as ra, b.stream("POST", f"{url}{CHAT}", json=body) as rb:
                assert ra.status_code == rb.status_code == 200
                assert wait_for(lambda: health(url)["running"] == 2)
                with c.stream("POST", f"{url}{CHAT}", json=body) as rc:
                    assert wait_for(lambda: health(url)["waiting"] == 1)
                    assert post(url, CHAT, {"messages": USER, "max_tokens": 2}).status_code == 503
                    ra.close()  # a leaves: c joins the batch beside b
                    assert wait_for(lambda: health(url)["waiting"] == 0 and health(url)["running"] == 2)
                    slow.clear()
                    lines = [line for line in rc.iter_lines() if line.startswith("data: ")]
                    assert lines[-1] == "data: [DONE]"
                    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
                    final = chunks[-1]
                    # c took a's row mid-way, beside b: its answer is the one it gets alone, to the last token
                    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks
                                   if ch["choices"]) == expected.text
                    assert final["usage"]["completion_tokens"] == len(expected.tokens)
                    assert final["choices"][0]["finish_reason"] == expected.finish_reason
        q = health(url)
        assert q["peak_batch"] == 2 and q["cancelled"] >= 1 and q["rejected"] == 1 and q["served"] >= 1
    finally:
        stop()


def test_oversized_bodies_are_refused_before_they_are_read_whole(lm):
    """413 from Content-Length before reading, and from the running count for a chunked upload (no length);
    the server goes on serving."""
    url, stop = serve_in_thread(lm, ServeConfig(model_name=MODEL, max_body_bytes=2000))
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    try:
        r = httpx.post(f"{url}{CHAT}", content=big, headers={"content-type": "application/json"}, verify=TLS)
        assert r.status_code == 413 and "5" in r.json()["error"]["message"] and "2000" in r.json()["error"]["message"]

        def chunks():
            for i in range(0, len(big), 500):
                yield big[i:i + 500]

        r = httpx.post(f"{url}{CHAT}", content=chunks(), headers={"content-type": "application/json"}, verify=TLS)
        assert r.status_code == 413 and "2000" in r.json()["error"]["message"]
        assert post(url, CHAT, {"messages": USER, "max_tokens": 2}).status_code == 200
    finally:
        stop()


def test_cli_refuses_a_bad_exit_policy(tiny_model_dir, capsys):
    code = cli_main(["serve", "--model", str(tiny_model_dir), "--exit", "static:9", "--port", "0"])
    assert code == 2 and "--exit static:9" in capsys.readouterr().err
