"""Training data: reading rows from files and ``datasets``, a row filter, tokenisation with labels on the
trained tokens only, and the deterministic held-out split that calibration reuses.

Rows come in the shapes of :mod:`lite.training.rows` (Alpaca; chat ``messages``; TRL's prompt/completion,
plain or conversational), from:

* JSON (a list) or JSON Lines files, read here so that a bad line or row is named with its number;
* other files ``datasets`` reads (``.parquet``, ``.csv``, ``.arrow``), a folder written by
  ``Dataset.save_to_disk`` or holding data files, or a hub dataset id ``owner/name`` (needs network);
  ``SOURCE:SPLIT`` picks a split other than ``train``.

Every row gets a stable id ``"<source index>:<row index>"`` (0-based, row index counted before filtering in
that source), so the held-out rows can be named in ``lite_config.json`` and read back exactly by
``lite calibrate``.

Tokenisation (:func:`tokenize_example`): prompt (Alpaca template or chat template, see
:mod:`lite.model.prompts`) then response then EOS; labels are -100 everywhere else, so the loss covers the
response and its EOS only. A conversation in the chat template is one sequence in which every trained
assistant turn (its text and the EOS that ends it) is labelled and nothing else; in the Alpaca format,
which has no turns, it becomes one sequence per trained turn (:func:`lite.training.rows.split_turns`), the
earlier turns in the Input as lite prompts a conversation at decode time. Sequences longer than
``max_length`` tokens are cut at the end; one whose trained tokens are cut away entirely is dropped (and
counted).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files import looks_like_hub_id, read_text
from ..model.prompts import encode_messages, encode_prompt
from .rows import SHAPES_HELP, DataError, Example, parse_row, split_turns

IGNORE_INDEX = -100
DEFAULT_HELDOUT_FRACTION = 0.05
DEFAULT_MAX_LENGTH = 256


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


def parse_filters(filters: list[str] | str | None) -> dict[str, str | list[str]]:
    """``["status=ok"]`` -> ``{"status": "ok"}``; a row is kept when every field it carries has the value
    (rows without the field are kept). A field given several times keeps rows with any of its values:
    ``["source=a", "source=b"]`` -> ``{"source": ["a", "b"]}``."""
    if not filters:
        return {}
    if isinstance(filters, str):
        filters = [filters]
    parsed: dict[str, str | list[str]] = {}
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DataError(f"--filter must look like FIELD=VALUE (e.g. status=ok), got {item!r}")
        key, value = key.strip(), value.strip()
        if key not in parsed:
            parsed[key] = value
        else:
            before = parsed[key]
            values = before if isinstance(before, list) else [before]
            parsed[key] = values + [value] if value not in values else values
    return parsed


def _passes(row: Any, filters: dict[str, Any]) -> bool:
    """Whether a raw row passes the filters: each field it carries has (one of) the filter's value(s)."""
    for key, wanted in filters.items():
        if isinstance(row, dict) and row.get(key) is not None:
            if str(row[key]) not in (wanted if isinstance(wanted, list) else [wanted]):
                return False
    return True


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}
DATA_FILE_SUFFIXES = {".json", ".jsonl", ".txt", *DATASETS_SUFFIXES}  # what datasets reads in a folder
FORMATS_HELP = ("give a JSON or JSONL file, a .parquet/.csv/.arrow file, a dataset folder (save_to_disk) or a "
                "hub dataset id owner/name")


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _read_file_rows(path: Path) -> list[Any]:
    """Raw rows of a JSON list or JSON Lines file; unreadable bytes, malformed JSON and rows that are not
    JSON objects name the file and the line (or the list position)."""
    text = read_text(path, DataError, FORMATS_HELP)
    fix = 'each row must be a JSON object, e.g. {"instruction": ..., "output": ...}'
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": JSON Lines whose first row is an array, read below
                raise DataError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
        else:
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise DataError(f"{path}: row {i} (0-based) of the JSON list is {_json_kind(row)}: {fix}")
            return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: malformed JSON on line {lineno}: {exc.msg}; fix or remove that line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {lineno} is {_json_kind(row)}: {fix} (one per line); fix or remove "
                            f"that line")
        rows.append(row)
    return rows


