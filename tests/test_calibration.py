"""Calibration: selection rules on synthetic arrays, the ltt guarantee, and `lite calibrate` end to end."""

import json
import math
import shutil
from fractions import Fraction

import numpy as np
import pytest
from tiny import CALIBRATION_ROWS as ROWS

import lite
from lite import LiteConfig, load_model
from lite.calibration import check_options, collect, select
from lite.calibration.thresholds import (
    NEVER_EXIT,
    agreement_thresholds,
    binom_cdf,
    cascade_stats,
    ltt_grid,
    ltt_min_count,
    ltt_start_count,
    ltt_thresholds,
    paper_thresholds,
)
from lite.cli import main
from lite.decoding import parse_exit
from lite.errors import LiteError


# ------------------------------------------------------------------------------------ rules, known answers
def test_paper_rule_is_mean_confidence_of_agreeing_tokens():
    conf = np.array([[0.9, 0.8, 0.3, 0.5], [0.2, 0.4, 0.6, 0.8]])
    agree = np.array([[True, True, False, False], [False, False, False, False]])
    out = paper_thresholds(conf, agree)
    assert out[0] == pytest.approx(0.85)
    assert out[1] == NEVER_EXIT  # a layer that never agrees never lets a token leave


def test_agreement_rule_known_answers():
    conf = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    agree = np.array([True, True, True, False, True, False])
    # rate of {conf >= t} from the top: 1, 1, 1, 3/4, 4/5, 4/6
    assert agreement_thresholds(conf, agree, 0.75)[0] == pytest.approx(0.6)
    assert agreement_thresholds(conf, agree, 0.8)[0] == pytest.approx(0.6)
    assert agreement_thresholds(conf, agree, 0.81)[0] == pytest.approx(0.8)
    assert agreement_thresholds(conf, agree, 1.0)[0] == pytest.approx(0.8)
    assert agreement_thresholds(conf, agree, 0.5)[0] == pytest.approx(0.5)
    assert agreement_thresholds(conf, ~np.ones(6, bool), 0.1)[0] == NEVER_EXIT
    # ties leave together: t = 0.9 exits both tokens, which agree at 1/2 only
    assert agreement_thresholds(np.array([0.9, 0.9]), np.array([True, False]), 0.6)[0] == NEVER_EXIT


def test_raising_the_agreement_target_never_lowers_a_threshold():
    rng = np.random.default_rng(0)
    targets = np.linspace(0.05, 1.0, 20)
    for _ in range(50):
        n = int(rng.integers(1, 200))
        conf = rng.random((3, n)).round(2)  # rounding makes ties
        agree = rng.random((3, n)) < rng.random((3, 1)) * conf + 0.2
        out = np.stack([agreement_thresholds(conf, agree, a) for a in targets])  # (targets, E)
        assert (np.diff(out, axis=0) >= 0).all()
        # and every finite threshold really meets its target on the tokens that would exit
        for a, row in zip(targets, out):
            for i, t in enumerate(row):
                if t < NEVER_EXIT:
                    assert agree[i][conf[i] >= t].mean() >= a - 1e-12


def _binom_cdf_exact(k, n, p):
    p = Fraction(p)
    return float(sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1)))


@pytest.mark.parametrize("k,n,p", [(0, 10, 0.1), (3, 10, 0.1), (5, 40, 0.2), (30, 200, 0.1), (10, 10, 0.5)])
def test_binomial_tail_matches_exact_arithmetic(k, n, p):
    assert binom_cdf(k, n, p) == pytest.approx(_binom_cdf_exact(k, n, p), rel=1e-9, abs=1e-300)


def _ltt_naive(conf, agree, eps, delta, grid):
    """Fixed-sequence testing written out plainly, with exact binomial sums."""
    n_min = ltt_start_count(eps, delta)
    chosen = NEVER_EXIT
    for t in grid:
        mask = conf >= t
        n, k = int(mask.sum()), int((~agree[mask]).sum())
        if n < n_min:
            continue
        if _binom_cdf_exact(k, n, eps) > delta:
            break
        chosen = t
    return chosen


