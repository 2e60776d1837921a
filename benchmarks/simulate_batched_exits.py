"""What batching does to early exit's savings: a projection from measured costs, for engines lite cannot
run here (vLLM, SGLang on GPUs).

Inputs, all committed results of the shipped default (``smollm2-135m-lite``):

* the per-token exit layers of its default policy on the paper's four test sets
  (``eval_default_modules/report.json``, ``overall.exit_layer_histogram``);
* what one decode step costs over b rows against one row, from lite's engine with exits off
  (``batch.json``: c(b) = b * tok/s(1) / tok/s(b), measured at b = 1, 8, 16, fitted by c(b) = 1 + r (b - 1)
  at the largest);
* the LM head in decoder blocks (``speculative.json``, ``unit_ms``: head / block at one position).

The cost model is lite's own (:func:`lite.decoding.cost.batch_step_price`, which ``--exit auto`` decides by);
here without the checks' cost. Cost of one step over a batch of B rows, in blocks of one row (c(b) = cost of a block over b rows, relative
to one row; head H blocks; exits read the head over ``--exit-vocab`` of its ``--vocab`` rows, the final layer
the whole head; K/V of a skipped layer by state copy costs ``--kv-fraction`` of that layer):

* full model:   c(B) * (L + H)
* ride along:   c(B) * max exit over the rows + kv * c(B) * (L - max exit), + heads (every row runs every
  block until the deepest row leaves, so rows that left get their K/V there by riding along; above the
  deepest exit every row's K/V is filled; CALM-style batch-synchronous)
* regroup:      sum over blocks l of c(rows still running at l) + kv * c(rows that left before l), + heads
  (each row leaves at its own layer, the rest are regrouped: DREX-style)
* heads: per exit layer, c(rows leaving there) * H * (exit vocab / vocab), at L the full head.

Rows and tokens are drawn independently from the histogram (real exits correlate: easy spans come together,
which helps ride-along). Expectations are exact (binomial sums), not sampled. Gate evaluations (a dot product
per exit) and Python overhead are not counted. Three cost curves: measured (this CPU), memory-bound (a step
costs the same for any b, the small-batch GPU regime: r = 0) and compute-bound (c(b) = b: r = 1).

A second table prices the other way an engine can use the exits: a draft model made of the first k layers,
their exit module and the head (vLLM's draft-model proposer, SGLang's STANDALONE), verified by the whole
model, which runs layers 1..k again. With acceptance a per draft (taken as exit k's agreement with the final
layer on the model's own answers, ``results/reproduce/agreement.json``), g drafts per round and a draft step
costing c = (k + H) / (L + H) of a full step, a round emits (1 - a^(g+1)) / (1 - a) tokens for g * c + 1
full steps (Leviathan et al. 2023), if verifying g + 1 positions costs one step (memory-bound).

Run: ``python benchmarks/simulate_batched_exits.py --out benchmarks/results/batched_exits_simulation.md``
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from lite.decoding.cost import StepPrices, batch_step_price

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 2, 4, 8, 16, 32, 64)


def row_costs(batch_rows: list[dict]) -> tuple[float, list[tuple[int, float]]]:
    """The row cost of :class:`lite.decoding.cost.StepPrices` from lite's batched engine with exits off: c(b)
    = b * tps(1) / tps(b) at each measured batch size, fitted by c(b) = 1 + row_cost * (b - 1) at the largest."""
    tps = {r["batch"]: r["engine_off_tps"] for r in batch_rows}
    points = sorted((b, b * tps[1] / tps[b]) for b in tps)
    b, c = points[-1]
    return (c - 1) / (b - 1), points


def deepest_exit(hist: dict[int, int], L: int, B: int) -> float:
    """E[the deepest exit of B rows] = sum over blocks l of P(some row reaches l)."""
    total, below, depth = sum(hist.values()), 0.0, 0.0
    for layer in range(1, L + 1):
        depth += 1.0 - below ** B
        below += hist.get(layer, 0) / total
    return depth


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval-report", default=str(RESULTS / "eval_default_modules" / "report.json"))
    ap.add_argument("--batch", default=str(RESULTS / "batch.json"))
    ap.add_argument("--speculative", default=str(RESULTS / "speculative.json"))
    ap.add_argument("--agreement", default=str(RESULTS.parent.parent / "results" / "reproduce" / "agreement.json"))
    ap.add_argument("--agreement-model", default="smollm2-135m-lite")
    ap.add_argument("--exit-vocab", type=int, default=4096, help="rows of the head an exit reads (default 4096)")
    ap.add_argument("--vocab", type=int, default=49152, help="rows of the whole head (SmolLM2: 49152)")
    ap.add_argument("--kv-fraction", type=float, default=None,
                    help="cost of a skipped layer's K/V fill against the whole layer; default: the weights' share "
                         "of SmolLM2-135M (k and v projections of 576 x 192 against the block's)")
    ap.add_argument("--out", default=str(RESULTS / "batched_exits_simulation.md"))
    args = ap.parse_args(argv)

    report = json.loads(Path(args.eval_report).read_text())
    hist = {int(k): v for k, v in report["overall"]["exit_layer_histogram"].items()}
    L = report["model"]["num_layers"]
    batch = json.loads(Path(args.batch).read_text())
    unit = json.loads(Path(args.speculative).read_text())["unit_ms"]
    head = unit["head_ms_1"] / unit["block_ms_1"]
    exit_head = head * args.exit_vocab / args.vocab
    if args.kv_fraction is None:
        d, kv_dim, ffn = 576, 192, 1536  # SmolLM2-135M: hidden, 3 KV heads x 64, MLP width
        block = 2 * d * d + 2 * d * kv_dim + 3 * d * ffn
        args.kv_fraction = 2 * d * kv_dim / block
    measured, points = row_costs(batch["rows"])
    curves = {"measured (this CPU)": measured, "memory-bound": 0.0, "compute-bound": 1.0}  # row costs
    rates = {k: v / sum(hist.values()) for k, v in hist.items() if k < L}
    mean_exit = sum(k * v for k, v in hist.items()) / sum(hist.values())

    lines = ["# What batching does to early exit: a projection from measured costs", "",
             f"Made by `python benchmarks/simulate_batched_exits.py --out {args.out}` on "
             f"{datetime.date.today().isoformat()} from committed results of `smollm2-135m-lite`: exit layers of its "
             f"default policy (`{Path(args.eval_report).relative_to(RESULTS.parent.parent)}`, "
             f"{sum(hist.values())} tokens of 80 prompts, mean exit {mean_exit:.1f} of {L}, float32, batch 8 with "
             f"answers identical to batch 1), step cost against batch size from lite's engine with exits off "
             f"(`{Path(args.batch).relative_to(RESULTS.parent.parent)}`, float32, 2 threads: c(b) = "
             + ", ".join(f"{c:.2f} at {b}" for b, c in points) + f"; r = {measured:.3f}), and the head = "
             f"{head:.1f} blocks (`{Path(args.speculative).relative_to(RESULTS.parent.parent)}`). Exits read "
             f"{args.exit_vocab} of {args.vocab} head rows; a skipped layer's K/V fill costs "
             f"{args.kv_fraction:.3f} of the layer. See the script's docstring for the cost model.", "",
             "Exit histogram: " + ", ".join(f"layer {k}: {v}" for k, v in sorted(hist.items())) + ".", "",
             "Predicted speedup of a decode step over the full model at the same batch (> 1 is faster):", "",
             "| batch | E[deepest exit] | " + " | ".join(f"{n}: ride along / regroup" for n in curves) + " |",
             "|---|---|" + "---|" * len(curves)]
    rows = []
    for B in BATCHES:
        cells, depth = [], None
        depth = deepest_exit(hist, L, B)
        for name, row_cost in curves.items():
            # gate checks (a dot product per exit) and Python overhead not counted: check 0, overhead 0
            prices = StepPrices(head=head, exit_read=exit_head, check=0.0, kv_fill=args.kv_fraction, overhead=0.0,
                                row_cost=row_cost)
            ride, full = batch_step_price(rates, sorted(rates), L, B, prices, ride=B > 1)
            regroup, _ = batch_step_price(rates, sorted(rates), L, B, prices, ride=False)
            cells.append(f"{full / ride:.2f}x / {full / regroup:.2f}x")
            rows.append({"batch": B, "curve": name, "full": full, "ride": ride, "regroup": regroup, "max_exit": depth})
        lines.append(f"| {B} | {depth:.1f} | " + " | ".join(cells) + " |")
    measured_rows = {r["batch"]: r for r in batch["rows"]}
    lines += ["", "Measured (`batch.json`, by the batched engine before the engines became one; 16 Vicuna prompts, mean exit "
              f"{batch['rows'][0]['mean_exit_layer']:.1f}), exits on against off: "
              + "; ".join(f"batch {b}: ride along {r['exit_vs_off']:.2f}x, regroup {r['regroup_vs_off']:.2f}x"
                          for b, r in sorted(measured_rows.items())) + ".", ""]
    agreement = json.loads(Path(args.agreement).read_text())["models"][args.agreement_model]["layers"]
    lines += ["A draft model of the first k layers, verified by all of them (batch 1, memory-bound verify; "
              f"agreement from `{Path(args.agreement).relative_to(RESULTS.parent.parent)}`):", "",
              "| draft layers k | acceptance a | whole draft head: c, best g, speedup | "
              f"{args.exit_vocab}-row draft head: c, best g, speedup |", "|---|---|---|---|"]
    drafts = []

    def best_round(a: float, cost: float) -> tuple[int, float]:
        gain = lambda g: (1 - a ** (g + 1)) / (1 - a) / (g * cost + 1)
        g = max(range(1, 9), key=gain)
        return g, gain(g)

    for k in sorted(int(k) for k in agreement if int(k) < L):
        a = agreement[str(k)]["agreement"]
        cells = []
        for draft_head in (head, exit_head):
            cost = (k + draft_head) / (L + head)
            g, speed = best_round(a, cost)
            drafts.append({"layer": k, "acceptance": a, "draft_head_blocks": draft_head, "cost": cost,
                           "drafts": g, "speedup": speed})
            cells.append(f"{cost:.3f}, {g}, {speed:.2f}x")
        lines.append(f"| {k} | {a:.3f} | " + " | ".join(cells) + " |")
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"histogram": hist, "num_layers": L, "head_blocks": head, "exit_head_blocks": exit_head,
         "kv_fraction": args.kv_fraction, "measured_curve": points, "rows": rows, "draft_model": drafts}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