def _pick_split(ds: Any, source: str, split: str | None) -> Any:
    """One split of what ``datasets`` loaded: ``split`` (default ``train``; a dataset with one split: that one)."""
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        return ds
    names = list(ds)
    wanted = split or ("train" if "train" in names or len(names) != 1 else names[0])
    if wanted not in names:
        raise DataError(f"--data {source}: no split {wanted!r} (it has {names}); name one as {source}:SPLIT")
    return ds[wanted]


def _read_datasets_rows(source: str, path: Path | None, split: str | None) -> list[Any]:
    """Rows through ``datasets``: a saved dataset folder (``save_to_disk``), a folder of data files, a file
    ``datasets`` reads, or (``path`` None) a hub dataset id (needs network)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"--data {source}: reading it needs the 'datasets' package (pip install datasets), or "
                        f"give a JSON/JSONL file") from None
    saved = path is not None and path.is_dir() and any((path / n).is_file() for n in ("dataset_dict.json", "state.json"))
    if path is not None and path.is_dir() and not saved:
        found = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
        if not any(Path(name).suffix.lower() in DATA_FILE_SUFFIXES for name in found):
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "") if found else "nothing"
            raise DataError(f"--data {source} is a folder, and neither a saved dataset (save_to_disk) nor one of "
                            f"data files (it holds {shown}); {FORMATS_HELP}")
    was_shown = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # a bar for reading a few rows, and one left half drawn by an error
    try:
        if path is None:
            ds = datasets.load_dataset(source, split=split or "train")
        elif saved:
            ds = _pick_split(datasets.load_from_disk(str(path)), source, split)
        elif path.is_dir():
            ds = _pick_split(datasets.load_dataset(str(path)), source, split)
        else:
            ds = datasets.load_dataset(DATASETS_SUFFIXES[path.suffix.lower()], data_files=str(path),
                                       split=split or "train")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 -- offline, unknown id, unreadable folder, ...: one clear message
        what = "loading it as a hub dataset" if path is None else "datasets could not read it"
        fix = ("give a local file or a reachable dataset id" if path is None else FORMATS_HELP)
        cause = exc.__cause__ or exc  # datasets wraps the reader's own error in a generic one
        first = (str(cause).strip().splitlines() or [""])[0][:200]
        raise DataError(f"--data {source}: {'no such file, and ' if path is None else ''}{what} "
                        f"({type(cause).__name__}: {first}); {fix}") from None
    finally:
        if was_shown:
            datasets.utils.enable_progress_bars()
    return ds.to_list()


def _read_hub_rows(source: str) -> list[Any]:
    """Rows of a hub dataset ``owner/name[:split]`` (needs network and the ``datasets`` package)."""
    name, split = _split_suffix(source)
    return _read_datasets_rows(name, None, split)


def _folder_sha256(folder: Path) -> str:
    """One digest over every file of a folder (relative names and contents, in sorted order)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode() + b"\0" + sha256_file(file).encode())
    return digest.hexdigest()


def _source_sha256(path: Path) -> str:
    return _folder_sha256(path) if path.is_dir() else sha256_file(path)


def _split_suffix(source: str) -> tuple[str, str | None]:
    """``SOURCE:SPLIT`` -> (SOURCE, SPLIT) when SOURCE itself is a path here or a hub id; else (source, None)."""
    name, sep, split = source.rpartition(":")
    if sep and re.fullmatch(r"[A-Za-z0-9_][\w.-]*", split) and not Path(source).expanduser().exists() and (
            Path(name).expanduser().exists() or looks_like_hub_id(name)):
        return name, split
    return source, None


