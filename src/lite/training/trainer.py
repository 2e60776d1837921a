"""LITE instruction tuning on Hugging Face Trainer: :func:`train`, in four steps.

:func:`train` takes a :class:`lite.training.config.TrainConfig` (checked and resolved first: the recipe's
choices filled in) and runs:

1. :func:`_prepare`, data and model: the output and work folders; the rows and the held-out split
   (:mod:`lite.training.data`); the model (:func:`lite.load_model`) and its exit layers; the model's own
   answers when the run trains on them (:mod:`lite.training.own_answers`); the tokenised rows; the run's
   record (``lite_run.json``) and the checkpoint it resumes from.
2. :func:`_wrap`, what Trainer trains: exit modules on the frozen backbone, or a frozen teacher for
   distillation, and a LoRA adapter (peft) when asked; the ``LiteConfig`` the output carries.
3. :func:`_make_trainer`, the training arguments: ``TrainingArguments``, lite's callbacks and the exit-loss
   Trainer of :mod:`lite.training.hf_trainer`, whose ``compute_loss`` runs the model once for its hidden
   states (no full-vocab logits) and applies :func:`lite.training.losses.lite_loss`; per-layer losses are
   logged as ``loss_l<k>``. Trainer does the rest: optimiser, cosine schedule, gradient accumulation, bf16
   autocast, gradient checkpointing, progress bar, checkpoints, resume, and several processes when started
   by ``torchrun`` (gloo on CPU).
4. :func:`_finish`: train, then rank 0 writes an ordinary Hugging Face folder (full weights, the LoRA adapter
   or the exit modules, plus the tokenizer) and ``lite_config.json``.

Atomic output: everything happens in the sibling folder ``<out>.partial/`` (Trainer checkpoints live
there); the finished model is written to ``<out>.partial/final`` and renamed to ``<out>`` at the very end,
then the work folder is removed. A killed run leaves only ``<out>.partial/``; re-running the same command
resumes from its last checkpoint. ``<out>`` itself exists only when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..files import check_output_folder, check_writable, remove_own_files, write_json_atomic
from ..model.config import CONFIG_NAME, LiteConfig, loss_weights, parse_exit_layers
from .checkpoints import complete_callback, is_final, log_at_checkpoints_callback
from .config import DEFAULT_LORA_TARGETS, TrainConfig, TrainError, report_destinations, world_size
from .data import IndexedDataset, PadCollator, TokenizedDataset, prepare_data
from .fsdp import fsdp_config
from .hf_trainer import (
    FrozenBackbone,
    StateCache,
    checkpointing_args,
    lite_trainer_class,
    make_teacher,
    process_rank,
    snapshot_callback,
    snapshot_folder,
    time_budget_callback,
    train_clock_callback,
)
from .own_answers import ANSWERS_FILE, generate_own_answers
from .run_record import (
    EXIT_FIT_FILE,
    RUN_FILE,
    WORK_FILES,
    claim_work_folder,
    finished_record,
    portable_model_spec,
    run_record,
)


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        output_dir: the finished model folder (``--out``).
        steps: optimiser steps done in total (including steps before a resume).
        final_losses: last logged mean loss per exit layer ({layer: nats per response token}).
        final_loss: last logged weighted total loss.
        resumed_from: the checkpoint training resumed from, or None.
        lite_config: the configuration saved as ``lite_config.json``.
    """

    output_dir: Path
    steps: int
    final_losses: dict[int, float]
    final_loss: float | None
    resumed_from: str | None
    lite_config: LiteConfig
    log_history: list[dict[str, Any]] = field(default_factory=list)


