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
    is read at the end (glibc mmap threshold fixed at 1 MiB, see CHILD_ENV). Reported as the
    whole-process peak and as the peak minus the RSS right after the model and batch were loaded (what
    the step itself adds).

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
MODES = ["baseline", "lite", "lora-baseline", "lora-lite", "hf", "lite-checkpoint", "lite-plain"]
BATCH, SEQ = 8, 256
# A fixed glibc mmap threshold: every large tensor gets its own mapping and goes back to the OS when freed,
# so the peak RSS follows the peak of live tensors instead of heap fragmentation (with glibc's dynamic
# threshold the same step measured up to ~1.5 GiB apart depending on allocation order).
CHILD_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")


def rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def packed_batch(tokenizer, data: Path):
    """(8, 256) input ids and labels packed from consecutive 'ok' rows, response-only labels."""
    import torch

    from lite.training.data import read_examples, tokenize_example

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


def setup(lora: bool, threads: int):
    """The embedded default model (LoRA-wrapped when asked), its LiteModel view and the packed batch."""
    import torch

    from lite import load_model
    from lite.model import LiteModel
    from lite.training import DEFAULT_LORA_TARGETS

    torch.set_num_threads(threads)
    lm = load_model(None, dtype="float32", device="cpu")
    ids, labels = packed_batch(lm.tokenizer, DATA)
    model = lm.model
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(DEFAULT_LORA_TARGETS),
                                                 task_type="CAUSAL_LM"))
        lm = LiteModel(model, lm.tokenizer, lm.lite_config)
    model.train()
    return lm, model, ids, labels


def make_step(lm, model, ids, labels, mode: str):
    """A function doing one forward + backward of ``mode``; returns (loss, exit layers, loss mode)."""
    from lite.model.config import loss_weights
    from lite.training.losses import lite_loss

    kind = mode.removeprefix("lora-")
    layers = [lm.num_layers] if kind in ("baseline", "hf") else lm.exit_layers
    weights = dict(zip(layers, loss_weights(layers, "uniform")))
    loss_mode = {"lite-checkpoint": "checkpoint", "lite-plain": "plain"}.get(kind, "fused")

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if kind == "hf":
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        else:
            states = lm.forward_exit_states(ids, None, layers=layers)
            loss = lite_loss(states, labels, lm.lm_head, weights, mode=loss_mode).total
        loss.backward()
        return float(loss.detach())

    return step, layers, ("transformers" if kind == "hf" else loss_mode)


def child_memory(mode: str, steps: int, threads: int, warmup: int) -> dict:
    """One mode alone in this fresh process: its peak RSS (and its own step times, for reference)."""
    lm, model, ids, labels = setup(mode.startswith("lora-"), threads)
    step, layers, loss_mode = make_step(lm, model, ids, labels, mode)
    rss_loaded = rss_mb()
    cpu = []
    for i in range(steps + warmup):
        c0 = time.process_time()
        loss = step()
        if i >= warmup:
            cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {
        "mode": mode, "exit_layers": layers, "loss_mode": loss_mode, "alone_step_cpu_s": cpu,
        "peak_rss_mb": peak, "rss_after_load_mb": rss_loaded, "step_added_mb": peak - rss_loaded,
        "response_tokens": int((labels[:, 1:] != -100).sum()), "last_loss": loss,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def child_timing(modes: list[str], steps: int, threads: int, warmup: int) -> dict:
    """Steps of several modes interleaved round by round in one process, so that load from other jobs
    on the machine hits every mode alike; CPU and wall time per step. LoRA modes also time AdamW."""
    import torch

    lora = modes[0].startswith("lora-")
    lm, model, ids, labels = setup(lora, threads)
    steps_fn = {m: make_step(lm, model, ids, labels, m)[0] for m in modes}
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4) if lora else None
    cpu = {m: [] for m in modes}
    wall = {m: [] for m in modes}
    opt = []
    for r in range(steps + warmup):
        for m in modes:
            t0, c0 = time.perf_counter(), time.process_time()
            steps_fn[m]()
            t1, c1 = time.perf_counter(), time.process_time()
            if r >= warmup:
                cpu[m].append(c1 - c0)
                wall[m].append(t1 - t0)
        if optim is not None:
            c0 = time.process_time()
            optim.step()
            opt.append(time.process_time() - c0)
    return {"cpu": cpu, "wall": wall, "optimizer_cpu_s": statistics.median(opt) if opt else None,
            "torch_threads": torch.get_num_threads()}


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# Training step: LITE loss vs baseline (embedded default model)",
        "",
        f"Command: `{result['command']}`  ",
        (f"Model: SmolLM2-135M-Instruct (L=30, vocab 49152, tied head), float32, CPU ({result['cpu_threads']} "
         f"cores shared with other jobs, {result['threads']} torch thread). Batch: {BATCH} x {SEQ} tokens packed "
         f"from real alpaca-libre 'ok' rows, {result['response_tokens']} response positions. Step = forward + "
         f"backward. Time: CPU seconds per step, modes interleaved round by round in one process "
         f"({result['warmup']} warm-up round(s), median of {result['steps']} rounds); the ratio is the median "
         f"of the per-round ratios to the baseline. Peak memory: ru_maxrss of a fresh subprocess per mode "
         f"(glibc mmap threshold fixed at 1 MiB so that freed tensors leave the RSS)."),
        "",
        ("| mode | exits | loss | step CPU (s) | time vs baseline | wall (s) | peak RSS (MiB) | peak vs baseline "
         "| added by step (MiB) |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["modes"]:
        cpu = f"{m['step_cpu_s_median']:.1f}" if "step_cpu_s_median" in m else "n/a"
        wall = f"{m['step_wall_s_median']:.1f}" if "step_wall_s_median" in m else "n/a"
        t_ratio = f"{m['time_ratio']:.2f}x" if "time_ratio" in m else "n/a"
        m_ratio = f"{m['memory_ratio']:.2f}x" if "memory_ratio" in m else "n/a"
        lines.append(
            f"| {m['mode']} | {len(m['exit_layers'])} | {m['loss_mode']} | {cpu} | {t_ratio} | {wall} | "
            f"{m['peak_rss_mb']:.0f} | {m_ratio} | {m['step_added_mb']:.0f} |"
        )
    t = result.get("targets")
    if t:
        lines += [
            "",
            (f"Targets (lite vs baseline): step time <= 1.25x: **{'met' if t['time_met'] else 'not met'}** "
             f"({t['time_ratio']:.2f}x); peak memory <= 1.2x: **{'met' if t['memory_met'] else 'not met'}** "
             f"({t['memory_ratio']:.2f}x)."),
        ]
    if result.get("lora_optimizer_cpu_s") is not None:
        lines += ["", f"LoRA AdamW update: {result['lora_optimizer_cpu_s']:.2f} CPU s per step."]
    lines += ["", result.get("note", ""), ""]
    path.write_text("\n".join(lines))


def _baseline_of(mode: str) -> str:
    return "lora-baseline" if mode.startswith("lora-") else "baseline"


def save(result: dict) -> None:
    """Ratios, then JSON and markdown; called after every measurement so a long run leaves partial results."""
    by = {m["mode"]: m for m in result["modes"]}
    for m in result["modes"]:
        base = by.get(_baseline_of(m["mode"]))
        if base is None:
            continue
        m["memory_ratio"] = m["peak_rss_mb"] / base["peak_rss_mb"]
        if "step_cpu_s_all" in m and "step_cpu_s_all" in base:
            m["time_ratio"] = statistics.median(a / b for a, b in zip(m["step_cpu_s_all"], base["step_cpu_s_all"]))
    lite = by.get("lite", {})
    if "time_ratio" in lite:
        result["targets"] = {"time_ratio": lite["time_ratio"], "time_met": lite["time_ratio"] <= 1.25,
                             "memory_ratio": lite["memory_ratio"], "memory_met": lite["memory_ratio"] <= 1.2}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_step.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, RESULTS / "train_step.md")


