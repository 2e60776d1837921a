"""The paper's experiment in one report: baseline, LITE and our winner, from outputs that already exist.

Three models tell the story of LITE (Varshney et al. 2024) at small scale:
  baseline  fine-tuned with the final layer's loss only;
  LITE      the paper's recipe, a loss at every exit;
  winner    our recipe, exit modules on the frozen backbone.
This script decodes nothing. It reads, per model, one or more `lite eval` output folders (report.json and
records.jsonl: runs of the same model on the same prompts under different policies, merged), and the JSON
of benchmarks/exit_agreement.py over the same models (held-out loss and agreement with the final layer per
exit layer), and writes into --out-dir:
  report.md          header, headline table, figures, every policy, thresholds, sample answers, definitions;
  report.json        the numbers behind it;
  plots/per_layer.png  held-out CE, agreement with the final layer, static-exit answer similarity per layer;
  plots/frontier.png   wall-clock speedup vs HF generate against similarity to the full model, per policy.
95% intervals of speedup and similarity are percentile bootstraps over prompts (2000 draws, seed 0),
similarities per prompt come from the embedder `lite eval` uses (all-MiniLM-L6-v2, offline).

Run (from the repository root; a minute or so, most of it loading the embedder and tokenizers):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reproduce_report.py \\
        --eval winner=runs/eval-winner-gate,runs/eval-winner --eval LITE=runs/eval-lite-gate,runs/eval-lite \\
        --eval baseline=runs/eval-baseline --agreement runs/agreement.json \\
        --agreement-label baseline=runs/baseline-lora --agreement-label LITE=runs/lite-lora \\
        --agreement-label winner=smollm2-135m-lite --agreement-label untuned=smollm2-135m-instruct \\
        --out-dir results/reproduce
"""

from __future__ import annotations

import argparse
import datetime
import html
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lite.evaluation.metrics import BOOTSTRAP_DRAWS, BOOTSTRAP_SEED, bootstrap_interval
from lite.files import write_atomic, write_json_atomic

NEVER_EXIT_AT = 1.0  # a threshold above any confidence or probability: that layer never lets a token leave
COLORS = {"baseline": "C0", "LITE": "C1", "winner": "C2", "untuned": "grey"}
SAMPLE_RULE = ("among the prompts whose early-exit answer is at least the median similarity to the full "
               "answer, those with the most tokens that left before the final layer (ties: record order).")
MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]#|~])")
DEFINITIONS = """\
* **final-layer held-out loss**: teacher-forced cross-entropy (nats per token) of the final layer L on the
  held-out rows' reference responses (benchmarks/exit_agreement.py, `ce_reference` at layer L); the change
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
  seed 0), prompts resampled with replacement, speedup recomputed as a ratio of sums on each draw.
* **ROUGE-L vs references**: ROUGE-L F of the answers against the Self-Instruct reference outputs (the only
  set with references), early exit / full model.
* **thresholds**: a token leaves at exit k when its confidence (max-prob: the top probability of exit k's
  head) reaches k's threshold; the learned gate instead predicts from the hidden state whether exit k
  agrees with layer L and lets the token leave when that probability reaches the gate threshold.
  Calibration agreement: on the calibration rows, how often layer k agrees with L (all tokens) and how
  often the tokens that would leave at k under the threshold agree (exiting tokens).
"""


class ReportInputError(Exception):
    """A bad command line or input file: the message names the problem and the fix."""


# ----------------------------------------------------------------------------------- inputs
@dataclass
class EvalFolder:
    """One `lite eval` output folder: its report and its main model's complete records."""

    path: Path
    report: dict[str, Any]
    records: list[dict[str, Any]]


@dataclass
class ModelEval:
    """The eval folders of one model, merged: every run key is taken from the first folder that has it."""

    label: str
    folders: list[EvalFolder]
    runs: dict[str, EvalFolder] = field(default_factory=dict)
    static: dict[str, EvalFolder] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def model(self) -> dict[str, Any]:
        return self.folders[0].report["model"]

    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

    @property
    def primary(self) -> str | None:
        """The default policy: the first folder's headline run (else the first run of any folder)."""
        first = self.folders[0].report.get("primary_run")
        return first if first in self.runs else next(iter(self.runs), None)

    def run_summary(self, key: str) -> dict[str, Any]:
        return self.runs[key].report["overall"]["runs"][key]


