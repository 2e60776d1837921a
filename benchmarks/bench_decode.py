"""Decoding speed of the early-exit engine against transformers' ``generate`` on the embedded default model.

Greedy, batch 1, the first ``--prompts`` Vicuna questions through the chat template, ``--max-new-tokens``
tokens (answers stop at EOS). Every figure is a ratio measured in the same run against ``generate`` at the
same dtype, on the same prompts:

(a) the engine with exits off: time ratio (target <= 1.05) and token-for-token equality;
(b) ``static:K`` for every exit layer K below L: tokens/s ratio, the ceiling early exit can reach here;
(c) ``dynamic`` with hand-set thresholds, for max_prob (a head evaluation at every check), state_cosine (no
    head until the exit) and a learned logistic gate (``lite.decoding.gate``, trained here on other Vicuna rows).

Timing: the configurations are interleaved prompt by prompt and repeated ``--repeats`` times; each
(configuration, prompt) keeps its fastest repeat, because the CPU is shared and noise only adds time.
The head's cost is measured directly too (one head evaluation vs one decoder block, same dtype).

    .venv/bin/python benchmarks/bench_decode.py            # both dtypes, writes benchmarks/results/decode.*
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import vicuna_questions

from lite import load_model
from lite.decoding import ExitPolicy, GenerationSettings, generate
from lite.decoding.cost import ModelShape
from lite.decoding.reference import hf_generate
from lite.files import write_atomic, write_json_atomic
from lite.model.prompts import encode_prompt

OUT = Path(__file__).resolve().parent / "results"

# Hand-set thresholds (the un-tuned model's intermediate layers are poor; see decode.md for how they were
# chosen from the confidence statistics of Vicuna rows 8..19, not the benchmark prompts).
# Measured there with exits off: max_prob >= 0.9 holds for 7-30% of tokens per layer but agrees with the
# final layer's token only 9-32% of the time below layer 23 (57% at 23, 80% at 26); state cosine has no
# useful signal below 23 (agreement <= 18% at any quantile); at 23 its top 20% (>= 0.86) agree 46%.
MAX_PROB_THRESHOLDS = {8: 0.9, 11: 0.9, 15: 0.9, 19: 0.9, 23: 0.9, 26: 0.9}
MAX_PROB_DEEP = {23: 0.9, 26: 0.9}
COSINE_DEEP = {23: 0.86, 26: 0.74}
GATE_PROBABILITY = 0.8


def questions(first: int, count: int) -> list[str]:
    return vicuna_questions(first, count)


def train_logistic_gate(lm, prompts: list[list[int]], max_new_tokens: int, layers: list[int]):
    """A logistic exit gate per exit layer from the full model's own answers to other prompts."""
    from lite.decoding.gate import train_gate

    states, agree = [[] for _ in layers], [[] for _ in layers]
    for ids in prompts:
        answer = generate(lm, ids, ExitPolicy(), GenerationSettings(max_new_tokens=max_new_tokens)).token_ids
        seq = torch.tensor([ids + answer[:-1]], device=lm.device)
        with torch.inference_mode():
            normed = lm.hidden_states(seq, layers=layers + [lm.num_layers])
            final = lm.lm_head(normed[lm.num_layers][0, len(ids) - 1:]).argmax(-1)
            for i, k in enumerate(layers):
                s = normed[k][0, len(ids) - 1:]
                states[i].append(s.float().numpy())
                agree[i].append((lm.lm_head(s).argmax(-1) == final).numpy())
    gate = train_gate(np.stack([np.concatenate(s) for s in states]), np.stack([np.concatenate(a) for a in agree]),
                      layers)
    gate.set_thresholds({k: GATE_PROBABILITY for k in layers})
    return gate


def head_vs_block(lm, repeats: int = 200) -> dict:
    """Median time of one head evaluation and of one decoder block (one position, context 64)."""
    cache, rope = lm.new_cache(80), lm.rope(0, 80)
    with torch.inference_mode():
        h = lm.embed(torch.tensor([[5] * 64], device=lm.device))
        lm.run_block(1, h, rope, cache)
        x = h[:, -1:]
        block_t, head_t = [], []
        for _ in range(repeats):
            cache.lengths[0] = 64
            t = time.perf_counter()
            lm.run_block(1, x, rope, cache)
            block_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            lm.exit_logits(x[:, -1])
            head_t.append(time.perf_counter() - t)
    shape = ModelShape.from_config(lm.config)
    return {"head_ms": 1e3 * statistics.median(head_t), "block_ms": 1e3 * statistics.median(block_t),
            "head_over_block_time": statistics.median(head_t) / statistics.median(block_t),
            "head_over_block_flops": shape.head_flops() / shape.block_flops(64)}


