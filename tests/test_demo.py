"""lite demo on a tiny model: every figure is produced and consistent with the engine."""

import pytest

from lite.cli import main
from lite.demo import demo_policy, run_demo
from lite.model.loading import shipped_adapter_dir


def test_run_demo_figures(tiny_model_dir):
    seen = []
    result = run_demo(model=str(tiny_model_dir), prompts=["hello there", "the sea"], max_new_tokens=5,
                      exit_spec="static:2", similarity=False, on_token=seen.append)
    assert [a.prompt for a in result.answers] == ["hello there", "the sea"]
    assert result.checked_layers == [1, 2, 3]
    assert len(seen) == sum(a.tokens_early for a in result.answers)
    for a in result.answers:
        assert 1 <= a.tokens_early <= 5 and 1 <= a.tokens_full <= 5
        assert a.mean_exit_layer == 2.0  # static:2: every token leaves at layer 2
        assert a.layer_cost_improvement == pytest.approx(1 - 2 / 4)
        assert a.seconds_full > 0 and a.seconds_early > 0
    total = result.overall()
    assert total.tokens_early == sum(a.tokens_early for a in result.answers)


def test_lossless_row_is_the_full_models_output(tiny_model_dir, tmp_path):
    import shutil

    from lite.model.config import LiteConfig

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cfg = LiteConfig.load(model) or LiteConfig(num_layers=4, exit_layers=[1, 2, 3, 4])
    cfg.exit_layers = [1, 2, 3, 4]
    cfg.thresholds = {"1": 0.0, "2": 0.0, "3": 0.0}  # every token drafts: the verify must still fix the output
    cfg.save(model)
    result = run_demo(model=str(model), prompts=["hello there", "the sea"], max_new_tokens=6,
                      exit_spec="static:2", similarity=False)
    assert result.lossless_policy and "calibrated thresholds" in result.lossless_policy
    for a in result.answers:
        assert a.identical_lossless is True and a.seconds_lossless > 0 and a.drafted >= a.accepted
    total = result.overall()
    assert total.drafted > 0 and total.identical_lossless is True and total.speedup_lossless > 0
    assert run_demo(model=str(model), prompts=["hi"], max_new_tokens=2, exit_spec="static:2", similarity=False,
                    lossless=False).lossless_policy is None


def test_uncalibrated_model_gets_a_labelled_fallback(tiny_model_dir):
    from lite import load_model

    lm = load_model(tiny_model_dir, device="cpu")
    policy, name = demo_policy(lm, None)
    assert policy.kind == "dynamic" and "not calibrated" in name
    assert all(k >= 2 * lm.num_layers / 3 for k in policy.checks)


def test_demo_cli(tiny_model_dir, capsys):
    rc = main(["demo", "--model", str(tiny_model_dir), "--exit", "none", "--no-similarity", "--max-new-tokens", "3",
               "--prompt", "hi", "--color", "never"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "(all)" in out and "> hi" in out


def test_shipped_adapter_is_complete_when_present():
    folder = shipped_adapter_dir()
    if folder is None:
        pytest.skip("no LITE adapter shipped in this checkout yet")
    from lite.model.config import LiteConfig

    cfg = LiteConfig.load(folder)
    # a small checkpoint over the embedded default: a LoRA adapter or exit modules, never a full model copy
    assert cfg is not None and cfg.base_model == "smollm2-135m-instruct"
    assert cfg.adapter or (cfg.exit_modules and (folder / "exit_modules.safetensors").is_file())
    assert not list(folder.glob("model*.safetensors"))
    assert all(cfg.threshold_for(k) is not None for k in cfg.exit_layers if k < cfg.num_layers)
    assert cfg.gate_file and (folder / cfg.gate_file).is_file()
    # --exit auto: the cheapest calibrated policy whose tokens agree with the final layer at the bar
    costs, agree = cfg.calibration["expected_compute"], cfg.calibration["expected_agreement"]
    bar = cfg.calibration["parameters"]["target"]
    meeting = [k for k in costs if agree[k] >= bar]
    assert cfg.default_exit == (min(meeting, key=lambda k: (costs[k], k != "gate")) if meeting
                                else max(agree, key=agree.get))
    if cfg.exit_vocab:
        assert (folder / "draft_vocab.json").is_file() and cfg.calibration["exit_vocab"] == cfg.exit_vocab
    card = (folder / "README.md").read_text()  # the card calls the packaged model by its own name
    assert f"# {folder.name}\n" in card and f"--model {folder.name} " in card
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 16 * 2**20


@pytest.mark.slow
def test_shipped_adapter_decodes_with_early_exit():
    """The shipped LITE adapter loads on the embedded default and its calibrated policy exits early."""
    folder = shipped_adapter_dir()
    if folder is None:
        pytest.skip("no LITE adapter shipped in this checkout yet")
    from lite import load_model
    from lite.decoding import GenerationSettings, generate
    from lite.model.prompts import default_format, encode_prompt

    lm = load_model(str(folder), dtype="float32", device="cpu")
    policy, _ = demo_policy(lm, None)
    ids = encode_prompt(lm.tokenizer, "Give three tips for staying healthy.", fmt=default_format(lm))
    result = generate(lm, ids, policy, GenerationSettings(max_new_tokens=32))
    assert result.tokens and result.text.strip()
    assert any(t.exit_layer < lm.num_layers for t in result.tokens)  # some token left early


def test_shipped_adapter_alias_resolves_to_the_package_folder():
    from lite.model.loading import resolve_model

    folder = shipped_adapter_dir()
    if folder is None:
        pytest.skip("no LITE adapter shipped in this checkout yet")
    assert resolve_model("smollm2-135m-lite") == str(folder)
