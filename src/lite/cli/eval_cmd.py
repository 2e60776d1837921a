"""`lite eval`: cost and quality of early exit against the full model on the paper's test sets."""

from __future__ import annotations

import argparse
import sys

from ..errors import LiteError
from . import add_device_argument, add_dtype_argument, add_exit_argument, add_threads_argument
from .numbers import positive_floats, positive_int, thresholds

EXAMPLE = ("lite eval --model runs/mine --testset vicuna --testset koala --limit 5 --static-layers "
           "--out runs/eval")

# The typed function behind this verb; see lite.cli.train_cmd.CONTRACT (checked by tests/test_cli.py).
CONTRACT = {"lite.evaluation.evaluate": {"testsets": "testset", "hf_baseline": "no_hf_baseline", "embedder": None,
                                         "progress_bar": None, "log": None}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add = p.add_argument
    add("--model", default=None,
        help="model folder, LoRA adapter folder, hub id, or smollm2-135m-instruct")
    add("--testset", action="append", metavar="NAME[=PATH]",
        help="vicuna, koala, wizardlm, self_instruct (found locally or downloaded), or NAME=PATH for a file "
             "(JSONL/JSON: Alpaca rows or {prompt} rows); repeat for several (default: all four)")
    add("--limit", type=positive_int, default=None, help="first N prompts of each test set")
    add_exit_argument(p, "auto", more="; the policy compared with the full model (with --thresholds, auto is "
                                    "dynamic)")
    add("--kv", default="copy", help="skipped-layer strategy: copy, recompute, or both as copy,recompute")
    add("--threshold-scale", "--threshold-scales", dest="threshold_scales", type=positive_floats, default=[1.0],
        metavar="S[,S...]",
        help="multiply the thresholds; several values (0.8,0.9,1.0,1.1) draw the cost-quality frontier; the "
             "first is the headline")
    add("--thresholds", type=thresholds, default=None,
        help="override calibrated thresholds: one value for every exit ('0.9') or '8:0.9,11:0.85'")
    add("--confidence", default=None,
        help="confidence measure with --thresholds: max_prob (default), margin, entropy, state_cosine")
    add("--static-layers", action="store_true",
        help="also decode with static exit at every exit layer (the per-layer quality picture)")
    add("--compare-model", default=None, metavar="M2",
        help="a second model (e.g. the final-layer baseline) for the side-by-side per-layer figure")
    add("--max-new-tokens", type=positive_int, default=128, help="tokens per answer at most")
    add("--batch-size", type=positive_int, default=8,
        help="prompts decoded together by lite's batched engine and by HF generate alike (default 8; 1 = one "
             "prompt at a time)")
    add_dtype_argument(p, "auto")
    add_device_argument(p)
    add("--prompt-format", default=None, choices=["alpaca", "chat", "raw"],
        help="default: lite_config.json's, else the chat template when there is one, else alpaca")
    add("--judge-url", default=None,
        help="OpenAI-compatible API root for a pairwise LLM judge, e.g. http://127.0.0.1:8000/v1 (key from "
             "$LITE_JUDGE_API_KEY)")
    add("--judge-model", default=None, help="model name for the judge")
    add("--ceiling", action=argparse.BooleanOptionalAction, default=True,
        help="report the model's ceiling, teacher-forced on its full answers: the oracle saving (each token "
             "leaving at the first exit that agrees with the final layer) and each decision rule's "
             "saving-versus-agreement frontier, with the model's policies on it (default: yes)")
    add("--loglik", action=argparse.BooleanOptionalAction, default=True,
        help="report the full model's own judgement of every answer: its mean log-likelihood per token, "
             "teacher-forced with exits off, of the early-exit answer against that of its own answer; one "
             "batched forward per distinct answer (default: yes)")
    add("--no-hf-baseline", action="store_true",
        help="do not time transformers' generate (no speedup figure)")
    add_threads_argument(p)
    add("--out", default="lite-eval", help="output folder (default: lite-eval)")
    add("--restart", action="store_true", help="discard the records of an earlier run in --out")


def run(args: argparse.Namespace) -> int:
    from ..evaluation import RECORDS, evaluate
    from . import progress

    try:
        result = evaluate(
            args.model, args.testset, out=args.out, limit=args.limit, exit=args.exit, kv=args.kv,
            threshold_scales=args.threshold_scales, thresholds=args.thresholds, confidence=args.confidence,
            static_layers=args.static_layers, compare_model=args.compare_model,
            max_new_tokens=args.max_new_tokens, dtype=args.dtype, device=args.device, prompt_format=args.prompt_format,
            judge_url=args.judge_url, judge_model=args.judge_model, hf_baseline=not args.no_hf_baseline,
            restart=args.restart, progress_bar=True, log=progress, batch_size=args.batch_size,
            ceiling=args.ceiling, loglik=args.loglik,
        )
    except KeyboardInterrupt:
        print(f"lite eval: interrupted; finished prompts are kept in {args.out}/{RECORDS}: run the same "
              f"command again to continue", file=sys.stderr)
        return 130
    if not result.complete or result.report is None:
        raise LiteError(f"the evaluation in {args.out} is incomplete; run the same command again to continue")
    report = result.report
    print(f"{'test set':<16}{'n':>5}{'layer cost':>12}{'compute cost':>14}{'speedup':>9}{'ROUGE-L':>9}"
          f"{'similarity':>12}{'tokens full/EE':>16}")
    rows = list(report["testsets"].items()) + [("overall", report["overall"])]
    for name, s in rows:
        def pct(x):
            return "–" if x is None else f"{100 * x:.1f}%"

        def num(x, fmt=".3f"):
            return "–" if x is None else format(x, fmt)

        tokens = f"{num(s['tokens_full'], '.1f')}/{num(s['tokens_early_exit'], '.1f')}"
        print(f"{name:<16}{s['n']:>5}{pct(s['layer_cost_improvement']):>12}{pct(s['compute_cost_improvement']):>14}"
              f"{num(s['speedup'], '.2f'):>9}{num(s['rougeL_vs_full']):>9}{num(s['similarity_vs_full']):>12}"
              f"{tokens:>16}")
    judged = report["overall"]
    if "loglik_full" in judged:
        def nats(x):
            return "–" if x is None else f"{x:.3f}"

        progress(f"full model's judgement (mean log-likelihood per token, nats): full answers "
                 f"{nats(judged['loglik_full'])}, early exit {nats(judged['loglik_early_exit'])}, gap "
                 f"{nats(judged['loglik_gap'])} over {judged['loglik_n']} prompts")
    ceiling = report.get("ceiling")
    if ceiling:
        at = ", ".join(f"{rule} {100 * v['0.95']:.1f}%" for rule, v in ceiling["saving_at_agreement"].items())
        progress(f"ceiling (teacher-forced on the full answers): oracle layer saving "
                 f"{100 * ceiling['oracle_saving']:.1f}%; at agreement >= 0.95, one cut at every exit: {at}")
    progress(f"report: {result.out}/report.md, {result.out}/report.json ({result.prompts_run} prompts "
             f"decoded now, the rest from {RECORDS})")
    return 0
