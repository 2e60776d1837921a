"""Batched decoding: tokens/s of lite's batched engine against batch 1 and against transformers' batched
``generate``, with exits off and with the model's calibrated exit policy, on any device.

The same ``--prompts`` Vicuna questions (chat template) are decoded greedily at every batch size of
``--batch-sizes``, ``--max-new-tokens`` each (answers stop at EOS), in one process, so every figure is a
ratio measured in one run:

(a) engine, exits off: tokens/s at batch B over tokens/s at batch 1 (target at B = 8: >= 4x on a 2-core
    CPU), and over transformers' batched greedy ``generate`` (left padding) at the same B (target >= 1x);
    tokens identical to batch 1 per prompt (count of prompts that differ: float rounding of batched
    products can flip near-ties, more so in bfloat16);
(b) engine, exits on (``--exit``, default ``auto``: the model's own best policy, its gate or thresholds) at batch B
    over exits off at batch B (target >= 1x), with the answers' identity to the same policy at batch 1
    (the quality of batch-1 early exit is kept when the tokens are the same); both ways a row that left
    can go on in a batch are timed: riding along (the default for small batches) and regrouping (DREX),
    see :mod:`lite.decoding.batch`.

Device and dtype are whatever ``--device`` / ``--dtype`` say (default: the accelerator torch reports, and
float32), so the same command measures the same table on a GPU. Each configuration is timed ``--repeats``
times, the configurations of a batch size interleaved round by round, and keeps its fastest run (the
machine may be shared).

    .venv/bin/python benchmarks/bench_batch.py --model smollm2-135m-lite --threads 2 \\
        --out benchmarks/results/batch.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from common import vicuna_questions

from lite import load_model
from lite.decoding import ExitPolicy, GenerationSettings, generate_batch
from lite.decoding.batch import rides_along
from lite.decoding.reference import hf_generate_batch
from lite.decoding.spec import ExitOptions, build_policy, resolve_exit_spec
from lite.files import write_atomic, write_json_atomic
from lite.model.prompts import default_format, encode_prompt


def _batched(prompts: list[list[int]], size: int) -> list[list[list[int]]]:
    return [prompts[i:i + size] for i in range(0, len(prompts), size)]


def run_engine(lm, prompts, size: int, policy: ExitPolicy, max_new: int, regroup: bool | None = None
               ) -> tuple[list[list[int]], float, list]:
    """All prompts in batches of ``size``: (answers, seconds, exit layers per token)."""
    answers, layers, start = [], [], time.perf_counter()
    for chunk in _batched(prompts, size):
        for r in generate_batch(lm, chunk, policy, GenerationSettings(max_new_tokens=max_new), regroup=regroup):
            answers.append(r.token_ids)
            layers.extend(t.exit_layer for t in r.tokens)
    return answers, time.perf_counter() - start, layers


def run_hf(lm, prompts, size: int, max_new: int) -> tuple[list[list[int]], float]:
    answers, seconds = [], 0.0
    for chunk in _batched(prompts, size):
        out, s = hf_generate_batch(lm, chunk, max_new)
        answers += out
        seconds += s
    return answers, seconds


def best_of(repeats: int, configs: dict) -> dict:
    """The fastest of ``repeats`` runs of every ``configs[name]() -> (..., seconds, ...)`` (seconds at index
    1), the configurations interleaved round by round, so that a slow spell of a shared machine falls on
    all of them alike rather than on one."""
    best: dict = {}
    for _ in range(repeats):
        for name, fn in configs.items():
            out = fn()
            if name not in best or out[1] < best[name][1]:
                best[name] = out
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-lite")
    ap.add_argument("--exit", default="auto", help="exit spec for (b) (default auto: the model's own best policy)")
    ap.add_argument("--batch-sizes", default="1,8,16")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/batch.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    if 1 not in sizes:
        sizes = [1] + sizes
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    fmt = default_format(lm)
    prompts = [encode_prompt(lm.tokenizer, q, fmt=fmt) for q in vicuna_questions(0, args.prompts)]
    spec = resolve_exit_spec(lm, args.exit)
    policy = build_policy(lm, ExitOptions(exit=spec))
    n = args.max_new_tokens
    # warm-up: first calls allocate and pick kernels
    generate_batch(lm, prompts[:2], ExitPolicy(), GenerationSettings(max_new_tokens=4))
    hf_generate_batch(lm, prompts[:2], 4)

    rows, ref_off, ref_exit = [], None, None
    for size in sizes:
        best = best_of(args.repeats, {
            "off": lambda: run_engine(lm, prompts, size, ExitPolicy(), n),
            "hf": lambda: run_hf(lm, prompts, size, n),
            "ride": lambda: run_engine(lm, prompts, size, policy, n, regroup=False),
            "regroup": lambda: run_engine(lm, prompts, size, policy, n, regroup=True),
        })
        (off, off_s, _), (hf, hf_s), (ex, ex_s, layers), (rg, rg_s, _) = (
            best[k] for k in ("off", "hf", "ride", "regroup"))
        ref_off = ref_off or off
        ref_exit = ref_exit or ex
        rows.append({
            "batch": size,
            "engine_off_tokens": sum(map(len, off)), "engine_off_s": off_s,
            "hf_tokens": sum(map(len, hf)), "hf_s": hf_s,
            "exit_tokens": sum(map(len, ex)), "exit_s": ex_s,
            "regroup_tokens": sum(map(len, rg)), "regroup_s": rg_s,
            "default": "ride along" if rides_along("copy", size) else "regroup",
            "mean_exit_layer": sum(layers) / max(len(layers), 1),
            "off_differs_from_batch1": sum(a != b for a, b in zip(off, ref_off)),
            "off_differs_from_hf": sum(a != b for a, b in zip(off, hf)),
            "exit_differs_from_batch1": sum(a != b for a, b in zip(ex, ref_exit)),
            "regroup_differs_from_batch1": sum(a != b for a, b in zip(rg, ref_exit)),
        })
    base = rows[0]["engine_off_tokens"] / rows[0]["engine_off_s"]
    for r in rows:
        r["engine_off_tps"] = r["engine_off_tokens"] / r["engine_off_s"]
        r["hf_tps"] = r["hf_tokens"] / r["hf_s"]
        r["exit_tps"] = r["exit_tokens"] / r["exit_s"]
        r["off_vs_batch1"] = r["engine_off_tps"] / base
        r["off_vs_hf"] = r["engine_off_tps"] / r["hf_tps"]
        r["exit_vs_off"] = r["exit_tps"] / r["engine_off_tps"]
        r["regroup_tps"] = r["regroup_tokens"] / r["regroup_s"]
        r["regroup_vs_off"] = r["regroup_tps"] / r["engine_off_tps"]
    meta = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": args.model, "exit": spec,
        "device": str(lm.device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "prompts": len(prompts), "max_new_tokens": n, "repeats": args.repeats, "torch": torch.__version__,
        "platform": platform.platform(), "num_layers": lm.num_layers,
    }
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), {"meta": meta, "rows": rows})
    lines = [
        "# Batched decoding: lite's engine vs batch 1 and vs transformers' batched generate", "",
        f"`{meta['command']}`  ", f"{meta['date']}; {meta['device']}, {meta['dtype']}, {meta['threads']} "
        f"threads; {len(prompts)} Vicuna prompts, {n} new tokens, greedy; best of {args.repeats}; "
        f"exit policy for (b): `{spec}`.", "",
        "| batch | engine tok/s (exits off) | vs batch 1 | HF generate tok/s | engine vs HF | prompts differing "
        "from batch 1 / from HF | exits on, riding along: tok/s | vs off | exits on, regrouped: tok/s | vs off | "
        "default | mean exit layer | exits-on prompts differing from batch 1 (riding / regrouped) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['engine_off_tps']:.1f} | {r['off_vs_batch1']:.2f}x | {r['hf_tps']:.1f} | "
            f"{r['off_vs_hf']:.2f}x | {r['off_differs_from_batch1']} / {r['off_differs_from_hf']} | "
            f"{r['exit_tps']:.1f} | {r['exit_vs_off']:.2f}x | {r['regroup_tps']:.1f} | {r['regroup_vs_off']:.2f}x | "
            f"{r['default']} | {r['mean_exit_layer']:.1f} of {lm.num_layers} | "
            f"{r['exit_differs_from_batch1']} / {r['regroup_differs_from_batch1']} |")
    write_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
