"""The ceiling of early exit on a model, and how much of it each decision rule reaches.

Both are measured teacher-forced on the model's own greedy answers (exits off), with the statistics that
calibration collects (:func:`lite.calibration.calibrate.collect`, through the one teacher-forced scorer
:func:`lite.calibration.scoring.score_sequences`: every exit's confidences, whether its argmax equals layer L's,
its normed state for the gate):

* the *oracle*: each token leaves at the first exit whose argmax equals layer L's (at L when none does). Its
  layer saving, ``1 - mean(exit layer) / L``, is what no decision rule can beat with these exits; every token
  it emits is layer L's.
* the *frontier* of a decision rule: one cut ``c`` at every exit, a token leaving at the first exit whose
  score reaches ``c`` (the cascade of :func:`lite.calibration.thresholds.cascade_stats`); as ``c`` varies,
  the layer saving against the share of emitted tokens equal to layer L's (agreement; a token that reaches L
  counts as agreeing). Rules: the confidences of :mod:`lite.decoding.confidence` (max-prob, margin,
  entropy, state cosine) and the learned gate's probability when the model has one.
* *policies*: where the model's calibrated policies sit on the same tokens: the per-layer thresholds of its
  confidence (``dynamic``) and the gate with its per-layer cuts (``gate``); ``default`` names the one
  ``--exit auto`` decodes with.

With an exit vocabulary (``lite calibrate --exit-vocab``) the exits' confidences and argmax are read over
it, as they decode; the oracle then counts a token as agreeing only when the exit vocabulary's argmax is
layer L's token. Layer numbering: layer k = output of decoder block k, 1-indexed; L = the number of layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..decoding import confidence as conf_mod
from ..errors import LiteError
from .calibrate import CalibrationData, expected_agreement
from .thresholds import cascade_stats

GATE = "gate"
CUTS = 60  # cuts per rule: quantiles of the rule's scores over all exits and tokens
AGREEMENT_BARS = (0.90, 0.95)  # where the report reads each frontier's saving


@dataclass(frozen=True)
class FrontierPoint:
    """What one decision (a cut, or per-layer thresholds) does on the scored tokens.

    Attributes:
        cut: the cut applied at every exit (NaN for a policy's per-layer thresholds).
        saving: layer saving, ``1 - mean(exit layer) / L``.
        agreement: share of tokens whose emitted token equals layer L's.
    """

    cut: float
    saving: float
    agreement: float


@dataclass
class Ceiling:
    """The oracle, each rule's frontier and the calibrated policies' points on one set of tokens.

    Attributes:
        layers: the exits below L that were measured, increasing. num_layers: L.
        tokens / examples: how many tokens (answer positions) of how many answers were scored.
        oracle_saving: ``1 - mean(first agreeing exit, else L) / L``.
        oracle_share: {layer: share of tokens whose first agreeing exit it is}; L: the rest.
        agreement: {layer: share of tokens whose argmax equals layer L's}.
        frontiers: {rule: points for increasing cuts, the last one letting no token leave}.
        policies: {"dynamic" | "gate": the calibrated policy's point}.
        default: the policy ``--exit auto`` decodes with (``lite_config.json``'s), or None.
        exit_vocab: the exit vocabulary the exits were read over (None: the full head).
        source: how the tokens were made ("generated": the model's own greedy answers).
        confidence: the measure the ``dynamic`` policy's thresholds belong to.
    """

    layers: list[int]
    num_layers: int
    tokens: int
    examples: int
    oracle_saving: float
    oracle_share: dict[int, float]
    agreement: dict[int, float]
    frontiers: dict[str, list[FrontierPoint]] = field(default_factory=dict)
    policies: dict[str, FrontierPoint] = field(default_factory=dict)
    default: str | None = None
    exit_vocab: int | None = None
    source: str = "generated"
    confidence: str = "max_prob"

    def saving_at(self, rule: str, agreement: float) -> float:
        """The largest saving of ``rule``'s frontier among cuts whose agreement reaches ``agreement`` (0.0:
        only letting no token leave does)."""
        return max((p.saving for p in self.frontiers[rule] if p.agreement >= agreement - 1e-12), default=0.0)

    def record(self) -> dict[str, Any]:
        """JSON-safe: the summary (oracle, saving at each agreement bar, policies) and every frontier point."""
        return {
            "layers": list(self.layers), "num_layers": self.num_layers, "tokens": self.tokens,
            "examples": self.examples, "source": self.source, "exit_vocab": self.exit_vocab,
            "oracle_saving": round(self.oracle_saving, 4),
            "oracle_share": {str(k): round(v, 4) for k, v in self.oracle_share.items()},
            "agreement": {str(k): round(v, 4) for k, v in self.agreement.items()},
            "saving_at_agreement": {rule: {f"{bar:.2f}": round(self.saving_at(rule, bar), 4)
                                           for bar in AGREEMENT_BARS} for rule in self.frontiers},
            "policies": {k: _point_record(p) for k, p in self.policies.items()}, "default": self.default,
            "confidence": self.confidence,
            "frontiers": {rule: [_point_record(p) for p in pts] for rule, pts in self.frontiers.items()},
        }


def _point_record(p: FrontierPoint) -> dict[str, float | None]:
    return {k: (None if np.isnan(v) else round(float(v), 4)) for k, v in asdict(p).items()}


def oracle_layers(agree: np.ndarray, layers: list[int], num_layers: int) -> np.ndarray:
    """Per token, the first exit whose argmax equals layer L's, else L: (N,) int.

    Args:
        agree: (E, N) bool, exit i's argmax equals layer L's at token n.
        layers: the E exit layers, increasing.
    """
    agree = np.asarray(agree, dtype=bool)
    first = np.argmax(agree, axis=0)  # (N,) index of the first True (0 when none)
    out = np.asarray(layers, dtype=np.int64)[first]
    out[~agree.any(axis=0)] = num_layers
    return out


def oracle_saving(agree: np.ndarray, layers: list[int], num_layers: int) -> float:
    """The share of layers saved if every token left at the first exit agreeing with layer L
    (:func:`oracle_layers`; arguments as there)."""
    return float(1.0 - oracle_layers(agree, layers, num_layers).mean() / num_layers)


def point(scores: np.ndarray, agree: np.ndarray, cuts: np.ndarray, layers: list[int], num_layers: int,
          cut: float = float("nan")) -> FrontierPoint:
    """The saving and agreement of per-layer ``cuts`` (E,) on ``scores`` (E, N): a token leaves at the first
    exit whose score reaches its cut (:func:`lite.calibration.thresholds.cascade_stats`)."""
    stats = cascade_stats(scores, agree, np.asarray(cuts, dtype=np.float64))
    mean_layer = sum((0.0 if np.isnan(r) else r) * k for r, k in zip(stats.exit_rate, layers))
    mean_layer += (0.0 if np.isnan(stats.final_rate) else stats.final_rate) * num_layers
    return FrontierPoint(cut=float(cut), saving=float(1.0 - mean_layer / num_layers),
                         agreement=expected_agreement(stats))


def frontier(scores: np.ndarray, agree: np.ndarray, layers: list[int], num_layers: int,
             cuts: int = CUTS) -> list[FrontierPoint]:
    """One rule's frontier: :func:`point` for ``cuts`` cuts at the quantiles of ``scores`` (one cut at every
    exit), increasing, then a cut above every score (no token leaves: saving 0, agreement 1)."""
    finite = scores[np.isfinite(scores)]
    values = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, cuts))) if finite.size else np.array([])
    e = len(layers)
    points = [point(scores, agree, np.full(e, c), layers, num_layers, float(c)) for c in values]
    return points + [point(scores, agree, np.full(e, np.inf), layers, num_layers, float("inf"))]


def gate_scores(gate, data: CalibrationData, layers: list[int]) -> np.ndarray:
    """The learned gate's probability that each exit agrees with layer L, (E, N), from the collected normed
    states; an exit the gate does not cover scores -inf (no token leaves there)."""
    if data.states is None:
        raise LiteError("the gate's frontier needs the normed states: collect with with_states=True")
    rows = []
    with torch.no_grad():
        for k in layers:
            i = data.layers.index(k)
            if k in gate.thresholds:
                rows.append(gate.probability(k, torch.from_numpy(data.states[i])).numpy().astype(np.float64))
            else:
                rows.append(np.full(data.tokens, -np.inf))
    return np.stack(rows)


def ceiling(data: CalibrationData, *, gate=None, thresholds: dict[int, float] | None = None,
            confidence: str = "max_prob", default: str | None = None, layers: list[int] | None = None,
            cuts: int = CUTS) -> Ceiling:
    """The oracle, every rule's frontier and the calibrated policies' points on collected tokens.

    Args:
        data: statistics of :func:`lite.calibration.calibrate.collect`, best with ``source="generated"``
            (the model's own greedy answers) and, for the gate, ``with_states=True``.
        gate: the model's :class:`lite.decoding.gate.LearnedExitGate` (its frontier, and with its own cuts
            the ``gate`` policy), or None.
        thresholds: the calibrated per-layer thresholds of ``confidence`` (the ``dynamic`` policy), or None.
        default: the policy ``--exit auto`` decodes with, to mark in the report.
        layers: measure only these exits (a subset of ``data.layers``: what fewer exits would reach). State
            cosine compares consecutive checked exits, so its frontier is left out for a proper subset.
        cuts: cuts per rule.
    Raises:
        LiteError: a layer that was not measured, or no tokens.
    """
    layers = list(data.layers) if layers is None else sorted(set(layers))
    missing = [k for k in layers if k not in data.layers]
    if missing or not layers:
        raise LiteError(f"exit layers {missing or layers} were not measured (measured: {data.layers})")
    if data.tokens == 0:
        raise LiteError("no scored tokens: nothing to measure the ceiling on")
    rows = [data.layers.index(k) for k in layers]
    agree = data.agree[rows]
    L = data.num_layers
    exits = oracle_layers(agree, layers, L)
    out = Ceiling(
        layers=layers, num_layers=L, tokens=data.tokens, examples=data.examples,
        oracle_saving=oracle_saving(agree, layers, L),
        oracle_share={k: float((exits == k).mean()) for k in [*layers, L]},
        agreement={k: float(agree[j].mean()) for j, k in enumerate(layers)},
        default=default, exit_vocab=data.exit_vocab, source=data.source, confidence=confidence,
    )
    subset = layers != list(data.layers)
    for name in conf_mod.MEASURES:
        if name == "state_cosine" and subset:
            continue
        out.frontiers[name] = frontier(data.confidences[name][rows].astype(np.float64), agree, layers, L, cuts)
    if gate is not None and data.states is not None:
        scores = gate_scores(gate, data, layers)
        out.frontiers[GATE] = frontier(scores, agree, layers, L, cuts)
        own = np.array([gate.thresholds.get(k, np.inf) for k in layers], dtype=np.float64)
        confirm = getattr(gate, "confirm", None) or {}
        if confirm:  # the cascade: where the gate passes, the exit's max-prob decides against its own cut
            passed = scores >= own[:, None]
            maxprob = data.confidences["max_prob"][rows].astype(np.float64)
            cut = np.array([confirm.get(k, np.inf) for k in layers], dtype=np.float64)
            out.policies[GATE] = point(np.where(passed, maxprob, -np.inf), agree, cut, layers, L)
        else:
            out.policies[GATE] = point(scores, agree, own, layers, L)
    if thresholds and not (confidence == "state_cosine" and subset):
        cut = np.array([thresholds.get(k, np.inf) for k in layers], dtype=np.float64)
        out.policies["dynamic"] = point(data.confidences[confidence][rows].astype(np.float64), agree, cut, layers, L)
    return out


# ------------------------------------------------------------------------------------ on a model
def model_ceiling(lm, data: CalibrationData, layers: list[int] | None = None, cuts: int = CUTS,
                  gate=None) -> Ceiling:
    """:func:`ceiling` with the model's own calibrated policies: its thresholds (of its recorded
    confidence), its gate (when it has one and ``data`` has states) and the policy ``--exit auto`` takes.

    ``gate``: the model's gate when the caller has loaded it already (else it is loaded here).
    """
    from ..decoding.gate import load_gate
    from ..decoding.spec import default_exit

    cfg = lm.lite_config
    if gate is None and cfg.gate_file and data.states is not None:
        gate = load_gate(lm)
    if data.states is None:
        gate = None
    if gate is not None and gate.features != (data.state_features or "exit"):
        raise LiteError(f"the gate reads {gate.features} features, the statistics hold {data.state_features}: "
                        f"collect them with gate_features={gate.features!r}")
    thresholds = {int(k): float(v) for k, v in (cfg.thresholds or {}).items()}
    policy = default_exit(lm)
    return ceiling(data, gate=gate, thresholds=thresholds or None, confidence=cfg.confidence or "max_prob",
                   default=policy if policy != "none" else None, layers=layers, cuts=cuts)


def measure_ceiling(lm, examples: list | None = None, *, answers: list[tuple[list[int], list[int]]] | None = None,
                    max_new_tokens: int = 64, max_length: int = 512, batch_size: int = 8,
                    exit_vocab: int | None = -1, progress=None) -> tuple[Ceiling, CalibrationData]:
    """Teacher-forced on the model's own greedy answers, the ceiling of ``lm`` (:func:`model_ceiling`).

    Args:
        examples: prompts (:class:`lite.training.data.Example` rows): their answers are generated here
            (exits off, ``max_new_tokens`` at most, prompt + answer cut at ``max_length``).
        answers: or the answers already made: (prompt ids, answer ids) pairs (``lite eval``'s full runs).
        exit_vocab: read the exits over this exit vocabulary; -1 (default): the model's recorded one.
        progress: ``progress(done, total)`` after every answer.
    Returns:
        (the ceiling, the collected statistics, for :func:`model_ceiling` on fewer exits).
    """
    from ..decoding.gate import load_gate
    from .calibrate import collect, collect_sequences
    from .scoring import answer_sequences

    vocab = lm.lite_config.exit_vocab if exit_vocab == -1 else exit_vocab
    gate = load_gate(lm) if lm.lite_config.gate_file else None
    states = gate is not None  # with the features the gate reads
    features = gate.features if gate is not None else "exit"
    if (examples is None) == (answers is None):
        raise LiteError("measure_ceiling takes prompts (examples) or the answers to them (answers), one of the two")
    if answers is not None:
        sequences = answer_sequences(answers)
        data = collect_sequences(lm, sequences, len(sequences), source="generated", with_states=states,
                                 exit_vocab=vocab, progress=progress, gate_features=features)
    else:
        data = collect(lm, examples, source="generated", with_states=states, max_length=max_length,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, exit_vocab=vocab, progress=progress,
                       gate_features=features)
    return model_ceiling(lm, data, gate=gate), data  # the gate, loaded once


# ------------------------------------------------------------------------------------ the report
RULE_NAMES = {"max_prob": "max-prob", "margin": "margin", "entropy": "entropy", "state_cosine": "state cosine",
              GATE: "learned gate"}


def _pct(x: float | None) -> str:
    return "-" if x is None or np.isnan(x) else f"{100 * x:.1f}%"


def markdown(c: Ceiling | dict[str, Any]) -> str:
    """The ceiling as markdown: the oracle and the calibrated policies, then each rule's saving at the
    agreement bars (:data:`AGREEMENT_BARS`). Takes a :class:`Ceiling` or its :meth:`Ceiling.record`."""
    r = c.record() if isinstance(c, Ceiling) else c
    L = r["num_layers"]
    vocab = f"an exit vocabulary of {r['exit_vocab']} tokens" if r.get("exit_vocab") else "the full head"
    lines = [f"Teacher-forced on the model's own greedy answers ({r['tokens']} tokens of {r['examples']} answers); "
             f"exits {r['layers']} of L = {L}, read over {vocab}. Agreement: the share of emitted tokens equal "
             f"to layer {L}'s.", "",
             "| what | layer saving | agreement |", "|---|---|---|",
             f"| oracle: the first exit whose argmax is layer {L}'s | {_pct(r['oracle_saving'])} | 1.000 |"]
    for name, p in r["policies"].items():
        mark = " (the default, --exit auto)" if name == r.get("default") else ""
        how = (f"{RULE_NAMES.get(r.get('confidence'), r.get('confidence'))} thresholds per exit" if name == "dynamic"
               else "its cut per exit")
        lines.append(f"| calibrated {name}, {how}{mark} | {_pct(p['saving'])} | {p['agreement']:.3f} |")
    bars = list(next(iter(r["saving_at_agreement"].values()), {}))
    lines += ["", "| rule, one cut at every exit | " + " | ".join(f"saving at agreement >= {b}" for b in bars) + " |",
              "|---|" + "---|" * len(bars)]
    for rule, at in r["saving_at_agreement"].items():
        lines.append(f"| {RULE_NAMES.get(rule, rule)} | " + " | ".join(_pct(at[b]) for b in bars) + " |")
    share = ", ".join(f"{k}: {_pct(v)}" for k, v in r["oracle_share"].items() if v > 0)
    lines += ["", f"Where the oracle lets tokens leave (share of tokens by layer): {share}."]
    return "\n".join(lines) + "\n"


def plot(c: Ceiling | dict[str, Any], path) -> None:
    """One figure: each rule's frontier (layer saving against agreement), the oracle and the calibrated
    policies, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = c.record() if isinstance(c, Ceiling) else c
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for rule, pts in r["frontiers"].items():
        ax.plot([p["saving"] for p in pts], [p["agreement"] for p in pts], marker=".", markersize=3,
                linewidth=1.2, label=RULE_NAMES.get(rule, rule))
    ax.plot([r["oracle_saving"]], [1.0], marker="*", markersize=14, linestyle="none", color="black",
            label=f"oracle ({_pct(r['oracle_saving'])})")
    for name, p in r["policies"].items():
        mark = ", default" if name == r.get("default") else ""
        ax.plot([p["saving"]], [p["agreement"]], marker="D", markersize=7, linestyle="none",
                label=f"calibrated {name}{mark}")
    ax.set_xlabel("layer saving (1 - mean exit layer / L)")
    ax.set_ylabel(f"tokens equal to layer {r['num_layers']}'s")
    ax.set_title(f"Early-exit ceiling, exits {r['layers'][0]}..{r['layers'][-1]} ({len(r['layers'])})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.subplots_adjust(left=0.1, right=0.98, top=0.93, bottom=0.11)  # fixed labels: tight_layout's search costs a third
    fig.savefig(path, dpi=110)
    plt.close(fig)
