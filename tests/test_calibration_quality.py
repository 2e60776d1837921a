"""``lite calibrate --quality-bar``: ``--exit auto`` chosen by the answers users get, not by agreement alone."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny import CALIBRATION_ROWS as ROWS

from lite import LiteConfig, load_model
from lite.evaluation import quality
from lite.evaluation.quality import Candidate, choose, scaled_policy
from lite.cli import main
from lite.decoding import ExitPolicy
from lite.decoding.gate import LearnedExitGate
from lite.decoding.spec import default_exit, priced_speedup
from lite.model.config import NEVER_EXIT


def _candidate(kind, scale, compute, q):
    return Candidate(kind=kind, scale=scale, layers_saved=compute, compute_saved=compute, rouge_full=None,
                     rouge_ref=None, loglik=None, quality=q, exit_rates={})


def test_choose_keeps_the_cheapest_that_meets_the_bar_else_none():
    cands = [_candidate("gate", 1.0, 0.30, 0.80), _candidate("gate", 1.1, 0.20, 0.96),
             _candidate("dynamic", 1.0, 0.25, 0.95), _candidate("dynamic", 1.2, 0.05, 0.99),
             _candidate("dynamic", 1.05, 0.25, 0.97), _candidate("gate", 1.2, 0.40, None)]
    assert choose(cands, 0.95).name == "dynamic@1"  # 25% saved; the tie with 1.05 goes to the smaller scale
    assert choose(cands, 0.98).name == "dynamic@1.2"
    assert choose(cands, 0.995) is None  # nothing meets it: auto decodes in full


def test_scaled_policy_raises_every_cut_and_leaves_the_original_alone():
    p = ExitPolicy("dynamic", thresholds={1: 0.5, 2: 0.8, 3: 0.95})
    assert scaled_policy(p, 1.1).checks == pytest.approx({1: 0.55, 2: 0.88, 3: NEVER_EXIT})  # max-prob <= 1
    assert p.checks == {1: 0.5, 2: 0.8, 3: 0.95}
    gate = LearnedExitGate({1: [(torch.zeros(1, 4), torch.zeros(1))]}, thresholds={1: 0.6}, features="state",
                           confirm={1: 0.7})
    g = scaled_policy(ExitPolicy("gate", gate=gate), 1.2).gate
    assert g.thresholds == pytest.approx({1: 0.72}) and g.confirm == pytest.approx({1: 0.84})
    assert scaled_policy(ExitPolicy("gate", gate=gate), 1.8).gate.thresholds == {1: 1.0}  # a probability
    assert gate.thresholds == {1: 0.6} and gate.confirm == {1: 0.7} and g.params is gate.params
    # the decisions follow the scaled cut: a state whose probability (0.5: zero weights) passes 0.45 but not 0.54
    low = LearnedExitGate({1: [(torch.zeros(1, 4), torch.zeros(1))]}, thresholds={1: 0.45}, features="state")
    state = torch.zeros(1, 4)
    assert low.should_exit_rows(1, state) == [True]
    assert scaled_policy(ExitPolicy("gate", gate=low), 1.2).gate.should_exit_rows(1, state) == [False]


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS))
    return path


def _calibrate(model, data, *more):
    return main(["calibrate", "--model", str(model), "--data", str(data), "--rule", "agreement", "--target",
                 "0.5", "--gate", "--filter", "status=ok", "--min-tokens", "16", "--ceiling", "0", *more])


def test_quality_bar_decodes_every_candidate_and_makes_the_choice_auto(tiny_model_dir, data_file, tmp_path, capsys):
    plain, judged = tmp_path / "plain", tmp_path / "judged"
    for folder in (plain, judged):
        shutil.copytree(tiny_model_dir, folder)
    assert _calibrate(plain, data_file) == 0
    assert _calibrate(judged, data_file, "--quality-bar", "1e-6", "--quality-prompts", "3",
                      "--max-new-tokens", "4") == 0
    before, cfg = LiteConfig.load(plain), LiteConfig.load(judged)
    q = cfg.calibration["quality"]
    printed = capsys.readouterr().out
    assert f"**{q['chosen']}** (chosen)" in printed and printed.count("dynamic@") >= len(quality.SCALES)
    by_batch = cfg.calibration["auto_by_batch"]  # and what auto decodes with at each batch size, priced
    assert f"batch 16: {by_batch['16']} (" in printed and "--exit auto by the rows decoded together" in printed
    # a random tiny model's answers share nothing with the references: the full model's likelihood judges
    assert q["full"]["rouge_ref"] == 0 and q["measure"] == "full_model_likelihood"
    assert q["full"]["prompts"] == 3 and q["bar"] == 1e-6
    assert [c["name"] for c in q["candidates"]] == [f"{k}@{s:g}" for k in ("dynamic", "gate") for s in quality.SCALES]
    quality_of = {c["name"]: c["quality"] for c in q["candidates"]}
    saved = {c["name"]: c["compute_saved"] for c in q["candidates"]}
    meeting = [n for n, v in quality_of.items() if v is not None and v >= 1e-6]
    assert q["chosen"] == max(meeting, key=lambda n: (saved[n], -float(n.split("@")[1])))
    kind, scale = q["chosen"].split("@")
    assert cfg.default_exit == kind and default_exit(load_model(judged, device="cpu")) in (kind, "none")
    if kind == "dynamic":  # the chosen cuts are the calibrated ones times the scale
        assert {k: v / float(scale) for k, v in cfg.thresholds.items()} == pytest.approx(before.thresholds)
    else:
        assert cfg.calibration["gate"]["thresholds"] == pytest.approx(
            {k: v * float(scale) for k, v in before.calibration["gate"]["thresholds"].items()})
    chosen = next(c for c in q["candidates"] if c["name"] == q["chosen"])
    card = (judged / "README.md").read_text()  # the model card says how auto was chosen and what it kept
    assert f"quality bar 1e-06 (full model likelihood) on 3 decoded calibration prompts: {q['chosen']} kept " \
        f"{chosen['quality']:.3f}" in card and "Chosen by the quality bar" not in (plain / "README.md").read_text()
    lm = load_model(judged, device="cpu")
    if chosen["exit_rates"]:  # auto is priced where the chosen policy's decoded answers left
        by_stats = dict(cfg.calibration if kind == "dynamic" else cfg.calibration["gate"])["expected_exit_rate"]
        assert by_stats != chosen["exit_rates"] or scale == "1"
        assert priced_speedup(lm, kind) is not None


def test_no_candidate_meeting_the_bar_makes_auto_decode_in_full(tiny_model_dir, data_file, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    monkeypatch.setattr(quality, "choose", lambda candidates, bar: None)
    assert _calibrate(model, data_file, "--quality-bar", "0.99", "--quality-prompts", "2",
                      "--max-new-tokens", "3") == 0
    cfg = LiteConfig.load(model)
    assert cfg.default_exit == "none" and cfg.calibration["quality"]["chosen"] is None
    assert default_exit(load_model(model, device="cpu")) == "none"
    assert "--exit auto" in (model / "README.md").read_text()


def test_quality_bar_out_of_range_is_refused_before_anything_is_written(tiny_model_dir, data_file, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = sorted(p.name for p in model.iterdir())
    assert _calibrate(model, data_file, "--quality-bar", "1.5") == 2
    assert "--quality-bar" in capsys.readouterr().err and sorted(p.name for p in model.iterdir()) == before


def test_quality_bar_decodes_with_the_exit_vocabulary_the_same_command_ranks(tiny_model_dir, data_file, tmp_path):
    """`--draft-vocab --exit-vocab N --quality-bar B` on a folder without draft_vocab.json (what
    scripts/ship_default.sh runs on a fresh run): the candidates read the new ranking's head, which is saved
    with the calibration (once failed after the whole collection: the ranking was only read from disk)."""
    from lite.decoding.draft_vocab import load_ranking

    model = tmp_path / "fresh"
    shutil.copytree(tiny_model_dir, model)
    assert not (model / "draft_vocab.json").exists()
    assert _calibrate(model, data_file, "--draft-vocab", "--exit-vocab", "24", "--gate-cascade",
                      "--quality-bar", "1e-6", "--quality-prompts", "2", "--max-new-tokens", "4") == 0
    cfg = LiteConfig.load(model)
    assert cfg.exit_vocab == 24 and load_ranking(model) is not None
    assert len(cfg.calibration["quality"]["candidates"]) == 2 * len(quality.SCALES)


def test_rows_without_a_reference_do_not_switch_the_measure(tiny_model_dir):
    """ROUGE-L against the references is taken over the prompts that have one; a prompt without a
    reference among them leaves the measure as it is (it used to switch the whole judgement to likelihood)."""
    from lite.decoding import GenerationSettings, generate_batch
    from lite.evaluation.metrics import rouge_l

    lm = load_model(tiny_model_dir, device="cpu")
    prompts = [[5, 17, 9], [7, 8, 30, 31], [11, 12]]
    settings = GenerationSettings(max_new_tokens=4)
    exits = ExitPolicy("dynamic", thresholds={1: 0.0, 2: 2.0, 3: 2.0})  # every token leaves at layer 1
    full = generate_batch(lm, prompts, ExitPolicy(kind="none"), settings)
    refs = [full[0].text, None, full[2].text]  # the full model's own answers: ROUGE-L 1 where there is one
    assert rouge_l(full[0].text, refs[0]) == 1.0
    base, candidates = quality.judge(lm, prompts, refs, {"dynamic": exits}, max_new_tokens=4, scales=(1.0,),
                                     measure="rouge")
    assert base["measure"] == "rouge_l_vs_references" and base["references"] == 2 and base["rouge_ref"] == 1.0
    (c,) = candidates
    early = [r.text for r in generate_batch(lm, prompts, exits, settings)]
    assert c.rouge_ref == pytest.approx((rouge_l(early[0], refs[0]) + rouge_l(early[2], refs[2])) / 2)
    assert c.quality == pytest.approx(c.rouge_ref) == pytest.approx(c.rouge_ratio)
    assert "(2 of them with a reference)" in quality.quality_table(quality.record(base, candidates, 0.5, None))
    one = dict(base, references=1)  # a count of 1 is a count, not an older record's True
    assert "(1 of them with a reference)" in quality.quality_table(quality.record(one, candidates, 0.5, None))


def test_the_bar_applies_to_the_measure_asked_for_and_both_takes_the_lower(tiny_model_dir):
    """--quality-measure: rouge (against the references), loglik (the full model's likelihood of the answers
    over that of its own) or both (the lower: a candidate must keep the bar by each)."""
    import math

    from lite.cli.calibrate_cmd import QUALITY_MEASURES
    from lite.decoding import GenerationSettings, generate_batch
    from lite.evaluation.loglik import answer_logliks

    assert QUALITY_MEASURES == quality.MEASURES and QUALITY_MEASURES[0] == "both"  # the CLI spells them torch-free
    lm = load_model(tiny_model_dir, device="cpu")
    prompts = [[5, 17, 9], [7, 8, 30, 31], [11, 12]]
    settings = GenerationSettings(max_new_tokens=4)
    exits = ExitPolicy("dynamic", thresholds={1: 0.0, 2: 2.0, 3: 2.0})  # every token leaves at layer 1
    full = generate_batch(lm, prompts, ExitPolicy(kind="none"), settings)
    early = generate_batch(lm, prompts, exits, settings)
    assert [r.token_ids for r in early] != [r.token_ids for r in full]  # the exits change the answers
    refs = [f.text for f in full]  # ROUGE-L of the full model's answers against these: 1

    def ll(runs):  # by hand: the mean over answers of each answer's mean per-token log-likelihood
        values = answer_logliks(lm, [(p, list(r.token_ids)) for p, r in zip(prompts, runs)], 8).values
        return sum(values) / len(values)

    by = {}
    for measure in quality.MEASURES:
        base, (c,) = quality.judge(lm, prompts, refs, {"dynamic": exits}, max_new_tokens=4, scales=(1.0,),
                                   measure=measure)
        assert c.loglik_ratio == pytest.approx(math.exp(ll(early) - ll(full)))
        assert c.rouge_ratio == pytest.approx(c.rouge_ref / base["rouge_ref"])
        by[measure] = (base["measure"], c.quality, c)
    c = by["both"][2]
    assert by["rouge"][:2] == ("rouge_l_vs_references", pytest.approx(c.rouge_ratio))
    assert by["loglik"][:2] == ("full_model_likelihood", pytest.approx(c.loglik_ratio))
    assert by["both"][:2] == ("rouge_l_vs_references_and_full_model_likelihood",
                              pytest.approx(min(c.rouge_ratio, c.loglik_ratio)))
    assert c.rouge_ratio != pytest.approx(c.loglik_ratio)  # so "both" picked one of two different figures
    # the choice follows: a bar between the two passes the candidate by the higher measure alone
    low, high = sorted((c.rouge_ratio, c.loglik_ratio))
    bar = (low + high) / 2
    higher = "rouge" if c.rouge_ratio > c.loglik_ratio else "loglik"
    assert quality.choose([by[higher][2]], bar) is not None and quality.choose([c], bar) is None
    with pytest.raises(ValueError, match="measure"):
        quality.judge(lm, prompts, refs, {"dynamic": exits}, max_new_tokens=4, scales=(1.0,), measure="bleu")
    table = quality.quality_table(quality.record(*quality.judge(lm, prompts, refs, {"dynamic": exits},
                                                                max_new_tokens=4, scales=(1.0,)), bar, None))
    assert "| ROUGE-L ratio | likelihood ratio |" in table and f"{c.loglik_ratio:.3f}" in table
