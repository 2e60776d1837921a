"""The command line as a contract: every parameter of the typed functions has a flag, run() passes each one,
their defaults agree; ``--config FILE`` on every verb gives the run its flags give, and a bad file is
refused naming it."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json

import pytest

from lite.cli import VERBS, build_parser, main

# (function, parameter) pairs whose CLI default differs on purpose, with the reason.
DEFAULTS_DIFFER = {
    ("lite.evaluation.evaluate", "threshold_scales"): "None means [1.0] in the function, the flag's default",
}


def _function(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _verb_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return parser.verbs


def _contracts():
    for verb in VERBS:
        module = importlib.import_module(f"lite.cli.{verb}_cmd")
        for path, renamed in getattr(module, "CONTRACT", {}).items():
            yield verb, path, renamed


def test_the_three_verbs_with_typed_functions_declare_their_contract():
    assert {path for _, path, _ in _contracts()} >= {"lite.training.TrainConfig", "lite.evaluation.evaluate",
                                                     "lite.calibration.select", "lite.calibration.collect"}


@pytest.mark.parametrize("verb, path, renamed", list(_contracts()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_parameter_has_a_flag_with_the_same_default(verb, path, renamed):
    parser = _verb_parsers()[verb]
    actions = {a.dest: a for a in parser._actions}
    missing, differ = [], []
    for name, param in inspect.signature(_function(path)).parameters.items():
        dest = renamed.get(name, name)
        if dest is None:  # Python-only (a callback, an object, the data the verb prepares)
            continue
        if dest not in actions:
            missing.append(name)
            continue
        action = actions[dest]
        if dest != name or param.default is inspect.Parameter.empty or action.default is None:
            continue  # renamed flags invert or reshape; None lets the function decide
        if (path, name) not in DEFAULTS_DIFFER and action.default != param.default:
            differ.append(f"{name}: flag {action.default!r} != function {param.default!r}")
    assert not missing, f"{path} parameters without a '{verb}' flag: {missing}"
    assert not differ, f"{path} and 'lite {verb}' disagree on defaults: {differ}"


class _Called(Exception):
    pass


# lite train builds its TrainConfig from every field generically: tests/test_train_config.py gives every flag a
# value other than its default and finds each in the config train() receives
@pytest.mark.parametrize("verb, path, argv", [
    ("eval", "lite.evaluation.evaluate", ["--out", "o"]),
])
def test_run_passes_every_parameter(verb, path, argv, monkeypatch):
    """run() names every parameter of the function it calls (none silently left at the function's default)."""
    real = _function(path)
    seen = {}

    def record(*args, **kwargs):
        seen.update(inspect.signature(real).bind(*args, **kwargs).arguments)
        raise _Called

    module, name = path.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, record)
    assert main([verb, *argv]) == 1  # _Called: an unexpected error, after the call was recorded
    renamed = dict(next(r for v, p, r in _contracts() if p == path))
    python_only = {k for k, v in renamed.items() if v is None}
    left_out = set(inspect.signature(real).parameters) - set(seen) - python_only
    assert not left_out, f"lite {verb} does not pass {sorted(left_out)} to {path}"


# ------------------------------------------------------------------------------------------ --config FILE
TRAIN_FLAGS = ["--model", "m", "--data", "a.jsonl", "b.jsonl", "--out", "runs/x", "--max-steps", "5",
               "--lr", "0.001", "--lora", "--lora-alpha", "8", "--lora-dropout", "0.05", "--filter", "status=ok",
               "--filter", "lang=en", "--warmup-ratio", "0.1", "--exit-layers", "2,4", "--seed", "3"]
TRAIN_YAML = """\
model: m
data: [a.jsonl, b.jsonl]
out: runs/x
max_steps: 5
lr: 1e-3
lora: true
lora-alpha: 8
lora_dropout: 0.05
filter: [status=ok, lang=en]
warmup_ratio: 0.1
exit_layers: "2,4"
seed: 3
baseline: false
"""


def _parsed(argv):
    out = vars(build_parser().parse_args(argv))
    out.pop("_run")
    return out


def test_a_config_file_parses_to_the_namespace_of_the_same_flags(tmp_path, monkeypatch):
    (tmp_path / "run.yaml").write_text(TRAIN_YAML)
    assert _parsed(["train", "--config", str(tmp_path / "run.yaml")]) == _parsed(["train", *TRAIN_FLAGS])
    # the command line wins, a repeatable flag's values replace the file's
    mixed = _parsed(["train", "--config", str(tmp_path / "run.yaml"), "--lr", "0.5", "--filter", "x=y"])
    assert mixed["lr"] == 0.5 and mixed["filters"] == ["x=y"] and mixed["max_steps"] == 5
    # JSON always, and the only format without PyYAML
    (tmp_path / "run.json").write_text(json.dumps({"max_steps": 5, "lora": True, "data": ["a.jsonl"], "out": "o"}))
    monkeypatch.setitem(__import__("sys").modules, "yaml", None)
    (tmp_path / "run.cfg").write_text((tmp_path / "run.json").read_text())
    for name in ("run.json", "run.cfg"):
        parsed = _parsed(["train", "--config", str(tmp_path / name)])
        assert parsed["max_steps"] == 5 and parsed["lora"] is True and parsed["data"] == ["a.jsonl"]


