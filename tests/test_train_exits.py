"""Stronger exits (SPEC §7): exit modules on a frozen backbone, self-distillation, the model's own answers."""

import json

import pytest
import torch

from lite import load_model
from lite.cli import main
from lite.decoding import ExitPolicy, GenerationSettings, generate
from lite.model.exit_modules import EXIT_MODULES_FILE
from lite.training import TrainError, train
from lite.training.own_answers import ANSWERS_FILE

ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add.", "input": "2+2", "output": "4"},
    {"instruction": "Greet.", "input": "", "output": "Hello there!"},
]
FAST = {"batch_size": 4, "max_length": 200, "logging_steps": 1, "show_progress_bar": False, "save_steps": 100}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [dict(r, instruction=f"{r['instruction']} #{i}") for i in range(8) for r in ROWS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def module_run(tiny_model_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("modules") / "out"
    # from the raw exits (not the default closed-form fit, which on this tiny model starts at KL ~1e-4): what
    # is tested here is that training moves them toward the final layer
    return train(str(tiny_model_dir), str(data_file), out, max_steps=12, lr=1e-2, exit_modules="affine",
                 exit_init="identity", targets="distill", own_answers=True, own_answer_tokens=12,
                 exit_layers="1,2,3,4", **FAST)


def test_exit_modules_run_writes_only_modules_and_lowers_the_kl(module_run):
    out = module_run.output_dir
    assert (out / EXIT_MODULES_FILE).is_file() and not (out / "model.safetensors").exists()
    assert not (out / "adapter_config.json").exists()
    history = [h for h in module_run.log_history if "kl_l1" in h]
    assert history[-1]["kl_l1"] < history[0]["kl_l1"]  # the exit moved toward the final layer
    assert sorted(module_run.final_losses) == [1, 2, 3]  # L has no module and is not trained
    cfg = json.loads((out / "lite_config.json").read_text())
    assert cfg["exit_modules"] == "affine" and cfg["training"]["targets"] == "distill"
    assert cfg["training"]["responses"] == "own answers"
    assert cfg["provenance"]["own_answers"]["rows"] > 0


def test_exit_modules_load_over_the_untouched_backbone(module_run, tiny_model_dir):
    lm = load_model(module_run.output_dir, device="cpu")
    base = load_model(tiny_model_dir, device="cpu")
    assert lm.exit_modules is not None and lm.exit_modules.layers == [1, 2, 3]
    for name, p in base.model.state_dict().items():  # the backbone is bit-identical
        assert torch.equal(lm.model.state_dict()[name], p), name
    prompt = [5, 17, 42, 99, 3]
    settings = GenerationSettings(max_new_tokens=8)
    full = generate(lm, prompt, ExitPolicy(kind="none"), settings).token_ids
    assert full == generate(base, prompt, ExitPolicy(kind="none"), settings).token_ids
    h = torch.randn(2, lm.hidden_size)
    assert not torch.allclose(lm.exit_logits(h, 1), base.exit_logits(h, 1))  # the modules learned


def test_own_answers_are_the_models_greedy_answers(module_run, tiny_model_dir):
    """The cached answers are what the starting model generates, token for token, cut after EOS."""
    from lite.model.prompts import encode_prompt
    from lite.training.data import read_examples

    cache = module_run.output_dir.with_name(module_run.output_dir.name + ".partial") / ANSWERS_FILE
    assert not cache.exists()  # the work folder is gone after a finished run; answers are re-made below
    lm = load_model(tiny_model_dir, device="cpu")
    from lite.training.own_answers import generate_own_answers

    rows = read_examples([str(module_run.lite_config.data["sources"][0]["path"])])[0][:3]
    answered, prov = generate_own_answers(lm, rows, prompt_format="alpaca", cache=cache, max_new_tokens=6,
                                          batch_size=2)
    for row in answered:
        ids = encode_prompt(lm.tokenizer, row.instruction, row.input, "alpaca")
        alone = generate(lm, ids, ExitPolicy(kind="none"), GenerationSettings(max_new_tokens=6)).token_ids
        assert list(row.response_ids) == alone
    assert prov["rows"] == 3 and len(cache.read_text().splitlines()) == 3
    again, _ = generate_own_answers(lm, rows, prompt_format="alpaca", cache=cache, max_new_tokens=6)
    assert again == answered and len(cache.read_text().splitlines()) == 3  # read back, not regenerated


@pytest.mark.parametrize("lora", [True, False])
def test_distill_targets_train_a_backbone_toward_its_starting_self(tiny_model_dir, data_file, tmp_path, lora):
    result = train(str(tiny_model_dir), str(data_file), tmp_path / "d", max_steps=3, lr=1e-2, lora=lora,
                   lora_rank=4, targets="mixed", ce_weight=0.3, exit_layers="2,4", recipe="paper", **FAST)
    last = [h for h in result.log_history if "kl_l2" in h][-1]
    assert {"kl_l2", "kl_l4", "loss_l2", "loss_l4"} <= set(last)
    assert last["kl_l4"] < 0.5  # the final layer stays near its teacher, itself before training
    assert result.lite_config.training["targets"] == "mixed"


@pytest.mark.parametrize("argv, message", [
    (["--exit-modules", "affine", "--lora"], "leave out --lora"),
    (["--recipe", "exit-modules", "--lora"], "use --recipe paper"),
    (["--recipe", "exit-modules", "--baseline"], "use --recipe paper"),
    (["--recipe", "lite"], "invalid choice"),
    (["--targets", "teacher"], "invalid choice"),
    (["--ce-weight", "1.5", "--targets", "mixed"], "--ce-weight"),
    (["--own-answers", "--own-answer-tokens", "0"], "--own-answer-tokens"),
])
def test_bad_exit_training_flags_are_refused(argv, message, tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "bad"
    # argparse's refusals too: main returns the exit status instead of raising SystemExit
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not out.with_name("bad.partial").exists()


def test_cached_answers_are_cut_or_regenerated_for_another_budget(tiny_model_dir, tmp_path):
    """A greedy answer's first n tokens are the n-token greedy answer: a smaller budget cuts the cache; a
    larger one regenerates the answers that were cut (and only those)."""
    from lite.model.prompts import encode_prompt
    from lite.training.data import Example
    from lite.training.own_answers import generate_own_answers

    lm = load_model(tiny_model_dir, device="cpu")
    rows = [Example(f"0:{i}", f"Say something #{i}.", "", "x") for i in range(3)]
    cache = tmp_path / ANSWERS_FILE

    def alone(row, n):
        ids = encode_prompt(lm.tokenizer, row.instruction, row.input, "alpaca")
        return generate(lm, ids, ExitPolicy(kind="none"), GenerationSettings(max_new_tokens=n)).token_ids

    generate_own_answers(lm, rows, prompt_format="alpaca", cache=cache, max_new_tokens=6)
    short, _ = generate_own_answers(lm, rows, prompt_format="alpaca", cache=cache, max_new_tokens=3)
    assert [list(r.response_ids) for r in short] == [alone(r, 3) for r in rows]
    assert len(cache.read_text().splitlines()) == 3  # nothing generated for the cut
    longer, _ = generate_own_answers(lm, rows, prompt_format="alpaca", cache=cache, max_new_tokens=9)
    assert [list(r.response_ids) for r in longer] == [alone(r, 9) for r in rows]


def test_a_shared_answers_cache_outlives_the_run_and_serves_the_next(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """--own-answers-cache FILE: the answers stay after the run (the work folder's copy does not) and a
    second run on the same rows reads them instead of generating again."""
    import lite.training.own_answers as own

    cache = tmp_path / "answers.jsonl"
    kw = dict(max_steps=1, lr=1e-2, exit_modules="affine", targets="distill", own_answers=True,
              own_answer_tokens=6, exit_layers="2,4", own_answers_cache=str(cache), **FAST)
    train(str(tiny_model_dir), str(data_file), tmp_path / "a", **kw)
    lines = cache.read_text().splitlines()
    assert len(lines) == len({json.loads(line)["row_id"] for line in lines}) > 0
    calls = []
    real = own.hf_generate_batch
    monkeypatch.setattr(own, "hf_generate_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = train(str(tiny_model_dir), str(data_file), tmp_path / "b", **kw)
    assert calls == [] and cache.read_text().splitlines() == lines  # read back, nothing generated
    assert result.lite_config.training["responses"] == "own answers"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(tmp_path / "c"),
                 "--own-answers", "--own-answers-cache", str(tmp_path)])
    assert code == 2 and not (tmp_path / "c.partial").exists()


def test_snapshots_keep_the_modules_every_few_minutes_of_training(tiny_model_dir, data_file, tmp_path):
    """--snapshot-minutes: a loadable copy of the modules at each checkpoint after a boundary of the training
    clock (here every checkpoint: the period is tiny), with its steps and seconds; the last is the output."""
    out = tmp_path / "out"
    fast = dict(FAST, save_steps=4)
    train(str(tiny_model_dir), str(data_file), out, max_steps=8, lr=1e-2, exit_modules="affine",
          targets="distill", exit_layers="1,2,3,4", snapshot_minutes=1e-6, **fast)
    snaps = sorted((tmp_path / "out.snapshots").iterdir())
    assert [s.name for s in snaps] == ["step-000004", "step-000008"]
    steps = [json.loads((s / "lite_config.json").read_text())["training"] for s in snaps]
    assert [t["steps"] for t in steps] == [4, 8] and 0 < steps[0]["train_seconds"] < steps[1]["train_seconds"]
    first, last, final = (load_model(f, device="cpu") for f in (*snaps, out))
    h = torch.randn(2, final.hidden_size)
    assert torch.equal(last.exit_logits(h, 1), final.exit_logits(h, 1))  # step 8 is the finished run
    assert not torch.allclose(first.exit_logits(h, 1), final.exit_logits(h, 1))  # step 4 is earlier
    with pytest.raises(TrainError, match="needs --exit-modules or --lora"):
        train(str(tiny_model_dir), str(data_file), tmp_path / "full", max_steps=2, recipe="paper",
              snapshot_minutes=5, **FAST)


def test_snapshots_of_a_lora_run_keep_the_adapter(tiny_model_dir, data_file, tmp_path):
    """A LoRA run's snapshots hold its adapter as it was (a loadable model over the same base): the last is
    the finished output, an earlier one differs."""
    out = tmp_path / "out"
    train(str(tiny_model_dir), str(data_file), out, max_steps=4, lr=5e-2, lora=True, lora_rank=2,
          lora_targets="q_proj,v_proj", exit_layers="2,4", snapshot_minutes=1e-6, **dict(FAST, save_steps=2))
    snaps = sorted((tmp_path / "out.snapshots").iterdir())
    assert [s.name for s in snaps] == ["step-000002", "step-000004"]
    assert all((s / "adapter_model.safetensors").is_file() and not (s / "model.safetensors").exists()
               for s in snaps)
    first, last, final = (load_model(f, device="cpu") for f in (*snaps, out))
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        logits = [m.model(ids).logits for m in (first, last, final)]
    assert torch.equal(logits[1], logits[2])  # step 4 is the finished run
    assert not torch.allclose(logits[0], logits[2])  # step 2 is earlier


def test_max_minutes_ends_training_on_the_clock_and_says_so(tiny_model_dir, data_file, tmp_path):
    """--max-minutes: training stops once the run's training clock reaches the budget, although more steps
    were planned; the output is written as usual and lite_config.json records why it stopped."""
    out = tmp_path / "out"
    result = train(str(tiny_model_dir), str(data_file), out, max_steps=500, lr=1e-2, exit_modules="affine",
                   targets="distill", exit_layers="1,2,3,4", max_minutes=1e-6, **FAST)
    training = json.loads((out / "lite_config.json").read_text())["training"]
    assert result.steps == training["steps"] == 1 and training["stopped_by_max_minutes"] is True
    assert training["max_minutes"] == 1e-6 and (out / EXIT_MODULES_FILE).is_file()
    assert "kl_l1" in result.log_history[-2]  # the last step was logged
    with pytest.raises(TrainError, match="--max-minutes must be a finite number > 0"):
        train(str(tiny_model_dir), str(data_file), tmp_path / "x", max_steps=2, max_minutes=float("nan"), **FAST)


def _count_backbone_forwards(monkeypatch) -> list[int]:
    from lite.training import hf_trainer

    calls: list[int] = []
    forward = hf_trainer.FrozenBackbone.forward

    def counted(self, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return forward(self, **kwargs)

    monkeypatch.setattr(hf_trainer.FrozenBackbone, "forward", counted)
    return calls


def _sequences_in(steps: int, rows: int, batch_size: int) -> int:
    """How many sequences ``steps`` steps go through, epochs of ``rows`` in batches (the last one short)."""
    per_epoch = -(-rows // batch_size)
    return steps // per_epoch * rows + steps % per_epoch * batch_size


def test_state_cache_skips_the_frozen_backbone_after_the_first_epoch(tiny_model_dir, data_file, tmp_path,
                                                                     monkeypatch):
    """Exit modules on a frozen backbone: the backbone runs each sequence alone (its states never depend on
    its batch), once per sequence with the cache, so epochs after the first never run it; and the cache
    changes no number: the modules and the logged losses are bitwise those of a run without it."""
    kw = dict(max_steps=12, lr=1e-2, exit_modules="affine", targets="mixed", exit_layers="1,2,3,4", **FAST)
    calls = _count_backbone_forwards(monkeypatch)
    cached = train(str(tiny_model_dir), str(data_file), tmp_path / "cached", **kw)
    with_cache = list(calls)
    calls.clear()
    plain = train(str(tiny_model_dir), str(data_file), tmp_path / "plain", state_cache_gb=0, **kw)
    trained = plain.lite_config.data["rows_train"]
    assert set(calls) == {1} and len(calls) == _sequences_in(12, trained, FAST["batch_size"])  # every time
    assert set(with_cache) == {1} and len(with_cache) == trained < len(calls)  # the first epoch only
    a, b = (load_model(r.output_dir, device="cpu") for r in (cached, plain))
    for name, p in a.exit_modules.state_dict().items():
        assert torch.equal(p, b.exit_modules.state_dict()[name]), name
    losses = [[h[k] for k in sorted(h) if k.startswith(("loss", "kl_l"))] for h in plain.log_history]
    assert losses == [[h[k] for k in sorted(h) if k.startswith(("loss", "kl_l"))] for h in cached.log_history]


def test_state_cache_over_its_limit_computes_the_rest(tiny_model_dir, data_file, tmp_path, monkeypatch):
    calls = _count_backbone_forwards(monkeypatch)
    said: list[str] = []
    result = train(str(tiny_model_dir), str(data_file), tmp_path / "out", max_steps=8, lr=1e-2,
                   exit_modules="affine", targets="distill", exit_layers="1,2,3,4", state_cache_gb=1e-12,
                   progress=said.append, **FAST)
    trained = result.lite_config.data["rows_train"]
    assert len(calls) == _sequences_in(8, trained, FAST["batch_size"])
    assert any("cache is full" in s and "--state-cache-gb" in s for s in said)
    with pytest.raises(TrainError, match="--state-cache-gb must be a finite number >= 0"):
        train(str(tiny_model_dir), str(data_file), tmp_path / "x", max_steps=2, exit_modules="affine",
              state_cache_gb=-1, **FAST)


def test_the_default_recipe_is_exit_modules_and_the_papers_is_one_flag_away(tiny_model_dir, data_file, tmp_path):
    """lite train with no recipe flags trains affine exit modules by self-distillation on the model's own
    answers (the comparison's choice); --recipe paper is the paper's LITE (the backbone, CE on the data);
    --lora or --baseline mean the paper's recipe; any single flag still overrides its recipe's value."""
    kw = dict(max_steps=1, lr=1e-2, exit_layers="2,4", own_answer_tokens=4, **FAST)
    runs = {
        "default": train(str(tiny_model_dir), str(data_file), tmp_path / "default", **kw),
        "paper": train(str(tiny_model_dir), str(data_file), tmp_path / "paper", recipe="paper", **kw),
        "lora": train(str(tiny_model_dir), str(data_file), tmp_path / "lora", lora=True, lora_rank=2, **kw),
        "mlp": train(str(tiny_model_dir), str(data_file), tmp_path / "mlp", exit_modules="mlp",
                     own_answers=False, **kw),
    }
    seen = {name: (r.lite_config.exit_modules, r.lite_config.training["targets"], r.lite_config.training["responses"],
                   r.lite_config.adapter) for name, r in runs.items()}
    assert seen == {
        "default": ("affine", "distill", "own answers", False),
        "paper": (None, "data", "dataset", False),
        "lora": (None, "data", "dataset", True),
        "mlp": ("mlp", "distill", "dataset", False),
    }
    assert (runs["default"].output_dir / EXIT_MODULES_FILE).is_file()
    assert (runs["paper"].output_dir / "model.safetensors").is_file()


def test_prompt_only_rows_train_on_own_answers_and_the_papers_recipe_refuses_them(tiny_model_dir, data_file,
                                                                                  tmp_path, capsys):
    """Rows without outputs are trained on with the model's own answers; a recipe that trains on the data's
    responses refuses them, naming the file; --heldout-from keeps another run's held-out rows."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"Tell me a fact #{i}."}) + "\n" for i in range(6)))
    kw = dict(max_steps=1, lr=1e-2, exit_layers="2,4", own_answer_tokens=4, **FAST)
    first = train(str(tiny_model_dir), str(data_file), tmp_path / "first", **kw)
    run = train(str(tiny_model_dir), [str(data_file), str(prompts)], tmp_path / "own",
                heldout_from=str(first.output_dir), **kw)
    cfg = run.lite_config
    assert cfg.data["heldout_ids"] == first.lite_config.data["heldout_ids"]
    assert cfg.data["heldout_from"] == str(first.output_dir.resolve())
    assert cfg.provenance["own_answers"]["rows"] == cfg.data["rows_train"] == 24 - 1 + 6
    for argv in (["--recipe", "paper"], ["--no-own-answers"]):
        out = tmp_path / f"refused{len(argv)}"
        code = main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), str(prompts),
                     "--out", str(out), "--max-steps", "1", *argv])
        assert code == 2
        err = capsys.readouterr().err
        assert f"{prompts.resolve()}: 6 rows have no output" in err and "--own-answers" in err
        assert not out.with_name(out.name + ".partial").exists()


def test_prompts_longer_than_max_length_get_no_answer(tiny_model_dir, tmp_path, monkeypatch):
    """A prompt of --max-length tokens or more would keep none of its answer: it is not generated, its row
    is dropped by tokenisation (and counted); the others are answered as before."""
    import lite.training.own_answers as own
    from lite.training.data import Example, TokenizedDataset, prompt_ids

    lm = load_model(tiny_model_dir, device="cpu")
    rows = [Example("0:0", "Hi.", "", "x"), Example("0:1", "word " * 80, "", "x")]
    limit = len(prompt_ids(lm.tokenizer, rows[1], "alpaca"))
    seen = []
    real = own.hf_generate_batch
    monkeypatch.setattr(own, "hf_generate_batch", lambda lm_, prompts, *a, **k: seen.append(len(prompts)) or
                        real(lm_, prompts, *a, **k))
    answered, prov = own.generate_own_answers(lm, rows, prompt_format="alpaca", cache=tmp_path / ANSWERS_FILE,
                                              max_new_tokens=4, max_length=limit, batch_size=4)
    assert seen == [1] and answered[1].response_ids == () and len(answered[0].response_ids) > 0
    assert prov["rows_prompt_too_long"] == 1
    assert TokenizedDataset(answered, lm.tokenizer, "alpaca", max_length=limit).dropped == 1


def test_final_weight_gives_layer_L_its_share_of_the_loss(tiny_model_dir, data_file, tmp_path):
    """--final-weight W: layer L weighs W, the exits share 1 - W by --loss-weighting (recorded in
    lite_config.json); refused where layer L has no loss to weigh."""
    result = train(str(tiny_model_dir), str(data_file), tmp_path / "w", max_steps=1, lora=True, lora_rank=2,
                   lora_targets="q_proj,v_proj", targets="distill", exit_layers="1,2,4", final_weight=0.6,
                   loss_weighting="increasing", **FAST)
    weights = dict(zip(result.lite_config.exit_layers, result.lite_config.loss_weights))
    assert weights == pytest.approx({1: 0.4 / 3, 2: 0.8 / 3, 4: 0.6})
    assert result.lite_config.training["final_weight"] == 0.6
    with pytest.raises(TrainError, match="--final-weight"):
        train(str(tiny_model_dir), str(data_file), tmp_path / "m", max_steps=1, exit_modules="affine",
              final_weight=0.5, **FAST)
    with pytest.raises(TrainError, match=r"--final-weight must be in \[0, 1\)"):
        train(str(tiny_model_dir), str(data_file), tmp_path / "x", max_steps=1, lora=True, final_weight=1.0, **FAST)
