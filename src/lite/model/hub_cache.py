"""Placing a local model folder where Hugging Face tools look for a hub id offline: the hub cache layout.

``from_pretrained("owner/name")`` without network (``HF_HUB_OFFLINE=1``) reads
``$HF_HUB_CACHE/models--owner--name/refs/main`` (a revision) and then the files of
``snapshots/<revision>/``. lite puts the embedded default there once, under its hub id, so that
transformers, peft (an adapter naming that base) and other tools load it offline like any downloaded model.

The files are hard links to the local folder where the file system allows (no second copy on disk),
copies elsewhere; they sit in the snapshot itself, as in the hub cache on systems without symlinks. An
entry that already exists (for instance the real download) is never touched: with network, transformers
moves ``refs/main`` to the hub's revision and downloads that as usual.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ..files import folder_in_place, process_prefix, sweep_dead_temporaries, write_atomic


def hub_cache_dir() -> Path:
    """The hub cache transformers uses now (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``), read from huggingface_hub at call time."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_dir(hub_id: str, cache: str | os.PathLike[str] | None = None) -> Path:
    return Path(cache or hub_cache_dir()) / f"models--{hub_id.replace('/', '--')}"


def cached_snapshot(hub_id: str, cache: str | os.PathLike[str] | None = None) -> Path | None:
    """The snapshot folder ``refs/main`` points at, when the cache has one for ``hub_id``."""
    repo = repo_dir(hub_id, cache)
    try:
        revision = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = repo / "snapshots" / revision
    return snapshot if snapshot.is_dir() else None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def place_in_hub_cache(folder: str | os.PathLike[str], hub_id: str, *, cache: str | os.PathLike[str] | None = None,
                       extra: dict[str, str] | None = None) -> Path | None:
    """Make ``folder``'s files the cached snapshot of ``hub_id``, unless the cache already has that repo.

    Args:
        extra: more files for the snapshot, name -> text (e.g. a model card), written, not linked.
    Returns:
        The new snapshot folder, or None when an entry for ``hub_id`` was already there (left as is).
    """
    repo = repo_dir(hub_id, cache)
    if (repo / "refs" / "main").exists():
        return None
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    digest = hashlib.sha1(f"lite:{hub_id}".encode())  # a revision name of the hub's shape (40 hex digits)
    for p in files:
        digest.update(f"{p.name}:{p.stat().st_size};".encode())
    revision = digest.hexdigest()
    snapshots = repo / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True)
    snapshot = snapshots / revision
    sweep_dead_temporaries(snapshots, revision)  # what a killed placement left
    with folder_in_place(Path(tempfile.mkdtemp(prefix=process_prefix(revision), dir=snapshots)), snapshot) as tmp:
        for p in files:
            _link_or_copy(p, tmp / p.name)
        for name, text in (extra or {}).items():
            (tmp / name).unlink(missing_ok=True)  # a written file replaces a linked one, never edits it
            (tmp / name).write_text(text, encoding="utf-8")
    write_atomic(repo / "refs" / "main", revision)  # last: the entry exists only once it is complete
    return snapshot