def read_source(source: str, index: int, filters: dict[str, str]) -> tuple[list[Example], dict[str, Any]]:
    """Read one file, dataset folder or hub dataset: (kept examples, provenance entry)."""
    name, split = _split_suffix(source)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() not in DATASETS_SUFFIXES:
        raw = _read_file_rows(path)  # JSON or JSONL (whatever the name ends in): its errors name the line
    elif path.is_file() or path.is_dir():
        raw = _read_datasets_rows(source, path, split)
    elif path.exists():
        raise DataError(f"--data {source} is neither a file nor a folder; {FORMATS_HELP}")
    elif looks_like_hub_id(name):  # owner/name only: a missing 'dir/file.jsonl' fails below, offline
        raw = _read_hub_rows(source)
    else:
        raise DataError(f"--data {source}: no such file; {FORMATS_HELP}")
    if path.exists():
        entry: dict[str, Any] = {"path": str(path.resolve()), "sha256": _source_sha256(path)}
    else:
        entry = {"hub_dataset": name, "sha256": None}
    if split:
        entry["split"] = split
    if not isinstance(raw, list):
        raise DataError(f"{source}: expected a JSON list of rows or JSON Lines, got a {type(raw).__name__}")
    kept = []
    for i, row in enumerate(raw):
        example = parse_row(row, f"{index}:{i}", f"{source}: row {i} (0-based)")
        # a filter applies to rows that carry its field, so files with and without it can be mixed
        # (alpaca-libre rows carry status; alpaca_en_demo rows do not and are all clean)
        if not _passes(row, filters):
            continue
        kept.append(example)
    entry.update({"rows": len(raw), "rows_kept": len(kept)})
    return kept, entry


def read_examples(sources: list[str] | str, filters: list[str] | str | None = None
                  ) -> tuple[list[Example], list[dict[str, Any]]]:
    """All rows of all sources that pass the filter, in source order, with one provenance entry each."""
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise DataError(f"--data is required: {FORMATS_HELP} ({SHAPES_HELP})")
    parsed = parse_filters(filters)
    examples: list[Example] = []
    entries = []
    for index, source in enumerate(sources):
        kept, entry = read_source(str(source), index, parsed)
        examples.extend(kept)
        entries.append(entry)
    if not examples:
        shown = ", ".join(f"{k}={'|'.join(v) if isinstance(v, list) else v}" for k, v in parsed.items()) or "none"
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


def recorded_heldout(recorded: dict[str, Any], entries: list[dict[str, Any]], row_ids: list[str],
                     flag: str = "--heldout-from") -> list[str]:
    """The held-out row ids another run recorded, checked against the sources read now.

    The recorded run's sources must be the first sources here, the same files (same sha256), so that a row
    id names the same row; every recorded held-out row must still pass the filter.

    Args:
        recorded: the other run's ``lite_config.json`` ``data`` section.
        entries: the provenance entries of the sources read now, in order.
        row_ids: the ids of the rows read now (after the filter).
        flag: what named the other run, for messages.
    Raises:
        DataError: the other run recorded no split, or its sources or rows are not among these.
    """
    ids, before = recorded.get("heldout_ids"), recorded.get("sources") or []
    if ids is None or not before:
        raise DataError(f"{flag}: that model records no held-out split (it was not trained by lite train); "
                        f"leave out {flag} to draw one with --heldout-fraction")
    if len(before) > len(entries):
        raise DataError(f"{flag}: that model was trained on {len(before)} sources, only {len(entries)} are given; "
                        f"give its sources first in --data, in the same order, then any new ones")
    for i, (was, now) in enumerate(zip(before, entries)):
        if was.get("sha256") != now.get("sha256"):
            raise DataError(f"{flag}: --data source {i} ({now.get('path') or now.get('hub_dataset')}) is not the "
                            f"file that model was trained on ({was.get('path') or was.get('hub_dataset')}, sha256 "
                            f"differs); give its sources first in --data, in the same order")
    present = set(row_ids)
    lost = [r for r in ids if r not in present]
    if lost:
        raise DataError(f"{flag}: {len(lost)} of its held-out rows (e.g. {lost[0]}) are not among the rows read "
                        f"now; keep its --filter values (filters on fields its rows lack leave them in)")
    return list(ids)