def parse_pairs(values: list[str], flag: str, form: str, example: str) -> dict[str, str]:
    """``LABEL=VALUE`` flags into a dict, refusing a missing value or a label given twice."""
    out: dict[str, str] = {}
    for value in values:
        label, sep, rest = value.partition("=")
        label, rest = label.strip(), rest.strip()
        if not sep or not label or not rest:
            raise ReportInputError(f"{flag} {value!r}: give {form}, e.g. {flag} {example}")
        if label in out:
            raise ReportInputError(f"{flag} {label} is given twice; give each label once")
        out[label] = rest
    return out


def read_eval_folder(path: Path, label: str) -> EvalFolder:
    """report.json and the main model's records of one finished `lite eval` folder."""
    if not path.is_dir():
        raise ReportInputError(f"--eval {label}: {path} is not a folder; give the --out folder of a "
                               f"`lite eval` run")
    report_file, records_file = path / "report.json", path / "records.jsonl"
    for f in (report_file, records_file):
        if not f.is_file():
            raise ReportInputError(f"--eval {label}: {path} has no {f.name} (is the eval finished?); rerun "
                                   f"`lite eval ... --out {path}` to complete it, or give another folder")
    try:
        report = json.loads(report_file.read_text(encoding="utf-8"))
        records = [json.loads(line) for line in records_file.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
    except json.JSONDecodeError as exc:
        raise ReportInputError(f"--eval {label}: {path} holds a file that is not JSON ({exc}); rerun the "
                               f"eval into a fresh --out") from None
    for key in ("model", "overall", "config"):
        if key not in report:
            raise ReportInputError(f"--eval {label}: {report_file} has no {key!r}: not a `lite eval` report")
    hashed = report.get("config_hash")
    records = [r for r in records if r.get("role", "main") == "main" and not r.get("skipped")
               and (hashed is None or r.get("config_hash") in (None, hashed))]
    return EvalFolder(path, report, records)


def merge_folders(label: str, folders: list[EvalFolder]) -> ModelEval:
    """One model's folders, checked to be one model on the same prompts; runs merged, first key wins."""
    m = ModelEval(label, folders)
    shape = [(f.report["model"]["num_layers"], f.report["model"]["exit_layers"]) for f in folders]
    if len(set(map(str, shape))) > 1:
        detail = "; ".join(f"{f.path}: L={s[0]}, exits {s[1]}" for f, s in zip(folders, shape))
        raise ReportInputError(f"--eval {label}: the folders hold different models ({detail}); give the "
                               f"folders of one model per label")
    sources = {str(f.report["model"]["source"]) for f in folders}
    if len(sources) > 1:
        m.notes.append(f"its folders name the model differently ({', '.join(sorted(sources))})")
    prompts = [{(r["testset"], r["id"]) for r in f.records} for f in folders]
    if any(p != prompts[0] for p in prompts[1:]):
        m.notes.append("its folders do not hold the same prompts; each run is summarised over its own "
                       "folder's")
    for f in folders:
        for key in f.report["overall"].get("runs", {}):
            m.runs.setdefault(key, f)
        for k in f.report["overall"].get("static_layers", {}):
            m.static.setdefault(str(k), f)
    return m


def load_evals(specs: dict[str, str]) -> dict[str, ModelEval]:
    out = {}
    for label, dirs in specs.items():
        paths = [Path(d.strip()) for d in dirs.split(",") if d.strip()]
        if not paths:
            raise ReportInputError(f"--eval {label}=: give at least one folder, e.g. "
                                   f"--eval {label}=runs/eval-x")
        out[label] = merge_folders(label, [read_eval_folder(p, label) for p in paths])
    return out


def load_agreement(path: str | None, labels: dict[str, str]) -> tuple[dict[str, Any] | None, dict[str, dict]]:
    """The agreement JSON and, per label, its model entry (``--agreement-label LABEL=MODELKEY``)."""
    if path is None:
        if labels:
            raise ReportInputError("--agreement-label needs --agreement FILE.json (benchmarks/"
                                   "exit_agreement.py's output)")
        return None, {}
    file = Path(path)
    if not file.is_file():
        raise ReportInputError(f"--agreement {path}: no such file; give the .json that benchmarks/"
                               f"exit_agreement.py wrote beside its --out")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportInputError(f"--agreement {path} is not JSON ({exc}); give exit_agreement.py's .json, not "
                               f"its .md") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ReportInputError(f"--agreement {path} has no 'models': not benchmarks/exit_agreement.py's "
                               f"output")
    picked = {}
    for label, key in labels.items():
        if key not in models:
            raise ReportInputError(f"--agreement-label {label}={key}: {path} has no model {key!r}; its "
                                   f"models are {', '.join(map(repr, models))}")
        picked[label] = models[key]
    return data, picked


# ----------------------------------------------------------------------------------- numbers
def bootstrap(hf_seconds: np.ndarray, run_seconds: np.ndarray, sims: np.ndarray) -> dict[str, list[float] | None]:
    """95% percentile intervals over prompts of sum(hf)/sum(run) and mean(sims), the same draws for both
    (:func:`lite.evaluation.metrics.bootstrap_interval`, one seed)."""
    return {"similarity_ci95": list(bootstrap_interval(sims)),
            "speedup_ci95": list(bootstrap_interval(hf_seconds, run_seconds)) if hf_seconds.size else None}


def similarity_table(evals: dict[str, ModelEval], embedder) -> dict[tuple[str, str], float]:
    """Cosine similarity of every (run answer, full answer) pair the report needs, embedded once."""
    from lite.evaluation.metrics import cosine_similarities

    pairs = list(dict.fromkeys((r["runs"][key]["text"], r["full"]["text"])
                               for m in evals.values() for key, f in m.runs.items()
                               for r in f.records if key in r.get("runs", {})))
    values = cosine_similarities(embedder, [a for a, _ in pairs], [b for _, b in pairs]) if pairs else []
    return dict(zip(pairs, values))


def run_figures(m: ModelEval, key: str, sims: dict[tuple[str, str], float]) -> dict[str, Any]:
    """One run's figures: the eval's own summary, plus speedup and similarity recomputed per prompt with
    their bootstrap intervals, and the per-prompt values the samples are chosen from."""
    rows = [r for r in m.runs[key].records if key in r.get("runs", {})]
    summary = m.run_summary(key)
    if not rows:
        return {**summary, "n": 0, "speedup_ci95": None, "similarity_ci95": None, "per_prompt": []}
    sim = np.array([sims[(r["runs"][key]["text"], r["full"]["text"])] for r in rows])
    timed = all(r.get("hf") for r in rows)
    hf = np.array([r["hf"]["seconds"] for r in rows]) if timed else np.array([])
    run = np.array([r["runs"][key]["seconds"] for r in rows])
    L = m.num_layers
    per_prompt = [{"testset": r["testset"], "id": r["id"], "similarity": float(s),
                   "exited_tokens": sum(k < L for k in r["runs"][key]["exit_layers"]),
                   "tokens": len(r["runs"][key]["exit_layers"])} for r, s in zip(rows, sim)]
    return {**summary, "n": len(rows),
            "speedup": float(hf.sum() / run.sum()) if timed and run.sum() > 0 else None,
            "similarity_vs_full": float(sim.mean()), **bootstrap(hf, run, sim), "per_prompt": per_prompt}


def static_similarity(m: ModelEval) -> dict[int, float]:
    """Similarity to the full answer of static exit at every layer the evals ran, and 1 at layer L."""
    out = {}
    for k, f in m.static.items():
        value = f.report["overall"]["static_layers"][k].get("similarity_vs_full")
        if value is not None:
            out[int(k)] = float(value)
    if out:
        out[m.num_layers] = 1.0
    return dict(sorted(out.items()))


def agreement_figures(entry: dict[str, Any]) -> dict[str, Any]:
    L = int(entry["num_layers"])
    layers = {int(k): v for k, v in entry["layers"].items()}
    final = entry.get("final_layer_reference_loss", layers.get(L, {}).get("ce_reference"))
    return {"spec": entry.get("spec"), "num_layers": L, "final_layer_loss": final,
            "layers": {k: {"agreement": v.get("agreement"), "agreement_ci95": v.get("agreement_ci95"),
                           "ce_reference": v.get("ce_reference"),
                           "kl_final_to_exit": v.get("kl_final_to_exit")} for k, v in sorted(layers.items())}}


def _layer_map(values: Any) -> dict[int, Any]:
    return {int(k): v for k, v in values.items()} if isinstance(values, dict) else {}


def threshold_rows(m: ModelEval) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per exit layer below L: max-prob threshold, gate threshold, calibration agreement; and where the
    max-prob thresholds came from."""
    L = m.num_layers
    calibration = next((f.report["model"].get("calibration") for f in m.folders
                        if f.report["model"].get("calibration")), None) or {}
    gate = calibration.get("gate") or {}
    ran = next((f.report["model"] for f in m.folders if f.report["model"].get("thresholds")), None)
    thresholds, origin = ({}, None) if ran is None else (_layer_map(ran["thresholds"]), "report")
    if not thresholds and calibration:
        thresholds, origin = _lite_config_thresholds(str(m.model["source"])), "lite_config"
    rows = []
    for k in [k for k in m.model["exit_layers"] if k < L]:
        rows.append({"layer": k, "threshold": thresholds.get(k),
                     "gate_threshold": _layer_map(gate.get("thresholds")).get(k),
                     "agreement": _layer_map(calibration.get("agreement")).get(k),
                     "exit_agreement": _layer_map(calibration.get("exit_agreement")).get(k),
                     "gate_exit_agreement": _layer_map(gate.get("exit_agreement")).get(k)})
    info = {"confidence": (ran or {}).get("confidence") or calibration.get("confidence") or "max_prob",
            "origin": origin if thresholds else None, "rule": calibration.get("rule"),
            "parameters": calibration.get("parameters"), "examples": calibration.get("examples"),
            "tokens": calibration.get("tokens"), "gate": bool(gate)}
    return rows, info


def _lite_config_thresholds(source: str) -> dict[int, float]:
    """The calibrated thresholds in the model's lite_config.json (for a model whose evals ran only its
    gate); empty when the model cannot be found here."""
    from lite.model.config import LiteConfig
    from lite.model.loading import resolve_model

    try:
        config = LiteConfig.load(resolve_model(source))
    except Exception:  # noqa: BLE001 -- a model moved since its eval only loses this optional column
        return {}
    return _layer_map(config.thresholds) if config is not None else {}


# ----------------------------------------------------------------------------------- samples
def pick_samples(per_prompt: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The documented rule: among prompts whose similarity to the full answer is at least the median, those
    with the most early-exited tokens (ties: the order of the records)."""
    if not per_prompt or count <= 0:
        return []
    median = float(np.median([p["similarity"] for p in per_prompt]))
    kept = [(i, p) for i, p in enumerate(per_prompt) if p["similarity"] >= median]
    kept.sort(key=lambda item: (-item[1]["exited_tokens"], item[0]))
    return [p for _, p in kept[:count]]


