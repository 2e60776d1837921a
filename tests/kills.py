"""Killing a lite run with SIGKILL at a chosen instant, reproducibly, for the kill-resume tests.

An *instant* is the n-th change the run makes to the file system under a root folder (a file opened for
writing, a rename, a removal, a folder made or removed; the binary writers of torch and safetensors count
too), counted by an audit hook (``sys.addaudithook``). :func:`run_killed` forks this process (the imports
are already paid for), installs the hook in the child only, and runs ``job()`` there; at instant ``n`` the
child sends itself SIGKILL, before that change is made. With ``torn=True`` the file written last is first
cut to half its size: a kill in the middle of writing it. ``kill_at=None`` runs to the end and returns the
instants the run made, which is how a test learns where it can kill (and the baseline's output).

The parent never runs the hook, so nothing in the rest of the suite is affected.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@dataclass
class Outcome:
    """How a forked run ended: ``killed`` (SIGKILL at the instant), else its exit status (0: ``job`` returned,
    1: it raised, the traceback in ``error``); ``instants`` lists (event, path) of every change counted."""

    killed: bool
    status: int
    instants: list[tuple[str, str]]
    error: str = ""


def _write_open(args) -> bool:
    _path, mode, flags = (list(args) + [None, None, None])[:3]
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & WRITE_FLAGS)


class _Killer:
    """The audit hook of the child: counts the instants under ``root`` and kills at ``kill_at``."""

    def __init__(self, root: Path, kill_at: int | None, torn: bool) -> None:
        self.root, self.kill_at, self.torn = str(root.resolve()), kill_at, torn
        self.instants: list[tuple[str, str]] = []
        self.last_written: str | None = None
        self.busy = False

    def _mine(self, path) -> str | None:
        if isinstance(path, int) or path is None:
            return None
        text = os.fsdecode(path)
        full = os.path.abspath(text)
        return full if full.startswith(self.root) else None

    def instant(self, event: str, path: str) -> None:
        """One change about to be made: kill here if it is the chosen one, else count it."""
        if self.kill_at is not None and len(self.instants) == self.kill_at:
            if self.torn and self.last_written and os.path.isfile(self.last_written):
                size = os.path.getsize(self.last_written)
                os.truncate(self.last_written, size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        self.instants.append((event, path))

    def __call__(self, event: str, args) -> None:
        if self.busy:
            return
        self.busy = True
        try:
            path = None
            if event == "open" and _write_open(args):
                path = self._mine(args[0])
                if path:
                    self.instant("write", path)
                    self.last_written = path
                    return
            elif event in ("os.rename", "os.link"):
                path = self._mine(args[0]) or self._mine(args[1])
            elif event in ("os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate"):
                path = self._mine(args[0])
                dir_fd = args[-1] if event != "os.truncate" else None
                if path is None and isinstance(dir_fd, int) and dir_fd >= 0:  # inside shutil.rmtree
                    path = f"<in a tree>/{os.fsdecode(args[0])}"
            if path:
                self.instant(event, path)
        finally:
            self.busy = False

    def binary_writer(self, real: Callable, path_arg: int) -> Callable:
        """``real`` (torch.save, safetensors' save_file: native code the hook does not see) counted as a
        write of its path argument."""
        def counted(*args, **kwargs):
            target = args[path_arg] if len(args) > path_arg else kwargs.get("f", kwargs.get("filename"))
            path = self._mine(target) if isinstance(target, (str, os.PathLike)) else None
            if path:
                self.instant("write", path)
            result = real(*args, **kwargs)
            if path:
                self.last_written = path
            return result

        return counted


def _wrap_binary_writers(killer: _Killer) -> None:
    import safetensors.torch
    import torch

    for real, path_arg in ((torch.save, 1), (safetensors.torch.save_file, 1)):
        counted = killer.binary_writer(real, path_arg)
        for module in list(sys.modules.values()):  # every module that bound the function by name
            for name, value in list(getattr(module, "__dict__", {}).items()):
                if value is real:
                    setattr(module, name, counted)


def _cap_memory(gib: float) -> None:
    """Let this process map at most ``gib`` GiB more than it maps now (an allocation past it fails at once)."""
    import resource

    mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + int(gib * 2**30), hard))


def run_killed(job: Callable[[], object], root: Path, kill_at: int | None = None, torn: bool = False,
               memory_gib: float | None = None) -> Outcome:
    """Run ``job`` in a forked child whose changes under ``root`` are counted; SIGKILL at ``kill_at``.

    Args:
        job: what the child runs (e.g. ``lambda: main([...])`` or a call of ``lite.training.train``).
        root: only changes under this folder are instants (a test's tmp folder).
        kill_at: the 0-based instant to kill before, or None to run to the end.
        torn: cut the file written last to half before killing (a kill in the middle of writing it).
        memory_gib: cap the child's memory at this many GiB more than it starts with.
    """
    report = root / f".kill-report-{os.getpid()}.json"
    report.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status, error = 0, ""
        killer = _Killer(root, kill_at, torn)
        try:
            if memory_gib is not None:
                _cap_memory(memory_gib)
            _wrap_binary_writers(killer)
            sys.addaudithook(killer)
            code = job()
            status = code if isinstance(code, int) else 0
        except BaseException:  # noqa: BLE001 -- reported to the parent
            status, error = 1, traceback.format_exc()
        finally:
            killer.kill_at = None
            killer.busy = True  # the report itself is not an instant
            with open(report, "w") as f:
                json.dump({"status": status, "instants": killer.instants, "error": error}, f)
            os._exit(0)
    _, wait = os.waitpid(pid, 0)
    if os.WIFSIGNALED(wait) and os.WTERMSIG(wait) == signal.SIGKILL:
        return Outcome(True, -9, [])
    data = json.loads(report.read_text())
    report.unlink()
    return Outcome(False, data["status"], [tuple(i) for i in data["instants"]], data["error"])
