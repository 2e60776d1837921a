"""`lite train` on a tiny random Llama: training lowers the loss, outputs load back, resume, bad input,
and two processes under torchrun."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lite.training.trainer
from lite import load_model
from lite.cli import main
from lite.training import train

ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue.", "status": "ok"},
    {"instruction": "Add.", "input": "2+2", "output": "4", "status": "ok"},
    {"instruction": "Greet.", "input": "", "output": "Hello there!", "status": "ok"},
    {"instruction": "Say no.", "input": "", "output": "No.", "status": "bad"},
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [dict(r, instruction=f"{r['instruction']} #{i}") for i in range(6) for r in ROWS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# these tests are about training the backbone (the paper's recipe); the default recipe: test_train_exits.py
FAST = {"batch_size": 4, "max_length": 320, "logging_steps": 1, "show_progress_bar": False, "save_steps": 100,
        "recipe": "paper"}


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    return train(str(tiny_model_dir), str(data_file), out, max_steps=8, lr=3e-3, filters=["status=ok"], **FAST)


def test_training_lowers_the_loss_and_logs_every_exit(full_run):
    losses = [h["loss"] for h in full_run.log_history if "loss" in h]
    assert len(losses) == 8
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.5  # a clear drop, not noise
    assert sorted(full_run.final_losses) == [1, 2, 3, 4]
    assert all(f"loss_l{k}" in full_run.log_history[0] for k in (1, 2, 3, 4))
    assert full_run.steps == 8 and full_run.resumed_from is None
    assert 0 < full_run.lite_config.training["train_seconds"] < 600  # the run's training minutes are recorded


def test_full_folder_loads_in_transformers_and_lite(full_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = full_run.output_dir
    assert not out.with_name(out.name + ".partial").exists()  # the work folder is gone
    hf = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(hf.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    lm = load_model(out, device="cpu")
    cfg = lm.lite_config
    assert lm.exit_layers == [1, 2, 3, 4] and cfg.loss_weights == [0.25] * 4 and not cfg.adapter
    assert cfg.base_model == str(tiny_model_dir.resolve()) and cfg.training["steps"] == 8
    assert cfg.data["filter"] == {"status": "ok"} and cfg.data["rows_after_filter"] == 18
    assert len(cfg.data["heldout_ids"]) == 1 and cfg.data["sources"][0]["sha256"]


def test_lora_via_cli_saves_an_adapter_peft_and_lite_load(tiny_model_dir, data_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lite.model.loading import quiet_peft_internals

    out = tmp_path / "lora"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out),
                 "--max-steps", "2", "--lora", "--lora-rank", "4", "--lr", "1e-2", "--batch-size", "4",
                 "--max-length", "320", "--no-progress-bar", "--exit-layers", "2,4"])
    assert code == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dir.resolve()) and adapter["r"] == 4
    assert not (out / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    q_before = base.model.layers[0].self_attn.q_proj.weight.clone()
    with quiet_peft_internals():  # peft's own deprecated call, as lite's loader does
        merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, q_before)  # the adapter did learn
    lm = load_model(out, device="cpu")
    assert lm.lite_config.adapter and lm.exit_layers == [2, 4] and lm.lite_config.training["lora_rank"] == 4
    torch.testing.assert_close(lm.model.model.layers[0].self_attn.q_proj.weight,
                               merged.model.layers[0].self_attn.q_proj.weight)


def test_baseline_trains_the_final_layer_only(tiny_model_dir, data_file, tmp_path):
    result = train(str(tiny_model_dir), str(data_file), tmp_path / "base", max_steps=1, baseline=True,
                   gradient_checkpointing=True, **FAST)
    assert result.lite_config.training["gradient_checkpointing"]
    assert sorted(result.final_losses) == [4]
    cfg = result.lite_config
    assert cfg.exit_layers == [1, 2, 3, 4] and cfg.loss_weights == [0.0, 0.0, 0.0, 1.0]
    assert cfg.training["baseline"] and cfg.training["trained_layers"] == [4]


def test_a_failed_run_leaves_no_output_and_the_rerun_resumes(tiny_model_dir, data_file, tmp_path, monkeypatch):
    out = tmp_path / "res"
    work = tmp_path / "res.partial"
    kw = dict(FAST, max_steps=3, save_steps=2)

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(lite.training.trainer, "_save_final", crash)
        with pytest.raises(RuntimeError, match="killed"):
            train(str(tiny_model_dir), str(data_file), out, **kw)
    assert not out.exists() and (work / "checkpoint-3").is_dir() and (work / "checkpoint-2").is_dir()
    spent = json.loads((work / "checkpoint-3" / "lite_train_seconds.json").read_text())["seconds"]
    assert spent > 0
    with pytest.raises(lite.training.TrainError, match="other settings"):
        train(str(tiny_model_dir), str(data_file), out, **dict(kw, lr=1e-3))
    result = train(str(tiny_model_dir), str(data_file), out, **kw)
    assert result.resumed_from.endswith("checkpoint-3") and result.steps == 3
    assert result.lite_config.training["train_seconds"] >= spent  # the clock counts over resumes
    assert (out / "lite_config.json").is_file() and not work.exists()


def test_a_run_begun_by_a_lite_without_checkpoint_markers_resumes_and_keeps_its_checkpoints(
        tiny_model_dir, data_file, tmp_path, monkeypatch):
    """A lite before checkpoint markers wrote none and no unmarked_checkpoints in lite_run.json: its
    checkpoints are resumed from, not taken for torn ones and deleted; a fresh run's unmarked checkpoint is."""
    from lite.training.checkpoints import COMPLETE_FILE
    from lite.training.run_record import UNMARKED

    out, work = tmp_path / "old", tmp_path / "old.partial"
    kw = dict(FAST, max_steps=3, save_steps=2)
    with monkeypatch.context() as m:
        m.setattr(lite.training.trainer, "_save_final", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
        with pytest.raises(RuntimeError, match="killed"):
            train(str(tiny_model_dir), str(data_file), out, **kw)
    record = json.loads((work / "lite_run.json").read_text())
    assert record[UNMARKED] is False  # this lite marks its checkpoints
    # what the older lite left: the same checkpoints without markers, a record without the key
    for name in ("checkpoint-2", "checkpoint-3"):
        (work / name / COMPLETE_FILE).unlink()
    del record[UNMARKED]
    (work / "lite_run.json").write_text(json.dumps(record))
    result = train(str(tiny_model_dir), str(data_file), out, **kw)
    assert result.resumed_from.endswith("checkpoint-3") and result.steps == 3
    # a run this lite began: an unmarked checkpoint is torn, and is not resumed from
    out2, work2 = tmp_path / "new", tmp_path / "new.partial"
    with monkeypatch.context() as m:
        m.setattr(lite.training.trainer, "_save_final", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
        with pytest.raises(RuntimeError, match="killed"):
            train(str(tiny_model_dir), str(data_file), out2, **kw)
    (work2 / "checkpoint-3" / COMPLETE_FILE).unlink()
    result = train(str(tiny_model_dir), str(data_file), out2, **kw)
    assert result.resumed_from.endswith("checkpoint-2")


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", ["missing", "malformed", "fields", "prompt-only", "empty", "exits", "unsorted",
                                  "model"])
