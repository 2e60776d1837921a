"""Exit vocabularies (``--exit-vocab N``): dynamic exits below L read the head over the N most frequent
tokens (their confidence is measured over them, a token that leaves is one of them), the final layer the
full head; calibration measures the exits the same way and records N; ``--exit auto`` picks the policy
whose calibrated decisions cost the least compute."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from tiny import CALIBRATION_ROWS as ROWS, agreeing_model, random_prompts, with_ranking

from lite import load_model
from lite.calibration.calibrate import COST_POSITION, collect, expected_compute, select
from lite.cli import main
from lite.decoding import ExitPolicy, GenerationSettings, generate, generate_batch
from lite.decoding.cost import ModelShape
from lite.decoding.draft_vocab import save_ranking
from lite.decoding.spec import exit_vocab_ids, make_policy
from lite.errors import LiteError
from lite.model.config import LiteConfig

FORCED = {1: 0.0, 2: 0.0, 3: 0.0}  # every token leaves at layer 1
NEVER = {1: 2.0, 2: 2.0, 3: 2.0}  # max_prob never reaches 2: every token runs to L


@pytest.fixture
def ranked(tmp_path):
    lm = agreeing_model()
    return with_ranking(lm, tmp_path, random.Random(5).sample(range(32), 32))


class SomeAt:
    """A gate that lets a token leave at one layer when its normed state's first entry is positive, so that
    in one step some rows leave and others reach L."""

    def __init__(self, layer):
        self.layer = layer

    def should_exit(self, layer, normed_state):
        return layer == self.layer and float(normed_state.reshape(-1)[0]) > 0

    def flops(self, layer):
        return 64


class AlwaysAt:
    """A gate that lets every token leave at one layer."""

    def __init__(self, layer):
        self.layer = layer

    def should_exit(self, layer, normed_state):
        return layer == self.layer

    def flops(self, layer):
        return 64


def by_hand_first_token(lm, ids, layer, allowed):
    """The token (and its max-prob over the shortlist) that layer ``layer`` emits after ``ids``, from one
    ordinary forward pass, restricted to ``allowed``."""
    with torch.no_grad():
        out = lm.model(torch.tensor([ids]), output_hidden_states=True)
        normed = lm.exit_normed(out.hidden_states[layer][0, -1], layer)
        logits = lm.head_logits(normed)[allowed]
    return allowed[int(logits.argmax())], float(torch.softmax(logits.float(), -1).max())


def test_a_token_leaving_early_is_the_argmax_over_the_exit_vocabulary(ranked):
    lm, n = ranked, 8
    allowed = list(exit_vocab_ids(lm, n))
    assert len(allowed) >= n and len(allowed) < lm.vocab_size
    for ids in random_prompts(5, seed=2):
        res = generate(lm, ids, ExitPolicy("dynamic", thresholds=FORCED, exit_ids=exit_vocab_ids(lm, n)),
                       GenerationSettings(max_new_tokens=8))
        assert all(t.exit_layer == 1 for t in res.tokens) and all(t.id in allowed for t in res.tokens)
        token, conf = by_hand_first_token(lm, ids, 1, allowed)
        assert res.tokens[0].id == token and res.tokens[0].confidence == pytest.approx(conf, abs=1e-5)
        # cost: the exit vocabulary's rows, never a full head
        assert all(tc.draft_head_rows == len(allowed) and tc.head_evals == 0 for tc in res.cost.tokens)
    full_head = generate(lm, [5, 9, 11], ExitPolicy("dynamic", thresholds=FORCED), GenerationSettings(max_new_tokens=8))
    assert all(tc.head_evals == 1 for tc in full_head.cost.tokens)


def test_the_final_layer_still_reads_the_full_head(ranked):
    lm = ranked
    allowed = set(exit_vocab_ids(lm, 4))
    outside = 0
    for ids in random_prompts(6, seed=4):
        full = generate(lm, ids, ExitPolicy("none"), GenerationSettings(max_new_tokens=10))
        res = generate(lm, ids, ExitPolicy("dynamic", thresholds=NEVER, exit_ids=exit_vocab_ids(lm, 4)), GenerationSettings(max_new_tokens=10))
        assert res.token_ids == full.token_ids
        outside += sum(t not in allowed for t in res.token_ids)
    assert outside > 0  # the check above would be empty if every token were in the shortlist anyway


@pytest.mark.parametrize("kv", ["copy", "recompute"])
@pytest.mark.parametrize("regroup", [None, True])
def test_batched_rows_equal_their_batch_1_runs_with_an_exit_vocabulary(ranked, kv, regroup):
    lm = ranked
    prompts = random_prompts(5, seed=7)
    rng = np.random.default_rng(0)
    thresholds = {1: 0.3, 2: 0.25, 3: 0.2}  # some tokens leave, some do not
    for policy, temperature in ((ExitPolicy("dynamic", thresholds=thresholds, exit_ids=exit_vocab_ids(lm, 6)), 0.0),
                                (ExitPolicy("gate", gate=SomeAt(2), exit_ids=exit_vocab_ids(lm, 6)), 0.0),
                                (ExitPolicy("dynamic", thresholds={1: 0.9, 2: 0.9, 3: 0.9}, confidence="state_cosine",
                                            exit_ids=exit_vocab_ids(lm, 6)), 0.0),
                                (ExitPolicy("dynamic", thresholds=thresholds, exit_ids=exit_vocab_ids(lm, 6)), 0.8)):
        settings = [GenerationSettings(max_new_tokens=int(rng.integers(3, 10)), kv=kv, temperature=temperature,
                                       top_p=0.9, seed=i) for i in range(len(prompts))]
        batched = generate_batch(lm, prompts, policy, settings, regroup=regroup)
        layers = [k for r in batched for k in r.exit_layers]
        assert min(layers) < lm.num_layers and max(layers) == lm.num_layers  # early and full tokens mixed
        allowed = set(policy.exit_ids)
        assert all(t.id in allowed for r in batched for t in r.tokens if t.exit_layer < lm.num_layers)
        for ids, s, got in zip(prompts, settings, batched):
            alone = generate(lm, ids, policy, s)
            assert got.token_ids == alone.token_ids
            assert got.exit_layers == alone.exit_layers
            assert [tc.draft_head_rows for tc in got.cost.tokens] == [tc.draft_head_rows for tc in alone.cost.tokens]
            assert [tc.head_evals for tc in got.cost.tokens] == [tc.head_evals for tc in alone.cost.tokens]


def test_a_gate_exit_emits_from_the_exit_vocabulary(ranked):
    lm = ranked
    allowed = list(exit_vocab_ids(lm, 5))
    for ids in random_prompts(4, seed=9):
        res = generate(lm, ids, ExitPolicy("gate", gate=AlwaysAt(2), exit_ids=exit_vocab_ids(lm, 5)), GenerationSettings(max_new_tokens=6))
        assert all(t.exit_layer == 2 and t.id in allowed for t in res.tokens)
        assert res.tokens[0].id == by_hand_first_token(lm, ids, 2, allowed)[0]


def test_exit_vocab_is_refused_where_it_does_not_apply(ranked, tmp_path):
    lm = ranked
    with pytest.raises(LiteError, match="--exit-vocab applies to"):
        make_policy(lm, exit="static:2", exit_vocab=8)
    with pytest.raises(LiteError, match="--exit-vocab applies to"):  # a policy built by hand is checked too
        generate(lm, [5, 9], ExitPolicy("static", layer=2, exit_ids=exit_vocab_ids(lm, 8)), GenerationSettings())
    with pytest.raises(LiteError, match="--exit-vocab must be an integer >= 0"):
        make_policy(lm, exit="dynamic", thresholds=FORCED, exit_vocab=-1)
    assert make_policy(lm, exit="dynamic", thresholds=FORCED, exit_vocab=0).exit_ids is None
    assert make_policy(lm, exit="dynamic", thresholds=FORCED, exit_vocab=8).exit_ids == exit_vocab_ids(lm, 8)
    lm.folder = str(tmp_path / "no-ranking")
    with pytest.raises(LiteError, match="--exit-vocab needs the token ranking"):
        make_policy(lm, exit="dynamic", thresholds=FORCED, exit_vocab=9)


def test_collect_measures_the_exits_over_the_exit_vocabulary(tiny_model_dir, tmp_path):
    from lite.training.data import read_examples

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    lm = load_model(model, device="cpu")
    save_ranking(model, random.Random(1).sample(range(lm.vocab_size), lm.vocab_size), lm.vocab_size, "test")
    data_file = tmp_path / "rows.json"
    data_file.write_text(json.dumps(ROWS[:3]))
    examples, _ = read_examples([str(data_file)], None)
    n = 20
    data = collect(lm, examples[:1], source="reference", exit_vocab=n)
    assert data.exit_vocab == n
    # by hand: one forward pass over the same ids, each exit restricted to the shortlist
    from lite.model.prompts import default_format
    from lite.training.data import IGNORE_INDEX, tokenize_example

    item = tokenize_example(lm.tokenizer, examples[0], default_format(lm), 256)
    ids, labels = item["input_ids"], item["labels"]
    pos = [j - 1 for j in range(1, len(ids)) if labels[j] != IGNORE_INDEX]
    allowed = torch.tensor(exit_vocab_ids(lm, n))
    with torch.no_grad():
        hs = lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        final = lm.head_logits(hs[-1][0, pos]).argmax(-1)
        for i, k in enumerate(data.layers):
            logits = lm.head_logits(lm.exit_normed(hs[k][0, pos], k))[:, allowed]
            conf = torch.softmax(logits.float(), -1).amax(-1).numpy()
            np.testing.assert_allclose(data.confidences["max_prob"][i], conf, atol=1e-5)
            assert (data.agree[i] == (allowed[logits.argmax(-1)] == final).numpy()).all()


def test_calibrate_records_the_exit_vocabulary_and_decoding_uses_it(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    assert main(["calibrate", "--model", str(model), "--data", str(data), "--rule", "agreement", "--target", "0.5",
                 "--draft-vocab", "--exit-vocab", "24", "--gate", "--min-tokens", "1", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "default policy (--exit auto)" in out and "exit vocabulary 24" in out
    cfg = LiteConfig.load(model)
    assert cfg.exit_vocab == 24 and cfg.calibration["exit_vocab"] == 24
    costs, agree = cfg.calibration["expected_compute"], cfg.calibration["expected_agreement"]
    meeting = [k for k in ("gate", "dynamic") if agree[k] >= 0.5]
    want_default = (min(meeting, key=lambda k: (costs[k], k != "gate")) if meeting else max(agree, key=agree.get))
    assert cfg.default_exit == want_default
    lm = load_model(model, device="cpu")
    want = exit_vocab_ids(lm, 24)
    assert make_policy(lm, exit="dynamic").exit_ids == want  # the calibrated thresholds
    assert make_policy(lm, exit="speculative").exit_ids == want  # drafts exit the same way
    assert make_policy(lm, exit="dynamic", thresholds=FORCED).exit_ids is None  # thresholds of your own
    assert make_policy(lm, exit="dynamic", exit_vocab=0).exit_ids is None
    # the demo's lossless row drafts as the default policy decides, over the exit vocabulary
    from lite.demo import lossless_policy

    for default in ("gate", "dynamic"):
        cfg.default_exit = default
        cfg.save(model)
        lm = load_model(model, device="cpu")
        policy, what = lossless_policy(lm)
        assert (policy.gate is not None) is (default == "gate")
        assert policy.exit_ids == want and "over 24 tokens" in what
    # re-calibrating without the flag keeps the recorded vocabulary; --exit-vocab 0 goes back to the full head
    assert main(["calibrate", "--model", str(model), "--data", str(data), "--rule", "agreement", "--target", "0.5",
                 "--min-tokens", "1", "--ceiling", "0"]) == 0
    assert LiteConfig.load(model).exit_vocab == 24
    assert main(["calibrate", "--model", str(model), "--data", str(data), "--rule", "agreement", "--target", "0.5",
                 "--exit-vocab", "0", "--min-tokens", "1", "--ceiling", "0"]) == 0
    assert LiteConfig.load(model).exit_vocab is None
    capsys.readouterr()
    assert main(["generate", "--model", str(model), "--exit", "static:2", "--exit-vocab", "8", "hi"]) == 2
    assert "--exit-vocab applies to --exit dynamic" in capsys.readouterr().err


def test_expected_compute_prices_every_token_where_it_leaves(tiny_model_dir):
    """expected_compute against a token-by-token sum: each calibration token priced at the exit its
    thresholds give it (checks at every exit up to there, K/V fills above it), over the full model's step."""
    lm = load_model(tiny_model_dir, device="cpu")
    rng = np.random.default_rng(3)
    E, N = 3, 400
    conf = rng.uniform(size=(E, N)).astype(np.float32)
    agree = rng.uniform(size=(E, N)) < conf  # confident tokens agree more often
    from lite.calibration.calibrate import CalibrationData

    data = CalibrationData(layers=[1, 2, 3], num_layers=4, confidences={"max_prob": conf}, agree=agree,
                           example_index=np.arange(N) // 10, examples=N // 10)
    for vocab in (None, 12):
        data.exit_vocab = vocab
        result = select(data, rule="agreement", target=0.8, min_tokens=1)
        shape = ModelShape.from_config(lm.config)
        block, fill, L = shape.block_flops(COST_POSITION), shape.kv_fill_flops(), 4
        check = shape.head_check_flops() if vocab is None else vocab * (2 * shape.hidden + 5)
        total = 0.0
        for t in range(N):
            leave = next((i for i in range(E) if conf[i, t] >= result.thresholds[i + 1]), None)
            if leave is None:
                total += L * block + E * check + shape.head_check_flops()  # its confidence is recorded too
            else:
                k = leave + 1
                total += k * block + (leave + 1) * check + (L - k) * fill
        want = total / N / (L * block + shape.head_flops())
        assert expected_compute(lm, result)["dynamic"] == pytest.approx(want, abs=1e-3)


def _stats(exit_rate, exit_agreement):
    from lite.calibration.thresholds import LayerStats

    e = len(exit_rate)
    return LayerStats(agreement=[0.5] * e, marginal_exit_rate=list(exit_rate), marginal_agreement=list(exit_agreement),
                      exit_rate=list(exit_rate), exit_agreement=list(exit_agreement), final_rate=1 - sum(exit_rate),
                      exited_agreement=float("nan"), exit_count=[0] * e)


@pytest.mark.parametrize("rule, parameters, dynamic, gate, costs, want", [
    # thresholds cheaper but their tokens agree at 0.6*0.8 + 0.4 = 0.88 < 0.9; the gate's at 0.3*0.9 + 0.7 = 0.97
    ("agreement", {"target": 0.9}, ([0.6], [0.8]), ([0.3], [0.9]), {"dynamic": 0.7, "gate": 0.8}, "gate"),
    # both reach the bar: the cheaper
    ("agreement", {"target": 0.85}, ([0.6], [0.8]), ([0.3], [0.9]), {"dynamic": 0.7, "gate": 0.8}, "dynamic"),
    # neither reaches it: the one that agrees most
    ("agreement", {"target": 0.99}, ([0.6], [0.8]), ([0.3], [0.9]), {"dynamic": 0.7, "gate": 0.8}, "gate"),
    ("ltt", {"epsilon": 0.15, "delta": 0.1}, ([0.6], [0.8]), ([0.3], [0.9]), {"dynamic": 0.7, "gate": 0.8}, "dynamic"),
    ("paper", {}, ([0.6], [0.8]), ([0.3], [0.9]), {"dynamic": 0.9, "gate": 0.8}, "gate"),
])
def test_the_default_policy_is_the_cheapest_that_agrees_enough(rule, parameters, dynamic, gate, costs, want):
    from types import SimpleNamespace

    from lite.calibration.calibrate import choose_default

    result = SimpleNamespace(stats=_stats(*dynamic), gate=SimpleNamespace(stats=_stats(*gate)), rule=rule,
                             parameters=parameters)
    best, agreement, _ = choose_default(result, costs)
    assert best == want
    assert agreement["dynamic"] == pytest.approx(dynamic[0][0] * dynamic[1][0] + 1 - dynamic[0][0])


def test_a_failed_calibration_leaves_the_ranking_as_it_was(tiny_model_dir, tmp_path, capsys):
    """--draft-vocab with an exit vocabulary ranks in memory and writes draft_vocab.json only once the
    statistics were chosen, so a refused calibration leaves the folder as it was."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    args = ["calibrate", "--model", str(model), "--data", str(data), "--rule", "agreement", "--target", "0.5",
            "--draft-vocab", "--exit-vocab", "24"]
    assert main(args + ["--min-tokens", "100000"]) == 2
    assert "--min-tokens" in capsys.readouterr().err
    before = LiteConfig.load(model)
    assert not (model / "draft_vocab.json").exists() and (before is None or before.exit_vocab is None)
    assert main(args + ["--min-tokens", "1", "--ceiling", "0"]) == 0
    assert (model / "draft_vocab.json").is_file() and LiteConfig.load(model).exit_vocab == 24
