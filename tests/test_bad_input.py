"""Bad input, per verb and for the server: one clean refusal, the problem named, no user file touched.

Every case of the matrix builds what it needs under its own folder, snapshots every file there (and the
shared tiny model) by hash, runs ``lite.cli.main([...])`` in-process and asserts: the exit status (2 for a
refusal), one line on stderr naming the problem (and no traceback), and every file that existed before
still there with the same bytes and nothing new written. Families (issue 17): numbers (flags,
``lite_config.json``), unreadable or unsafe files, misleading names, and the server's flags; the HTTP
edge, calibration guard-rails, --seed and the conversion's temporary folders have their own tests below.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lite import LiteConfig
from lite.cli import main
from lite.decoding.gate import LearnedExitGate, save_gate

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
     None),
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
                 "--min-tokens", "20"]) == 0
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
