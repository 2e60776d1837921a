"""Self-speculative decoding: lossless against exits off, exact caches, the full model's sampling
distribution, honest cost counts."""

import json

import pytest
import torch
from tiny import (
    CHI2_999,
    THRESHOLDS,
    agreeing_model,
    chi_square,
    first_round_tokens,
    full_cache,
    random_prompts,
)

from lite import load_model
from lite.cli import main
from lite.decoding import ExitPolicy, GenerationSettings, decoder_for, generate, parse_exit, stream
from lite.decoding.sampling import pick_token
from lite.decoding.speculative import SpeculativeDecoder, accept_greedy, accept_sampled, sampling_probs
from lite.errors import LiteError
from lite.model.prompts import encode_prompt

@pytest.fixture(scope="module")
def lm():
    return agreeing_model()


# ----------------------------------------------------------------------------- lossless greedy
def test_greedy_is_token_for_token_the_full_model(lm):
    drafted = accepted = 0
    stops = set()
    for i, ids in enumerate(random_prompts(8)):
        full = generate(lm, ids, ExitPolicy("none"), GenerationSettings(max_new_tokens=14))
        for n_draft, stop in ((1, 0.0), (3, 0.0), (6, 0.09)):
            policy = ExitPolicy("speculative", thresholds=THRESHOLDS, max_draft_tokens=n_draft,
                                draft_stop_confidence=stop)
            result = generate(lm, ids, policy, GenerationSettings(max_new_tokens=14))
            assert result.token_ids == full.token_ids, (i, n_draft)
            assert result.finish_reason == full.finish_reason and result.text == full.text
            assert all(t.exit_layer == 4 for t in result.tokens)
            c = result.cost
            assert c.accepted + c.rejected == c.drafted
            assert max((tc.drafted for tc in c.tokens), default=0) <= n_draft
            drafted, accepted = drafted + c.drafted, accepted + c.accepted
            stops.update(t.draft_layer for t in result.tokens)
    assert 0 < accepted < drafted  # both the accept and the reject path ran
    assert stops == {None, 1, 2, 3}  # drafts left at every exit layer, and the full model corrected some


def test_verify_pass_runs_every_block_once_per_position_and_the_head_once(lm):
    ids = random_prompts(1, seed=3)[0] + [7, 9]
    policy = ExitPolicy("speculative", thresholds=THRESHOLDS, max_draft_tokens=4)
    decoder = decoder_for(policy)(lm, [ids], policy, GenerationSettings(max_new_tokens=16))
    assert isinstance(decoder, SpeculativeDecoder)
    writes, heads, per_round = [], [], []
    view = decoder.cache.view

    def logged(block, rows, new):  # every K/V write of a block call goes through its view's update
        v = view(block, rows, new)
        update = v.update

        def update_logged(key, value, layer_idx, *a, **kw):
            start = v.starts[0]
            writes.extend((layer_idx, p) for p in range(start, start + key.shape[2]))
            return update(key, value, layer_idx, *a, **kw)

        v.update = update_logged
        return v

    def round_done(d):
        per_round.append((list(writes), sum(heads)))
        writes.clear()
        heads.clear()

    decoder.cache.view = logged
    decoder.after_step = round_done
    head_logits = lm.head_logits  # every full-head evaluation of this policy goes through it

    def counted(normed):
        out = head_logits(normed)
        heads.append(out.reshape(-1, out.shape[-1]).shape[0])
        return out

    lm.head_logits = counted
    try:
        list(decoder.run())
    finally:
        del lm.head_logits
    rounds = decoder.rounds
    assert len(per_round) == len(rounds) and any(d > 0 for d, _ in rounds)
    # the first token is the full model's, from the prefill of every prompt position: one head, no block
    (prefill, first_heads), (d0, j0) = per_round[0], rounds[0]
    assert sorted(prefill) == [(b, p) for b in range(4) for p in range(len(ids))] and first_heads == 1
    assert (d0, j0) == (0, 0)
    costs = iter(decoder.rows[0].costs)
    first = next(costs)
    assert (first.blocks_run, first.head_evals, first.drafted) == (0, 1, 0)
    for (written, head_positions), (d, j) in zip(per_round[1:], rounds[1:]):
        positions = sorted({p for _, p in written})
        assert len(positions) == d + 1  # the drafted positions and the verify step's own
        for layer in range(4):  # every block ran every position of the round exactly once
            assert sorted(p for b, p in written if b == layer) == positions
        tcs = [next(costs) for _ in range(j + 1)]
        assert sum(tc.head_evals for tc in tcs) == head_positions  # checks + d + 1 verified positions
        blocks = sum(tc.blocks_run + tc.recomputed + tc.other_blocks for tc in tcs)
        assert blocks == len(written)  # cost counts every (block, position) pair the round ran