def test_ltt_known_answer():
    conf = np.linspace(0.005, 0.995, 200)
    agree = conf >= 0.5  # every token above 0.5 agrees, every one below disagrees
    grid = ltt_grid("max_prob")
    got = ltt_thresholds(conf, agree, 0.1, 0.1)[0]
    assert got == pytest.approx(_ltt_naive(conf, agree, 0.1, 0.1, grid))
    assert 0.4 < got < 0.5  # it may take in a few disagreeing tokens, never many
    assert ltt_min_count(0.1, 0.1) == 22  # 0.9**22 <= 0.1 < 0.9**21
    # too few tokens to reject anything: never exit
    assert ltt_thresholds(conf[:10], agree[:10] | True, 0.1, 0.1)[0] == NEVER_EXIT


def test_ltt_bound_holds_on_fresh_samples():
    """conf ~ U(0,1), P(agree | conf = c) = c: the risk of threshold t is R(t) = (1 - t) / 2 exactly."""
    eps, delta, trials, n = 0.1, 0.1, 200, 2000
    rng = np.random.default_rng(1)
    chosen = []
    for _ in range(trials):
        conf = rng.random(n)
        agree = rng.random(n) < conf
        chosen.append(ltt_thresholds(conf, agree, eps, delta)[0])
    chosen = np.array(chosen)
    risk = np.where(chosen < NEVER_EXIT, (1 - chosen) / 2, 0.0)
    assert (risk > eps).mean() <= delta  # the guarantee
    assert np.median(chosen) < 0.95  # and it is not vacuous: it does let tokens leave (safe limit: 0.8)


def test_cascade_stats_count_each_token_once():
    conf = np.array([[0.9, 0.2, 0.8, 0.1], [0.9, 0.9, 0.1, 0.2]])
    agree = np.array([[True, False, False, True], [True, True, True, False]])
    s = cascade_stats(conf, agree, np.array([0.5, 0.5]))
    assert s.exit_rate == [0.5, 0.25] and s.final_rate == 0.25
    assert s.exit_agreement == [0.5, 1.0] and s.exited_agreement == pytest.approx(2 / 3)
    assert s.marginal_exit_rate == [0.5, 0.5] and s.agreement == [0.5, 0.75]


@pytest.mark.parametrize("kwargs,flag", [
    ({"target": 0.0}, "--target"), ({"target": 1.5}, "--target"), ({"epsilon": 0.0}, "--epsilon"),
    ({"epsilon": 1.0}, "--epsilon"), ({"delta": 0.0}, "--delta"), ({"delta": 1.2}, "--delta"),
    ({"rule": "best"}, "--rule"), ({"confidence": "vibes"}, "--confidence"), ({"source": "web"}, "--source"),
])
def test_bad_options_name_the_flag(kwargs, flag):
    with pytest.raises(LiteError, match=flag):
        check_options(**kwargs)


# ------------------------------------------------------------------------------------ on a tiny model