def load_tokenizer(source: str):
    """The tokenizer of an eval's model without loading its weights: the resolved folder's own tokenizer,
    else (an adapter or exit-module folder) its base model's, followed as `lite.load_model` does."""
    from transformers import AutoTokenizer

    from lite.model.config import LiteConfig
    from lite.model.loading import adapter_base, resolve_model

    spec, seen = source, set()
    while spec not in seen:
        seen.add(spec)
        folder = Path(resolve_model(spec))
        if not folder.is_dir() or (folder / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        config = LiteConfig.load(folder)
        spec = (config.base_model if config is not None and config.base_model else None) or \
            adapter_base(str(folder))
        if spec is None:
            break
    raise ReportInputError(f"the model {source!r} has no tokenizer files and names no base model; the "
                           f"samples need its tokenizer")


def token_pieces(tokenizer, token_ids: list[int]) -> list[str]:
    """The text each token added, as the engine streams it (a partial UTF-8 character waits for the token
    that completes it; special tokens add nothing)."""
    from lite.decoding.sampling import TextStream

    stream = TextStream(tokenizer)
    pieces = [stream.push(t)[0] for t in token_ids]
    if pieces:
        pieces[-1] += stream.flush()
    return pieces


def _escape(text: str) -> str:
    return MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(text, quote=False))


