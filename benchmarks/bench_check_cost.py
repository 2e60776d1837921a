"""What one exit check costs on the wall clock, against what `lite.decoding.cost` prices it at.

The model's calibrated gate with every cut at 1 (a probability the gate never reaches: every exit is checked
at every token and no token leaves, so the tokens are exits off's) against exits off, at batch 1, in
interleaved rounds (best kept), on the same prompts. The slowdown over exits off, spread over the checks made,
is one check's cost in blocks of one row (a block's time: exits off's step over the blocks and head it runs,
priced as `lite.decoding.cost` prices them); the price beside it is the gate's FLOPs per check in blocks plus
`CHECK_OVERHEAD`. A cascade gate never reads its head here (nothing passes the gate), so this is the gate alone.

    python benchmarks/bench_check_cost.py --model smollm2-135m-lite --prompts 8 --max-new-tokens 48 \
        --rounds 3 --threads 2 --out benchmarks/results/check_cost.md
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from lite import load_model
from lite.decoding import GenerationSettings, generate_batch, parse_exit
from lite.decoding.cost import CHECK_OVERHEAD, PRICE_POSITION, step_prices
from lite.decoding.spec import gate_check_price
from lite.evaluation.testsets import read_testset
from lite.files import write_atomic
from lite.model.prompts import default_format, encode_prompt

VICUNA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "testsets" / "vicuna.jsonl"


def never_exiting_gate(lm):
    """The calibrated gate with every cut (and every cascade cut) at 1: checked everywhere, never sure."""
    policy = parse_exit(lm, "gate")
    gate = copy.copy(policy.gate)
    gate.set_thresholds({k: 1.0 for k in gate.thresholds})
    gate.confirm = {k: 1.0 for k in gate.confirm}
    return dataclasses.replace(policy, gate=gate)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-lite")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="benchmarks/results/check_cost.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype, device="cpu")
    questions = [p.instruction for p in read_testset("vicuna", VICUNA).prompts[: args.prompts]]
    ids = [encode_prompt(lm.tokenizer, q, fmt=default_format(lm)) for q in questions]
    policies = {"exits off": parse_exit(lm, "none"), "gate, never sure": never_exiting_gate(lm)}
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    generate_batch(lm, ids[:1], policies["exits off"], GenerationSettings(max_new_tokens=4), batch_size=1)
    best, outputs = {}, {}
    for _ in range(args.rounds):
        for name, policy in policies.items():
            start = time.perf_counter()
            results = generate_batch(lm, ids, policy, settings, batch_size=1)
            seconds = time.perf_counter() - start
            best[name] = min(best.get(name, seconds), seconds)
            outputs[name] = [list(r.token_ids) for r in results]
    same = sum(a == b for a, b in zip(outputs["exits off"], outputs["gate, never sure"]))
    tokens = sum(map(len, outputs["exits off"]))
    checks = [k for k in lm.exit_layers if k < lm.num_layers]
    head = step_prices(lm, None, PRICE_POSITION)[2]  # the full head at L, in blocks
    step_blocks = lm.num_layers + head
    block_seconds = best["exits off"] / tokens / step_blocks
    measured = (best["gate, never sure"] - best["exits off"]) / tokens / len(checks) / block_seconds
    record = lm.lite_config.calibration.get("gate") or {}
    features = record.get("features", "exit")
    gate_flops, module = gate_check_price(lm, record, checks)  # as --exit auto prices a check
    priced = gate_flops + module + CHECK_OVERHEAD
    res = {"model": args.model, "dtype": args.dtype, "threads": args.threads, "prompts": len(ids),
           "tokens": tokens, "checks_per_token": len(checks), "rounds": args.rounds,
           "seconds": best, "rows_identical": same, "block_ms": 1000 * block_seconds,
           "check_blocks_measured": measured, "check_blocks_priced": priced, "gate_flops_blocks": gate_flops,
           "gate_features": features, "module_blocks": module,
           "check_overhead": CHECK_OVERHEAD, "date": time.strftime("%Y-%m-%d")}
    text = "\n".join([
        f"# What one exit check costs ({args.model}, {args.dtype}, batch 1, {args.threads} threads, {res['date']})", "",
        f"`python benchmarks/bench_check_cost.py --model {args.model} --prompts {args.prompts} --max-new-tokens "
        f"{args.max_new_tokens} --rounds {args.rounds} --threads {args.threads}`: {len(ids)} Vicuna prompts, "
        f"{tokens} tokens, best of {args.rounds} interleaved rounds. The gate with every cut at 1 checks all "
        f"{len(checks)} exits at every token and lets none out (rows identical to exits off: {same}/{len(ids)}).", "",
        "| what | seconds | per token (ms) |", "|---|---|---|",
        *[f"| {name} | {s:.2f} | {1000 * s / tokens:.2f} |" for name, s in best.items()], "",
        f"A block of one row: {1000 * block_seconds:.3f} ms (exits off's step over {lm.num_layers} blocks and a head "
        f"priced at {head:.2f} blocks; the prefill is in that step, so a block is overstated a little and a check's"
        f" share understated). One check: **{measured:.3f} blocks measured**, {priced:.3f} priced "
        f"(the gate's FLOPs {gate_flops:.3f} + the exit module {module:.3f} (gate features {features}) + "
        f"CHECK_OVERHEAD {CHECK_OVERHEAD}).", ""])
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps(res, indent=1) + "\n")
    write_atomic(out, text)
    print(text)


if __name__ == "__main__":
    main()
