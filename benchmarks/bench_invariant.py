"""What batch invariance costs: the server's decode loop with and without it, and the lossless verify.

Two measurements, each in one run with its modes interleaved (round r runs every mode once, in rotating
order) and the best of the rounds kept, every figure beside its state dtype and batch size:

1. **Batched decoding** (what a ``lite serve`` lane runs for N concurrent requests): the first N Vicuna
   questions (chat template, greedy, ``--max-tokens`` new tokens) decoded together by the engine, batch N,
   ``invariant=True`` (each row computed as it is alone: ``lite serve``'s default) against
   ``invariant=False`` (the rows' matrix products batched), and the same prompts one at a time (batch 1,
   the reference a request alone gets). Reported: tokens/s of each, the ratio invariant / batched, and how
   many of the N answers are identical to the answer alone (token ids and exit layers).
2. **Self-speculative verify** (batch 1): the verify pass one position at a time (``invariant=True``, the
   default: lossless by construction) against all d + 1 positions in one call per block (batched), and
   the full model alone (exits off); identity of each against transformers' ``generate``.

Usage:
    python benchmarks/bench_invariant.py [--model smollm2-135m-lite] [--dtypes float32,bfloat16]
        [--batch 16] [--max-tokens 24] [--rounds 2] [--threads 1] [--out invariant]
Writes benchmarks/results/<out>.json and <out>.md (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from lite.decoding import GenerationSettings, SpeculativeDecoder, generate, generate_batch  # noqa: E402
from lite.decoding.reference import hf_generate  # noqa: E402
from lite.decoding.spec import parse_exit  # noqa: E402
from lite.demo import lossless_policy  # noqa: E402
from lite.files import write_atomic  # noqa: E402
from lite.model.loading import load_model  # noqa: E402
from lite.model.prompts import default_format, encode_prompt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def vicuna_questions(n: int) -> list[str]:
    """The first n Vicuna questions (../shared/data or lite's cache; never downloaded here)."""
    from lite.evaluation.testsets import load_testset

    return [p.instruction for p in load_testset("vicuna", limit=n, allow_download=False).prompts]


def answer(r) -> tuple:
    return r.token_ids, r.exit_layers


def batched(lm, ids, policy, max_tokens: int, batch: int, rounds: int) -> dict:
    settings = GenerationSettings(max_new_tokens=max_tokens)
    modes = {
        "invariant": lambda: generate_batch(lm, ids, policy, settings, batch_size=batch, invariant=True),
        "batched": lambda: generate_batch(lm, ids, policy, settings, batch_size=batch, invariant=False),
        "alone": lambda: [generate(lm, i, policy, settings) for i in ids],
    }
    generate(lm, ids[0], policy, GenerationSettings(max_new_tokens=4))  # warm up
    best, out = {}, {}
    names = list(modes)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotating order
            start = time.perf_counter()
            out[name] = modes[name]()
            seconds = time.perf_counter() - start
            best[name] = min(best.get(name, float("inf")), seconds)
    tokens = {name: sum(len(r.token_ids) for r in res) for name, res in out.items()}
    alone = [answer(r) for r in out["alone"]]
    return {
        "batch": batch, "prompts": len(ids), "max_tokens": max_tokens,
        "tokens_per_s": {name: tokens[name] / best[name] for name in modes},
        "seconds": best,
        "invariant_over_batched": (tokens["invariant"] / best["invariant"]) / (tokens["batched"] / best["batched"]),
        "batched_over_alone": (tokens["batched"] / best["batched"]) / (tokens["alone"] / best["alone"]),
        "identical_to_alone": {name: sum(answer(a) == b for a, b in zip(out[name], alone))
                               for name in ("invariant", "batched")},
    }


def speculative(lm, ids, max_tokens: int, rounds: int) -> dict:
    policy, name = lossless_policy(lm)
    if policy is None:
        return {"skipped": name}
    settings = GenerationSettings(max_new_tokens=max_tokens)
    full = [hf_generate(lm, i, max_tokens)[0] for i in ids]

    def run(invariant: bool):
        return [SpeculativeDecoder(lm, [i], policy, settings, invariant=invariant) for i in ids]

    def decode(decoders):
        for d in decoders:
            list(d.run())
        return [d.result(0) for d in decoders]

    modes = {"verify one position at a time": lambda: decode(run(True)),
             "verify batched": lambda: decode(run(False)),
             "exits off": lambda: [generate(lm, i, parse_exit(lm, "none"), settings) for i in ids]}
    best, out = {}, {}
    names = list(modes)
    for r in range(rounds):
        for m in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            out[m] = modes[m]()
            best[m] = min(best.get(m, float("inf")), time.perf_counter() - start)
    tokens = {m: sum(len(r.token_ids) for r in res) for m, res in out.items()}
    return {
        "policy": name, "batch": 1, "prompts": len(ids), "max_tokens": max_tokens,
        "tokens_per_s": {m: tokens[m] / best[m] for m in modes},
        "one_by_one_over_batched": (tokens[names[0]] / best[names[0]]) / (tokens[names[1]] / best[names[1]]),
        "one_by_one_over_exits_off": (tokens[names[0]] / best[names[0]]) / (tokens[names[2]] / best[names[2]]),
        "identical_to_generate": {m: sum(r.token_ids == f for r, f in zip(out[m], full)) for m in modes},
    }


def markdown(res: dict) -> str:
    lines = [
        "# Batch invariance: what it costs", "",
        f"`{res['command']}`", "",
        f"Model `{res['model']}`, exit `{res['exit']}`, greedy, {res['threads']} torch thread(s), {res['cpu']}; "
        f"{res['date']}. Each row: one run, modes interleaved in rotating order, best of {res['rounds']} rounds.",
        "", "## Batched decoding (a `lite serve` lane)", "",
        "| state dtype | batch | prompts x new tokens | tokens/s invariant | tokens/s batched | tokens/s alone "
        "(batch 1) | invariant / batched | batched / alone | identical to alone: invariant, batched |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype, r in res["runs"].items():
        b = r["batched"]
        t = b["tokens_per_s"]
        lines.append(f"| {dtype} | {b['batch']} | {b['prompts']} x {b['max_tokens']} | {t['invariant']:.1f} | "
                     f"{t['batched']:.1f} | {t['alone']:.1f} | **{b['invariant_over_batched']:.2f}x** | "
                     f"{b['batched_over_alone']:.2f}x | {b['identical_to_alone']['invariant']}/{b['prompts']}, "
                     f"{b['identical_to_alone']['batched']}/{b['prompts']} |")
    lines += ["", "## Self-speculative verify (batch 1)", "",
              "| state dtype | prompts x new tokens | tokens/s one position at a time | tokens/s batched verify | "
              "tokens/s exits off | one-by-one / batched | one-by-one / exits off | identical to `generate`: "
              "one-by-one, batched, exits off |", "|---|---|---|---|---|---|---|---|"]
    for dtype, r in res["runs"].items():
        s = r["speculative"]
        if "skipped" in s:
            lines.append(f"| {dtype} | skipped: {s['skipped']} | | | | | | |")
            continue
        t, i = list(s["tokens_per_s"].values()), list(s["identical_to_generate"].values())
        lines.append(f"| {dtype} | {s['prompts']} x {s['max_tokens']} | {t[0]:.1f} | {t[1]:.1f} | {t[2]:.1f} | "
                     f"**{s['one_by_one_over_batched']:.2f}x** | {s['one_by_one_over_exits_off']:.2f}x | "
                     f"{i[0]}/{s['prompts']}, {i[1]}/{s['prompts']}, {i[2]}/{s['prompts']} |")
    lines += ["", f"Speculative drafts: {next(iter(res['runs'].values()))['speculative'].get('policy', '-')}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-lite")
    ap.add_argument("--exit", default="auto", help="exit spec of the batched runs (default: the model's own)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--spec-prompts", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="invariant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"command": "python benchmarks/bench_invariant.py " + " ".join(sys.argv[1:]), "model": args.model,
           "exit": args.exit, "threads": args.threads, "rounds": args.rounds, "cpu": platform.processor() or
           platform.machine(), "date": time.strftime("%Y-%m-%d"), "runs": {}}
    for dtype in args.dtypes.split(","):
        lm = load_model(args.model, dtype=dtype)
        fmt = default_format(lm)
        ids = [encode_prompt(lm.tokenizer, q, fmt=fmt) for q in vicuna_questions(args.batch)]
        policy = parse_exit(lm, args.exit)
        run = {"batched": batched(lm, ids, policy, args.max_tokens, args.batch, args.rounds)}
        print(dtype, json.dumps(run["batched"]), flush=True)
        run["speculative"] = speculative(lm, ids[:args.spec_prompts], args.max_tokens * 2, args.rounds)
        print(dtype, json.dumps(run["speculative"]), flush=True)
        res["runs"][dtype] = run
    RESULTS.mkdir(exist_ok=True)
    write_atomic(RESULTS / f"{args.out}.json", json.dumps(res, indent=1) + "\n")
    write_atomic(RESULTS / f"{args.out}.md", markdown(res))


if __name__ == "__main__":
    main()
