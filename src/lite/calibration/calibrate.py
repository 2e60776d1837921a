"""Calibration of dynamic early exit: collect per-token exit statistics, then choose thresholds (and a gate).

Collection (:func:`collect`) runs the model over held-out instruction rows and records, for every exit
layer below L and every scored token, each confidence measure of :mod:`lite.decoding.confidence` (computed exactly
as the engine computes it), whether the layer's argmax equals the final layer's argmax, and optionally the
normed state ``final_norm(h_k)`` that a learned gate reads. Two sources of token sequences:

* ``reference``: prompt + the row's reference response + EOS (as :func:`lite.training.data.tokenize_example` builds
  them), teacher-forced; the scored tokens are the response positions;
* ``generated``: the model's own greedy answer to the prompt with exits off
  (:func:`lite.training.own_answers.own_answers`), then teacher-forced the same way; this is the distribution the model will actually decode. A
  conversation is prompted up to its last trained assistant turn (:func:`lite.training.data.prompt_ids`).

Each sequence goes once through the adapter's blocks, scored by :func:`lite.calibration.scoring.score_sequences`
(the one teacher-forced scorer, shared with the ceiling and the measurement scripts). Teacher forcing means every
position sees the full model's cache; during early-exit decoding earlier tokens may have left early, which the
calibration cannot see (a known, documented gap).

Selection (:func:`select`) is a pure function of the collected arrays: the rules of :mod:`lite.calibration.thresholds`,
cascade statistics, and the gate (:mod:`lite.decoding.gate`). :func:`save_calibration` writes the result into the
model folder's ``lite_config.json`` (and the gate file).

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..decoding import confidence as conf_mod
from ..decoding.cost import PRICE_POSITION
from ..decoding.gate import DEFAULT_FEATURES, check_features
from ..errors import LiteError
from ..model.adapter import LiteModel
from ..model.prompts import default_format
from .scoring import answer_sequences, reference_sequences, score_sequences
from .thresholds import NEVER_EXIT, RULES, LayerStats, cascade_stats, ltt_grid, select_thresholds

SOURCES = ("reference", "generated")
GATE_SELECTION_EVERY = 4  # every 4th example is kept out of gate training to choose its thresholds
MIN_TOKENS = 200  # default --min-tokens: below it a threshold's agreement is known to about +-0.07 or worse


@dataclass
class CalibrationData:
    """Per exit layer and per scored token, what calibration needs (E exit layers below L, N tokens).

    Attributes:
        layers: the E exit layers below L, increasing (1-indexed).
        num_layers: L.
        confidences: {measure: (E, N) float32}, larger = more confident (see :mod:`lite.decoding.confidence`).
        agree: (E, N) bool, layer i's argmax equals the final layer's argmax at that token.
        example_index: (N,) int, which collected example each token comes from (0-based).
        states: (E, N, F) float32 gate features of kind ``state_features`` (:func:`lite.decoding.gate.gate_features`:
            the normed state, its change over the block, or the exit state), or None.
        state_features: the kind of ``states``, or None without them.
        exit_vocab: the exit vocabulary the statistics were measured with (the exits read the head over
            its N most frequent tokens: confidences over them, agreement of their argmax), or None (the full
            head).
        source: "reference" or "generated".
        examples: examples that contributed tokens.
        skipped: examples that contributed none (prompt too long, empty answer).
        seconds: wall-clock time of the collection.
    """

    layers: list[int]
    num_layers: int
    confidences: dict[str, np.ndarray]
    agree: np.ndarray
    example_index: np.ndarray
    states: np.ndarray | None = None
    source: str = "reference"
    examples: int = 0
    skipped: int = 0
    seconds: float = 0.0
    exit_vocab: int | None = None
    state_features: str | None = None

    @property
    def tokens(self) -> int:
        return int(self.agree.shape[1])


def check_options(*, rule: str = "paper", target: float = 0.9, epsilon: float = 0.1, delta: float = 0.1,
                  confidence: str = "max_prob", source: str = "reference") -> None:
    """Reject bad selection options before any model is loaded; each message names the flag."""
    if rule not in RULES:
        raise LiteError(f"--rule must be one of {RULES}, got {rule!r}")
    if not 0.0 < target <= 1.0:
        raise LiteError(f"--target must be in (0, 1] (the agreement rate of exited tokens), got {target}")
    if not 0.0 < epsilon < 1.0:
        raise LiteError(f"--epsilon must be in (0, 1) (the tolerated disagreement rate), got {epsilon}")
    if not 0.0 < delta < 1.0:
        raise LiteError(f"--delta must be in (0, 1) (the allowed failure probability), got {delta}")
    if confidence not in conf_mod.MEASURES:
        raise LiteError(f"--confidence must be one of {conf_mod.MEASURES}, got {confidence!r}")
    if source not in SOURCES:
        raise LiteError(f"--source must be one of {SOURCES}, got {source!r}")


def calibration_layers(lm: LiteModel) -> list[int]:
    """The exit layers below L, or a :class:`LiteError` when the model has none to calibrate."""
    below = [k for k in lm.exit_layers if k < lm.num_layers]
    if not below:
        raise LiteError(
            f"this model's exit layers are {lm.exit_layers}: none below the final layer {lm.num_layers}, so "
            f"there is nothing to calibrate; train it with intermediate exits (lite train --exit-layers) or "
            f"set exit_layers in its lite_config.json"
        )
    return below


def drop_training_rows(lite_config, examples: list, sources: list[dict[str, Any]]) -> tuple[list, int]:
    """Keep only rows the model was not trained on.

    A row of a ``--data`` file that ``lite train`` used (same sha256 as a source recorded in
    ``lite_config.data``) is kept only if it was in the held-out split; rows of other files are kept.

    Args:
        examples: :class:`lite.training.data.Example` rows with ids ``"<source index>:<row index>"``.
        sources: the provenance entries of the ``--data`` files, in the same order (with ``sha256``).
    Returns:
        (kept rows, number dropped).
    """
    data = lite_config.data or {}
    trained = {e["sha256"]: t for t, e in enumerate(data.get("sources", [])) if e.get("sha256")}
    held = set(data.get("heldout_ids", []))
    kept = []
    for example in examples:
        source, row = example.row_id.split(":")
        t = trained.get(sources[int(source)].get("sha256"))
        if t is None or f"{t}:{row}" in held:
            kept.append(example)
    return kept, len(examples) - len(kept)


# ---------------------------------------------------------------------------------------- collection
def calibration_sequences(lm: LiteModel, examples: list, source: str = "generated", *, max_length: int = 256,
                          max_new_tokens: int = 128, batch_size: int = 8) -> list[tuple[list[int], list[int]] | None]:
    """Per example, in order: its token ids and the positions to score, or None when nothing can be scored.

    ``reference``: the row's own response, teacher-forced (:func:`lite.calibration.scoring.reference_sequences`).
    ``generated``: the model's greedy answer with exits off (:func:`lite.training.own_answers.own_answers`,
    ``batch_size`` prompts at a time by the batched engine, each row as it would be alone; prompt + answer
    cut at ``max_length``), then teacher-forced. A conversation is prompted up to its last trained assistant
    turn (:func:`lite.training.data.prompt_ids`).
    """
    if source not in SOURCES:
        raise LiteError(f"--source must be one of {SOURCES}, got {source!r}")
    prompt_format = default_format(lm)
    if source == "reference":
        return reference_sequences(lm.tokenizer, examples, prompt_format, max_length)
    from ..training.data import prompt_ids
    from ..training.own_answers import own_answers

    prompts = [prompt_ids(lm.tokenizer, e, prompt_format) for e in examples]
    answers = own_answers(lm, prompts, max_new_tokens=max_new_tokens, max_length=max_length, batch_size=batch_size)
    return answer_sequences(zip(prompts, answers.ids))


def collect(lm: LiteModel, examples: list, *, source: str = "reference", with_states: bool = False,
            max_length: int = 256, max_new_tokens: int = 128, batch_size: int = 8, exit_vocab: int | None = None,
            ranking: list[int] | None = None, progress: Callable[[int, int], None] | None = None,
            gate_features: str = DEFAULT_FEATURES) -> CalibrationData:
    """Run ``lm`` over ``examples`` (:class:`lite.training.data.Example` rows) and record per-token exit statistics.

    Args:
        source: "reference" (teacher-forced on the rows' responses) or "generated" (the model's own greedy
            answers with exits off, then teacher-forced).
        with_states: also keep the gate's features (needed to train a gate; E*N*F float32).
        gate_features: which (:func:`lite.decoding.gate.gate_features`; ``--gate-features``).
        max_length: sequences (prompt + response) are cut at this many tokens.
        max_new_tokens: answer budget of the ``generated`` source.
        batch_size: examples whose answers are generated together (``generated`` source).
        exit_vocab: ``--exit-vocab N``: measure the exits as they decode with an exit vocabulary (the head
            over the N most frequent tokens of ``draft_vocab.json``, or of ``ranking`` when given); None or 0 =
            the full head.
        progress: called as ``progress(done, total)`` after every example.
    """
    if source not in SOURCES:
        raise LiteError(f"--source must be one of {SOURCES}, got {source!r}")
    if not examples:
        raise LiteError("no held-out examples to calibrate on: give --data (and check --filter/--max-examples)")
    if batch_size < 1:
        raise LiteError(f"--batch-size must be >= 1, got {batch_size}")
    sequences = calibration_sequences(lm, examples, source, max_length=max_length, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size)
    return collect_sequences(lm, sequences, len(examples), source=source, with_states=with_states,
                             exit_vocab=exit_vocab, ranking=ranking, progress=progress, gate_features=gate_features)


def collect_sequences(lm: LiteModel, sequences: Iterable[tuple[list[int], list[int]] | None], total: int,
                      *, source: str = "generated", with_states: bool = False, exit_vocab: int | None = None,
                      ranking: list[int] | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      gate_features: str = DEFAULT_FEATURES) -> CalibrationData:
    """:func:`collect` over given token sequences: each (ids, positions to score), or None (nothing to score).

    For callers that already hold the model's answers (``lite eval`` has the full model's): prompt + answer
    ids, and the positions that predict the answer's tokens. ``total``: how many sequences (for
    ``progress``); ``source`` is what the data records. The other arguments are :func:`collect`'s.
    """
    layers = calibration_layers(lm)
    check_features(gate_features)
    vocab = None
    if exit_vocab:
        from ..decoding.spec import exit_vocab_ids

        ids = exit_vocab_ids(lm, exit_vocab, "--exit-vocab", ranking)
        if ids is None:
            exit_vocab = None  # the whole vocabulary: the full head
        else:
            vocab = list(ids)
    scores = score_sequences(lm, sequences, layers=layers, states=(gate_features,) if with_states else (),
                             vocab=vocab, total=total, progress=progress)
    return CalibrationData(
        layers=layers, num_layers=lm.num_layers, confidences=scores.confidences, agree=scores.agree,
        example_index=scores.index, states=scores.states[gate_features] if with_states else None, source=source,
        examples=scores.sequences, skipped=scores.skipped, seconds=scores.seconds, exit_vocab=exit_vocab or None,
        state_features=gate_features if with_states else None,
    )


# ---------------------------------------------------------------------------------------- selection
@dataclass
class GateFit:
    """A trained gate with decision thresholds chosen on examples it was not trained on.

    Attributes:
        gate: the gate, decision thresholds set.
        train_examples / selection_examples / selection_tokens: the split (every
            ``GATE_SELECTION_EVERY``-th example is held out of training to choose the thresholds).
        accuracy: {layer: accuracy of "P >= 0.5" on the selection tokens}.
        base_accuracy: {layer: accuracy of always predicting the majority class there}.
        stats: what the gate's decisions do on the selection tokens (cascade, see :mod:`lite.calibration.thresholds`).
        closed: layers whose classifier did not beat the constant answer (accuracy <= base accuracy on the
            selection tokens): they are left out of the gate, so no token leaves there.
        head_rate: the cascade (``gate.confirm``): per exit layer, the share of the selection tokens whose head
            is read there (the gate let them out, max-prob decides); None without a cascade.
    """

    gate: Any
    train_examples: int
    selection_examples: int
    selection_tokens: int
    accuracy: dict[int, float]
    base_accuracy: dict[int, float]
    stats: LayerStats
    closed: list[int] = field(default_factory=list)
    head_rate: list[float] | None = None


@dataclass
class CalibrationResult:
    """Thresholds for the exit layers below L and what they do on the calibration tokens."""

    layers: list[int]
    thresholds: dict[int, float]
    confidence: str
    rule: str
    parameters: dict[str, float]
    stats: LayerStats
    source: str
    examples: int
    tokens: int
    collect_seconds: float
    gate: GateFit | None = None
    data: dict[str, Any] = field(default_factory=dict)
    exit_vocab: int | None = None
    quality: dict[str, Any] | None = None  # --quality-bar: lite.evaluation.quality.record, which sets auto

    def record(self) -> dict[str, Any]:
        """The ``calibration`` entry of ``lite_config.json`` (JSON-safe: NaN becomes null)."""
        def per_layer(values: list[float]) -> dict[str, float | None]:
            return {str(k): _json_float(v) for k, v in zip(self.layers, values)}

        def intervals(stats: LayerStats) -> dict[str, list[float | None]]:
            return {str(k): [_json_float(lo), _json_float(hi)]
                    for k, (lo, hi) in zip(self.layers, stats.exit_agreement_interval)}

        s = self.stats
        out: dict[str, Any] = {
            "rule": self.rule, "parameters": dict(self.parameters), "confidence": self.confidence,
            "source": self.source, "data": dict(self.data), "examples": self.examples, "tokens": self.tokens,
            "layers": list(self.layers), "never_exit_threshold": NEVER_EXIT,
            "agreement": per_layer(s.agreement), "expected_exit_rate": per_layer(s.exit_rate),
            "exit_agreement": per_layer(s.exit_agreement), "exit_agreement_interval": intervals(s),
            "exit_tokens": {str(k): c for k, c in zip(self.layers, s.exit_count)},
            "marginal_exit_rate": per_layer(s.marginal_exit_rate),
            "marginal_agreement": per_layer(s.marginal_agreement), "final_rate": _json_float(s.final_rate),
            "exited_agreement": _json_float(s.exited_agreement), "collect_seconds": round(self.collect_seconds, 2),
            "exit_vocab": self.exit_vocab,
        }
        if self.gate is not None:
            g = self.gate
            out["gate"] = {
                "kind": "logistic" if g.gate.hidden == 0 else "mlp", "hidden": g.gate.hidden, "features": g.gate.features,
                "thresholds": {str(k): v for k, v in g.gate.thresholds.items()},
                **({"confirm": {str(k): v for k, v in g.gate.confirm.items()},
                    "head_rate": dict(zip(map(str, self.layers), g.head_rate))} if g.gate.confirm else {}),
                "train_examples": g.train_examples, "selection_examples": g.selection_examples,
                "selection_tokens": g.selection_tokens,
                "accuracy": {str(k): _json_float(v) for k, v in g.accuracy.items()},
                "base_accuracy": {str(k): _json_float(v) for k, v in g.base_accuracy.items()},
                "expected_exit_rate": per_layer(g.stats.exit_rate),
                "exit_agreement": per_layer(g.stats.exit_agreement),
                "exit_agreement_interval": intervals(g.stats), "closed_layers": list(g.closed),
                "flops_per_check": {str(k): g.gate.flops(k) for k in self.layers},
            }
        return out


def _json_float(v: float) -> float | None:
    return None if v is None or np.isnan(v) else float(v)


def select(data: CalibrationData, *, rule: str = "paper", confidence: str = "max_prob", target: float = 0.9,
           epsilon: float = 0.1, delta: float = 0.1, gate: bool = False, gate_hidden: int = 0,
           gate_steps: int = 300, seed: int = 0, min_tokens: int = MIN_TOKENS,
           cascade_prices: tuple[float, float, float] | None = None) -> CalibrationResult:
    """Choose thresholds (and optionally train a gate) from collected data; no model needed.

    Args:
        rule: "paper", "agreement" (uses ``target``) or "ltt" (uses ``epsilon``, ``delta``), see
            :mod:`lite.calibration.thresholds`.
        confidence: the measure whose thresholds are chosen.
        gate: also train a :class:`lite.decoding.gate.LearnedExitGate` (needs ``data.states`` and >= 4 examples);
            its decision thresholds come from the same rule applied to its probabilities on the held-out
            quarter of the examples. A layer whose classifier does not beat the constant answer there is
            left out of the gate (closed).
        cascade_prices: ``--gate-cascade``: the gate becomes a cascade (:attr:`LearnedExitGate.confirm`): one
            cut on its probability and one max-prob cut (over the exit vocabulary when the data has one) at
            every open exit, the pair of least expected compute whose emitted tokens agree with the final
            layer's at the rule's bar (``target``; ``1 - epsilon`` for ltt) on the selection tokens. The
            prices, in blocks: (a skipped block's K/V fill, one head read with its exit module, the full head
            at L); :func:`cascade_prices` gives them for a model.
        min_tokens: ``--min-tokens``: the fewest calibration tokens every exit's threshold may be chosen on
            (each exit sees every token), and the fewest the gate's thresholds may be chosen on (its
            held-out quarter).
    Raises:
        LiteError: too few tokens (names ``--min-tokens`` and the flags that bring more data).
    """
    check_options(rule=rule, target=target, epsilon=epsilon, delta=delta, confidence=confidence)
    if min_tokens < 1:
        raise LiteError(f"--min-tokens must be >= 1, got {min_tokens}")
    if data.tokens < min_tokens:
        raise LiteError(f"only {data.tokens} calibration tokens per exit (from {data.examples} examples), fewer than "
                        f"--min-tokens {min_tokens}: give more held-out rows (--data, --max-examples, or --source "
                        f"generated with a larger --max-new-tokens), or lower --min-tokens knowingly")
    params = {"paper": {}, "agreement": {"target": target}, "ltt": {"epsilon": epsilon, "delta": delta}}[rule]
    conf = data.confidences[confidence]
    values = select_thresholds(rule, conf, data.agree, target=target, epsilon=epsilon, delta=delta,
                               grid=ltt_grid(confidence))
    result = CalibrationResult(
        layers=list(data.layers), thresholds={k: float(v) for k, v in zip(data.layers, values)},
        confidence=confidence, rule=rule, parameters=params, stats=cascade_stats(conf, data.agree, values),
        source=data.source, examples=data.examples, tokens=data.tokens, collect_seconds=data.seconds,
        exit_vocab=data.exit_vocab,
    )
    if gate:
        result.gate = _fit_gate(data, rule, target, epsilon, delta, gate_hidden, gate_steps, seed, min_tokens,
                                cascade_prices)
    return result


def _fit_gate(data: CalibrationData, rule: str, target: float, epsilon: float, delta: float, hidden: int,
              steps: int, seed: int, min_tokens: int = 1,
              cascade_prices: tuple[float, float, float] | None = None) -> GateFit:
    from ..decoding.gate import train_gate

    if data.states is None:
        raise LiteError("--gate needs the gate's features: collect with with_states=True")
    held = data.example_index % GATE_SELECTION_EVERY == GATE_SELECTION_EVERY - 1
    if data.examples < GATE_SELECTION_EVERY or not held.any() or held.all():
        raise LiteError(f"--gate needs at least {GATE_SELECTION_EVERY} examples with tokens (one in "
                        f"{GATE_SELECTION_EVERY} chooses the gate's thresholds); got {data.examples}")
    if int(held.sum()) < min_tokens:
        raise LiteError(f"--gate: its thresholds would be chosen on {int(held.sum())} tokens (every "
                        f"{GATE_SELECTION_EVERY}th of {data.examples} examples), fewer than --min-tokens {min_tokens}: "
                        f"give about {GATE_SELECTION_EVERY}x more held-out rows (--data, --max-examples), or lower "
                        f"--min-tokens knowingly")
    gate = train_gate(data.states[:, ~held], data.agree[:, ~held], data.layers, hidden=hidden, steps=steps,
                      seed=seed, features=data.state_features or "exit")
    agree = data.agree[:, held]
    with torch.no_grad():
        probs = np.stack([gate.probability(k, torch.from_numpy(data.states[i, held])).numpy()
                          for i, k in enumerate(data.layers)])
    cuts = select_thresholds(rule, probs, agree, target=target, epsilon=epsilon, delta=delta,
                             grid=ltt_grid("max_prob"))
    accuracy = {k: float(((probs[i] >= 0.5) == agree[i]).mean()) for i, k in enumerate(data.layers)}
    base = {k: float(max(agree[i].mean(), 1 - agree[i].mean())) for i, k in enumerate(data.layers)}
    # a classifier no better than always giving the majority answer carries no information: close that exit
    closed = [k for k in data.layers if not accuracy[k] > base[k]]
    cuts = [1.0 if k in closed else min(float(v), 1.0) for k, v in zip(data.layers, cuts)]  # >= 1: never leaves
    gate.set_thresholds(dict(zip(data.layers, cuts)))
    stats = cascade_stats(probs, agree, np.array([np.inf if k in closed else c for k, c in zip(data.layers, cuts)]))
    head_rate = None
    if cascade_prices is not None:
        bar = 1 - epsilon if rule == "ltt" else target
        probs = np.where(np.isin(data.layers, closed)[:, None], -np.inf, probs)
        g, c, stats, head_rate = choose_cascade(probs, data.confidences["max_prob"][:, held], agree, data.layers,
                                                data.num_layers, bar, cascade_prices)
        gate.set_thresholds({k: g for k in data.layers if k not in closed})
        gate.confirm = {k: c for k in data.layers if k not in closed}
    gate.drop_layers(closed)
    return GateFit(
        gate=gate, train_examples=int(np.unique(data.example_index[~held]).size),
        selection_examples=int(np.unique(data.example_index[held]).size), selection_tokens=int(held.sum()),
        accuracy=accuracy, base_accuracy=base, stats=stats, closed=closed, head_rate=head_rate,
    )


CASCADE_GRID = 41  # cuts per side of the cascade's search: quantiles of the gate's and of max-prob's scores


def cascade_decisions(probs: np.ndarray, maxprob: np.ndarray, g: float, c: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The cascade's decisions on (E, N) gate probabilities and max-probs: (index of the exit each token
    leaves at, E when it reaches L; (E, N) bool, the head was read there)."""
    passed = probs >= g
    leave = passed & (maxprob >= c)
    e = probs.shape[0]
    first = np.where(leave.any(0), np.argmax(leave, 0), e)
    reached = np.arange(e)[:, None] <= first[None, :]
    return first, passed & reached