@pytest.fixture(scope="module")
def calibrated(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model calibrated once through the CLI (agreement rule, with a gate)."""
    root = tmp_path_factory.mktemp("calibrated")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    data = root / "data.json"
    data.write_text(json.dumps(ROWS))
    code = main(["calibrate", "--model", str(model), "--data", str(data), "--rule", "agreement",
                 "--target", "0.5", "--gate", "--filter", "status=ok", "--min-tokens", "16", "--max-new-tokens", "8"])  # tiny data
    assert code == 0
    return model, data


def test_calibrate_writes_thresholds_for_every_exit_below_L(calibrated):
    model, data = calibrated
    cfg = LiteConfig.load(model)
    assert sorted(int(k) for k in cfg.thresholds) == [k for k in cfg.exit_layers if k < cfg.num_layers]
    cal = cfg.calibration
    assert cal["rule"] == "agreement" and cal["parameters"] == {"target": 0.5} and cal["source"] == "reference"
    assert cal["examples"] == 8 and cal["tokens"] > 0  # 10 rows, 2 filtered out by status=ok
    assert cal["data"]["sources"][0]["path"] == str(data.resolve())
    assert set(cal["expected_exit_rate"]) == set(cfg.thresholds)
    assert cfg.gate_file and (model / cfg.gate_file).is_file()
    lm = load_model(model, device="cpu")
    assert lm.lite_config.thresholds == cfg.thresholds  # round trip through lite_config.json
    # what --exit auto decodes with at each batch size, and the prices it follows from, recorded and shown
    from lite.decoding.spec import PRICED_BATCHES, default_exit, priced_speedup

    assert set(cal["priced_speedup"]) == {"dynamic", "gate"}
    assert cal["priced_speedup"]["gate"]["8"] == round(priced_speedup(lm, "gate", 8), 3)
    assert cal["auto_by_batch"] == {str(b): default_exit(lm, b) for b in PRICED_BATCHES}
    card = (model / "README.md").read_text()
    by_batch = cal["priced_speedup"][cfg.default_exit]
    assert "at batch 16" in card and f"{by_batch['16']:.2f}x at batch 16" in card


def test_generate_dynamic_uses_calibrated_thresholds(calibrated, capsys):
    from lite.decoding import ExitPolicy, GenerationSettings, generate

    model, _ = calibrated
    code = main(["generate", "--model", str(model), "--exit", "dynamic", "--max-new-tokens", "6", "--json",
                 "Say hi"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) >= 1 and out["exit"] == "dynamic"
    # --threshold-scale moves every calibrated threshold: a huge one lets no token leave early
    assert main(["generate", "--model", str(model), "--exit", "dynamic", "--threshold-scale", "1e7",
                 "--max-new-tokens", "6", "--json", "Say hi"]) == 0
    assert {t["exit_layer"] for t in json.loads(capsys.readouterr().out)["tokens"]} == {4}
    assert main(["generate", "--model", str(model), "--gate", "--max-new-tokens", "6", "--json", "Say hi"]) == 0
    assert json.loads(capsys.readouterr().out)["gate"] is True
    lm = load_model(model, device="cpu")
    res = generate(lm, [5, 17, 42], parse_exit(lm, "dynamic"), GenerationSettings(max_new_tokens=8))
    thresholds = {int(k): v for k, v in lm.lite_config.thresholds.items()}
    for tok in res.tokens:  # a token left at an early layer only with confidence >= that layer's threshold
        if tok.exit_layer < lm.num_layers:
            assert tok.confidence >= thresholds[tok.exit_layer] - 1e-6


def test_every_verb_defaults_to_the_policy_calibration_recorded(calibrated, tmp_path, capsys):
    """--exit auto (the default of generate, eval, serve, demo and the Python API) is the model's own best
    policy: calibration records one of the policies it calibrated (which one: test_exit_vocab); a folder that
    records the gate gets the gate, one that records dynamic gets dynamic."""
    from lite.decoding.spec import resolve_exit_spec
    from lite.demo import demo_policy
    from lite.evaluation.run import EvalConfig, _policies

    model, _ = calibrated
    recorded = LiteConfig.load(model)
    assert set(recorded.calibration["expected_compute"]) == {"dynamic", "gate"}
    assert recorded.default_exit in ("dynamic", "gate")
    folders = {}
    for default in ("gate", "dynamic"):
        folders[default] = tmp_path / f"{default}-default"
        shutil.copytree(model, folders[default])
        cfg = LiteConfig.load(folders[default])
        cfg.default_exit = default
        cfg.save(folders[default])
    for folder, gate in ((folders["gate"], True), (folders["dynamic"], False)):
        assert main(["generate", "--model", str(folder), "--max-new-tokens", "3", "--json", "Say hi"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["exit"] == ("gate" if gate else "dynamic") and out["gate"] is gate
        lm = load_model(folder, device="cpu")
        want = "gate" if gate else "dynamic"
        assert resolve_exit_spec(lm, "auto") == want  # what lite serve's --exit auto decodes with
        assert demo_policy(lm, None)[1] == want
        keys = list(_policies(lm, EvalConfig(), "main"))
        assert keys == (["gate/copy"] if gate else ["dynamic@1/copy"])
        assert (lite.load(lm).generate("Say hi", max_new_tokens=3).tokens[0].exit_layer is not None)


def test_collected_measures_match_the_engine(tiny_model_dir):
    """The confidences calibration records are the engine's: a static:K run reports the same max_prob."""
    from lite.decoding import ExitPolicy, GenerationSettings, generate
    from lite.model.prompts import default_format, encode_prompt
    from lite.training.data import Example

    lm = load_model(tiny_model_dir, device="cpu")
    data = collect(lm, [Example("0:0", "Count.", "", "one two")], source="generated", max_new_tokens=5)
    prompt = encode_prompt(lm.tokenizer, "Count.", "", default_format(lm))  # the format collection uses
    full = generate(lm, prompt, ExitPolicy(kind="none"), GenerationSettings(max_new_tokens=5))
    assert data.source == "generated" and data.tokens == len(full.token_ids)  # one scored token per answer token
    res = generate(lm, prompt, ExitPolicy(kind="static", layer=2), GenerationSettings(max_new_tokens=1))
    i = data.layers.index(2)
    assert data.confidences["max_prob"][i, 0] == pytest.approx(res.tokens[0].confidence, rel=1e-4)
    assert data.agree.dtype == bool and ((data.confidences["entropy"] >= 0) & (data.confidences["entropy"] <= 1)).all()
    result = select(data, rule="paper", min_tokens=1)
    assert set(result.thresholds) == set(data.layers)


def _config_bytes(folder):
    path = folder / "lite_config.json"
    return path.read_bytes() if path.exists() else None


@pytest.mark.parametrize("extra,message", [
    (["--target", "1.5", "--rule", "agreement"], "--target"),
    (["--epsilon", "0", "--rule", "ltt"], "--epsilon"),
    (["--delta", "1", "--rule", "ltt"], "--delta"),
    (["--filter", "status=nothing"], "no held-out rows"),
])
def test_bad_input_one_clear_error_nothing_written(calibrated, tmp_path, extra, message, capsys):
    model, data = calibrated
    before = _config_bytes(model)
    assert main(["calibrate", "--model", str(model), "--data", str(data), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert _config_bytes(model) == before


def test_no_heldout_data_and_no_exit_layers(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert main(["calibrate", "--model", str(model)]) == 2
    assert "held-out" in capsys.readouterr().err
    assert not (model / "lite_config.json").exists()
    LiteConfig(num_layers=4, exit_layers=[4]).save(model)
    before = _config_bytes(model)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert main(["calibrate", "--model", str(model), "--data", str(data)]) == 2
    assert "nothing to calibrate" in capsys.readouterr().err
    assert _config_bytes(model) == before


def test_recorded_heldout_split_is_the_default_and_training_rows_are_left_out(tiny_model_dir, tmp_path):
    from lite.calibration import drop_training_rows
    from lite.training.data import prepare_data, read_examples

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    split = prepare_data([str(data)], heldout_fraction=0.3, seed=1)  # what lite train records
    LiteConfig(num_layers=4, exit_layers=[1, 2, 3, 4], data=split.provenance).save(model)
    # --data naming the training file (here as the second source): only its held-out rows survive
    other = tmp_path / "other.json"
    other.write_text(json.dumps(ROWS[:2]))
    rows, entries = read_examples([str(other), str(data)])
    kept, dropped = drop_training_rows(LiteConfig.load(model), rows, entries)
    assert dropped == len(split.train)
    assert [(e.instruction, e.output) for e in kept] == [(e.instruction, e.output) for e in rows[:2] + split.heldout]
    # no --data: the recorded held-out split
    assert main(["calibrate", "--model", str(model), "--rule", "ltt", "--min-tokens", "1"]) == 0
    cal = LiteConfig.load(model).calibration
    assert cal["data"]["heldout_split"] is True and cal["examples"] == len(split.heldout) == 3


def test_generated_source_in_batches_collects_what_one_at_a_time_collects(tiny_model_dir):
    """--batch-size only changes how answers are generated, not what is collected."""
    from lite.training.data import Example

    lm = load_model(tiny_model_dir, device="cpu")
    rows = [Example(f"0:{i}", f"Count to {i}." + " please" * i, "", "x") for i in range(5)]
    one = collect(lm, rows, source="generated", max_new_tokens=6, batch_size=1)
    three = collect(lm, rows, source="generated", max_new_tokens=6, batch_size=3)
    assert one.tokens == three.tokens and one.examples == three.examples == 5
    assert (one.agree == three.agree).all() and (one.example_index == three.example_index).all()
    for m in one.confidences:
        np.testing.assert_allclose(one.confidences[m], three.confidences[m], rtol=1e-4, atol=1e-6)