def mark_exits(pieces: list[str], exit_layers: list[int], num_layers: int) -> str:
    """Markdown of an answer with ``<sup>k</sup>`` after every piece whose token left at k < L (a token that
    added no text, such as end-of-sequence, passes its mark to the next piece; a piece of line breaks only
    that left early is shown as ↵ before them)."""
    out, pending = [], []
    for piece, k in zip(pieces, exit_layers):
        if k < num_layers:
            pending.append(str(k))
        if not piece:
            continue
        body = piece.rstrip("\n")
        sup = f"<sup>{','.join(pending)}</sup>" if pending else ""
        shown = "↵" if sup and not body else _escape(body)  # a line break that left early stays visible
        out.append(shown + sup + piece[len(body):])
        pending = []
    if pending:
        out.append(f"<sup>{','.join(pending)}</sup>")
    return "".join(out)


def blockquote(text: str) -> str:
    """Markdown text as a block quote that keeps its line breaks and indentation (leading spaces as
    non-breaking ones, so that an indented line does not turn into a code block)."""
    lines = []
    for line in text.split("\n"):
        body = line.lstrip(" ")
        lines.append(f"> {'&nbsp;' * (len(line) - len(body))}{body}  " if line.strip() else ">")
    return "\n".join(lines)


def sample_answers(m: ModelEval, key: str, chosen: list[dict[str, Any]], tokenizer) -> list[dict[str, Any]]:
    folder = m.runs[key]
    index = {(r["testset"], r["id"]): r for r in folder.records}
    out = []
    for p in chosen:
        r = index[(p["testset"], p["id"])]
        run = r["runs"][key]
        sample = {**p, "instruction": r["instruction"], "input": r.get("input") or "",
                  "full": r["full"]["text"], "early_exit": run["text"], "exit_layers": run["exit_layers"]}
        if tokenizer is not None:
            pieces = token_pieces(tokenizer, run["token_ids"])
            sample["pieces_match_text"] = "".join(pieces) == run["text"]
            sample["marked"] = mark_exits(pieces, run["exit_layers"], m.num_layers)
        out.append(sample)
    return out


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


