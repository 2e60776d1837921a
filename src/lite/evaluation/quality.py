"""The default policy by the quality users get: ``lite calibrate --quality-bar B``.

Calibration chooses thresholds (and the gate's cuts) on teacher-forced agreement with the final layer. What a
user gets is a free-running answer, and one early token that differs changes everything after it. With a
quality bar, calibration decodes some of its prompts with the full model and with each candidate policy: the
calibrated thresholds and gate, and the same with every cut raised by a factor (exits less often,
:data:`SCALES`). It keeps as ``--exit auto`` the candidate that saves the most compute (FLOPs per token of the decoded
answers, against the full model's per token of its own) among those whose quality is at least ``B`` of the full
model's, by :data:`MEASURES` (``--quality-measure``; default ``both``):

* ``rouge``: mean ROUGE-L of the answers against the references, over the full model's, on the rows that have
  one (``references`` in the record counts them);
* ``loglik``: the full model's own judgement, ``exp(mean log-likelihood per token of the candidate's answers
  under the full model - that of its own answers)`` (:func:`lite.evaluation.loglik.answer_logliks`): the
  geometric mean of how much less likely the full model finds each token;
* ``both``: the lower of the two, so a candidate passes only if it keeps ``B`` by each. ROUGE-L against short
  references alone passed nearly every candidate on 63 rows of the every-layer run while the likelihood fell
  13-30% (``benchmarks/results/kept_exits.md``), and the test sets' references then showed the loss.

Without references (or where the full model's answers score 0 against them) ``rouge`` and ``both`` judge by
the likelihood alone; the record's ``measure`` says what was applied.

Both ratios, and ROUGE-L against the full model's answers, are recorded for every candidate
(``calibration.quality`` in ``lite_config.json``). Where none meets the bar, ``auto`` decodes in full. The
prompts are the first ``--quality-prompts`` calibration rows, so the choice is in-sample on them; a few dozen
prompts give a noisy ratio: say how many beside any figure.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..decoding import ExitPolicy, GenerationSettings, generate_batch
from .loglik import answer_logliks
from .metrics import mean, rouge_l
from ..model.config import CONFIDENCE_RANGES, NEVER_EXIT, quality_measure_label

SCALES = (1.0, 1.05, 1.1, 1.2)
"""Factors every cut of a candidate is multiplied by (> 1 exits less; a probability cut above 1 never lets a
token out)."""
MEASURES = ("both", "rouge", "loglik")
"""What the bar applies to (see the module docstring)."""


@dataclass
class Candidate:
    """One judged policy: ``kind`` ("dynamic" or "gate") with its cuts times ``scale``."""

    kind: str
    scale: float
    layers_saved: float  # 1 - mean exit layer / L over the answers' tokens
    compute_saved: float  # 1 - FLOPs per answer token / the full model's per token of its own answers
    rouge_full: float | None  # ROUGE-L F against the full model's answers
    rouge_ref: float | None  # ROUGE-L F against the references (None without them)
    loglik: float | None  # mean per-token log-likelihood of the answers under the full model
    quality: float | None  # the figure the bar applies to (see the module docstring)
    exit_rates: dict[str, float]  # share of the answers' tokens leaving at each exit below L
    rouge_ratio: float | None = None  # rouge_ref over the full model's (None without references)
    loglik_ratio: float | None = None  # exp(loglik - the full model's loglik of its own answers)

    @property
    def name(self) -> str:
        return f"{self.kind}@{self.scale:g}"


def scaled_policy(policy: ExitPolicy, scale: float) -> ExitPolicy:
    """``policy`` with every cut times ``scale``: the thresholds, or the gate's thresholds and its cascade's
    max-prob cuts (a copy of the gate; the classifiers are shared)."""
    if policy.gate is None:  # a cut raised past what the measure can reach is "never" (NEVER_EXIT)
        top = CONFIDENCE_RANGES[policy.confidence][1]
        return replace(policy, thresholds={k: v * scale if v * scale <= top else NEVER_EXIT
                                           for k, v in policy.checks.items()})
    gate = copy.copy(policy.gate)  # probabilities: a cut of 1 lets nothing out
    gate.set_thresholds({k: min(v * scale, 1.0) for k, v in policy.gate.thresholds.items()})  # (as logits too)
    gate.confirm = {k: min(v * scale, 1.0) for k, v in policy.gate.confirm.items()}
    return replace(policy, gate=gate)


def _decode(lm, prompts: list[list[int]], policy: ExitPolicy, max_new_tokens: int, batch_size: int):
    settings = [GenerationSettings(max_new_tokens=max_new_tokens)] * len(prompts)
    return generate_batch(lm, prompts, policy, settings, batch_size=batch_size)


def _loglik(lm, prompts: list[list[int]], runs, batch_size: int) -> float | None:
    """Mean over answers of the full model's mean per-token log-likelihood of each."""
    return mean(answer_logliks(lm, [(p, list(r.token_ids)) for p, r in zip(prompts, runs)], batch_size).values)


