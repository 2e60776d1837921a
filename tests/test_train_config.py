"""TrainConfig: the run ``train()`` takes and ``lite train`` builds: every field is a flag with the field's
default, every flag reaches its field, a ``--config`` file maps onto the same config, the recipe resolves as
documented, validation names the flag, and the config and keyword forms of ``train()`` make the same run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import lite.training
from lite.cli import build_parser, main
from lite.cli.train_cmd import field_flag
from lite.training import TrainConfig, TrainError, train

FIELDS = dataclasses.fields(TrainConfig)
VERB_ONLY = {"threads", "no_progress_bar", "config", "debug", "help"}  # flags of the verb, not of the run


def _default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def test_every_field_is_a_flag_with_the_same_default_and_every_flag_a_field():
    parser = build_parser().verbs["train"]
    options = parser._option_string_actions
    for f in FIELDS:
        action = options.get(field_flag(f))
        assert action is not None, f"TrainConfig.{f.name} has no flag {field_flag(f)}"
        assert action.dest == f.name
        assert action.default == _default(f), f"{field_flag(f)}: flag {action.default!r} != field {_default(f)!r}"
    flags = {a.dest for a in parser._actions if a.option_strings}
    assert flags - VERB_ONLY == {f.name for f in FIELDS}


# every field, given a value other than its default: the words on the command line, the value in the config
GIVEN = {
    "model": (["--model", "m"], "m"),
    "data": (["--data", "a.jsonl", "b.jsonl"], ["a.jsonl", "b.jsonl"]),
    "out": (["--out", "runs/x"], "runs/x"),
    "max_steps": (["--max-steps", "5"], 5),
    "epochs": (["--epochs", "2.5"], 2.5),
    "lr": (["--lr", "0.001"], 0.001),
    "warmup_ratio": (["--warmup-ratio", "0.1"], 0.1),
    "batch_size": (["--batch-size", "3"], 3),
    "grad_accum": (["--grad-accum", "2"], 2),
    "max_length": (["--max-length", "64"], 64),
    "lora": (["--lora"], True),
    "lora_rank": (["--lora-rank", "4"], 4),
    "lora_alpha": (["--lora-alpha", "8"], 8),
    "lora_dropout": (["--lora-dropout", "0.05"], 0.05),
    "lora_targets": (["--lora-targets", "q_proj, v_proj"], ("q_proj", "v_proj")),
    "baseline": (["--baseline"], True),
    "exit_layers": (["--exit-layers", "2,4"], "2,4"),
    "loss_weighting": (["--loss-weighting", "increasing"], "increasing"),
    "final_weight": (["--final-weight", "0.5"], 0.5),
    "prompt_format": (["--prompt-format", "alpaca"], "alpaca"),
    "filters": (["--filter", "status=ok", "--filter", "lang=en"], ["status=ok", "lang=en"]),
    "heldout_fraction": (["--heldout-fraction", "0.1"], 0.1),
    "heldout_from": (["--heldout-from", "smollm2-135m-lite"], "smollm2-135m-lite"),
    "seed": (["--seed", "3"], 3),
    "bf16": (["--bf16"], True),
    "gradient_checkpointing": (["--gradient-checkpointing"], True),
    "save_steps": (["--save-steps", "7"], 7),
    "logging_steps": (["--logging-steps", "2"], 2),
    "fsdp": (["--fsdp"], True),
    "dtype": (["--dtype", "bfloat16"], "bfloat16"),
    "device": (["--device", "cpu"], "cpu"),
    "loss_mode": (["--loss-mode", "plain"], "plain"),
    "chunk_size": (["--chunk-size", "64"], 64),
    "recipe": (["--recipe", "paper"], "paper"),
    "targets": (["--targets", "mixed"], "mixed"),
    "ce_weight": (["--ce-weight", "0.3"], 0.3),
    "exit_modules": (["--exit-modules", "mlp"], "mlp"),
    "exit_init": (["--exit-init", "fit"], "fit"),
    "exit_fit_rows": (["--exit-fit-rows", "64"], 64),
    "own_answers": (["--no-own-answers"], False),
    "own_answer_tokens": (["--own-answer-tokens", "9"], 9),
    "own_answers_batch_size": (["--own-answers-batch-size", "5"], 5),
    "own_answers_cache": (["--own-answers-cache", "answers.jsonl"], "answers.jsonl"),
    "max_minutes": (["--max-minutes", "1.5"], 1.5),
    "snapshot_minutes": (["--snapshot-minutes", "0.5"], 0.5),
    "state_cache_gb": (["--state-cache-gb", "0"], 0.0),
    "report_to": (["--report-to", "tensorboard"], ["tensorboard"]),
}


def _config_lite_train_builds(argv, monkeypatch) -> tuple[TrainConfig, dict]:
    """The TrainConfig (and keywords) ``lite train ARGV`` hands to train(), which is stopped there."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_train(config, **kwargs):
        seen["config"], seen["kwargs"] = config, kwargs
        raise Stop

    monkeypatch.setattr(lite.training, "train", fake_train)
    assert main(["train", *argv]) == 1  # Stop: an unexpected error, after the call was recorded
    return seen["config"], seen["kwargs"]


def test_every_flag_reaches_its_field(monkeypatch):
    assert set(GIVEN) == {f.name for f in FIELDS}, "give every field a value here"
    assert all(value != _default(f) for f in FIELDS for value in [GIVEN[f.name][1]])
    argv = [w for words, _ in GIVEN.values() for w in words] + ["--no-progress-bar"]
    config, kwargs = _config_lite_train_builds(argv, monkeypatch)
    assert config == TrainConfig(**{name: value for name, (_, value) in GIVEN.items()})
    assert kwargs["show_progress_bar"] is False and callable(kwargs["progress"])