def _policy_label(key: str, summary: dict[str, Any]) -> str:
    from lite.evaluation.report import parse_run_key

    parsed = parse_run_key(key)
    name = f"x{parsed['threshold_scale']:g}" if parsed["threshold_scale"] is not None else parsed["policy"]
    lci = summary.get("layer_cost_improvement")
    return f"{name}, LCI {100 * lci:.0f}%" if lci is not None else name


def frontier_points(figures: dict[str, dict[str, dict]]) -> list[dict[str, Any]]:
    """Every non-static run of every model with a speedup and a similarity."""
    from lite.evaluation.report import parse_run_key

    points = []
    for label, runs in figures.items():
        for key, f in runs.items():
            parsed = parse_run_key(key)
            if parsed["policy"].startswith("static") or f.get("speedup") is None or not f.get("n"):
                continue
            points.append({"label": label, "run": key, **parsed, "speedup": f["speedup"],
                           "speedup_ci95": f["speedup_ci95"], "similarity": f["similarity_vs_full"],
                           "similarity_ci95": f["similarity_ci95"],
                           "layer_cost_improvement": f.get("layer_cost_improvement"),
                           "text": _policy_label(key, f)})
    return points


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


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(row) + " |" for row in rows])


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
                  "**Instruction**", blockquote(_escape(instruction)),
                  "**Full model**", blockquote(_escape(a["full"])),
                  "**Early exit**", blockquote(a.get("marked") or _escape(a["early_exit"]))]
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
    parts = ["# The paper's experiment: baseline, LITE and our recipe",
             "LITE (Varshney et al. 2024) fine-tunes a model with a loss at every exit layer so that "
             "intermediate layers can answer, then lets each generated token leave at the first exit "
             "confident enough. Three models of the same backbone: **baseline** (fine-tuned with the final "
             "layer's loss only), **LITE** (the paper's recipe: a loss at every exit) and **winner** (our "
             "recipe: exit modules trained on the frozen backbone)"
             + (", beside the **untuned** starting model" if "untuned" in res["models"] else "") + ".",
             f"Report written {res['date']} by:\n\n```\n{res['command']}\n```",
             "## What was run",
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


# ----------------------------------------------------------------------------------- assembly
def build(evals: dict[str, ModelEval], agreement_data: dict[str, Any] | None, agreement: dict[str, dict],
          samples: int, embedder, command: str, agreement_file: str | None) -> dict[str, Any]:
    """Every number of the report (``report.json``), the plots' data included."""
    sims = similarity_table(evals, embedder)
    labels = list(evals) + [label for label in agreement if label not in evals]
    base = agreement_figures(agreement["baseline"]) if "baseline" in agreement else None
    models: dict[str, Any] = {}
    for label in labels:
        entry: dict[str, Any] = {}
        if label in agreement:
            a = agreement_figures(agreement[label])
            entry["agreement"] = a
            entry["source"] = a["spec"]
            if base and base["final_layer_loss"] and a["final_layer_loss"] is not None:
                entry["final_layer_loss_change"] = a["final_layer_loss"] / base["final_layer_loss"] - 1
        if label in evals:
            m = evals[label]
            entry["source"] = str(m.model["source"])
            entry["num_layers"] = m.num_layers
            entry["exit_layers"] = m.model["exit_layers"]
            entry["folders"] = [_folder_info(f) for f in m.folders]
            entry["notes"] = m.notes
            entry["runs"] = {key: run_figures(m, key, sims) for key in m.runs}
            entry["default_policy"] = m.primary
            entry["headline"] = entry["runs"].get(m.primary) if m.primary else None
            entry["static_similarity"] = static_similarity(m)
            rows, info = threshold_rows(m)
            entry["thresholds"] = {"rows": rows, "info": info}
        models[label] = entry
    exit_cols = _exit_columns([models[label] for label in evals]) or _exit_columns(list(models.values()))
    res: dict[str, Any] = {"command": command, "date": datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), "models": models, "exit_columns": exit_cols,
        "bootstrap": f"95% percentile bootstrap over prompts, {BOOTSTRAP_DRAWS} draws, seed {BOOTSTRAP_SEED}",
        "similarity_model": getattr(embedder, "name", type(embedder).__name__)}
    if agreement_data is not None:
        res["agreement"] = {"file": agreement_file, "rows": agreement_data.get("rows"),
                            "heldout_from": agreement_data.get("heldout_from"),
                            "max_new_tokens": agreement_data.get("max_new_tokens"),
                            "date": agreement_data.get("date"), "command": agreement_data.get("command")}
    res["samples"] = _samples(evals, models, samples)
    res["frontier"] = frontier_points({label: e.get("runs", {}) for label, e in models.items()})
    res["packages"] = _packages(evals)
    return res


