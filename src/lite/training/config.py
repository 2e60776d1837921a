"""The training configuration: :class:`TrainConfig`, its checks, and the recipe's resolution.

One dataclass is the run: :func:`lite.training.train` takes it, ``lite train`` builds one flag per field from
the field's metadata (its flag, help and argparse type, :mod:`lite.cli.numbers`), and ``--config FILE`` fills
those flags. :meth:`TrainConfig.resolve` fills in what the recipe decides when the fields leave it open,
:meth:`TrainConfig.validate` refuses what cannot run, naming the flag. Neither touches a file: the output
folder, the data and the model are checked by :func:`train` when it prepares them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

from ..errors import LiteError
from ..model.config import LOSS_WEIGHTINGS, PROMPT_FORMATS
from ..model.exit_modules import EXIT_MODULE_KINDS
from .data import DEFAULT_HELDOUT_FRACTION, DEFAULT_MAX_LENGTH, FORMATS_HELP
from .losses import DEFAULT_CHUNK_SIZE, LOSS_MODES

TARGETS = ("data", "distill", "mixed")
EXIT_INITS = ("identity", "fit")  # how exit modules start (--exit-init; fit: affine only)
# What a run trains when its flags leave it open: the recipe the comparison of
# scripts/ablation.sh chose (benchmarks/results/ablation.md), and the paper's, one flag away.
RECIPES = {
    "exit-modules": {"exit_modules": "affine", "targets": "distill", "own_answers": True},
    "paper": {"exit_modules": None, "targets": "data", "own_answers": False},
}
DEFAULT_RECIPE = "exit-modules"
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REPORT_TO = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}  # destination -> packages


class TrainError(LiteError):
    """A training option or the output folder is unusable; the message names the flag."""


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


def _flag(help: str, **cli) -> dict:
    """A field's CLI: its help, and argparse's keywords (``type`` names a checker of :mod:`lite.cli.numbers`;
    ``flag`` a flag spelled otherwise than the field; ``shared`` a flag spelled the same on every verb)."""
    return {"metadata": {"help": help, **cli}}


def world_size() -> int:
    """Processes of this run (torchrun's ``WORLD_SIZE``; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class TrainConfig:
    """Everything a training run is given: ``lite train``'s flags, less ``--threads`` and ``--no-progress-bar``.

    Each field's metadata is its flag's help and argparse type. Fields left None are decided later: by the
    recipe (:meth:`resolve`), or, for ``exit_layers``, ``prompt_format`` "auto" and ``device``, once the model
    is loaded. Layer k is the output of decoder block k, 1 <= k <= L.

    Attributes:
        model: base model (folder, hub id, or alias; None = the embedded default).
        data: rows in any shape of :mod:`lite.training.rows` (Alpaca, chat ``messages``, prompt/completion)
            from JSON/JSONL files, other files or folders ``datasets`` reads, or hub dataset ids
            (``SOURCE:SPLIT`` for a split other than train); see :mod:`lite.training.data`. Required.
        out: output folder; must not exist yet (its ``.partial`` sibling is the resumable work folder). Required.
        max_steps: stop after this many optimiser steps (overrides ``epochs``). epochs: passes over the rows.
        lr: peak learning rate (cosine schedule); default 1e-3 exit modules, 2e-4 LoRA, 2e-5 full fine-tuning.
        warmup_ratio: share of the steps over which the learning rate rises to ``lr``, in [0, 1).
        batch_size: rows per device per micro-batch. grad_accum: micro-batches per optimiser step.
        max_length: tokens per row (prompt + response + EOS), cut at the end.
        lora: train a LoRA adapter (rank ``lora_rank``, alpha ``lora_alpha`` = 2*rank by default, dropout
            ``lora_dropout`` on its input, default none) on ``lora_targets`` instead of all weights.
        baseline: final-layer loss only (standard instruction tuning), for comparison with LITE.
        exit_layers: "8,12,...,L" or a list; None = the default exits (every L/8 from L/4, plus L).
        loss_weighting: "uniform" (paper) or "increasing" (weight proportional to depth).
        final_weight: the share of the loss on layer L, the exits sharing the rest by ``loss_weighting``;
            None: L is one exit among the others. With a trained backbone and distillation targets this holds
            the final layer to the frozen model's distribution (uniform over 23 exits gives L 0.043, and a LoRA
            run's final layer then kept 60% of the frozen model's greedy tokens after 40 steps).
        prompt_format: "chat" (the tokenizer's chat template), "alpaca", or "auto": the base's own
            ``prompt_format`` when it is a lite folder, else chat when the tokenizer has a chat template, else
            alpaca (:func:`lite.model.prompts.default_format`); ``lite_config.json`` records the choice.
        filters: ``FIELD=VALUE`` row filters (e.g. ``status=ok``); the flag is ``--filter``, repeatable.
        heldout_fraction, seed: the held-out split kept aside for calibration (seed also seeds training).
        heldout_from: a model trained by lite train (folder or alias): hold out exactly the rows it held out
            instead of drawing a split (its sources must come first in ``data``, the same files), so that a
            run on more data is measured on the same rows; ``heldout_fraction`` is then unused.
        bf16: bf16 autocast (mixed precision). gradient_checkpointing: recompute blocks in backward.
        save_steps: checkpoint every this many steps (resume point). logging_steps: log every this many.
        fsdp: shard the weights, gradients and optimiser state over the processes (PyTorch FSDP2 through
            Trainer: full shard, each decoder block its own unit) instead of keeping a copy in each (DDP); for
            models too large for one device. Run under ``torchrun``/``accelerate launch``.
        dtype: weights dtype ("float32", "bfloat16", ...).
        device: "cpu", "cuda", "mps", "xpu" (a type, not an index: under torchrun each process takes its
            own GPU); default: the accelerator torch reports, else the CPU.
        loss_mode, chunk_size: how exit logits are kept for backward; see :mod:`lite.training.losses`.
        recipe: what ``exit_modules``, ``targets`` and ``own_answers`` are when left at None (:data:`RECIPES`):
            "exit-modules" (affine modules on the frozen backbone, self-distillation on the model's own
            answers: the recipe the comparison chose) or "paper" (the paper's LITE: the backbone trained with
            CE on the dataset's responses, full or ``lora``). Default: "paper" when ``lora``, ``baseline`` or
            ``fsdp`` asks to train the backbone, else "exit-modules".
        targets: what each exit learns: "data" (the paper: cross-entropy against the response tokens),
            "distill" (KL toward a frozen teacher, the starting model's final layer), "mixed" (``ce_weight`` x
            CE + (1 - ``ce_weight``) x KL).
        exit_modules: "affine", "mlp" or "attention" (one decoder block per exit, started as a copy of the
            next backbone block): freeze the backbone and train one exit module per exit below L
            (:mod:`lite.model.exit_modules`); the output folder then holds only the modules (a few MB; a
            block per exit for "attention").
        exit_init: how exit modules start: "fit" (affine only: the least-squares map from each exit's state to
            layer L's over the response tokens of ``exit_fit_rows`` training sequences,
            :mod:`lite.training.exit_fit`; training goes on from there) or "identity" (the raw exit: W = I,
            b = 0 for affine). None: "fit" for affine modules, else "identity" (at equal steps the fit's start
            was ahead on every measure of the exits: ``benchmarks/results/exit_init.md``).
        own_answers: train on the starting model's own greedy answers (at most ``own_answer_tokens`` tokens)
            instead of the dataset's responses (:mod:`lite.training.own_answers`), cached in the work folder,
            or in ``own_answers_cache`` (a JSONL file kept across runs: its entries are keyed by row, prompt,
            model and budget, so runs on the same rows share it and others regenerate).
            ``own_answers_batch_size`` prompts are generated together (the answers are the same).
        max_minutes: end training once this many minutes of training have passed (the run's training clock,
            over resumes), even if ``max_steps``/``epochs`` planned more: recipes compared at equal time. The
            learning-rate schedule still spans the planned steps, so plan about as many as fit.
        snapshot_minutes: with ``exit_modules`` or ``lora``, keep a loadable copy of the modules (or of the
            LoRA adapter) every this many minutes of training, at the first checkpoint after each (so
            ``save_steps`` sets the grain), in ``<out>.snapshots/step-NNNNNN`` (a few MB each; kept over
            resumes): score them with ``benchmarks/ceiling_per_exit.py`` for the curves against training
            minutes. A full fine-tuning run has no small copy to keep.
        state_cache_gb: with ``exit_modules``, keep the frozen backbone's states at the response positions of
            each sequence in memory (at every position for ``attention`` modules, which read the earlier ones),
            up to this many GiB, so that epochs after the first do not run the backbone
            (:class:`lite.training.hf_trainer.StateCache`); 0 turns it off. One process only.
        report_to: where Trainer also sends its logs: None or "none", "tensorboard", "wandb", or several (a
            list, or comma-separated); each needs its package installed. TensorBoard event files end up in
            ``<out>/runs``.
    """

    model: str | None = field(default=None, **_flag(
        "base model: folder, hub id, or smollm2-135m-instruct (default: the embedded default)"))
    data: list[str] | str | None = field(default=None, **_flag(
        "training rows: Alpaca (instruction, input, output), chat (messages) or TRL prompt/completion, in "
        "JSON/JSONL files, .parquet/.csv/.arrow files, dataset folders (save_to_disk) or hub dataset ids; "
        "SOURCE:SPLIT for a split other than train", nargs="+", metavar="PATH"))
    out: str | os.PathLike[str] | None = field(default=None, **_flag(
        "output folder (must not exist; <out>.partial is the work folder)", required=True))
    max_steps: int | None = field(default=None, **_flag(
        "stop after N optimiser steps (overrides --epochs)", type="positive_int"))
    epochs: float = field(default=3.0, **_flag("passes over the training rows (default 3)", type="positive_float"))
    lr: float | None = field(default=None, **_flag(
        "peak learning rate, cosine schedule (default 2e-5 full fine-tuning, 2e-4 LoRA, 1e-3 exit modules)",
        type="positive_float"))
    warmup_ratio: float = field(default=0.03, **_flag(
        "share of the steps over which the learning rate rises to --lr, in [0, 1) (default 0.03)",
        type="fraction"))
    batch_size: int = field(default=8, **_flag("rows per process per micro-batch (default 8)", type="positive_int"))
    grad_accum: int = field(default=1, **_flag("micro-batches per optimiser step (default 1)", type="positive_int"))
    max_length: int = field(default=DEFAULT_MAX_LENGTH, **_flag(
        f"tokens per row, cut at the end (default {DEFAULT_MAX_LENGTH})", type="positive_int"))
    lora: bool = field(default=False, **_flag("train a LoRA adapter instead of all weights", action="store_true"))
    lora_rank: int = field(default=16, **_flag("LoRA rank (default 16)", type="positive_int"))
    lora_alpha: int | None = field(default=None, **_flag("LoRA alpha (default: 2 x rank)", type="positive_int"))
    lora_dropout: float = field(default=0.0, **_flag(
        "dropout on the LoRA input, in [0, 1) (default 0)", type="fraction"))
    lora_targets: tuple[str, ...] = field(default=DEFAULT_LORA_TARGETS, **_flag(
        "comma-separated module names LoRA adapts (default: attention and MLP projections)", type="names"))
    baseline: bool = field(default=False, **_flag(
        "final-layer loss only (standard instruction tuning), for comparison", action="store_true"))
    exit_layers: str | list[int] | None = field(default=None, **_flag(
        "comma-separated exit layers ending at L (default: every L/8 from L/4, plus L)"))
    loss_weighting: str = field(default="uniform", **_flag(
        "uniform (paper) or increasing with depth (default uniform)", choices=list(LOSS_WEIGHTINGS)))
    final_weight: float | None = field(default=None, **_flag(
        "share of the loss on the final layer L, in [0, 1), the exits sharing the rest by --loss-weighting; with a "
        "trained backbone and --targets distill it holds the final layer to the frozen model (default: L weighs "
        "as one exit)", type="fraction", metavar="W"))
    prompt_format: str = field(default="auto", **_flag(
        "chat (the tokenizer's chat template), alpaca (the Stanford template), or auto: chat when the tokenizer "
        "has a chat template, else alpaca (default auto; recorded in lite_config.json)",
        choices=["auto", "chat", "alpaca"]))
    filters: list[str] | str | None = field(default=None, **_flag(
        "keep rows whose FIELD equals VALUE (repeatable; rows without FIELD are kept; a FIELD given several times "
        "keeps any of its values), e.g. status=ok for alpaca-libre", flag="--filter", action="append",
        metavar="FIELD=VALUE"))
    heldout_fraction: float = field(default=DEFAULT_HELDOUT_FRACTION, **_flag(
        f"share of rows kept aside for calibration (default {DEFAULT_HELDOUT_FRACTION:g})", type="fraction"))
    heldout_from: str | None = field(default=None, **_flag(
        "hold out exactly the rows MODEL (trained by lite train) held out, instead of drawing --heldout-fraction: "
        "its sources must come first in --data; for runs on more data measured on the same rows (e.g. "
        "smollm2-135m-lite)", metavar="MODEL"))
    seed: int = field(default=0, **_flag("seed of the held-out split and of training (default 0)", type="seed"))
    bf16: bool = field(default=False, **_flag("bf16 autocast (mixed precision)", action="store_true"))
    gradient_checkpointing: bool = field(default=False, **_flag(
        "recompute decoder blocks in backward (less memory, more time)", action="store_true"))
    save_steps: int = field(default=200, **_flag(
        "checkpoint (resume point) every N steps (default 200)", type="positive_int"))
    logging_steps: int = field(default=10, **_flag("log losses every N steps (default 10)", type="positive_int"))
    fsdp: bool = field(default=False, **_flag(
        "shard weights, gradients and optimiser state over the processes of torchrun (FSDP2, full shard, one "
        "unit per decoder block) instead of a copy in each (DDP); see docs/train.md", action="store_true"))
    dtype: str | None = field(default="float32", **_flag("weights dtype", shared="dtype"))
    device: str | None = field(default=None, **_flag(
        "cpu, cuda, mps, xpu (a type: under torchrun each process takes its own GPU)", shared="device"))
    loss_mode: str = field(default="fused", **_flag(
        "how exit logits are kept for backward (default fused; see docs/train.md)", choices=list(LOSS_MODES)))
    chunk_size: int = field(default=DEFAULT_CHUNK_SIZE, **_flag(
        f"response positions per LM-head chunk in the exit losses (default {DEFAULT_CHUNK_SIZE})",
        type="positive_int"))
    recipe: str | None = field(default=None, **_flag(
        "what --exit-modules, --targets and --own-answers default to: exit-modules (affine modules on the frozen "
        "backbone, distill, own answers: the recipe the comparison chose) or paper (the paper's LITE: the "
        "backbone, CE on the dataset's responses); default paper with --lora, --baseline or --fsdp, else "
        "exit-modules", choices=list(RECIPES)))
    targets: str | None = field(default=None, **_flag(
        "what each exit learns: data (the paper: CE on the response tokens), distill (KL toward the starting "
        "model's final layer), mixed (--ce-weight x CE + the rest x KL); default: the recipe's (distill for "
        "exit-modules, data for paper)", choices=list(TARGETS)))
    ce_weight: float = field(default=0.5, **_flag("share of CE in --targets mixed (default 0.5)", type="probability"))
    exit_modules: str | None = field(default=None, **_flag(
        "freeze the backbone and train one small module per exit below L (attention: a decoder block that "
        "attends over earlier positions); the output holds only the modules (see docs/train.md); default: the "
        "recipe's (affine for exit-modules, none for paper)",
        choices=list(EXIT_MODULE_KINDS)))
    exit_init: str | None = field(default=None, **_flag(
        "how exit modules start: fit (affine only: the least-squares map from each exit's state to layer L's "
        "over the response tokens of --exit-fit-rows training sequences, one pass of the frozen backbone; "
        "training goes on from there) or identity (the raw exit); default: fit for affine modules, else "
        "identity", choices=list(EXIT_INITS)))
    exit_fit_rows: int = field(default=512, **_flag(
        "training sequences --exit-init fit reads, spread evenly over the data (default 512)", type="positive_int",
        metavar="N"))
    own_answers: bool | None = field(default=None, **_flag(
        "train on the starting model's own greedy answers instead of the dataset's responses (generated once, "
        "batched, cached in <out>.partial); default: the recipe's (yes for exit-modules, no for paper)",
        action="optional"))
    own_answer_tokens: int = field(default=128, **_flag("cap per own answer (default 128)", type="positive_int"))
    own_answers_batch_size: int = field(default=16, **_flag(
        "prompts whose own answers are generated together (default 16)", type="positive_int", metavar="N"))
    own_answers_cache: str | os.PathLike[str] | None = field(default=None, **_flag(
        "keep the own answers in FILE (JSONL) instead of <out>.partial, to share them between runs on the same "
        "rows and model", metavar="FILE"))
    max_minutes: float | None = field(default=None, **_flag(
        "end training after M minutes of training (over resumes), even if more steps were planned; the schedule "
        "still spans the planned steps (recipes compared at equal time)", type="positive_float", metavar="M"))
    snapshot_minutes: float | None = field(default=None, **_flag(
        "with --exit-modules or --lora: keep a loadable copy of the modules (or the adapter) every M minutes of "
        "training (at the next checkpoint) in <out>.snapshots/step-NNNNNN, for the curves against training minutes",
        type="positive_float", metavar="M"))
    state_cache_gb: float = field(default=4.0, **_flag(
        "with --exit-modules: keep the frozen backbone's states at the response positions (every position for "
        "attention modules) in memory, up to G GiB, so that epochs after the first skip the backbone (default 4; "
        "0: off)", type="nonnegative_float",
        metavar="G"))
    report_to: str | list[str] | None = field(default=None, **_flag(
        "also send the logs to TensorBoard (event files in <out>/runs) or Weights & Biases; comma-separated for "
        "both; needs the package installed (default none)", type="report_targets",
        metavar="none|tensorboard|wandb"))

    def trains_backbone(self) -> list[str]:
        """The flags given that train the backbone itself (``--lora``, ``--baseline``, ``--fsdp``)."""
        return [flag for flag, on in (("--lora", self.lora), ("--baseline", self.baseline), ("--fsdp", self.fsdp))
                if on]

    def resolve(self) -> TrainConfig:
        """The recipe's resolution: a copy with ``recipe``, ``exit_modules``, ``targets``, ``own_answers``,
        ``exit_init`` and ``lr`` as the run uses them. ``recipe`` None is "paper" when a flag trains the backbone, else
        :data:`DEFAULT_RECIPE`; the other three, where None, are the recipe's (:data:`RECIPES`); ``lr`` None
        is 1e-3 for exit modules, 2e-4 for LoRA, 2e-5 for full fine-tuning. Idempotent.

        Raises:
            TrainError: an unknown recipe, or the exit-modules recipe with a flag that trains the backbone.
        """
        backbone = self.trains_backbone()
        recipe = self.recipe if self.recipe is not None else "paper" if backbone else DEFAULT_RECIPE
        if recipe not in RECIPES:
            raise TrainError(f"--recipe must be one of {tuple(RECIPES)}, got {recipe!r}")
        if recipe == "exit-modules" and backbone and self.exit_modules is None:
            raise TrainError(f"--recipe exit-modules trains small modules on a frozen backbone; {backbone[0]} "
                             f"trains the backbone: use --recipe paper (the paper's LITE), or leave out "
                             f"{backbone[0]}")
        preset = RECIPES[recipe]
        exit_modules = self.exit_modules if self.exit_modules is not None else preset["exit_modules"]
        lr = self.lr if self.lr is not None else (1e-3 if exit_modules else 2e-4 if self.lora else 2e-5)
        targets = self.lora_targets  # the Python API may write them as the flag does: "q_proj,v_proj"
        if isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        exit_init = self.exit_init if self.exit_init is not None else \
            "fit" if exit_modules == "affine" else "identity"
        return replace(self, recipe=recipe, exit_modules=exit_modules, lr=lr, lora_targets=tuple(targets),
                       exit_init=exit_init,
                       targets=self.targets if self.targets is not None else preset["targets"],
                       own_answers=self.own_answers if self.own_answers is not None else preset["own_answers"])

    def validate(self) -> None:
        """Refuse what cannot run, naming the flag; checks the resolved configuration (:meth:`resolve`).
        Files are not looked at here (the output folder, the data, the model: :func:`train` checks them).

        Raises:
            TrainError: the first unusable value, with the flag and the fix.
        """
        c = self.resolve()
        from ..model.loading import parse_device

        target = parse_device(c.device)
        if target.index is not None:
            raise TrainError(f"--device {c.device}: lite train takes a device type (cpu, cuda, mps, xpu); pick one "
                             f"GPU with CUDA_VISIBLE_DEVICES, or several with torchrun")
        if c.loss_weighting not in LOSS_WEIGHTINGS:
            raise TrainError(f"--loss-weighting must be one of {LOSS_WEIGHTINGS}, got {c.loss_weighting!r}")
        if c.final_weight is not None:
            if not (0.0 <= c.final_weight < 1.0):
                raise TrainError(f"--final-weight must be in [0, 1), got {c.final_weight}")
            if c.exit_modules or c.baseline:
                raise TrainError("--final-weight weighs the final layer's loss against the exits'; with "
                                 + ("--exit-modules the backbone is frozen and layer L has no loss"
                                    if c.exit_modules else "--baseline only layer L is trained")
                                 + ": leave out --final-weight")
        if c.prompt_format not in ("auto", *PROMPT_FORMATS):
            raise TrainError(f"--prompt-format must be one of {('auto', *PROMPT_FORMATS)}, got {c.prompt_format!r}")
        if c.loss_mode not in LOSS_MODES:
            raise TrainError(f"--loss-mode must be one of {LOSS_MODES}, got {c.loss_mode!r}")
        for flag, value in (("--batch-size", c.batch_size), ("--grad-accum", c.grad_accum),
                            ("--max-length", c.max_length), ("--lora-rank", c.lora_rank),
                            ("--save-steps", c.save_steps)):
            if value < 1:
                raise TrainError(f"{flag} must be at least 1, got {value}")
        if c.max_steps is not None and c.max_steps < 1:
            raise TrainError(f"--max-steps must be at least 1, got {c.max_steps}")
        if c.data is None:
            raise TrainError(f"--data is required: {FORMATS_HELP}")
        if c.out is None:
            raise TrainError("--out is required: the output folder (it must not exist yet)")
        if c.targets not in TARGETS:
            raise TrainError(f"--targets must be one of {TARGETS}, got {c.targets!r}")
        if not 0.0 <= c.ce_weight <= 1.0:
            raise TrainError(f"--ce-weight must be in [0, 1], got {c.ce_weight}")
        for flag, value in (("--lr", c.lr), ("--epochs", c.epochs), ("--max-minutes", c.max_minutes),
                            ("--snapshot-minutes", c.snapshot_minutes)):  # the CLI checks these too
            if value is not None and not (value > 0 and math.isfinite(value)):  # NaN fails both
                raise TrainError(f"{flag} must be a finite number > 0, got {value}")
        if not (c.state_cache_gb >= 0 and math.isfinite(c.state_cache_gb)):
            raise TrainError(f"--state-cache-gb must be a finite number >= 0 (0: no cache), got {c.state_cache_gb}")
        if c.snapshot_minutes is not None and c.exit_modules is None and not c.lora:
            raise TrainError("--snapshot-minutes keeps small copies (exit modules or a LoRA adapter, a few MB "
                             "each) and needs --exit-modules or --lora; a full fine-tuning run keeps its last "
                             "checkpoints in OUT.partial")
        if c.exit_modules is not None:
            if c.exit_modules not in EXIT_MODULE_KINDS:
                raise TrainError(f"--exit-modules must be one of {EXIT_MODULE_KINDS}, got {c.exit_modules!r}")
            if c.lora or c.baseline:
                raise TrainError("--exit-modules trains small modules on a frozen backbone: leave out "
                                 f"{'--lora' if c.lora else '--baseline'}")
        if c.exit_init not in EXIT_INITS:
            raise TrainError(f"--exit-init must be one of {EXIT_INITS}, got {c.exit_init!r}")
        if c.exit_init == "fit" and c.exit_modules != "affine":
            raise TrainError("--exit-init fit fits affine exit modules in closed form: use it with --exit-modules "
                             f"affine (got {c.exit_modules or 'no exit modules'})")
        if c.exit_fit_rows < 1:
            raise TrainError(f"--exit-fit-rows must be at least 1, got {c.exit_fit_rows}")
        if c.own_answer_tokens < 1:
            raise TrainError(f"--own-answer-tokens must be at least 1, got {c.own_answer_tokens}")
        if c.own_answers_batch_size < 1:
            raise TrainError(f"--own-answers-batch-size must be at least 1, got {c.own_answers_batch_size}")
        for flag, value in (("--warmup-ratio", c.warmup_ratio), ("--lora-dropout", c.lora_dropout)):
            if not (math.isfinite(value) and 0.0 <= value < 1.0):
                raise TrainError(f"{flag} must be in [0, 1), got {value}")
        if c.lora_alpha is not None and not c.lora_alpha > 0:
            raise TrainError(f"--lora-alpha must be > 0, got {c.lora_alpha}")
        if c.chunk_size < 1:
            raise TrainError(f"--chunk-size must be at least 1, got {c.chunk_size}")
        report_destinations(c.report_to)
        if c.fsdp and world_size() < 2:
            raise TrainError("--fsdp shards the model over several processes: start lite train under torchrun "
                             "--nproc_per_node N (or accelerate launch)")
        if c.fsdp and c.exit_modules:
            raise TrainError("--fsdp shards a trained backbone; --exit-modules trains a few MB on a frozen one: "
                             "leave out --fsdp (several processes use DDP)")
        if c.fsdp and c.targets != "data":
            raise TrainError(f"--fsdp with --targets {c.targets}: the teacher's forward is not sharded (a full "
                             f"frozen copy, or the base model called outside the sharded forward); use --targets "
                             f"data, or leave out --fsdp")


__all__ = ["DEFAULT_LORA_TARGETS", "DEFAULT_RECIPE", "RECIPES", "TARGETS", "TrainConfig", "TrainError",
           "report_destinations"]