def test_a_config_file_maps_onto_the_same_config(tmp_path, monkeypatch):
    """Keys are the flags' long names; the file, the flags and the command line over the file agree."""
    def value(f):
        words, typed = GIVEN[f.name]
        if len(words) == 1:  # a switch; --no-own-answers is own_answers: false
            return words[0] != "--no-own-answers"
        if isinstance(typed, list):  # --data A B, --filter X --filter Y, --report-to's list
            return [w for w in words[1:] if w != words[0]] if f.name != "report_to" else words[1]
        return typed if isinstance(typed, (int, float)) else words[1]

    file = {field_flag(f).lstrip("-").replace("-", "_"): value(f) for f in FIELDS}
    (tmp_path / "run.json").write_text(json.dumps(file))
    from_flags, _ = _config_lite_train_builds([w for words, _ in GIVEN.values() for w in words], monkeypatch)
    from_file, _ = _config_lite_train_builds(["--config", str(tmp_path / "run.json")], monkeypatch)
    assert from_file == from_flags
    over, _ = _config_lite_train_builds(["--config", str(tmp_path / "run.json"), "--seed", "11"], monkeypatch)
    assert over == dataclasses.replace(from_flags, seed=11)


def test_the_recipe_resolves_as_documented():
    base = TrainConfig(data="d.jsonl", out="o")
    default = base.resolve()
    assert (default.recipe, default.exit_modules, default.targets, default.own_answers, default.lr) == (
        "exit-modules", "affine", "distill", True, 1e-3)
    assert default.resolve() == default  # idempotent
    lora = dataclasses.replace(base, lora=True).resolve()
    assert (lora.recipe, lora.exit_modules, lora.targets, lora.own_answers, lora.lr) == (
        "paper", None, "data", False, 2e-4)
    full = dataclasses.replace(base, recipe="paper").resolve()
    assert (full.exit_modules, full.lr) == (None, 2e-5)
    mine = dataclasses.replace(base, recipe="paper", targets="distill", own_answers=True, lr=0.5).resolve()
    assert (mine.targets, mine.own_answers, mine.lr) == ("distill", True, 0.5)  # what is given stays
    with pytest.raises(TrainError, match="--recipe exit-modules .* --lora"):
        dataclasses.replace(base, recipe="exit-modules", lora=True).resolve()
    with pytest.raises(TrainError, match="--recipe must be one of"):
        dataclasses.replace(base, recipe="mine").resolve()


@pytest.mark.parametrize("change, flag", [
    ({"data": None}, "--data is required"),
    ({"out": None}, "--out is required"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"lr": float("nan")}, "--lr must be a finite number"),
    ({"warmup_ratio": 1.0}, r"--warmup-ratio must be in \[0, 1\)"),
    ({"recipe": "paper", "snapshot_minutes": 1.0}, "--snapshot-minutes"),
    ({"exit_modules": "affine", "baseline": True}, "--exit-modules .* leave out --baseline"),
    ({"targets": "teacher"}, "--targets must be one of"),
    ({"report_to": "mlflow"}, "--report-to"),
])
def test_validate_names_the_flag_and_touches_no_file(tmp_path, change, flag):
    config = dataclasses.replace(TrainConfig(data=str(tmp_path / "rows.jsonl"), out=str(tmp_path / "out")),
                                 **change)
    with pytest.raises(TrainError, match=flag):
        config.validate()
    TrainConfig(data=str(tmp_path / "rows.jsonl"), out=str(tmp_path / "out")).validate()  # the base is fine
    assert list(tmp_path.iterdir()) == []


def test_train_takes_a_config_or_its_fields_not_both(tmp_path):
    with pytest.raises(TypeError, match="max_steps"):
        train(TrainConfig(data="d.jsonl", out=str(tmp_path / "o")), max_steps=3)
    with pytest.raises(TypeError, match="no_such_field"):
        train("m", "d.jsonl", str(tmp_path / "o"), no_such_field=1)
    with pytest.raises(TypeError, match="model twice"):
        train("m", "d.jsonl", str(tmp_path / "o"), model="n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("recipe", ["paper", None])  # None: the default recipe (exit modules, own answers)
def test_a_config_and_the_keyword_form_make_the_same_run(tiny_model_dir, tmp_path, recipe):
    from safetensors.torch import load_file

    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i} is a number."} for i in range(16)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fields = dict(max_steps=3, lr=1e-2, batch_size=4, max_length=64, logging_steps=1, save_steps=100,
                  recipe=recipe, own_answer_tokens=4)
    a = train(TrainConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "a"), **fields),
              show_progress_bar=False)
    b = train(model=str(tiny_model_dir), data=str(data), out=tmp_path / "b", show_progress_bar=False, **fields)
    losses = [[{k: v for k, v in h.items() if k.startswith(("loss", "kl_l"))} for h in r.log_history]
              for r in (a, b)]
    assert losses[0] == losses[1] and any(losses[0])
    assert a.final_losses == b.final_losses and a.steps == b.steps == 3
    weights = "model.safetensors" if recipe == "paper" else "exit_modules.safetensors"
    wa, wb = load_file(a.output_dir / weights), load_file(b.output_dir / weights)
    assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the run's identity (what a resume compares) is the same record
    ra, rb = (json.loads((r.output_dir / "lite_run.json").read_text()) for r in (a, b))
    assert ra == rb and ra["training"]["exit_modules"] == (None if recipe else "affine")