def judge(lm, prompts: list[list[int]], refs: list[str | None], policies: dict[str, ExitPolicy], *,
          max_new_tokens: int, batch_size: int = 8, scales=SCALES, measure: str = "both", progress=None
          ) -> tuple[dict[str, Any], list[Candidate]]:
    """Decode ``prompts`` (token ids, formatted as the model is prompted) with the full model and with each of
    ``policies`` ({kind: policy}) at every scale; ``refs``: each prompt's reference answer, or None;
    ``measure``: one of :data:`MEASURES`. Returns (the full model's figures, the candidates)."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, not {measure!r}")
    # ROUGE-L over the prompts that have a reference: one row without one must not switch the measure (it did,
    # silently: 64 held-out rows, one with an empty output, were judged by likelihood)
    referenced = [i for i, ref in enumerate(refs) if ref]

    def rouge_vs_refs(runs) -> float | None:  # None where no prompt has a reference
        return mean([rouge_l(runs[i].text, refs[i]) for i in referenced])

    full = _decode(lm, prompts, ExitPolicy(kind="none"), max_new_tokens, batch_size)
    # per answer token: an answer that runs shorter or longer does not move the choice
    full_per_token = sum(r.cost.flops for r in full) / max(sum(len(r.token_ids) for r in full), 1)
    full_ll = _loglik(lm, prompts, full, batch_size)
    full_rouge = rouge_vs_refs(full)
    by_refs = bool(full_rouge)  # a full model scoring 0 against the references leaves no ratio: likelihood
    applied = ("full_model_likelihood" if measure == "loglik" or not by_refs else
               "rouge_l_vs_references" if measure == "rouge" else "rouge_l_vs_references_and_full_model_likelihood")
    uses_rouge, uses_loglik = applied != "full_model_likelihood", applied != "rouge_l_vs_references"
    base = {"prompts": len(prompts), "references": len(referenced), "rouge_ref": full_rouge, "loglik": full_ll,
            "measure": applied}
    out = []
    for kind, policy in policies.items():
        for scale in scales:
            runs = _decode(lm, prompts, scaled_policy(policy, scale), max_new_tokens, batch_size)
            layers = [t.exit_layer for r in runs for t in r.tokens]
            ll = _loglik(lm, prompts, runs, batch_size)
            rouge_ref = rouge_vs_refs(runs)
            rouge_ratio = rouge_ref / full_rouge if by_refs else None
            loglik_ratio = None if ll is None or full_ll is None else math.exp(ll - full_ll)
            applies = [rouge_ratio] * uses_rouge + [loglik_ratio] * uses_loglik  # "both": the lower
            quality = None if None in applies else min(applies)
            out.append(Candidate(
                kind=kind, scale=scale,
                layers_saved=1 - sum(layers) / (len(layers) * lm.num_layers) if layers else 0.0,
                compute_saved=1 - sum(r.cost.flops for r in runs) / max(sum(len(r.token_ids) for r in runs), 1)
                / full_per_token if full_per_token else 0.0,
                rouge_full=mean([rouge_l(r.text, f.text) for r, f in zip(runs, full)]), rouge_ref=rouge_ref,
                loglik=ll, quality=quality, rouge_ratio=rouge_ratio, loglik_ratio=loglik_ratio,
                exit_rates={str(k): layers.count(k) / len(layers) for k in sorted(set(layers))
                            if k < lm.num_layers} if layers else {}))
            if progress:
                progress(f"quality of {out[-1].name}: {_describe(out[-1])}")
    return base, out


def _describe(c: Candidate) -> str:
    q = "-" if c.quality is None else f"{c.quality:.3f}"
    return f"quality {q} of the full model's, {100 * c.layers_saved:.1f}% of layers, {100 * c.compute_saved:.1f}% of FLOPs saved"


def choose(candidates: list[Candidate], bar: float) -> Candidate | None:
    """The candidate saving the most compute whose quality reaches ``bar`` (ties: the smaller scale), or None
    when none does (``auto`` then decodes in full)."""
    meeting = [c for c in candidates if c.quality is not None and c.quality >= bar - 1e-12]
    return max(meeting, key=lambda c: (c.compute_saved, -c.scale), default=None)


def record(base: dict[str, Any], candidates: list[Candidate], bar: float, chosen: Candidate | None) -> dict[str, Any]:
    """What ``lite_config.json`` keeps (``calibration.quality``)."""
    return {"bar": bar, "measure": base["measure"], "full": base, "candidates": [dict(asdict(c), name=c.name) for c in candidates],
            "chosen": None if chosen is None else chosen.name}


def choose_by_quality(lm, result, prompts: list[list[int]], refs: list[str | None], bar: float, *,
                      max_new_tokens: int = 64, batch_size: int = 8, ranking: list[int] | None = None,
                      measure: str = "both", progress=None) -> Candidate | None:
    """``lite calibrate --quality-bar``: judge the calibrated policies of ``result`` (a
    :class:`lite.calibration.calibrate.CalibrationResult`) on ``prompts`` (with their references ``refs``)
    and make the choice its default: the chosen kind's cuts are scaled in ``result`` (its thresholds, or its
    gate's), and ``result.quality`` holds :func:`record` (which
    :func:`lite.calibration.calibrate.save_calibration` writes, with ``auto`` the chosen kind, or none).
    ``ranking``: the token ranking the exit vocabulary is cut from when it is not yet saved in the model
    folder (``lite calibrate --draft-vocab`` writes it only once the calibration has succeeded)."""
    from ..decoding.spec import exit_vocab_ids

    ids = exit_vocab_ids(lm, result.exit_vocab, "--exit-vocab", ranking=ranking) if result.exit_vocab else None
    policies = {"dynamic": ExitPolicy("dynamic", thresholds=result.thresholds, confidence=result.confidence,
                                      exit_ids=ids)}
    if result.gate is not None:
        policies["gate"] = ExitPolicy("gate", gate=result.gate.gate, exit_ids=ids)
    base, candidates = judge(lm, prompts, refs, policies, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             measure=measure, progress=progress)
    chosen = choose(candidates, bar)
    if chosen is not None and chosen.kind == "dynamic":
        result.thresholds = scaled_policy(policies["dynamic"], chosen.scale).checks
    elif chosen is not None:
        scaled = scaled_policy(policies["gate"], chosen.scale).gate
        result.gate.gate.set_thresholds(scaled.thresholds)
        result.gate.gate.confirm = scaled.confirm
    result.quality = record(base, candidates, bar, chosen)
    if progress:
        progress(f"--quality-bar {bar}: " + (f"--exit auto is {chosen.name} ({_describe(chosen)})" if chosen
                                             else "no candidate meets it: --exit auto decodes in full"))
    return chosen


def quality_table(rec: dict[str, Any]) -> str:
    """:func:`record` as a markdown table, one row per candidate, the chosen one marked."""
    full = rec["full"]
    ref = "-" if full["rouge_ref"] is None else f"{full['rouge_ref']:.3f}"
    ll = "-" if full["loglik"] is None else f"{full['loglik']:.3f}"
    refs = full["references"]
    # a count; older records hold a bool (True == 1, so a plain comparison would mistake a count of 1 for one)
    refs = "" if isinstance(refs, bool) or refs == full["prompts"] else f" ({refs} of them with a reference)"
    lines = [f"Full model on {full['prompts']} prompts{refs}: ROUGE-L against the references {ref}, log-likelihood per "
             f"token {ll}. Quality: {quality_measure_label(rec['measure'])}, over the full model's; bar {rec['bar']}.", "",
             "| candidate | quality | ROUGE-L ratio | likelihood ratio | layers saved | FLOPs saved "
             "| ROUGE-L vs full answer | ROUGE-L vs references | log-likelihood |", "|---|---|---|---|---|---|---|---|---|"]

    def f(v, pct=False):
        return "-" if v is None else f"{100 * v:.1f}%" if pct else f"{v:.3f}"

    for c in rec["candidates"]:
        name = f"**{c['name']}** (chosen)" if c["name"] == rec["chosen"] else c["name"]
        lines.append(f"| {name} | {f(c['quality'])} | {f(c.get('rouge_ratio'))} | {f(c.get('loglik_ratio'))} | "
                     f"{f(c['layers_saved'], True)} | {f(c['compute_saved'], True)} | "
                     f"{f(c['rouge_full'])} | {f(c['rouge_ref'])} | {f(c['loglik'])} |")
    return "\n".join(lines)


__all__ = ["MEASURES", "SCALES", "Candidate", "choose", "choose_by_quality", "judge", "quality_table", "record", "scaled_policy"]
