"""Exit modules on a frozen backbone: identity at first, used by every policy, never by the final layer."""

import json

import pytest
import torch

from lite import load_model
from lite.decoding import ExitPolicy, GenerationSettings, generate
from lite.decoding.cost import ModelShape
from lite.errors import LiteError
from lite.model.exit_modules import EXIT_MODULES_FILE, ExitModules

PROMPT = [5, 17, 42, 99, 3]
SETTINGS = GenerationSettings(max_new_tokens=8)


@pytest.fixture
def lm(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu")


def _forcing_modules(lm, layer: int = 1) -> tuple[ExitModules, int, float]:
    """Affine modules whose layer-``layer`` map ignores its input and points at one token, X: every token
    checked there leaves as X with the same, highest reachable max-prob (the shared final norm bounds how
    peaked an exit can be). Returns (modules, X, that max-prob)."""
    modules = ExitModules("affine", [k for k in lm.exit_layers if k < lm.num_layers], lm.hidden_size)
    rows = lm.lm_head.weight.detach() / lm.final_norm.weight.detach()  # bias = row / w: normed ~ head row
    with torch.no_grad():
        probs = torch.softmax(lm.exit_logits(rows, lm.num_layers), -1)  # (V, V)
        x = int(probs.max(-1).values.argmax())
        proj = modules.per_layer[str(layer)].proj
        proj.weight.zero_()
        proj.bias.copy_(rows[x])
        peak = float(probs[x].max())
    assert int(probs[x].argmax()) == x
    return modules, x, peak


@pytest.mark.parametrize("kind", ["affine", "mlp"])
def test_an_untrained_module_is_the_raw_exit(lm, kind):
    h = torch.randn(3, lm.hidden_size) * 7
    raw = {k: lm.exit_logits(h, k) for k in lm.exit_layers}
    lm.exit_modules = ExitModules(kind, [1, 2, 3], lm.hidden_size)
    for k in lm.exit_layers:
        torch.testing.assert_close(lm.exit_logits(h, k), raw[k], rtol=1e-4, atol=1e-4)


def test_modules_leave_the_full_model_identical(lm):
    before = generate(lm, PROMPT, ExitPolicy(kind="none"), SETTINGS).token_ids
    lm.exit_modules, _, _ = _forcing_modules(lm)
    assert generate(lm, PROMPT, ExitPolicy(kind="none"), SETTINGS).token_ids == before
    ids = torch.tensor([PROMPT])
    with torch.no_grad():  # the final layer's state and logits are transformers' own
        states = lm.hidden_states(ids, layers=[lm.num_layers])
        torch.testing.assert_close(lm.lm_head(states[lm.num_layers]), lm.model(ids).logits)


@pytest.mark.parametrize("kv", ["copy", "recompute"])
def test_static_and_dynamic_exits_go_through_the_module(lm, kv):
    lm.exit_modules, x, peak = _forcing_modules(lm, layer=1)
    settings = GenerationSettings(max_new_tokens=8, kv=kv)
    static = generate(lm, PROMPT, ExitPolicy(kind="static", layer=1), settings)
    assert static.token_ids == [x] * len(static.token_ids)
    thresholds = {1: 0.999 * peak, 2: 2.0, 3: 2.0}
    dynamic = generate(lm, PROMPT, ExitPolicy(kind="dynamic", thresholds=thresholds), settings)
    assert [t.exit_layer for t in dynamic.tokens] == [1] * len(dynamic.tokens)
    assert dynamic.token_ids == [x] * len(dynamic.tokens)
    lm.exit_modules = None  # without the module the same thresholds let nothing leave at layer 1
    plain = generate(lm, PROMPT, ExitPolicy(kind="dynamic", thresholds=thresholds), settings)
    assert all(t.exit_layer == lm.num_layers for t in plain.tokens)


def test_the_gate_reads_the_modules_normed_state(lm):
    lm.exit_modules, x, peak = _forcing_modules(lm, layer=1)
    seen = []

    class RecordingGate:
        def should_exit(self, layer, normed_state):
            seen.append((layer, normed_state.clone()))
            return layer == 1

        def flops(self, layer):
            return 0

    result = generate(lm, PROMPT, ExitPolicy(kind="gate", gate=RecordingGate()), SETTINGS)
    assert result.token_ids == [x] * len(result.tokens)
    expected = lm.exit_normed(lm.exit_modules.per_layer["1"].proj.bias, 1)  # the module ignores h
    torch.testing.assert_close(seen[0][1], expected, rtol=1e-5, atol=1e-5)


def test_speculative_drafts_through_the_module_and_stays_lossless(lm):
    full = generate(lm, PROMPT, ExitPolicy(kind="none"), SETTINGS).token_ids
    lm.exit_modules, x, peak = _forcing_modules(lm, layer=1)
    policy = ExitPolicy(kind="speculative", thresholds={1: 0.999 * peak, 2: 2.0, 3: 2.0})
    result = generate(lm, PROMPT, policy, SETTINGS)
    assert result.token_ids == full
    drafted = [t for t in result.tokens if t.draft_layer is not None]
    assert result.cost.drafted > 0 and all(t.draft_layer == 1 for t in drafted)


def test_module_flops_are_counted_per_evaluation(lm):
    shape = ModelShape.from_config(lm.config)
    without = generate(lm, PROMPT, ExitPolicy(kind="static", layer=1), SETTINGS)
    lm.exit_modules, _, _ = _forcing_modules(lm, layer=1)
    with_modules = generate(lm, PROMPT, ExitPolicy(kind="static", layer=1), SETTINGS)
    per = lm.exit_modules.flops(1)
    assert per == 2 * lm.hidden_size ** 2 + 4 * lm.hidden_size
    n = len(with_modules.tokens)
    assert [tc.exit_module_flops for tc in with_modules.cost.tokens] == [per] * n
    assert with_modules.cost.flops - without.cost.flops == n * per
    assert with_modules.cost.full_flops == shape.full_flops(len(PROMPT), n)  # the full model runs no module
    lm.exit_modules = ExitModules("affine", [1, 2, 3], lm.hidden_size)
    full = generate(lm, PROMPT, ExitPolicy(kind="none"), SETTINGS)
    assert sum(tc.exit_module_flops for tc in full.cost.tokens) == 0


def test_save_and_load_with_the_model(lm, tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    modules = ExitModules("mlp", [1, 3], lm.hidden_size)
    with torch.no_grad():
        for p in modules.parameters():
            p.normal_(0, 0.05)
    modules.save(folder)
    cfg = json.loads((folder / "lite_config.json").read_text()) if (folder / "lite_config.json").exists() \
        else None
    from lite.model.config import LiteConfig

    config = LiteConfig.from_dict(cfg) if cfg else LiteConfig.default_for(lm.num_layers)
    config.exit_modules = "mlp"
    config.save(folder)
    loaded = load_model(folder, device="cpu")
    assert loaded.exit_modules is not None and loaded.exit_modules.layers == [1, 3]
    h = torch.randn(2, lm.hidden_size)
    lm.exit_modules = modules
    for k in (1, 2, 3, 4):
        torch.testing.assert_close(loaded.exit_logits(h, k), lm.exit_logits(h, k))
    assert not torch.allclose(loaded.exit_logits(h, 1), load_model(tiny_model_dir, device="cpu").exit_logits(h, 1))


def test_a_truncated_or_foreign_module_file_names_the_file(lm, tiny_model_dir, tmp_path):
    import shutil

    from lite.model.config import LiteConfig

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    ExitModules("affine", [1], lm.hidden_size).save(folder)
    config = LiteConfig.default_for(lm.num_layers, exit_modules="affine")
    config.save(folder)
    path = folder / EXIT_MODULES_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(LiteError, match=EXIT_MODULES_FILE):
        load_model(folder, device="cpu")
    ExitModules("affine", [1], lm.hidden_size + 8).save(folder)  # made for another hidden size
    with pytest.raises(LiteError, match="another model"):
        load_model(folder, device="cpu")
    path.unlink()
    with pytest.raises(LiteError, match="missing"):
        load_model(folder, device="cpu")


def test_an_unknown_kind_is_refused():
    with pytest.raises(LiteError, match="--exit-modules"):
        ExitModules("transformer", [1], 8)


def test_keeping_some_exits_gives_a_model_with_only_those(lm, tiny_model_dir, tmp_path):
    """keep_exits: a copy with the modules of the kept layers only, the same maps there, no calibration
    carried over; refused (nothing written) for a layer without a module or an existing folder."""
    import shutil

    from lite.model.config import LiteConfig
    from lite.model.subset import keep_exits

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run)
    modules = ExitModules("affine", [1, 2, 3], lm.hidden_size)
    with torch.no_grad():
        for p in modules.parameters():
            p.normal_(0, 0.05)
    modules.save(run)
    config = LiteConfig.default_for(lm.num_layers, exit_modules="affine")
    config.thresholds, config.default_exit = {1: 0.5, 2: 0.5, 3: 0.5}, "dynamic"
    config.save(run)
    (run / "exit_gate.safetensors").write_bytes(b"calibrated for exits 1, 2, 3")
    out = keep_exits(run, tmp_path / "kept", [2, 4])
    kept = load_model(out, device="cpu")
    assert kept.exit_layers == [2, 4] and kept.exit_modules.layers == [2]
    assert kept.lite_config.thresholds == {} and kept.lite_config.default_exit is None
    assert not (out / "exit_gate.safetensors").exists()
    assert kept.lite_config.provenance["kept_exits"] == {"of": str(run), "layers": [2]}
    whole = load_model(run, device="cpu")
    h = torch.randn(3, lm.hidden_size)
    torch.testing.assert_close(kept.exit_logits(h, 2), whole.exit_logits(h, 2))
    assert not torch.allclose(whole.exit_logits(h, 2), load_model(tiny_model_dir, device="cpu").exit_logits(h, 2))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(LiteError, match=r"no exit module at layer\(s\) \[5\]|out of range"):
        keep_exits(run, tmp_path / "other", [5])
    with pytest.raises(LiteError, match="exists"):
        keep_exits(run, out, [1])
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(LiteError, match=r"no exit module at layer\(s\) \[3\]"):
        modules.keep([1]).keep([3])
    assert modules.layers == [1, 2, 3] and sorted(modules.per_layer) == ["1", "2", "3"]  # a copy was cut