def test_bad_input_exits_2_with_one_message_and_no_output(case, tiny_model_dir, data_file, tmp_path, capsys):
    data, model, extra = str(data_file), str(tiny_model_dir), []
    expect = {
        "missing": "nope.jsonl: no such file",
        "malformed": "malformed JSON on line 2",
        "fields": "row 0 (0-based) lacks string field(s) ['instruction']",
        "prompt-only": "p.jsonl: 1 rows have no output (prompt only; the first is row 0, 0-based), but --recipe paper",
        "empty": "no rows left to train on",
        "exits": "--exit-layers [7] out of range",
        "unsorted": "--exit-layers must be strictly increasing",
        "model": "--model no-such-model",
    }[case]
    if case == "missing":
        data = str(tmp_path / "nope.jsonl")
    elif case == "malformed":
        data = _write(tmp_path / "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n')
    elif case == "fields":
        data = _write(tmp_path / "f.jsonl", '{"input": "a", "output": "b"}\n')
    elif case == "prompt-only":  # a row without output: only the model's own answers can train on it
        data = _write(tmp_path / "p.jsonl", '{"instruction": "a", "input": ""}\n')
        extra = ["--recipe", "paper"]
    elif case == "empty":
        extra = ["--filter", "status=missing"]
    elif case == "exits":
        extra = ["--exit-layers", "2,7"]
    elif case == "unsorted":
        extra = ["--exit-layers", "3,2,4"]
    elif case == "model":
        model = "no-such-model"
    out = tmp_path / "out"
    code = main(["train", "--model", model, "--data", data, "--out", str(out), "--max-steps", "1"] + extra)
    err = capsys.readouterr().err
    assert code == 2
    assert expect in err and err.count("error:") == 1
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_existing_output_is_never_overwritten(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and list(out.iterdir()) == []


@pytest.mark.slow  # child processes
def test_torchrun_two_processes(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lite", "train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out),
           "--max-steps", "2", "--batch-size", "2", "--max-length", "320", "--no-progress-bar",
           "--logging-steps", "1", "--recipe", "paper"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "lite_config.json").read_text())
    assert cfg["training"]["world_size"] == 2 and cfg["training"]["steps"] == 2
    log = json.loads((out / "trainer_log.json").read_text())
    # 23 training rows, 2 rows per process per step: an epoch is ceil(23 / 4) = 6 steps with two ranks
    # sharing the data (12 steps for one process), so 2 steps are a third of an epoch
    assert cfg["data"]["rows_train"] == 23 and log[-1]["epoch"] == pytest.approx(2 / 6)
    assert not out.with_name("ddp.partial").exists()