def choose_cascade(probs: np.ndarray, maxprob: np.ndarray, agree: np.ndarray, layers: list[int], num_layers: int,
                   bar: float, prices: tuple[float, float, float]) -> tuple[float, float, LayerStats, list[float]]:
    """The cascade's cuts (gate probability ``g``, max-prob ``c``): of a grid of quantiles, the pair of least
    expected compute (in blocks: the blocks run, ``prices`` = (K/V fill of a skipped block, one head read, the
    full head at L)) whose emitted tokens agree with the final layer's at a share >= ``bar``; (1, 1) (no
    token leaves: a gate cut of 1 never passes, like a closed layer's) when none does. Returns (g, c, the cascade's stats, per layer the share of tokens whose
    head is read there)."""
    fill, read, final = prices
    e_layers = np.asarray(layers + [num_layers])
    n = agree.shape[1]
    finite = probs[np.isfinite(probs)]
    q = np.linspace(0.0, 1.0, CASCADE_GRID)
    gs = np.unique(np.quantile(finite, q)) if finite.size else np.array([])
    cs = np.unique(np.quantile(maxprob, q)) if maxprob.size else np.array([])
    best = (np.inf, 1.0, 1.0)  # cost, g, c: nobody leaves unless a pair meets the bar
    agree_l = np.vstack([agree, np.ones((1, n), dtype=bool)])  # a token at L agrees
    for g in gs:
        for c in cs:
            first, heads = cascade_decisions(probs, maxprob, g, c)
            if agree_l[first, np.arange(n)].mean() < bar - 1e-12:
                continue
            at = e_layers[first]
            cost = float(np.mean(at + (num_layers - at) * fill + heads.sum(0) * read + (first == len(layers)) * final))
            if cost < best[0]:
                best = (cost, float(g), float(c))
    g, c = best[1], best[2]
    _, heads = cascade_decisions(probs, maxprob, g, c)
    stats = cascade_stats(np.where(probs >= g, maxprob, -np.inf), agree, np.full(len(layers), c))
    return g, c, stats, [float(x) for x in heads.mean(1)]


