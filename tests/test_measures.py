"""The shared measurements: own answers, the teacher-forced scorer, the bootstrap; pinned by hand computations."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lite import load_model
from lite.calibration.scoring import answer_sequences, reference_sequences, score_sequences
from lite.decoding import ExitPolicy, GenerationSettings, generate
from lite.errors import LiteError
from lite.evaluation.metrics import bootstrap_interval
from lite.model.prompts import encode_prompt
from lite.training.data import DataError, Example, prompt_ids
from lite.training.own_answers import own_answers


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu")


def _prompts(lm, n=4):
    return [encode_prompt(lm.tokenizer, f"Count to {i}." + " please" * i, "", "alpaca") for i in range(n)]


# ------------------------------------------------------------------------------------ own answers
def test_own_answers_are_each_prompts_greedy_answer_alone(lm):
    prompts = _prompts(lm)
    made = own_answers(lm, prompts, max_new_tokens=5, batch_size=3)
    alone = [generate(lm, p, ExitPolicy(kind="none"), GenerationSettings(max_new_tokens=5)).token_ids for p in prompts]
    assert made.ids == alone and made.budgets == [5] * 4 and made.generated == 4


def test_own_answers_cut_at_max_length_and_skip_a_prompt_that_reaches_it(lm):
    prompts = _prompts(lm, 3)
    limit = len(prompts[1]) + 2  # prompt 0 keeps its budget, prompt 1 two tokens, prompt 2 none
    lm.model.generation_config.eos_token_id, eos = None, lm.model.generation_config.eos_token_id
    try:
        made = own_answers(lm, prompts, max_new_tokens=4, max_length=limit)
    finally:
        lm.model.generation_config.eos_token_id = eos
    assert made.budgets[1:] == [2, 0] and made.ids[2] == [] and made.generated == 2
    assert len(made.ids[1]) <= 2


def test_own_answers_cache_is_read_back_and_refuses_another_models_answers(lm, tmp_path):
    prompts, cache = _prompts(lm, 3), tmp_path / "answers.jsonl"
    first = own_answers(lm, prompts, max_new_tokens=4, cache=cache, model_id="m")
    lines = cache.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["model"] == "m" for line in lines)
    again = own_answers(lm, prompts, max_new_tokens=4, cache=cache, model_id="m")
    assert again.ids == first.ids and again.generated == 0 and len(cache.read_text().splitlines()) == 3
    with pytest.raises(DataError, match="delete it to generate afresh"):
        own_answers(lm, prompts, max_new_tokens=4, cache=cache, model_id="other")


def test_own_answers_of_both_generators_agree_on_a_tiny_model(lm):
    """transformers' batched generate (left padding) and lite's engine give the same greedy tokens here."""
    prompts = _prompts(lm, 3)
    hf = own_answers(lm, prompts, max_new_tokens=4, generator="hf", longest_first=True)
    assert hf.ids == own_answers(lm, prompts, max_new_tokens=4).ids
    with pytest.raises(ValueError, match="generator"):
        own_answers(lm, prompts, generator="vllm")


# ------------------------------------------------------------------------------------ the scorer
def test_answer_and_reference_sequences_score_the_positions_that_predict_the_answer(lm):
    assert answer_sequences([([5, 6, 7], [8, 9]), ([5], []), ([], [3])]) == [([5, 6, 7, 8, 9], [2, 3]), None, None]
    row = Example("0:0", "Say hi.", "", "hi")
    (ids, positions), = reference_sequences(lm.tokenizer, [row], "alpaca")
    prompt = prompt_ids(lm.tokenizer, row, "alpaca")
    assert ids[:len(prompt)] == prompt and positions == list(range(len(prompt) - 1, len(ids) - 1))
    assert ids[-1] == lm.tokenizer.eos_token_id  # the response ends with EOS, which is scored too


def test_scorer_matches_a_plain_forward_worked_by_hand(lm):
    """Agreement, max-prob, CE against the answer token and KL(L || k) at every answer position, from the
    transformers forward (normed states through the head), against the scorer's one pass per sequence."""
    prompts = _prompts(lm, 3)
    answers = own_answers(lm, prompts, max_new_tokens=5).ids
    seqs = answer_sequences(zip(prompts, answers))
    L = lm.num_layers
    layers = [1, 2, L]
    s = score_sequences(lm, seqs, layers=layers, losses=True)
    assert s.layers == layers and s.sequences == 3 and s.tokens == sum(len(a) for a in answers)
    agree, maxp, ce, kl, answer = ([[] for _ in layers] for _ in range(5))
    with torch.no_grad():
        for ids, pos in seqs:
            states = lm.hidden_states(torch.tensor([ids]), layers=layers)
            target = torch.tensor(ids)[torch.tensor(pos) + 1]
            final = F.log_softmax(lm.lm_head(states[L][0, pos]).float(), -1)
            for i, k in enumerate(layers):
                logp = F.log_softmax(lm.lm_head(states[k][0, pos]).float(), -1)
                agree[i] += (logp.argmax(-1) == final.argmax(-1)).tolist()
                answer[i] += (logp.argmax(-1) == target).tolist()
                maxp[i] += logp.exp().amax(-1).tolist()
                ce[i] += (-logp[torch.arange(len(pos)), target]).tolist()
                kl[i] += (final.exp() * (final - logp)).sum(-1).tolist()
    assert (s.agree == np.array(agree)).all() and s.agree[-1].all()  # layer L agrees with itself
    assert (s.answer_agree == np.array(answer)).all() and s.answer_agree[-1].all()  # greedy answers: L's own
    other = [(ids[:p[0] + 1] + [(t + 1) % lm.vocab_size for t in ids[p[0] + 1:]], p) for ids, p in seqs]
    assert not score_sequences(lm, other, layers=[L]).answer_agree.any()  # another's tokens: never L's argmax
    np.testing.assert_allclose(s.confidences["max_prob"], maxp, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s.ce, ce, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s.kl, kl, rtol=1e-3, atol=1e-4)
    assert np.allclose(s.kl[-1], 0, atol=1e-6)
    assert s.agreement() == {k: float(np.mean(a)) for k, a in zip(layers, agree)}  # over answer tokens
    hits = s.per_sequence(s.agree[0])
    assert hits.shape == (3,) and hits.sum() == s.agree[0].sum()
    assert list(s.per_sequence(np.ones(s.tokens))) == [len(a) for a in answers]