def _conversations(n):
    """Two-turn chat rows, one in eight marked bad (for --filter)."""
    return [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"Name colour #{i}."},
                          {"role": "assistant", "content": f"Colour {i} is blue."},
                          {"role": "user", "content": "And another?"},
                          {"role": "assistant", "content": f"Red, #{i}."}],
             "status": "bad" if i % 8 == 7 else "ok"} for i in range(n)]


def test_training_from_messages_rows_chat_by_default_then_calibrate(tiny_model_dir, tmp_path, capsys):
    from lite.training.data import load_heldout

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _conversations(24)))
    result = train(str(tiny_model_dir), str(data), tmp_path / "chat", max_steps=6, lr=3e-3, filters=["status=ok"],
                   heldout_fraction=0.15, **FAST)
    cfg = result.lite_config
    assert cfg.prompt_format == "chat"  # auto: the tiny tokenizer has a chat template
    assert json.loads((result.output_dir / "lite_config.json").read_text())["prompt_format"] == "chat"
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 6 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert cfg.data["rows_after_filter"] == 21 and len(cfg.data["heldout_ids"]) == 3
    held = load_heldout(cfg)
    assert [e.row_id for e in held] == cfg.data["heldout_ids"] and all(e.trained_turns == [2, 4] for e in held)
    # lite calibrate reads those held-out conversations back
    code = main(["calibrate", "--model", str(result.output_dir), "--min-tokens", "1", "--max-new-tokens", "4"])
    assert code == 0, capsys.readouterr().err
    assert load_model(result.output_dir, device="cpu").lite_config.thresholds


def test_training_from_prompt_completion_rows_and_alpaca_without_a_chat_template(tiny_model_dir, tmp_path):
    import shutil

    from lite.training.data import TokenizedDataset, prepare_data

    plain = [{"prompt": f"Name colour #{i}.", "completion": f"Colour {i} is blue."} for i in range(8)]
    conversational = [{"prompt": [{"role": "user", "content": f"Count to {i}."}],
                       "completion": [{"role": "assistant", "content": " ".join(map(str, range(i)))}]}
                      for i in range(1, 9)]
    data = tmp_path / "pc.json"
    data.write_text(json.dumps(plain + conversational + _conversations(4)))
    result = train(str(tiny_model_dir), str(data), tmp_path / "pc", max_steps=3, lr=3e-3, **FAST)
    assert result.lite_config.prompt_format == "chat" and result.steps == 3
    assert all(math.isfinite(v) for v in result.final_losses.values()) and sorted(result.final_losses) == [1, 2, 3, 4]
    # a model without a chat template trains in the Alpaca format by default, every assistant turn a sequence
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    for name in ("chat_template.jinja", "chat_template.json"):
        (bare / name).unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    said = []
    result = train(str(bare), str(data), tmp_path / "alpaca", max_steps=1, progress=said.append, **FAST)
    assert result.lite_config.prompt_format == "alpaca"
    split = prepare_data(str(data), heldout_fraction=0.05)
    two_turns = sum(1 for e in split.train if len(e.trained_turns) == 2)
    assert two_turns >= 3  # the 4 two-turn rows, less any held out
    sequences = len(split.train) + two_turns
    assert len(TokenizedDataset(split.train, load_model(bare, device="cpu").tokenizer, "alpaca", 320)) == sequences
    assert any(f"on {sequences} sequences from {len(split.train)} rows" in line for line in said)


