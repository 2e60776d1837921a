"""`lite eval` at batch 8 against batch 1: wall time of the whole evaluation and what the answers lose.

Runs :func:`lite.evaluation.evaluate` twice in one process on the same model and prompts (the first
``--limit`` prompts of each of the paper's four test sets, ``--max-new-tokens`` each, greedy): once with
``--batch-size 1`` and once with ``--batch-size B``. Each run decodes the full model, the exit policy and
transformers' ``generate`` (at its own batch size), exactly what ``lite eval`` does, into a fresh folder
under ``--work`` (removed afterwards). Reported, all in one run on one machine:

* wall seconds of each whole evaluation (model loading included) and their ratio (target: >= 3x at B = 8
  with 20 prompts per set);
* quality kept: the share of prompts whose full-model answer and whose early-exit answer are token for token
  the same at batch B as at batch 1 (batched float products may flip near-ties, more so in bfloat16), and
  each run's headline figures from its report (layer cost improvement, similarity to the full model,
  speedup over HF ``generate`` at the same batch size).

Device-agnostic: ``--device`` and ``--dtype`` go to both runs (default: the accelerator torch reports, and
the decode default ``auto``).

    .venv/bin/python benchmarks/bench_eval_batch.py --model smollm2-135m-lite --limit 20 \\
        --out benchmarks/results/eval_batch.md
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from lite.evaluation import evaluate
from lite.files import write_atomic, write_json_atomic

REPO = Path(__file__).resolve().parent.parent


def _records(folder: Path) -> dict[tuple[str, str], dict]:
    out = {}
    for line in (folder / "records.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("role") == "main" and "full" in record:
            out[(record["testset"], record["id"])] = record
    return out


def run(args: argparse.Namespace, batch: int, work: Path, limit: int | None = None, name: str = "") -> tuple[float, Path, dict]:
    out = work / (name or f"batch{batch}")
    start = time.perf_counter()
    evaluate(args.model, args.testsets, out=out, limit=limit or args.limit, exit=args.exit,
             max_new_tokens=args.max_new_tokens, dtype=args.dtype, device=args.device,
             batch_size=batch, log=lambda m: print(f"[bench_eval_batch] {m}", file=sys.stderr))
    seconds = time.perf_counter() - start
    return seconds, out, json.loads((out / "report.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-lite")
    p.add_argument("--testsets", nargs="+", default=["vicuna", "koala", "wizardlm", "self_instruct"])
    p.add_argument("--limit", type=int, default=20, help="prompts per test set (default 20)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--exit", default="auto", help="the early-exit policy evaluated (lite eval --exit; default: the model's own)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default=None, help="folder for the two evaluations (default: a temporary one)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_batch.md"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="lite-bench-eval-"))
    try:
        run(args, args.batch_size, work, limit=1, name="warm-up")  # one-time costs (imports, kernels, embedder)
        one_s, one_dir, one_report = run(args, 1, work)
        big_s, big_dir, big_report = run(args, args.batch_size, work)
        one, big = _records(one_dir), _records(big_dir)
        keys = sorted(one.keys() & big.keys())
        policy = next(iter(one[keys[0]]["runs"]))
        same_full = sum(one[k]["full"]["token_ids"] == big[k]["full"]["token_ids"] for k in keys)
        same_exit = sum(one[k]["runs"][policy]["token_ids"] == big[k]["runs"][policy]["token_ids"] for k in keys)
        same_layers = sum(one[k]["runs"][policy]["exit_layers"] == big[k]["runs"][policy]["exit_layers"] for k in keys)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "command": " ".join(["python", "benchmarks/bench_eval_batch.py"] + (argv if argv is not None else sys.argv[1:])),
        "model": args.model, "testsets": args.testsets, "limit": args.limit, "prompts": len(keys),
        "max_new_tokens": args.max_new_tokens, "exit": args.exit, "policy_key": policy, "dtype": args.dtype,
        "device": args.device or "default", "torch_threads": torch.get_num_threads(), "cpus": platform.machine(),
        "platform": platform.platform(), "torch": torch.__version__,
        "batch": args.batch_size, "seconds_batch_1": round(one_s, 1), "seconds_batch_b": round(big_s, 1),
        "speedup": round(one_s / big_s, 2), "identical_full_answers": same_full,
        "identical_early_exit_answers": same_exit, "identical_exit_layers": same_layers,
        "report_batch_1": one_report, "report_batch_b": big_report,
    }
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), report)
    md = [
        "# `lite eval` at batch {b} against batch 1".format(b=args.batch_size), "",
        f"Command: `{report['command']}`  ",
        f"Model {args.model}, exit `{args.exit}`, {len(keys)} prompts ({args.limit} per set of "
        f"{', '.join(args.testsets)}), {args.max_new_tokens} new tokens, greedy, dtype {args.dtype}, "
        f"torch threads {report['torch_threads']}; both evaluations in one process, one after the other "
        "(full model, the exit policy and HF `generate` each, model loading included), after an untimed "
        "warm-up evaluation of one prompt per set.", "",
        "| batch | wall seconds | speedup | full answers identical to batch 1 | early-exit answers identical "
        "| exit layers identical |",
        "|---|---|---|---|---|---|",
        f"| 1 | {one_s:.1f} | 1.00x | - | - | - |",
        f"| {args.batch_size} | {big_s:.1f} | {one_s / big_s:.2f}x | {same_full}/{len(keys)} | "
        f"{same_exit}/{len(keys)} | {same_layers}/{len(keys)} |", "",
        "An answer that differs at batch B differs by float rounding of batched products against single-row "
        "ones (a near-tie of two logits, or a confidence at its threshold); the reports' quality figures "
        "for both runs are in the JSON beside this file.", "",
    ]
    write_atomic(out, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
