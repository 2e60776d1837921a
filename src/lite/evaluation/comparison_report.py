"""``lite report``'s rendering: report.md and the plots of several ``lite eval`` folders side by side, from
the numbers of :func:`lite.evaluation.comparison.compare_evals` (tables in :mod:`lite.evaluation.report`'s form).

Writes into the output folder: ``report.md`` (what was run, headline table, figures, every policy, thresholds,
sample answers, definitions), ``report.json`` (the numbers behind it), ``plots/per_layer.png`` (held-out CE,
agreement with the final layer, static-exit similarity per layer) and ``plots/frontier.png`` (wall-clock
speedup against HF generate versus similarity to the full model, per policy, 95% intervals on both axes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_atomic, write_json_atomic
from .comparison import json_ready
from .report import _table
from .samples import blockquote, escape_markdown

NEVER_EXIT_AT = 1.0  # a threshold above any confidence or probability: that layer never lets a token leave
DEFAULT_TITLE = "Early exit compared: cost and quality of each model's policies"
COLORS = {"baseline": "C0", "LITE": "C1", "winner": "C2", "untuned": "grey"}
DEFINITIONS = """\
* **final-layer held-out loss**: teacher-forced cross-entropy (nats per token) of the final layer L on the
  held-out rows' reference responses (`ce_reference` at layer L of benchmarks/exit_agreement.py); the change
  is relative to the baseline. The paper's second claim: training the exits must not hurt the final layer.
* **agreement at layer k**: share of answer positions where exit k's argmax equals layer L's, each model on
  its own greedy answers to the held-out prompts; error bars: 95% bootstrap over prompts.
* **held-out CE at layer k**: the same cross-entropy as the final-layer loss, read at exit k.
* **static similarity at layer k**: mean cosine similarity (all-MiniLM-L6-v2) of the answer generated with
  every token leaving at k (`static:k`) to the full model's answer, on the eval prompts; 1 at k = L.
* **layer cost improvement**: 1 - (sum of exit layers) / (L x tokens), the paper's figure, token-weighted.
* **compute cost improvement**: 1 - FLOPs(early exit) / FLOPs(full model), every head evaluation and K/V
  fill included (lite.decoding.cost); the full model is charged for its own answers.
* **speedup vs HF generate**: sum over prompts of the seconds transformers' `generate` took / sum of the
  seconds the early-exit run took, both at the eval's batch size, prefill included; > 1 is faster.
* **similarity to the full answer**: mean over prompts of the cosine similarity of the early-exit answer
  to the same model's full answer (exits off). Intervals: percentile bootstrap over prompts (2000 draws,
  seed 0; lite.evaluation.metrics.bootstrap_interval), prompts resampled with replacement, speedup
  recomputed as a ratio of sums on each draw.
* **ROUGE-L vs references**: ROUGE-L F of the answers against the Self-Instruct reference outputs (the only
  set with references), early exit / full model.
* **thresholds**: a token leaves at exit k when its confidence (max-prob: the top probability of exit k's
  head) reaches k's threshold; the learned gate instead predicts from the hidden state whether exit k
  agrees with layer L and lets the token leave when that probability reaches the gate threshold.
  Calibration agreement: on the calibration rows, how often layer k agrees with L (all tokens) and how
  often the tokens that would leave at k under the threshold agree (exiting tokens).
