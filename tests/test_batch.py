"""Batched early exit: every row of a batch decodes exactly as it does alone (tiny model, both K/V
strategies, forced exits, rows of different lengths and budgets, sampling with seeds)."""

import pytest
import torch

from lite import load_model
from lite.decoding import (
    Decoder,
    ExitPolicy,
    GenerationSettings,
    generate,
    generate_batch,
)
from lite.errors import LiteError

from tiny import decode_joining

PROMPTS = [[5, 17, 42, 99, 3], [7, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19], [21, 22, 23]]


# (kv, regroup): both K/V strategies, and under copy both ways a row that left goes on (regroup / ride along)
MODES = [("copy", True), ("copy", False), ("recompute", None)]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu")


def _rode(results) -> int:
    return sum(tc.rode for r in results for tc in r.cost.tokens)


def _alone(lm, policy, settings):
    return [generate(lm, p, policy, s) for p, s in zip(PROMPTS, settings)]


def _same(batched, alone):
    """Each row is its batch-1 run: tokens, exit layers, text, confidences, and cost records field by field,
    FLOPs included, except that a block ridden along (``rode``) stands where batch 1 filled K/V."""
    for b, a in zip(batched, alone):
        assert b.token_ids == a.token_ids
        assert [t.exit_layer for t in b.tokens] == [t.exit_layer for t in a.tokens]
        assert b.text == a.text and b.finish_reason == a.finish_reason
        for tb, ta in zip(b.cost.tokens, a.cost.tokens):  # cost records, field by field
            assert ta.rode == 0 and tb.rode + tb.kv_fills == ta.kv_fills
            same = lambda tc: {k: v for k, v in vars(tc).items() if k not in ("rode", "kv_fills")}
            assert same(tb) == same(ta)
        for cb, ca in zip(b.tokens, a.tokens):
            assert (cb.confidence is None) == (ca.confidence is None)
            if cb.confidence is not None:
                assert cb.confidence == pytest.approx(ca.confidence, abs=1e-5)


@pytest.mark.parametrize("kv", ["copy", "recompute"])
def test_exits_off_every_row_equals_its_batch_1_run(lm, kv):
    settings = [GenerationSettings(max_new_tokens=n, kv=kv) for n in (6, 9, 4, 7)]
    _same(generate_batch(lm, PROMPTS, ExitPolicy(kind="none"), settings), _alone(lm, ExitPolicy(kind="none"), settings))


def _thresholds(lm):
    """Thresholds near the median max-prob of each exit over the full model's own answers (layer 1 never):
    some tokens leave at 2, some at 3, the rest go on, so rows of one batch leave at different layers."""
    from lite.decoding.confidence import max_prob

    values = {k: [] for k in (2, 3)}
    for p in PROMPTS:
        answer = generate(lm, p, ExitPolicy(), GenerationSettings(max_new_tokens=10)).token_ids
        with torch.no_grad():
            states = lm.hidden_states(torch.tensor([p + answer]), layers=[2, 3])
        for k in values:
            values[k] += max_prob(lm.lm_head(states[k][0, len(p) - 1:])).tolist()
    return {1: 2.0, **{k: _split(v) for k, v in values.items()}}


def _split(values: list[float]) -> float:
    """A threshold inside the middle half of ``values``, at the midpoint of their widest gap there: no
    token sits at it, so float rounding of batched against single-row products cannot flip a decision."""
    v = sorted(values)
    lo, hi = len(v) // 4, (3 * len(v)) // 4
    i = max(range(lo, hi), key=lambda j: v[j + 1] - v[j])
    assert v[i + 1] - v[i] > 1e-4, "no clear gap in the middle: the test needs other prompts"
    return (v[i] + v[i + 1]) / 2


@pytest.mark.parametrize("kv,regroup", MODES)
@pytest.mark.parametrize("measure", ["max_prob", "state_cosine"])
def test_forced_exits_each_row_leaves_where_it_leaves_alone(lm, kv, regroup, measure):
    if measure == "max_prob":
        policy = ExitPolicy(kind="dynamic", thresholds=_thresholds(lm))
    else:
        policy = ExitPolicy(kind="dynamic", thresholds={1: 0.86, 2: 0.95, 3: 0.95}, confidence="state_cosine")
    settings = [GenerationSettings(max_new_tokens=10, kv=kv)] * len(PROMPTS)
    batched = generate_batch(lm, PROMPTS, policy, settings, regroup=regroup)
    _same(batched, _alone(lm, policy, settings))
    layers = {t.exit_layer for r in batched for t in r.tokens}
    assert len(layers) > 1  # the rows really did leave at different layers
    assert (_rode(batched) > 0) == (regroup is False)  # rows rode along exactly when asked to


