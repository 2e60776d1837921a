"""Quality metrics on hand-made pairs, and the judge's verdict parsing and position-swapped scoring."""

import numpy as np
import pytest

from lite.evaluation.judge import JudgeClient, JudgeError, parse_verdict
from lite.evaluation.metrics import (
    MiniLMEmbedder,
    cosine_similarities,
    mean,
    pooled_token_agreement,
    prefix_agreement,
    rouge_l,
    token_agreement,
)


class BagOfLetters:
    """A tiny fake embedder: letter counts (identical texts get identical vectors)."""

    def encode(self, texts):
        out = np.zeros((len(texts), 26))
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        return out


def test_rouge_l_on_hand_made_pairs():
    assert rouge_l("The cat sat on the mat.", "The cat sat on the mat.") == 1.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("alpha beta", "gamma delta") == 0.0
    # LCS "the cat the mat" = 4 of 6 tokens each side: F = 4/6
    assert rouge_l("the cat sat on the mat", "the cat lay by the mat") == pytest.approx(4 / 6)
    # Unicode words count (rouge-score's default tokenizer would drop them)
    assert rouge_l("你好 世界", "你好 朋友") == pytest.approx(0.5)
    assert rouge_l("Cats running", "cat runs") == 1.0  # stemming, case


def test_token_and_prefix_agreement():
    assert token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_agreement([1, 2, 3, 4], [1, 9, 3]) == pytest.approx(2 / 4)
    assert prefix_agreement([1, 2, 3, 4], [1, 9, 3]) == pytest.approx(1 / 4)
    assert token_agreement([], []) == prefix_agreement([], []) == 1.0
    assert token_agreement([5], []) == 0.0 == token_agreement([], [5])  # the answer tokens: either answer's


def test_pooled_token_agreement_sums_positions_over_answer_pairs():
    pairs = [([1, 2, 3, 4], [1, 9, 3]), ([7], [7]), ([], [])]  # 2 of 4, 1 of 1, nothing
    assert pooled_token_agreement(pairs) == pytest.approx(3 / 5)
    assert pooled_token_agreement([([], [])]) == pooled_token_agreement([]) == 1.0
    assert pooled_token_agreement(iter([([1], [2])])) == 0.0


def test_cosine_similarity_with_a_fake_embedder():
    sims = cosine_similarities(BagOfLetters(), ["abc", "abc", "aaa", ""], ["abc", "cba", "bbb", "x"])
    assert sims[0] == 1.0 and sims[1] == pytest.approx(1.0)  # same letters
    assert sims[2] == pytest.approx(0.0)
    assert sims[3] == pytest.approx(0.0)  # a zero vector does not divide by zero
    with pytest.raises(ValueError):
        cosine_similarities(BagOfLetters(), ["a"], [])


def test_mean_skips_none():
    assert mean([1.0, None, 3.0]) == 2.0 and mean([None]) is None


@pytest.mark.slow
def test_real_offline_minilm_gives_one_for_identical_texts(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = MiniLMEmbedder()
    vectors = emb.encode(["The early exit answer.", "The early exit answer.", "Quantum chromodynamics."])
    assert vectors.shape == (3, 384)
    a, b, c = (v / np.linalg.norm(v) for v in vectors)
    assert float(a @ b) == pytest.approx(1.0, abs=1e-5)
    assert float(a @ c) < 0.5
    sims = cosine_similarities(emb, ["How do I improve my time management?"],
                               ["Tips to manage my time better"])
    assert 0.5 < sims[0] < 1.0


def test_parse_verdict():
    assert parse_verdict("Answer A is more detailed.\nVerdict: A") == "A"
    assert parse_verdict("verdict - b") == "B"
    assert parse_verdict("**Verdict:** tie") == "tie"
    assert parse_verdict("B") == "B"
    assert parse_verdict("I cannot decide") == "invalid"
    assert parse_verdict("Verdict: A ... on reflection Verdict: B") == "B"


@pytest.mark.parametrize("replies, score, consistent", [
    (["Verdict: B", "Verdict: A"], 1.0, True),  # early exit wins in both orders
    (["Verdict: A", "Verdict: A"], 0.5, False),  # the judge always picks slot A: order bias cancels
    (["Verdict: tie", "Verdict: tie"], 0.5, True),
    (["Verdict: A", "nonsense"], 0.0, False),  # only the valid order counts
    (["?", "??"], None, False),
])
def test_position_swapped_scoring(monkeypatch, replies, score, consistent):
    client = JudgeClient("http://127.0.0.1:9/v1", "judge")
    prompts = []

    def fake_chat(user, system=None, max_tokens=None, timeout=None):
        prompts.append(user)
        return replies[len(prompts) - 1]

    monkeypatch.setattr(client, "chat", fake_chat)
    verdict = client.judge("Say hi", full="FULL ANSWER", early="EARLY ANSWER")
    assert verdict.score == score and verdict.consistent is consistent
    # first order shows the full answer as A, the second the early-exit answer as A
    assert prompts[0].index("FULL ANSWER") < prompts[0].index("EARLY ANSWER")
    assert prompts[1].index("EARLY ANSWER") < prompts[1].index("FULL ANSWER")


def test_judge_url_must_be_http():
    with pytest.raises(JudgeError, match="--judge-url"):
        JudgeClient("127.0.0.1:8000", "m")
