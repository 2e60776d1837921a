"""The learned exit gate: it learns, it round-trips, and the engine obeys it."""

import numpy as np
import pytest
import torch

from lite import LiteConfig, load_model
from lite.decoding import ExitGate, ExitPolicy, GenerationSettings, generate
from lite.decoding.gate import LearnedExitGate, load_gate, read_gate, save_gate, train_gate


def _separable(n: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((2, d))
    x = rng.standard_normal((2, n, d)).astype(np.float32) * 3 + 1.5  # off-centre, unscaled: needs standardising
    agree = np.einsum("end,ed->en", x - 1.5, w) > 0.3
    return x, agree


@pytest.mark.parametrize("hidden", [0, 8])
def test_gate_learns_separable_agreement(hidden):
    x, agree = _separable(600, 16, seed=0)
    gate = train_gate(x[:, :400], agree[:, :400], [3, 5], hidden=hidden, steps=200)
    for i, layer in enumerate([3, 5]):
        p = gate.probability(layer, torch.from_numpy(x[i, 400:])).numpy()
        accuracy = ((p >= 0.5) == agree[i, 400:]).mean()
        base = max(agree[i, 400:].mean(), 1 - agree[i, 400:].mean())
        assert accuracy > 0.9 and accuracy > base + 0.2  # far above chance on unseen tokens
    assert gate.flops(3) == (2 * 16 if hidden == 0 else 2 * 16 * 8 + 2 * 8)
    assert gate.flops(4) == 0 and gate.should_exit(4, torch.zeros(16)) is False  # no classifier: never leaves


def test_decisions_follow_the_thresholds():
    x, agree = _separable(200, 16, seed=1)
    gate = train_gate(x, agree, [1, 2], steps=50)
    state = torch.from_numpy(x[0, 0])
    p = float(gate.probability(1, state))
    gate.set_thresholds({1: p - 1e-4, 2: 1.0})
    assert gate.should_exit(1, state) is True
    gate.set_thresholds({1: p + 1e-4, 2: 0.0})
    assert gate.should_exit(1, state) is False
    assert gate.should_exit(2, torch.from_numpy(x[1, 0])) is True  # threshold 0: always leaves
    gate.set_thresholds({1: 1.0, 2: 1.0})
    assert not any(gate.should_exit(1, torch.from_numpy(v)) for v in x[0, :50])  # threshold 1: never
    assert gate.should_exit(1, state.to(torch.bfloat16)) in (True, False)  # model dtype states are accepted
    gate.set_thresholds({1: 0.5, 2: 0.5})
    rows = torch.from_numpy(x[0, :64])  # the batched decision is the row-by-row one
    assert gate.should_exit_rows(1, rows) == [gate.should_exit(1, r) for r in rows]
    assert 0 < sum(gate.should_exit_rows(1, rows)) < 64
    assert gate.should_exit_rows(3, rows) == [False] * 64  # no classifier: never leaves


def test_gate_round_trips_through_safetensors_and_lite_config(tiny_model_dir, tmp_path):
    x, agree = _separable(200, 32, seed=2)
    gate = train_gate(x, agree, [1, 3], hidden=4, steps=20)
    gate.set_thresholds({1: 0.3, 3: 0.7})
    folder = tmp_path / "m"
    import shutil

    shutil.copytree(tiny_model_dir, folder)
    path = save_gate(gate, folder)
    back = read_gate(path, gate.thresholds)
    probe = torch.randn(5, 32)
    for k in (1, 3):
        torch.testing.assert_close(back.logits(k, probe), gate.logits(k, probe))
    assert back.hidden == 4 and back.flops(1) == gate.flops(1)
    lm = load_model(folder, device="cpu")
    assert load_gate(lm) is None  # nothing recorded in lite_config.json yet
    LiteConfig(num_layers=4, exit_layers=[1, 2, 3, 4], gate_file=path.name,
               calibration={"gate": {"thresholds": {"1": 0.3, "3": 0.7}}}).save(folder)
    loaded = load_gate(load_model(folder, device="cpu"))
    assert isinstance(loaded, ExitGate) and loaded.thresholds == {1: 0.3, 3: 0.7}
    torch.testing.assert_close(loaded.probability(3, probe), gate.probability(3, probe))


def _constant_gate(d: int, leave_at: dict[int, bool]) -> LearnedExitGate:
    """A gate whose decision at each layer ignores the state: bias +-20 with zero weights."""
    params = {k: [(torch.zeros(1, d), torch.tensor([20.0 if leave else -20.0]))] for k, leave in leave_at.items()}
    return LearnedExitGate(params, {k: 0.5 for k in leave_at})


def test_engine_evaluates_the_head_only_where_the_gate_says_leave(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu")
    calls = []
    handle = lm.lm_head.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    try:
        for layer, expected in ((2, 2), (None, lm.num_layers)):
            gate = _constant_gate(lm.hidden_size, {1: False, 2: layer == 2, 3: False})
            calls.clear()
            res = generate(lm, [5, 17, 42, 7], ExitPolicy(kind="gate", gate=gate),
                           GenerationSettings(max_new_tokens=6))
            assert [t.exit_layer for t in res.tokens] == [expected] * len(res.tokens)
            assert len(calls) == len(res.tokens)  # one head evaluation per token, none for the checks
            checks = 2 if layer == 2 else 3
            assert res.cost.tokens[0].gate_flops == checks * gate.flops(1)
    finally:
        handle.remove()


def test_trained_gate_drives_the_engine(tiny_model_dir):
    """A gate trained on real collected states: each token leaves at the first layer its gate accepts."""
    from lite.calibration import collect
    from lite.training.data import Example

    lm = load_model(tiny_model_dir, device="cpu")
    rows = [Example(f"0:{i}", f"Echo {i}.", "", f"{i} and {i}") for i in range(4)]
    data = collect(lm, rows, with_states=True, gate_features="exit")  # a protocol gate reads the exit state
    gate = train_gate(data.states, data.agree, data.layers, steps=50, features="exit")
    gate.set_thresholds({k: 0.5 for k in data.layers})
    seen = []

    class Spy:
        def should_exit(self, layer, normed_state):
            decision = gate.should_exit(layer, normed_state)
            seen.append((layer, decision))
            return decision

        def flops(self, layer):
            return gate.flops(layer)

    res = generate(lm, [5, 17, 42], ExitPolicy(kind="gate", gate=Spy()), GenerationSettings(max_new_tokens=8))
    groups = []  # the engine asks the exit layers in increasing order, stopping at the first "leave"
    for layer, decision in seen:
        if layer == data.layers[0]:
            groups.append([])
        groups[-1].append((layer, decision))
    assert len(groups) == len(res.tokens)
    for tok, asked in zip(res.tokens, groups):
        leave = [k for k, d in asked if d]
        assert len(leave) <= 1 and (not leave or asked[-1][1])
        assert tok.exit_layer == (leave[0] if leave else lm.num_layers)
