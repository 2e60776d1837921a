"""Cost accounting by hand on a tiny configuration, and the engine's counts on the tiny model."""

from types import SimpleNamespace

import pytest
import torch

from lite import load_model
from lite.decoding import ExitPolicy, GenerationSettings, generate
from lite.decoding.cost import ModelShape, TokenCost, sequence_cost, token_flops

# L=2, D=4, I=8, H=2 heads, 1 KV head, head_dim 2, V=10
CONFIG = SimpleNamespace(num_hidden_layers=2, hidden_size=4, intermediate_size=8, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=2, vocab_size=10)
SHAPE = ModelShape.from_config(CONFIG)


def test_unit_costs_by_hand():
    assert SHAPE.projection_flops() == 32 + 32 + 32  # q 2*4*4, k+v 2*2*4*2, o 2*4*4
    assert SHAPE.attention_flops(3) == 2 * 2 * 2 * 2 * 3  # scores + values, 2 heads of dim 2, 3 positions
    assert SHAPE.mlp_flops() == 3 * 2 * 4 * 8
    assert SHAPE.block_flops(0) == 96 + 16 + 192 and SHAPE.block_flops(5) == 304 + 16 * 5
    assert SHAPE.head_flops() == 80 and SHAPE.head_check_flops() == 130
    assert SHAPE.kv_fill_flops() == 32
    # prompt of 3 tokens: the prefill runs positions 0..2; token 1 is the head at position 2, token 2 the
    # decode step at position 3: 2 blocks + 1 head
    assert SHAPE.full_flops(3, 2) == 80 + (2 * (304 + 48) + 80) == 864
    assert SHAPE.prefill_flops(3) == 2 * (304 + 320 + 336)


def test_exit_at_the_last_layer_gives_zero_improvement():
    tokens = [TokenCost(position=2, exit_layer=2, head_evals=1), TokenCost(position=3, exit_layer=2, blocks_run=2,
                                                                           head_evals=1)]
    cost = sequence_cost(SHAPE, 3, tokens)
    assert cost.flops == cost.full_flops == 864
    assert cost.compute_cost_improvement == 0.0 and cost.layer_cost_improvement == 0.0


def test_head_checks_fills_and_recompute_are_charged():
    # token 1 (position 2, from the prefill's states): checked at layer 1 (head + reduction), left there
    first = TokenCost(position=2, exit_layer=1, head_evals=1, head_checks=1)
    # token 2 (position 3): checked at layer 1 without leaving, then head at L and its confidence; then
    # a token 3 (position 4) that left at layer 1 and had the K/V of block 2 filled
    second = TokenCost(position=3, exit_layer=2, blocks_run=2, head_evals=2, head_checks=2)
    third = TokenCost(position=4, exit_layer=1, blocks_run=1, head_evals=1, head_checks=1, kv_fills=1)
    cost = sequence_cost(SHAPE, 3, [first, second, third])
    assert first.flops == 80 + 50
    assert second.flops == 2 * 352 + 2 * 80 + 2 * 50
    assert third.flops == 368 + 80 + 50 + 32
    assert cost.flops == 130 + 964 + 530
    full = 80 + (2 * 352 + 80) + (2 * 368 + 80)
    assert cost.full_flops == full and cost.compute_cost_improvement == pytest.approx(1 - 1624 / full)
    assert cost.layer_cost_improvement == pytest.approx(1 - 4 / 6)
    # recompute: positions 2 and 3 pushed through one block while the token at 5 runs 2 blocks
    tc = TokenCost(position=5, exit_layer=2, blocks_run=2, head_evals=1, recomputed=2, recompute_context=3 + 4)
    assert token_flops(SHAPE, tc) == 2 * SHAPE.block_flops(5) + 80 + SHAPE.block_flops(2) + SHAPE.block_flops(3)
    # a gate's own cost and state-cosine checks are added as reported
    assert token_flops(SHAPE, TokenCost(position=0, gate_flops=7, cosine_checks=1)) == 7 + 6 * 4


def test_longer_reference_answers_count_for_early_exit():
    tokens = [TokenCost(position=2, exit_layer=2, head_evals=1), TokenCost(position=3, exit_layer=2, blocks_run=2,
                                                                           head_evals=1)]
    cost = sequence_cost(SHAPE, 3, tokens, reference_tokens=4)
    assert cost.reference_tokens == 4 and cost.compute_cost_improvement > 0.4
    assert cost.improvement_against(SHAPE, 2) == 0.0
    assert sequence_cost(SHAPE, 3, tokens, reference_tokens=1).compute_cost_improvement < 0


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(tiny_model_dir, device="cpu")
    torch.set_num_threads(before)


def test_engine_charges_a_head_at_every_checked_exit(lm):
    ids = lm.tokenizer("hello there")["input_ids"]
    shape = ModelShape.from_config(lm.config)
    full = generate(lm, ids, ExitPolicy(), GenerationSettings(max_new_tokens=6))
    never = generate(lm, ids, ExitPolicy("dynamic", thresholds={1: 2.0, 2: 2.0, 3: 2.0}),
                     GenerationSettings(max_new_tokens=6))
    assert never.token_ids == full.token_ids
    assert full.cost.flops == full.cost.full_flops and full.compute_cost_improvement == 0.0
    # three checks that fail (head + reduction each), the head at L, and the confidence recorded there
    assert all(t.head_evals == 4 and t.head_checks == 4 for t in never.cost.tokens)
    extra = 6 * (3 * shape.head_flops() + 4 * 5 * shape.vocab)
    assert never.cost.flops - full.cost.flops == extra
    assert never.compute_cost_improvement == pytest.approx(-extra / full.cost.full_flops)


def test_engine_static_exit_counts_blocks_and_fills(lm):
    ids = lm.tokenizer("hello there")["input_ids"]
    shape = ModelShape.from_config(lm.config)
    result = generate(lm, ids, ExitPolicy("static", layer=1), GenerationSettings(max_new_tokens=3))
    n0 = len(ids) - 1
    first, *rest = result.cost.tokens  # the first token reads the prefill's layer-1 state: its head only
    assert (first.position, first.blocks_run, first.head_evals, first.kv_fills) == (n0, 0, 1, 0)
    assert first.flops == shape.head_flops() + 5 * shape.vocab
    for t, tc in enumerate(rest, 1):
        assert (tc.position, tc.blocks_run, tc.head_evals, tc.kv_fills) == (n0 + t, 1, 1, 3)
        assert tc.flops == shape.block_flops(n0 + t) + shape.head_flops() + 5 * shape.vocab + 3 * shape.kv_fill_flops()
    assert result.layer_cost_improvement == pytest.approx(0.75)
    assert 0 < result.compute_cost_improvement < 0.75
