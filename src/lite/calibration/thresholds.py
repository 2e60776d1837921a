"""Threshold selection rules: pure functions of collected confidences and agreements.

Inputs are numpy arrays over the exit layers below L (E of them) and the calibration tokens (N):

* ``conf``  (E, N) float: the confidence of exit layer i at token t, oriented so that larger = more
  confident (see :mod:`lite.decoding.confidence`);
* ``agree`` (E, N) bool: whether layer i's argmax equals the final layer L's argmax at token t.

A token *would exit* at layer i under threshold t when ``conf[i] >= t`` (the engine's rule, before
``--threshold-scale``). Every rule here is **per layer and marginal**: layer i's threshold is chosen from
all calibration tokens, as if layer i were the only exit. In decoding the exits form a cascade (a token
reaches layer i only if no earlier layer let it leave), so the tokens that actually leave at layer i are a
subset of layer i's marginal exit set; :func:`cascade_stats` reports what the cascade does on the same
data (exit rate and agreement per layer), which is what ``lite calibrate`` prints. Marginal selection keeps
the rules independent of each other's outcome, which makes them monotone (raising the agreement target
never lowers a threshold) and lets the ``ltt`` guarantee be stated exactly.

A layer that no threshold can make good enough gets :data:`NEVER_EXIT`, a finite value above every
confidence (so it survives JSON and any sensible ``--threshold-scale``): the token never leaves there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import LiteError
from ..model.config import NEVER_EXIT  # a threshold no confidence reaches: confidences lie in [-1, 1]

RULES = ("paper", "agreement", "ltt")
LTT_GRID_POINTS = 1001


def _check(conf: np.ndarray, agree: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(conf, dtype=np.float64)
    agree = np.asarray(agree, dtype=bool)
    if conf.ndim == 1:
        conf, agree = conf[None], agree[None]
    if conf.shape != agree.shape or conf.ndim != 2:
        raise ValueError(f"conf {conf.shape} and agree {agree.shape} must both be (E, N)")
    return conf, agree


def paper_thresholds(conf: np.ndarray, agree: np.ndarray) -> np.ndarray:
    """The LITE paper's rule as we reconstruct it (the paper gives no formula): threshold_i = mean of
    ``conf[i]`` over the tokens where layer i agrees with the final layer; :data:`NEVER_EXIT` for a layer
    that never agrees.

    Returns:
        (E,) thresholds.
    """
    conf, agree = _check(conf, agree)
    out = np.full(conf.shape[0], NEVER_EXIT)
    for i in range(conf.shape[0]):
        if agree[i].any():
            out[i] = conf[i][agree[i]].mean()
    return out


def _descending(conf_i: np.ndarray, agree_i: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate thresholds (distinct confidences, high to low) with the number of tokens exiting at each
    (``conf >= t``, ties included) and how many of those disagree."""
    order = np.argsort(-conf_i, kind="stable")
    c = conf_i[order]
    bad = np.cumsum(~agree_i[order])
    # the last index of each run of equal confidences: exits at t = c[j] include all ties of c[j]
    ends = np.flatnonzero(np.r_[c[1:] != c[:-1], True])
    return c[ends], ends + 1, bad[ends]


def agreement_thresholds(conf: np.ndarray, agree: np.ndarray, target: float) -> np.ndarray:
    """Per layer, the lowest threshold t such that the tokens with ``conf[i] >= t`` agree with the final
    layer at rate >= ``target``.

    Candidates are the observed confidences (a threshold between two of them exits the same tokens as the
    next one up). A layer where no candidate reaches the target gets :data:`NEVER_EXIT`. Raising
    ``target`` can only shrink the set of admissible thresholds, so it never lowers a threshold.

    Args:
        target: required agreement rate A in (0, 1].
    Returns:
        (E,) thresholds.
    """
    if not 0.0 < target <= 1.0:
        raise LiteError(f"--target must be in (0, 1] (an agreement rate), got {target}")
    conf, agree = _check(conf, agree)
    out = np.full(conf.shape[0], NEVER_EXIT)
    for i in range(conf.shape[0]):
        if conf.shape[1] == 0:
            continue
        cand, n, bad = _descending(conf[i], agree[i])
        # rate >= target  <=>  agreeing >= target * n, compared in integers-with-tolerance
        ok = np.flatnonzero((n - bad) >= target * n - 1e-9 * n)
        if ok.size:
            out[i] = cand[ok[-1]]
    return out


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly in log space (no scipy needed)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    j = np.arange(k)  # log pmf(j+1) - log pmf(j) = log((n-j)/(j+1)) + log(p/(1-p))
    steps = np.log((n - j) / (j + 1.0)) + math.log(p / (1.0 - p))
    logpmf = n * math.log1p(-p) + np.concatenate(([0.0], np.cumsum(steps)))
    top = logpmf.max()
    return float(min(1.0, math.exp(top) * np.exp(logpmf - top).sum()))