def train(config: TrainConfig | str | None = None, data: list[str] | str | None = None,
          out: str | os.PathLike[str] | None = None, *, progress: Callable[[str], None] | None = None,
          show_progress_bar: bool = True, **options: Any) -> TrainResult:
    """LITE instruction tuning (or the final-layer baseline), full, LoRA or exit modules; see the module docstring.

    ``train(TrainConfig(...))``; or the keyword form, ``train(model, data, out, max_steps=..., ...)``, which
    builds the same :class:`lite.training.config.TrainConfig` from the same names (documented there).

    Args:
        config: the run; in the keyword form, the base model (``TrainConfig.model``).
        data, out, options: the keyword form's other fields; none of them beside a TrainConfig.
        progress: called with status lines. show_progress_bar: Trainer's tqdm bar.

    Raises:
        TrainError: an unusable option, output folder or unfinished run in the work folder, naming the flag.
    """
    if isinstance(config, TrainConfig):
        given = [name for name, v in (("data", data), ("out", out)) if v is not None] + sorted(options)
        if given:
            raise TypeError(f"train(TrainConfig(...)) takes no other fields (got {', '.join(given)}): set them in "
                            f"the TrainConfig, e.g. dataclasses.replace(config, {given[0]}=...)")
    else:  # the keyword form: the first argument is the model, also as model=
        if config is not None and "model" in options:
            raise TypeError("train() got the model twice: as its first argument and as model=")
        config = TrainConfig(model=options.pop("model", config), data=data, out=out, **options)
    config = config.resolve()
    config.validate()
    say = progress or (lambda _msg: None)
    run = _prepare(config, say)
    if run.finished is not None:  # the run had finished; a kill while removing its work folder left it
        return run.finished
    wrapped = _wrap(config, run, say)
    with _accelerate_fsdp_mark_kept():
        training = _make_trainer(config, run, wrapped, show_progress_bar, say)
        return _finish(config, run, wrapped, training, say)


# ------------------------------------------------------------------------------ 1. data and model
@dataclass
class _Prepared:
    """What :func:`_prepare` hands on: the run's places, model, rows and record."""

    out: Path
    work: Path
    lm: Any  # the starting LiteModel (exits off)
    device: Any  # torch.device of the run
    dataset: TokenizedDataset
    rows: int  # training rows the sequences come from
    layers: list[int]  # the output's exit layers (a baseline keeps them for early-exit decoding later)
    train_layers: list[int]  # the layers with a loss
    weights: dict[int, float]  # {layer: loss weight}
    prompt_format: str  # resolved: "auto" is the model's
    data: dict[str, Any]  # the split's provenance (lite_config.json "data")
    answers: dict[str, Any] | None  # the own answers' provenance, when trained on them
    run_record: dict[str, Any]  # lite_run.json (lite.training.run_record)
    resume: str | None  # the checkpoint to resume from
    finished: TrainResult | None = None  # the run had already finished: nothing to train


