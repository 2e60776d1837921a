"""Output folders: lite writes only into folders it made (or empty ones) and never loses a user's file."""

import json

import pytest

from lite.cli import main
from lite.errors import LiteError
from lite.files import check_output_folder, remove_own_files

ROWS = [{"instruction": f"Name a colour #{i}.", "input": "", "output": "Blue."} for i in range(12)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_folder(path):
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "plots").mkdir()
    (path / "plots" / "figure.png").write_bytes(b"\x89PNG user")
    (path / "report.md").write_text("# my report")
    return _snapshot(path)


def test_train_never_adopts_a_work_folder_lite_did_not_write(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    before = _user_folder(tmp_path / "run.partial")
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out),
                 "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "holds files lite did not write" in err and "run.partial" in err
    assert _snapshot(tmp_path / "run.partial") == before and not out.exists()


def test_eval_never_overwrites_a_users_report_or_plots(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    before = _user_folder(out)
    testset = tmp_path / "set.jsonl"
    testset.write_text(json.dumps({"id": "1", "prompt": "Hi"}) + "\n")
    code = main(["eval", "--model", str(tiny_model_dir), "--testset", f"mine={testset}", "--exit", "static:2",
                 "--max-new-tokens", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "holds files lite did not write" in err
    assert _snapshot(out) == before


def test_a_crash_before_the_first_checkpoint_does_not_block_the_corrected_command(
        tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "fixed"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out),
            "--max-steps", "1", "--batch-size", "4", "--no-progress-bar", "--lora", "--lora-targets"]
    assert main(argv + ["no_such_module"]) != 0  # fails after lite_run.json is written
    capsys.readouterr()
    assert main(argv + ["q_proj"]) == 0
    assert (out / "adapter_config.json").is_file() and not (tmp_path / "fixed.partial").exists()


@pytest.mark.parametrize("bad, message", [
    ("", "current folder"), (".", "current folder"), ("file", "is a file"), ("locked/sub", "not writable"),
])
def test_bad_output_paths_are_refused_naming_the_flag(bad, message, tmp_path, monkeypatch):
    import os

    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    (tmp_path / "locked").mkdir()
    os.chmod(tmp_path / "locked", 0o500)
    try:
        if bad == "locked/sub" and os.access(tmp_path / "locked", os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(LiteError, match=message) as info:
            check_output_folder(bad, "run.json", "--out")
        assert "--out" in str(info.value)
    finally:
        os.chmod(tmp_path / "locked", 0o700)
    assert (tmp_path / "file").read_text() == "x"


def test_lites_own_folder_and_an_empty_one_are_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty", "run.json") == tmp_path / "empty"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "run.json").write_text("{}")
    assert check_output_folder(tmp_path / "mine", ("lite_run.json", "run.json")) == tmp_path / "mine"
    assert check_output_folder(tmp_path / "new" / "deeper", "run.json") == tmp_path / "new" / "deeper"


def test_cleanup_removes_only_what_lite_wrote(tmp_path):
    work = tmp_path / "w.partial"
    (work / "checkpoint-2").mkdir(parents=True)
    (work / "checkpoint-2" / "x.bin").write_bytes(b"1")
    (work / "lite_run.json").write_text("{}")
    assert remove_own_files(work, ["lite_run.json", "checkpoint-*"]) and not work.exists()
    (work / "checkpoint-4").mkdir(parents=True)
    (work / "user.txt").write_text("mine")
    assert not remove_own_files(work, ["lite_run.json", "checkpoint-*"])
    assert (work / "user.txt").read_text() == "mine" and not (work / "checkpoint-4").exists()


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """A file lite writes atomically is readable by whoever may read a new file there (umask), not private
    to its writer as mkstemp makes it: checkpoints get shared and packaged."""
    import os
    import stat

    from lite.files import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", "{}")
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        os.umask(0o077)
        write_atomic(tmp_path / "b.json", "{}")
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_gate_and_exit_module_files_are_readable_by_others(tmp_path):
    import os
    import stat

    import torch

    from lite.decoding.gate import LearnedExitGate, save_gate
    from lite.model.exit_modules import ExitModules

    old = os.umask(0o022)
    try:
        gate = LearnedExitGate({2: [(torch.zeros(1, 4), torch.zeros(1))]}, {2: 0.5}, hidden=4)
        path = save_gate(gate, tmp_path, "gate.safetensors")
        modules = ExitModules("affine", [2], 4).save(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and stat.S_IMODE(modules.stat().st_mode) == 0o644