def test_an_unfinished_run_of_an_older_lite_still_resumes():
    """Settings a newer lite records at their default (report_to [], lora_dropout None) do not make the run
    recorded in <out>.partial/lite_run.json by an older lite look different; set ones do."""
    from lite.training.run_record import as_recorded_by_older_lite as older

    recorded = {"model": "m", "training": {"lr": 0.1, "lora": False}}
    now = {"model": "m", "training": {"lr": 0.1, "lora": False, "report_to": [], "lora_dropout": None}}
    assert older(now, recorded) == recorded
    assert older(dict(now, training=dict(now["training"], report_to=["wandb"])), recorded) != recorded
    assert older(dict(now, training=dict(now["training"], lr=0.2)), recorded) != recorded


# Responses of equal token counts: the mean of two processes' per-token means is then the one-process mean,
# so the two runs see the same loss and gradients up to float rounding.
EQUAL_ROWS = [{"instruction": f"Say number {i:02d}.", "input": "", "output": f"Number {i:02d} said."}
              for i in range(24)]


@pytest.mark.slow  # child processes
def test_fsdp_two_processes_match_one_process(tiny_model_dir, tmp_path):
    """lite train --fsdp under torchrun, 2 CPU processes (gloo), against one process on the same global
    batch: same losses step by step, same weights. accelerate keeps DDP on CPUs; tests/fsdp_cpu.py lifts
    only that gate, the sharding, Trainer's FSDP checkpoint (step 2) and the gathered final save are real."""
    from safetensors.torch import load_file

    data = tmp_path / "equal.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in EQUAL_ROWS))
    one = train(str(tiny_model_dir), str(data), tmp_path / "one", max_steps=3, lr=1e-2, batch_size=4,
                max_length=128, logging_steps=1, show_progress_bar=False, recipe="paper")
    out = tmp_path / "fsdp"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    launcher = str(Path(__file__).with_name("fsdp_cpu.py"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", launcher,
           "train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--fsdp",
           "--max-steps", "3", "--lr", "0.01", "--batch-size", "2", "--max-length", "128", "--logging-steps", "1",
           "--save-steps", "2", "--no-progress-bar"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "lite_config.json").read_text())["training"]
    assert cfg["world_size"] == 2 and cfg["steps"] == 3
    assert cfg["fsdp"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"] and cfg["fsdp"]["version"] == 2
    sharded = [h["loss"] for h in json.loads((out / "trainer_log.json").read_text()) if "loss" in h]
    single = [h["loss"] for h in one.log_history if "loss" in h]
    assert len(sharded) == len(single) == 3
    assert sharded == pytest.approx(single, rel=1e-4)
    assert single[0] != pytest.approx(single[2], rel=1e-3)  # the weights did move
    a, b = load_file(one.output_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b)  # the tied head is not saved twice
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert not out.with_name("fsdp.partial").exists()


@pytest.mark.parametrize("world, extra, words", [
    ("1", [], "--fsdp shards the model over several processes: start lite train under torchrun"),
    ("2", ["--exit-modules", "affine"], "--exit-modules trains a few MB on a frozen one"),
    ("2", ["--targets", "distill"], "--fsdp with --targets distill"),
])
def test_fsdp_refusals_come_before_the_model_loads(world, extra, words, tmp_path, capsys, monkeypatch):
    import lite.model.loading

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(lite.model.loading, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    data = tmp_path / "equal.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in EQUAL_ROWS))
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--fsdp", *extra])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("error:") == 1 and not (tmp_path / "o").exists()
