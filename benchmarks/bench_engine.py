"""The one decode engine against transformers' ``generate``: exits off, the default policy, max-prob thresholds.

For each dtype and batch size, in one process, in interleaved rounds (best round kept), on the same prompts
with the same token budget: transformers' batched greedy ``generate`` (left padding) and lite's engine with
exits off (``--exit none``), the model's default policy (``--exit auto``) and its calibrated max-prob
thresholds (``--exit dynamic``), and any ``--exit SPEC`` given (e.g. ``gate`` where auto priced it out). Speed is generated tokens per second, as a ratio to ``generate`` measured
in the same round; quality beside it: for exits off, the rows whose tokens are identical to ``generate``'s;
for the exit policies, the share of tokens equal to exits off's tokens at the same position
(:func:`lite.evaluation.metrics.pooled_token_agreement`: over the answer tokens, each pair's longer length;
results before 2026-12-07's change counted the early-exit answer's tokens instead, the same when both
answers have one length) and the layer saving (1 - mean exit layer / L).

    python benchmarks/bench_engine.py --model smollm2-135m-lite --prompts 16 --max-new-tokens 64 \
        --dtypes float32,bfloat16 --batch-sizes 1,8 --rounds 2 --threads 2 --out benchmarks/results/engine.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lite import load_model
from lite.decoding import GenerationSettings, generate_batch, parse_exit
from lite.decoding.reference import hf_generate_batch
from lite.evaluation.metrics import pooled_token_agreement
from lite.files import write_atomic
from lite.model.prompts import default_format, encode_prompt

REPO = Path(__file__).resolve().parent.parent
VICUNA = REPO.parent / "shared" / "data" / "testsets" / "vicuna.jsonl"
FALLBACK = ["Give three tips for staying healthy.", "What is the capital of France?", "Explain photosynthesis.",
            "Write a haiku about the sea.", "How do I boil an egg?", "Name three primary colours.",
            "What does a compiler do?", "Describe a cat in one sentence."]


def prompts(count: int) -> list[str]:
    """The first ``count`` Vicuna questions (unseen in training), else a short built-in list."""
    if not VICUNA.is_file():
        return (FALLBACK * count)[:count]
    from lite.evaluation.testsets import read_testset

    return [p.instruction for p in read_testset("vicuna", VICUNA).prompts[:count]]


def timed(fn) -> tuple[list[list[int]], float, list[list[int]] | None]:
    start = time.perf_counter()
    answers, exits = fn()
    return answers, time.perf_counter() - start, exits


def engine(lm, ids, policy, n, batch):
    def run():
        results = generate_batch(lm, ids, policy, GenerationSettings(max_new_tokens=n), batch_size=batch)
        return [r.token_ids for r in results], [r.exit_layers for r in results]
    return run


def reference(lm, ids, n, batch):
    def run():
        answers = []
        for start in range(0, len(ids), batch):
            answers += hf_generate_batch(lm, ids[start:start + batch], n)[0]
        return answers, None
    return run


def measure(args, dtype: str) -> list[dict]:
    lm = load_model(args.model, dtype=dtype, device=args.device)
    fmt = default_format(lm)
    ids = [encode_prompt(lm.tokenizer, q, fmt=fmt) for q in prompts(args.prompts)]
    L = lm.num_layers
    policies = {"exits off": parse_exit(lm, "none")}
    try:
        policies[f"--exit auto ({parse_exit(lm, 'auto').describe()})"] = parse_exit(lm, "auto")
    except Exception as exc:  # an uncalibrated model has no default policy of its own
        print(f"no --exit auto: {exc}")
    if lm.lite_config.thresholds:
        policies["max-prob thresholds (--exit dynamic)"] = parse_exit(lm, "dynamic")
    for spec in args.exit:  # what auto may have refused at this batch size (its price), measured anyway
        policies[f"--exit {spec}"] = parse_exit(lm, spec)
    rows = []
    for batch in args.batch_sizes:
        generate_batch(lm, ids[:batch], policies["exits off"], GenerationSettings(max_new_tokens=4), batch_size=batch)
        runs = {"generate": reference(lm, ids, args.max_new_tokens, batch)}
        runs.update({name: engine(lm, ids, p, args.max_new_tokens, batch) for name, p in policies.items()})
        best: dict[str, tuple] = {}
        for _ in range(args.rounds):  # interleaved: every configuration once per round
            for name, fn in runs.items():
                answers, seconds, exits = timed(fn)
                if name not in best or seconds < best[name][1]:
                    best[name] = (answers, seconds, exits)
        ref_answers, ref_seconds, _ = best["generate"]
        ref_rate = sum(map(len, ref_answers)) / ref_seconds
        off = best["exits off"][0]
        for name, (answers, seconds, exits) in best.items():
            rate = sum(map(len, answers)) / seconds
            row = {"dtype": dtype, "batch": batch, "what": name, "tokens_per_s": rate, "vs_generate": rate / ref_rate,
                   "tokens": sum(map(len, answers))}
            if name == "exits off":
                row["identical_to_generate"] = sum(a == b for a, b in zip(answers, ref_answers))
                row["rows"] = len(answers)
            elif exits is not None:
                flat = [k for r in exits for k in r]
                row["layer_saving"] = 1 - sum(flat) / (len(flat) * L) if flat else 0.0
                row["agreement_with_exits_off"] = pooled_token_agreement(zip(answers, off))
                row["identical_to_exits_off"] = sum(a == b for a, b in zip(answers, off))
                row["rows"] = len(answers)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def report(args, rows: list[dict]) -> str:
    lines = [f"# The one engine against transformers' `generate` ({args.model})", "",
             f"`python benchmarks/bench_engine.py --model {args.model} --prompts {args.prompts} --max-new-tokens "
             f"{args.max_new_tokens} --dtypes {','.join(args.dtypes)} --batch-sizes "
             f"{','.join(map(str, args.batch_sizes))} --rounds {args.rounds} --threads {args.threads}"
             f"{''.join(' --exit ' + e for e in args.exit)}` ({time.strftime('%Y-%m-%d')}; {args.prompts} Vicuna prompts x {args.max_new_tokens} new tokens, "
             f"greedy; best of {args.rounds} interleaved rounds; {args.threads} threads; device "
             f"{args.device or 'default'}). Speed: generated tokens per second against `generate` at the same "
             f"dtype and batch size, in the same round. Quality: exits off, rows identical to `generate`; exit "
             f"policies, tokens equal to exits off's at the same position, rows identical, layers saved.", "",
             "| dtype | batch | what | vs generate | tokens/s | quality |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["what"] == "generate":
            quality = "reference"
        elif "identical_to_generate" in r:
            quality = f"{r['identical_to_generate']}/{r['rows']} rows identical to generate"
        else:
            quality = (f"{r['layer_saving']:.1%} layers saved; tokens equal to exits off {r['agreement_with_exits_off']:.1%}, "
                       f"rows {r['identical_to_exits_off']}/{r['rows']}")
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['what']} | {r['vs_generate']:.2f}x | {r['tokens_per_s']:.1f} | {quality} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-lite")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="benchmarks/results/engine.md")
    p.add_argument("--exit", action="append", default=[], metavar="SPEC",
                   help="another policy to time, as lite generate's --exit takes it (repeatable), e.g. gate: "
                        "the calibrated gate even where --exit auto prices it out")
    args = p.parse_args()
    args.dtypes = [d.strip() for d in args.dtypes.split(",")]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.set_num_threads(args.threads)
    rows = [r for dtype in args.dtypes for r in measure(args, dtype)]
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps({"args": {k: v for k, v in vars(args).items()}, "rows": rows},
                                                      indent=1) + "\n")
    write_atomic(out, report(args, rows))
    print(report(args, rows))


if __name__ == "__main__":
    main()
