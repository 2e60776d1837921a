"""Data: reading Alpaca JSON/JSONL, filtering, the held-out split, tokenisation with response-only labels."""

import json

import pytest
import torch

from lite.model.prompts import alpaca_prompt
from lite.training.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    PadCollator,
    load_heldout,
    prepare_data,
    read_examples,
    tokenize_example,
)


def _rows(n, status=lambda i: "ok"):
    return [{"instruction": f"Task {i}", "input": "" if i % 2 else f"ctx {i}", "output": f"Answer {i}.",
             "status": status(i)} for i in range(n)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reads_json_and_jsonl_with_filter_and_row_ids(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", _rows(6, status=lambda i: "ok" if i % 3 else "bad"))
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"instruction": "No input field", "output": "fine", "status": "ok"}], indent=1))
    examples, entries = read_examples([str(a), str(b)], ["status=ok"])
    assert [e.row_id for e in examples] == ["0:1", "0:2", "0:4", "0:5", "1:0"]  # rows 0 and 3 filtered out
    assert examples[-1].input == "" and examples[0].output == "Answer 1."
    assert entries[0]["rows"] == 6 and entries[0]["rows_kept"] == 4 and len(entries[0]["sha256"]) == 64


def test_filter_keeps_rows_without_the_field(tmp_path):
    """alpaca-libre (with status) and alpaca_en_demo (without) mix under --filter status=ok."""
    a = _jsonl(tmp_path / "a.jsonl", _rows(4, status=lambda i: "ok" if i % 2 else "bad"))
    b = _jsonl(tmp_path / "b.jsonl", [{"instruction": "x", "input": "", "output": "y"}] * 3)
    examples, entries = read_examples([str(a), str(b)], ["status=ok"])
    assert [e.row_id for e in examples] == ["0:1", "0:3", "1:0", "1:1", "1:2"]


def test_heldout_split_is_deterministic_disjoint_and_reloadable(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", _rows(100, status=lambda i: "ok" if i % 4 else "no"))
    s1 = prepare_data([str(path)], filters=["status=ok"], heldout_fraction=0.1, seed=3)
    s2 = prepare_data([str(path)], filters=["status=ok"], heldout_fraction=0.1, seed=3)
    s3 = prepare_data([str(path)], filters=["status=ok"], heldout_fraction=0.1, seed=4)
    assert len(s1.heldout) == round(0.1 * 75) and len(s1.train) == 75 - len(s1.heldout)
    assert s1.heldout == s2.heldout and s1.heldout != s3.heldout
    assert not {e.row_id for e in s1.train} & {e.row_id for e in s1.heldout}
    prov = s1.provenance
    assert prov["rows_total"] == 100 and prov["rows_after_filter"] == 75 and prov["filter"] == {"status": "ok"}
    assert load_heldout(prov) == s1.heldout  # calibration gets exactly these rows back
    path.write_text(path.read_text() + json.dumps(_rows(1)[0]) + "\n")
    with pytest.raises(DataError, match="changed since training"):
        load_heldout(prov)


def test_tokenize_masks_the_prompt_and_appends_eos():
    from tiny import make_tokenizer

    tok = make_tokenizer()
    ex = Example("0:0", "Say hi", "", "hi there")
    item = tokenize_example(tok, ex, "alpaca", max_length=1000)
    prompt = tok(alpaca_prompt("Say hi"))["input_ids"]
    response = tok("hi there", add_special_tokens=False)["input_ids"]
    assert item["input_ids"] == prompt + response + [tok.eos_token_id]
    assert item["labels"] == [IGNORE_INDEX] * len(prompt) + response + [tok.eos_token_id]
    cut = tokenize_example(tok, ex, "alpaca", max_length=len(prompt) + 2)
    assert len(cut["input_ids"]) == len(prompt) + 2 and cut["labels"][-2:] == response[:2]
    assert tokenize_example(tok, ex, "alpaca", max_length=len(prompt)) is None  # nothing left to learn


def test_collator_pads_labels_with_ignore_index():
    batch = PadCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                         {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        read_examples([str(tmp_path / "nope.jsonl")])


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: malformed JSON on line 3"):
        read_examples([str(path)])


def test_malformed_json_list_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError, match=r"bad.json: malformed JSON at line 3"):
        read_examples([str(path)])


def test_missing_fields_name_the_row(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": ""}])
    with pytest.raises(DataError, match=r"m.jsonl: row 1 .*lacks string field\(s\) \['output'\]"):
        read_examples([str(path)])


def test_empty_after_filter(tmp_path):
    path = _jsonl(tmp_path / "e.jsonl", _rows(3, status=lambda i: "bad"))
    with pytest.raises(DataError, match="no rows left to train on .*status=ok"):
        read_examples([str(path)], ["status=ok"])
    with pytest.raises(DataError, match="--filter must look like FIELD=VALUE"):
        read_examples([str(path)], ["status"])
