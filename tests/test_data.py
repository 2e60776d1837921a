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
    # (a row without output is a prompt-only row: test_prompt_only_rows_parse_and_need_own_answers)
    path = _jsonl(tmp_path / "m.jsonl", [{"instruction": "a", "output": "b"}, {"input": "c", "output": "d"}])
    with pytest.raises(DataError, match=r"m.jsonl: row 1 .*lacks string field\(s\) \['instruction'\]"):
        read_examples([str(path)])


def test_empty_after_filter(tmp_path):
    path = _jsonl(tmp_path / "e.jsonl", _rows(3, status=lambda i: "bad"))
    with pytest.raises(DataError, match="no rows left to train on .*status=ok"):
        read_examples([str(path)], ["status=ok"])
    with pytest.raises(DataError, match="--filter must look like FIELD=VALUE"):
        read_examples([str(path)], ["status"])


# ---- the shapes people have: chat messages and TRL's prompt/completion (issue 16, part 4) ----

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Red, then."},
]


def _runs(labels):
    """Contiguous runs of labelled positions: [(start, end), ...]."""
    runs, start = [], None
    for i, t in enumerate(labels + [IGNORE_INDEX]):
        if t != IGNORE_INDEX and start is None:
            start = i
        elif t == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_two_turn_conversation_labels_exactly_both_assistant_turns(tmp_path):
    from tiny import make_tokenizer

    tok = make_tokenizer()
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": TWO_TURNS}])
    (ex,), _ = read_examples([str(path)])
    assert ex.trained_turns == [2, 4] and ex.instruction == "Another one?" and ex.output == "Red, then."
    item = tokenize_example(tok, ex, "chat", max_length=1000)
    ids, labels = item["input_ids"], item["labels"]
    # the sequence is the template's text of the whole conversation (up to the last EOS) ...
    whole = tok.apply_chat_template(TWO_TURNS, tokenize=False)
    assert ids == tok(whole[: whole.rindex("<|im_end|>") + len("<|im_end|>")], add_special_tokens=False)["input_ids"]
    # ... and the labels are two runs, each an assistant turn's text and its EOS, nothing else
    runs = _runs(labels)
    assert [tok.decode(ids[a:b]) for a, b in runs] == ["Blue.<|im_end|>", "Red, then.<|im_end|>"]
    assert all(labels[i] == ids[i] for a, b in runs for i in range(a, b))
    assert sum(t != IGNORE_INDEX for t in labels) == sum(b - a for a, b in runs)
    # the first turn follows exactly the prompt lite decodes with
    from lite.model.prompts import encode_messages

    assert ids[: runs[0][0]] == encode_messages(tok, TWO_TURNS[:2], "chat")
    assert ids[: runs[1][0]] == encode_messages(tok, TWO_TURNS[:4], "chat")  # prefix-consistent template


def test_alpaca_format_trains_each_assistant_turn_as_its_own_sequence():
    from tiny import make_tokenizer

    from lite.model.prompts import encode_messages
    from lite.training.data import TokenizedDataset
    from lite.training.rows import parse_row

    tok = make_tokenizer()
    ex = parse_row({"messages": TWO_TURNS}, "0:0", "row 0")
    ds = TokenizedDataset([ex], tok, "alpaca", max_length=1000)
    assert len(ds) == 2
    for item, upto, answer in zip(ds.items, (2, 4), ("Blue.", "Red, then.")):
        prompt = encode_messages(tok, TWO_TURNS[:upto], "alpaca")  # as lite prompts a conversation in alpaca
        response = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert item["input_ids"] == prompt + response
        assert item["labels"] == [IGNORE_INDEX] * len(prompt) + response


def test_prompt_completion_rows_plain_and_conversational(tmp_path):
    from tiny import make_tokenizer

    tok = make_tokenizer()
    rows = [
        {"prompt": "Name a colour.", "completion": "Blue."},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Name a colour."}],
         "completion": [{"role": "assistant", "content": "Blue."}]},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    ]
    plain, conversational, alpaca = read_examples([str(_jsonl(tmp_path / "pc.jsonl", rows))])[0]
    assert (plain.instruction, plain.input, plain.output, plain.messages) == ("Name a colour.", "", "Blue.", None)
    chat_plain = tokenize_example(tok, plain, "chat", 1000)
    assert chat_plain == tokenize_example(tok, alpaca, "chat", 1000)  # a plain prompt is the user's request
    assert conversational.prompt_turns == 3 and conversational.trained_turns == [3]
    item = tokenize_example(tok, conversational, "chat", 1000)
    runs = _runs(item["labels"])  # the prompt's assistant turn is context: only the completion is labelled
    assert [tok.decode(item["input_ids"][a:b]) for a, b in runs] == ["Blue.<|im_end|>"]
    assert "Hello." in tok.decode(item["input_ids"][: runs[0][0]])


@pytest.mark.parametrize("row, expect", [
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}]},
     r"messages\[1\] \(assistant\) has NoneType content"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no 'assistant' message to train on"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "no 'user' message comes before"),
    ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}, "must both be strings, or both lists"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]},
     "the completion has no 'assistant' message"),
    ({"text": "just text"}, r"lacks string field\(s\) \['instruction', 'output'\]; .*chat rows need messages"),
])
def test_bad_rows_of_every_shape_name_the_file_and_row(tmp_path, row, expect):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = _jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match=rf"bad.jsonl: row 1 \(0-based\).*{expect}"):
        read_examples([str(path)])