def test_cache_after_every_round_is_the_full_models(lm):
    checked = []

    def compare(d):
        row = d.rows[0]
        processed = row.prompt + [r.id for r in row.records[:-1]]  # the last token is not consumed yet
        assert d.cache.lengths == [[len(processed)]] * 4
        ref = full_cache(d.lm, processed)
        for i in range(4):
            torch.testing.assert_close(d.cache.keys[i][:, :, :len(processed)], ref.keys[i], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(d.cache.values[i][:, :, :len(processed)], ref.values[i], rtol=1e-4, atol=1e-5)
        checked.append(d.rounds[-1])

    for ids in random_prompts(4, seed=5):
        policy = ExitPolicy("speculative", thresholds=THRESHOLDS, max_draft_tokens=3)
        decoder = decoder_for(policy)(lm, [ids], policy, GenerationSettings(max_new_tokens=12))
        decoder.after_step = compare
        list(decoder.run())
    assert any(j < d for d, j in checked) and any(0 < j == d for d, j in checked)  # rollbacks and full accepts


# ----------------------------------------------------------------------------- sampling
def test_rejection_rule_emits_the_full_models_distribution():
    """Synthetic p and q far apart on 8 tokens, drafts sampled from q: the first emitted token follows p
    (chi-square at the 0.1% level, 4000 samples) and visibly not q; after accepting every draft the
    extra token follows the last row of p."""
    g = torch.Generator().manual_seed(0)
    V, d, n = 8, 2, 4000
    q = torch.softmax(torch.randn(d, V, generator=g) * 2, -1)
    p = torch.softmax(torch.randn(d + 1, V, generator=g) * 2, -1)
    drafts = torch.multinomial(q[0], n, replacement=True, generator=g)
    second = torch.multinomial(q[1], n, replacement=True, generator=g)
    first_counts, extra_counts = torch.zeros(V), torch.zeros(V)
    outcomes = set()
    for k in range(n):
        ids = [int(drafts[k]), int(second[k])]
        j, z = accept_sampled(ids, q, p, g)
        outcomes.add(j)
        first_counts[ids[0] if j > 0 else z] += 1
        if j == d:
            extra_counts[z] += 1
    assert outcomes == {0, 1, 2}
    stat, df = chi_square(first_counts, p[0])
    assert stat < CHI2_999[df], stat
    assert chi_square(first_counts, q[0])[0] > 10 * CHI2_999[df]  # the test has the power to tell
    stat, df = chi_square(extra_counts, p[2])
    assert extra_counts.sum() > 300 and stat < CHI2_999[df], stat


def test_sampling_probs_is_the_distribution_pick_token_samples_from():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, generator=g) * 2
    for temperature, top_p in ((0.7, 0.8), (1.5, 0.5)):
        probs = sampling_probs(logits, temperature, top_p)
        counts = torch.zeros(6)
        for _ in range(1500):
            counts[int(pick_token(logits, temperature, top_p, g))] += 1
        stat, df = chi_square(counts, probs)
        assert torch.all((counts > 0) == (probs > 0)) and stat < CHI2_999[df], (temperature, top_p)


def test_greedy_rule_accepts_the_agreeing_prefix():
    logits = torch.full((4, 5), -1.0)
    logits[[0, 1, 2, 3], [2, 4, 1, 3]] = 5.0  # argmaxes 2, 4, 1, 3
    assert accept_greedy([2, 4, 0], logits) == (2, 1)
    assert accept_greedy([2, 4, 1], logits) == (3, 3)
    assert accept_greedy([0], logits[:2]) == (0, 2)
    assert accept_greedy([], logits[:1]) == (0, 2)


