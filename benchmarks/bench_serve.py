"""Load benchmark for ``lite serve``: N concurrent streaming clients for a bounded time, on loopback.

Starts ``lite serve`` in a subprocess on 127.0.0.1 (a free port) with the embedded default model, then for
each client count N runs N threads that send chat completions (``stream: true``, greedy, a fixed
``max_tokens``) one after the other until the time is up (no request starts after the deadline; the ones
in flight finish). Prompts are the Vicuna test questions, found as ``lite eval --testset vicuna`` finds them
(``$LITE_DATA``, ``../shared/data/testsets/vicuna.jsonl`` from the working directory, lite's cache). Measured
per N, in one run:

* requests served, errors (target 0), p50/p95 latency and time to first token (seconds);
* completion tokens per second over the whole window, and its ratio to the 1-client figure (the server
  batches concurrent requests continuously, ``--max-batch``, so it grows with the clients);
* identity: every greedy answer compared with the answer the engine gives the same prompt alone
  (batch 1, in the benchmark process, same dtype and policy);
* the exit statistics the server reported (mean exit layer, layer and compute cost improvement).

Usage:
    python benchmarks/bench_serve.py [--clients 1,16] [--duration 60] [--max-tokens 32] [--exit auto]
        [--max-batch 16] [--dtype auto] [--device DEVICE]
Device-agnostic: the server and the engine-alone reference run on --device (default: the accelerator torch
reports, else the CPU) at one --dtype.
Writes benchmarks/results/serve.json and serve.md (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from lite.files import write_atomic

REPO = Path(__file__).resolve().parent.parent
SERVED = "lite-bench"  # the --served-model-name the benchmark starts the server with
RESULTS = REPO / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts() -> list[str]:
    from lite.evaluation.testsets import load_testset

    # the first turns of the Vicuna test set, found where `lite eval --testset vicuna` finds it (never downloaded)
    return [p.instruction for p in load_testset("vicuna", limit=40, allow_download=False).prompts]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def one_request(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat completion; returns latency, time to first token, tokens, text and exit stats."""
    body = {"model": SERVED, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    first = None
    final = None
    text = ""
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                text += chunk["choices"][0]["delta"]["content"]
                if first is None:
                    first = time.perf_counter() - start
            if "lite" in chunk:
                final = chunk
    latency = time.perf_counter() - start
    if final is None:
        raise RuntimeError("the stream ended without its final chunk")
    return {"latency": latency, "ttft": first if first is not None else latency,
            "tokens": final["usage"]["completion_tokens"], "lite": final["lite"], "text": text}


def run_load(url: str, clients: int, duration: float, max_tokens: int, texts: list[str],
             reference: list[str]) -> dict:
    """``clients`` threads sending requests back to back until ``duration`` seconds have passed; each
    answer is compared with ``reference`` (the engine's answer to the same prompt alone)."""
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    start = time.perf_counter()
    deadline = start + duration

    def client_loop() -> None:
        with httpx.Client(timeout=300) as client:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter)
                try:
                    out = one_request(client, url, texts[i % len(texts)], max_tokens)
                    out["identical"] = out["text"] == reference[i % len(texts)]
                    with lock:
                        results.append(out)
                except Exception as exc:  # counted, reported, and the client goes on
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    exits = [r["lite"] for r in results if r["lite"]["mean_exit_layer"] is not None]
    weights = [r["tokens"] for r in results if r["lite"]["mean_exit_layer"] is not None]

    def weighted(key: str) -> float | None:
        if not exits:
            return None
        return sum(e[key] * w for e, w in zip(exits, weights)) / sum(weights)

    return {
        "clients": clients, "seconds": round(wall, 2), "requests": len(results), "errors": len(errors),
        "error_examples": errors[:3], "completion_tokens": tokens,
        "identical_answers": sum(r["identical"] for r in results),
        "tokens_per_second": round(tokens / wall, 3), "requests_per_second": round(len(results) / wall, 4),
        "latency_p50": percentile(lat, 0.5), "latency_p95": percentile(lat, 0.95),
        "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
        "mean_latency": statistics.fmean(lat) if lat else None,
        "exit": exits[0]["exit"] if exits else None, "mean_exit_layer": weighted("mean_exit_layer"),
        "layer_cost_improvement": weighted("layer_cost_improvement"),
        "compute_cost_improvement": weighted("compute_cost_improvement"),
    }