def ltt_min_count(epsilon: float, delta: float) -> int:
    """The fewest exiting tokens with which the binomial test can reject at all: (1-E)^n <= D."""
    return int(math.ceil(math.log(delta) / math.log1p(-epsilon)))


def ltt_start_count(epsilon: float, delta: float) -> int:
    """Where fixed-sequence testing starts: the fewest exiting tokens with which the test still rejects
    when the exits disagree at half the tolerated rate (k = floor(E * n / 2))."""
    n = ltt_min_count(epsilon, delta)
    while binom_cdf(math.floor(epsilon * n / 2), n, epsilon) > delta:
        n += 1
    return n


def ltt_grid(measure: str) -> np.ndarray:
    """The fixed, data-independent candidate thresholds, high to low: 1001 points on the measure's range
    ([0, 1], or [-1, 1] for ``state_cosine``)."""
    low = -1.0 if measure == "state_cosine" else 0.0
    return np.linspace(1.0, low, LTT_GRID_POINTS)


def ltt_thresholds(conf: np.ndarray, agree: np.ndarray, epsilon: float, delta: float,
                   grid: np.ndarray | None = None) -> np.ndarray:
    """Learn-then-Test (Angelopoulos et al. 2021; CALM, Schuster et al. 2022) per layer.

    Risk of threshold t at layer i: R_i(t) = P(layer i disagrees with the final layer | conf_i >= t), the
    rate of exited tokens that disagree. Null hypothesis H_t: R_i(t) > epsilon. Given that n calibration
    tokens exit at t and k of them disagree, k ~ Binomial(n, R_i(t)), so the p-value is the exact binomial
    tail ``P(Binomial(n, epsilon) <= k)`` (equivalently: reject when the one-sided Clopper-Pearson upper
    confidence bound on R_i(t) is <= epsilon). Fixed-sequence testing walks the grid from high to low
    thresholds, rejecting while p <= delta / E, and returns the last rejected threshold (Bonferroni over
    the E layers, so all E guarantees hold together). Grid points where fewer than
    :func:`ltt_start_count` tokens exit are passed over (not tested): there the test rejects only when
    almost no exit disagrees, and one unlucky disagreement among the first few exits would end the sequence
    before it reaches thresholds with enough data. As the exit count only grows down the grid, this just
    sets where the sequence starts. A layer with no rejection gets :data:`NEVER_EXIT`.

    Guarantee: with probability >= 1 - delta over an i.i.d. calibration sample, every layer's chosen
    threshold has R_i <= epsilon on fresh tokens from the same distribution, for layer i's marginal exit
    set (exact when R_i(t) does not increase with t, i.e. more confident exits are not worse).

    Args:
        epsilon: tolerated disagreement rate among exited tokens, in (0, 1).
        delta: allowed probability that the calibration sample misleads, in (0, 1).
        grid: candidate thresholds, high to low (default :func:`ltt_grid` for [0, 1] measures).
    Returns:
        (E,) thresholds.
    """
    if not 0.0 < epsilon < 1.0:
        raise LiteError(f"--epsilon must be in (0, 1) (a disagreement rate), got {epsilon}")
    if not 0.0 < delta < 1.0:
        raise LiteError(f"--delta must be in (0, 1) (a failure probability), got {delta}")
    conf, agree = _check(conf, agree)
    grid = ltt_grid("max_prob") if grid is None else np.asarray(grid, dtype=np.float64)
    level = delta / max(conf.shape[0], 1)
    n_min = ltt_start_count(epsilon, level)
    out = np.full(conf.shape[0], NEVER_EXIT)
    for i in range(conf.shape[0]):
        c = np.sort(conf[i])
        bad_sorted = np.cumsum((~agree[i])[np.argsort(conf[i], kind="stable")][::-1])  # from the top
        for t in grid:
            n = int(c.size - np.searchsorted(c, t, side="left"))  # tokens with conf >= t
            if n < n_min:
                continue
            k = int(bad_sorted[n - 1])
            if binom_cdf(k, n, epsilon) > level:
                break
            out[i] = t
    return out


