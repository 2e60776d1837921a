"""The paper's four instruction test sets, in their original formats, and any file of prompts.

Known sets and the fields read from each row:

=============  ====  ============================================================  =====================
name           rows  fields                                                        reference output
=============  ====  ============================================================  =====================
vicuna         80    ``question_id``, ``category``, ``turns[0]`` (first turn only)  none
koala          180   ``id``, ``prompt``                                            none
wizardlm       218   ``idx``, ``Skill``, ``Difficulty``, ``Instruction``            none
self_instruct  252   ``id``, ``instruction``, ``instances[0].input/.output``        ``instances[0].output``
=============  ====  ============================================================  =====================

A test set is named on the command line as ``NAME`` (a known set, found locally or downloaded from its
public source) or ``NAME=PATH`` (a known set read from PATH, or, for any other NAME, a file of prompts:
JSONL or a JSON list of Alpaca rows ``{instruction, input?, output?}`` or ``{prompt}`` rows).

Where a known set is looked for, in order: ``$LITE_DATA/testsets/NAME.jsonl`` (or ``$LITE_DATA/NAME.jsonl``),
``../shared/data/testsets/NAME.jsonl`` from the working directory, lite's cache
``$LITE_HOME/data/testsets/NAME.jsonl``, and finally the original repository's raw file (needs network;
the download lands in the cache, written atomically).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LiteError
from ..files import read_text, write_atomic

# The original repositories' raw files.
SOURCES: dict[str, str] = {
    "vicuna": "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data/vicuna_bench/question.jsonl",
    "koala": "https://raw.githubusercontent.com/arnav-gudibande/koala-test-set/main/koala_test_set.jsonl",
    "wizardlm": "https://raw.githubusercontent.com/nlpxucan/WizardLM/main/WizardLM/data/WizardLM_testset.jsonl",
    "self_instruct": "https://raw.githubusercontent.com/yizhongw/self-instruct/main/human_eval/user_oriented_instructions.jsonl",
}
KNOWN = tuple(SOURCES)
EXPECTED_ROWS = {"vicuna": 80, "koala": 180, "wizardlm": 218, "self_instruct": 252}


class TestSetError(LiteError):
    """A test set that cannot be found or a file whose rows are not in the expected format."""

    __test__ = False  # not a pytest test class


@dataclass
class TestPrompt:
    """One evaluation prompt.

    Attributes:
        id: the row's own identifier in its set (as a string), unique within the set.
        instruction: the instruction (the user turn).
        input: optional context (Alpaca "input"; Self-Instruct instance input), "" when none.
        reference: a reference output when the set has one (Self-Instruct, Alpaca files with ``output``).
        meta: other fields of the row kept for the report (category, Skill, Difficulty, ...).
    """

    __test__ = False

    id: str
    instruction: str
    input: str = ""
    reference: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class TestSet:
    """A named list of prompts and where it came from (a path or URL)."""

    __test__ = False

    name: str
    prompts: list[TestPrompt]
    source: str
    format: str  # "vicuna", "koala", "wizardlm", "self_instruct", "alpaca" or "prompt"

    @property
    def has_references(self) -> bool:
        return any(p.reference is not None for p in self.prompts)


# ----------------------------------------------------------------- row parsers (one per original format)
def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise KeyError(key)
    return value


def _vicuna(row: dict, i: int) -> TestPrompt:
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
        raise KeyError("turns")
    return TestPrompt(str(row.get("question_id", i)), turns[0], meta={"category": row.get("category")})


def _koala(row: dict, i: int) -> TestPrompt:
    return TestPrompt(str(row.get("id", i)), _text(row, "prompt"))


def _wizardlm(row: dict, i: int) -> TestPrompt:
    return TestPrompt(str(row.get("idx", i)), _text(row, "Instruction"),
                      meta={"skill": row.get("Skill"), "difficulty": row.get("Difficulty")})


def _self_instruct(row: dict, i: int) -> TestPrompt:
    instruction = _text(row, "instruction")
    instances = row.get("instances")
    if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
        raise KeyError("instances")
    first = instances[0]  # every row of the user-oriented set has exactly one instance
    return TestPrompt(str(row.get("id", i)), instruction, input=str(first.get("input") or ""),
                      reference=first.get("output"), meta={"motivation_app": row.get("motivation_app")})


def _alpaca(row: dict, i: int) -> TestPrompt:
    output = row.get("output")
    return TestPrompt(str(row.get("id", i)), _text(row, "instruction"), input=str(row.get("input") or ""),
                      reference=output if isinstance(output, str) and output.strip() else None)


def _prompt(row: dict, i: int) -> TestPrompt:
    return TestPrompt(str(row.get("id", i)), _text(row, "prompt"))


PARSERS: dict[str, tuple[Callable[[dict, int], TestPrompt], str]] = {
    "vicuna": (_vicuna, "question_id, category, turns (a list whose first item is the prompt)"),
    "koala": (_koala, "id, prompt"),
    "wizardlm": (_wizardlm, "idx, Skill, Difficulty, Instruction"),
    "self_instruct": (_self_instruct, "id, instruction, instances [{input, output}]"),
    "alpaca": (_alpaca, "instruction, input (optional), output (optional)"),
    "prompt": (_prompt, "prompt"),
}


def _detect(row: dict) -> str | None:
    """The format of a row of a user's file, from its fields."""
    if "instances" in row and "instruction" in row:
        return "self_instruct"
    if "instruction" in row:
        return "alpaca"
    if "Instruction" in row:
        return "wizardlm"
    if "turns" in row:
        return "vicuna"
    if "prompt" in row:
        return "prompt"
    return None