def cascade_prices(lm: LiteModel, exit_vocab: int | None) -> tuple[float, float, float]:
    """:func:`choose_cascade`'s prices for ``lm`` at :data:`COST_POSITION`, in blocks: (a skipped block's K/V
    fill, one head read at an exit with its module, the full head with its reduction at L)."""
    from ..decoding.cost import step_prices

    return step_prices(lm, exit_vocab, COST_POSITION)


COST_POSITION = PRICE_POSITION  # the decode position at which expected_compute prices a step (attention grows with it)


def expected_compute(lm: LiteModel, result: CalibrationResult) -> dict[str, float]:
    """Expected FLOPs of one decode step under each calibrated policy, as a fraction of the full model's step
    (:mod:`lite.decoding.cost`'s prices at position :data:`COST_POSITION`, ``copy`` K/V fills included), from
    where its decisions let the calibration tokens leave: ``dynamic`` (the thresholds: a head, or an exit
    vocabulary's head, at every checked exit) and ``gate`` (its classifier at every checked exit, the head
    only where a token leaves). Both were chosen by the same rule and target, so the cheaper one is the
    better policy at the same quality on these tokens."""
    from ..decoding.cost import ModelShape

    shape = ModelShape.from_config(lm.config)
    L, block, fill = lm.num_layers, shape.block_flops(COST_POSITION), shape.kv_fill_flops()
    vocab_head = None if not result.exit_vocab else shape.shortlist_check_flops(result.exit_vocab)
    full_step = L * block + shape.head_flops()
    exit_kv = len(lm.exit_kv_layers) * fill  # attention exit modules: every token writes their K/V

    def module(k: int) -> int:
        return lm.exit_module_flops(k, COST_POSITION)

    def step(rates: list[float], check: Callable[[int], float], leave: Callable[[int], float],
             module_each_check: bool = True, reads: list[float] | None = None) -> float:
        total, checked = 0.0, 0.0
        for k, rate in zip(result.layers, rates):
            checked += check(k) + (module(k) if module_each_check else 0)
            total += (0.0 if np.isnan(rate) else rate) * (k * block + checked + leave(k) + (L - k) * fill)
        rest = 1.0 - sum(0.0 if np.isnan(r) else r for r in rates)
        # the cascade's head reads (with their modules), wherever they happened
        total += sum(r * (head_check + (0 if module_each_check else module(k)))
                     for k, r in zip(result.layers, reads or []))
        # a token at L: the full head and the reduction over V that records its confidence
        return (total + rest * (L * block + checked + shape.head_check_flops()) + exit_kv) / full_step

    head_check = vocab_head if vocab_head is not None else shape.head_check_flops()
    out = {"dynamic": step(list(result.stats.exit_rate), lambda k: head_check, lambda k: 0.0)}
    if result.gate is not None:
        g = result.gate
        exit_state = g.gate.reads_exit_state  # the module ran for every check; else only where a token leaves
        if g.head_rate is not None:  # cascade: the head was read where it decided
            out["gate"] = step(list(g.stats.exit_rate), g.gate.flops, lambda k: 0.0, exit_state, g.head_rate)
        else:
            out["gate"] = step(list(g.stats.exit_rate), g.gate.flops,
                               lambda k: head_check + (0 if exit_state else module(k)), exit_state)
    return {k: round(float(v), 4) for k, v in out.items()}