def _prepare(c: TrainConfig, say: Callable[[str], None]) -> _Prepared:
    """Step 1: the output and work folders, the rows and the held-out split, the model and its exits, own
    answers, the tokenised rows; the run record, compared with the work folder's (resume) and written."""
    from ..model.loading import cpu_has_native_bf16, load_model, parse_device
    from ..model.prompts import default_format

    target = parse_device(c.device)
    out = Path(c.out)
    # an empty path, '.', a file, an unwritable place, a user's folder; then a finished lite output
    check_output_folder(out, (RUN_FILE, CONFIG_NAME), "--out")
    work = out.with_name(out.name + ".partial")
    # a finished output beside its work folder: a run killed while removing the work folder (the same
    # command finishes that, below, once the output's run record shows it is this command's run); any other
    # existing output is refused
    finished = finished_record(out, work)
    if out.exists() and finished is None:
        raise TrainError(f"--out {out} already exists; choose a new folder or delete it (lite never overwrites)")
    check_output_folder(work, (RUN_FILE, ANSWERS_FILE), f"the work folder of --out {out}:")  # never adopt
    answers_path = Path(c.own_answers_cache) if c.own_answers_cache else work / ANSWERS_FILE
    if c.own_answers_cache and (answers_path.is_dir() or not answers_path.parent.is_dir()):
        raise TrainError(f"--own-answers-cache {answers_path}: give a file path in an existing folder (it is "
                         f"created when missing)")
    if c.own_answers_cache:
        check_writable(answers_path.parent, "--own-answers-cache")
    if c.own_answers and world_size() > 1 and not answers_path.is_file():
        raise TrainError("--own-answers (the default recipe's; --no-own-answers or --recipe paper leave them out) "
                         "with several processes: generate the answers once with one process "
                         "(the same command without torchrun; interrupt it once training starts), then resume "
                         "under torchrun")

    recorded = None
    if c.heldout_from is not None:
        from ..model.loading import resolve_model

        recorded = LiteConfig.load(resolve_model(c.heldout_from, flag="--heldout-from"))
        if recorded is None:
            raise TrainError(f"--heldout-from {c.heldout_from}: it has no lite_config.json (not trained by lite "
                             f"train); leave out --heldout-from to draw a split with --heldout-fraction")
    split = prepare_data(c.data, filters=c.filters, heldout_fraction=c.heldout_fraction, seed=c.seed,
                         heldout_from=recorded.data if recorded is not None else None)
    if c.heldout_from is not None:
        split.provenance["heldout_from"] = portable_model_spec(c.heldout_from)
    if not c.own_answers:  # the targets are the data's responses: a row must have one
        _refuse_prompt_only(split.train + split.heldout, split.provenance["sources"], c.recipe)
    lm = load_model(c.model, dtype=c.dtype, device=str(target), progress=say)
    if c.max_length > lm.max_context:  # every sequence is cut at max_length: the one bound of what is trained
        raise TrainError(f"--max-length {c.max_length} is longer than the model's context ({lm.max_context} "
                         f"tokens); give --max-length {lm.max_context} or less")
    L = lm.num_layers
    layers = parse_exit_layers(c.exit_layers, L)  # a baseline model keeps them for early-exit decoding later
    train_layers = [L] if c.baseline else ([k for k in layers if k < L] if c.exit_modules else layers)
    weights = dict(zip(train_layers, loss_weights(train_layers, c.loss_weighting)))
    if c.final_weight is not None and len(train_layers) > 1:  # L gets its share, the exits the rest
        below = [k for k in train_layers if k < L]
        weights = {**{k: (1 - c.final_weight) * w for k, w in zip(below, loss_weights(below, c.loss_weighting))},
                   L: c.final_weight}
    tokenizer = lm.tokenizer
    prompt_format = default_format(lm) if c.prompt_format == "auto" else c.prompt_format
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_rows, answers = split.train, None
    if c.bf16 and target.type == "cpu" and not cpu_has_native_bf16():  # before own answers, generated under it
        say("--bf16: this CPU has no native bf16 instructions; autocast will be emulated and likely slower "
            "(generating own answers too): leave out --bf16 here")
    if c.own_answers:  # generated once by the starting model, cached in the work folder (resumable)
        train_rows, answers = generate_own_answers(lm, split.train, prompt_format=prompt_format,
                                                   cache=answers_path, max_new_tokens=c.own_answer_tokens,
                                                   batch_size=c.own_answers_batch_size,
                                                   model_id=portable_model_spec(c.model), bf16=c.bf16,
                                                   max_length=c.max_length, progress=say)
    dataset = TokenizedDataset(train_rows, tokenizer, prompt_format, c.max_length)
    record = run_record(c, lm, split.provenance, layers, train_layers, prompt_format, dataset.dropped)
    resume, tidied = claim_work_folder(record, out, work, finished, say)
    return _Prepared(out, work, lm, target, dataset, len(train_rows), layers, train_layers, weights, prompt_format,
                     split.provenance, answers, record, resume,
                     finished=_finished(out, train_layers, c.targets) if tidied else None)


# ------------------------------------------------------------------------------ 2. what Trainer trains
@dataclass
class _Wrapped:
    """What :func:`_wrap` hands on."""

    train_model: Any  # what Trainer optimises: the model, its peft wrapper, or FrozenBackbone (exit modules)
    modules: Any  # the ExitModules, or None
    teacher: Callable | None  # the frozen teacher of distillation on a trained backbone, or None
    lite_config: LiteConfig  # what the output carries
    trainee: Any  # the LiteModel the loss runs (over train_model, or over the backbone with the modules)