"""



# ----------------------------------------------------------------------------------- plots
def _style(label: str) -> dict[str, Any]:
    return {"color": COLORS.get(label), "linestyle": "--" if label.lower() == "untuned" else "-"}


def plot_per_layer(agreement: dict[str, dict], static: dict[str, dict[int, float]], path: Path) -> None:
    """Three panels over the exit layer: held-out CE, agreement with the final layer, static similarity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(7, 9.5), sharex=True)
    layers = set()
    for label, a in agreement.items():
        ks = [k for k, v in a["layers"].items() if v["ce_reference"] is not None]
        axes[0].plot(ks, [a["layers"][k]["ce_reference"] for k in ks], marker="o", label=label,
                     **_style(label))
        ks = [k for k, v in a["layers"].items() if v["agreement"] is not None]
        ys = np.array([a["layers"][k]["agreement"] for k in ks])
        ci = np.array([a["layers"][k]["agreement_ci95"] or [y, y] for k, y in zip(ks, ys)]).reshape(-1, 2)
        axes[1].errorbar(ks, ys, yerr=[ys - ci[:, 0], ci[:, 1] - ys], marker="o", capsize=3, label=label,
                         **_style(label))
        layers.update(a["layers"])
    for label, series in static.items():
        axes[2].plot(list(series), list(series.values()), marker="o", label=label, **_style(label))
        layers.update(series)
    titles = ["held-out cross-entropy (nats/token, log scale)", "agreement with the final layer (95% CI)",
              "static exit: similarity to the full answer"]
    missing_what = ["no --agreement JSON", "no --agreement JSON",
                    "no static-exit runs (lite eval --static-layers)"]
    for ax, title, missing in zip(axes, titles, missing_what):
        ax.set_ylabel(title, fontsize=8)
        ax.grid(alpha=0.3)
        if ax.lines or ax.containers:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "nothing to draw: " + missing, ha="center", va="center", transform=ax.transAxes,
                    color="grey", fontsize=8)
    if axes[0].lines:
        from matplotlib.ticker import FormatStrFormatter

        axes[0].set_yscale("log")
        for axis in (axes[0].yaxis.set_major_formatter, axes[0].yaxis.set_minor_formatter):
            axis(FormatStrFormatter("%g"))
    axes[1].set_ylim(0, 1.05)
    axes[2].set_ylim(0, 1.05)
    if layers:
        axes[2].set_xticks(sorted(layers))
    axes[2].set_xlabel("exit layer (the last is the final layer L)")
    fig.suptitle("per exit layer: held-out loss, agreement with layer L, static-exit answers", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(points: list[dict[str, Any]], path: Path) -> None:
    """Speedup vs HF generate against similarity to the full answer, 95% intervals on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    seen: dict[str, int] = {}
    for p in points:
        sx, sy = p["speedup_ci95"], p["similarity_ci95"]
        marker = "s" if p["policy"] == "gate" else "o"
        ax.errorbar([p["speedup"]], [p["similarity"]], xerr=[[p["speedup"] - sx[0]], [sx[1] - p["speedup"]]],
                    yerr=[[p["similarity"] - sy[0]], [sy[1] - p["similarity"]]], marker=marker, capsize=3,
                    color=COLORS.get(p["label"]), label=None if p["label"] in seen else p["label"],
                    linestyle="")
        seen[p["label"]] = seen.get(p["label"], -1) + 1
        ax.annotate(p["text"], (p["speedup"], p["similarity"]), fontsize=7,  # staggered: close points
                    xytext=(4, 4 + 9 * (seen[p["label"]] % 3)), textcoords="offset points")
    for label in dict.fromkeys(p["label"] for p in points):  # a model's threshold scales, joined in order
        scaled = sorted((p for p in points if p["label"] == label and p["threshold_scale"] is not None),
                        key=lambda p: p["threshold_scale"])
        if len(scaled) > 1:
            ax.plot([p["speedup"] for p in scaled], [p["similarity"] for p in scaled], lw=0.8, alpha=0.6,
                    color=COLORS.get(label))
    ax.axvline(1.0, color="k", lw=0.8, ls=":", label="speedup 1 (as fast as HF generate)")
    if not points:
        ax.text(0.5, 0.5, "no model has dynamic or gate runs with HF timings", ha="center", va="center",
                transform=ax.transAxes, color="grey")
    ax.set_xlabel("wall-clock speedup vs HF generate (95% CI)")
    ax.set_ylabel("similarity to the full model's answer (95% CI)")
    ax.set_title("cost-quality frontier (o: max-prob threshold x scale, s: learned gate; LCI = layer cost "
                 "improvement)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- markdown
def _num(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x: Any, digits: int = 1, sign: bool = False) -> str:
    return "–" if x is None else f"{100 * x:{'+' if sign else ''}.{digits}f}%"


def _with_ci(x: Any, ci: list[float] | None, digits: int, suffix: str = "") -> str:
    if x is None:
        return "–"
    text = f"{x:.{digits}f}{suffix}"
    return f"{text} ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})" if ci else text


def _threshold(x: Any) -> str:
    return "–" if x is None else ("never" if x > NEVER_EXIT_AT else f"{x:.3f}")


def headline_table(labels: list[str], res: dict[str, Any], exit_cols: list[int]) -> str:
    header = (["model", "final-layer held-out loss", "vs baseline"]
              + [f"agreement L{k}" for k in exit_cols]
              + ["default policy", "layer cost impr.", "compute cost impr.", "speedup vs HF (95% CI)",
                 "similarity to full (95% CI)", "ROUGE-L vs refs: early exit / full"])
    rows = []
    for label in labels:
        m = res["models"][label]
        a, h = m.get("agreement"), m.get("headline")
        row = [f"**{label}**", _num(a and a["final_layer_loss"]),
               "reference" if label == "baseline" and a
               else _pct(m.get("final_layer_loss_change"), sign=True)]
        row += [_pct((a["layers"].get(k) or {}).get("agreement")) if a else "–" for k in exit_cols]
        if h:
            refs = (f"{_num(h.get('rougeL_vs_reference'))} / {_num(h.get('full_rougeL_vs_reference'))}"
                    if h.get("rougeL_vs_reference") is not None else "–")
            row += [f"`{m['default_policy']}`", _pct(h.get("layer_cost_improvement")),
                    _pct(h.get("compute_cost_improvement")),
                    _with_ci(h.get("speedup"), h["speedup_ci95"], 2, "×"),
                    _with_ci(h.get("similarity_vs_full"), h["similarity_ci95"], 3), refs]
        else:
            row += ["not evaluated"] + ["–"] * 5
        rows.append(row)
    return _table(header, rows)


def policies_table(res: dict[str, Any]) -> str:
    rows = []
    for label, m in res["models"].items():
        for key, f in m.get("runs", {}).items():
            rows.append([label, f"`{key}`", str(f.get("n")), _pct(f.get("layer_cost_improvement")),
                         _pct(f.get("compute_cost_improvement")),
                         _with_ci(f.get("speedup"), f.get("speedup_ci95"), 2, "×"),
                         _with_ci(f.get("similarity_vs_full"), f.get("similarity_ci95"), 3),
                         _num(f.get("rougeL_vs_full")), _num(f.get("mean_exit_layer"), 1),
                         _num(f.get("tokens_early_exit"), 1), _num(f.get("tokens_full"), 1)])
    return _table(["model", "policy", "prompts", "layer cost impr.", "compute cost impr.",
                   "speedup vs HF (95% CI)", "similarity to full (95% CI)", "ROUGE-L vs full",
                   "mean exit layer", "tokens early exit", "tokens full"], rows)


def thresholds_section(res: dict[str, Any]) -> list[str]:
    parts = []
    for label, m in res["models"].items():
        t = m.get("thresholds")
        if t is None:
            continue
        info = t["info"]
        if not any(r["threshold"] is not None or r["gate_threshold"] is not None or r["agreement"] is not None
                   for r in t["rows"]):
            parts.append(f"**{label}**: not calibrated (no thresholds, no gate); its policy is "
                         f"`{m.get('default_policy') or '–'}`.")
            continue
        line = f"**{label}**"
        if info["rule"]:
            params = ", ".join(f"{k} {_num(v) if isinstance(v, float) else v}"
                               for k, v in (info["parameters"] or {}).items())
            line += f": calibrated with rule `{info['rule']}`" + (f" ({params})" if params else "")
            if info["examples"]:
                line += f" on {info['examples']} examples ({info['tokens']} tokens)"
        if info["origin"] == "lite_config":
            line += ("; the max-prob thresholds are read from the model's lite_config.json (no eval here ran "
                     "them)")
        parts.append(line + ".")
        header = ["exit layer", f"{info['confidence']} threshold"]
        header += ["gate threshold"] if info["gate"] else []
        header += ["agreement with L, all tokens", "agreement, tokens exiting (threshold)"]
        header += ["agreement, tokens exiting (gate)"] if info["gate"] else []
        rows = []
        for r in t["rows"]:
            row = [str(r["layer"]), _threshold(r["threshold"])]
            row += [_threshold(r["gate_threshold"])] if info["gate"] else []
            row += [_num(r["agreement"]), _num(r["exit_agreement"])]
            row += [_num(r["gate_exit_agreement"])] if info["gate"] else []
            rows.append(row)
        parts.append(_table(header, rows))
    return parts


def samples_section(res: dict[str, Any]) -> list[str]:
    s = res.get("samples")
    if not s or not s["answers"]:
        return ["No sample answers: no evaluated model has an early-exit run."]
    L = s["num_layers"]
    parts = [f"From **{s['label']}**, policy `{s['run']}`. Rule: {s['rule']}",
             (f"Legend: in the early-exit answers each piece of text is followed by a superscript "
              f"<sup>k</sup> when its token left at exit layer k < L = {L}; a piece without a mark ran "
              f"through all {L} layers. A mark like <sup>15,23</sup> covers a token that added no text of "
              f"its own (e.g. end of sequence, or half a character) and the piece after it; ↵ is a line "
              f"break that left early.")]
    for i, a in enumerate(s["answers"], start=1):
        instruction = a["instruction"] + (f"\n\n{a['input']}" if a["input"] else "")
        parts += [f"### Sample {i}: {a['testset']} #{a['id']}",
                  (f"Similarity to the full answer {a['similarity']:.3f}; {a['exited_tokens']} of "
                   f"{a['tokens']} tokens left early."),
                  "**Instruction**", blockquote(escape_markdown(instruction)),
                  "**Full model**", blockquote(escape_markdown(a["full"])),
                  "**Early exit**", blockquote(a.get("marked") or escape_markdown(a["early_exit"]))]
    if s.get("tokenizer_error"):
        parts.append(f"(Exit marks left out: the tokenizer could not be loaded: {s['tokenizer_error']})")
    return parts


def findings(labels: list[str], res: dict[str, Any], exit_cols: list[int]) -> list[str]:
    """A few sentences read straight off the numbers (no judgement beyond what the intervals allow)."""
    out = []
    models = res["models"]
    changes = [f"{label} {_pct(models[label].get('final_layer_loss_change'), sign=True)}" for label in labels
               if label != "baseline" and models[label].get("final_layer_loss_change") is not None]
    if changes:
        out.append("Final layer's held-out loss against the baseline: " + "; ".join(changes) + ".")
    if exit_cols:
        k = exit_cols[len(exit_cols) // 2]
        cells = [f"{label} {_pct(models[label]['agreement']['layers'].get(k, {}).get('agreement'))}"
                 for label in labels if models[label].get("agreement")]
        if cells:
            out.append(f"Agreement with the final layer at exit {k}: " + "; ".join(cells) + ".")
    for label in labels:
        h = models[label].get("headline")
        if not h or h.get("speedup_ci95") is None:
            continue
        lo, hi = h["speedup_ci95"]
        verdict = ("faster than HF generate" if lo > 1 else "slower than HF generate" if hi < 1
                   else "not measurably faster or slower than HF generate (the interval holds 1)")
        out.append(f"{label}, `{models[label]['default_policy']}`: layer cost "
                   f"{_pct(h.get('layer_cost_improvement'))} lower, {verdict}, at similarity "
                   f"{_num(h.get('similarity_vs_full'))} to the full answer.")
    return [f"* {line}" for line in out]


def render_markdown(res: dict[str, Any]) -> str:
    labels = list(res["models"])
    exit_cols = res["exit_columns"]
    inputs = []
    for label, m in res["models"].items():
        for f in m.get("folders", []):
            inputs.append([label, f"`{m['source']}`", f"`{f['path']}`",
                           ", ".join(f"`{k}`" for k in f["runs"]) or "–",
                           ", ".join(f["static_layers"]) or "–",
                           ", ".join(f"{k} {v}" for k, v in f["prompts_per_set"].items()),
                           str(f["max_new_tokens"]), str(f["dtype"]), str(f["created"])])
    paper = {"baseline", "LITE"} <= set(labels)  # the paper's comparison: say what the three models are
    parts = [f"# {res.get('title') or DEFAULT_TITLE}"]
    if paper:
        parts.append(
            "LITE (Varshney et al. 2024) fine-tunes a model with a loss at every exit layer so that "
            "intermediate layers can answer, then lets each generated token leave at the first exit "
            "confident enough. Models of the same backbone: **baseline** (fine-tuned with the final "
            "layer's loss only), **LITE** (the paper's recipe: a loss at every exit)"
            + (" and **winner** (our recipe: exit modules trained on the frozen backbone)" if "winner" in labels
               else "")
            + (", beside the **untuned** starting model" if "untuned" in res["models"] else "") + ".")
    parts += [f"Report written {res['date']} by:\n\n```\n{res['command']}\n```", "## What was run",
              _table(["model", "source", "eval folder", "runs", "static layers", "prompts per set",
                      "max new tokens", "dtype", "eval finished"], inputs)]
    if res.get("agreement"):
        a = res["agreement"]
        parts.append(f"Held-out loss and agreement: `{a['file']}` (benchmarks/exit_agreement.py, "
                     f"{a['rows']} held-out rows of `{a['heldout_from']}`, answers of at most "
                     f"{a['max_new_tokens']} tokens, {a['date']}).")
    notes = [f"* {label}: {n}" for label, m in res["models"].items() for n in m.get("notes", [])]
    if notes:
        parts += ["Notes on the inputs:", "\n".join(notes)]
    parts += ["## Headline",
              ("One row per model. Loss and agreement: held-out rows; early-exit figures: the model's "
               "default policy on the eval prompts, every speed figure beside its quality figure (95% "
               "intervals over prompts)."),
              headline_table(labels, res, exit_cols)]
    others = sorted({k for e in res["models"].values() if e.get("agreement") for k in e["agreement"]["layers"]
                     if k < e["agreement"]["num_layers"]} - set(exit_cols))
    if others:
        parts.append(f"Agreement columns: the exits of the evaluated models; exits "
                     f"{', '.join(map(str, others))} of the others are in the per-layer figure.")
    found = findings(labels, res, exit_cols)
    if found:
        parts.append("\n".join(found))
    parts += ["## Per exit layer", "![per-layer figure](plots/per_layer.png)",
              ("Top: held-out cross-entropy of each exit (the last point is the final layer's own loss). "
               "Middle: agreement of each exit's argmax with the final layer's, 95% interval over prompts. "
               "Bottom: similarity to the full answer when every token leaves at that layer (static exit).")]
    parts += ["## Cost against quality, every policy", "![frontier](plots/frontier.png)",
              ("Every max-prob threshold scale (x scale) and learned gate run of every model, with 95% "
               "intervals over prompts on both axes; left of the dotted line is slower than Hugging Face "
               "`generate`."),
              policies_table(res)]
    parts += ["## Exit thresholds"] + thresholds_section(res)
    parts += ["## Sample answers"] + samples_section(res)
    parts += ["## Definitions", DEFINITIONS.rstrip()]
    versions = res["packages"]
    parts += ["## Versions"] + [
        (f"{', '.join(labels_)}: " if len(versions) > 1 else "")
        + ", ".join(f"{k} {v}" for k, v in pk.items() if v) for labels_, pk in versions]
    return "\n\n".join(parts) + "\n"


def write_comparison(out: str | Path, res: dict[str, Any]) -> list[Path]:
    """Write the plots, ``report.md`` and ``report.json`` (each atomically) into ``out``; returns the paths."""
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plot_per_layer({label: e["agreement"] for label, e in res["models"].items() if e.get("agreement")},
                   {label: e["static_similarity"] for label, e in res["models"].items()
                    if e.get("static_similarity")}, out / "plots" / "per_layer.png")
    plot_frontier(res["frontier"], out / "plots" / "frontier.png")
    res["plots"] = ["plots/per_layer.png", "plots/frontier.png"]
    write_atomic(out / "report.md", render_markdown(res))
    write_json_atomic(out / "report.json", json_ready(res))
    return [out / "report.md", out / "report.json", out / "plots" / "per_layer.png", out / "plots" / "frontier.png"]
