"""One training step of exit modules on a frozen backbone (self-distillation), three ways, on the default model.

What ``lite train --exit-modules affine --targets distill --bf16`` does per step, on one real batch:
  * batch: 8 alpaca-libre "ok" rows in the chat format, each answer cut to ``--answer-tokens`` (64, the
    own-answer budget of scripts/train_exit_modules.sh), labels on the answer (+EOS) only; with
    ``--own-answers FILE`` the answers are the model's own from the run's cache, as the run trains on;
  * exits 15, 19, 23, 26 with affine (or ``--kind mlp``) modules, KL toward the final layer; as under
    ``--bf16``, the backbone's forward runs under bf16 autocast and hands float32 states on, and the
    modules, head and KL run in float32 (``--loss-dtype bfloat16``: under bf16 autocast, a what-if);
  * step = forward + backward + AdamW update of the modules.

Modes, interleaved round by round in one process (same batch, same modules):
  checkpoint  what lite did before: backbone forward, modules over every position, KL with each head chunk
              recomputed in backward (torch.utils.checkpoint)
  fused       backbone forward, modules and head at the answer positions only, fused KL (gradient of the
              logits formed in forward: softmax - teacher)
  cached      the same as fused from the backbone's states kept in memory (StateCache): what every epoch
              after the first costs

Time: CPU seconds per step (``time.process_time``, ``--threads`` torch threads, default 1: the machine is
shared, and CPU time of one thread measures the work), median over rounds after warm-up; the ratio is the
median of per-round ratios. Quality: the loss of each mode on the same batch and modules (the three compute
the same KL up to rounding).

Run (the committed results; FILE = the run's --own-answers-cache):
    python benchmarks/bench_module_step.py --kind mlp --own-answers FILE --out benchmarks/results/module_step_mlp
(writes the .json and .md beside --out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "train" / "alpaca_libre_v1.jsonl"
RESULTS = REPO / "benchmarks" / "results"
MODES = ["checkpoint", "fused", "cached"]
EXITS = [15, 19, 23, 26]


def batch(tokenizer, rows: int, answer_tokens: int, own_answers: str | None = None):
    """(B, T) right-padded ids, attention mask and labels from the first ``rows`` usable 'ok' rows, their
    responses the model's own answers when ``own_answers`` (a ``lite train --own-answers-cache`` file) has
    them, as in the run."""
    import dataclasses

    from lite.training.data import PadCollator, read_examples, tokenize_example

    examples, _ = read_examples([str(DATA)], ["status=ok"])
    answers = {}
    if own_answers:
        with open(own_answers, encoding="utf-8") as f:
            answers = {e["row_id"]: e["ids"] for e in map(json.loads, f)}
        examples = [dataclasses.replace(e, response_ids=tuple(answers[e.row_id])) for e in examples
                    if e.row_id in answers]
    items = []
    for example in examples:
        item = tokenize_example(tokenizer, example, "chat", 320)
        if item is None:
            continue
        start = next(i for i, t in enumerate(item["labels"]) if t != -100)
        stop = min(len(item["input_ids"]), start + answer_tokens + 1)
        items.append({"input_ids": item["input_ids"][:stop], "labels": item["labels"][:stop]})
        if len(items) == rows:
            break
    return PadCollator(tokenizer.pad_token_id)(items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="affine", choices=["affine", "mlp"])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--loss-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="precision of the modules, head and KL: float32 as lite train --bf16 runs them "
                             "(accelerate autocasts the model's forward only), or under bf16 autocast")
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--own-answers", default=None, metavar="FILE",
                        help="the own-answers cache of the run (lite train --own-answers-cache): train on those "
                             "answers, as the run does (default: the dataset's responses, cut)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "module_step"))
    args = parser.parse_args(argv)

    import torch

    from lite import load_model
    from lite.model.adapter import LiteModel
    from lite.model.exit_modules import ExitModules
    from lite.training.hf_trainer import StateCache
    from lite.training.losses import distill_loss, distill_rows_loss, response_mask

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = load_model(None, dtype="float32", device="cpu")
    base.model.requires_grad_(False).eval()
    modules = ExitModules(args.kind, EXITS, base.hidden_size)
    lm = LiteModel(base.model, base.tokenizer, base.lite_config, exit_modules=modules)
    L = lm.num_layers
    weights = {k: 1.0 for k in EXITS}
    inputs = batch(lm.tokenizer, args.rows, args.answer_tokens, args.own_answers)
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    optim = torch.optim.AdamW(modules.parameters(), lr=1e-3)
    no_position = torch.empty(0, dtype=torch.long)

    def loss_precision():
        """The modules, the head and the KL: float32 as in lite train, or under bf16 autocast (what it could be)."""
        if args.loss_dtype == "bfloat16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backbone():
        """As lite train --bf16 runs it: accelerate autocasts the model's forward only and hands its outputs
        back in float32 (the losses then run in float32, unless --loss-dtype bfloat16)."""
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False,
                           logits_to_keep=no_position).hidden_states
        return tuple(h.float() for h in out)

    hidden = backbone()
    cache = StateCache(2**34)
    positions = response_mask(labels)
    cache.put(list(range(len(ids))), positions.sum(1).tolist(),
              {k: hidden[k][:, :-1][positions] for k in (*EXITS, L)}, labels[:, 1:][positions])
    del hidden

    def step(mode: str) -> float:
        optim.zero_grad(set_to_none=True)
        with loss_precision():
            if mode == "checkpoint":
                hidden = backbone()
                states = {k: lm.exit_normed(hidden[k], k, direct=True) for k in EXITS}
                loss = distill_loss(states, hidden[L], labels, lm.lm_head, weights, mode="checkpoint")
            else:
                if mode == "fused":
                    hidden = backbone()
                    m = response_mask(labels)
                    raw = {k: hidden[k][:, :-1][m] for k in (*EXITS, L)}
                else:
                    raw, _targets = cache.get(list(range(len(ids))))
                rows = {k: lm.exit_normed(raw[k], k, direct=True) for k in EXITS}
                loss = distill_rows_loss(rows, raw[L], lm.lm_head, weights, mode="fused")
        loss.total.backward()
        optim.step()
        return float(loss.total.detach())

    # the loss of each mode on the same modules (no update between): the quality check
    snapshot = {k: v.clone() for k, v in modules.state_dict().items()}
    state = optim.state_dict()
    losses = {}
    for mode in MODES:
        modules.load_state_dict(snapshot)
        optim.load_state_dict(state)
        losses[mode] = step(mode)
    cpu = {m: [] for m in MODES}
    wall = {m: [] for m in MODES}
    for r in range(args.rounds + args.warmup):
        for mode in MODES:
            t0, c0 = time.perf_counter(), time.process_time()
            step(mode)
            if r >= args.warmup:
                cpu[mode].append(time.process_time() - c0)
                wall[mode].append(time.perf_counter() - t0)
    result = {
        "command": "python " + " ".join(["benchmarks/bench_module_step.py", *(argv or sys.argv[1:])]),
        "kind": args.kind, "loss_dtype": args.loss_dtype, "rows": len(ids),
        "responses": "own answers" if args.own_answers else "dataset",
        "tokens": int(mask.sum()), "answer_positions": int(positions.sum()), "threads": args.threads,
        "rounds": args.rounds, "warmup": args.warmup, "cpu": platform.processor(),
        "modes": {m: {"step_cpu_s_median": statistics.median(cpu[m]),
                      "step_wall_s_median": statistics.median(wall[m]), "cpu_s": cpu[m], "loss_first_step": losses[m],
                      "time_vs_checkpoint": statistics.median(c / b for c, b in zip(cpu[m], cpu["checkpoint"]))}
                  for m in MODES},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Exit-module training step ({args.kind}, self-distillation, backbone under bf16 autocast, "
        f"losses in {args.loss_dtype}): three ways",
        "",
        f"Command: `{result['command']}`  ",
        (f"SmolLM2-135M-Instruct frozen, {args.kind} modules at layers {EXITS}, KL toward layer {L}. One batch: "
         f"{result['rows']} alpaca-libre rows (chat format; responses: {result['responses']}), "
         f"{result['tokens']} tokens, "
         f"{result['answer_positions']} answer positions (answers cut to {args.answer_tokens} tokens). Step = "
         f"forward + backward + AdamW. CPU seconds per step with {args.threads} torch thread(s), modes "
         f"interleaved round by round ({args.warmup} warm-up, median of {args.rounds}); ratio = median of the "
         f"per-round ratios. Loss: each mode's KL on the same batch and modules before any update."),
        "",
        "| mode | step CPU (s) | vs checkpoint | wall (s) | loss (nats) |",
        "|---|---|---|---|---|",
    ]
    for m in MODES:
        r = result["modes"][m]
        lines.append(f"| {m} | {r['step_cpu_s_median']:.2f} | {r['time_vs_checkpoint']:.2f}x | "
                     f"{r['step_wall_s_median']:.2f} | {r['loss_first_step']:.4f} |")
    lines += ["", ("checkpoint: lite before (backbone, modules at every position, KL recomputing each head chunk "
                   "in backward). fused: backbone, then modules and head at answer positions, gradient of the "
                   "logits formed in forward. cached: fused from the backbone states kept by StateCache (epochs "
                   "after the first).")]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