def _exit_columns(entries: list[dict[str, Any]]) -> list[int]:
    """The agreement table's exit layers: those below L that these models were measured at."""
    return sorted({k for e in entries if e.get("agreement")
                   for k in e["agreement"]["layers"] if k < e["agreement"]["num_layers"]})


def _folder_info(f: EvalFolder) -> dict[str, Any]:
    r = f.report
    return {"path": str(f.path), "runs": list(r["overall"].get("runs", {})),
            "static_layers": [str(k) for k in r["overall"].get("static_layers", {})],
            "prompts_per_set": {name: s.get("n") for name, s in r.get("testsets", {}).items()},
            "max_new_tokens": r["config"].get("max_new_tokens"), "dtype": r["model"].get("dtype"),
            "created": r.get("created"), "primary_run": r.get("primary_run")}


def _samples(evals: dict[str, ModelEval], models: dict[str, Any], count: int) -> dict[str, Any] | None:
    label = "winner" if "winner" in evals and evals["winner"].primary else \
        next((lb for lb, m in evals.items() if m.primary), None)
    if label is None or count <= 0:
        return None
    m = evals[label]
    key = m.primary
    chosen = pick_samples(models[label]["runs"][key]["per_prompt"], count)
    out: dict[str, Any] = {"label": label, "run": key, "num_layers": m.num_layers,
                           "rule": SAMPLE_RULE, "answers": []}
    tokenizer = None
    if chosen:
        try:
            tokenizer = load_tokenizer(str(m.model["source"]))
        except Exception as exc:  # noqa: BLE001 -- the samples still show, without exit marks
            out["tokenizer_error"] = str(exc).splitlines()[0]
            print(f"reproduce_report: no exit marks in the samples: {out['tokenizer_error']}",
                  file=sys.stderr)
    out["answers"] = sample_answers(m, key, chosen, tokenizer)
    return out