def test_rows_ride_along_in_small_copy_batches_and_regroup_otherwise(lm, monkeypatch):
    import lite.decoding.engine as batch_mod

    limit = batch_mod.RIDE_ALONG_ROWS
    assert batch_mod.rides_along("copy", limit) and not batch_mod.rides_along("copy", limit + 1)
    assert batch_mod.rides_along("copy", limit + 1, regroup=False) and not batch_mod.rides_along("copy", 2, True)
    assert not batch_mod.rides_along("recompute", 2)
    with pytest.raises(LiteError, match="ride along with --kv copy only"):
        Decoder(lm, PROMPTS, ExitPolicy(), GenerationSettings(kv="recompute"), regroup=False)
    policy = ExitPolicy(kind="dynamic", thresholds=_thresholds(lm))
    settings = GenerationSettings(max_new_tokens=10)
    assert _rode(generate_batch(lm, PROMPTS, policy, settings)) > 0  # the default rides at batch 4
    monkeypatch.setattr(batch_mod, "RIDE_ALONG_ROWS", 3)
    assert _rode(generate_batch(lm, PROMPTS, policy, settings)) == 0  # and regroups above the limit


def test_static_and_gate_policies_batch_too(lm):
    settings = [GenerationSettings(max_new_tokens=6)] * len(PROMPTS)
    static = ExitPolicy(kind="static", layer=2)
    _same(generate_batch(lm, PROMPTS, static, settings), _alone(lm, static, settings))

    class ParityGate:  # leaves at layer 2 when the first feature is positive: differs per row and token
        def should_exit(self, layer, normed_state):
            return layer == 2 and bool(normed_state[0] > 0)

        def flops(self, layer):
            return 10

    gate = ExitPolicy(kind="gate", gate=ParityGate())
    batched = generate_batch(lm, PROMPTS, gate, settings)
    _same(batched, _alone(lm, gate, settings))
    assert {t.exit_layer for r in batched for t in r.tokens} == {2, 4}


