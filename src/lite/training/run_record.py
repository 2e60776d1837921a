"""The run's record, ``lite_run.json``: what makes an unfinished run in ``<out>.partial`` this command's own.

:func:`train <lite.training.train>` writes the record into the work folder before training, and a copy into
the finished output. Re-running a command compares the record it would write with the one there: the same
run resumes from its last complete checkpoint (:mod:`lite.training.checkpoints`), another is refused, a
finished one whose work folder a kill left behind is tidied up. Runs begun by any earlier lite must keep
resuming, so the keys of the record and their meaning never change; a setting added later is recorded only
when it is on (:func:`as_recorded_by_older_lite`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files import remove_own_files, write_json_atomic
from ..model.config import CONFIG_NAME
from .checkpoints import drop_incomplete, last_complete
from .config import TrainConfig, TrainError, report_destinations, world_size
from .fsdp import fsdp_config
from .hf_trainer import process_rank
from .own_answers import ANSWERS_FILE

RUN_FILE = "lite_run.json"
# what a run writes in its work folder (<out>.partial): only these are removed once the output is in place,
# in this order, the record that the folder is lite's last; the output holds a copy of that record, so
# the same command recognises its finished run beside what a kill while removing left, even an empty
# folder, and finishes the tidying
EXIT_FIT_FILE = "exit_fit.json"  # --exit-init fit: what the closed-form start read (lite.training.exit_fit)
WORK_FILES = ["checkpoint-*", "final", "runs", ANSWERS_FILE, RUN_FILE, EXIT_FIT_FILE]
UNMARKED = "unmarked_checkpoints"  # lite_run.json: the run was begun by a lite that wrote no checkpoint markers


def unmarked_run(record: Path) -> bool:
    """True when ``record`` (an unfinished run's lite_run.json) was written by a lite before checkpoint markers
    (it lacks :data:`UNMARKED`), or by one that resumed such a run (it says True): that run's checkpoints
    carry no marker and must not be taken for torn ones."""
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(recorded, dict) and recorded.get(UNMARKED, True) is True


def as_recorded_by_older_lite(now: Any, recorded: Any) -> Any:
    """``now`` (a run's settings) less the keys ``recorded`` lacks whose value is off (None, False, empty):
    settings a newer lite records at their default do not make an unfinished run of an older one differ."""
    if not (isinstance(now, dict) and isinstance(recorded, dict)):
        return now
    return {k: as_recorded_by_older_lite(v, recorded.get(k)) for k, v in now.items()
            if k in recorded or v not in (None, False, [], {}, "")}


def portable_model_spec(model: str | None) -> str:
    """What to record as base_model: the alias or hub id as given, a local folder as an absolute path."""
    from ..model.loading import DEFAULT_MODEL

    if model is None:
        return DEFAULT_MODEL
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def run_record(c: TrainConfig, lm, data: dict[str, Any], layers: list[int], train_layers: list[int],
               prompt_format: str, rows_dropped_too_long: int) -> dict[str, Any]:
    """The record of a run of ``c`` (resolved, :meth:`TrainConfig.resolve`) on ``lm``: the base model, the
    data's provenance, the exit layers, the weighting, the prompt format as resolved, and the training
    settings (also ``lite_config.json``'s ``training``)."""
    settings = {
        "lora": c.lora, "lora_rank": c.lora_rank if c.lora else None,
        "lora_alpha": (c.lora_alpha or 2 * c.lora_rank) if c.lora else None,
        "lora_dropout": c.lora_dropout if c.lora else None,
        "lora_targets": list(c.lora_targets) if c.lora else None, "baseline": c.baseline,
        "trained_layers": train_layers, "max_steps": c.max_steps, "epochs": c.epochs, "lr": c.lr,
        "lr_schedule": "cosine", "warmup_ratio": c.warmup_ratio, "batch_size": c.batch_size,
        "grad_accum": c.grad_accum, "world_size": world_size(),
        "max_length": c.max_length, "bf16": c.bf16, "gradient_checkpointing": c.gradient_checkpointing,
        "dtype": c.dtype, "seed": c.seed, "loss_mode": c.loss_mode, "chunk_size": c.chunk_size,
        "rows_dropped_too_long": rows_dropped_too_long, "targets": c.targets,
        "ce_weight": c.ce_weight if c.targets == "mixed" else None, "exit_modules": c.exit_modules,
        "responses": "own answers" if c.own_answers else "dataset",
        "own_answer_tokens": c.own_answer_tokens if c.own_answers else None,
        "report_to": report_destinations(c.report_to),
        "fsdp": fsdp_config(lm) if c.fsdp else None, "max_minutes": c.max_minutes,
        # only when given: records of runs begun before the flag existed stay equal, so they resume
        **({"final_weight": c.final_weight} if c.final_weight is not None else {}),
        **({"exit_init": c.exit_init, "exit_fit_rows": c.exit_fit_rows} if c.exit_init != "identity" else {}),
    }
    return {"model": portable_model_spec(c.model), "data": data, "exit_layers": layers,
            "loss_weighting": c.loss_weighting, "prompt_format": prompt_format, "training": settings}


def finished_record(out: Path, work: Path) -> Path | None:
    """The record of a finished run whose work folder is still there (a kill while removing it), or None.

    The output keeps a copy of the record; outputs of older lite have it only in the work folder."""
    record = next((f / RUN_FILE for f in (out, work) if (f / RUN_FILE).is_file()), None)
    tidying = out.exists() and work.is_dir() and (out / CONFIG_NAME).is_file() and record is not None
    return record if tidying else None


def claim_work_folder(record: dict[str, Any], out: Path, work: Path, finished: Path | None,
                      say: Callable[[str], None]) -> tuple[str | None, bool]:
    """Make ``work`` this run's: compare ``record`` with the one there, then write it (rank 0).

    Returns:
        (the checkpoint to resume from or None, False); or (None, True) when the run had finished
        (``finished``: its record, :func:`finished_record`) and only its work folder was left, now removed.
    Raises:
        TrainError: the work folder (or a finished output) holds a run with other settings, or an unreadable
            record.
    """
    previous = work / RUN_FILE
    legacy = unmarked_run(previous)  # begun by a lite that wrote no checkpoint markers: its checkpoints count
    record[UNMARKED] = legacy
    resume = last_complete(work, legacy)  # the only checkpoints that count are complete ones
    if finished is not None or (previous.is_file() and resume is not None):  # else there is nothing to resume
        record_path = finished if finished is not None else previous
        try:
            recorded = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TrainError(f"{record_path} cannot be read ({exc}); it records the run in {work}: delete {work} "
                             f"to start afresh") from None
        now = {k: v for k, v in json.loads(json.dumps(record)).items() if k != UNMARKED}
        recorded = {k: v for k, v in recorded.items() if k != UNMARKED} if isinstance(recorded, dict) else recorded
        same = recorded == as_recorded_by_older_lite(now, recorded)
        if finished is not None:
            if not same:
                raise TrainError(f"--out {out} already exists; choose a new folder or delete it (lite never "
                                 f"overwrites)")
            if process_rank() == 0:
                remove_own_files(work, WORK_FILES)
            say(f"the run had finished; removed its work folder {work}")
            return None, True
        if not same:
            raise TrainError(f"{work} holds an unfinished run with other settings; re-run the same command to "
                             f"resume it (a run begun before exit modules became the default recipe: add --recipe "
                             f"paper; one begun before affine modules started from the fit: add --exit-init "
                             f"identity), or delete {work} to start afresh")
    if process_rank() == 0:
        work.mkdir(parents=True, exist_ok=True)
        drop_incomplete(work, legacy)  # what a kill left half written, so that Trainer never counts it
        write_json_atomic(previous, record)
    return resume, False


__all__ = ["EXIT_FIT_FILE", "RUN_FILE", "UNMARKED", "WORK_FILES", "as_recorded_by_older_lite", "claim_work_folder",
           "finished_record", "portable_model_spec", "run_record", "unmarked_run"]