def test_a_template_that_rewrites_turns_is_refused_naming_the_row():
    from tiny import make_tokenizer

    from lite.training.rows import parse_row

    tok = make_tokenizer()
    tok.chat_template = tok.chat_template.replace("{{ message['content'] }}", "{{ message['content'] | upper }}")
    ex = parse_row({"messages": TWO_TURNS}, "0:7", "row 7")
    with pytest.raises(DataError, match="row 0:7: this tokenizer's chat template does not write"):
        tokenize_example(tok, ex, "chat", 1000)


def test_datasets_sources_saved_folder_parquet_and_split_with_heldout_reload(tmp_path):
    import datasets

    rows = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}],
             "status": "ok" if i % 4 else "bad"} for i in range(20)]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:3])}).save_to_disk(str(saved))
    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([{"prompt": "P", "completion": "C"}] * 2).to_parquet(str(parquet))
    split = prepare_data([str(saved), str(parquet)], filters=["status=ok"], heldout_fraction=0.2, seed=1)
    assert split.provenance["rows_after_filter"] == 15 + 2
    assert [s["rows"] for s in split.provenance["sources"]] == [20, 2]
    assert split.provenance["sources"][0]["sha256"] and split.provenance["sources"][1]["sha256"]
    assert load_heldout(split.provenance) == split.heldout and split.heldout  # calibration reads them back
    test_rows, entries = read_examples([f"{saved}:test"])
    assert len(test_rows) == 3 and entries[0]["split"] == "test"
    with pytest.raises(DataError, match=r"no split 'dev' \(it has \['train', 'test'\]\)"):
        read_examples([f"{saved}:dev"])
    (saved / "extra.txt").write_text("changed")
    with pytest.raises(DataError, match="changed since training"):
        load_heldout(split.provenance)
    files = tmp_path / "files"  # a folder of data files, as datasets.load_dataset(folder) reads it
    files.mkdir()
    _jsonl(files / "train.jsonl", rows[:5])
    assert [e.output for e in read_examples([str(files)])[0]] == ["A0", "A1", "A2", "A3", "A4"]


def test_prompt_only_rows_parse_and_need_own_answers(tmp_path):
    """Rows without a response (Alpaca without output, TRL prompt without completion) are read as
    prompt-only; they tokenise only once an own answer is their response; a wrong-typed output is refused."""
    from tiny import make_tokenizer

    from lite.training.rows import response_texts

    path = _jsonl(tmp_path / "p.jsonl", [{"instruction": "Name a fish.", "input": ""}, {"prompt": "Say hi."},
                                         {"instruction": "Add.", "input": "1+1", "output": "2"}])
    examples, _ = read_examples([str(path)])
    assert [e.prompt_only for e in examples] == [True, True, False]
    assert [response_texts(e) for e in examples] == [[], [], ["2"]]
    tok = make_tokenizer()
    with pytest.raises(DataError, match="row 0:0 has no output.*--own-answers"):
        tokenize_example(tok, examples[0], max_length=1000)
    import dataclasses

    answered = tokenize_example(tok, dataclasses.replace(examples[0], response_ids=(7, 8)), max_length=1000)
    assert answered["input_ids"][-2:] == [7, 8] and answered["labels"][-2:] == [7, 8]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": 3}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 0.*\['output'\]"):
        read_examples([str(bad)])


def test_a_field_filtered_several_times_keeps_any_of_its_values(tmp_path):
    rows = [{"instruction": f"t{i}", "output": "o", "source": "abc"[i % 3]} for i in range(6)]
    path = _jsonl(tmp_path / "s.jsonl", rows)
    examples, _ = read_examples([str(path)], ["source=a", "source=c"])
    assert [e.row_id for e in examples] == ["0:0", "0:2", "0:3", "0:5"]
    split = prepare_data([str(path)], filters=["source=a", "source=c"], heldout_fraction=0.25)
    assert split.provenance["filter"] == {"source": ["a", "c"]}
    assert load_heldout(split.provenance) == split.heldout  # the recorded filter reads the same rows back


def test_heldout_from_another_run_keeps_its_rows_with_more_sources(tmp_path):
    """A run on more data holds out exactly the rows an earlier run held out (its sources first)."""
    a = _jsonl(tmp_path / "a.jsonl", _rows(40))
    more = _jsonl(tmp_path / "more.jsonl", [{"instruction": f"p{i}"} for i in range(30)])
    first = prepare_data([str(a)], heldout_fraction=0.1, seed=0)
    second = prepare_data([str(a), str(more)], heldout_from=first.provenance)
    assert second.provenance["heldout_ids"] == first.provenance["heldout_ids"]
    assert len(second.train) == 36 + 30 and second.heldout == first.heldout
    drawn = prepare_data([str(a), str(more)], heldout_fraction=0.1, seed=0)  # a new draw would differ
    assert drawn.provenance["heldout_ids"] != first.provenance["heldout_ids"]
    with pytest.raises(DataError, match="give its sources first"):
        prepare_data([str(more), str(a)], heldout_from=first.provenance)
    with pytest.raises(DataError, match="not among the rows read now"):
        prepare_data([str(a), str(more)], filters=["output=nothing"], heldout_from=first.provenance)
    with pytest.raises(DataError, match="records no held-out split"):
        prepare_data([str(a)], heldout_from={"sources": []})
