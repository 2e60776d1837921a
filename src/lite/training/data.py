"""Instruction data: Alpaca-format rows, a row filter, tokenisation with response-only labels, and the
deterministic held-out split that calibration reuses.

Rows are ``{"instruction", "input", "output"}`` (``input`` may be missing or empty) from JSON (a list) or
JSON Lines files, or from a Hugging Face hub dataset id (needs network). Every row gets a stable id
``"<source index>:<row index>"`` (0-based, row index counted before filtering in that source), so the
held-out rows can be named in ``lite_config.json`` and read back exactly by ``lite calibrate``.

Tokenisation (``tokenize_example``): prompt (Alpaca template or chat template, see :mod:`lite.model.prompts`)
then response then EOS; labels are -100 on prompt tokens and padding, so the loss covers the response and
its EOS only. Sequences longer than ``max_length`` tokens are cut at the end; a row whose response is cut
away entirely is dropped (and counted).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LiteError
from ..files import looks_like_hub_id
from ..model.prompts import encode_prompt

IGNORE_INDEX = -100
DEFAULT_HELDOUT_FRACTION = 0.05
DEFAULT_MAX_LENGTH = 256


class DataError(LiteError):
    """The training data cannot be used as given; the message names the file, line or row."""


@dataclass(frozen=True)
class Example:
    """One instruction row.

    Attributes:
        row_id: ``"<source index>:<row index>"``, 0-based, row index before filtering.
        instruction: the task.
        input: optional context ("" when absent).
        output: the reference response (the training target).
        response_ids: when set, the training response as token ids instead of ``output`` (the model's own
            answer, :mod:`lite.training.own_answers`), used as they are (no EOS added).
    """

    row_id: str
    instruction: str
    input: str
    output: str
    response_ids: tuple[int, ...] | list[int] | None = None


@dataclass
class DataSplit:
    """Rows after filtering, split into training rows and held-out rows (kept aside for calibration).

    Attributes:
        train: rows to train on.
        heldout: rows never trained on; ``lite calibrate`` reads these back with :func:`load_heldout`.
        provenance: what goes into ``lite_config.json`` under ``data``.
    """

    train: list[Example]
    heldout: list[Example]
    provenance: dict[str, Any] = field(default_factory=dict)


def parse_filters(filters: list[str] | str | None) -> dict[str, str]:
    """``["status=ok"]`` -> ``{"status": "ok"}``; a row is kept when every key it carries equals its value
    (rows without the field are kept)."""
    if not filters:
        return {}
    if isinstance(filters, str):
        filters = [filters]
    parsed = {}
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DataError(f"--filter must look like FIELD=VALUE (e.g. status=ok), got {item!r}")
        parsed[key.strip()] = value.strip()
    return parsed


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_file_rows(path: Path) -> list[Any]:
    """Raw rows of a JSON list or JSON Lines file; unreadable bytes or malformed JSON name the file (and line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                        f"give an Alpaca-format JSON or JSONL file saved as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if "\x00" in text:
        raise DataError(f"{path} holds binary data (NUL bytes), not JSON text; give an Alpaca-format JSON or JSONL "
                        f"file")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: malformed JSON on line {lineno}: {exc.msg}; fix or remove that line") from None
    return rows


def _read_hub_rows(dataset_id: str) -> list[Any]:
    """Rows of the ``train`` split of a hub dataset (needs network and the ``datasets`` package)."""
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as exc:  # noqa: BLE001 -- offline, unknown id, ...: one clear message
        raise DataError(
            f"--data {dataset_id}: no such file, and loading it as a hub dataset failed ({type(exc).__name__}: "
            f"{str(exc)[:200]}); give a local JSON/JSONL file or a reachable dataset id"
        ) from None
    return [dict(r) for r in ds]


def read_source(source: str, index: int, filters: dict[str, str]) -> tuple[list[Example], dict[str, Any]]:
    """Read one file or hub dataset: (kept examples, provenance entry)."""
    path = Path(source).expanduser()
    if path.is_file():
        raw = _read_file_rows(path)
        entry: dict[str, Any] = {"path": str(path.resolve()), "sha256": sha256_file(path)}
    elif path.exists():
        raise DataError(f"--data {source} is a folder; give a JSON or JSONL file")
    elif looks_like_hub_id(source):  # owner/name only: a missing 'dir/file.jsonl' fails below, offline
        raw = _read_hub_rows(source)
        entry = {"hub_dataset": source, "sha256": None}
    else:
        raise DataError(f"--data {source}: no such file; give an Alpaca-format JSON or JSONL file (or a hub "
                        f"dataset id, owner/name)")
    if not isinstance(raw, list):
        raise DataError(f"{source}: expected a JSON list of rows or JSON Lines, got a {type(raw).__name__}")
    kept = []
    for i, row in enumerate(raw):
        where = f"{source}: row {i} (0-based)"
        if not isinstance(row, dict):
            raise DataError(f"{where} is not a JSON object")
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(
                f"{where} lacks string field(s) {missing}; Alpaca rows need instruction, output (and input)"
            )
        # a filter applies to rows that carry its field, so files with and without it can be mixed
        # (alpaca-libre rows carry status; alpaca_en_demo rows do not and are all clean)
        if any(k in row and str(row[k]) != v for k, v in filters.items()):
            continue
        inp = row.get("input") or ""
        if not isinstance(inp, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(inp).__name__}")
        kept.append(Example(f"{index}:{i}", row["instruction"], inp, row["output"]))
    entry.update({"rows": len(raw), "rows_kept": len(kept)})
    return kept, entry


def read_examples(sources: list[str] | str, filters: list[str] | str | None = None
                  ) -> tuple[list[Example], list[dict[str, Any]]]:
    """All rows of all sources that pass the filter, in source order, with one provenance entry each."""
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise DataError("--data is required: give one or more Alpaca-format JSON/JSONL files")
    parsed = parse_filters(filters)
    examples: list[Example] = []
    entries = []
    for index, source in enumerate(sources):
        kept, entry = read_source(str(source), index, parsed)
        examples.extend(kept)
        entries.append(entry)
    if not examples:
        shown = ", ".join(f"{k}={v}" for k, v in parsed.items()) or "none"
        raise DataError(f"no rows left to train on in {list(sources)} (filter: {shown}); check --data and --filter")
    return examples, entries


def heldout_ids(row_ids: list[str], fraction: float, seed: int) -> list[str]:
    """The held-out row ids: ``round(fraction * n)`` rows (at least 1 when fraction > 0 and n > 1) drawn
    with ``random.Random(seed)``; deterministic for a given row list, fraction and seed."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"--heldout-fraction must be in [0, 1), got {fraction}")
    n = len(row_ids)
    k = round(fraction * n)
    if fraction > 0 and n > 1:
        k = max(k, 1)
    k = min(k, n - 1)  # always keep one row to train on
    picked = random.Random(seed).sample(range(n), k)
    return [row_ids[i] for i in sorted(picked)]


def prepare_data(sources: list[str] | str, *, filters: list[str] | str | None = None,
                 heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, seed: int = 0) -> DataSplit:
    """Read, filter and split the data; the provenance records everything needed to redo the split.

    Args:
        sources: paths of JSON/JSONL files (or hub dataset ids).
        filters: ``FIELD=VALUE`` strings; a row is kept when all match (e.g. ``status=ok``).
        heldout_fraction: share of rows kept aside for calibration, in [0, 1).
        seed: seed of the held-out draw.
    """
    examples, entries = read_examples(sources, filters)
    held = set(heldout_ids([e.row_id for e in examples], heldout_fraction, seed))
    train = [e for e in examples if e.row_id not in held]
    heldout = [e for e in examples if e.row_id in held]
    provenance = {
        "sources": entries,
        "filter": parse_filters(filters),
        "rows_total": sum(e["rows"] for e in entries),
        "rows_after_filter": len(examples),
        "rows_train": len(train),
        "heldout_fraction": heldout_fraction,
        "heldout_seed": seed,
        "heldout_ids": [e.row_id for e in heldout],
        "row_id_format": "<source index>:<0-based row index in that source, before filtering>",
    }
    return DataSplit(train, heldout, provenance)


def load_recorded_rows(lite_config: Any, sources: list[str] | None = None, check_hash: bool = True
                       ) -> list[Example]:
    """Every row (after the recorded filter) of the sources a checkpoint was trained from, read back.

    Args:
        lite_config: a :class:`lite.model.config.LiteConfig` (or its ``data`` dict) written by ``lite train``.
        sources: override the recorded paths (same order), e.g. when the data moved to another machine.
        check_hash: refuse a file whose sha256 differs from the recorded one (the row ids would not match).
    """
    data = lite_config if isinstance(lite_config, dict) else getattr(lite_config, "data", {})
    entries = (data or {}).get("sources")
    if not entries:
        raise DataError("this checkpoint records no training data (it was not trained by lite train); "
                        "give the data explicitly")
    paths = sources or [e.get("path") or e.get("hub_dataset") for e in entries]
    if len(paths) != len(entries):
        raise DataError(f"expected {len(entries)} data sources (as trained), got {len(paths)}")
    filters = data.get("filter") or {}
    out: list[Example] = []
    for index, (path, entry) in enumerate(zip(paths, entries)):
        if check_hash and entry.get("sha256") and Path(path).is_file() and sha256_file(Path(path)) != entry["sha256"]:
            raise DataError(f"{path} changed since training (sha256 differs); the held-out rows cannot be "
                            f"recovered from it; restore the file or give calibration data explicitly")
        kept, _ = read_source(path, index, filters)
        out.extend(kept)
    return out


def load_heldout(lite_config: Any, sources: list[str] | None = None, check_hash: bool = True) -> list[Example]:
    """The held-out rows a checkpoint was trained without, read back from the recorded sources (arguments
    as for :func:`load_recorded_rows`)."""
    data = lite_config if isinstance(lite_config, dict) else getattr(lite_config, "data", {})
    if not data or "heldout_ids" not in data:
        raise DataError("this checkpoint records no held-out data (it was not trained by lite train); "
                        "give calibration data explicitly")
    wanted = set(data["heldout_ids"])
    return [e for e in load_recorded_rows(data, sources, check_hash) if e.row_id in wanted]


def tokenize_example(tokenizer, example: Example, prompt_format: str = "alpaca",
                     max_length: int = DEFAULT_MAX_LENGTH) -> dict[str, list[int]] | None:
    """Token ids and labels of prompt + response + EOS, cut at ``max_length`` tokens.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` with labels -100 on prompt tokens, or None when no
        response token survives truncation (the row then teaches nothing).
    """
    prompt = encode_prompt(tokenizer, example.instruction, example.input, prompt_format)
    if example.response_ids is not None:  # the model's own answer, as generated
        response = [int(t) for t in example.response_ids]
    else:
        response = list(tokenizer(example.output, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            response.append(int(tokenizer.eos_token_id))
    ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        return None
    return {"input_ids": ids, "labels": labels}


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenised examples for the Trainer; rows whose response is cut away entirely are dropped."""

    def __init__(self, examples: list[Example], tokenizer, prompt_format: str = "alpaca",
                 max_length: int = DEFAULT_MAX_LENGTH) -> None:
        items = [tokenize_example(tokenizer, e, prompt_format, max_length) for e in examples]
        self.items = [x for x in items if x is not None]
        self.dropped = len(items) - len(self.items)
        if not self.items:
            raise DataError(f"every row is longer than --max-length {max_length} before its response starts; "
                            f"raise --max-length")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


@dataclass
class PadCollator:
    """Right-pads a batch: ``input_ids`` with the pad id, ``labels`` with -100, plus ``attention_mask``."""

    pad_token_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