def expected_agreement(stats: LayerStats) -> float:
    """Share of the calibration tokens whose emitted token is the final layer's under a policy's decisions
    (``stats``): the tokens that leave early and agree, plus every token that reaches L."""
    early = sum(0.0 if np.isnan(r) or np.isnan(a) else r * a for r, a in zip(stats.exit_rate, stats.exit_agreement))
    return float(early + (0.0 if np.isnan(stats.final_rate) else stats.final_rate))


def choose_default(result: CalibrationResult, costs: dict[str, float]) -> tuple[str, dict[str, float], float | None]:
    """The policy ``--exit auto`` decodes with, of those calibrated here: the cheapest (``costs``) whose
    expected agreement (:func:`expected_agreement`) reaches the rule's own bar (``target`` for the agreement
    rule, ``1 - epsilon`` for ltt; the paper's rule has none), else the one that agrees most. The per-layer
    rule alone does not equalise the two: thresholds and gate cascade differently. Returns (policy, expected
    agreement per policy, the bar)."""
    agreement = {"dynamic": expected_agreement(result.stats)}
    if result.gate is not None:
        agreement["gate"] = expected_agreement(result.gate.stats)
    p = result.parameters
    bar = p.get("target") if result.rule == "agreement" else (1 - p["epsilon"] if result.rule == "ltt" else None)
    order = sorted(agreement, key=lambda k: (costs[k], k != "gate"))  # cheapest first; a tie goes to the gate
    meeting = [k for k in order if bar is None or agreement[k] >= bar - 1e-9]
    best = meeting[0] if meeting else max(order, key=lambda k: agreement[k])
    return best, {k: round(v, 4) for k, v in agreement.items()}, bar


