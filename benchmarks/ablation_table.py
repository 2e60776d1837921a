"""The recipe table: how each way of training the exits of one model does.

Reads the JSON that ``benchmarks/exit_agreement.py`` wrote for every recipe's output folder and the
untuned model, on the same held-out rows, plus each folder's ``lite_config.json`` (recipe, training time)
and its weight files (artefact size), and writes one markdown table:

  recipe | agreement with the final layer per exit (95% interval) | KL(final || exit) per exit |
  final layer's held-out loss, and its change against the untuned model | training minutes | artefact MB

    .venv/bin/python benchmarks/ablation_table.py --agreement benchmarks/results/ablation_agreement.json \\
        --untuned smollm2-135m-instruct --out benchmarks/results/ablation.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lite.files import write_atomic

WEIGHTS = ("*.safetensors", "*.bin")


def artefact_mb(folder: Path) -> float:
    """Megabytes of weights a user downloads for this checkpoint (adapter, modules, or a full model)."""
    return sum(f.stat().st_size for pattern in WEIGHTS for f in folder.glob(pattern)) / 1e6


def recipe(cfg: dict) -> str:
    """A short name of how the exits were trained, from ``lite_config.json``'s training record."""
    t = cfg.get("training") or {}
    if not t:
        return "untuned"
    what = (f"exit modules ({t['exit_modules']}), frozen backbone" if t.get("exit_modules")
            else f"LoRA r{t['lora_rank']}" if t.get("lora") else "full fine-tuning")
    targets = {"data": "CE on responses", "distill": "self-distillation (KL)", "mixed": "KL + CE"}.get(
        t.get("targets", "data"), t.get("targets"))
    responses = "own answers" if t.get("responses") == "own answers" else "dataset responses"
    if t.get("baseline"):
        return f"baseline (final layer only), {what}"
    return f"{what}; {targets}; {responses}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agreement", required=True, help="exit_agreement.py's JSON over every model")
    p.add_argument("--untuned", default="smollm2-135m-instruct", help="the --model spec of the untuned model")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    data = json.loads(Path(args.agreement).read_text())
    models = data["models"]
    untuned = models.get(args.untuned)
    base_loss = untuned["layers"][str(untuned["num_layers"])]["ce_reference"] if untuned else None
    exits = sorted({int(k) for m in models.values() for k in m["layers"]} - {max(
        m["num_layers"] for m in models.values())})
    head = ["recipe", "model"] + [f"agreement L{k}" for k in exits] + [f"KL L{k}" for k in exits] + [
        "final-layer held-out loss", "vs untuned", "training minutes", "artefact MB"]
    lines = [
        "# Training the exits: recipes compared", "",
        f"Held-out rows: {data['rows']} ({data.get('heldout_note', '')}); each model's own greedy answers, "
        f"{data['max_new_tokens']} new tokens, teacher-forced. Agreement: share of answer positions where the "
        "exit's argmax equals the final layer's (95% bootstrap interval over prompts). KL(final || exit) in "
        "nats. Final-layer held-out loss: cross-entropy of layer L against the rows' reference responses.", "",
        f"Command: `{data['command']}`", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
    ]
    for spec, m in models.items():
        folder = Path(m["folder"])
        cfg_path = folder / "lite_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        t = cfg.get("training") or {}
        L = str(m["num_layers"])
        loss = m["layers"][L]["ce_reference"]
        row = [recipe(cfg), f"`{Path(spec).name}`"]
        for k in exits:
            layer = m["layers"].get(str(k))
            row.append("-" if layer is None else "{:.1%} [{:.0%}, {:.0%}]".format(layer["agreement"], *layer["agreement_ci95"]))
        for k in exits:
            layer = m["layers"].get(str(k))
            row.append("-" if layer is None else f"{layer['kl_final_to_exit']:.2f}")
        row.append(f"{loss:.3f}")
        row.append("-" if base_loss is None or spec == args.untuned else f"{(loss - base_loss) / base_loss:+.1%}")
        seconds = t.get("train_seconds")
        row.append("-" if seconds is None else f"{seconds / 60:.0f}")
        row.append("-" if spec == args.untuned else f"{artefact_mb(folder):.1f}")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    write_atomic(Path(args.out), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
