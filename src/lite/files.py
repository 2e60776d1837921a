"""Writing files so that nothing already written is lost or left half-written.

Every file lite writes goes through here: a temporary file in the same folder, then a rename, so readers
see the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write a file so that readers see the old file or the new one, never half of one (a temporary file
    in the same folder, then a rename); an interrupted write leaves the old file and no temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON (indent 2, trailing newline) atomically, see :func:`write_atomic`."""
    write_atomic(path, json.dumps(data, indent=2) + "\n")
