"""Shortlist draft heads for speculative decoding (``--draft-vocab``): still lossless, cheaper drafts."""

import json
import random
import shutil

import pytest
import torch
from tiny import (
    CALIBRATION_ROWS as ROWS,
    CHI2_999,
    THRESHOLDS,
    agreeing_model,
    chi_square,
    first_round_tokens,
    make_tiny_model,
    random_prompts,
    with_ranking,
)

from lite.cli import main
from lite.decoding import ExitPolicy, GenerationSettings, decoder_for, generate
from lite.decoding.draft_vocab import FILE, load_ranking, rank_tokens, save_ranking
from lite.decoding.draft_vocab import vocab_ids as shortlist
from lite.decoding.spec import exit_vocab_ids
from lite.decoding.speculative import sampling_probs
from lite.errors import LiteError


def test_ranking_counts_response_tokens_most_frequent_first():
    _, tok = make_tiny_model(num_layers=1, hidden=16)
    ranking, tokens = rank_tokens(tok, ["aab", "ba", "a"])
    a, b = tok("a", add_special_tokens=False)["input_ids"][0], tok("b", add_special_tokens=False)["input_ids"][0]
    assert ranking[:2] == [a, b] and tokens == 6


def test_shortlist_takes_the_top_ids_adds_end_of_sequence_and_fills_from_low_ids():
    assert shortlist([9, 4, 7, 1], 2, vocab=10, always=[2]) == [2, 4, 9]
    assert shortlist([9], 3, vocab=10) == [0, 1, 9]  # two unranked fillers, lowest ids first
    assert shortlist([12, 9], 1, vocab=10) == [9]  # ids outside the vocabulary are ignored
    with pytest.raises(LiteError, match="lite calibrate --model m --draft-vocab"):
        shortlist(None, 4, vocab=10, where="m")
    with pytest.raises(LiteError, match="1..10"):
        shortlist([1], 0, vocab=10)


def test_unreadable_ranking_file_is_a_clear_error(tmp_path):
    (tmp_path / FILE).write_text("{not json")
    with pytest.raises(LiteError, match="--draft-vocab"):
        load_ranking(tmp_path)
    assert load_ranking(tmp_path / "missing") is None


def test_greedy_with_a_shortlist_draft_head_is_still_the_full_model(tmp_path):
    lm = with_ranking(agreeing_model(), tmp_path, random.Random(3).sample(range(32), 32))
    drafted = 0
    for n in (4, 12, 32):
        ids_allowed = set(shortlist(load_ranking(tmp_path), n, 32, {lm.tokenizer.eos_token_id}))
        for i, ids in enumerate(random_prompts(6, seed=n)):
            full = generate(lm, ids, ExitPolicy("none"), GenerationSettings(max_new_tokens=12))
            policy = ExitPolicy("speculative", thresholds=THRESHOLDS, max_draft_tokens=3, exit_ids=exit_vocab_ids(lm, n, "--draft-vocab"))
            result = generate(lm, ids, policy, GenerationSettings(max_new_tokens=12))
            assert result.token_ids == full.token_ids, (n, i)
            assert all(t.id in ids_allowed for t in result.tokens if t.draft_layer is not None)
            drafted += result.cost.drafted
            rows = sum(tc.draft_head_rows for tc in result.cost.tokens)
            assert rows > 0 if n < 32 else rows == 0  # the whole vocabulary is the full head
    assert drafted > 0


def test_shortlist_drafts_cost_fewer_flops_than_full_head_drafts(tmp_path):
    lm = agreeing_model(vocab=32)
    ids, settings = [5, 9, 11, 4], GenerationSettings(max_new_tokens=16)
    full_head = generate(lm, ids, ExitPolicy("speculative", thresholds=THRESHOLDS), settings)
    emitted = list(dict.fromkeys(full_head.token_ids))  # the answer's tokens first: same drafts
    with_ranking(lm, tmp_path, emitted + [t for t in range(32) if t not in emitted])
    policy = ExitPolicy("speculative", thresholds=THRESHOLDS, exit_ids=exit_vocab_ids(lm, len(emitted) + 1, "--draft-vocab"))
    short = generate(lm, ids, policy, settings)
    assert short.token_ids == full_head.token_ids
    assert short.cost.accepted == full_head.cost.accepted
    # the full head now runs only in verify passes; drafts pay for a few rows instead of 32
    assert short.cost.head_evals < full_head.cost.head_evals
    assert short.cost.flops < full_head.cost.flops
    size = len(policy.exit_ids)
    rows = sum(tc.draft_head_rows for tc in short.cost.tokens)
    assert rows > 0 and rows % size == 0  # one shortlist evaluation per draft check


