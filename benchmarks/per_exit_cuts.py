"""Does a cut per exit beat one cut at every exit? Max-prob's frontier, teacher-forced, on held-out own answers.

The decision rule "leave at the first exit whose max-prob reaches the cut" uses one cut at every exit on the
ceiling's frontier (:func:`lite.calibration.ceiling.frontier`). Each exit could have its own. This script
takes a model's calibration statistics (its recorded held-out rows, own greedy answers, the exit vocabulary
it decodes with; exactly what ``lite calibrate --source generated`` collects) and, at each agreement bar,
compares the best single cut with per-exit cuts found two ways: a greedy descent from "no exit" (each step
lowers the cut of the exit with the most saving per agreement lost) and a coordinate search started from the
best single cut (each exit's cut in turn over 128 quantiles, kept where the saving grows at the bar).
Agreement: the share of tokens whose emitted token equals the final layer's (tokens reaching L count as
agreeing).

    .venv/bin/python benchmarks/per_exit_cuts.py --model smollm2-135m-lite --limit 100 \
        --out benchmarks/results/per_exit_cuts.md
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time

import numpy as np
import torch

from lite import load_model
from lite.calibration.calibrate import collect
from lite.calibration.ceiling import frontier, oracle_saving, point
from lite.files import write_atomic
from lite.training.data import load_heldout

BARS = (0.85, 0.90, 0.95)
LEVELS = 128


def levels(scores: np.ndarray) -> np.ndarray:
    """Candidate cuts of one exit, ascending: its scores' quantiles, then a cut no token reaches."""
    return np.concatenate([np.unique(np.quantile(scores, np.linspace(0.0, 1.0, LEVELS))), [np.inf]])


def best_single(scores, agree, layers, num_layers, bar):
    """The single cut saving most at agreement >= bar: (saving, agreement, cuts)."""
    ok = [p for p in frontier(scores, agree, layers, num_layers, cuts=LEVELS) if p.agreement >= bar]
    p = max(ok, key=lambda q: q.saving)
    return p.saving, p.agreement, np.full(len(layers), p.cut)


def greedy_descent(scores, agree, layers, num_layers, bar):
    """From no exit: lower one exit's cut a level at a time, the move with most saving per agreement lost."""
    grid = [levels(s)[::-1] for s in scores]  # descending: index 0 lets nothing out
    idx, cuts, saving, agreement = [0] * len(layers), np.full(len(layers), np.inf), 0.0, 1.0
    while True:
        best = None
        for i in range(len(layers)):
            if idx[i] + 1 >= len(grid[i]):
                continue
            trial = cuts.copy()
            trial[i] = grid[i][idx[i] + 1]
            p = point(scores, agree, trial, layers, num_layers)
            if p.agreement < bar or p.saving <= saving:
                continue
            ratio = (p.saving - saving) / max(agreement - p.agreement, 1e-9)
            if best is None or ratio > best[0]:
                best = (ratio, i, p)
        if best is None:
            return saving, agreement, cuts
        _, i, p = best
        idx[i] += 1
        cuts[i], saving, agreement = grid[i][idx[i]], p.saving, p.agreement


def coordinate_search(scores, agree, layers, num_layers, bar, start):
    """From the cuts ``start``: each exit's cut in turn over its levels, kept where the saving grows at the bar."""
    cuts = np.array(start, dtype=np.float64)
    p0 = point(scores, agree, cuts, layers, num_layers)
    saving, agreement = p0.saving, p0.agreement
    for _ in range(4):
        improved = False
        for i in range(len(layers)):
            for c in levels(scores[i]):
                trial = cuts.copy()
                trial[i] = c
                p = point(scores, agree, trial, layers, num_layers)
                if p.agreement >= bar and p.saving > saving + 1e-12:
                    cuts, saving, agreement, improved = trial, p.saving, p.agreement, True
        if not improved:
            break
    return saving, agreement, cuts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-lite")
    ap.add_argument("--limit", type=int, default=100, help="held-out rows (the model's recorded split)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/per_exit_cuts.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype="float32", device="cpu")
    examples = load_heldout(lm.lite_config)[: args.limit]
    start = time.perf_counter()
    data = collect(lm, examples, source="generated", exit_vocab=lm.lite_config.exit_vocab)
    seconds = time.perf_counter() - start
    scores, agree, layers, num_layers = data.confidences["max_prob"], data.agree.astype(bool), data.layers, lm.num_layers
    oracle = oracle_saving(agree, layers, num_layers)
    rows = []
    for bar in BARS:
        single = best_single(scores, agree, layers, num_layers, bar)
        greedy = greedy_descent(scores, agree, layers, num_layers, bar)
        coord = coordinate_search(scores, agree, layers, num_layers, bar, single[2])
        rows.append((bar, single, greedy, coord))

    def cell(r):
        cuts = ", ".join("never" if not np.isfinite(c) else f"{c:.3f}" for c in r[2])
        return f"{100 * r[0]:.1f}% (agreement {r[1]:.3f}; cuts {cuts})"

    lines = [
        "# One max-prob cut at every exit against a cut per exit", "",
        f"{datetime.date.today()}, `{' '.join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])}`: "
        f"{args.model}, exits {layers} of {num_layers}, teacher-forced on its own greedy answers to {data.examples} "
        f"held-out rows ({scores.shape[1]} tokens, float32, exit vocabulary {lm.lite_config.exit_vocab or 'the full head'}; "
        f"collected in {seconds:.0f} s). Oracle (first agreeing exit): {100 * oracle:.1f}% of layers.", "",
        "Layers saved at agreement with the final layer of at least the bar:", "",
        "| bar | one cut at every exit | per-exit cuts, greedy descent | per-exit cuts, coordinate search from the one cut |",
        "|---|---|---|---|",
    ]
    lines += [f"| {bar:.2f} | {cell(s)} | {cell(g)} | {cell(c)} |" for bar, s, g, c in rows]
    gain = max(c[0] - s[0] for _, s, _, c in rows)
    lines += ["", f"The most a cut per exit adds over one cut here: {100 * gain:.1f} points of layers saved."]
    write_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