def _run_child(args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--threads", str(args.threads), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=CHILD_ENV)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--timing", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (each mode once per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    parser.add_argument("--memory-steps", type=int, default=1, help="steps of each memory subprocess")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: CPU time then measures work, not contention)")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the markdown from the JSON")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes to run")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_memory(args.child, args.memory_steps, args.threads, 0)))
        return
    if args.timing:
        print(json.dumps(child_timing(args.timing.split(","), args.steps, args.threads, args.warmup)))
        return
    out = RESULTS / "train_step.json"
    note = json.loads(out.read_text()).get("note", "") if out.exists() else ""  # hand-written, kept
    if args.markdown_only:
        save(json.loads(out.read_text()))
        return
    modes = args.modes.split(",")
    result = {
        "benchmark": "train_step", "command": "python benchmarks/bench_train_step.py " + " ".join(sys.argv[1:]),
        "platform": platform.platform(), "cpu_threads": os.cpu_count(), "threads": args.threads,
        "steps": args.steps, "warmup": args.warmup, "batch": [BATCH, SEQ], "data": DATA.name,
        "response_tokens": None, "modes": [], "note": note,
    }
    for mode in modes:
        print(f"[bench] memory of {mode} ...", file=sys.stderr, flush=True)
        m = _run_child(args, "--child", mode, "--memory-steps", str(args.memory_steps))
        result["modes"].append(m)
        result["response_tokens"] = m["response_tokens"]
        save(result)
        print(f"[bench] {mode}: peak {m['peak_rss_mb']:.0f} MiB", file=sys.stderr, flush=True)
    by = {m["mode"]: m for m in result["modes"]}
    for group in ([m for m in modes if not m.startswith("lora-")], [m for m in modes if m.startswith("lora-")]):
        if not group:
            continue
        print(f"[bench] timing {group} interleaved ...", file=sys.stderr, flush=True)
        t = _run_child(args, "--timing", ",".join(group), "--steps", str(args.steps), "--warmup", str(args.warmup))
        for mode in group:
            by[mode].update(step_cpu_s_all=t["cpu"][mode], step_cpu_s_median=statistics.median(t["cpu"][mode]),
                            step_wall_s_all=t["wall"][mode], step_wall_s_median=statistics.median(t["wall"][mode]))
        if t["optimizer_cpu_s"] is not None:
            result["lora_optimizer_cpu_s"] = t["optimizer_cpu_s"]
        save(result)
        cpu = ", ".join(f"{m} {by[m]['step_cpu_s_median']:.1f} s" for m in group)
        print(f"[bench] CPU per step: {cpu}", file=sys.stderr, flush=True)
    print(json.dumps(result.get("targets")))


if __name__ == "__main__":
    main()
