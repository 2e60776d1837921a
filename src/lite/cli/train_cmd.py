"""`lite train`: train the exits. By default exit modules on the frozen model by self-distillation on its own
answers (``--recipe exit-modules``); ``--recipe paper`` is LITE instruction tuning as the paper does it (or
the final-layer baseline), full or LoRA.

Runs in one process, or in several with ``torchrun --nproc_per_node N -m lite train ...`` (only rank 0
writes the output). Re-running a killed command resumes from ``<out>.partial``'s last checkpoint.
"""

from __future__ import annotations

import argparse

from . import add_device_argument, add_dtype_argument, add_threads_argument
from .numbers import (
    nonnegative_float,
    number,
    positive_float,
    positive_int,
    probability,
    report_targets,
    seed,
)

EXAMPLE = ("lite train --data rows.jsonl --epochs 3 --out runs/mine   (the paper's recipe: lite train --recipe paper "
           "--data rows.jsonl --lora --max-steps 200 --out runs/paper; or: lite train --config run.yaml)")

# The typed function behind this verb, and how its parameters meet the flags: a parameter is the flag of
# the same name, the flag named here, or (None) a Python-only argument. tests/test_cli.py fails when a
# parameter has no flag or run() leaves one out, so the CLI and the function cannot drift apart.
CONTRACT = {"lite.training.train": {"filters": "filter", "show_progress_bar": "no_progress_bar", "progress": None}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="base model: folder, hub id, or smollm2-135m-instruct (default: the embedded default)")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="training rows: Alpaca (instruction, input, output), chat (messages) or TRL "
                        "prompt/completion, in JSON/JSONL files, .parquet/.csv/.arrow files, dataset folders "
                        "(save_to_disk) or hub dataset ids; SOURCE:SPLIT for a split other than train")
    p.add_argument("--out", required=True, help="output folder (must not exist; <out>.partial is the work folder)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after N optimiser steps (overrides --epochs)")
    p.add_argument("--epochs", type=positive_float, default=3.0, help="passes over the training rows (default 3)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate, cosine schedule "
                   "(default 2e-5 full fine-tuning, 2e-4 LoRA, 1e-3 exit modules)")
    p.add_argument("--warmup-ratio", type=number(float, 0, 1, high_open=True), default=0.03,
                   help="share of the steps over which the learning rate rises to --lr, in [0, 1) (default 0.03)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per process per micro-batch (default 8)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimiser step (default 1)")
    p.add_argument("--max-length", type=positive_int, default=256, help="tokens per row, cut at the end (default 256)")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    p.add_argument("--lora-rank", type=positive_int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=positive_int, default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--lora-dropout", type=number(float, 0, 1, high_open=True), default=0.0,
                   help="dropout on the LoRA input, in [0, 1) (default 0)")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names LoRA adapts (default: attention and MLP projections)")
    p.add_argument("--baseline", action="store_true",
                   help="final-layer loss only (standard instruction tuning), for comparison")
    p.add_argument("--exit-layers", default=None,
                   help="comma-separated exit layers ending at L (default: every L/8 from L/4, plus L)")
    p.add_argument("--loss-weighting", default="uniform", choices=["uniform", "increasing"],
                   help="uniform (paper) or increasing with depth (default uniform)")
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "alpaca"],
                   help="chat (the tokenizer's chat template), alpaca (the Stanford template), or auto: chat "
                        "when the tokenizer has a chat template, else alpaca (default auto; recorded in "
                        "lite_config.json)")
    p.add_argument("--filter", action="append", default=None, metavar="FIELD=VALUE",
                   help="keep rows whose FIELD equals VALUE (repeatable; rows without FIELD are kept; a FIELD "
                        "given several times keeps any of its values), e.g. status=ok for alpaca-libre")
    p.add_argument("--heldout-fraction", type=number(float, 0, 1, high_open=True), default=0.05,
                   help="share of rows kept aside for calibration (default 0.05)")
    p.add_argument("--heldout-from", default=None, metavar="MODEL",
                   help="hold out exactly the rows MODEL (trained by lite train) held out, instead of drawing "
                        "--heldout-fraction: its sources must come first in --data; for runs on more data "
                        "measured on the same rows (e.g. smollm2-135m-lite)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the held-out split and of training (default 0)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (mixed precision)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute decoder blocks in backward (less memory, more time)")
    p.add_argument("--save-steps", type=positive_int, default=200,
                   help="checkpoint (resume point) every N steps (default 200)")
    p.add_argument("--logging-steps", type=positive_int, default=10, help="log losses every N steps (default 10)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and optimiser state over the processes of torchrun (FSDP2, full "
                        "shard, one unit per decoder block) instead of a copy in each (DDP); see docs/train.md")
    add_dtype_argument(p, "float32")
    add_device_argument(p)
    add_threads_argument(p)
    p.add_argument("--loss-mode", default="fused", choices=["fused", "checkpoint", "plain"],
                   help="how exit logits are kept for backward (default fused; see docs/train.md)")
    p.add_argument("--chunk-size", type=positive_int, default=512,
                   help="response positions per LM-head chunk in the exit losses (default 512)")
    p.add_argument("--recipe", default=None, choices=["exit-modules", "paper"],
                   help="what --exit-modules, --targets and --own-answers default to: exit-modules (affine "
                        "modules on the frozen backbone, distill, own answers: the recipe the comparison chose) "
                        "or paper (the paper's LITE: the backbone, CE on the dataset's responses); default "
                        "paper with --lora, --baseline or --fsdp, else exit-modules")
    p.add_argument("--targets", default=None, choices=["data", "distill", "mixed"],
                   help="what each exit learns: data (the paper: CE on the response tokens), distill (KL toward "
                        "the starting model's final layer), mixed (--ce-weight x CE + the rest x KL); default: "
                        "the recipe's (distill for exit-modules, data for paper)")
    p.add_argument("--ce-weight", type=probability, default=0.5, help="share of CE in --targets mixed (default 0.5)")
    p.add_argument("--exit-modules", default=None, choices=["affine", "mlp"],
                   help="freeze the backbone and train one small module per exit below L; the output holds "
                        "only the modules (see docs/train.md); default: the recipe's (affine for exit-modules, "
                        "none for paper)")
    p.add_argument("--own-answers", action=argparse.BooleanOptionalAction, default=None,
                   help="train on the starting model's own greedy answers instead of the dataset's responses "
                        "(generated once, batched, cached in <out>.partial); default: the recipe's (yes for "
                        "exit-modules, no for paper)")
    p.add_argument("--own-answer-tokens", type=positive_int, default=128, help="cap per own answer (default 128)")
    p.add_argument("--own-answers-batch-size", type=positive_int, default=16, metavar="N",
                   help="prompts whose own answers are generated together (default 16)")
    p.add_argument("--own-answers-cache", default=None, metavar="FILE",
                   help="keep the own answers in FILE (JSONL) instead of <out>.partial, to share them between runs "
                        "on the same rows and model")
    p.add_argument("--max-minutes", type=positive_float, default=None, metavar="M",
                   help="end training after M minutes of training (over resumes), even if more steps were "
                        "planned; the schedule still spans the planned steps (recipes compared at equal time)")
    p.add_argument("--snapshot-minutes", type=positive_float, default=None, metavar="M",
                   help="with --exit-modules: keep a loadable copy of the modules every M minutes of training "
                        "(at the next checkpoint) in <out>.snapshots/step-NNNNNN, for the curve of agreement "
                        "against training minutes")
    p.add_argument("--state-cache-gb", type=nonnegative_float, default=4.0, metavar="G",
                   help="with --exit-modules: keep the frozen backbone's states at the response positions in "
                        "memory, up to G GiB, so that epochs after the first skip the backbone (default 4; 0: off)")
    p.add_argument("--report-to", type=report_targets, default=None, metavar="none|tensorboard|wandb",
                   help="also send the logs to TensorBoard (event files in <out>/runs) or Weights & Biases; "
                        "comma-separated for both; needs the package installed (default none)")
    p.add_argument("--no-progress-bar", action="store_true", help="no tqdm bar (logs still print)")