def select_thresholds(rule: str, conf: np.ndarray, agree: np.ndarray, *, target: float = 0.9,
                      epsilon: float = 0.1, delta: float = 0.1, grid: np.ndarray | None = None) -> np.ndarray:
    """Dispatch to a rule by name (``paper``, ``agreement``, ``ltt``); returns (E,) thresholds."""
    if rule == "paper":
        return paper_thresholds(conf, agree)
    if rule == "agreement":
        return agreement_thresholds(conf, agree, target)
    if rule == "ltt":
        return ltt_thresholds(conf, agree, epsilon, delta, grid)
    raise LiteError(f"--rule must be one of {RULES}, got {rule!r}")


@dataclass
class LayerStats:
    """What a set of thresholds does on the calibration tokens, per exit layer below L.

    Attributes:
        agreement: rate at which layer i's argmax equals the final layer's, over all tokens.
        marginal_exit_rate: share of tokens with conf_i >= t_i (layer i alone).
        marginal_agreement: agreement among those tokens (NaN when none).
        exit_rate: share of tokens that leave at layer i in the cascade (no earlier layer let them leave).
        exit_agreement: agreement among the tokens that leave at layer i in the cascade (NaN when none).
        final_rate: share of tokens that reach the final layer L.
        exited_agreement: agreement among all tokens that leave early (NaN when none).
        exit_count: tokens that leave at layer i in the cascade (the n behind ``exit_agreement``).
        exit_agreement_interval: Wilson 95% interval (low, high) of ``exit_agreement`` ((NaN, NaN) when no
            token leaves there): how far the agreement may be from what these few tokens show.
    """

    agreement: list[float]
    marginal_exit_rate: list[float]
    marginal_agreement: list[float]
    exit_rate: list[float]
    exit_agreement: list[float]
    final_rate: float
    exited_agreement: float
    exit_count: list[int] = field(default_factory=list)
    exit_agreement_interval: list[tuple[float, float]] = field(default_factory=list)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (95% for the default ``z``); (NaN, NaN) when ``n`` is 0.

    Unlike the normal approximation it stays inside [0, 1] and is honest for small ``n`` and rates near
    0 or 1, which is where exit agreement lives.
    """
    if n <= 0:
        return float("nan"), float("nan")
    if successes <= 0:  # the closed forms, without rounding: the interval holds the observed rate
        return 0.0, z * z / (n + z * z)
    if successes >= n:
        return n / (n + z * z), 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def cascade_stats(conf: np.ndarray, agree: np.ndarray, thresholds: np.ndarray) -> LayerStats:
    """Marginal and cascade exit rates and agreements of ``thresholds`` on the collected tokens."""
    conf, agree = _check(conf, agree)
    e, n = conf.shape
    thresholds = np.asarray(thresholds, dtype=np.float64)
    exits = conf >= thresholds[:, None]  # (E, N) marginal
    remaining = np.ones(n, dtype=bool)
    rate, agree_rate, counts, intervals = [], [], [], []
    exited_total = exited_agree = 0
    for i in range(e):
        here = exits[i] & remaining
        rate.append(_rate(here.sum(), n))
        agree_rate.append(_rate((here & agree[i]).sum(), here.sum()))
        counts.append(int(here.sum()))
        intervals.append(wilson_interval(int((here & agree[i]).sum()), int(here.sum())))
        exited_total += int(here.sum())
        exited_agree += int((here & agree[i]).sum())
        remaining &= ~here
    return LayerStats(
        agreement=[_rate(agree[i].sum(), n) for i in range(e)],
        marginal_exit_rate=[_rate(exits[i].sum(), n) for i in range(e)],
        marginal_agreement=[_rate((exits[i] & agree[i]).sum(), exits[i].sum()) for i in range(e)],
        exit_rate=rate,
        exit_agreement=agree_rate,
        final_rate=_rate(remaining.sum(), n),
        exited_agreement=_rate(exited_agree, exited_total),
        exit_count=counts,
        exit_agreement_interval=intervals,
    )