def _wrap(c: TrainConfig, run: _Prepared, say: Callable[[str], None]) -> _Wrapped:
    """Step 2: exit modules on the frozen backbone, or the teacher of distillation, then LoRA when asked."""
    from transformers import set_seed

    from ..model.adapter import LiteModel
    from ..model.loading import quiet_peft_internals

    # Seed everything before the first random tensor of the run (the LoRA matrices, exit-module inits):
    # Trainer seeds only once it starts, after get_peft_model has already drawn them.
    set_seed(c.seed)
    lm = run.lm
    train_model = lm.model
    train_model.train()
    modules, teacher, fitted = None, None, None
    if c.exit_modules:
        from ..model.exit_modules import ExitModules

        lm.model.requires_grad_(False)
        lm.model.eval()  # the backbone is frozen: no dropout, no gradients, no autograd graph
        modules = ExitModules(c.exit_modules, run.train_layers, lm.hidden_size, lm.blocks).to(lm.device)
        train_model = FrozenBackbone(modules, lm.model)
        fitted = _fit_exits(c, run, modules, say) if c.exit_init == "fit" else None
    elif c.targets != "data":
        teacher = make_teacher(lm, c.lora)
    if c.lora:
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha or 2 * c.lora_rank,
                                 lora_dropout=c.lora_dropout, target_modules=list(c.lora_targets),
                                 task_type="CAUSAL_LM")
        try:
            with quiet_peft_internals():
                train_model = get_peft_model(train_model, peft_config)
        except ValueError as exc:  # peft: no such target module, or one LoRA cannot wrap
            raise TrainError(f"--lora-targets {','.join(c.lora_targets)}: {exc}") from None
    record = run.run_record
    lite_config = LiteConfig(num_layers=lm.num_layers, exit_layers=run.layers, loss_weighting=c.loss_weighting,
                             loss_weights=[run.weights.get(k, 0.0) for k in run.layers],
                             prompt_format=run.prompt_format, base_model=record["model"], adapter=c.lora,
                             training=record["training"], data=run.data, exit_modules=c.exit_modules,
                             provenance={**({"own_answers": run.answers} if run.answers else {}),
                                         **({"exit_fit": fitted} if fitted else {})})
    trainee = LiteModel(lm.model if c.exit_modules else train_model, lm.tokenizer, lite_config,
                        source=record["model"], exit_modules=modules)
    return _Wrapped(train_model, modules, teacher, lite_config, trainee)


def _fit_exits(c: TrainConfig, run: _Prepared, modules, say: Callable[[str], None]) -> dict[str, Any] | None:
    """``--exit-init fit``: the modules' closed-form start (:mod:`lite.training.exit_fit`), made once per run.
    Its record stays in the work folder, so that a resumed run (whose checkpoint holds the modules as trained
    since) reports it without fitting again."""
    from .exit_fit import fit_affine_exits

    record = run.work / EXIT_FIT_FILE
    if run.resume is not None:
        return json.loads(record.read_text()) if record.is_file() else None
    say(f"fitting {len(modules.layers)} affine exit modules in closed form on up to {c.exit_fit_rows} sequences")
    fitted = fit_affine_exits(run.lm, modules, run.dataset, max_sequences=c.exit_fit_rows, batch_size=c.batch_size)
    write_json_atomic(record, fitted)
    say(f"fitted on {fitted['tokens']} response tokens of {fitted['sequences']} sequences in "
        f"{fitted['seconds']:.0f} s")
    return fitted


# ------------------------------------------------------------------------------ 3. training arguments
@dataclass
class _Training:
    """What :func:`_make_trainer` hands on: Trainer, and the callbacks the output reports on."""

    trainer: Any
    clock: Any  # the training clock (train_seconds, over resumes)
    budget: Any | None  # the --max-minutes callback, or None


@contextmanager
def _accelerate_fsdp_mark_kept() -> Iterator[None]:
    """accelerate marks an FSDP run in os.environ (and reads the mark while training): it is put back as it
    was afterwards, so that a later train() in this process is not sharded without --fsdp."""
    fsdp_mark = os.environ.get("ACCELERATE_USE_FSDP")
    try:
        yield
    finally:
        if fsdp_mark is None:
            os.environ.pop("ACCELERATE_USE_FSDP", None)
        else:
            os.environ["ACCELERATE_USE_FSDP"] = fsdp_mark


