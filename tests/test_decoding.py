"""The early-exit decoding engine against transformers' own generate, and its cache invariants."""

import pytest
import torch

from lite import load_model
from lite.decoding import (
    CONFIDENCES, Decoder, ExitPolicy, GenerationSettings, generate, parse_exit, parse_thresholds, stream,
)
from lite.errors import LiteError

PROMPT = "hello there the world"


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def prompt_ids(lm):
    return lm.tokenizer(PROMPT)["input_ids"]


def hf_greedy(lm, ids, n):
    out = lm.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


class FakeGate:
    """Leaves at ``layer`` on the steps listed in ``exit_steps`` (counted per call at that layer)."""

    def __init__(self, layer, exit_steps):
        self.layer, self.exit_steps, self.calls, self.exits = layer, set(exit_steps), [], 0

    def should_exit(self, layer, normed_state):
        assert normed_state.dim() == 1
        self.calls.append(layer)
        go = layer == self.layer and (self.calls.count(layer) - 1) in self.exit_steps
        self.exits += go
        return go

    def flops(self, layer):
        return 1000


@pytest.mark.parametrize("kv", ["copy", "recompute"])
@pytest.mark.parametrize("policy", [ExitPolicy("none"), ExitPolicy("static", layer=4),
                                    ExitPolicy("dynamic", thresholds={1: 2.0, 2: 2.0, 3: 2.0})])
def test_greedy_equals_transformers_generate(lm, prompt_ids, policy, kv):
    result = generate(lm, prompt_ids, policy, GenerationSettings(max_new_tokens=24, kv=kv))
    assert result.token_ids == hf_greedy(lm, prompt_ids, 24)
    assert all(t.exit_layer == lm.num_layers for t in result.tokens)
    assert result.layer_cost_improvement == 0.0