def run(args: argparse.Namespace) -> int:
    from ..training import loss_summary, train
    from . import progress

    result = train(
        args.model, args.data, args.out, max_steps=args.max_steps, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length, lora=args.lora,
        lora_rank=args.lora_rank, lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        baseline=args.baseline, exit_layers=args.exit_layers,
        loss_weighting=args.loss_weighting, prompt_format=args.prompt_format, filters=args.filter,
        heldout_fraction=args.heldout_fraction, heldout_from=args.heldout_from, seed=args.seed, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, save_steps=args.save_steps,
        logging_steps=args.logging_steps, dtype=args.dtype, device=args.device, loss_mode=args.loss_mode, progress=progress,
        show_progress_bar=not args.no_progress_bar, recipe=args.recipe, targets=args.targets, ce_weight=args.ce_weight,
        exit_modules=args.exit_modules, own_answers=args.own_answers, own_answer_tokens=args.own_answer_tokens,
        own_answers_cache=args.own_answers_cache, own_answers_batch_size=args.own_answers_batch_size, snapshot_minutes=args.snapshot_minutes,
        max_minutes=args.max_minutes, state_cache_gb=args.state_cache_gb, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        warmup_ratio=args.warmup_ratio, chunk_size=args.chunk_size, report_to=args.report_to, fsdp=args.fsdp,
    )
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        progress(f"done: {result.steps} steps, {loss_summary(result)}")
        print(result.output_dir)
    return 0