def prepare_data(sources: list[str] | str, *, filters: list[str] | str | None = None,
                 heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, seed: int = 0,
                 heldout_from: dict[str, Any] | None = None) -> DataSplit:
    """Read, filter and split the data; the provenance records everything needed to redo the split.

    Args:
        sources: files, dataset folders or hub dataset ids (``SOURCE:SPLIT`` for a split other than train).
        filters: ``FIELD=VALUE`` strings; a row is kept when all match (e.g. ``status=ok``).
        heldout_fraction: share of rows kept aside for calibration, in [0, 1).
        seed: seed of the held-out draw.
        heldout_from: another run's ``lite_config.json`` ``data`` section: hold out exactly its held-out
            rows (:func:`recorded_heldout`; its sources come first here) instead of drawing a split, so that
            runs on more data are measured on the same rows. Its fraction and seed are recorded.
    """
    examples, entries = read_examples(sources, filters)
    if heldout_from is not None:
        held = set(recorded_heldout(heldout_from, entries, [e.row_id for e in examples]))
        heldout_fraction = heldout_from.get("heldout_fraction", heldout_fraction)
        seed = heldout_from.get("heldout_seed", seed)
    else:
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
        local = Path(path).expanduser()
        if check_hash and entry.get("sha256") and local.exists() and _source_sha256(local) != entry["sha256"]:
            raise DataError(f"{path} changed since training (sha256 differs); the held-out rows cannot be "
                            f"recovered from it; restore the file or give calibration data explicitly")
        if entry.get("split") and _split_suffix(str(path))[1] is None:
            path = f"{path}:{entry['split']}"
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


def prompt_ids(tokenizer, example: Example, prompt_format: str = "alpaca") -> list[int]:
    """Token ids of the prompt that the example's response (a conversation: its last trained turn) follows,
    exactly as lite prompts at decode time: :func:`lite.model.prompts.encode_prompt` of a single request,
    :func:`lite.model.prompts.encode_messages` of the conversation before that turn."""
    if example.messages is None:
        return encode_prompt(tokenizer, example.instruction, example.input, prompt_format)
    return encode_messages(tokenizer, list(example.messages[:example.trained_turns[-1]]), prompt_format)


def answer_budget(prompt_tokens: int, max_new_tokens: int, max_length: int) -> int:
    """How many tokens an answer to a prompt of ``prompt_tokens`` may have: ``max_new_tokens``, less what
    would fall beyond ``max_length`` (the cut every sequence gets, :func:`tokenize_example`). 0 when the prompt
    alone reaches ``max_length``: nothing of an answer would be kept, so none is generated (the bound that
    keeps a row far longer than ``--max-length`` from reaching the model)."""
    return max(0, min(max_new_tokens, max_length - prompt_tokens))