def _make_trainer(c: TrainConfig, run: _Prepared, wrapped: _Wrapped, show_progress_bar: bool,
                  say: Callable[[str], None]) -> _Training:
    """Step 3: Trainer's arguments (the schedule, checkpoints, precision, processes), lite's callbacks (log
    entries at checkpoints, the training clock, the time budget, snapshots, the completeness marker last) and
    the exit-loss Trainer over what step 2 wrapped.

    Raises:
        TrainError: ``--fsdp`` that accelerate did not turn on here.
    """
    from transformers import TrainingArguments

    lm, tokenizer = run.lm, run.lm.tokenizer
    use_cpu = run.device.type == "cpu"  # otherwise Trainer (accelerate) takes the accelerator torch reports
    distributed = world_size() > 1
    args = TrainingArguments(
        output_dir=str(run.work), per_device_train_batch_size=c.batch_size,
        gradient_accumulation_steps=c.grad_accum, num_train_epochs=c.epochs,
        max_steps=c.max_steps if c.max_steps is not None else -1, learning_rate=c.lr,
        lr_scheduler_type="cosine",
        warmup_steps=c.warmup_ratio, weight_decay=0.0, logging_steps=c.logging_steps, save_steps=c.save_steps,
        save_total_limit=2, bf16=c.bf16, use_cpu=use_cpu, seed=c.seed, data_seed=c.seed,
        **checkpointing_args(TrainingArguments, c.gradient_checkpointing),
        report_to=report_destinations(c.report_to), run_name=run.out.name, disable_tqdm=not show_progress_bar,
        remove_unused_columns=False, dataloader_num_workers=0,
        ddp_backend="gloo" if use_cpu and distributed else None, ddp_find_unused_parameters=False,
        save_only_model=False, **({"fsdp": True, "fsdp_config": fsdp_config(lm)} if c.fsdp else {}),
    )
    clock = train_clock_callback(run.resume)
    callbacks = [log_at_checkpoints_callback(), clock]
    budget = time_budget_callback(clock, c.max_minutes) if c.max_minutes else None
    if budget is not None:
        callbacks.append(budget)
    if c.snapshot_minutes:
        weights = wrapped.modules.save if wrapped.modules is not None else \
            (lambda folder: _save_adapter(wrapped.train_model, folder, run.run_record["model"]))
        callbacks.append(snapshot_callback(snapshot_folder(run.out), c.snapshot_minutes, clock, _snapshot_writer(
            weights, tokenizer, wrapped.lite_config, getattr(lm.model, "generation_config", None))))
    callbacks.append(complete_callback())  # last: a checkpoint counts once everything above wrote it
    state_cache = None
    if c.exit_modules and c.state_cache_gb > 0 and not distributed:
        state_cache = StateCache(int(c.state_cache_gb * 2**30), say)
    trainer = lite_trainer_class()(
        model=wrapped.train_model, args=args,
        train_dataset=IndexedDataset(run.dataset) if state_cache is not None else run.dataset,
        data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
        lite_model=wrapped.trainee, exit_weights=run.weights, loss_mode=c.loss_mode, chunk_size=c.chunk_size,
        callbacks=callbacks, targets=c.targets, ce_weight=c.ce_weight,
        teacher=wrapped.teacher, state_cache=state_cache,
    )
    if c.fsdp and not trainer.is_fsdp_enabled:
        import accelerate

        raise TrainError(f"--fsdp: accelerate {accelerate.__version__} did not turn FSDP on (its mode here: "
                         f"{trainer.accelerator.distributed_type.value}); it shards over several processes on "
                         f"accelerators (CUDA, XPU, NPU, ...) started by torchrun or accelerate launch, and "
                         f"runs DDP on CPUs: leave out --fsdp here")
    return _Training(trainer, clock, budget)