def test_scorer_skips_none_and_refuses_what_it_cannot_score(lm):
    s = score_sequences(lm, [None, ([1, 2, 3], [1]), None])
    assert (s.sequences, s.skipped, s.tokens) == (1, 2, 1) and s.ce is None and s.states == {}
    assert s.layers == [k for k in lm.exit_layers if k < lm.num_layers]
    with pytest.raises(LiteError, match="none of the 1 examples"):
        score_sequences(lm, [None])
    with pytest.raises(LiteError, match="within 1.."):
        score_sequences(lm, [([1, 2], [0])], layers=[0])
    with pytest.raises(LiteError, match="full vocabulary"):
        score_sequences(lm, [([1, 2], [0])], losses=True, vocab=[1, 2, 3])


def test_scorer_keeps_several_gate_feature_kinds_from_one_pass(lm):
    seqs = [([1, 2, 3, 4], [1, 2])]
    s = score_sequences(lm, seqs, layers=[1, 2], states=("exit", "state+delta"))
    d = lm.hidden_size
    assert s.states["exit"].shape == (2, 2, d) and s.states["state+delta"].shape == (2, 2, 2 * d)
    with torch.no_grad():
        states = lm.hidden_states(torch.tensor([seqs[0][0]]), layers=[1])
    np.testing.assert_allclose(s.states["exit"][0], states[1][0, [1, 2]].numpy(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_interval_is_the_percentile_interval_of_resampled_prompts():
    values, weights = np.array([3.0, 0.0, 5.0, 2.0]), np.array([4.0, 2.0, 5.0, 4.0])
    rng = np.random.default_rng(0)
    pick = rng.integers(0, 4, size=(2000, 4))
    ratio = values[pick].sum(1) / weights[pick].sum(1)
    assert bootstrap_interval(values, weights) == tuple(float(x) for x in np.percentile(ratio, [2.5, 97.5]))
    assert bootstrap_interval(values) == tuple(float(x) for x in np.percentile(values[pick].mean(1), [2.5, 97.5]))
    lo, hi = bootstrap_interval(values, weights, level=0.5)
    assert lo == float(np.percentile(ratio, 25)) and hi == float(np.percentile(ratio, 75))
    assert bootstrap_interval([7.0, 7.0]) == (7.0, 7.0)
    assert all(np.isnan(bootstrap_interval([])))
    with pytest.raises(ValueError, match="one weight per value"):
        bootstrap_interval([1.0], [1.0, 2.0])


# ------------------------------------------------------------------------------------ exit agreement
def test_exit_agreement_is_the_scorers_figures_with_prompts_as_the_bootstrap_unit(lm):
    """lite.evaluation.agreement: per layer, agreement with L over answer positions and its interval over
    prompts (not tokens), KL and CE on the given answers, CE on the references; L agrees with itself at KL 0.
    The answers here are other text than the model's own (it would agree at every layer of this tiny model)."""
    from lite.evaluation.agreement import agreement_markdown, exit_agreement

    rows = [Example(f"0:{i}", f"Count to {i}.", "", "one two three " * (i + 1)) for i in range(4)]
    own = reference_sequences(lm.tokenizer, rows, "alpaca")
    refs = reference_sequences(lm.tokenizer, rows[:2], "alpaca")
    res = exit_agreement(lm, own + [None], refs)
    L, layers = lm.num_layers, sorted(set(lm.exit_layers) | {lm.num_layers})
    s = score_sequences(lm, own, layers=layers, losses=True)
    r = score_sequences(lm, refs, layers=layers, losses=True)
    assert list(res["layers"]) == [str(k) for k in layers]
    assert (res["prompts"], res["prompts_skipped_empty_answer"], res["answer_tokens"]) == (4, 1, s.tokens)
    per_prompt = [len(p) for _, p in own]
    mixed = 0
    for i, k in enumerate(layers):
        got = res["layers"][str(k)]
        hits = [int(s.agree[i][s.index == j].sum()) for j in range(4)]
        assert got["agreement"] == pytest.approx(sum(hits) / sum(per_prompt))
        assert tuple(got["agreement_ci95"]) == bootstrap_interval(hits, per_prompt)
        if 0 < got["agreement"] < 1:  # where the unit matters: tokens resampled give another interval
            mixed += 1
            assert tuple(got["agreement_ci95"]) != bootstrap_interval(s.agree[i].astype(float))
        assert got["kl_final_to_exit"] == pytest.approx(float(s.kl[i].mean()), rel=1e-5)
        assert got["ce_own_answers"] == pytest.approx(float(s.ce[i].mean()), rel=1e-5)
        assert got["ce_reference"] == pytest.approx(float(r.ce[i].mean()), rel=1e-5)
        assert (got["positions"], got["reference_tokens"]) == (s.tokens, r.tokens)
    assert mixed > 0
    last = res["layers"][str(L)]
    assert last["agreement"] == 1.0 and last["agreement_ci95"] == [1.0, 1.0]
    assert last["kl_final_to_exit"] == pytest.approx(0.0, abs=1e-6)
    assert res["final_layer_reference_loss"] == last["ce_reference"]
    text = agreement_markdown({"rows": 4, "command": "x", "date": "d", "torch": "t", "transformers": "v",
                               "threads": 1, "max_new_tokens": 5, "heldout_from": "m", "batch": 8,
                               "made_by": "test", "models": {"m": dict(res, seconds=1.0)}})
    assert f"| m | {L} | 1.000 | 1.000–1.000 |" in text