def save_calibration(lm: LiteModel, result: CalibrationResult) -> str:
    """Write thresholds, confidence, the calibration record (and the gate file) into ``lm.folder``.

    The gate file is written first (atomically), then ``lite_config.json`` (atomically), so the config
    never names a file that is not there. Without a new gate an earlier gate is kept as it was. Updates
    ``lm.lite_config`` in place. Returns the path of ``lite_config.json``.
    """
    import dataclasses

    from ..decoding.gate import GATE_FILE, save_gate
    from ..decoding.spec import PRICE_MARGIN, PRICED_BATCHES, default_exit, priced_table
    from ..model.card import write_model_card

    if lm.folder is None:
        raise LiteError("--model: calibration writes into the model folder's lite_config.json, but this model "
                        "came from the hub; save it to a local folder first and calibrate that")
    old = lm.lite_config
    record = result.record()
    gate_file = old.gate_file
    if result.gate is not None:
        gate_file = save_gate(result.gate.gate, lm.folder, GATE_FILE).name
    elif old.gate_file and "gate" in old.calibration:
        record["gate"] = old.calibration["gate"]
    # what --exit auto (every verb's default) decodes with: of the policies calibrated here, the cheapest
    # whose emitted tokens agree with the final layer's at the rule's bar (choose_default); a gate kept
    # from an earlier calibration is not compared
    costs = expected_compute(lm, result)
    default, agreement, _ = choose_default(result, costs)
    record["expected_compute"], record["expected_agreement"] = costs, agreement
    kept_default = old.default_exit or ("gate" if old.gate_file else None)  # what auto meant before
    if result.gate is None and gate_file and kept_default == "gate" and old.exit_vocab == result.exit_vocab:
        default = "gate"  # thresholds re-calibrated alone: the gate chosen before stays the default
    if result.quality is not None:  # --quality-bar: the answers decided (lite.evaluation.quality)
        chosen = result.quality["chosen"]
        default = "none" if chosen is None else chosen.split("@")[0]
        record["quality"] = result.quality
    # record the prompt format the thresholds were measured with, so every verb then prompts the same way
    cfg = dataclasses.replace(
        old, prompt_format=default_format(lm), thresholds={str(k): float(v) for k, v in result.thresholds.items()},
        confidence=result.confidence, calibration=record, gate_file=gate_file, default_exit=default,
        exit_vocab=result.exit_vocab,
    )
    lm.lite_config = cfg
    # what --exit auto decodes with at each batch size follows from these prices (default_exit)
    record["priced_speedup"] = priced_table(lm)
    record["auto_by_batch"] = {str(b): default_exit(lm, b) for b in PRICED_BATCHES}
    record["price_margin"] = PRICE_MARGIN  # what auto asks of a priced step (the model card says it)
    path = cfg.save(lm.folder)
    write_model_card(lm.folder)  # the card shows the new thresholds (a README lite did not write is kept)
    return str(path)