def _packages(evals: dict[str, ModelEval]) -> list[tuple[list[str], dict[str, str]]]:
    """Distinct package-version sets of the evals, each with the models that ran under it."""
    groups: dict[str, tuple[list[str], dict[str, str]]] = {}
    for label, m in evals.items():
        for f in m.folders:
            packages = f.report.get("packages") or {}
            key = json.dumps(packages, sort_keys=True)
            names, _ = groups.setdefault(key, ([], packages))
            if label not in names:
                names.append(label)
    return list(groups.values())


def _json_ready(res: dict[str, Any]) -> dict[str, Any]:
    """report.json: integer layer keys as strings, the per-prompt lists kept (the samples' rule uses them)."""
    return json.loads(json.dumps(res, default=str))


def main(argv: list[str] | None = None, embedder=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", action="append", default=[], metavar="LABEL=DIR[,DIR...]", required=True,
                    help="a model's lite eval output folders (repeatable; labels baseline, LITE, winner)")
    ap.add_argument("--agreement", default=None, metavar="FILE.json",
                    help="benchmarks/exit_agreement.py's JSON over the same models")
    ap.add_argument("--agreement-label", action="append", default=[], metavar="LABEL=MODELKEY",
                    help="which model of the agreement JSON (its --model spec) a label is (repeatable; "
                         "'untuned' is drawn dashed)")
    ap.add_argument("--samples", type=int, default=3, help="sample answers to show (default 3)")
    ap.add_argument("--out-dir", default="results/reproduce", help="where report.md, report.json, plots/ go")
    args = ap.parse_args(argv)
    command = shlex.join([".venv/bin/python", "benchmarks/reproduce_report.py",
                          *(sys.argv[1:] if argv is None else argv)])
    try:
        evals = load_evals(parse_pairs(args.eval, "--eval", "LABEL=DIR[,DIR...]",
                                       "winner=runs/eval-winner-gate,runs/eval-winner"))
        data, agreement = load_agreement(args.agreement, parse_pairs(
            args.agreement_label, "--agreement-label", "LABEL=MODELKEY", "LITE=runs/lite-lora"))
        if args.samples < 0:
            raise ReportInputError(f"--samples must be >= 0, got {args.samples}")
    except ReportInputError as exc:
        print(f"reproduce_report.py: error: {exc}", file=sys.stderr)
        return 2
    if embedder is None:
        from lite.evaluation.metrics import MiniLMEmbedder

        embedder = MiniLMEmbedder()
    res = build(evals, data, agreement, args.samples, embedder, command, args.agreement)
    out = Path(args.out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plot_per_layer({label: e["agreement"] for label, e in res["models"].items() if e.get("agreement")},
                   {label: e["static_similarity"] for label, e in res["models"].items()
                    if e.get("static_similarity")}, out / "plots" / "per_layer.png")
    plot_frontier(res["frontier"], out / "plots" / "frontier.png")
    res["plots"] = ["plots/per_layer.png", "plots/frontier.png"]
    write_atomic(out / "report.md", render_markdown(res))
    write_json_atomic(out / "report.json", _json_ready(res))
    print(f"wrote {out / 'report.md'}, {out / 'report.json'} and {out / 'plots'}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
