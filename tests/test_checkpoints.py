"""Portable checkpoints: an adapter names its base as Hugging Face tools do, the embedded default sits in the
HF cache under its hub id, and checkpoint folders carry a model card and a generation config."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lite import load_model
from lite.cli import main
from lite.model.card import MARK, write_model_card
from lite.model.config import LiteConfig
from lite.model.hub_cache import cached_snapshot, place_in_hub_cache
from lite.model.loading import DEFAULT_HUB_ID, DEFAULT_MODEL, hub_id_for, resolve_model

ROWS = [{"instruction": f"Name colour {i}.", "input": "", "output": "Blue.", "status": "ok"} for i in range(12)]
IDS = [[5, 17, 42, 99, 3, 7]]


@pytest.fixture
def default_is_tiny(tiny_model_dir, tmp_path, monkeypatch):
    """$LITE_HOME whose converted embedded default is the tiny model (so no GGUF conversion runs)."""
    home = tmp_path / "lite-home"
    shutil.copytree(tiny_model_dir, home / "models" / DEFAULT_MODEL)
    monkeypatch.setenv("LITE_HOME", str(home))
    return home / "models" / DEFAULT_MODEL


def test_the_embedded_default_is_placed_in_the_hf_cache_once(default_is_tiny):
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    assert cached_snapshot(DEFAULT_HUB_ID) is None
    assert resolve_model(DEFAULT_MODEL) == str(default_is_tiny)
    snapshot = cached_snapshot(DEFAULT_HUB_ID)
    assert snapshot is not None and str(snapshot).startswith(constants.HF_HUB_CACHE)  # the test's own cache
    weights = snapshot / "model.safetensors"
    assert os.path.samefile(weights, default_is_tiny / "model.safetensors")  # a hard link, no second copy
    card = (snapshot / "README.md").read_text()
    assert "license: apache-2.0" in card and "dequantised" in card
    assert not (default_is_tiny / "README.md").exists()  # the card goes to the cache, lite's folder is untouched
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_HUB_ID, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(default_is_tiny)
    assert torch.equal(hf(torch.tensor(IDS)).logits, base(torch.tensor(IDS)).logits)
    revision = (snapshot.parent.parent / "refs" / "main").read_text()
    resolve_model(DEFAULT_MODEL)  # a second use changes nothing
    assert (snapshot.parent.parent / "refs" / "main").read_text() == revision
    assert sorted(p.name for p in snapshot.parent.iterdir()) == [revision]  # no temporary left


def test_an_entry_already_in_the_cache_is_never_replaced(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    repo = cache / "models--owner--model"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    assert place_in_hub_cache(tiny_model_dir, "owner/model", cache=cache) is None
    assert (repo / "refs" / "main").read_text() == "abc" and os.listdir(repo / "snapshots") == ["abc"]
    assert hub_id_for(DEFAULT_MODEL) == DEFAULT_HUB_ID and hub_id_for("/some/folder") == "/some/folder"


@pytest.mark.slow  # child processes
def test_a_lora_checkpoint_of_the_default_loads_with_peft_offline(default_is_tiny, tmp_path):
    """The acceptance test: `lite train --lora` on the embedded default, then peft alone, in a fresh process
    with HF_HUB_OFFLINE=1, loads the adapter over its base named by hub id, and computes what lite does."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "lora"
    code = main(["train", "--model", DEFAULT_MODEL, "--data", str(data), "--out", str(out), "--max-steps", "2",
                 "--lora", "--lora-rank", "4", "--lr", "1e-2", "--batch-size", "4", "--max-length", "320",
                 "--no-progress-bar", "--exit-layers", "2,4"])
    assert code == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == DEFAULT_HUB_ID
    assert LiteConfig.load(out).base_model == DEFAULT_MODEL  # lite's own record keeps its alias
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    card = (out / "README.md").read_text()
    assert MARK in card and "[More Information Needed]" not in card  # not peft's empty template
    assert f"base_model: {DEFAULT_HUB_ID}" in card and "license: apache-2.0" in card
    assert "exit layers [2, 4]" in card and str(data) in card and "loss at layer 2" in card
    assert "# lora\n" in card and "AutoPeftModelForCausalLM.from_pretrained(\"lora\")" in card
    lm = load_model(out, dtype="float32", device="cpu")
    with torch.no_grad():
        expected = lm.model(torch.tensor(IDS)).logits[0, -1]
    script = (
        "import json, torch\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoPeftModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"AutoModelForCausalLM.from_pretrained({DEFAULT_HUB_ID!r})\n"
        f"print(json.dumps(model(torch.tensor({IDS})).logits[0, -1].tolist()))\n"
    )
    from huggingface_hub import constants

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_CACHE=constants.HF_HUB_CACHE,
               HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = torch.tensor(json.loads(run.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # lite merges the adapter, peft does not


def test_the_card_follows_the_folder_and_keeps_a_readme_lite_did_not_write(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    cfg = LiteConfig.default_for(4, base_model="/models/base", loss_weights=[0.25] * 4,
                                 training={"steps": 8, "lr": 3e-3, "batch_size": 4, "baseline": False})
    cfg.save(folder)
    (folder / "trainer_log.json").write_text(json.dumps([{"loss": 2.0, "loss_l1": 3.5, "loss_l4": 1.25}, {"epoch": 1}]))
    card = write_model_card(folder).read_text()
    assert "A full fine-tune of `/models/base`" in card and "library_name: transformers" in card
    assert "loss at layer 1 3.500, loss at layer 4 1.250" in card and "| lr | 0.003 |" in card
    assert "Not calibrated yet" in card and "license:" not in card  # an unknown licence is not invented
    cfg.thresholds, cfg.confidence = {"1": 0.75, "2": 0.5, "3": 0.25}, "max_prob"
    cfg.calibration = {"agreement": {"1": 0.3, "2": 0.5, "3": 0.8}}
    cfg.save(folder)
    card = write_model_card(folder).read_text()  # rewritten: it is lite's own
    assert "Calibrated max_prob thresholds: 1: 0.750, 2: 0.500, 3: 0.250" in card and "3: 80%" in card
    (folder / "README.md").write_text("# my own card\n")
    assert write_model_card(folder) is None and (folder / "README.md").read_text() == "# my own card\n"


def test_saving_an_adapter_without_a_network_prints_no_peft_warning(default_is_tiny, tmp_path, monkeypatch):
    """Online mode on a machine without network: peft's save probes the hub for the base named by hub id,
    fails, and would print a UserWarning of its own in the middle of `lite train --lora`; lite hides it."""
    import warnings

    import peft.utils.other as peft_other

    def unreachable(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(peft_other, "file_exists", unreachable)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code = main(["train", "--model", DEFAULT_MODEL, "--data", str(data), "--out", str(tmp_path / "lora"),
                     "--max-steps", "1", "--lora", "--lora-rank", "4", "--batch-size", "4", "--max-length",
                     "320", "--no-progress-bar", "--exit-layers", "2,4"])
    assert code == 0
    assert not [w for w in seen if "Unable to fetch remote file" in str(w.message)]