def test_sampling_with_a_shortlist_keeps_the_full_models_distribution(tmp_path):
    """Vocabulary 8, drafts from 3 of its tokens (a shortlist that leaves out likely ones): the first
    token of 300 rounds still follows the full model's distribution (chi-square, 0.1% level)."""
    lm = agreeing_model(num_layers=2, hidden=16, vocab=8, damp=4.0, seed=5)
    ids = [3, 5, 6]
    with torch.no_grad():
        full = lm.model(torch.tensor([ids])).logits[0, -1]
    p = sampling_probs(full, 0.7, 1.0)
    ranking = p.argsort().tolist()  # least likely first: the draft misses the likely tokens
    with_ranking(lm, tmp_path, ranking)
    settings = GenerationSettings(max_new_tokens=2, temperature=0.7, seed=0)
    policy = ExitPolicy("speculative", thresholds={1: 0.0}, max_draft_tokens=1, exit_ids=exit_vocab_ids(lm, 3, "--draft-vocab"))
    decoder = decoder_for(policy)(lm, [ids], policy, settings)
    allowed = set(policy.exit_ids)
    counts, rounds = first_round_tokens(decoder, ids, 300, vocab=8)
    drafts = {token for _, j, token in rounds if j}  # accepted first drafts
    assert drafts <= allowed
    stat, df = chi_square(counts, p)
    assert stat < CHI2_999[df], stat


def test_draft_vocab_needs_speculative_and_a_ranking(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    args = ["generate", "--model", str(model), "--max-new-tokens", "3", "--thresholds", "1:0.0,2:0.0,3:0.0"]
    assert main(args + ["--exit", "dynamic", "--draft-vocab", "8", "hi"]) == 2
    assert "--draft-vocab" in capsys.readouterr().err
    assert main(args + ["--speculative", "--draft-vocab", "8", "hi"]) == 2
    assert "lite calibrate" in capsys.readouterr().err
    save_ranking(model, list(range(40)), 40, "test")
    assert main(args + ["--speculative", "--draft-vocab", "8", "--json", "hi"]) == 0
    assert json.loads(capsys.readouterr().out)["draft_vocab"] == 8


def test_calibrate_draft_vocab_ranks_the_rows_responses(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    assert main(["calibrate", "--model", str(model), "--data", str(data), "--rule", "agreement",
                 "--target", "0.5", "--filter", "status=ok", "--draft-vocab", "--min-tokens", "1",
                 "--ceiling", "0"]) == 0  # tiny data
    saved = json.loads((model / FILE).read_text())
    lm_tok = make_tiny_model(num_layers=1, hidden=16)[1]
    texts = [r["output"] for r in ROWS if r.get("status", "ok") == "ok"]
    ranking, tokens = rank_tokens(lm_tok, texts)
    assert saved["ranking"] == ranking and saved["tokens_counted"] == tokens


def test_draft_vocab_prefers_the_recorded_training_sources(tiny_model_dir, tmp_path):
    from lite import load_model
    from lite.cli.calibrate_cmd import write_draft_vocab
    from lite.model.config import LiteConfig

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"instruction": "x", "output": "zzz zz", "status": "ok"},
                                 {"instruction": "y", "output": "qqqqqqqq", "status": "bad"}]))
    cfg = LiteConfig.load(model) or LiteConfig(num_layers=4, exit_layers=[1, 2, 3, 4])
    cfg.data = {"sources": [{"path": str(train)}], "filter": {"status": "ok"}}
    cfg.save(model)
    lm = load_model(model, device="cpu")
    calibration_rows = [type("E", (), {"output": "aaaa"})()]
    write_draft_vocab(lm, calibration_rows, lambda msg: None)
    saved = json.loads((model / FILE).read_text())
    z = lm.tokenizer("z", add_special_tokens=False)["input_ids"][0]
    assert saved["ranking"][0] == z and saved["tokens_counted"] == len(lm.tokenizer("zzz zz")["input_ids"])
    (train).unlink()  # unreadable here: falls back to the calibration rows
    write_draft_vocab(lm, calibration_rows, lambda msg: None)
    a = lm.tokenizer("a", add_special_tokens=False)["input_ids"][0]
    assert json.loads((model / FILE).read_text())["ranking"][0] == a