def divergence(lm, ids: list[int], hf_ids: list[int], engine_ids: list[int]) -> dict | None:
    """Where the engine (exits off) first differs from ``generate``, with the top-2 logits of one plain
    full-sequence forward at that point (a tie there means rounding, not a bug), or None."""
    d = next((j for j, (a, b) in enumerate(zip(hf_ids, engine_ids)) if a != b), None)
    if d is None:
        return None
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids + hf_ids[:d]], device=lm.device)).logits[0, -1].float()
    top = logits.topk(2)
    return {"position": d, "generate": hf_ids[d], "engine": engine_ids[d], "forward_top2": top.indices.tolist(),
            "forward_top2_logits": top.values.tolist()}


def exits_off_divergences(dtype: str, report: dict) -> tuple[list[dict], dict]:
    """Rerun ``generate`` and the engine with exits off on a report's prompts (a second, independent
    timing of (a)); list the divergences."""
    lm = load_model(None, dtype=dtype, device="cpu")
    out, hf_s, engine_s = [], 0.0, 0.0
    for q in questions(0, report["prompts"]):
        ids = encode_prompt(lm.tokenizer, q, fmt="chat")
        t = time.perf_counter()
        hf, _ = hf_generate(lm, ids, report["max_new_tokens"])
        hf_s += time.perf_counter() - t
        t = time.perf_counter()
        engine = generate(lm, ids, ExitPolicy(), GenerationSettings(max_new_tokens=report["max_new_tokens"])).token_ids
        engine_s += time.perf_counter() - t
        d = divergence(lm, ids, hf, engine)
        if d is not None:
            out.append(d)
    return out, {"generate_seconds": hf_s, "engine_seconds": engine_s, "time_ratio": engine_s / hf_s,
                 "load_average": round(os.getloadavg()[0], 1)}


def agreement(a: list[int], b: list[int]) -> float:
    """Fraction of the full model's tokens matched at the same position."""
    return sum(x == y for x, y in zip(a, b)) / max(len(b), 1)