def _response_ids(tokenizer, text: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def _chat_conversation(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """A whole conversation in the chat template, every trained assistant turn labelled (its text, then
    EOS), nothing else: (ids, labels).

    The template's text of the conversation up to each trained turn (with the generation prompt) must be a
    prefix of its text of the whole, followed by the turn's own text: true of ordinary templates (ChatML,
    Llama, Mistral), not of ones that rewrite earlier turns; those are refused, naming the row. The text
    between turns is tokenised piece by piece, so the first prompt is exactly what
    :func:`lite.model.prompts.encode_messages` gives at decode time; an end-of-turn marker equal to the EOS
    token is the labelled EOS, not repeated.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("--prompt-format chat: this tokenizer has no chat template; use --prompt-format alpaca")
    turns = example.trained_turns
    messages = list(example.messages[:turns[-1] + 1])
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    eos = tokenizer.eos_token or ""
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for a in turns:
        prompt = tokenizer.apply_chat_template(messages[:a], tokenize=False, add_generation_prompt=True)
        text = messages[a]["content"]
        after = whole[len(prompt):]
        if not whole.startswith(prompt) or len(prompt) < pos or not after.startswith(text):
            text = text.strip()
            if not (whole.startswith(prompt) and len(prompt) >= pos and after.startswith(text)):
                raise DataError(f"row {example.row_id}: this tokenizer's chat template does not write the "
                                f"conversation up to message {a} as the start of the whole conversation, so its "
                                f"assistant turns cannot be told apart; train with --prompt-format alpaca")
        context = list(tokenizer(whole[pos:len(prompt)], add_special_tokens=False)["input_ids"])
        response = _response_ids(tokenizer, text)
        ids += context + response
        labels += [IGNORE_INDEX] * len(context) + response
        pos = len(prompt) + len(text)
        if eos and whole.startswith(eos, pos):
            pos += len(eos)
    return ids, labels


def tokenize_example(tokenizer, example: Example, prompt_format: str = "alpaca",
                     max_length: int = DEFAULT_MAX_LENGTH) -> dict[str, list[int]] | None:
    """Token ids and labels of prompt + response + EOS, cut at ``max_length`` tokens.

    A conversation in the chat template is one sequence with every trained assistant turn labelled; in the
    Alpaca format its last trained turn (use :func:`lite.training.rows.split_turns` for all of them). With
    ``response_ids`` (own answers) those ids are the one labelled response, after :func:`prompt_ids`.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` with labels -100 on every token not trained on, or None
        when no trained token survives truncation (the row then teaches nothing).
    """
    if example.prompt_only and example.response_ids is None:
        raise DataError(f"row {example.row_id} has no output (a prompt-only row): it can be trained on only with "
                        f"the model's own answers (--own-answers)")
    if example.response_ids is not None:  # the model's own answer, as generated
        prompt = prompt_ids(tokenizer, example, prompt_format)
        response = [int(t) for t in example.response_ids]
        ids, labels = prompt + response, [IGNORE_INDEX] * len(prompt) + response
    elif example.messages is not None and prompt_format == "chat":
        ids, labels = _chat_conversation(tokenizer, example)
    else:
        prompt = prompt_ids(tokenizer, example, prompt_format)
        response = _response_ids(tokenizer, example.output)
        ids, labels = prompt + response, [IGNORE_INDEX] * len(prompt) + response
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        return None
    return {"input_ids": ids, "labels": labels}


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenised examples for the Trainer (in the Alpaca format, one sequence per trained turn of a
    conversation); sequences whose trained tokens are cut away entirely are dropped (``dropped``)."""

    def __init__(self, examples: list[Example], tokenizer, prompt_format: str = "alpaca",
                 max_length: int = DEFAULT_MAX_LENGTH) -> None:
        parts = [p for e in examples for p in (split_turns(e) if prompt_format == "alpaca" else [e])]
        items = [tokenize_example(tokenizer, p, prompt_format, max_length) for p in parts]
        self.items = [x for x in items if x is not None]
        self.dropped = len(items) - len(self.items)
        if not self.items:
            raise DataError(f"every row is longer than --max-length {max_length} before its response starts; "
                            f"raise --max-length")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


class IndexedDataset(torch.utils.data.Dataset):
    """The items of ``dataset`` with their position added as ``index`` (for caches kept by sequence)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "index": i}


@dataclass
class PadCollator:
    """Right-pads a batch: ``input_ids`` with the pad id, ``labels`` with -100, plus ``attention_mask``;
    items' ``index`` (:class:`IndexedDataset`) comes along as a tensor."""

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
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "index" in batch[0]:
            out["index"] = torch.tensor([b["index"] for b in batch], dtype=torch.long)
        return out