# ----------------------------------------------------------------- reading files
def _rows(path: Path) -> list[tuple[int, Any]]:
    """(row number, parsed row) pairs: 1-based line numbers for JSONL, 1-based items for a JSON list."""
    text = read_text(path, TestSetError, "give a JSONL or JSON file", prefix="--testset: ")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TestSetError(f"--testset: {path} is not valid JSON ({exc}); give JSONL or a JSON list") \
                from None
        return list(enumerate(data, start=1))
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise TestSetError(
                f"--testset: {path} row {n} is not valid JSON ({exc.msg}); each line of a JSONL file must be "
                f"one JSON object"
            ) from None
    return rows


def read_testset(name: str, path: str | os.PathLike[str], fmt: str | None = None) -> TestSet:
    """Read a test set file.

    Args:
        name: the name the set is reported under.
        path: a JSONL file (one object per line) or a JSON list of objects.
        fmt: one of ``PARSERS`` (the known sets use their own name); None detects the format from the first
            row and requires every row to have it.
    Raises:
        TestSetError: naming the file and the 1-based row that is not in the format.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise TestSetError(f"--testset {name}={path}: no such file")
    rows = _rows(path)
    if not rows:
        raise TestSetError(f"--testset {name}={path}: the file has no rows")
    if fmt is None:
        first_n, first = rows[0]
        fmt = _detect(first) if isinstance(first, dict) else None
        if fmt is None:
            raise TestSetError(
                f"--testset {name}={path}: row {first_n} is not a prompt row; give JSONL or a JSON list of "
                f"Alpaca rows {{instruction, input, output}} or {{prompt}} rows"
            )
    parse, fields = PARSERS[fmt]
    prompts, seen = [], set()
    for n, row in rows:
        if not isinstance(row, dict):
            raise TestSetError(
                f"--testset {name}: {path} row {n} is not a JSON object; expected fields {fields}"
            )
        try:
            prompt = parse(row, n)
        except KeyError as exc:
            raise TestSetError(
                f"--testset {name}: {path} row {n} has no usable field {exc.args[0]!r} (expected the {fmt} "
                f"format: {fields})"
            ) from None
        if prompt.id in seen:
            prompt.id = f"{prompt.id}#{n}"
        seen.add(prompt.id)
        prompts.append(prompt)
    return TestSet(name, prompts, str(path), fmt)


# ----------------------------------------------------------------- finding known sets
def _cache_dir() -> Path:
    from ..model.loading import lite_home

    return lite_home() / "data" / "testsets"


def candidate_paths(name: str) -> list[Path]:
    """Local places a known set is looked for, in order."""
    paths = []
    data = os.environ.get("LITE_DATA")
    if data:
        paths += [Path(data) / "testsets" / f"{name}.jsonl", Path(data) / f"{name}.jsonl"]
    paths.append(Path.cwd().parent / "shared" / "data" / "testsets" / f"{name}.jsonl")
    paths.append(_cache_dir() / f"{name}.jsonl")
    return paths


def _places(name: str) -> str:
    return ", ".join(str(p) for p in candidate_paths(name))


def download(name: str, timeout: float = 30.0) -> Path:
    """Fetch a known set from its original repository into lite's cache (atomic write)."""
    url = SOURCES[name]
    target = _cache_dir() / f"{name}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (fixed https URLs)
            payload = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise TestSetError(
            f"--testset {name}: not found locally ({_places(name)}) and the "
            f"download from {url} failed ({exc}); give the file with --testset {name}=PATH or set $LITE_DATA"
        ) from None
    write_atomic(target, payload)
    return target


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME=PATH`` -> (name, path or None)."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not name or (sep and not path.strip()):
        raise TestSetError(f"--testset {spec!r}: give NAME or NAME=PATH (known names: {', '.join(KNOWN)})")
    return name, (path.strip() if sep else None)


def load_testset(spec: str, limit: int | None = None, allow_download: bool = True) -> TestSet:
    """Load a test set from its ``--testset`` value.

    Args:
        spec: ``NAME`` (a known set: vicuna, koala, wizardlm, self_instruct) or ``NAME=PATH``.
        limit: keep only the first ``limit`` prompts (file order).
        allow_download: fetch a known set from its public source when it is not found locally.
    Raises:
        TestSetError: an unknown name without a path (the message lists the known names), a missing file,
            or a row not in the expected format (the message names the file and row).
    """
    name, path = parse_spec(spec)
    if limit is not None and limit < 1:
        raise TestSetError(f"--limit must be at least 1, got {limit}")
    if path is not None:
        testset = read_testset(name, path, fmt=name if name in KNOWN else None)
    elif name in KNOWN:
        found = next((p for p in candidate_paths(name) if p.is_file()), None)
        if found is None:
            if not allow_download:
                raise TestSetError(
                    f"--testset {name}: not found in {_places(name)}; give "
                    f"--testset {name}=PATH or set $LITE_DATA"
                )
            found = download(name)
        testset = read_testset(name, found, fmt=name)
    else:
        raise TestSetError(
            f"--testset {name}: unknown test set; known sets are {', '.join(KNOWN)}, or give a file of "
            f"prompts as --testset {name}=PATH (JSONL or JSON, Alpaca rows or {{prompt}} rows)"
        )
    if limit is not None:
        testset.prompts = testset.prompts[:limit]
    return testset