# verbs that load no model, so take none of the model's flags (--model, --device, --dtype, --threads)
NO_MODEL = ("report",)


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_takes_a_config_file(verb, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    if verb in NO_MODEL:
        path.write_text("samples: 2\nout: o\n")
        parsed = _parsed([verb, "--config", str(path), "runs/eval"])
        assert parsed["samples"] == 2 and parsed["out"] == "o"
    else:
        path.write_text("device: cpu\nmodel: some/model\n")
        parsed = _parsed([verb, "--config", str(path)] + {"train": ["--out", "o"], "generate": ["Hi"]}.get(verb, []))
        assert parsed["device"] == "cpu" and parsed["model"] == "some/model"
    path.write_text(("samples: 2" if verb in NO_MODEL else "device: cpu") + "\nno_such_flag: 1\n")
    assert main([verb, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"--config {path}: unknown key 'no_such_flag'" in err and err.count("error:") == 1


@pytest.mark.parametrize("text, expect", [
    ("lr: nan\n", "lr: must be a finite number > 0, got 'nan'"),
    ("max_steps: 2.5\n", "max_steps: must be an integer >= 1, got '2.5'"),
    ("loss_weighting: cubic\n", "loss_weighting: must be one of uniform, increasing, got 'cubic'"),
    ("lora: 'yes please'\n", "lora: is a switch, give true or false"),
    ("lr: [1, 2]\n", "lr: takes one value"),
    ("report_to: mlflow\n", "report_to: give none, tensorboard, wandb"),
    ("config: other.yaml\n", "unknown key 'config'"),
    ("- just\n- a list\n", "expected a mapping of flag names to values, got a list"),
    ("lr: [1, 2\n", "malformed YAML"),
])
def test_bad_keys_and_values_in_the_file_exit_2_naming_the_file(text, expect, tmp_path, capsys, monkeypatch):
    import lite.model.loading

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(lite.model.loading, "load_model", no_load)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code = main(["train", "--config", str(path), "--data", "d.jsonl", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"--config {path}" in err and expect in err, err
    assert err.count("error:") == 1 and not (tmp_path / "o").exists()


def test_a_config_file_gives_the_same_training_record_as_the_same_flags(tiny_model_dir, tmp_path):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i} said."} for i in range(12)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "2", "--batch-size", "4",
             "--lora", "--lora-rank", "4", "--lora-alpha", "16", "--lora-dropout", "0.1", "--warmup-ratio", "0.2",
             "--exit-layers", "2,4", "--max-length", "128", "--no-progress-bar", "--lr", "0.01"]
    assert main(["train", *flags, "--out", str(tmp_path / "flags")]) == 0
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: [{data}]\nmax_steps: 2\nbatch_size: 4\nlora: true\n"
                      f"lora_rank: 4\nlora_alpha: 16\nlora_dropout: 0.1\nwarmup_ratio: 0.2\nexit_layers: '2,4'\n"
                      f"max_length: 128\nno_progress_bar: true\nlr: 0.01\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "file")]) == 0
    a, b = (json.loads((tmp_path / d / "lite_config.json").read_text()) for d in ("flags", "file"))
    for cfg in (a, b):
        cfg["training"].pop("train_seconds")
    assert a["training"] == b["training"] and a["data"] == b["data"] and a["exit_layers"] == b["exit_layers"]
    assert a["training"]["lora_alpha"] == 16 and a["training"]["lora_dropout"] == 0.1
    assert a["training"]["warmup_ratio"] == 0.2 and a["training"]["report_to"] == []
    adapter = json.loads((tmp_path / "file" / "adapter_config.json").read_text())
    assert adapter["lora_alpha"] == 16 and adapter["lora_dropout"] == 0.1


# ------------------------------------------------------------------------------------------ --report-to
def test_report_to_a_missing_package_is_refused_naming_it(tmp_path, capsys, monkeypatch):
    import importlib.util

    import lite.model.loading

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX", "wandb") else real(name, *a))
    monkeypatch.setattr(lite.model.loading, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    for target, package in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("none,wandb", None)):
        code = main(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--report-to", target])
        err = capsys.readouterr().err
        assert code == 2 and err.count("error:") == 1
        if package:
            assert f"the '{package}' package is not installed; pip install {package}" in err
        else:
            assert "give none, tensorboard, wandb" in err  # none with another destination


def test_report_to_tensorboard_keeps_the_event_files_with_the_model(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from lite.training import train

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}."}) + "\n" for i in range(8)))
    result = train(str(tiny_model_dir), str(data), tmp_path / "tb", max_steps=2, batch_size=4, logging_steps=1,
                   report_to="tensorboard", show_progress_bar=False)
    events = list((result.output_dir / "runs").rglob("events.out.tfevents.*"))
    assert events and result.lite_config.training["report_to"] == ["tensorboard"]


# ------------------------------------------------------------------------------ one set of flags
SHARED = ("--device", "--dtype", "--threads", "--exit")


def _action(verb: str, flag: str):
    return _verb_parsers()[verb]._option_string_actions.get(flag)


@pytest.mark.parametrize("flag", SHARED)
def test_shared_flags_are_spelled_and_checked_the_same_on_every_verb(flag):
    from dataclasses import fields

    from lite.decoding.spec import ExitOptions

    EXIT_HELP = next(f for f in fields(ExitOptions) if f.name == "exit").metadata["help"]  # defined once

    verbs = [v for v in VERBS if _action(v, flag) is not None]
    with_model = [v for v in VERBS if v not in NO_MODEL]
    assert verbs == with_model if flag != "--exit" else verbs == ["generate", "eval", "serve", "demo"]
    actions = [_action(v, flag) for v in verbs]
    assert len({a.type for a in actions}) == 1 and len({a.metavar for a in actions}) == 1
    assert len({tuple(a.choices or ()) for a in actions}) == 1
    if flag == "--exit":
        assert all(a.help.startswith(EXIT_HELP) for a in actions)
    elif flag != "--dtype":  # --dtype's help names its verb's default
        assert len({a.help for a in actions}) == 1


@pytest.mark.parametrize("verb", list(VERBS))
def test_help_shows_every_default_and_an_example(verb, capsys):
    from lite.cli import _HelpFormatter

    parser = _verb_parsers()[verb]
    formatter = _HelpFormatter(parser.prog)
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"lite {verb} {action.option_strings[0]} has no help"
        if action.default not in (None, False, [], argparse.SUPPRESS):
            assert "default" in formatter._get_help_string(action), (verb, action.option_strings)
    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"example:\n  lite {verb} " in out and "(default: " in out


BAD_VALUES = [
    ("--device", "gpu7", "'gpu7' is not a device"),
    ("--dtype", "float64", "invalid choice: 'float64'"),
    ("--threads", "0", "must be an integer >= 1"),
    ("--exit", "bogus", "'bogus' is not a policy"),
    ("--exit", "static:0", "K (the exit layer) must be an integer >= 1"),
    ("--kv", "sideways", "sideways"),
    ("--threshold-scale", "nan", "got 'nan'"),
    ("--thresholds", "8:2", "thresholds are confidences in [-1, 1]"),
    ("--confidence", "loud", "loud"),
]
REQUIRED = {"train": ["--data", "d.jsonl", "--out", "o"], "generate": ["Hi"]}


def _bad_cases():
    import torch

    cases = list(BAD_VALUES)
    if not torch.cuda.is_available():
        cases.append(("--device", "cuda", "this machine has no cuda device"))
    for verb in VERBS:
        for flag, value, words in cases:
            if _action(verb, flag) is not None:
                yield verb, flag, value, words


@pytest.mark.parametrize("verb, flag, value, words", list(_bad_cases()))
def test_a_bad_shared_flag_is_refused_before_a_model_loads(verb, flag, value, words, tmp_path, capsys, monkeypatch):
    import lite.model.loading

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(lite.model.loading, "load_model", no_load)
    monkeypatch.chdir(tmp_path)
    code = main([verb, *REQUIRED.get(verb, []), flag, value])
    err = capsys.readouterr().err
    assert code == 2, err
    line = [x for x in err.splitlines() if x.startswith("lite")]
    assert len(line) == 1 and flag in line[0] and words in line[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("text, expect", [
    ("own_answers: true\n", True), ("own_answers: false\n", False),
    ("no_own_answers: true\n", False), ("no_own_answers: false\n", True), ("", None),
])
def test_a_yes_no_switch_in_a_file_means_what_it_says(text, expect, tmp_path):
    """--own-answers / --no-own-answers (default: the recipe's): a file's true or false picks the flag."""
    path = tmp_path / "run.yaml"
    path.write_text(text + "data: [d.jsonl]\nout: o\n")
    assert _parsed(["train", "--config", str(path)])["own_answers"] is expect