def test_sampled_decoding_end_to_end_follows_the_full_model():
    """Vocabulary 8, every step drafts at layer 1 of a 2-layer model whose layer 1 disagrees with layer 2,
    temperature 0.3 and top-p 0.95: the first token of 200 rounds follows the full model's distribution
    (chi-square, 0.1% level) and not the draft's."""
    lm = agreeing_model(num_layers=2, hidden=16, vocab=8, damp=4.0, seed=5)
    ids = [3, 5, 6]
    settings = GenerationSettings(max_new_tokens=2, temperature=0.3, top_p=0.95, seed=0)
    policy = ExitPolicy("speculative", thresholds={1: 0.0}, max_draft_tokens=1)
    decoder = decoder_for(policy)(lm, [ids], policy, settings)
    with torch.no_grad():
        full = lm.model(torch.tensor([ids])).logits[0, -1]
        draft = lm.lm_head(lm.hidden_states(torch.tensor([ids]), layers=[1])[1][0, -1])
    p, q = sampling_probs(full, 0.3, 0.95), sampling_probs(draft, 0.3, 0.95)
    assert 0.5 * (p - q).abs().sum() > 0.3  # the draft alone would fail the test below
    counts, rounds = first_round_tokens(decoder, ids, 200, vocab=8)
    assert {d for d, _, _ in rounds} == {1} and {j for _, j, _ in rounds} == {0, 1}
    stat, df = chi_square(counts, p)
    assert stat < CHI2_999[df], stat
    assert chi_square(counts, q)[0] > CHI2_999[df]


def test_sampling_with_a_seed_is_reproducible(lm):
    """A seed fixes the sampled tokens whatever the global random state and whatever ran before: drafts and
    verification draw from the request's own generator, and the global one is left as it was."""
    policy = ExitPolicy("speculative", thresholds=THRESHOLDS)
    run = lambda seed: generate(lm, [4, 5, 6], policy, GenerationSettings(max_new_tokens=12, temperature=0.8,
                                                                             top_p=0.9, seed=seed)).token_ids
    torch.manual_seed(0)
    first = run(1)
    state = torch.get_rng_state()
    run(2)  # another seeded request in between
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(12345)
    assert run(1) == first


# ----------------------------------------------------------------------------- cost, stopping, streaming
def test_cost_fields_are_consistent(lm):
    result = generate(lm, [5, 9, 11, 4], ExitPolicy("speculative", thresholds=THRESHOLDS, max_draft_tokens=3),
                      GenerationSettings(max_new_tokens=16))
    c = result.cost
    assert c.drafted > 0 and c.accepted + c.rejected == c.drafted
    assert c.acceptance_rate == pytest.approx(c.accepted / c.drafted)
    rounds = [(tc.drafted, tc.accepted) for tc in c.tokens if tc.drafted]
    assert len(c.acceptance_by_position) == max(d for d, _ in rounds)
    first = sum(1 for _, a in rounds if a > 0) / len(rounds)
    assert c.acceptance_by_position[0] == pytest.approx(first)
    assert result.layer_cost_improvement == 0.0  # every emitted token went through all L layers
    assert sum(1 for t in result.tokens if t.draft_layer is not None) == c.accepted
    none = generate(lm, [5, 9, 11, 4], ExitPolicy("none"), GenerationSettings(max_new_tokens=16))
    assert c.flops > none.cost.flops  # verification saves no FLOPs: it batches them
    assert c.full_flops == none.cost.full_flops


def test_eos_and_max_new_tokens_end_a_round_early(lm):
    ids = [5, 9, 11, 4]
    plain = generate(lm, ids, ExitPolicy("none"), GenerationSettings(max_new_tokens=16)).token_ids
    policy = ExitPolicy("speculative", thresholds=THRESHOLDS, max_draft_tokens=4)
    for n in (1, 2, 5):
        assert generate(lm, ids, policy, GenerationSettings(max_new_tokens=n)).token_ids == plain[:n]
    decoder = decoder_for(policy)(lm, [ids], policy, GenerationSettings(max_new_tokens=16))
    decoder.eos = {plain[6]}
    out = [r.id for _, r in decoder.run()]
    cut = plain.index(plain[6])
    assert out == plain[: cut + 1] and decoder.rows[0].finish_reason == "stop"
    assert decoder.cache.lengths == [[len(ids) - 1 + cut + 1]] * 4
    assert sum(tc.drafted for tc in decoder.rows[0].costs) == sum(d for d, _ in decoder.rounds)


