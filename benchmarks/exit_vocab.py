"""How large an exit vocabulary should be (``lite calibrate --exit-vocab N``): exits below L that read the
head over the N most frequent tokens of ``draft_vocab.json`` cost N/V of a head per check, but a token whose
full-head argmax lies outside the N cannot leave there.

For held-out rows of the model (the split ``lite train`` recorded; never a test set), the full model's greedy
answers are teacher-forced once; every exit's confidence (max-prob) and agreement with the final layer are
measured with the full head and with the head over each N. For each, thresholds are chosen as ``lite calibrate``
chooses them (agreement rule) and priced as it prices them (:func:`lite.calibration.calibrate.expected_compute`):
exit rates, agreement of the tokens that leave, mean exit layer, and expected compute per step against the
full model's.

    .venv/bin/python benchmarks/exit_vocab.py --model smollm2-135m-lite --limit 48 \
        --out benchmarks/results/exit_vocab.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lite.calibration.calibrate import (
    calibration_layers,
    calibration_sequences,
    collect_sequences,
    expected_compute,
    select,
)
from lite.model.loading import load_model
from lite.training.data import load_heldout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-lite")
    ap.add_argument("--limit", type=int, default=48, help="held-out rows")
    ap.add_argument("--sizes", default="1024,2048,4096,8192")
    ap.add_argument("--targets", default="0.9,0.8")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype="float32")
    examples = load_heldout(lm.lite_config)[: args.limit]
    layers = calibration_layers(lm)
    sizes = [int(n) for n in args.sizes.split(",")]
    keys = [None] + sizes
    start = time.perf_counter()
    # the full model's greedy answers, teacher-forced once per head (the full one, then each exit vocabulary)
    sequences = calibration_sequences(lm, examples, "generated", max_length=256, max_new_tokens=args.max_new_tokens,
                                      batch_size=8)
    collected = {k: collect_sequences(lm, sequences, len(sequences), exit_vocab=k) for k in keys}
    seconds = time.perf_counter() - start
    rows = []
    for k in keys:
        data = collected[k]
        a = data.agree
        for target in (float(t) for t in args.targets.split(",")):
            result = select(data, rule="agreement", target=target, min_tokens=1)
            rates = [0.0 if np.isnan(r) else float(r) for r in result.stats.exit_rate]
            mean_exit = sum(r * k_ for r, k_ in zip(rates, layers)) + (1 - sum(rates)) * lm.num_layers
            rows.append({"exit_vocab": k or "full", "target": target, "agreement": [float(v) for v in a.mean(1)],
                         "exit_rate": rates, "exited_agreement": float(result.stats.exited_agreement),
                         "mean_exit": mean_exit, "layer_saving": 1 - mean_exit / lm.num_layers,
                         "expected_compute": expected_compute(lm, result)["dynamic"]})
    tokens = collected[None].tokens
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "rows": collected[None].examples, "tokens": tokens, "layers": layers,
            "seconds": round(seconds, 1), "threads": args.threads}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Exit vocabulary size: {args.model}, {meta['rows']} held-out rows ({tokens} tokens of the full "
             f"model's greedy answers), max-prob thresholds by the agreement rule", "",
             f"Command: `.venv/bin/python benchmarks/exit_vocab.py --model {args.model} --limit {args.limit} "
             f"--out {args.out}`. Exits {layers}. Expected compute: per step, against the full model's step "
             f"(lite.calibration.calibrate.expected_compute; below 1 is cheaper).", "",
             "| exit vocabulary | target | agreement with L per exit | exit rate per exit | exited tokens agree | "
             "mean exit | layers saved | expected compute |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['exit_vocab']} | {r['target']} | {' / '.join(f'{v:.0%}' for v in r['agreement'])} | "
                     f"{' / '.join(f'{v:.0%}' for v in r['exit_rate'])} | {r['exited_agreement']:.3f} | "
                     f"{r['mean_exit']:.1f} | {r['layer_saving']:.1%} | {r['expected_compute']:.3f} |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