# ------------------------------------------------------------------------------ 4. finish
def _finish(c: TrainConfig, run: _Prepared, wrapped: _Wrapped, training: _Training,
            say: Callable[[str], None]) -> TrainResult:
    """Step 4: train (from the resume point), then the output: losses and steps into ``lite_config.json``,
    the model written by rank 0 (under FSDP gathered by every process first)."""
    trainer, resume, lite_config = training.trainer, run.resume, wrapped.lite_config
    if resume:
        say(f"resuming from {resume}")
    what = (f"{c.exit_modules} exit modules on a frozen backbone" if c.exit_modules else "LoRA" if c.lora
            else "full")
    say(f"training {what} on {len(run.dataset)} sequences from {run.rows} rows "
        f"({lite_config.training['responses']}, prompt format {run.prompt_format}, targets {c.targets}), exits "
        f"{run.train_layers}, weights {[round(w, 3) for w in run.weights.values()]}")
    if resume and is_final(resume):
        # Killed after the last checkpoint but before the output was written: Trainer would run one
        # extra step on resume (it checks max_steps only after a step), so load the weights instead.
        from transformers import TrainerState

        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=resume)

    history = _with_whole_run_loss(trainer.state.log_history, trainer.state.global_step, trainer.state.epoch)
    trainer.state.log_history = history
    final_losses, final_loss = _last_losses(history, run.train_layers, c.targets)
    lite_config.training["steps"] = trainer.state.global_step
    lite_config.training["train_seconds"] = round(training.clock.seconds(), 3)  # wall time training, resumes too
    if training.budget is not None:
        lite_config.training["stopped_by_max_minutes"] = training.budget.stopped
    # under FSDP the full weights are gathered from every process (a collective: all ranks take part)
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if process_rank() == 0:
        _save_final(trainer, wrapped.train_model, run.lm.tokenizer, lite_config, run.work, run.out, c.lora,
                    run.run_record["model"], wrapped.modules,
                    generation_config=getattr(run.lm.model, "generation_config", None), state_dict=state_dict)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(run.out, trainer.state.global_step, final_losses, final_loss, resume, lite_config, history)


def _last_losses(history: list[dict[str, Any]], train_layers: list[int], targets: str
                 ) -> tuple[dict[int, float], float | None]:
    """The last logged per-exit losses ({layer: nats per response token}, the figure the run optimises:
    ``kl_l`` for distillation, else ``loss_l``) and the total logged with them."""
    prefix = "kl_l" if targets == "distill" else "loss_l"
    last = next((h for h in reversed(history) if f"{prefix}{train_layers[-1]}" in h), {})
    return {int(k[len(prefix):]): float(v) for k, v in last.items() if k.startswith(prefix)}, last.get("loss")


def _with_whole_run_loss(history: list[dict[str, Any]], steps: int, epoch: float | None) -> list[dict[str, Any]]:
    """The log with ``train_loss`` of the whole run, resumes included: the mean of the logged losses
    weighted by the steps each covers (Trainer's own figure covers only the steps since the last resume).
    It goes into Trainer's closing entry, or a closing entry of its own when training did not run now (the
    run was killed after its last checkpoint)."""
    total, before = 0.0, 0
    for entry in history:
        if "loss" in entry and "step" in entry:
            total += float(entry["loss"]) * (entry["step"] - before)
            before = entry["step"]
    history = [dict(h) for h in history]
    closing = history[-1] if history and "train_runtime" in history[-1] else None
    if closing is None:
        closing = {"epoch": epoch, "step": steps}
        history.append(closing)
    closing["train_loss"] = total / before if before else None
    return history