def bench_dtype(dtype: str, args, gate=None) -> tuple[dict, object]:
    lm = load_model(None, dtype=dtype, device="cpu")
    L = lm.num_layers
    exits = [k for k in lm.exit_layers if k < L]
    tok = lm.tokenizer
    prompts = [encode_prompt(tok, q, fmt="chat") for q in questions(0, args.prompts)]
    configs: dict[str, tuple[ExitPolicy, str]] = {"none": (ExitPolicy(), "copy")}
    for k in exits:
        configs[f"static:{k}"] = (ExitPolicy("static", layer=k), "copy")
    configs["dynamic max_prob, 6 exits"] = (ExitPolicy("dynamic", thresholds=MAX_PROB_THRESHOLDS), "copy")
    configs["dynamic max_prob, exits 23+26"] = (
        ExitPolicy("dynamic", thresholds=MAX_PROB_DEEP, exit_layers=[23, 26, L]), "copy")
    configs["dynamic state_cosine, exits 23+26"] = (
        ExitPolicy("dynamic", thresholds=COSINE_DEEP, confidence="state_cosine", exit_layers=[23, 26, L]), "copy")
    configs["dynamic state_cosine, exits 23+26, recompute"] = (
        ExitPolicy("dynamic", thresholds=COSINE_DEEP, confidence="state_cosine", exit_layers=[23, 26, L]),
        "recompute")
    gate_seconds = 0.0
    if gate is None:
        gate_prompts = [encode_prompt(tok, q, fmt="chat") for q in questions(8, args.gate_prompts)]
        t = time.perf_counter()
        gate = train_logistic_gate(lm, gate_prompts, args.gate_tokens, exits)
        gate_seconds = time.perf_counter() - t
    configs["dynamic learned gate, 6 exits"] = (ExitPolicy("dynamic", gate=gate), "copy")

    settings = {kv: GenerationSettings(max_new_tokens=args.max_new_tokens, kv=kv) for kv in ("copy", "recompute")}
    hf_generate(lm, prompts[0], 4)  # warm up both paths
    generate(lm, prompts[0], ExitPolicy(), GenerationSettings(max_new_tokens=4))
    best: dict[str, list[float]] = {name: [float("inf")] * len(prompts) for name in ["hf", *configs]}
    outputs: dict[str, list] = {}
    for _ in range(args.repeats):
        for i, ids in enumerate(prompts):
            t = time.perf_counter()
            hf_ids, _ = hf_generate(lm, ids, args.max_new_tokens)
            best["hf"][i] = min(best["hf"][i], time.perf_counter() - t)
            outputs.setdefault("hf", [None] * len(prompts))[i] = hf_ids
            for name, (policy, kv) in configs.items():
                t = time.perf_counter()
                result = generate(lm, ids, policy, settings[kv])
                best[name][i] = min(best[name][i], time.perf_counter() - t)
                outputs.setdefault(name, [None] * len(prompts))[i] = result
            print(f"[{dtype}] prompt {i + 1}/{len(prompts)} done", file=sys.stderr, flush=True)

    divergences = [divergence(lm, ids, hf, r.token_ids) for ids, hf, r in zip(prompts, outputs["hf"], outputs["none"])]
    shape = ModelShape.from_config(lm.config)
    hf_tokens = sum(len(x) for x in outputs["hf"])
    hf_seconds = sum(best["hf"])
    full_ids = [r.token_ids for r in outputs["none"]]
    rows = {}
    for name in configs:
        results = outputs[name]
        n_tokens = sum(len(r.token_ids) for r in results)
        seconds = sum(best[name])
        flops = sum(r.cost.flops for r in results)
        full_flops = sum(shape.full_flops(len(ids), len(f)) for ids, f in zip(prompts, full_ids))
        exits_all = [t.exit_layer for r in results for t in r.tokens]
        rows[name] = {
            "tokens": n_tokens,
            "seconds": seconds,
            "time_ratio_vs_generate": seconds / hf_seconds,
            "tokens_per_s_ratio_vs_generate": (n_tokens / seconds) / (hf_tokens / hf_seconds),
            "mean_exit_layer": sum(exits_all) / len(exits_all),
            "layer_cost_improvement": 1 - sum(exits_all) / (len(exits_all) * L),
            # against the full model's own answers (their lengths), so longer answers count against
            "compute_cost_improvement": 1 - flops / full_flops,
            "head_evals_per_token": sum(r.cost.head_evals for r in results) / n_tokens,
            "kv_fills_per_token": sum(r.cost.kv_fills for r in results) / n_tokens,
            "recomputed_per_token": sum(r.cost.recomputed for r in results) / n_tokens,
            "agreement_with_full": statistics.mean(agreement(r.token_ids, f) for r, f in zip(results, full_ids)),
        }
    return {
        "dtype": dtype,
        "num_layers": L,
        "exit_layers": exits,
        "generate": {"tokens": hf_tokens, "seconds": hf_seconds, "tokens_per_s": hf_tokens / hf_seconds},
        "engine_exits_off_equals_generate": [r.token_ids for r in outputs["none"]] == outputs["hf"],
        "exits_off_divergences": [d for d in divergences if d is not None],
        "head_cost": head_vs_block(lm),
        "kv_fill_over_block_flops": shape.kv_fill_flops() / shape.block_flops(64),
        "gate_training_seconds": gate_seconds,
        "configs": rows,
    }, gate


