"""Which of Trainer's checkpoints a run may resume from: the one place that decides completeness.

Trainer writes ``checkpoint-N/`` file by file (weights, optimiser, scheduler, RNG states, trainer state),
then lite's callbacks add the training clock; then Trainer deletes older checkpoints. A kill can stop any
of this half way, leaving a folder that looks like a checkpoint and is not one. So a checkpoint counts only
once lite has written its marker, :data:`COMPLETE_FILE`, last of all (atomically), listing every file of the
folder with its size; it is complete while the marker is there and every file it lists is there with that
size (a deletion cut short by a kill, or a file cut short, makes it incomplete again).

* :func:`complete_callback`: writes the marker at each save; it must be the last callback.
* :func:`last_complete`: the checkpoint to resume from (the highest-numbered complete one), or None.
* :func:`drop_incomplete`: removes the folders that are not complete (marker first), before a resume.
* :func:`log_at_checkpoints_callback`: a log entry at every checkpoint and at the last step, so that the
  losses a resumed run logs are those an uninterrupted run logs (Trainer averages the loss since the last
  log entry, and a resumed run starts counting at its checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..files import is_temporary_of, write_json_atomic

COMPLETE_FILE = "lite_checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _files(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` but the marker and lite's temporaries: {relative path: size in bytes}."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != COMPLETE_FILE and not is_temporary_of(path.name, COMPLETE_FILE):
            out[path.relative_to(folder).as_posix()] = path.stat().st_size
    return out


def mark_complete(folder: Path, step: int) -> None:
    """Write the marker that makes ``folder`` (a finished ``checkpoint-N``) resumable."""
    write_json_atomic(folder / COMPLETE_FILE, {"global_step": step, "files": _files(folder)})


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds lite's marker and every file it lists, with the size it lists."""
    try:
        marker = json.loads((folder / COMPLETE_FILE).read_text(encoding="utf-8"))
        files = marker["files"]
        return bool(files) and all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def checkpoints(work: Path) -> list[Path]:
    """The ``checkpoint-N`` folders of a work folder, complete or not, by increasing N."""
    if not work.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in work.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _counts(folder: Path, unmarked: list[Path]) -> bool:
    return is_complete(folder) or (folder in unmarked and (folder / "trainer_state.json").is_file())


def _unmarked(work: Path, legacy: bool) -> list[Path]:
    """A run begun by a lite that wrote no markers (``legacy``): its checkpoints below every marked one, which
    count as they did then (Trainer's state file is there). None for any other run."""
    if not legacy:
        return []
    found = checkpoints(work)
    marked = [int(p.name.split("-")[1]) for p in found if (p / COMPLETE_FILE).is_file()]
    return [p for p in found if not (p / COMPLETE_FILE).is_file() and int(p.name.split("-")[1]) < min(marked, default=1 << 62)]


def last_complete(work: Path, legacy: bool = False) -> str | None:
    """The highest-numbered complete checkpoint of ``work`` (as Trainer takes it: a string), or None.
    ``legacy``: the run was begun by a lite that wrote no markers; its unmarked checkpoints count too."""
    unmarked = _unmarked(work, legacy)
    return next((str(p) for p in reversed(checkpoints(work)) if _counts(p, unmarked)), None)


def drop_incomplete(work: Path, legacy: bool = False) -> list[Path]:
    """Remove the checkpoint folders of ``work`` that are not complete (what a kill left half written or
    half deleted), marker first, so that a removal cut short leaves nothing that counts. Returns them.
    ``legacy``: as for :func:`last_complete`; the checkpoints of the older lite are kept."""
    unmarked = _unmarked(work, legacy)
    dropped = [p for p in checkpoints(work) if not _counts(p, unmarked)]
    for folder in dropped:
        (folder / COMPLETE_FILE).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
    return dropped


def is_final(checkpoint: str) -> bool:
    """True when the checkpoint's Trainer state says all planned steps were done."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return bool(state.get("max_steps")) and state.get("global_step", 0) >= state["max_steps"]


def complete_callback():
    """A callback that marks each new checkpoint complete once everything else wrote it (Trainer's files,
    then the other callbacks' additions): list it last. Under several processes it waits for all of them
    (each writes its own RNG state) and the first process writes the marker."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir() and int(os.environ.get("RANK", "0")) == 0:
                mark_complete(folder, state.global_step)
            return control

    return MarkComplete()


def log_at_checkpoints_callback():
    """A callback that forces a log entry at every checkpoint and at the last step (so the final per-layer
    losses are known, and a resumed run logs what an uninterrupted one does)."""
    from transformers import TrainerCallback

    class LogAtCheckpoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save or (state.max_steps and state.global_step >= state.max_steps):
                control.should_log = True
            return control

    return LogAtCheckpoints()