@pytest.mark.parametrize("kv,regroup", MODES)
def test_the_cache_of_every_row_after_every_step_is_the_batch_1_cache(lm, kv, regroup):
    policy = ExitPolicy(kind="dynamic", thresholds=_thresholds(lm))
    settings = GenerationSettings(max_new_tokens=6, kv=kv)
    alone = []
    for p in PROMPTS:
        snaps = []
        d = Decoder(lm, [p], policy, settings)
        d.after_step = lambda dec: snaps.append(
            [(dec.cache.keys[b][0, :, :n[0]].clone(), dec.cache.values[b][0, :, :n[0]].clone())
             for b, n in enumerate(dec.cache.lengths)])
        for _ in d.run():
            pass
        alone.append(snaps)
    batch_snaps = []
    decoder = Decoder(lm, PROMPTS, policy, settings, regroup)
    decoder.after_step = lambda dec: batch_snaps.append(
        [[tuple(t.clone() for t in dec.cache.row(r, b)) for b in range(lm.num_layers)] for r in range(len(PROMPTS))])
    for _ in decoder.run():
        pass
    for step, snap in enumerate(batch_snaps):
        for r in range(len(PROMPTS)):
            if step >= len(alone[r]):
                continue  # the row had finished
            for b in range(lm.num_layers):
                (kb, vb), (ka, va) = snap[r][b], alone[r][step][b]
                assert kb.shape == ka.shape, (step, r, b)
                torch.testing.assert_close(kb, ka, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(vb, va, rtol=1e-4, atol=1e-5)


def test_rows_finish_at_different_steps_and_stop_strings_hold(lm):
    settings = [GenerationSettings(max_new_tokens=n) for n in (1, 12, 3, 8)]
    first = generate(lm, PROMPTS[3], ExitPolicy(), GenerationSettings(max_new_tokens=8))
    assert first.finish_reason == "length" and len(first.text) >= 4
    stop = first.text[2:4]  # a stop string that the row's own 8-token answer contains
    settings[3] = GenerationSettings(max_new_tokens=8, stop=[stop])
    batched = generate_batch(lm, PROMPTS, ExitPolicy(), settings)
    alone = _alone(lm, ExitPolicy(), settings)
    _same(batched, alone)
    # rows 0-2 run to their own budgets, so they leave the batch at steps 1, 3 and 12
    assert [(len(r.tokens), r.finish_reason) for r in batched[:3]] == [(1, "length"), (12, "length"),
                                                                       (3, "length")]
    # row 3 stops at the stop string, before its budget, and its text ends just before it
    assert batched[3].finish_reason == "stop" and len(batched[3].tokens) < 8
    assert batched[3].text == first.text[:first.text.index(stop)]


def test_sampling_with_a_seed_is_reproducible_per_row(lm):
    settings = [GenerationSettings(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=s) for s in (1, 2, 3, 4)]
    batched = generate_batch(lm, PROMPTS, ExitPolicy(), settings)
    assert [r.token_ids for r in batched] == [r.token_ids for r in _alone(lm, ExitPolicy(), settings)]
    again = generate_batch(lm, PROMPTS, ExitPolicy(), settings)
    assert [r.token_ids for r in again] == [r.token_ids for r in batched]


def test_batch_refuses_what_it_cannot_do(lm):
    with pytest.raises(LiteError, match="one sequence at a time"):
        Decoder(lm, PROMPTS, ExitPolicy(kind="speculative", thresholds={1: 0.5, 2: 0.5, 3: 0.5}),
                     GenerationSettings())
    with pytest.raises(LiteError, match="--kv must be the same"):
        Decoder(lm, PROMPTS[:2], ExitPolicy(), [GenerationSettings(kv="copy"), GenerationSettings(kv="recompute")])
    with pytest.raises(LiteError, match="one per prompt"):
        Decoder(lm, PROMPTS, ExitPolicy(), [GenerationSettings()] * 2)
    with pytest.raises(LiteError, match="prompt is empty"):
        Decoder(lm, [[1, 2], []], ExitPolicy(), GenerationSettings())


@pytest.mark.parametrize("kv,regroup", MODES)
def test_rows_that_join_a_running_batch_get_their_batch_1_answers(lm, kv, regroup):
    """Continuous batching: rows join at token boundaries (the cache grows for them), one is cancelled
    mid-way and its slot reused; every finished row equals its batch-1 run, exits included."""
    policy = ExitPolicy(kind="dynamic", thresholds=_thresholds(lm))
    settings = [GenerationSettings(max_new_tokens=n, kv=kv) for n in (6, 9, 4, 7)]
    alone = _alone(lm, policy, settings)
    d = Decoder.open(lm, policy, kv=kv, regroup=regroup)
    got = decode_joining(d, PROMPTS, settings, GenerationSettings(max_new_tokens=20, kv=kv))  # cancelled after one
    _same([got[i] for i in range(4)], alone)
    assert d.cache.batch == 4 and d.rows_in_use == 0
    with pytest.raises(LiteError, match="--kv"):
        d.add(PROMPTS[0], GenerationSettings(kv="recompute" if kv == "copy" else "copy"))


def test_a_learned_gate_decides_for_all_rows_at_once_as_it_does_row_by_row(lm):
    """The batch engine asks a LearnedExitGate once per exit for every row (should_exit_rows); each row's
    exits, tokens and cost are still those of its batch-1 run."""
    from lite.decoding.gate import LearnedExitGate

    g = torch.Generator().manual_seed(3)
    params = {k: [(torch.randn(1, lm.hidden_size, generator=g), torch.zeros(1))] for k in (2, 3)}
    gate = ExitPolicy(kind="gate", gate=LearnedExitGate(params, {2: 0.5, 3: 0.5}))
    settings = [GenerationSettings(max_new_tokens=n) for n in (6, 9, 4, 7)]
    for regroup in (True, False):
        batched = generate_batch(lm, PROMPTS, gate, settings, regroup=regroup)
        _same(batched, _alone(lm, gate, settings))
    assert len({t.exit_layer for r in batched for t in r.tokens}) > 1
