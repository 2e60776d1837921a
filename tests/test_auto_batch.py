"""``--exit auto`` at the batch size it runs: a step of B rows lasts until its deepest row leaves, so the
calibrated policy is priced at B (:func:`lite.decoding.cost.batch_step_price`) and gives way to exits off
where it would not be at least ``PRICE_MARGIN`` faster; batch-invariant decoding prices every row alone."""

from __future__ import annotations

import math
import shutil

import httpx
import pytest

import lite
from lite.decoding.cost import StepPrices, batch_step_price
from lite.decoding.spec import PRICE_MARGIN, default_exit, priced_speedup, priced_table
from lite.model.config import LiteConfig
from lite.model.loading import load_model


def test_expected_calls_is_the_binomial_mean_of_calls():
    """The closed form against the sum over every number of rows taking part."""
    pr = StepPrices(head=3.0, exit_read=0.5, check=0.2, kv_fill=0.1, row_cost=0.1)
    for batch, p, w in ((1, 0.3, 1.0), (2, 0.3, 0.5), (8, 0.65, 2.0), (16, 0.0, 1.0), (16, 1.0, 1.0)):
        by_sum = sum(math.comb(batch, n) * p ** n * (1 - p) ** (batch - n) * pr.calls(n, w) for n in range(batch + 1))
        assert pr.expected_calls(batch, p, w) == pytest.approx(by_sum)
    assert pr.expected_calls(2, 0.3) == pytest.approx(2 * 0.3 * 0.7 * 1 + 0.09 * 1.1)  # one row, or both


def test_step_price_by_hand_alone_and_riding_along():
    """L = 2, one exit at layer 1 that a row leaves at with probability p; prices in blocks of one row."""
    p, rho = 0.4, 0.1
    pr = StepPrices(head=3.0, exit_read=0.5, check=0.2, kv_fill=0.1, overhead=0.05, row_cost=rho)
    cost, full = batch_step_price({1: p}, [1], 2, 1, pr, ride=False)
    assert full == pytest.approx(2 + 3.0)
    # block 1, the check (+ its overhead), the exit read of the rows that leave, block 2 or its K/V fill, the head
    assert cost == pytest.approx(1 + 0.2 + 0.05 + p * 0.5 + (1 - p) * 1 + p * 0.1 + (1 - p) * 3.0)
    cost2, full2 = batch_step_price({1: p}, [1], 2, 2, pr, ride=True)
    c2 = 1 + rho  # a call over 2 rows
    assert full2 == pytest.approx(c2 * 5.0)
    deepest = 1 + (1 - p ** 2)  # block 1 always; block 2 unless both rows left
    leave = 2 * p * (1 - p) * 0.5 + p * p * 0.5 * c2  # one row leaves, or both in one call
    heads = 2 * p * (1 - p) * 3.0 + (1 - p) ** 2 * 3.0 * c2
    want = c2 * 0.2 + 0.05 + leave + heads + c2 * deepest + c2 * 0.1 * (2 - deepest)
    assert cost2 == pytest.approx(want)
    # nobody leaves: every row runs every block, plus the check: exits cost more than they save
    cost0, full0 = batch_step_price({1: 0.0}, [1], 2, 4, pr, ride=True)
    assert cost0 > full0


@pytest.fixture()
def priced_model(tiny_model_dir, tmp_path):
    """The tiny model with calibrated thresholds and a calibration record whose rows leave at layer 1 half
    of the time (the rest reach L = 4): exits pay alone, not in a batch that waits for its deepest row."""
    folder = tmp_path / "priced"
    shutil.copytree(tiny_model_dir, folder)
    lm = load_model(folder, device="cpu")
    below = [k for k in lm.exit_layers if k < lm.num_layers]
    cfg = LiteConfig(num_layers=lm.num_layers, exit_layers=lm.exit_layers,
                     thresholds={str(k): 0.0 for k in below}, confidence="max_prob", default_exit="dynamic",
                     calibration={"layers": below, "expected_exit_rate": {str(k): (0.5 if k == below[0] else 0.0)
                                                                          for k in below}})
    cfg.save(folder)
    return folder


def test_auto_is_the_calibrated_policy_alone_and_exits_off_where_a_batch_would_pay_for_them(priced_model):
    lm = load_model(priced_model, device="cpu")
    prices = {b: priced_speedup(lm, "dynamic", b) for b in (1, 2, 4, 8, 16)}
    assert prices[1] >= 1 + PRICE_MARGIN and prices[16] < 1 + PRICE_MARGIN
    assert prices[1] > prices[2] > prices[4]  # the deepest of more rows goes deeper
    assert default_exit(lm, 1) == "dynamic" and default_exit(lm, 16) == "none"
    assert priced_table(lm) == {"dynamic": {str(b): round(v, 3) for b, v in prices.items()}}  # no gate recorded
    # the price follows the record: rows that all leave at the first exit pay at any batch size
    cfg = LiteConfig.load(priced_model)
    cfg.calibration["expected_exit_rate"] = {k: (1.0 if v else 0.0) for k, v in cfg.calibration["expected_exit_rate"].items()}
    cfg.save(priced_model)
    assert default_exit(load_model(priced_model, device="cpu"), 16) == "dynamic"


def test_the_python_api_and_the_server_price_auto_at_the_rows_they_run_together(priced_model):
    from lite.serving import ServeConfig, serve_in_thread

    model = lite.load(str(priced_model), device="cpu")
    lm = model.lite_model
    L = lm.num_layers
    prompts = [f"Say {w}" for w in ("hi", "yes", "no", "one", "two", "six", "red", "sun")] * 2
    batched = model.generate(prompts, max_new_tokens=3, batch_size=16, batch_invariant=False)
    assert all(t.exit_layer == L for r in batched for t in r.tokens)  # priced at 16 rows: exits off
    alone = model.generate(prompts[:2], max_new_tokens=3, batch_size=16, batch_invariant=True)
    assert all(t.exit_layer < L for r in alone for t in r.tokens)  # every row alone: the thresholds (0) decide
    single = model.generate(prompts[0], max_new_tokens=3)
    assert all(t.exit_layer < L for t in single.tokens)
    for invariant, want in ((False, "none"), (True, "dynamic")):
        url, stop = serve_in_thread(lm, ServeConfig(model_name="m", max_batch=16, batch_invariant=invariant))
        try:
            card = httpx.get(f"{url}/v1/models/m").json()
            assert card["lite"]["default_exit"] == want
        finally:
            stop()


def test_eval_says_what_auto_picks_at_its_batch_size(priced_model):
    """lite eval measures the calibrated policy at any batch size, and its report says what --exit auto
    decodes with at that batch size, with the prices it followed."""
    from lite.evaluation.report import _auto_line
    from lite.evaluation.run import _auto_at_batch

    lm = load_model(priced_model, device="cpu")
    auto = _auto_at_batch(lm, 16)
    assert auto["batch"] == 16 and auto["policy"] == "none"
    assert auto["priced_speedup"] == {"dynamic": {"1": round(priced_speedup(lm, "dynamic", 1), 3),
                                                  "16": round(priced_speedup(lm, "dynamic", 16), 3)}}
    line = _auto_line({"auto_at_batch": auto})[0]
    assert "at batch 16 decodes with `none`" in line and f"{auto['priced_speedup']['dynamic']['16']:.2f}x at batch 16" in line
    assert "at least 10% faster" in line  # PRICE_MARGIN
    assert _auto_line({"auto_at_batch": {"batch": 8, "policy": "none", "margin": 0.1, "priced_speedup": {}}}) == []
