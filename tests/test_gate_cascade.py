"""The gate's features (the normed state and its change over the block, no exit module per check) and the
cascade (the gate screens, max-prob over the head read there decides), in the engine and in calibration."""

import numpy as np
import pytest
import torch

from lite import LiteConfig, load_model
from lite.calibration.calibrate import cascade_decisions, choose_cascade
from lite.decoding import ExitPolicy, GenerationSettings, generate
from lite.decoding.gate import FEATURES, DEFAULT_FEATURES, LearnedExitGate, gate_features, load_gate, read_gate, save_gate
from lite.model.exit_modules import ExitModules

PROMPT = [5, 17, 42, 7]


@pytest.fixture
def lm(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu")
    lm.exit_modules = ExitModules("affine", [k for k in lm.exit_layers if k < lm.num_layers], lm.hidden_size)
    with torch.no_grad():  # modules that change the state, so "exit" and "state" features differ
        for p in lm.exit_modules.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return lm


def _random_gate(width: int, layers, seed: int, features: str, confirm=None) -> LearnedExitGate:
    g = torch.Generator().manual_seed(seed)
    params = {k: [(torch.randn(1, width, generator=g), torch.randn(1, generator=g))] for k in layers}
    return LearnedExitGate(params, {k: 0.5 for k in layers}, features=features, confirm=confirm)


def test_cli_choices_are_the_gate_features():
    from lite.cli.calibrate_cmd import GATE_FEATURES

    assert GATE_FEATURES == FEATURES and GATE_FEATURES[0] == DEFAULT_FEATURES


def test_features_are_the_normed_state_and_its_change(lm):
    raw, before = torch.randn(3, lm.hidden_size), torch.randn(3, lm.hidden_size)
    with torch.no_grad():
        sd = gate_features(lm, "state+delta", 2, raw, before)
        torch.testing.assert_close(sd[:, :lm.hidden_size], lm.final_norm(raw))
        torch.testing.assert_close(sd[:, lm.hidden_size:], lm.final_norm(raw) - lm.final_norm(before))
        torch.testing.assert_close(gate_features(lm, "state", 2, raw, before), lm.final_norm(raw))
        torch.testing.assert_close(gate_features(lm, "exit", 2, raw, before), lm.exit_normed(raw, 2))
        assert not torch.allclose(gate_features(lm, "exit", 2, raw, before), lm.final_norm(raw))


class _Recording(LearnedExitGate):
    """Records what the engine hands the gate at every check: (layer, raw, before, features)."""

    def features_of(self, lm, layer, raw, before):
        f = super().features_of(lm, layer, raw, before)
        self.seen.append((layer, raw.clone(), before.clone(), f.clone()))
        return f


@pytest.mark.parametrize("features", ["state+delta", "state"])
def test_engine_decides_on_the_features_and_runs_the_module_only_at_the_exit(lm, features):
    width = lm.hidden_size * (2 if features == "state+delta" else 1)
    g = torch.Generator().manual_seed(3)
    params = {k: [(torch.randn(1, width, generator=g) * 0.5, torch.zeros(1))] for k in (1, 2, 3)}
    gate = _Recording(params, {k: 1.0 for k in (1, 2, 3)}, features=features)  # first: never leave
    gate.seen = []
    settings = GenerationSettings(max_new_tokens=12)
    generate(lm, PROMPT, ExitPolicy(kind="gate", gate=gate), settings)
    with torch.no_grad():  # cuts at each layer's median probability, so tokens leave at different layers
        gate.set_thresholds({k: float(torch.stack([gate.probability(k, f[0]) for layer, _, _, f in gate.seen
                                                    if layer == k]).median()) for k in (1, 2, 3)})
    gate.seen = []
    res = generate(lm, PROMPT, ExitPolicy(kind="gate", gate=gate), settings)
    exits = [t.exit_layer for t in res.tokens]
    # the checks said both "stay" and "leave", so the decision checks below can fail
    assert any(e > 1 for e in exits) and any(e < lm.num_layers for e in exits), exits
    checks = iter(gate.seen)
    tokens = [PROMPT[-1]] + res.token_ids
    for t, tok in enumerate(res.tokens):
        last_raw = None
        for k in (1, 2, 3):
            if k > tok.exit_layer:
                break
            layer, raw, before, f = next(checks)
            assert layer == k
            if k == 1 and t > 0:  # the block's input at layer 1 is the token's embedding
                torch.testing.assert_close(before[0], lm.embed(torch.tensor([[tokens[t]]]))[0, -1])
            if last_raw is not None:  # ... and at layer k the output of block k - 1, as the gate read it
                torch.testing.assert_close(before, last_raw)
            with torch.no_grad():
                torch.testing.assert_close(f, gate_features(lm, features, k, raw, before))
                leaves = LearnedExitGate.should_exit_rows(gate, k, f)[0]
            assert leaves == (k == tok.exit_layer)
            last_raw = raw
    assert next(checks, None) is None
    per = lm.exit_modules.flops(1)
    for tok, cost in zip(res.tokens, res.cost.tokens):  # the module ran once, where the token left, or never
        assert cost.exit_module_flops == (per if tok.exit_layer < lm.num_layers else 0)


def test_exit_features_still_run_the_module_at_every_check(lm):
    gate = LearnedExitGate({k: [(torch.zeros(1, lm.hidden_size), torch.tensor([-20.0]))] for k in (1, 2, 3)},
                           {k: 0.5 for k in (1, 2, 3)}, features="exit")  # never leaves
    res = generate(lm, PROMPT, ExitPolicy(kind="gate", gate=gate), GenerationSettings(max_new_tokens=4))
    assert all(c.exit_module_flops == 3 * lm.exit_modules.flops(1) for c in res.cost.tokens[1:])


def test_cascade_leaves_where_the_gate_passes_and_max_prob_reaches_the_cut(lm):
    """A gate that passes every token at every exit: the cascade is then max-prob thresholds with one cut."""
    open_gate = {k: [(torch.zeros(1, 2 * lm.hidden_size), torch.tensor([20.0]))] for k in (1, 2, 3)}
    settings = GenerationSettings(max_new_tokens=10)
    full = generate(lm, PROMPT, ExitPolicy(kind="none"), settings)
    with torch.no_grad():  # one cut at the 0.9 quantile of the max-probs of the exits on the full model's own sequence
        cache = lm.new_cache(len(PROMPT) + 10)
        h, values = lm.embed(torch.tensor([PROMPT + full.token_ids])), []
        for k in (1, 2, 3):
            h = lm.run_block(k, h, cache)
            values.append(torch.softmax(lm.exit_logits(h[0], k).float(), -1).amax(-1))
        cut = float(torch.cat(values).quantile(0.9))
    thresholds = generate(lm, PROMPT, ExitPolicy(kind="dynamic", thresholds={1: cut, 2: cut, 3: cut}), settings)
    cascade = LearnedExitGate(open_gate, {k: 0.5 for k in (1, 2, 3)}, features="state+delta",
                              confirm={1: cut, 2: cut, 3: cut})
    res = generate(lm, PROMPT, ExitPolicy(kind="gate", gate=cascade), settings)
    assert res.token_ids == thresholds.token_ids
    assert [t.exit_layer for t in res.tokens] == [t.exit_layer for t in thresholds.tokens]
    exits = [t.exit_layer for t in res.tokens]
    assert any(e > 1 for e in exits) and any(e < lm.num_layers for e in exits), exits  # stayed and left
    # the head was read at every check (the gate passed all), as the thresholds read it
    assert [(c.head_evals, c.head_checks, c.flops - c.gate_flops) for c in res.cost.tokens] == \
        [(c.head_evals, c.head_checks, c.flops) for c in thresholds.cost.tokens]
    closed = LearnedExitGate({k: [(w * 0, b * 0 - 20.0)] for k, [(w, b)] in open_gate.items()},
                             {k: 0.5 for k in (1, 2, 3)}, features="state+delta", confirm={1: 0.0, 2: 0.0, 3: 0.0})
    shut = generate(lm, PROMPT, ExitPolicy(kind="gate", gate=closed), settings)  # the gate stops every token
    assert shut.token_ids == full.token_ids and all(t.exit_layer == lm.num_layers for t in shut.tokens)
    assert all(c.exit_module_flops == 0 for c in shut.cost.tokens)  # nothing read: no module ran


def test_choose_cascade_by_hand():
    """Two exits (layers 1, 2 of L = 4), four tokens; prices: fill 0, a head read 1 block, the full head 0."""
    probs = np.array([[0.9, 0.9, 0.1, 0.6], [0.9, 0.9, 0.9, 0.9]])
    maxprob = np.array([[0.8, 0.3, 0.9, 0.8], [0.9, 0.9, 0.9, 0.2]])
    agree = np.array([[True, False, True, False], [True, True, True, True]])
    first, heads = cascade_decisions(probs, maxprob, 0.5, 0.5)
    # token 0 leaves at once; 1 is read at layer 1 (max-prob too low) and leaves at 2; 2 is screened at 1 by
    # the gate and leaves at 2; 3 leaves at 1, where it disagrees
    assert first.tolist() == [0, 1, 1, 0]
    assert heads.sum(0).tolist() == [1, 2, 1, 1]
    g, c, stats, rate = choose_cascade(probs, maxprob, agree, [1, 2], 4, bar=1.0, prices=(0.0, 1.0, 0.0))
    first, heads = cascade_decisions(probs, maxprob, g, c)
    # every token must agree, so token 3 may not leave at 1: the cheapest pair is checked against a search
    best = None
    for gg in np.unique(probs):
        for cc in np.unique(maxprob):
            f, hd = cascade_decisions(probs, maxprob, gg, cc)
            at = np.array([1, 2, 4])[f]
            ok = np.vstack([agree, np.ones((1, 4), bool)])[f, np.arange(4)].all()
            cost = (at + hd.sum(0)).mean()
            if ok and (best is None or cost < best):
                best = cost
    at = np.array([1, 2, 4])[first]
    assert np.vstack([agree, np.ones((1, 4), bool)])[first, np.arange(4)].all()
    assert (at + heads.sum(0)).mean() == pytest.approx(best)
    assert rate == pytest.approx(heads.mean(1).tolist())
    assert g > 0.6 or c > 0.8  # the pair found screens token 3 out of layer 1 one way or the other


def test_choose_cascade_lets_nobody_leave_when_no_pair_meets_the_bar():
    probs = np.array([[0.9, 0.8]])
    maxprob = np.array([[0.9, 0.9]])
    agree = np.array([[False, False]])  # the only exit never agrees: only "nobody leaves" reaches bar 1
    g, c, stats, rate = choose_cascade(probs, maxprob, agree, [1], 2, bar=1.0, prices=(0.0, 1.0, 0.0))
    # cuts a lite_config.json can hold (the gate's thresholds are probabilities, confirm cuts finite)
    assert (g, c) == (1.0, 1.0) and stats.final_rate == 1.0 and rate == [0.0]


def test_features_and_confirm_round_trip(lm, tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    gate = _random_gate(2 * lm.hidden_size, [1, 3], seed=1, features="state+delta")
    path = save_gate(gate, folder)
    assert read_gate(path).features == "state+delta"
    LiteConfig(num_layers=4, exit_layers=[1, 2, 3, 4], gate_file=path.name,
               calibration={"gate": {"thresholds": {"1": 0.3, "3": 0.7}, "confirm": {"1": 0.4, "3": 0.5}}}).save(folder)
    loaded = load_gate(load_model(folder, device="cpu"))
    assert loaded.features == "state+delta" and loaded.confirm == {1: 0.4, 3: 0.5}
    # a gate file from before features were recorded reads the exit state
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file(tensors, path, metadata={"format": "lite-exit-gate-v1", "layers": "1,3", "hidden": "0"})
    assert read_gate(path).features == "exit"
    save_file(tensors, path, metadata={"format": "lite-exit-gate-v1", "layers": "1,3", "hidden": "0",
                                       "features": "telepathy"})
    with pytest.raises(Exception, match="telepathy"):
        read_gate(path)
