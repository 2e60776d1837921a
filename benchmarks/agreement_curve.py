"""The curve of agreement against training minutes: a run's snapshots scored by benchmarks/exit_agreement.py.

`lite train --exit-modules ... --snapshot-minutes M` keeps the modules every M minutes of training in
`<out>.snapshots/step-NNNNNN` (each a loadable model folder whose lite_config.json records its steps and
training seconds). Score the snapshots, the finished run and the untuned model on the same held-out rows in
one exit_agreement.py call, then give its JSON here: one row per model, ordered by training minutes (the
untuned model at 0), with the agreement per exit layer and its 95% interval, the mean KL(final || exit), and
the final layer's held-out loss; and a plot of agreement against minutes, one line per exit layer.

    .venv/bin/python benchmarks/exit_agreement.py --model smollm2-135m-instruct \\
        $(for s in $RUN.snapshots/step-*; do echo --model $s; done) --model $RUN \\
        --heldout-from $RUN --limit 40 --out /tmp/curve_agreement.md
    .venv/bin/python benchmarks/agreement_curve.py --agreement /tmp/curve_agreement.json \\
        --out benchmarks/results/agreement_curve.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lite.files import write_atomic


def training_minutes(folder: str | None) -> tuple[float, int | None]:
    """(training minutes, steps) from a model folder's lite_config.json; (0, None) for an untrained model."""
    config = Path(folder or "") / "lite_config.json"
    if not folder or not config.is_file():
        return 0.0, None
    training = json.loads(config.read_text()).get("training") or {}
    if "train_seconds" not in training:
        return 0.0, None  # a model lite did not train (the untuned base)
    return training["train_seconds"] / 60.0, training.get("steps")


def curve_rows(agreement: dict) -> tuple[list[int], list[dict]]:
    """The exit layers below L, and one row per model sorted by training minutes."""
    rows = []
    for name, model in agreement["models"].items():
        minutes, steps = training_minutes(model.get("folder"))
        layers = {int(k): v for k, v in model["layers"].items()}
        rows.append({"model": name, "minutes": minutes, "steps": steps, "layers": layers,
                     "num_layers": model["num_layers"]})
    if not rows:
        raise SystemExit("the agreement JSON has no models: run benchmarks/exit_agreement.py with --model first")
    L = rows[0]["num_layers"]
    shared = sorted(set.intersection(*(set(r["layers"]) for r in rows)) - {L})
    return shared, sorted(rows, key=lambda r: (r["minutes"], r["steps"] or 0))


def render(agreement: dict, layers: list[int], rows: list[dict], plot: str | None) -> str:
    L = rows[0]["num_layers"]
    head = ["training minutes", "steps", "model"] + [f"agreement at {k}" for k in layers] + \
           ["mean KL(final \\|\\| exit)", f"held-out loss at {L}"]
    lines = ["# Agreement with the final layer against training minutes", "",
             f"From `{agreement.get('command', 'benchmarks/exit_agreement.py')}`: {agreement.get('rows')} held-out "
             f"prompts, each model's own greedy answers ({agreement.get('max_new_tokens')} tokens); agreement "
             f"with a 95% bootstrap interval over prompts.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['minutes']:.0f}", "-" if r["steps"] is None else str(r["steps"]), f"`{r['model']}`"]
        for k in layers:
            a = r["layers"][k]
            lo, hi = a.get("agreement_ci95") or (None, None)
            cells.append(f"{100 * a['agreement']:.1f}%" + (f" [{100 * lo:.0f}, {100 * hi:.0f}]" if lo is not None else ""))
        kls = [r["layers"][k].get("kl_final_to_exit") for k in layers]
        cells.append(f"{sum(kls) / len(kls):.2f}" if all(v is not None for v in kls) else "-")
        final = r["layers"].get(L, {}).get("ce_reference")
        cells.append("-" if final is None else f"{final:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    if plot:
        lines += ["", f"![agreement against training minutes]({Path(plot).name})"]
    return "\n".join(lines) + "\n"


def draw(layers: list[int], rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["minutes"] for r in rows]
    for i, k in enumerate(layers):
        ys = [100 * r["layers"][k]["agreement"] for r in rows]
        cis = [[100 * v for v in (r["layers"][k].get("agreement_ci95") or [r["layers"][k]["agreement"]] * 2)]
               for r in rows]  # no interval: a zero-length bar
        lo = [y - ci[0] for y, ci in zip(ys, cis)]
        hi = [ci[1] - y for y, ci in zip(ys, cis)]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color=f"C{i}", capsize=2, label=f"layer {k}")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("agreement with the final layer (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agreement", required=True, help="the JSON benchmarks/exit_agreement.py wrote")
    ap.add_argument("--out", default="benchmarks/results/agreement_curve.md")
    args = ap.parse_args(argv)
    source = Path(args.agreement)
    if not source.is_file():
        raise SystemExit(f"--agreement {source}: no such file; run benchmarks/exit_agreement.py first (it writes "
                         f"the JSON beside its --out)")
    agreement = json.loads(source.read_text())
    layers, rows = curve_rows(agreement)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = out.with_suffix(".png")
    draw(layers, rows, plot)
    text = render(agreement, layers, rows, str(plot))
    write_atomic(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
