"""Writing files so that nothing already written is lost or left half-written.

Every file lite writes goes through here: a temporary file in the same folder, then a rename, so readers
see the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import LiteError


def temporary_beside(path: Path) -> str:
    """A new empty temporary file in ``path``'s folder, for writing ``path`` atomically (then
    ``os.replace``). It gets the permissions an ordinary new file gets under the umask (``mkstemp`` makes it
    private, 0600, which would leave a shared or packaged checkpoint unreadable to everyone else). Its name
    records this process (:func:`process_prefix`), so the temporaries of killed writes of ``path`` are
    removed here, before the next write."""
    sweep_dead_temporaries(path.parent, glob.escape(path.name))  # what a killed write of it left
    fd, tmp = tempfile.mkstemp(prefix=process_prefix(path.name), dir=path.parent)
    os.fchmod(fd, ordinary_mode())
    os.close(fd)
    return tmp


def ordinary_mode() -> int:
    """The permissions of a new file under the current umask (0o644 under the usual 022). Writers that
    replace the temporary file themselves (safetensors' ``save_file``) apply it again before the rename."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write a file so that readers see the old file or the new one, never half of one (a temporary file
    in the same folder, then a rename); an interrupted write leaves the old file and no temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON (indent 2, trailing newline) atomically, see :func:`write_atomic`."""
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def is_temporary_of(entry: str, names: str | tuple[str, ...] | list[str]) -> bool:
    """Whether ``entry`` (a file name) is a temporary lite made to write one of ``names`` atomically
    (:func:`temporary_beside`: ``.<name>.<random>``); a kill between its creation and the rename leaves one."""
    names = (names,) if isinstance(names, str) else names
    return any(entry.startswith(f".{name}.") and len(entry) > len(name) + 2 for name in names)


WRITE_FAILURES = {errno.EROFS: "a read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "not permitted", errno.ENOENT: "it accepts no new files"}


PROBE = "lite-write-check"  # the name of check_writable's probe files (their process's temporaries)


def check_writable(folder: str | os.PathLike[str], flag: str = "--out", fix: str | None = None) -> Path:
    """Refuse a folder lite could not write into, before anything is loaded: one check for every verb.

    The nearest part of ``folder`` that exists must be a folder in which a file can be created (tried, not
    inferred from permission bits: those say nothing under ``/proc`` or on a read-only file system, or to
    root). The probe file is removed at once; one left by a process killed in between is removed by the
    next check of that folder.

    Args:
        folder: the folder lite will write (it need not exist yet).
        flag: what named it, for the message (``--out``, ``--model``, ``$LITE_HOME``).
        fix: what to do instead (default: choose a folder you can write, with an example for ``flag``).
    Returns:
        The path, expanded.
    Raises:
        LiteError: naming the flag, the folder, why, and the fix.
    """
    from .errors import LiteError

    path = Path(folder).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LiteError(f"{flag} {path}: {existing} is a file, not a folder; choose another place")
    try:
        sweep_dead_temporaries(existing, PROBE)  # a probe whose process was killed before removing it
        fd, probe = tempfile.mkstemp(prefix=process_prefix(PROBE), dir=existing)
    except OSError as exc:
        reason = WRITE_FAILURES.get(exc.errno, exc.strerror or str(exc))
        fix = fix or f"choose a folder you can write, e.g. {flag} ~/lite-runs/{path.name or 'out'}"
        raise LiteError(f"{flag} {path}: {existing} is not writable ({reason}); {fix}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_output_folder(folder: str | os.PathLike[str], record: str | tuple[str, ...],
                        flag: str = "--out") -> Path:
    """The folder a verb may write into: new, empty, or one lite made before (it holds lite's ``record``).

    A folder that holds files without lite's record file is someone else's: lite refuses it rather than
    adopt it, so it never overwrites or deletes a user's files; one that holds only temporaries of the
    record (a run killed while writing it) is lite's. Also refused: an empty path, ``.`` or a path that
    names the current folder, a file, a place lite cannot write (:func:`check_writable`).

    Args:
        folder: the path given by the user.
        record: the file (or files) lite writes first in such a folder (``lite_run.json``, ``run.json``).
        flag: the flag that named the folder, for the message.
    Returns:
        The path (not created here).
    Raises:
        LiteError: naming the flag, the problem and the fix.
    """
    from .errors import LiteError

    text = str(folder)
    path = Path(text).expanduser()
    if not text.strip() or path.resolve() == Path.cwd().resolve():
        raise LiteError(f"{flag} {text!r} is the current folder (or empty): give a new folder name, e.g. "
                        f"{flag} runs/new")
    if path.exists() and not path.is_dir():
        raise LiteError(f"{flag} {path} is a file, not a folder: give a new folder name")
    records = (record,) if isinstance(record, str) else record
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        if entries and not any(r in entries or any(is_temporary_of(e, r) for e in entries) for r in records):
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise LiteError(f"{flag} {path} holds files lite did not write ({shown}); lite never adopts or "
                            f"deletes them: give a new folder")
    return check_writable(path, flag)


def remove_own_files(folder: Path, names: list[str]) -> bool:
    """Delete what lite wrote in ``folder`` (the entries ``names``, files or folders, glob patterns
    allowed, in that order, with any temporaries a killed write of them left), then the folder itself if
    nothing else is left. Returns True when the folder is gone."""
    for pattern in names:
        for path in [*folder.glob(pattern), *folder.glob(f".{pattern}.*")]:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        return False
    return True


def process_prefix(name: str) -> str:
    """The name prefix of a temporary folder made by this process for ``name``:
    ``.<name>.tmp-<host>-<pid>-``, so that a later run can tell a live writer's folder from a killed one's
    (:func:`sweep_dead_temporaries`)."""
    host = socket.gethostname().replace("-", "_") or "host"
    return f".{name}.tmp-{host}-{os.getpid()}-"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine still runs (True when that cannot be told)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists (another user's), or we cannot tell: keep its folder
    return True


def sweep_dead_temporaries(folder: Path, name: str = "*") -> list[Path]:
    """Remove the temporary files and folders (:func:`process_prefix`, for ``name``: a glob) that killed
    processes of this machine left in ``folder``; a live process's, or another machine's, are kept. Returns
    what was removed."""
    import re

    if not folder.is_dir():
        return []
    host = socket.gethostname().replace("-", "_") or "host"
    removed = []
    for tmp in folder.glob(f".{name}.tmp-{host}-*-*"):
        found = re.search(rf"\.tmp-{re.escape(host)}-(\d+)-[^-]*$", tmp.name)
        if not found or tmp.is_symlink() or process_alive(int(found.group(1))):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


# File extensions of what lite reads from disk: a name ending in one is a path, never a hub id.
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".gz", ".zip", ".safetensors",
                 ".bin", ".pt", ".gguf", ".md")


@contextmanager
def folder_in_place(tmp: Path, target: Path) -> Iterator[Path]:
    """Fill the temporary folder ``tmp`` (beside ``target``) in the ``with`` block; then it becomes
    ``target`` in one rename, unless another process made ``target`` first (then ``tmp`` is dropped). On any
    failure, an interrupt included, ``tmp`` is removed: readers see no folder or a complete one."""
    try:
        yield tmp
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_text(path: Path, error: type[LiteError], fix: str, prefix: str = "") -> str:
    """The UTF-8 text of a data file lite reads (training rows, test sets). A file that cannot be read, is
    not UTF-8, or holds binary data (NUL bytes) raises ``error`` naming the file, the fault and ``fix``
    (e.g. "give a JSONL or JSON file"); ``prefix`` names the flag it came from."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{prefix}{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                    f"{exc.start}); {fix}, saved as UTF-8") from None
    except OSError as exc:
        raise error(f"{prefix}{path}: cannot read it ({exc.strerror or exc})") from None
    if "\x00" in text:
        raise error(f"{prefix}{path} holds binary data (NUL bytes), not JSON text; {fix}")
    return text


def looks_like_hub_id(text: str) -> bool:
    """Whether a name that is no local path should be tried on the Hugging Face hub (needs network).

    Only ``owner/name``: one ``/``, no leading ``.``, ``/`` or ``~``, no spaces, a name that does not end in
    a file extension lite reads (``data/train.jsonl`` is a missing file, not a dataset id) and an owner
    that is not a folder here (``runs/new`` beside a ``runs/`` folder is a missing path). Everything else
    that does not exist is reported as a missing file at once, without a network attempt.
    """
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or any(c.isspace() for c in text):
        return False
    owner, name = text.split("/")
    if not owner or not name or name.lower().endswith(FILE_SUFFIXES):
        return False
    return not Path(owner).is_dir()
