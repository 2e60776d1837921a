"""LITE instruction tuning on Hugging Face Trainer: setup, train, save.

* setup: read and split the data (:mod:`lite.training.data`), load the model (:func:`lite.load_model`), check the
  exit layers, wrap the model in LoRA (peft) when asked, tokenise.
* train: ``LiteTrainer`` (:mod:`lite.training.hf_trainer`) is a ``transformers.Trainer`` whose
  ``compute_loss`` runs the model once for its hidden states (no full-vocab logits) and applies
  :func:`lite.training.losses.lite_loss`; per-layer losses are logged as ``loss_l<k>``. Trainer does the
  rest: optimiser, cosine schedule, gradient accumulation, bf16 autocast, gradient checkpointing, progress
  bar, checkpoints, resume, and several processes when started by ``torchrun`` (gloo on CPU).
* save: rank 0 writes an ordinary Hugging Face folder (full weights or the LoRA adapter, plus the
  tokenizer) and ``lite_config.json``.

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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import LiteError
from ..files import check_output_folder, check_writable, remove_own_files
from ..model.config import (
    CONFIG_NAME,
    LOSS_WEIGHTINGS,
    PROMPT_FORMATS,
    LiteConfig,
    loss_weights,
    parse_exit_layers,
)
from .data import (
    DEFAULT_HELDOUT_FRACTION,
    DEFAULT_MAX_LENGTH,
    FORMATS_HELP,
    IndexedDataset,
    PadCollator,
    TokenizedDataset,
    prepare_data,
)
from .checkpoints import complete_callback, drop_incomplete, is_final, last_complete, log_at_checkpoints_callback
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
from .losses import DEFAULT_CHUNK_SIZE, LOSS_MODES
from .own_answers import ANSWERS_FILE, generate_own_answers

TARGETS = ("data", "distill", "mixed")
# What a run trains when its flags leave it open: the recipe the comparison of
# scripts/ablation.sh chose (benchmarks/results/ablation.md), and the paper's, one flag away.
RECIPES = {
    "exit-modules": {"exit_modules": "affine", "targets": "distill", "own_answers": True},
    "paper": {"exit_modules": None, "targets": "data", "own_answers": False},
}
DEFAULT_RECIPE = "exit-modules"
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RUN_FILE = "lite_run.json"
# what a run writes in its work folder (<out>.partial): only these are removed once the output is in place,
# in this order, the record that the folder is lite's last; the output holds a copy of that record, so
# the same command recognises its finished run beside what a kill while removing left, even an empty
# folder, and finishes the tidying
WORK_FILES = ["checkpoint-*", "final", "runs", ANSWERS_FILE, RUN_FILE]


class TrainError(LiteError):
    """A training option or the output folder is unusable; the message names the flag."""


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


REPORT_TO = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}  # destination -> packages


def report_destinations(report_to: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``--report-to`` as Trainer's list: [] for None or "none"; each destination's package must be installed.

    Raises:
        TrainError: an unknown destination, or one whose package is missing (named, with the pip command).
    """
    import importlib.util

    names = report_to.split(",") if isinstance(report_to, str) else list(report_to or [])
    names = [n.strip() for n in names if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in REPORT_TO:
            raise TrainError(f"--report-to must be none or one or more of {sorted(REPORT_TO)}, got {name!r}")
        if not any(importlib.util.find_spec(package) for package in REPORT_TO[name]):
            raise TrainError(f"--report-to {name}: the '{REPORT_TO[name][0]}' package is not installed; "
                             f"pip install {REPORT_TO[name][0]}, or leave --report-to none")
    return list(dict.fromkeys(names))


UNMARKED = "unmarked_checkpoints"  # lite_run.json: the run was begun by a lite that wrote no checkpoint markers


def _unmarked_run(record: Path) -> bool:
    """True when ``record`` (an unfinished run's lite_run.json) was written by a lite before checkpoint markers
    (it lacks :data:`UNMARKED`), or by one that resumed such a run (it says True): that run's checkpoints
    carry no marker and must not be taken for torn ones."""
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(recorded, dict) and recorded.get(UNMARKED, True) is True


def _as_recorded_by_older_lite(now: Any, recorded: Any) -> Any:
    """``now`` (a run's settings) less the keys ``recorded`` lacks whose value is off (None, False, empty):
    settings a newer lite records at their default do not make an unfinished run of an older one differ."""
    if not (isinstance(now, dict) and isinstance(recorded, dict)):
        return now
    return {k: _as_recorded_by_older_lite(v, recorded.get(k)) for k, v in now.items()
            if k in recorded or v not in (None, False, [], {}, "")}


def _portable_model_spec(model: str | None) -> str:
    """What to record as base_model: the alias or hub id as given, a local folder as an absolute path."""
    from ..model.loading import DEFAULT_MODEL

    if model is None:
        return DEFAULT_MODEL
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def train(model: str | None = None, data: list[str] | str | None = None, out: str | os.PathLike[str] = "lite-out",
          *, max_steps: int | None = None, epochs: float = 3.0, lr: float | None = None, batch_size: int = 8,
          grad_accum: int = 1, max_length: int = DEFAULT_MAX_LENGTH, lora: bool = False, lora_rank: int = 16,
          lora_alpha: int | None = None, lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
          baseline: bool = False, exit_layers: str | list[int] | None = None, loss_weighting: str = "uniform",
          prompt_format: str = "auto", filters: list[str] | str | None = None,
          heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, seed: int = 0, bf16: bool = False,
          gradient_checkpointing: bool = False, save_steps: int = 200, logging_steps: int = 10,
          dtype: str | None = "float32", loss_mode: str = "fused", chunk_size: int = DEFAULT_CHUNK_SIZE,
          warmup_ratio: float = 0.03, lora_dropout: float = 0.0, report_to: str | list[str] | None = None,
          fsdp: bool = False, device: str | None = None, recipe: str | None = None,
          targets: str | None = None, ce_weight: float = 0.5, exit_modules: str | None = None,
          own_answers: bool | None = None,
          own_answer_tokens: int = 128, own_answers_cache: str | os.PathLike[str] | None = None,
          own_answers_batch_size: int = 16,
          snapshot_minutes: float | None = None, max_minutes: float | None = None,
          state_cache_gb: float = 4.0, heldout_from: str | None = None, progress: Callable[[str], None] | None = None,
          show_progress_bar: bool = True) -> TrainResult:
    """LITE instruction tuning (or the final-layer baseline), full or LoRA; see the module docstring.

    Args:
        model: base model (folder, hub id, or alias; None = the embedded default).
        data: rows in any shape of :mod:`lite.training.rows` (Alpaca, chat ``messages``, prompt/completion)
            from JSON/JSONL files, other files or folders ``datasets`` reads, or hub dataset ids
            (``SOURCE:SPLIT`` for a split other than train); see :mod:`lite.training.data`.
        out: output folder; must not exist yet (its ``.partial`` sibling is the resumable work folder).
        max_steps: stop after this many optimiser steps (overrides ``epochs``).
        epochs: passes over the training rows.
        lr: peak learning rate (cosine schedule); default 2e-5 full fine-tuning, 2e-4 LoRA.
        batch_size: rows per device per micro-batch. grad_accum: micro-batches per optimiser step.
        max_length: tokens per row (prompt + response + EOS), cut at the end.
        lora: train a LoRA adapter (rank ``lora_rank``, alpha ``lora_alpha`` = 2*rank by default, dropout
            ``lora_dropout`` on its input, default none) on ``lora_targets`` instead of all weights.
        baseline: final-layer loss only (standard instruction tuning), for comparison with LITE.
        exit_layers: "8,12,...,L" or a list; None = the default exits (every L/8 from L/4, plus L).
        loss_weighting: "uniform" (paper) or "increasing" (weight proportional to depth).
        prompt_format: "chat" (the tokenizer's chat template), "alpaca", or "auto" (default): the base's
            own ``prompt_format`` when it is a lite folder, else chat when the tokenizer has a chat template,
            else alpaca (:func:`lite.model.prompts.default_format`); ``lite_config.json`` records the choice.
        filters: ``FIELD=VALUE`` row filters (e.g. ``status=ok``).
        heldout_fraction, seed: the held-out split kept aside for calibration (seed also seeds training).
        heldout_from: a model trained by lite train (folder or alias): hold out exactly the rows it held out
            instead of drawing a split (its sources must come first in ``data``, the same files), so that a
            run on more data is measured on the same rows; ``heldout_fraction`` is then unused.
        bf16: bf16 autocast (mixed precision). gradient_checkpointing: recompute blocks in backward.
        save_steps: checkpoint every this many steps (resume point). logging_steps: log every this many.
        dtype: weights dtype ("float32", "bfloat16"). loss_mode, chunk_size: see :mod:`lite.training.losses`.
        warmup_ratio: share of the steps over which the learning rate rises to ``lr``, in [0, 1).
        report_to: where Trainer also sends its logs: None or "none" (default), "tensorboard", "wandb", or
            several (a list, or comma-separated); each needs its package installed. TensorBoard event files
            end up in ``<out>/runs``.
        fsdp: shard the weights, gradients and optimiser state over the processes (PyTorch FSDP2 through
            Trainer: full shard, each decoder block its own unit) instead of keeping a copy in each
            (DDP); for models too large for one device. Run under ``torchrun``/``accelerate launch``.
        device: "cpu", "cuda", "mps", "xpu" (a type, not an index: under torchrun each process takes its
            own GPU); default: the accelerator torch reports, else the CPU.
        recipe: what ``exit_modules``, ``targets`` and ``own_answers`` are when left at None (``RECIPES``):
            "exit-modules" (affine modules on the frozen backbone, self-distillation on the model's own
            answers: the recipe the comparison chose) or "paper" (the paper's LITE: the backbone trained
            with CE on the dataset's responses, full or ``lora``). Default: "paper" when ``lora``,
            ``baseline`` or ``fsdp`` asks to train the backbone, else "exit-modules".
        targets: what each exit learns: "data" (the paper: cross-entropy against the response
            tokens), "distill" (KL toward a frozen teacher, the starting model's final layer), "mixed"
            (``ce_weight`` x CE + (1 - ``ce_weight``) x KL).
        exit_modules: "affine" or "mlp": freeze the backbone and train one exit module per exit below L
            (:mod:`lite.model.exit_modules`); the output folder then holds only the modules (a few MB).
        own_answers: train on the starting model's own greedy answers (at most ``own_answer_tokens``
            tokens) instead of the dataset's responses (:mod:`lite.training.own_answers`), cached in the
            work folder, or in ``own_answers_cache`` (a JSONL file kept across runs: its entries are keyed
            by row, prompt, model and budget, so runs on the same rows share it and others regenerate).
            ``own_answers_batch_size`` prompts are generated together (more rows per step cost little more
            on a memory-bound CPU or GPU; the answers are the same).
        max_minutes: end training once this many minutes of training have passed (the run's training clock,
            over resumes), even if ``max_steps``/``epochs`` planned more: recipes compared at equal time.
            The learning-rate schedule still spans the planned steps, so plan about as many as fit.
        snapshot_minutes: with ``exit_modules``, keep a loadable copy of the modules every this many minutes
            of training, at the first checkpoint after each (so ``save_steps`` sets the grain), in
            ``<out>.snapshots/step-NNNNNN`` (a few MB each; kept over resumes): score them with
            ``benchmarks/exit_agreement.py`` for the curve of agreement against training minutes.
        state_cache_gb: with ``exit_modules``, keep the frozen backbone's states at the response positions of
            each sequence in memory, up to this many GiB, so that epochs after the first do not run the
            backbone (:class:`lite.training.hf_trainer.StateCache`); 0 turns it off. One process only: under
            DDP the loss sees the wrapped model and takes the general path, and each process would see
            other rows every epoch.
        progress: called with status lines. show_progress_bar: Trainer's tqdm bar.
    """
    from ..model.adapter import LiteModel
    from ..model.loading import cpu_has_native_bf16, load_model, parse_device, quiet_peft_internals
    from ..model.prompts import default_format

    say = progress or (lambda _msg: None)
    trains_backbone = [flag for flag, on in (("--lora", lora), ("--baseline", baseline), ("--fsdp", fsdp)) if on]
    if recipe is None:
        recipe = "paper" if trains_backbone else DEFAULT_RECIPE
    if recipe not in RECIPES:
        raise TrainError(f"--recipe must be one of {tuple(RECIPES)}, got {recipe!r}")
    if recipe == "exit-modules" and trains_backbone and exit_modules is None:
        raise TrainError(f"--recipe exit-modules trains small modules on a frozen backbone; {trains_backbone[0]} "
                         f"trains the backbone: use --recipe paper (the paper's LITE), or leave out "
                         f"{trains_backbone[0]}")
    preset = RECIPES[recipe]
    exit_modules = exit_modules if exit_modules is not None else preset["exit_modules"]
    targets = targets if targets is not None else preset["targets"]
    own_answers = own_answers if own_answers is not None else preset["own_answers"]
    target = parse_device(device)
    if target.index is not None:
        raise TrainError(f"--device {device}: lite train takes a device type (cpu, cuda, mps, xpu); pick one "
                         f"GPU with CUDA_VISIBLE_DEVICES, or several with torchrun")
    out = Path(out)
    # an empty path, '.', a file, an unwritable place, a user's folder; then a finished lite output
    check_output_folder(out, (RUN_FILE, CONFIG_NAME), "--out")
    work = out.with_name(out.name + ".partial")
    # a finished output beside its work folder: a run killed while removing the work folder (the same
    # command finishes that, below, once the output's run record shows it is this command's run; outputs of
    # older lite have it only in the work folder); any other existing output is refused
    finished_record = next((f / RUN_FILE for f in (out, work) if (f / RUN_FILE).is_file()), None)
    tidying = out.exists() and work.is_dir() and (out / CONFIG_NAME).is_file() and finished_record is not None
    if out.exists() and not tidying:
        raise TrainError(f"--out {out} already exists; choose a new folder or delete it (lite never overwrites)")
    check_output_folder(work, (RUN_FILE, ANSWERS_FILE), f"the work folder of --out {out}:")  # never adopt
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise TrainError(f"--loss-weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
    if prompt_format not in ("auto", *PROMPT_FORMATS):
        raise TrainError(f"--prompt-format must be one of {('auto', *PROMPT_FORMATS)}, got {prompt_format!r}")
    if loss_mode not in LOSS_MODES:
        raise TrainError(f"--loss-mode must be one of {LOSS_MODES}, got {loss_mode!r}")
    for flag, value in (("--batch-size", batch_size), ("--grad-accum", grad_accum), ("--max-length", max_length),
                        ("--lora-rank", lora_rank), ("--save-steps", save_steps)):
        if value < 1:
            raise TrainError(f"{flag} must be at least 1, got {value}")
    if max_steps is not None and max_steps < 1:
        raise TrainError(f"--max-steps must be at least 1, got {max_steps}")
    if data is None:
        raise TrainError(f"--data is required: {FORMATS_HELP}")
    if targets not in TARGETS:
        raise TrainError(f"--targets must be one of {TARGETS}, got {targets!r}")
    if not 0.0 <= ce_weight <= 1.0:
        raise TrainError(f"--ce-weight must be in [0, 1], got {ce_weight}")
    for flag, value in (("--lr", lr), ("--epochs", epochs), ("--max-minutes", max_minutes),
                        ("--snapshot-minutes", snapshot_minutes)):  # the CLI checks these too (lite.cli.numbers)
        if value is not None and not (value > 0 and math.isfinite(value)):  # NaN fails both
            raise TrainError(f"{flag} must be a finite number > 0, got {value}")
    if not (state_cache_gb >= 0 and math.isfinite(state_cache_gb)):
        raise TrainError(f"--state-cache-gb must be a finite number >= 0 (0: no cache), got {state_cache_gb}")
    if snapshot_minutes is not None and exit_modules is None:
        raise TrainError("--snapshot-minutes keeps copies of exit modules (a few MB each) and needs "
                         "--exit-modules; a LoRA or full run keeps its last checkpoints in OUT.partial")
    if exit_modules is not None:
        from ..model.exit_modules import EXIT_MODULE_KINDS

        if exit_modules not in EXIT_MODULE_KINDS:
            raise TrainError(f"--exit-modules must be one of {EXIT_MODULE_KINDS}, got {exit_modules!r}")
        if lora or baseline:
            raise TrainError("--exit-modules trains small modules on a frozen backbone: leave out "
                             f"{'--lora' if lora else '--baseline'}")
    answers_path = Path(own_answers_cache) if own_answers_cache else work / ANSWERS_FILE
    if own_answers_cache and (answers_path.is_dir() or not answers_path.parent.is_dir()):
        raise TrainError(f"--own-answers-cache {answers_path}: give a file path in an existing folder (it is "
                         f"created when missing)")
    if own_answers_cache:
        check_writable(answers_path.parent, "--own-answers-cache")
    if own_answers and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not answers_path.is_file():
        raise TrainError("--own-answers (the default recipe's; --no-own-answers or --recipe paper leave them out) "
                         "with several processes: generate the answers once with one process "
                         "(the same command without torchrun; interrupt it once training starts), then resume "
                         "under torchrun")
    if own_answer_tokens < 1:
        raise TrainError(f"--own-answer-tokens must be at least 1, got {own_answer_tokens}")
    if own_answers_batch_size < 1:
        raise TrainError(f"--own-answers-batch-size must be at least 1, got {own_answers_batch_size}")
    for flag, value in (("--warmup-ratio", warmup_ratio), ("--lora-dropout", lora_dropout)):
        if not (math.isfinite(value) and 0.0 <= value < 1.0):
            raise TrainError(f"{flag} must be in [0, 1), got {value}")
    if lora_alpha is not None and not lora_alpha > 0:
        raise TrainError(f"--lora-alpha must be > 0, got {lora_alpha}")
    if chunk_size < 1:
        raise TrainError(f"--chunk-size must be at least 1, got {chunk_size}")
    reports = report_destinations(report_to)
    if fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise TrainError("--fsdp shards the model over several processes: start lite train under torchrun "
                         "--nproc_per_node N (or accelerate launch)")
    if fsdp and exit_modules:
        raise TrainError("--fsdp shards a trained backbone; --exit-modules trains a few MB on a frozen one: "
                         "leave out --fsdp (several processes use DDP)")
    if fsdp and targets != "data":
        raise TrainError(f"--fsdp with --targets {targets}: the teacher's forward is not sharded (a full "
                         f"frozen copy, or the base model called outside the sharded forward); use --targets "
                         f"data, or leave out --fsdp")

    recorded = None
    if heldout_from is not None:
        from ..model.loading import resolve_model

        recorded = LiteConfig.load(resolve_model(heldout_from, flag="--heldout-from"))
        if recorded is None:
            raise TrainError(f"--heldout-from {heldout_from}: it has no lite_config.json (not trained by lite "
                             f"train); leave out --heldout-from to draw a split with --heldout-fraction")
    split = prepare_data(data, filters=filters, heldout_fraction=heldout_fraction, seed=seed,
                         heldout_from=recorded.data if recorded is not None else None)
    if heldout_from is not None:
        split.provenance["heldout_from"] = _portable_model_spec(heldout_from)
    if not own_answers:  # the targets are the data's responses: a row must have one
        _refuse_prompt_only(split.train + split.heldout, split.provenance["sources"], recipe)
    lm = load_model(model, dtype=dtype, device=str(target), progress=say)
    if max_length > lm.max_context:  # every sequence is cut at max_length: the one bound of what is trained
        raise TrainError(f"--max-length {max_length} is longer than the model's context ({lm.max_context} "
                         f"tokens); give --max-length {lm.max_context} or less")
    L = lm.num_layers
    layers = parse_exit_layers(exit_layers, L)  # a baseline model keeps them for early-exit decoding later
    train_layers = [L] if baseline else ([k for k in layers if k < L] if exit_modules else layers)
    weights = dict(zip(train_layers, loss_weights(train_layers, loss_weighting)))
    tokenizer = lm.tokenizer
    if prompt_format == "auto":
        prompt_format = default_format(lm)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_rows, answers = split.train, None
    if bf16 and target.type == "cpu" and not cpu_has_native_bf16():  # before own answers, generated under it
        say("--bf16: this CPU has no native bf16 instructions; autocast will be emulated and likely slower "
            "(generating own answers too): leave out --bf16 here")
    if own_answers:  # generated once by the starting model, cached in the work folder (resumable)
        train_rows, answers = generate_own_answers(lm, split.train, prompt_format=prompt_format,
                                                   cache=answers_path, max_new_tokens=own_answer_tokens,
                                                   batch_size=own_answers_batch_size,
                                                   model_id=_portable_model_spec(model), bf16=bf16,
                                                   max_length=max_length, progress=say)
    dataset = TokenizedDataset(train_rows, tokenizer, prompt_format, max_length)
    lr = lr if lr is not None else (1e-3 if exit_modules else 2e-4 if lora else 2e-5)

    settings = {
        "lora": lora, "lora_rank": lora_rank if lora else None,
        "lora_alpha": (lora_alpha or 2 * lora_rank) if lora else None,
        "lora_dropout": lora_dropout if lora else None,
        "lora_targets": list(lora_targets) if lora else None, "baseline": baseline,
        "trained_layers": train_layers, "max_steps": max_steps, "epochs": epochs, "lr": lr,
        "lr_schedule": "cosine", "warmup_ratio": warmup_ratio, "batch_size": batch_size,
        "grad_accum": grad_accum, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "max_length": max_length, "bf16": bf16, "gradient_checkpointing": gradient_checkpointing,
        "dtype": dtype, "seed": seed, "loss_mode": loss_mode, "chunk_size": chunk_size,
        "rows_dropped_too_long": dataset.dropped, "targets": targets,
        "ce_weight": ce_weight if targets == "mixed" else None, "exit_modules": exit_modules,
        "responses": "own answers" if own_answers else "dataset",
        "own_answer_tokens": own_answer_tokens if own_answers else None, "report_to": reports,
        "fsdp": fsdp_config(lm) if fsdp else None, "max_minutes": max_minutes,
    }
    run_record = {"model": _portable_model_spec(model), "data": split.provenance, "exit_layers": layers,
                  "loss_weighting": loss_weighting, "prompt_format": prompt_format, "training": settings}
    previous = work / RUN_FILE
    legacy = _unmarked_run(previous)  # begun by a lite that wrote no checkpoint markers: its checkpoints count
    run_record[UNMARKED] = legacy
    resume = last_complete(work, legacy)  # the only checkpoints that count are complete ones
    if tidying or (previous.is_file() and resume is not None):  # else there is nothing to resume
        record_path = finished_record if tidying else previous
        try:
            recorded = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TrainError(f"{record_path} cannot be read ({exc}); it records the run in {work}: delete {work} "
                             f"to start afresh") from None
        now = {k: v for k, v in json.loads(json.dumps(run_record)).items() if k != UNMARKED}
        recorded = {k: v for k, v in recorded.items() if k != UNMARKED} if isinstance(recorded, dict) else recorded
        same = recorded == _as_recorded_by_older_lite(now, recorded)
        if tidying:
            if not same:
                raise TrainError(f"--out {out} already exists; choose a new folder or delete it (lite never "
                                 f"overwrites)")
            if process_rank() == 0:
                remove_own_files(work, WORK_FILES)
            say(f"the run had finished; removed its work folder {work}")
            return _finished(out, train_layers, targets)
        if not same:
            raise TrainError(f"{work} holds an unfinished run with other settings; re-run the same command to "
                             f"resume it (a run begun before exit modules became the default recipe: add --recipe "
                             f"paper), or delete {work} to start afresh")
    if process_rank() == 0:
        work.mkdir(parents=True, exist_ok=True)
        from ..files import write_json_atomic

        drop_incomplete(work, legacy)  # what a kill left half written, so that Trainer never counts it
        write_json_atomic(previous, run_record)

    # Seed everything before the first random tensor of the run (the LoRA matrices, exit-module inits):
    # Trainer seeds only once it starts, after get_peft_model has already drawn them.
    from transformers import set_seed

    set_seed(seed)
    train_model = lm.model
    train_model.train()
    modules, teacher = None, None
    if exit_modules:
        from ..model.exit_modules import ExitModules

        lm.model.requires_grad_(False)
        lm.model.eval()  # the backbone is frozen: no dropout, no gradients, no autograd graph
        modules = ExitModules(exit_modules, train_layers, lm.hidden_size).to(lm.device)
        train_model = FrozenBackbone(modules, lm.model)
    elif targets != "data":
        teacher = make_teacher(lm, lora)
    if lora:
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank, lora_dropout=lora_dropout,
                                 target_modules=list(lora_targets), task_type="CAUSAL_LM")
        try:
            with quiet_peft_internals():
                train_model = get_peft_model(train_model, peft_config)
        except ValueError as exc:  # peft: no such target module, or one LoRA cannot wrap
            raise TrainError(f"--lora-targets {','.join(lora_targets)}: {exc}") from None
    lite_config = LiteConfig(num_layers=L, exit_layers=layers, loss_weighting=loss_weighting,
                             loss_weights=[weights.get(k, 0.0) for k in layers], prompt_format=prompt_format,
                             base_model=run_record["model"], adapter=lora, training=settings,
                             data=split.provenance, exit_modules=exit_modules,
                             provenance={"own_answers": answers} if answers else {})
    trainee = LiteModel(lm.model if exit_modules else train_model, tokenizer, lite_config,
                        source=run_record["model"], exit_modules=modules)

    # accelerate marks an FSDP run in os.environ (and reads the mark while training): it is put back as it
    # was afterwards, so that a later train() in this process is not sharded without --fsdp
    fsdp_mark = os.environ.get("ACCELERATE_USE_FSDP")
    try:
        from transformers import TrainingArguments

        use_cpu = target.type == "cpu"  # otherwise Trainer (accelerate) takes the accelerator torch reports
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        args = TrainingArguments(
            output_dir=str(work), per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum, num_train_epochs=epochs,
            max_steps=max_steps if max_steps is not None else -1, learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=warmup_ratio, weight_decay=0.0, logging_steps=logging_steps, save_steps=save_steps,
            save_total_limit=2, bf16=bf16, use_cpu=use_cpu, seed=seed, data_seed=seed,
            **checkpointing_args(TrainingArguments, gradient_checkpointing),
            report_to=reports, run_name=out.name, disable_tqdm=not show_progress_bar,
            remove_unused_columns=False, dataloader_num_workers=0,
            ddp_backend="gloo" if use_cpu and distributed else None, ddp_find_unused_parameters=False,
            save_only_model=False, **({"fsdp": True, "fsdp_config": fsdp_config(lm)} if fsdp else {}),
        )
        clock = train_clock_callback(resume)
        callbacks = [log_at_checkpoints_callback(), clock]
        budget = time_budget_callback(clock, max_minutes) if max_minutes else None
        if budget is not None:
            callbacks.append(budget)
        if snapshot_minutes:
            callbacks.append(snapshot_callback(snapshot_folder(out), snapshot_minutes, clock, _snapshot_writer(
                modules, tokenizer, lite_config, getattr(lm.model, "generation_config", None))))
        callbacks.append(complete_callback())  # last: a checkpoint counts once everything above wrote it
        state_cache = None
        if exit_modules and state_cache_gb > 0 and not distributed:
            state_cache = StateCache(int(state_cache_gb * 2**30), say)
        trainer = lite_trainer_class()(
            model=train_model, args=args,
            train_dataset=IndexedDataset(dataset) if state_cache is not None else dataset,
            data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer, lite_model=trainee,
            exit_weights=weights, loss_mode=loss_mode, chunk_size=chunk_size,
            callbacks=callbacks, targets=targets, ce_weight=ce_weight,
            teacher=teacher, state_cache=state_cache,
        )
        if fsdp and not trainer.is_fsdp_enabled:
            import accelerate

            raise TrainError(f"--fsdp: accelerate {accelerate.__version__} did not turn FSDP on (its mode here: "
                             f"{trainer.accelerator.distributed_type.value}); it shards over several processes on "
                             f"accelerators (CUDA, XPU, NPU, ...) started by torchrun or accelerate launch, and "
                             f"runs DDP on CPUs: leave out --fsdp here")
        if resume:
            say(f"resuming from {resume}")
        what = (f"{exit_modules} exit modules on a frozen backbone" if exit_modules else "LoRA" if lora
                else "full")
        say(f"training {what} on {len(dataset)} sequences from {len(train_rows)} rows "
            f"({settings['responses']}, prompt format {prompt_format}, targets {targets}), exits "
            f"{train_layers}, weights {[round(w, 3) for w in weights.values()]}")
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
        final_losses, final_loss = _last_losses(history, train_layers, targets)
        lite_config.training["steps"] = trainer.state.global_step
        lite_config.training["train_seconds"] = round(clock.seconds(), 3)  # wall time training, resumes too
        if budget is not None:
            lite_config.training["stopped_by_max_minutes"] = budget.stopped
        # under FSDP the full weights are gathered from every process (a collective: all ranks take part)
        state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
        if process_rank() == 0:
            _save_final(trainer, train_model, tokenizer, lite_config, work, out, lora, run_record["model"],
                        modules, generation_config=getattr(lm.model, "generation_config", None),
                        state_dict=state_dict)
        trainer.accelerator.wait_for_everyone()
        return TrainResult(out, trainer.state.global_step, final_losses, final_loss, resume, lite_config, history)
    finally:
        if fsdp_mark is None:
            os.environ.pop("ACCELERATE_USE_FSDP", None)
        else:
            os.environ["ACCELERATE_USE_FSDP"] = fsdp_mark


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
        if lora:
            # the adapter names its base as Hugging Face tools do (the embedded default by its hub id, which
            # lite places in the HF cache), not this machine's cache path; lite_config.json keeps lite's name
            for cfg in model.peft_config.values():
                cfg.base_model_name_or_path = hub_id_for(base_spec)
        with warnings.catch_warnings():  # peft probes the hub for the base's vocabulary; lite never changes it
            warnings.filterwarnings("ignore", message=r"Could not find a config file in .* vocabulary was not modified")
            # ... and without a network that probe fails with a UserWarning of peft's own (utils/other.py)
            warnings.filterwarnings("ignore", message=r"Unable to fetch remote file due to the following error")
            if state_dict is not None and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
                # gathered copies share no memory, so save_pretrained would keep the tied head as a second copy
                state_dict = {k: v for k, v in state_dict.items() if not k.endswith("lm_head.weight")}
            model.save_pretrained(str(final), **({"state_dict": state_dict} if state_dict is not None else {}))
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


def _snapshot_writer(modules, tokenizer, lite_config: LiteConfig, generation_config=None
                     ) -> Callable[[Path, int, float], None]:
    """What a snapshot of an exit-module run holds: the modules as they are now, the tokenizer, and
    ``lite_config.json`` with the steps and training seconds so far; loadable like the final output."""
    def write(folder: Path, step: int, seconds: float) -> None:
        modules.save(folder)
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


__all__ = ["CONFIG_NAME", "DEFAULT_LORA_TARGETS", "TrainError", "TrainResult", "train"]