def markdown(report: dict) -> str:
    lines = [
        "# Decoding benchmark: early-exit engine vs transformers `generate`",
        "",
        f"Command: `{report['command']}`  ",
        (f"Embedded default model (SmolLM2-135M-Instruct, L=30), greedy, batch 1, {report['prompts']} Vicuna "
        f"prompts (chat template), max {report['max_new_tokens']} new tokens, fastest of {report['repeats']} "
        f"interleaved repeats per prompt. torch threads {report['threads']}; load average before/after "
        f"{report['load_before']} / {report['load_after']} on 2 shared cores (noisy: ratios are from the same "
        f"run, absolute times are not comparable across runs)."),
        "",
    ]
    for r in report["runs"]:
        hc = r["head_cost"]
        lines += [
            f"## {r['dtype']}",
            "",
            (f"`generate`: {r['generate']['tokens']} tokens in {r['generate']['seconds']:.1f} s "
            f"({r['generate']['tokens_per_s']:.1f} tokens/s). Engine with exits off gives the same tokens: "
            f"**{r['engine_exits_off_equals_generate']}**.  "),
            (f"Head cost: one LM-head evaluation {hc['head_ms']:.2f} ms vs one decoder block {hc['block_ms']:.2f} "
            f"ms = **{hc['head_over_block_time']:.1f} blocks** by time ({hc['head_over_block_flops']:.1f} by "
            f"FLOPs)."),
            *[f"Exits-off divergence at token {d['position']}: generate chose {d['generate']}, the engine "
              f"{d['engine']}; a plain forward of the same prefix ranks {d['forward_top2']} with logits "
              f"{d['forward_top2_logits']} (gap {d['forward_top2_logits'][0] - d['forward_top2_logits'][1]:.3g}).  "
              for d in r.get("exits_off_divergences", [])],
            *([(f"Exits-off re-check (second run, `--divergences-only`): engine / generate time "
               f"**{r['exits_off_recheck']['time_ratio']:.3f}** (load average {r['exits_off_recheck']['load_average']}).")]
              if "exits_off_recheck" in r else []),
            "",
            ("| configuration | time / generate | tokens/s vs generate | mean exit | layer cost impr. | "
             "compute cost impr. | heads/token | K/V fills/token | recomputed/token | agreement w/ full |"),
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, c in r["configs"].items():
            lines.append(
                f"| {name} | {c['time_ratio_vs_generate']:.3f} | {c['tokens_per_s_ratio_vs_generate']:.2f}x | "
                f"{c['mean_exit_layer']:.1f} | {c['layer_cost_improvement']:.1%} | "
                f"{c['compute_cost_improvement']:.1%} | {c['head_evals_per_token']:.2f} | "
                f"{c['kv_fills_per_token']:.1f} | {c['recomputed_per_token']:.1f} | {c['agreement_with_full']:.0%} |")
        h = hc["head_over_block_time"]
        fill = r.get("kv_fill_over_block_flops", 0.0)
        L = r["num_layers"]
        breakeven = ", ".join(f"{k}: {h / (h + (L - k) * (1 - fill)):.0%}" for k in r["exit_layers"])
        lines += [
            "",
            (f"Break-even for a head-based check (max_prob, margin, entropy) at exit layer k, from the measured head "
            f"cost of {h:.1f} blocks: a check costs one head for every token that reaches k, an exit there saves "
            f"the L-k blocks it skips (less their K/V fills), so at least this share of the tokens reaching k "
            f"must leave there for the check to pay: {breakeven}."),
            "",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=("float32", "bfloat16"))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--gate-prompts", type=int, default=8, help="Vicuna rows after the benchmark's, for the gate")
    p.add_argument("--gate-tokens", type=int, default=48, help="tokens of the full model's answers per gate prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared CPU two spinning threads run ~10x slower)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--markdown-only", action="store_true", help="re-render decode.md from decode.json")
    p.add_argument("--divergences-only", action="store_true",
                   help="add the exits-off divergence analysis to an existing decode.json (for runs made before it)")
    args = p.parse_args()
    if args.markdown_only or args.divergences_only:
        torch.set_num_threads(args.threads)
        report = json.loads((args.out / "decode.json").read_text())
        for run in report["runs"] if args.divergences_only else []:
            if run["dtype"] in args.dtype and "exits_off_divergences" not in run:
                run["exits_off_divergences"], run["exits_off_recheck"] = exits_off_divergences(run["dtype"], report)
                write_json_atomic(args.out / "decode.json", report)
        (args.out / "decode.md").write_text(markdown(report))
        return
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    runs, gate = [], None
    for dtype in args.dtype:  # results are written after each dtype, so a long run leaves partial results
        run, gate = bench_dtype(dtype, args, gate)
        runs.append(run)
        write_report(args, runs, load_before)


def write_report(args, runs: list[dict], load_before: float) -> None:
    import transformers

    report = {
        "command": "python benchmarks/bench_decode.py " + " ".join(sys.argv[1:]),
        "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "load_before": round(load_before, 1),
        "load_after": round(os.getloadavg()[0], 1), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "thresholds": {"max_prob": MAX_PROB_THRESHOLDS, "max_prob_deep": MAX_PROB_DEEP,
                       "state_cosine_deep": COSINE_DEEP, "gate_probability": GATE_PROBABILITY},
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "decode.json", report)
    write_atomic(args.out / "decode.md", markdown(report))
    print(markdown(report), flush=True)


if __name__ == "__main__":
    main()