def test_stream_yields_the_records(lm):
    seen = []
    policy = ExitPolicy("speculative", thresholds=THRESHOLDS)
    records = list(stream(lm, [4, 5, 6], policy, GenerationSettings(max_new_tokens=10), on_token=seen.append))
    assert records == seen and len(records) == 10
    assert "".join(r.text for r in records) == generate(lm, [4, 5, 6], policy, GenerationSettings(max_new_tokens=10)).text


# ----------------------------------------------------------------------------- policy and CLI
def test_policy_parsing_and_bad_draft_settings(lm, monkeypatch):
    monkeypatch.setattr(lm.lite_config, "thresholds", {"1": 0.1, "2": 0.08, "3": 0.06})
    assert parse_exit(lm, "speculative").kind == "speculative"
    assert parse_exit(lm, "speculative:6").max_draft_tokens == 6
    with pytest.raises(LiteError, match="speculative:4"):
        parse_exit(lm, "speculative:x")
    for policy, match in ((ExitPolicy("speculative", thresholds=THRESHOLDS, max_draft_tokens=0), "--max-draft"),
                          (ExitPolicy("speculative", thresholds=THRESHOLDS, draft_stop_confidence=float("nan")),
                           "--draft-stop"),
                          (ExitPolicy("speculative"), "needs thresholds")):
        with pytest.raises(LiteError, match=match):
            generate(lm, [4, 5], policy, GenerationSettings(max_new_tokens=4))


def test_cli_speculative_json(tiny_model_dir, capsys):
    code = main(["generate", "--model", str(tiny_model_dir), "--json", "--max-new-tokens", "6", "--speculative",
                 "--max-draft", "2", "--draft-stop", "0.001", "--thresholds", "1:0.0,2:0.0,3:0.0", "name a colour"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    full = load_model(tiny_model_dir, device="cpu")
    ids = encode_prompt(full.tokenizer, "name a colour", fmt="chat")
    assert [t["id"] for t in out["tokens"]] == generate(full, ids, ExitPolicy(), GenerationSettings(max_new_tokens=6)).token_ids
    assert out["exit"] == "speculative" and out["drafted"] == out["accepted"] + out["rejected"] > 0
    assert len(out["acceptance_by_position"]) <= 2


def test_cli_speculative_conflicting_exit_is_one_error(tiny_model_dir, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), "--speculative", "--exit", "static:2", "hi"]) == 2
    assert "--speculative" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the embedded default model
@pytest.mark.slow
def test_default_model_speculative_greedy_equals_exits_off():
    lm = load_model(None, device="cpu")
    policy = ExitPolicy("speculative", thresholds={k: 0.5 for k in lm.exit_layers if k < lm.num_layers},
                        exit_layers=[19, 23, 26, 30], max_draft_tokens=4, draft_stop_confidence=0.2)
    for question in ("Name three primary colours.", "How can I improve my time management skills?"):
        ids = encode_prompt(lm.tokenizer, question, fmt="chat")
        full = generate(lm, ids, ExitPolicy(), GenerationSettings(max_new_tokens=32))
        spec = generate(lm, ids, policy, GenerationSettings(max_new_tokens=32))
        assert spec.token_ids == full.token_ids
        assert spec.cost.drafted > 0


def test_serve_and_eval_exit_spec_accepts_speculative(lm, monkeypatch):

    monkeypatch.setattr(lm.lite_config, "thresholds", {"1": 0.1, "2": 0.08, "3": 0.06})
    from lite.decoding import spec as exit_spec

    policy = exit_spec.parse_exit(lm, "speculative:3")
    assert policy.kind == "speculative" and policy.max_draft_tokens == 3
    ids = [5, 9, 11, 4]
    assert generate(lm, ids, policy, GenerationSettings(max_new_tokens=8)).token_ids == \
        generate(lm, ids, ExitPolicy(), GenerationSettings(max_new_tokens=8)).token_ids
