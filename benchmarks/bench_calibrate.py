"""Calibration on the embedded default model: collection time, and what each rule and measure gives.

Takes the held-out rows that ``lite train`` would keep aside from ``alpaca_libre_v1.jsonl`` (status "ok",
default 5 % split, seed 0), collects once per source (``reference`` on N rows, ``generated`` on M rows),
then applies every rule and confidence measure to the same arrays (collection is separate from
selection) and trains the learned gate. Nothing is written into the model folder. Measured in one run:

* collection wall-clock and process CPU seconds, per example and per scored token (the machine is shared,
  so CPU seconds are the steadier figure);
* per rule: thresholds per exit layer, expected exit rate per layer in the cascade, the share of tokens
  leaving early, the agreement of those tokens with the final layer, and the layer cost improvement the
  calibration tokens imply, 1 - mean(exit layer) / L;
* per confidence measure at the agreement rule (target 0.9): share leaving early and their agreement;
* the gate: accuracy at 0.5 against the majority-class baseline, and its exit rates.

Usage:
    python benchmarks/bench_calibrate.py [--examples 50] [--generated-examples 20] [--model smollm2-135m-instruct]
Writes benchmarks/results/calibrate.json and calibrate.md (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from lite import load_model
from lite.calibration import collect, select
from lite.files import write_atomic
from lite.training.data import prepare_data

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DATA = REPO.parent / "shared" / "data" / "train" / "alpaca_libre_v1.jsonl"
RULES = [("paper", {}), ("agreement", {"target": 0.9}), ("agreement", {"target": 0.8}),
         ("ltt", {"epsilon": 0.1, "delta": 0.1}), ("ltt", {"epsilon": 0.2, "delta": 0.1})]



def _summary(result, num_layers: int) -> dict:
    s = result.stats
    mean_exit = sum(r * k for r, k in zip(s.exit_rate, result.layers)) + s.final_rate * num_layers
    return {
        "rule": result.rule, "parameters": result.parameters, "confidence": result.confidence,
        "thresholds": {str(k): round(v, 4) for k, v in result.thresholds.items()},
        "agreement": {str(k): round(v, 3) for k, v in zip(result.layers, s.agreement)},
        "exit_rate": {str(k): round(v, 3) for k, v in zip(result.layers, s.exit_rate)},
        "early_share": round(1 - s.final_rate, 3),
        "exited_agreement": None if np.isnan(s.exited_agreement) else round(s.exited_agreement, 3),
        "layer_cost_improvement": round(1 - mean_exit / num_layers, 3),
    }


def _collect(lm, rows, source: str, with_states: bool) -> tuple:
    wall, cpu = time.perf_counter(), time.process_time()
    data = collect(lm, rows, source=source, with_states=with_states)
    return data, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--examples", type=int, default=50)
    ap.add_argument("--generated-examples", type=int, default=20)
    args = ap.parse_args()
    heldout = prepare_data([str(DATA)], filters=["status=ok"]).heldout
    lm = load_model(args.model, dtype="float32", device="cpu")
    L = lm.num_layers
    out: dict = {"model": args.model, "num_layers": L, "exit_layers": lm.exit_layers, "data": str(DATA),
                 "heldout_rows": len(heldout), "torch_threads": torch.get_num_threads(),
                 "machine": platform.processor() or platform.machine(), "sources": {}}
    for source, n, states in (("reference", args.examples, True), ("generated", args.generated_examples, False)):
        if n <= 0:
            continue
        data, wall, cpu = _collect(lm, heldout[:n], source, states)
        entry = {"examples": data.examples, "tokens": data.tokens, "wall_seconds": round(wall, 1),
                 "cpu_seconds": round(cpu, 1), "cpu_ms_per_token": round(1000 * cpu / max(data.tokens, 1), 2),
                 "rules": [], "measures": {}}
        for rule, params in RULES:
            entry["rules"].append(_summary(select(data, rule=rule, **params), L))
        for measure in ("max_prob", "margin", "entropy", "state_cosine"):
            entry["measures"][measure] = _summary(select(data, rule="agreement", target=0.9, confidence=measure), L)
        if states:
            start = time.perf_counter()
            fit = select(data, rule="agreement", target=0.9, gate=True).gate
            entry["gate"] = {
                "train_seconds": round(time.perf_counter() - start, 1), "rule": "agreement 0.9",
                "train_examples": fit.train_examples, "selection_tokens": fit.selection_tokens,
                "accuracy": {str(k): round(v, 3) for k, v in fit.accuracy.items()},
                "base_accuracy": {str(k): round(v, 3) for k, v in fit.base_accuracy.items()},
                "thresholds": {str(k): round(v, 4) for k, v in fit.gate.thresholds.items()},
                "exit_rate": {str(k): round(v, 3) for k, v in zip(data.layers, fit.stats.exit_rate)},
                "early_share": round(1 - fit.stats.final_rate, 3),
                "exited_agreement": None if np.isnan(fit.stats.exited_agreement) else
                round(fit.stats.exited_agreement, 3),
                "flops_per_check": fit.gate.flops(data.layers[0]),
                "head_flops": 2 * lm.hidden_size * lm.vocab_size,
            }
        out["sources"][source] = entry
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS / "calibrate.json", json.dumps(out, indent=2) + "\n")
    write_atomic(RESULTS / "calibrate.md", _markdown(out))
    print(_markdown(out))


def _markdown(out: dict) -> str:
    lines = [f"# Calibration on {out['model']} (L = {out['num_layers']}, exits {out['exit_layers']})", "",
             f"Held-out rows of {Path(out['data']).name} (status ok, the 5 % split lite train keeps aside). "
             f"Produced by `python benchmarks/bench_calibrate.py`; nothing written into the model.", ""]
    for source, e in out["sources"].items():
        lines += [f"## source `{source}`: {e['examples']} examples, {e['tokens']} tokens", "",
                  f"Collection: {e['wall_seconds']} s wall, {e['cpu_seconds']} s CPU "
                  f"({e['cpu_ms_per_token']} ms CPU per token; {out['torch_threads']} torch threads, shared "
                  f"machine).", "",
                  "| rule | thresholds | exit rate per layer (cascade) | leave early | their agreement | "
                  "layer cost improvement |", "|---|---|---|---|---|---|"]
        for r in e["rules"] + [dict(v, rule=f"agreement 0.9, {k}") for k, v in e["measures"].items()]:
            name = r["rule"] + (" " + " ".join(f"{a}={b}" for a, b in r.get("parameters", {}).items())
                                if "," not in r["rule"] else "")
            th = ", ".join("never" if v >= 1e5 else f"{v:.3f}" for v in r["thresholds"].values())
            rates = ", ".join(f"{v:.2f}" for v in r["exit_rate"].values())
            lines.append(f"| {name} | {th} | {rates} | {r['early_share']:.3f} | {r['exited_agreement']} | "
                         f"{r['layer_cost_improvement']:.3f} |")
        first = next(iter(e["rules"]))
        lines += ["", "Agreement of each exit layer with the final layer (all tokens): " +
                  ", ".join(f"{k}: {v:.2f}" for k, v in first["agreement"].items()), ""]
        if "gate" in e:
            g = e["gate"]
            lines += [f"Gate (logistic, {g['train_examples']} training examples, thresholds by {g['rule']} on "
                      f"{g['selection_tokens']} held-out tokens, trained in {g['train_seconds']} s): accuracy "
                      + ", ".join(f"{k}: {v:.2f} (base {g['base_accuracy'][k]:.2f})" for k, v in g["accuracy"].items())
                      + f"; leave early {g['early_share']:.3f}, their agreement {g['exited_agreement']}; "
                      f"{g['flops_per_check']} FLOPs per check against {g['head_flops']} per head evaluation.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
