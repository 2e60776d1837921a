"""Affine exit modules started in closed form (lite train --exit-init fit)."""

import json

import pytest
import torch

from lite import load_model
from lite.model.exit_modules import ExitModules, unit_rms
from lite.training import TrainConfig, TrainError, train
from lite.training.exit_fit import fit_affine_exits

ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add.", "input": "2+2", "output": "4"},
    {"instruction": "Greet.", "input": "", "output": "Hello there!"},
]
FAST = {"batch_size": 4, "max_length": 200, "logging_steps": 1, "show_progress_bar": False, "save_steps": 100}


def sequences(n: int, length: int = 14, prompt: int = 5) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(3, 250, (length - i % 3,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def states(lm, items, layer):
    """The regression's inputs (with a 1 for the bias) and targets, computed apart from the fit: layer L's
    unit-RMS state is transformers' normed last state divided by the norm's weight."""
    xs, ys = [], []
    g = lm.final_norm.weight.float()
    for item in items:
        hs = lm.decoder(input_ids=torch.tensor([item["input_ids"]]), output_hidden_states=True).hidden_states
        where = torch.tensor(item["labels"][1:]) != -100  # the state at t predicts token t + 1
        x = unit_rms(hs[layer][0, :-1][where].float())
        xs.append(torch.cat([x, torch.ones(len(x), 1)], 1))
        ys.append(unit_rms(hs[lm.num_layers][0, :-1][where].float() / g))
    return torch.cat(xs).double(), torch.cat(ys).double()


def test_the_fit_solves_least_squares_on_the_response_tokens_and_beats_the_raw_exit(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu", dtype="float32")
    items = sequences(10)
    modules = ExitModules("affine", [1, 2, 3], lm.hidden_size)
    raw = {k: m.proj.weight.clone() for k, m in modules.per_layer.items()}
    fitted = fit_affine_exits(lm, modules, items, batch_size=3, ridge=0.0)
    assert fitted["sequences"] == 10
    assert fitted["tokens"] == sum(sum(t != -100 for t in i["labels"][1:]) for i in items)
    for k in (1, 2, 3):
        proj = modules.per_layer[str(k)].proj
        assert not torch.equal(proj.weight, raw[str(k)])
        x, y = states(lm, items, k)
        a = torch.cat([proj.weight.T, proj.bias[None]]).double()
        gradient = x.T @ (x @ a - y)  # zero at the least-squares solution (the normal equations)
        assert gradient.abs().max() < 1e-3 * (x.T @ y).abs().max()
        identity = torch.cat([torch.eye(lm.hidden_size), torch.zeros(1, lm.hidden_size)]).double()
        assert ((x @ a - y) ** 2).mean() < 0.9 * ((x @ identity - y) ** 2).mean()


def test_the_fit_reads_the_sequences_spread_over_the_data_and_refuses_what_it_cannot_fit(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu", dtype="float32")
    items = sequences(9)
    few = fit_affine_exits(lm, ExitModules("affine", [2], lm.hidden_size), items, max_sequences=3)
    every = [items[0], items[4], items[8]]  # evenly spread: the first, the middle and the last
    assert few["tokens"] == sum(sum(t != -100 for t in i["labels"][1:]) for i in every)
    with pytest.raises(TrainError, match="no response tokens"):
        fit_affine_exits(lm, ExitModules("affine", [2], lm.hidden_size),
                         [dict(i, labels=[-100] * len(i["labels"])) for i in items])
    with pytest.raises(TrainError, match="--exit-modules affine"):
        fit_affine_exits(lm, ExitModules("mlp", [2], lm.hidden_size), items)


@pytest.mark.parametrize("flags, message", [
    ({"exit_modules": "mlp"}, "use it with --exit-modules affine"),
    ({"recipe": "paper"}, "use it with --exit-modules affine"),
    ({"exit_fit_rows": 0}, "--exit-fit-rows must be at least 1"),
])
def test_the_fit_is_refused_where_it_does_not_apply(flags, message):
    config = TrainConfig(model="m", data="d.jsonl", out="o", exit_init="fit", **flags).resolve()
    with pytest.raises(TrainError, match=message):
        config.validate()
    with pytest.raises(TrainError, match="--exit-init must be one of"):
        TrainConfig(model="m", data="d.jsonl", out="o", exit_init="lstsq").resolve().validate()


def test_a_run_started_from_the_fit_begins_nearer_the_final_layer_and_says_so(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(dict(r, instruction=f"{r['instruction']} #{i}")) + "\n"
                            for i in range(8) for r in ROWS))
    runs = {init: train(str(tiny_model_dir), str(data), tmp_path / init, max_steps=1, lr=1e-2,
                        exit_modules="affine", targets="distill", own_answers=True, own_answer_tokens=12,
                        exit_layers="1,2,3,4", exit_init=init, **FAST)
            for init in ("identity", "fit")}
    first = {init: next(h for h in run.log_history if "kl_l1" in h) for init, run in runs.items()}
    for k in (1, 2, 3):  # the first step's loss is the start's: the fit starts closer to layer L at every exit
        assert first["fit"][f"kl_l{k}"] < first["identity"][f"kl_l{k}"]
    cfg = json.loads((tmp_path / "fit" / "lite_config.json").read_text())
    assert cfg["provenance"]["exit_fit"]["tokens"] > 0 and cfg["training"]["exit_init"] == "fit"
    assert "exit_fit" not in json.loads((tmp_path / "identity" / "lite_config.json").read_text())["provenance"]
    assert not (tmp_path / "fit.partial").exists()  # the fit's record left with the work folder


@pytest.mark.parametrize("flags, start", [
    ({}, "fit"),  # the default recipe: affine modules, from the fit
    ({"exit_modules": "mlp"}, "identity"), ({"exit_modules": "attention"}, "identity"),
    ({"recipe": "paper"}, "identity"), ({"exit_init": "identity"}, "identity"),
])
def test_affine_modules_start_from_the_fit_unless_told_otherwise(flags, start):
    assert TrainConfig(model="m", data="d.jsonl", out="o", **flags).resolve().exit_init == start


def test_a_run_begun_from_the_identity_before_the_fit_was_the_default_resumes_when_told(
        tiny_model_dir, tmp_path, monkeypatch):
    """An unfinished run of an older lite (its record has no exit_init, as an identity run's has none) is
    refused under the new default with the flag that resumes it, and resumes with that flag."""
    import lite.training.trainer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(dict(r, instruction=f"{r['instruction']} #{i}")) + "\n"
                            for i in range(4) for r in ROWS))
    out = tmp_path / "out"
    kw = dict(FAST, max_steps=2, save_steps=1, exit_modules="affine", own_answer_tokens=8, exit_layers="2,4")

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(lite.training.trainer, "_save_final", crash)
        with pytest.raises(RuntimeError, match="killed"):
            train(str(tiny_model_dir), str(data), out, exit_init="identity", **kw)
    record = json.loads((tmp_path / "out.partial" / "lite_run.json").read_text())
    assert "exit_init" not in record["training"]  # what an older lite wrote
    with pytest.raises(TrainError, match="add --exit-init identity"):
        train(str(tiny_model_dir), str(data), out, **kw)
    result = train(str(tiny_model_dir), str(data), out, exit_init="identity", **kw)
    assert result.resumed_from is not None and "exit_fit" not in result.lite_config.provenance
