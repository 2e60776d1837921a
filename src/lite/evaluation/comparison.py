"""Several ``lite eval`` folders side by side: the numbers of ``lite report`` (rendered by
:mod:`lite.evaluation.comparison_report`).

Each model is one label with one or more ``lite eval --out`` folders (report.json and records.jsonl: runs of
the same model on the same prompts under different policies, merged, the first folder that has a run key
giving it). Optionally the JSON of ``benchmarks/exit_agreement.py`` over the same models (held-out loss and
agreement with the final layer per exit layer), each label naming its model there. Per model and run:
the eval's own summary, and speedup and similarity recomputed per prompt with 95% percentile bootstrap
intervals over prompts (:func:`lite.evaluation.metrics.bootstrap_interval`; similarities from the
embedder ``lite eval`` uses); the calibrated thresholds; sample answers with their exit layers marked.
Nothing is decoded. Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of layers.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LiteError
from .metrics import BOOTSTRAP_DRAWS, BOOTSTRAP_SEED, bootstrap_interval
from .report import parse_run_key
from .samples import SAMPLE_RULE, load_tokenizer, mark_exits, pick_samples, token_pieces

AGREEMENT_SOURCE = "benchmarks/exit_agreement.py"


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
            raise LiteError(f"{flag} {value!r}: give {form}, e.g. {flag} {example}")
        if label in out:
            raise LiteError(f"{flag} {label} is given twice; give each label once")
        out[label] = rest
    return out


def read_eval_folder(path: Path, label: str) -> EvalFolder:
    """report.json and the main model's records of one finished `lite eval` folder."""
    if not path.is_dir():
        raise LiteError(f"{label}: {path} is not a folder; give the --out folder of a `lite eval` run")
    report_file, records_file = path / "report.json", path / "records.jsonl"
    for f in (report_file, records_file):
        if not f.is_file():
            raise LiteError(f"{label}: {path} has no {f.name} (is the eval finished?); rerun "
                             f"`lite eval ... --out {path}` to complete it, or give another folder")
    try:
        report = json.loads(report_file.read_text(encoding="utf-8"))
        records = [json.loads(line) for line in records_file.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
    except json.JSONDecodeError as exc:
        raise LiteError(f"{label}: {path} holds a file that is not JSON ({exc}); rerun the "
                        f"eval into a fresh --out") from None
    for key in ("model", "overall", "config"):
        if key not in report:
            raise LiteError(f"{label}: {report_file} has no {key!r}: not a `lite eval` report")
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
        raise LiteError(f"{label}: the folders hold different models ({detail}); give the "
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


def parse_folders(values: list[str]) -> dict[str, list[Path]]:
    """``lite report``'s FOLDER arguments: ``DIR`` (labelled by the folder's name) or ``LABEL=DIR[,DIR...]``
    (one model's folders, merged under LABEL); a label given twice is refused."""
    out: dict[str, list[Path]] = {}
    for value in values:
        label, sep, rest = value.partition("=") if "=" in value else ("", "", value)
        label, dirs = label.strip(), [Path(d.strip()) for d in rest.split(",") if d.strip()]
        if sep and (not label or not dirs):
            raise LiteError(f"{value!r}: give LABEL=DIR[,DIR...] or DIR, e.g. winner=runs/eval-gate,runs/eval")
        if not dirs:
            raise LiteError("give at least one `lite eval --out` folder, e.g. lite report runs/eval")
        label = label or dirs[0].name or str(dirs[0])
        if label in out:
            raise LiteError(f"the label {label!r} is given twice; give each model one label (LABEL=DIR,DIR "
                            f"merges one model's folders)")
        out[label] = dirs
    if not out:
        raise LiteError("give at least one `lite eval --out` folder, e.g. lite report runs/eval")
    return out


def load_evals(specs: dict[str, list[Path]]) -> dict[str, ModelEval]:
    """Each label's folders read (:func:`read_eval_folder`) and merged (:func:`merge_folders`)."""
    return {label: merge_folders(label, [read_eval_folder(Path(p), label) for p in paths])
            for label, paths in specs.items()}


def load_agreement(path: str | None, labels: dict[str, str]) -> tuple[dict[str, Any] | None, dict[str, dict]]:
    """The agreement JSON and, per label, its model entry (``--agreement-label LABEL=MODELKEY``)."""
    if path is None:
        if labels:
            raise LiteError(f"--agreement-label needs --agreement FILE.json ({AGREEMENT_SOURCE}'s output)")
        return None, {}
    file = Path(path)
    if not file.is_file():
        raise LiteError(f"--agreement {path}: no such file; give the .json that {AGREEMENT_SOURCE} wrote "
                        f"beside its --out")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LiteError(f"--agreement {path} is not JSON ({exc}); give {AGREEMENT_SOURCE}'s .json, not "
                        f"its .md") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise LiteError(f"--agreement {path} has no 'models': not {AGREEMENT_SOURCE}'s output")
    picked = {}
    for label, key in labels.items():
        if key not in models:
            raise LiteError(f"--agreement-label {label}={key}: {path} has no model {key!r}; its "
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
    from .metrics import cosine_similarities

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
    from ..model.config import LiteConfig
    from ..model.loading import resolve_model

    try:
        config = LiteConfig.load(resolve_model(source))
    except Exception:  # noqa: BLE001 -- a model moved since its eval only loses this optional column
        return {}
    return _layer_map(config.thresholds) if config is not None else {}


# ----------------------------------------------------------------------------------- samples
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
    out["answers"] = sample_answers(m, key, chosen, tokenizer)
    return out


# ----------------------------------------------------------------------------------- assembly
def _policy_label(key: str, summary: dict[str, Any]) -> str:
    parsed = parse_run_key(key)
    name = f"x{parsed['threshold_scale']:g}" if parsed["threshold_scale"] is not None else parsed["policy"]
    lci = summary.get("layer_cost_improvement")
    return f"{name}, LCI {100 * lci:.0f}%" if lci is not None else name


def frontier_points(figures: dict[str, dict[str, dict]]) -> list[dict[str, Any]]:
    """Every non-static run of every model with a speedup and a similarity."""
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


def json_ready(res: dict[str, Any]) -> dict[str, Any]:
    """report.json: integer layer keys as strings, the per-prompt lists kept (the samples' rule uses them)."""
    return json.loads(json.dumps(res, default=str))


def compare_evals(folders: dict[str, list[Path]], *, agreement: str | None = None,
                  agreement_labels: dict[str, str] | None = None, samples: int = 3, embedder=None,
                  command: str = "", title: str | None = None) -> dict[str, Any]:
    """The numbers of ``lite report`` (its ``report.json``) from finished ``lite eval`` folders.

    Args:
        folders: {label: one model's eval folders} (:func:`parse_folders`).
        agreement: the JSON of ``benchmarks/exit_agreement.py`` over the same models, or None.
        agreement_labels: {label: that JSON's model key} for the models it holds (a label without eval
            folders is shown by its agreement alone).
        samples: sample answers to show (of the model labelled ``winner``, else the first with a policy).
        embedder: sentence embedder for similarities (default: the one ``lite eval`` uses).
        command: the command line, recorded in the report.
        title: the report's title (default: a generic one).
    Raises:
        LiteError: a folder that is not a finished eval, folders of different models under one label, a bad
            agreement file or label; each message names the input and the fix. Nothing is written.
    """
    if samples < 0:
        raise LiteError(f"--samples must be >= 0, got {samples}")
    evals = load_evals(folders)
    data, picked = load_agreement(agreement, agreement_labels or {})
    if embedder is None:
        from .metrics import MiniLMEmbedder

        embedder = MiniLMEmbedder()
    res = build(evals, data, picked, samples, embedder, command, agreement)
    res["title"] = title
    return res