def _finished(out: Path, train_layers: list[int], targets: str) -> TrainResult:
    """The result of a run whose output was already in place (its work folder has just been removed)."""
    lite_config = LiteConfig.load(out)
    try:
        history = json.loads((out / "trainer_log.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        history = []
    final_losses, final_loss = _last_losses(history, train_layers, targets)
    return TrainResult(out, int(lite_config.training.get("steps", 0)), final_losses, final_loss, None, lite_config,
                       history)


def _refuse_prompt_only(examples: list, sources: list[dict[str, Any]], recipe: str) -> None:
    """A :class:`TrainError` naming the file of the first row without a response, when there is one."""
    bare = [e for e in examples if e.prompt_only]
    if not bare:
        return
    source, row = bare[0].row_id.split(":")
    entry = sources[int(source)]
    raise TrainError(f"{entry.get('path') or entry.get('hub_dataset')}: {len(bare)} rows have no output (prompt "
                     f"only; the first is row {row}, 0-based), but --recipe {recipe} without own answers trains on "
                     f"the data's responses; train them on the model's own answers (--own-answers, the "
                     f"exit-modules recipe's default), or give rows with an output")


def _save_final(trainer, train_model, tokenizer, lite_config: LiteConfig, work: Path, out: Path, lora: bool,
                base_spec: str, modules=None, generation_config=None, state_dict=None) -> None:
    """Write the finished model into ``work/final`` and rename it to ``out``; then drop the work folder.

    An exit-module run writes only the modules (``exit_modules.safetensors``): ``lite_config.json`` names
    the backbone as ``base_model``, which :func:`lite.model.loading.load_model` loads beneath them. Every
    kind gets the base's ``generation_config.json`` (end-of-sequence ids) and a model card (``README.md``,
    :mod:`lite.model.card`) in place of peft's empty template."""
    from ..model.card import write_model_card
    from ..model.loading import hub_id_for

    final = work / "final"
    if final.exists():
        shutil.rmtree(final)
    if modules is not None:
        final.mkdir(parents=True)
        modules.save(final)
    else:
        model = trainer.accelerator.unwrap_model(train_model)
        if state_dict is not None and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            # gathered copies share no memory, so save_pretrained would keep the tied head as a second copy
            state_dict = {k: v for k, v in state_dict.items() if not k.endswith("lm_head.weight")}
        _save_pretrained(model, final, base_spec if lora else None, state_dict)
    tokenizer.save_pretrained(str(final))
    if (work / "runs").is_dir():  # TensorBoard's event files (--report-to tensorboard) stay with the model
        shutil.move(str(work / "runs"), str(final / "runs"))
    lite_config.save(final)
    (final / "trainer_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    if generation_config is not None and not (final / "generation_config.json").is_file():
        generation_config.save_pretrained(str(final))
    write_model_card(final, base_id=hub_id_for(base_spec), name=out.name)
    shutil.copyfile(work / RUN_FILE, final / RUN_FILE)  # the run's settings, with it: a re-run knows it as its own
    os.replace(final, out)
    remove_own_files(work, WORK_FILES)  # what lite wrote there, and the folder if nothing else is left


def _save_pretrained(model, folder: Path, lora_base: str | None = None, state_dict=None) -> None:
    """``model.save_pretrained(folder)``, quietly. ``lora_base``: the model is a peft adapter over this base,
    which the adapter then names as Hugging Face tools do (the embedded default by its hub id, which lite
    places in the HF cache), not this machine's cache path; lite_config.json keeps lite's name."""
    from ..model.loading import hub_id_for

    if lora_base is not None:
        for cfg in model.peft_config.values():
            cfg.base_model_name_or_path = hub_id_for(lora_base)
    with warnings.catch_warnings():  # peft probes the hub for the base's vocabulary; lite never changes it
        warnings.filterwarnings("ignore", message=r"Could not find a config file in .* vocabulary was not modified")
        # ... and without a network that probe fails with a UserWarning of peft's own (utils/other.py)
        warnings.filterwarnings("ignore", message=r"Unable to fetch remote file due to the following error")
        model.save_pretrained(str(folder), **({"state_dict": state_dict} if state_dict is not None else {}))


def _save_adapter(train_model, folder: Path, base_spec: str) -> None:
    """A LoRA run's adapter as it is now (what a snapshot of it holds): a few MB, loadable over its base."""
    _save_pretrained(getattr(train_model, "module", train_model), folder, base_spec)


def _snapshot_writer(save_weights: Callable[[Path], None], tokenizer, lite_config: LiteConfig,
                     generation_config=None) -> Callable[[Path, int, float], None]:
    """What a snapshot holds: the trained weights as they are now (``save_weights(folder)``: the exit
    modules, or a LoRA adapter), the tokenizer, and ``lite_config.json`` with the steps and training seconds
    so far; loadable like the final output."""
    def write(folder: Path, step: int, seconds: float) -> None:
        save_weights(folder)
        tokenizer.save_pretrained(str(folder))
        training = dict(lite_config.training, steps=step, train_seconds=round(seconds, 3), snapshot=True)
        replace(lite_config, training=training).save(folder)
        if generation_config is not None:
            generation_config.save_pretrained(str(folder))

    return write


def loss_summary(result: TrainResult) -> str:
    """One line: total and per-layer losses of the last log entry."""
    per = " ".join(f"l{k}={v:.3f}" for k, v in sorted(result.final_losses.items()))
    total = "n/a" if result.final_loss is None or math.isnan(result.final_loss) else f"{result.final_loss:.3f}"
    return f"loss {total} ({per})"


__all__ = ["CONFIG_NAME", "DEFAULT_LORA_TARGETS", "TrainConfig", "TrainError", "TrainResult", "loss_summary",
           "train"]