def direct_baseline(args: argparse.Namespace, texts: list[str]) -> tuple[dict, list[str]]:
    """The engine alone, in this process, batch 1, on every prompt with the server's settings: its
    tokens/s (what one client could at best get) and each prompt's answer (the identity reference)."""
    import torch

    from lite import load_model
    from lite.decoding import GenerationSettings, generate
    from lite.decoding.spec import parse_exit
    from lite.serving import chat_prompt_ids, resolve_chat_format

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    fmt = resolve_chat_format(lm, "auto")
    policy = parse_exit(lm, args.exit)
    settings = GenerationSettings(max_new_tokens=args.max_tokens)
    generate(lm, chat_prompt_ids(lm, [{"role": "user", "content": texts[0]}], fmt), policy,
             GenerationSettings(max_new_tokens=4))  # warm-up
    tokens, answers, start = 0, [], time.perf_counter()
    for text in texts:
        result = generate(lm, chat_prompt_ids(lm, [{"role": "user", "content": text}], fmt), policy, settings)
        tokens += len(result.token_ids)
        answers.append(result.text)
    wall = time.perf_counter() - start
    return ({"requests": len(texts), "completion_tokens": tokens, "seconds": round(wall, 2),
             "tokens_per_second": round(tokens / wall, 3), "torch_threads": torch.get_num_threads(),
             "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device)}, answers)


def start_server(port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lite", "serve", "--model", args.model, "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
           "--exit", args.exit, "--log-level", "warning", "--max-queue", str(max(args.clients_list) + 4),
           "--max-batch", str(args.max_batch), "--dtype", args.dtype]
    if args.device:
        cmd += ["--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if k != "LITE_API_KEY"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"lite serve exited with status {proc.returncode}")
        try:
            return httpx.get(f"{url}/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"lite serve did not answer /health within {timeout:.0f} s")



def fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    rows = report["runs"]
    lines = [
        "# `lite serve` under load",
        "",
        f"Command: `{report['command']}`  ",
        f"Model: {report['model']} ({report['num_layers']} layers), exit policy `{report['exit']}`, greedy, "
        f"max_tokens {report['max_tokens']}, streamed chat completions, {report['duration']:.0f} s per client "
        f"count, server and clients on 127.0.0.1 on one {report['cpus']}-core CPU shared with other jobs, "
        f"server torch threads {report['threads'] or 'default'}.",
        "",
        "| clients | requests | errors | answers identical to alone | tokens/s | tokens/s vs 1 client "
        "| p50 latency s | p95 latency s | p50 TTFT s | p95 TTFT s | tokens/s vs engine alone | mean exit layer "
        "| layer cost improvement |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['identical_answers']}/{r['requests']} | "
                     f"{fmt(r['tokens_per_second'])} | "
                     f"{fmt(r.get('throughput_ratio'))} | {fmt(r['latency_p50'])} | {fmt(r['latency_p95'])} | "
                     f"{fmt(r['ttft_p50'])} | {fmt(r['ttft_p95'])} | {fmt(r.get('vs_engine_alone'))} | "
                     f"{fmt(r['mean_exit_layer'], 1)} | {fmt(r['layer_cost_improvement'])} |")
    direct = report["engine_alone"]
    lines += [
        "",
        f"Engine alone (batch 1, `lite.decoding.generate` in the benchmark process, each of the "
        f"{direct['requests']} prompts once, {direct['seconds']:.0f} s, {direct['dtype']} on {direct['device']}, "
        f"torch threads {direct['torch_threads']}): {fmt(direct['tokens_per_second'])} tokens/s; its answers "
        f"are the identity reference. The server's figures are ratios to it and to its own 1-client run, all "
        f"measured in this one run.",
        "",
        f"The server batches continuously (`--max-batch {report['max_batch']}`): concurrent requests decode "
        "together, each row leaving the network at its own layer, so tokens/s grows with the clients while "
        "latency grows less than the client count. An answer that is not identical to the engine's alone "
        "differs by float rounding of batched products against single-row ones (reduced precision makes "
        f"this likelier; dtype {direct['dtype']}). Load average {report['load_average']} on "
        f"{report['cpus']} cores; compare the ratios.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--clients", default="1,16", help="comma-separated client counts")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    p.add_argument("--dtype", default="auto", help="the server's and the reference's --dtype")
    p.add_argument("--device", default=None, help="the server's and the reference's --device")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per client count")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--exit", default="auto", help="the server's --exit")
    p.add_argument("--threads", type=int, default=None, help="the server's --threads")
    p.add_argument("--out", default=str(RESULTS / "serve"), help="output path without extension")
    args = p.parse_args(argv)
    args.clients_list = [int(c) for c in args.clients.split(",")]
    texts = prompts()
    load_start = os.getloadavg()[0]
    print(f"[bench_serve] the engine alone on {len(texts)} prompts", file=sys.stderr, flush=True)
    direct, reference = direct_baseline(args, texts)
    print(f"[bench_serve] {json.dumps(direct)}", file=sys.stderr, flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, args)
    try:
        wait_healthy(url, proc)
        models = httpx.get(f"{url}/v1/models").json()["data"][0]
        with httpx.Client(timeout=300) as warm:
            one_request(warm, url, texts[0], 4)  # warm-up, not counted
        runs = []
        for n in args.clients_list:
            print(f"[bench_serve] {n} clients for {args.duration:.0f} s", file=sys.stderr, flush=True)
            runs.append(run_load(url, n, args.duration, args.max_tokens, texts, reference))
            print(f"[bench_serve] {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
        base = next((r for r in runs if r["clients"] == 1), None)
        for r in runs:
            r["throughput_ratio"] = (r["tokens_per_second"] / base["tokens_per_second"]
                                     if base and base["tokens_per_second"] else None)
            r["vs_engine_alone"] = (r["tokens_per_second"] / direct["tokens_per_second"]
                                    if direct["tokens_per_second"] else None)
        final_health = httpx.get(f"{url}/health").json()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    report = {
        "command": " ".join(["python", "benchmarks/bench_serve.py"] + (argv if argv is not None else sys.argv[1:])),
        "model": args.model, "num_layers": models["lite"]["num_layers"], "exit": models["lite"]["default_exit"],
        "max_tokens": args.max_tokens, "duration": args.duration, "cpus": os.cpu_count(),
        "max_batch": args.max_batch, "dtype": direct["dtype"], "device": direct["device"],
        "platform": platform.platform(), "python": platform.python_version(),
        "threads": args.threads, "load_average": f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end", "engine_alone": direct, "server_counts": final_health["queue"], "runs": runs,
    }
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
