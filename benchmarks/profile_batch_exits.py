"""Where a batched early-exit step spends its time: exits off, riding along, regrouped (torch.profiler).

The same prompts are decoded as one batch three ways with the model's own exit policy: exits off, rows
that leave riding along, and rows that leave regrouped out (`lite.decoding.batch.rides_along`). For each,
the profiler's total time and the time in matrix products (`aten::mm`/`addmm`), attention and cache
gathers (`aten::index`), and how many decoder blocks ran per decode step (attention calls after the prefill
over steps: L means no step ended early). One thread by default, so that the figures are CPU time rather than thread waits. It shows
whether dropping rows from a block saves time on this device: if the three totals are equal, a row that
leaves saves nothing unless every row of its step leaves too.

    .venv/bin/python benchmarks/profile_batch_exits.py --model smollm2-135m-lite --batch 8 --threads 1 \\
        --out benchmarks/results/profile_batch_exits.md
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import vicuna_questions
from torch.profiler import ProfilerActivity, profile

from lite import load_model
from lite.decoding import ExitPolicy, GenerationSettings, generate_batch
from lite.decoding.spec import ExitOptions, build_policy, resolve_exit_spec
from lite.files import write_atomic
from lite.model.prompts import default_format, encode_prompt

GROUPS = {"matrix products": ("aten::mm", "aten::addmm", "aten::bmm"),
          "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                        "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention"),
          "cache gathers": ("aten::index",)}
ATTENTION = GROUPS["attention"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-lite")
    ap.add_argument("--exit", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="benchmarks/results/profile_batch_exits.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    fmt = default_format(lm)
    prompts = [encode_prompt(lm.tokenizer, q, fmt=fmt) for q in vicuna_questions(0, args.batch)]
    spec = resolve_exit_spec(lm, args.exit)
    policy = build_policy(lm, ExitOptions(exit=spec))
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    generate_batch(lm, prompts[:2], ExitPolicy(), GenerationSettings(max_new_tokens=4))  # warm-up
    rows = []
    for name, pol, regroup in (("exits off", ExitPolicy(), None), ("riding along", policy, False),
                               ("regrouped", policy, True)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            results = generate_batch(lm, prompts, pol, settings, regroup=regroup)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        by_group = {g: sum(e.self_cpu_time_total for e in events if e.key in keys) / 1e6 for g, keys in GROUPS.items()}
        attention_calls = sum(e.count for e in events if e.key in ATTENTION)
        steps = max(len(r.token_ids) for r in results)
        exits = [t.exit_layer for r in results for t in r.tokens]
        decode_calls = attention_calls - lm.num_layers  # the prefill is one call per block for the batch
        rows.append({"name": name, "total": total, **by_group, "blocks_per_step": decode_calls / steps,
                     "mean_exit": sum(exits) / len(exits)})
    base = rows[0]["total"]
    lines = ["# Where a batched early-exit step spends its time", "",
             f"`python benchmarks/profile_batch_exits.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
             f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; {lm.device}, {args.dtype}, "
             f"{torch.get_num_threads()} thread(s); batch of {len(prompts)} Vicuna prompts, {args.max_new_tokens} "
             f"new tokens, greedy; exit policy `{spec}`; self time of every op under torch.profiler.", "",
             "| way | total s | vs exits off | matrix products s | attention s | cache gathers s | blocks run per "
             "step | mean exit layer |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['total']:.2f} | {r['total'] / base:.3f} | {r['matrix products']:.2f} | "
                     f"{r['attention']:.2f} | {r['cache gathers']:.3f} | {r['blocks_per_step']:.1f} of "
                     f"{lm.num_layers} | {r['mean_exit']:.1f} |")
    write_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
