"""The full model's judgement of an answer in `lite eval`: mean per-token log-likelihood under the full model,
checked against a hand computation, exact for identical answers, None (counted) for empty ones."""

import json
import math

import pytest
import torch
from tiny import VICUNA, FakeEmbedder

from lite import load_model
from lite.errors import LiteError
from lite.evaluation import RECORDS, evaluate
from lite.evaluation import report as report_mod
from lite.evaluation.loglik import answer_logliks
from lite.model.prompts import encode_prompt

COMMON = dict(max_new_tokens=5, thresholds="0.1", kv="copy", dtype="float32", embedder=FakeEmbedder())


@pytest.fixture(scope="module")
def vicuna(tmp_path_factory):
    path = tmp_path_factory.mktemp("sets") / "vicuna.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in VICUNA))
    return [f"vicuna={path}"]


def by_hand(lm, prompt: list[int], answer: list[int]) -> float:
    """One unbatched forward of transformers' own causal LM (float32 logits), logsumexp at each answer
    position: the definition, written out independently of lite.evaluation.loglik."""
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([prompt + answer])).logits[0].double()  # (T, V)
    total = 0.0
    for j, token in enumerate(answer):
        row = logits[len(prompt) - 1 + j]
        total += float(row[token] - torch.logsumexp(row, -1))
    return total / len(answer)


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / RECORDS).read_text().splitlines()]


def test_eval_reports_the_hand_computed_loglik(tiny_model_dir, vicuna, tmp_path):
    # static exit at layer 1 of a random model gives answers other than the full model's
    result = evaluate(str(tiny_model_dir), vicuna, out=tmp_path / "eval", exit="static:1", batch_size=2,
                      static_layers=True, **COMMON)
    lm = load_model(tiny_model_dir, device="cpu", dtype="float32")
    report, rows = result.report, records(tmp_path / "eval")
    assert report["loglik_scoring"]["main"]["dtype"] == "forward float32, log-softmax float32"
    differ = 0
    for row, rec in zip(report["prompts"], rows):
        fmt = report["model"]["prompt_format"]
        prompt = encode_prompt(lm.tokenizer, rec["instruction"], rec["input"], fmt)
        full = by_hand(lm, prompt, rec["full"]["token_ids"])
        early = by_hand(lm, prompt, rec["runs"]["static:1/copy"]["token_ids"])
        assert row["loglik_full"] == pytest.approx(full, abs=1e-5)
        assert row["loglik_early_exit"] == pytest.approx(early, abs=1e-5)
        assert row["loglik_gap"] == pytest.approx(early - full, abs=1e-5)
        differ += rec["runs"]["static:1/copy"]["token_ids"] != rec["full"]["token_ids"]
    assert differ >= 1  # the check above compared two different answers at least once
    overall = report["overall"]
    assert overall["loglik_n"] == len(rows) and overall["loglik_empty_early_exit"] == 0
    for key in ("loglik_full", "loglik_gap"):
        assert overall[key] == pytest.approx(sum(p[key] for p in report["prompts"]) / len(rows))
    # the static layers are judged too, each against the full answer
    assert set(overall["static_layers"]) == {"1", "2", "3"}
    assert overall["static_layers"]["1"]["loglik_gap"] == pytest.approx(overall["loglik_gap"])
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "## The full model's judgement of the answers" in md
    assert f"| vicuna | 3 | {overall['loglik_full']:.3f} | {overall['loglik_early_exit']:.3f} |" in md
    assert f"| {overall['loglik_gap']:.3f} | {math.exp(overall['loglik_gap']):.3f} |" in md  # exp(gap) beside it
    # not part of the records: a run started before this figure existed resumes as it was
    assert all("loglik" not in rec["full"] for rec in rows)


def test_an_answer_equal_to_the_full_one_gets_exactly_its_value(tiny_model_dir, vicuna, tmp_path):
    # a threshold no confidence reaches: every token goes to layer L, so the answers equal the full ones
    result = evaluate(str(tiny_model_dir), vicuna, out=tmp_path / "eval", batch_size=3,
                      **{**COMMON, "thresholds": "1.0"})
    rows = records(tmp_path / "eval")
    assert all(r["runs"]["dynamic@1/copy"]["token_ids"] == r["full"]["token_ids"] for r in rows)
    for row in result.report["prompts"]:
        assert row["loglik_early_exit"] == row["loglik_full"] and row["loglik_gap"] == 0.0
    assert result.report["overall"]["loglik_gap"] == 0.0
    # scored once per distinct answer: 3 prompts, 2 answers each, 3 forwards' worth of answers
    assert result.report["loglik_scoring"]["main"]["answers"] == 6
    assert result.report["loglik_scoring"]["main"]["scored"] == 3


