"""Benchmark of self-speculative decoding (``--exit speculative``) against transformers' ``generate``.

Greedy, batch 1, fixed prompts (the first N Vicuna questions through the model's chat template, the test
set found as ``lite eval --testset vicuna`` finds it), ``max_new_tokens`` tokens each. For every prompt, in one run and
in rotating order (so that a noisy, shared CPU hits all three alike):

* transformers ``generate`` (greedy, the same ids, stopping at end-of-sequence like the engine);
* lite with exits off (``--exit none``), the engine's own baseline;
* lite ``speculative`` with the given draft settings.

Reported: the wall-clock speedup of speculative over transformers and over lite-none (total seconds ratio,
the token sequences being identical, which is checked per prompt), acceptance rate overall and per draft
position, and where the time goes: every decoder-block call and head call of the lite runs is timed and
binned (one position = a draft or plain step; several = a verify push; the same for the head), with unit
costs measured on the side (one block, one head evaluation, for 1 and 5 positions), so that the gap to a
target speedup can be read off the counts.

Usage:
    python benchmarks/bench_speculative.py [--model PATH] [--prompts 8] [--max-new-tokens 64]
        [--thresholds calibrated | K:T,...] [--gate] [--exit-layers 26,28,30] [--max-draft 4] [--draft-stop 0.3]
        [--draft-vocab N] [--threads 2] [--out speculative]
Writes benchmarks/results/<out>.json and <out>.md (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from lite import load_model
from lite.decoding import ExitPolicy, GenerationSettings, generate
from lite.decoding.cost import ModelShape
from lite.decoding.reference import hf_generate
from lite.files import write_atomic
from lite.model.prompts import encode_prompt

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def questions(n: int) -> list[str]:
    from lite.evaluation.testsets import load_testset

    # the first turns of the Vicuna test set, found where `lite eval --testset vicuna` finds it (never downloaded)
    return [p.instruction for p in load_testset("vicuna", limit=n, allow_download=False).prompts]


class CallTimer:
    """Times every ``run_block`` and ``exit_logits`` call of a LiteModel, binned by kind and width."""

    def __init__(self, lm) -> None:
        self.lm = lm
        self.on = False
        self.stats: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])  # calls, positions, seconds
        self._block, self._head = lm.run_block, lm.exit_logits
        lm.run_block = self._timed(self._block, "block", lambda a: a[1].shape[1])
        lm.exit_logits = self._timed(self._head, "head", lambda a: a[0].reshape(-1, a[0].shape[-1]).shape[0])
        vocab_head = lm.vocab_head
        lm.vocab_head = lambda ids: self._timed(vocab_head(ids), "draft_head",
                                                 lambda a: a[0].reshape(-1, a[0].shape[-1]).shape[0])

    def _timed(self, fn, kind, width):
        def wrapper(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            n = width(args)
            key = f"{kind}[{'1' if n == 1 else '>1'}]"
            s = self.stats[key]
            s[0] += 1
            s[1] += n
            s[2] += time.perf_counter() - start
            return out
        return wrapper

    def take(self) -> dict[str, dict]:
        out = {k: {"calls": v[0], "positions": v[1], "seconds": v[2]} for k, v in self.stats.items()}
        self.stats.clear()
        return out


def unit_costs(lm, context: int, reps: int = 20) -> dict[str, float]:
    """Milliseconds of one decoder block (middle layer) and of the head, for 1 and 5 positions, with a
    ``context``-position cache."""
    cache = lm.new_cache(context + 8)
    cache.lengths = [context] * lm.num_layers
    layer = lm.num_layers // 2
    out = {}
    with torch.inference_mode():
        for n in (1, 5):
            h = torch.randn(1, n, lm.hidden_size, dtype=lm.dtype)
            for _ in range(3):
                lm.run_block(layer, h, cache)
                cache.truncate(context)
                lm.exit_logits(h)
            start = time.perf_counter()
            for _ in range(reps):
                lm.run_block(layer, h, cache)
                cache.truncate(context)
            out[f"block_ms_{n}"] = (time.perf_counter() - start) / reps * 1000
            start = time.perf_counter()
            for _ in range(reps):
                lm.exit_logits(h)
            out[f"head_ms_{n}"] = (time.perf_counter() - start) / reps * 1000
    return out


def _draft_head_size(lm, policy: ExitPolicy) -> int | None:
    """Rows of the head the drafts read: --draft-vocab, else the calibrated exit vocabulary, else None
    (the whole vocabulary)."""
    return None if policy.exit_ids is None else len(policy.exit_ids)


def build_policy(lm, args) -> ExitPolicy:
    """The speculative policy of the flags, built by lite's own flag parser."""
    from lite.decoding import ExitOptions
    from lite.decoding import build_policy as lite_build_policy

    return lite_build_policy(lm, ExitOptions(
        exit="speculative", thresholds=None if args.thresholds == "calibrated" else args.thresholds,
        confidence=None if args.thresholds == "calibrated" else args.confidence, exit_layers=args.exit_layers,
        gate=args.gate, max_draft=args.max_draft, draft_stop=args.draft_stop, draft_vocab=args.draft_vocab))


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu")
    policy = build_policy(lm, args)
    fmt = "chat" if getattr(lm.tokenizer, "chat_template", None) else "alpaca"
    prompts = [encode_prompt(lm.tokenizer, q, fmt=fmt) for q in questions(args.prompts)]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    timer = CallTimer(lm)
    # warm-up: first-call allocations must not land on one side
    generate(lm, prompts[0], ExitPolicy("none"), GenerationSettings(max_new_tokens=4))
    generate(lm, prompts[0], policy, GenerationSettings(max_new_tokens=4))
    hf_generate(lm, prompts[0], 4)
    records, calls = [], {"none": defaultdict(lambda: [0, 0, 0.0]), "speculative": defaultdict(lambda: [0, 0, 0.0])}
    for i, ids in enumerate(prompts):
        row: dict = {"prompt_tokens": len(ids)}
        order = ["hf", "none", "speculative"]
        order = order[i % 3:] + order[:i % 3]
        for mode in order:
            if mode == "hf":
                tokens, seconds = hf_generate(lm, ids, args.max_new_tokens)
                row["hf"] = {"tokens": tokens, "seconds": seconds}
                continue
            timer.on = True
            result = generate(lm, ids, ExitPolicy("none") if mode == "none" else policy, settings)
            timer.on = False
            for k, v in timer.take().items():
                acc = calls[mode][k]
                acc[0] += v["calls"]
                acc[1] += v["positions"]
                acc[2] += v["seconds"]
            row[mode] = {"tokens": result.token_ids, "seconds": result.seconds, "flops": result.cost.flops,
                         "head_evals": result.cost.head_evals}
            if mode == "speculative":
                c = result.cost
                row[mode].update(drafted=c.drafted, accepted=c.accepted, rejected=c.rejected,
                                 acceptance_by_position=c.acceptance_by_position,
                                 draft_layers=[t.draft_layer for t in result.tokens])
        row["identical"] = row["speculative"]["tokens"] == row["none"]["tokens"] == row["hf"]["tokens"]
        records.append(row)
        print(f"prompt {i}: {len(row['none']['tokens'])} tokens, hf {row['hf']['seconds']:.2f}s none "
              f"{row['none']['seconds']:.2f}s spec {row['speculative']['seconds']:.2f}s, drafted "
              f"{row['speculative']['drafted']} accepted {row['speculative']['accepted']}, identical "
              f"{row['identical']}", file=sys.stderr, flush=True)
    units = unit_costs(lm, context=int(sum(len(p) for p in prompts) / len(prompts)) + args.max_new_tokens // 2)
    return summarise(lm, args, policy, records, calls, units)


def projection(units: dict, L: int, head_fraction: float = 1.0, max_drafts: int = 6) -> list[dict]:
    """Projected speedup over lite-none from the measured unit costs, for drafts that all leave at layer k
    and are each accepted with probability a (independently), with the best number of drafts per round
    d in 1..``max_drafts``.

    A round costs d draft steps (k blocks + one head each, the head scaled by ``head_fraction`` for a
    cheaper draft head) plus the verify step (k blocks for its own position, L - k blocks carrying d + 1
    positions, the head over d + 1 positions) and emits 1 + a + a^2 + ... + a^d tokens; the full model
    spends L blocks + one head per token. Block/head costs over d + 1 positions are interpolated
    linearly from the 1- and 5-position measurements.
    """
    b1, b5, h1, h5 = units["block_ms_1"], units["block_ms_5"], units["head_ms_1"], units["head_ms_5"]
    full = L * b1 + h1
    out = []
    for k in sorted({L // 4, L // 3, L // 2, 2 * L // 3}):
        for a in (0.5, 0.7, 0.9):
            best = (0.0, 0)
            for d in range(1, max_drafts + 1):
                bd, hd = b1 + (b5 - b1) * d / 4, h1 + (h5 - h1) * d / 4
                emitted = sum(a ** i for i in range(d + 1))
                round_ms = d * (k * b1 + h1 * head_fraction) + k * b1 + (L - k) * bd + hd
                best = max(best, (emitted * full / round_ms, d))
            out.append({"exit_layer": k, "acceptance": a, "best_drafts": best[1], "head_fraction": head_fraction,
                        "speedup_vs_none": best[0]})
    return out


def summarise(lm, args, policy, records, calls, units) -> dict:
    tokens = sum(len(r["speculative"]["tokens"]) for r in records)
    secs = {m: sum(r[m]["seconds"] for r in records) for m in ("hf", "none", "speculative")}
    drafted = sum(r["speculative"]["drafted"] for r in records)
    accepted = sum(r["speculative"]["accepted"] for r in records)
    depth = max((len(r["speculative"]["acceptance_by_position"]) for r in records), default=0)
    # pool the per-position rates over prompts, weighting by rounds: recompute from draft counts per prompt
    by_pos = []
    for i in range(depth):
        rates = [r["speculative"]["acceptance_by_position"][i] for r in records
                 if len(r["speculative"]["acceptance_by_position"]) > i]
        by_pos.append(sum(rates) / len(rates))
    draft_layers = defaultdict(int)
    for r in records:
        for layer in r["speculative"]["draft_layers"]:
            draft_layers[str(layer or "full")] += 1
    breakdown = {}
    for mode in ("none", "speculative"):
        total = secs[mode]
        parts = {k: {"calls": v[0], "positions": v[1], "seconds": v[2], "share": v[2] / total}
                 for k, v in sorted(calls[mode].items())}
        other = total - sum(v[2] for v in calls[mode].values())
        parts["other (python, sampling, confidence, embedding, prefill overhead)"] = {"seconds": other,
                                                                                     "share": other / total}
        breakdown[mode] = parts
    shape = ModelShape.from_config(lm.config)
    return {
        "benchmark": "speculative",
        "model": args.model or "smollm2-135m-instruct (embedded default, not LITE-tuned)",
        "num_layers": lm.num_layers, "dtype": str(lm.dtype).replace("torch.", ""),
        "policy": {"exit_layers": policy.exit_layers, "thresholds": {str(k): v for k, v in policy.thresholds.items()}
                   or "calibrated (lite_config.json)", "confidence": policy.confidence,
                   "max_draft_tokens": policy.max_draft_tokens, "draft_stop_confidence": policy.draft_stop_confidence,
                   "draft_vocab": _draft_head_size(lm, policy), "gate": policy.gate is not None},
        "prompts": len(records), "max_new_tokens": args.max_new_tokens, "tokens": tokens,
        "threads": args.threads, "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "identical_outputs": all(r["identical"] for r in records),
        "seconds": secs,
        "speedup_vs_hf_generate": secs["hf"] / secs["speculative"],
        "speedup_vs_lite_none": secs["none"] / secs["speculative"],
        "lite_none_vs_hf_generate": secs["hf"] / secs["none"],
        "drafted": drafted, "accepted": accepted, "rejected": drafted - accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "acceptance_by_position_mean_over_prompts": by_pos,
        "tokens_by_draft_layer": dict(draft_layers),
        "head_evals_per_token": {m: sum(r[m]["head_evals"] for r in records) / tokens for m in ("none", "speculative")},
        "flops_ratio_speculative_over_none": sum(r["speculative"]["flops"] for r in records)
        / sum(r["none"]["flops"] for r in records),
        "unit_ms": units,
        "head_in_blocks": units["head_ms_1"] / units["block_ms_1"],
        "head_in_blocks_flops": shape.head_flops() / shape.block_flops(200),
        "time_breakdown": breakdown,
        "projection": projection(units, lm.num_layers) + projection(units, lm.num_layers, head_fraction=1 / 8),
        "per_prompt": [{"prompt_tokens": r["prompt_tokens"], "tokens": len(r["speculative"]["tokens"]),
                        "identical": r["identical"], **{f"{m}_seconds": r[m]["seconds"] for m in ("hf", "none", "speculative")},
                        "drafted": r["speculative"]["drafted"], "accepted": r["speculative"]["accepted"]}
                       for r in records],
    }


def markdown(res: dict) -> str:
    u = res["unit_ms"]
    p = res["policy"]
    lines = [
        "# Self-speculative decoding vs transformers generate",
        "",
        (f"Model: {res['model']}, {res['num_layers']} layers, {res['dtype']}; {res['prompts']} Vicuna prompts (chat "
        f"template), greedy, batch 1, max {res['max_new_tokens']} new tokens ({res['tokens']} tokens in all), "
        f"{res['threads']} torch threads on a shared {res['machine']}."),
        (f"Draft policy: exit layers {p['exit_layers']}, "
        + ("the learned exit gate" if p.get("gate") else f"thresholds {p['thresholds']} ({p['confidence']})") + ", "
        f"max draft {p['max_draft_tokens']}, draft stop {p['draft_stop_confidence']}, draft head over "
        f"{p.get('draft_vocab') or 'the whole'} vocabulary."),
        "",
        "| figure | value |",
        "|---|---|",
        f"| identical output (speculative = lite none = transformers), every prompt | {res['identical_outputs']} |",
        f"| **speedup vs transformers generate** | **{res['speedup_vs_hf_generate']:.2f}x** (target 1.3x) |",
        f"| speedup vs lite exits off | {res['speedup_vs_lite_none']:.2f}x |",
        f"| lite exits off vs transformers generate | {res['lite_none_vs_hf_generate']:.2f}x |",
        (f"| seconds: transformers / lite none / speculative | {res['seconds']['hf']:.1f} / "
        f"{res['seconds']['none']:.1f} / {res['seconds']['speculative']:.1f} |"),
        f"| drafted / accepted / rejected | {res['drafted']} / {res['accepted']} / {res['rejected']} |",
        f"| acceptance rate | {res['acceptance_rate'] if res['acceptance_rate'] is None else format(res['acceptance_rate'], '.1%')} |",
        (f"| acceptance by draft position (mean over prompts) | "
        f"{', '.join(f'{r:.0%}' for r in res['acceptance_by_position_mean_over_prompts']) or '-'} |"),
        f"| emitted tokens by drafting layer | {res['tokens_by_draft_layer']} |",
        (f"| head evaluations per token: none / speculative | {res['head_evals_per_token']['none']:.2f} / "
        f"{res['head_evals_per_token']['speculative']:.2f} |"),
        f"| FLOPs speculative / none | {res['flops_ratio_speculative_over_none']:.3f} |",
        f"| one block, 1 / 5 positions (ms) | {u['block_ms_1']:.2f} / {u['block_ms_5']:.2f} |",
        f"| the head, 1 / 5 positions (ms) | {u['head_ms_1']:.2f} / {u['head_ms_5']:.2f} |",
        f"| one head evaluation in blocks: measured / FLOPs | {res['head_in_blocks']:.1f} / {res['head_in_blocks_flops']:.1f} |",
        "",
        "Where the time goes (timed calls inside the lite runs; `[1]` = one position, `[>1]` = a batched verify):",
        "",
        "| part | lite none s (share) | speculative s (share) |",
        "|---|---|---|",
    ]
    keys = sorted(set(res["time_breakdown"]["none"]) | set(res["time_breakdown"]["speculative"]))
    for k in keys:
        cells = []
        for m in ("none", "speculative"):
            v = res["time_breakdown"][m].get(k)
            calls = f", {v['calls']} calls / {v['positions']} positions" if v and "calls" in v else ""
            cells.append(f"{v['seconds']:.1f} ({v['share']:.0%}{calls})" if v else "-")
        lines.append(f"| {k} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "Projected speedup over lite exits off from the unit costs above (every token drafts at layer k, each",
        "draft accepted with probability a, best drafts per round d <= 6 in brackets; `head/8` = a draft head 8x",
        "cheaper than the full one, e.g. a vocabulary shortlist, the verify head staying full):",
        "",
        "| exit layer k | a = 0.5 | a = 0.7 | a = 0.9 | a = 0.5, head/8 | a = 0.7, head/8 | a = 0.9, head/8 |",
        "|---|---|---|---|---|---|---|",
    ]
    proj = res["projection"]
    for k in sorted({p["exit_layer"] for p in proj}):
        cells = [f"{p['speedup_vs_none']:.2f}x ({p['best_drafts']})" for frac in (1.0, 1 / 8) for p in proj
                 if p["exit_layer"] == k and p["head_fraction"] == frac]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--thresholds", default="0.9",
                    help="'calibrated' (lite_config.json), one value for every checked exit, or K:T,...")
    ap.add_argument("--confidence", default="max_prob")
    ap.add_argument("--gate", action="store_true", help="drafts leave where the model's learned exit gate says "
                    "(head-free checks) instead of by confidence thresholds")
    ap.add_argument("--exit-layers", default=None, help="exit layers to check, e.g. 26,28 (default: the model's)")
    ap.add_argument("--max-draft", type=int, default=4)
    ap.add_argument("--draft-stop", type=float, default=0.0)
    ap.add_argument("--draft-vocab", type=int, default=None,
                    help="drafts use the head over the N most frequent tokens (the model's draft_vocab.json)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="speculative", help="results file stem in benchmarks/results")
    args = ap.parse_args(argv)
    res = run(args)
    write_atomic(RESULTS / f"{args.out}.json", json.dumps(res, indent=1) + "\n")
    write_atomic(RESULTS / f"{args.out}.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
