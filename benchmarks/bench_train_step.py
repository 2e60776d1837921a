"""One training step with the LITE loss against one baseline step, on the embedded default model.

What is measured (all modes see the same batch):
  * batch: 8 sequences x 256 tokens, packed from real Alpaca rows of alpaca_libre_v1.jsonl (status "ok"),
    Alpaca template, labels only on response tokens (+EOS), exactly as ``lite train`` tokenises them;
  * step: forward + backward (no optimiser update; LoRA modes also report the AdamW update separately),
    float32 weights, full fine-tuning unless the mode says LoRA;
  * time: median of ``--steps`` timed steps after one warm-up step, as CPU time of the process
    (``time.process_time``) with ``--threads`` torch threads (default 1). The machine this ran on is
    shared by several jobs, so wall clock mostly measures the neighbours; CPU time of a single-threaded
    process measures the work. Wall clock is recorded too;
  * peak memory: each mode runs in its own fresh subprocess; its peak resident set size (``ru_maxrss``)
    is read at the end. Reported as the whole-process peak and as the peak minus the RSS right after
    the model and batch were loaded (what the step itself adds).

Modes:
  lite            default exits, LITE loss (fused chunked head), what ``lite train`` does
  baseline        final layer only through the same loss code (``lite train --baseline``)
  hf              transformers' own causal-LM loss (``model(ids, labels=...)``, full logits)
  lite-checkpoint LITE loss with torch.utils.checkpoint per chunk (head recomputed in backward)
  lite-plain      LITE loss with plain autograd (every chunk's logits kept for backward)
  lora-lite, lora-baseline: the same with a rank-16 LoRA adapter on q,k,v,o,gate,up,down

Run: ``python benchmarks/bench_train_step.py`` (writes benchmarks/results/train_step.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "train" / "alpaca_libre_v1.jsonl"
RESULTS = REPO / "benchmarks" / "results"
MODES = ["lite", "baseline", "lora-lite", "lora-baseline", "lite-checkpoint", "hf", "lite-plain"]
BATCH, SEQ = 8, 256


def rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def packed_batch(tokenizer, data: Path):
    """(8, 256) input ids and labels packed from consecutive 'ok' rows, response-only labels."""
    import torch

    from lite.data import read_examples, tokenize_example

    examples, _ = read_examples([str(data)], ["status=ok"])
    ids, labels, rows = [], [], iter(examples)
    for _ in range(BATCH):
        seq_ids, seq_labels = [], []
        while len(seq_ids) < SEQ:
            item = tokenize_example(tokenizer, next(rows), "alpaca", SEQ)
            seq_ids += item["input_ids"]
            seq_labels += item["labels"]
        ids.append(seq_ids[:SEQ])
        labels.append(seq_labels[:SEQ])
    return torch.tensor(ids), torch.tensor(labels)


def child(mode: str, steps: int, threads: int, warmup: int) -> dict:
    """Run one mode in this process and return its measurements."""
    import torch

    from lite import load_model
    from lite.config import loss_weights
    from lite.losses import lite_loss

    torch.set_num_threads(threads)
    lm = load_model(None, dtype="float32", device="cpu")
    ids, labels = packed_batch(lm.tokenizer, DATA)
    model = lm.model
    lora = mode.startswith("lora-")
    if lora:
        from peft import LoraConfig, get_peft_model

        from lite.model import LiteModel
        from lite.training import DEFAULT_LORA_TARGETS

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(DEFAULT_LORA_TARGETS),
                                                 task_type="CAUSAL_LM"))
        lm = LiteModel(model, lm.tokenizer, lm.lite_config)
    model.train()
    L = lm.num_layers
    kind = mode.removeprefix("lora-")
    layers = [L] if kind == "baseline" else lm.exit_layers
    weights = dict(zip(layers, loss_weights(layers, "uniform")))
    loss_mode = {"lite-checkpoint": "checkpoint", "lite-plain": "plain"}.get(kind, "fused")
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4) if lora else None
    rss_loaded = rss_mb()

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if kind == "hf":
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        else:
            states = lm.forward_exit_states(ids, None, layers=layers)
            loss = lite_loss(states, labels, lm.lm_head, weights, mode=loss_mode).total
        loss.backward()
        return float(loss.detach())

    times, cpu_times, opt_times = [], [], []
    for i in range(steps + warmup):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        t1, c1 = time.perf_counter(), time.process_time()
        if optim is not None:
            optim.step()
            opt_times.append(time.process_time() - c1)
        if i >= warmup:  # warm-up steps settle allocators and kernels
            times.append(t1 - t0)
            cpu_times.append(c1 - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {
        "mode": mode, "exit_layers": layers, "loss_mode": loss_mode if kind != "hf" else "transformers",
        "step_cpu_s_median": statistics.median(cpu_times), "step_cpu_s_all": cpu_times,
        "step_wall_s_median": statistics.median(times), "step_wall_s_all": times,
        "optimizer_cpu_s": statistics.median(opt_times[1:] or opt_times) if opt_times else None,
        "peak_rss_mb": peak, "rss_after_load_mb": rss_loaded, "step_added_mb": peak - rss_loaded,
        "response_tokens": int((labels[:, 1:] != -100).sum()), "last_loss": loss,
        "trainable_params": sum(p.numel() for p in params), "torch_threads": torch.get_num_threads(),
    }


def write_markdown(result: dict, path: Path) -> None:
    r = {m["mode"]: m for m in result["modes"]}
    lines = [
        "# Training step: LITE loss vs baseline (embedded default model)",
        "",
        f"Command: `{result['command']}`  ",
        (f"Model: SmolLM2-135M-Instruct (L=30, vocab 49152, tied head), float32, CPU ({result['cpu_threads']} "
         f"cores shared with other jobs; {result['threads']} torch thread per mode). Batch: {BATCH} x {SEQ} "
         f"tokens packed from real alpaca-libre 'ok' rows, {result['response_tokens']} response positions. "
         f"Step = forward + backward, median of {result['steps']} timed step(s) after {result['warmup']} "
         f"warm-up step(s), CPU time of the process. Peak memory = ru_maxrss of a fresh subprocess per mode."),
        "",
        ("| mode | exits | step CPU (s) | time vs baseline | wall (s) | peak RSS (MiB) | peak vs baseline "
         "| added by step (MiB) |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in result["modes"]:
        base = r.get("lora-baseline" if m["mode"].startswith("lora-") else "baseline")
        t_ratio = f"{m['step_cpu_s_median'] / base['step_cpu_s_median']:.2f}x" if base else "n/a"
        m_ratio = f"{m['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if base else "n/a"
        lines.append(
            f"| {m['mode']} | {len(m['exit_layers'])} | {m['step_cpu_s_median']:.1f} | {t_ratio} | "
            f"{m['step_wall_s_median']:.1f} | {m['peak_rss_mb']:.0f} | {m_ratio} | {m['step_added_mb']:.0f} |"
        )
    t = result.get("targets")
    if t:
        lines += [
            "",
            (f"Targets: LITE step time <= 1.25x baseline: **{'met' if t['time_met'] else 'not met'}** "
             f"({t['time_ratio']:.2f}x); peak memory <= 1.2x: **{'met' if t['memory_met'] else 'not met'}** "
             f"({t['memory_ratio']:.2f}x)."),
        ]
    lines += ["", result.get("note", ""), ""]
    path.write_text("\n".join(lines))


def save(result: dict) -> None:
    """Write JSON and markdown; called after every mode so a long run leaves its partial results."""
    by = {m["mode"]: m for m in result["modes"]}
    if "lite" in by and "baseline" in by:
        time_ratio = by["lite"]["step_cpu_s_median"] / by["baseline"]["step_cpu_s_median"]
        mem_ratio = by["lite"]["peak_rss_mb"] / by["baseline"]["peak_rss_mb"]
        result["targets"] = {"time_ratio": time_ratio, "time_met": time_ratio <= 1.25,
                             "memory_ratio": mem_ratio, "memory_met": mem_ratio <= 1.2}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_step.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, RESULTS / "train_step.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per mode (default 1: CPU time then measures work, not contention)")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the markdown from the JSON")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes to run")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.threads, args.warmup)))
        return
    out = RESULTS / "train_step.json"
    note = json.loads(out.read_text()).get("note", "") if out.exists() else ""  # hand-written, kept
    if args.markdown_only:
        result = json.loads(out.read_text())
        save(result)
        return
    result = {
        "benchmark": "train_step", "command": "python benchmarks/bench_train_step.py " + " ".join(sys.argv[1:]),
        "platform": platform.platform(), "cpu_threads": os.cpu_count(), "threads": args.threads,
        "steps": args.steps, "warmup": args.warmup, "batch": [BATCH, SEQ], "data": DATA.name,
        "response_tokens": None, "modes": [], "note": note,
    }
    for mode in args.modes.split(","):
        print(f"[bench] {mode} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(args.steps),
                               "--threads", str(args.threads), "--warmup", str(args.warmup)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        result["modes"].append(m)
        result["response_tokens"] = m["response_tokens"]
        save(result)
        print(f"[bench] {mode}: {m['step_cpu_s_median']:.1f} CPU s, peak {m['peak_rss_mb']:.0f} MiB",
              file=sys.stderr, flush=True)
    print(json.dumps(result.get("targets")))


if __name__ == "__main__":
    main()