def test_identical_pairs_in_different_batches_score_the_same(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu", dtype="float32")
    prompt = encode_prompt(lm.tokenizer, "Say hello.", "", "alpaca")
    short, long_ = [5, 6], [7, 8, 9, 10, 11, 12, 13, 14]
    pairs = [(prompt, short), (prompt + [3] * 9, long_), (prompt, short)]
    scores = answer_logliks(lm, pairs, batch_size=1)
    assert scores.values[0] == scores.values[2] and scores.scored == 2 and scores.tokens == 10
    assert scores.values[0] == pytest.approx(by_hand(lm, prompt, short), abs=1e-5)
    assert scores.values[1] == pytest.approx(by_hand(lm, prompt + [3] * 9, long_), abs=1e-5)
    # batched with padding: the same values up to float rounding
    assert answer_logliks(lm, pairs, batch_size=3).values == pytest.approx(scores.values, abs=1e-5)


def test_empty_answers_are_none_and_counted(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu", dtype="float32")
    prompt = encode_prompt(lm.tokenizer, "Say hello.", "", "alpaca")
    scores = answer_logliks(lm, [(prompt, []), (prompt, [5, 6, 7])])
    assert scores.values[0] is None and scores.values[1] < 0 and scores.scored == 1

    # in the report: the empty answer has no value (not NaN), is counted, and leaves the other prompts' means
    def record(i, full, early):
        run = {"text": "x", "token_ids": [1] * (early is not None), "exit_layers": [1] * (early is not None),
               "flops": 1, "full_flops_same_length": 1, "head_evals": 1, "seconds": 1.0, "loglik": early}
        return {"role": "main", "testset": "t", "id": str(i), "prompt_tokens": 3, "reference": None,
                "full": {"text": "y", "token_ids": [2], "exit_layers": [4], "flops": 2, "seconds": 1.0,
                         "loglik": full}, "runs": {"r/copy": run}, "static": {}}

    recs = [record(0, -1.0, None), record(1, -2.0, -3.0), record(2, -1.5, -1.0)]
    sims = report_mod._Sims(FakeEmbedder(), report_mod._needed_pairs(recs))
    s = report_mod.summarize(recs, lambda r: r["runs"]["r/copy"], 4, sims)
    assert s["loglik_empty_early_exit"] == 1 and s["loglik_empty_full"] == 0 and s["loglik_n"] == 2
    assert s["loglik_early_exit"] == pytest.approx(-2.0) and s["loglik_full"] == pytest.approx(-1.5)
    assert s["loglik_gap"] == pytest.approx(((-3.0 + 2.0) + (-1.0 + 1.5)) / 2)
    rows = report_mod._per_prompt(recs, "r/copy", 4, sims)
    assert rows[0]["loglik_early_exit"] is None and rows[0]["loglik_gap"] is None
    json.dumps(rows, allow_nan=False)  # None, never NaN


def test_no_loglik_and_bad_input(tiny_model_dir, vicuna, tmp_path, monkeypatch):
    import lite.evaluation.loglik as loglik_mod

    calls = []
    monkeypatch.setattr(loglik_mod, "answer_logliks", lambda *a, **k: calls.append(a))
    result = evaluate(str(tiny_model_dir), vicuna, out=tmp_path / "eval", limit=1, loglik=False, **COMMON)
    assert calls == [] and "loglik_scoring" not in result.report
    assert not [k for k in result.report["overall"] if k.startswith("loglik")]
    assert "## The full model's judgement" not in (tmp_path / "eval" / "report.md").read_text()

    lm = load_model(tiny_model_dir, device="cpu", dtype="float32")
    with pytest.raises(LiteError, match="empty prompt"):
        answer_logliks(lm, [([], [5])])
    with pytest.raises(LiteError, match=r"context 512: score a shorter answer \(lower --max-new-tokens\)"):
        answer_logliks(lm, [([1], [5] * lm.max_context)])
