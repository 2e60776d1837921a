"""Held-out loss at every exit layer, for several checkpoints on the same held-out rows.

The teacher-forced side of the paper's two questions, on rows none of the models trained on: does LITE
make intermediate layers predict (loss at each exit, LITE vs the final-layer baseline), and does it hurt the
last layer (loss at L)? Each layer's hidden state goes through the model's own final norm and head, and the
cross-entropy is averaged over response tokens (prompt tokens ignored), as in training
(:func:`lite.calibration.scoring.score_sequences` on :func:`lite.calibration.scoring.reference_sequences`).

The held-out rows are those recorded in the FIRST model's lite_config.json (lite train keeps the same
split for the same data, seed and fraction; every other model must record the same ids, which is checked).

Usage:
    python benchmarks/heldout_exit_loss.py --model NAME=FOLDER [--model NAME=FOLDER ...]
        [--layers 8,11,15,19,23,26,30] [--max-rows 200] [--out heldout_exit_loss]
Writes benchmarks/results/<out>.json and .md (or --out-dir).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

from lite import load_model
from lite.calibration.scoring import reference_sequences, score_sequences
from lite.files import write_atomic
from lite.model.prompts import default_format
from lite.training.data import load_heldout


def exit_losses(lm, rows, layers: list[int]) -> tuple[dict[int, float], int]:
    """Mean response-token cross-entropy at each layer over ``rows`` (the package's teacher-forced scorer, one
    row at a time, no padding), and the number of response tokens."""
    scores = score_sequences(lm, reference_sequences(lm.tokenizer, rows, default_format(lm)), layers=layers,
                             losses=True)
    return scores.pooled(scores.ce), scores.tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER")
    ap.add_argument("--layers", default=None, help="layers to score (default: the first model's exit layers)")
    ap.add_argument("--max-rows", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="heldout_exit_loss")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [m.split("=", 1) for m in args.model]
    results, rows, ids = {}, None, None
    for name, folder in models:
        start = time.perf_counter()
        lm = load_model(folder, device="cpu", dtype="float32")
        recorded = lm.lite_config.data.get("heldout_ids")
        if rows is None:
            rows, ids = load_heldout(lm.lite_config)[: args.max_rows], recorded
            layers = [int(k) for k in args.layers.split(",")] if args.layers else lm.exit_layers
        elif recorded is not None and recorded != ids:  # None: a model lite did not train (the base)
            raise SystemExit(f"{name}: its held-out split differs from {models[0][0]}'s; train both on the same "
                             f"data, seed and --heldout-fraction")
        losses, tokens = exit_losses(lm, rows, layers)
        results[name] = {"folder": folder, "loss": {str(k): v for k, v in losses.items()}, "tokens": tokens,
                         "seconds": time.perf_counter() - start}
        print(name, {k: round(v, 3) for k, v in losses.items()}, file=sys.stderr, flush=True)
    res = {"rows": len(rows), "layers": layers, "models": results}
    lines = [f"# Held-out loss at each exit layer ({len(rows)} held-out rows, "
             f"{next(iter(results.values()))['tokens']} response tokens)", "",
             "Cross-entropy (nats) of each layer's own prediction through the final norm and head, on rows no "
             "model trained on. Produced by `benchmarks/heldout_exit_loss.py`.", "",
             "| model | " + " | ".join(f"layer {k}" for k in layers) + " |",
             "|---|" + "---|" * len(layers)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['loss'][str(k)]:.3f}" for k in layers) + " |")
    if len(results) >= 2:
        (a, ra), (b, rb) = list(results.items())[:2]
        L = str(layers[-1])
        lines += ["", f"Final layer: {b} / {a} = {rb['loss'][L] / ra['loss'][L]:.3f} "
                      f"(perplexity ratio {float(torch.exp(torch.tensor(rb['loss'][L] - ra['loss'][L]))):.3f})."]
    out = Path(args.out_dir)
    write_atomic(out / f"{args.out}.json", json.dumps(res, indent=1) + "\n")
    write_atomic(out / f"{args.out}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
