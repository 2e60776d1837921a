"""Test set loaders: the four original formats, user files, lookup, download path, and bad input."""

import io
import json
import urllib.error

import pytest

from lite.errors import LiteError
from lite.evaluation import testsets
from lite.evaluation.testsets import KNOWN, TestSetError, load_testset, read_testset

# A few rows of each set exactly in its original repository's format.
ROWS = {
    "vicuna": [
        {"question_id": 1, "category": "generic", "turns": ["How can I improve my time management skills?"]},
        {"question_id": 2, "category": "generic", "turns": ["What are effective ways to deal with stress?"]},
        {"question_id": 81, "category": "writing", "turns": ["Compose a travel blog post.", "Rewrite it."]},
    ],
    "koala": [
        {"id": "koala_0", "prompt": "Can you list the top 20 films between 1930 and 1940?"},
        {"id": "koala_1", "prompt": "Take MLK speech and turn it into a rap song"},
    ],
    "wizardlm": [
        {"idx": 1, "Skill": "Math", "Difficulty": 1, "Instruction": "120 miles in 2 hours: speed?"},
        {"idx": 2, "Skill": "Math", "Difficulty": 3, "Instruction": "If x + y = z and x * y = z, x - y = ?"},
    ],
    "self_instruct": [
        {"id": "user_oriented_task_0", "motivation_app": "Grammarly", "instruction": "Rewrite the sentence.",
         "instances": [{"input": "If you have any questions, please let me know.",
                        "output": "Questions? Ask."}]},
        {"id": "user_oriented_task_1", "motivation_app": "Google Search", "instruction": "Suggest a title.",
         "instances": [{"input": "", "output": "A Title"}]},
    ],
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """$LITE_DATA/testsets with the four sets in their original formats."""
    folder = tmp_path / "data" / "testsets"
    folder.mkdir(parents=True)
    for name, rows in ROWS.items():
        write_jsonl(folder / f"{name}.jsonl", rows)
    monkeypatch.setenv("LITE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LITE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here
    return folder


def test_each_known_format_maps_its_fields(data_dir):
    v = load_testset("vicuna")
    assert [p.id for p in v.prompts] == ["1", "2", "81"]
    assert v.prompts[2].instruction == "Compose a travel blog post."  # first turn only
    assert v.prompts[0].meta["category"] == "generic" and v.prompts[0].reference is None

    k = load_testset("koala")
    assert k.prompts[1].id == "koala_1" and k.prompts[1].instruction.startswith("Take MLK")

    w = load_testset("wizardlm")
    assert w.prompts[1].meta == {"skill": "Math", "difficulty": 3} and w.prompts[1].id == "2"

    s = load_testset("self_instruct")
    assert s.prompts[0].input == "If you have any questions, please let me know."
    assert s.prompts[0].reference == "Questions? Ask." and s.has_references
    assert s.prompts[1].input == "" and s.format == "self_instruct"
    assert not v.has_references


def test_limit_keeps_the_first_prompts(data_dir):
    assert [p.id for p in load_testset("vicuna", limit=2).prompts] == ["1", "2"]
    with pytest.raises(TestSetError, match="--limit"):
        load_testset("vicuna", limit=0)


def test_known_name_with_explicit_path(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", ROWS["koala"])
    ts = load_testset(f"koala={path}")
    assert ts.name == "koala" and ts.source == str(path) and len(ts.prompts) == 2


def test_shared_files_have_the_spec_row_counts(shared_data):
    for name in KNOWN:
        ts = read_testset(name, shared_data / "testsets" / f"{name}.jsonl", fmt=name)
        assert len(ts.prompts) == testsets.EXPECTED_ROWS[name]
        assert all(p.instruction.strip() for p in ts.prompts)
        assert len({p.id for p in ts.prompts}) == len(ts.prompts)
    si = read_testset("self_instruct", shared_data / "testsets" / "self_instruct.jsonl", fmt="self_instruct")
    assert all(p.reference for p in si.prompts)


def test_user_files_alpaca_jsonl_json_list_and_prompt_rows(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5"},
                                                {"instruction": "Greet", "input": "", "output": ""}])
    ts = load_testset(f"mine={alpaca}")
    assert ts.format == "alpaca" and ts.prompts[0].input == "2 and 3" and ts.prompts[0].reference == "5"
    assert ts.prompts[1].reference is None and [p.id for p in ts.prompts] == ["1", "2"]

    as_list = tmp_path / "a.json"
    as_list.write_text(json.dumps([{"instruction": "Say hi"}, {"instruction": "Say bye"}]))
    assert [p.instruction for p in load_testset(f"list={as_list}").prompts] == ["Say hi", "Say bye"]

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "one"}, {"prompt": "two"}])
    assert load_testset(f"p={prompts}").format == "prompt"


def test_unknown_name_lists_the_known_sets(data_dir):
    with pytest.raises(LiteError) as err:
        load_testset("mmlu")
    for name in KNOWN:
        assert name in str(err.value)
    assert "--testset mmlu=PATH" in str(err.value)


def test_wrong_format_names_file_and_row(tmp_path):
    rows = ROWS["koala"] + [{"id": "koala_2", "text": "no prompt field"}]
    path = write_jsonl(tmp_path / "koala.jsonl", rows)
    with pytest.raises(TestSetError) as err:
        load_testset(f"koala={path}")
    assert str(path) in str(err.value) and "row 3" in str(err.value) and "'prompt'" in str(err.value)

    # a vicuna file given as wizardlm: the first row already fails
    wrong = write_jsonl(tmp_path / "v.jsonl", ROWS["vicuna"])
    with pytest.raises(TestSetError, match="row 1 .*Instruction"):
        load_testset(f"wizardlm={wrong}")

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ROWS["koala"][0]) + "\n{not json\n")
    with pytest.raises(TestSetError, match="row 2 is not valid JSON"):
        load_testset(f"koala={broken}")

    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "?"}])
    with pytest.raises(TestSetError, match="row 1 is not a prompt row"):
        load_testset(f"mine={odd}")
    with pytest.raises(TestSetError, match="no such file"):
        load_testset(f"mine={tmp_path / 'missing.jsonl'}")


def test_download_path_writes_the_cache(tmp_path, monkeypatch):
    """The public-source code path, with urlopen replaced (no network here)."""
    monkeypatch.delenv("LITE_DATA", raising=False)
    monkeypatch.setenv("LITE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    payload = "".join(json.dumps(r) + "\n" for r in ROWS["wizardlm"]).encode()
    seen = []

    def fake_urlopen(url, timeout):
        seen.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(testsets.urllib.request, "urlopen", fake_urlopen)
    ts = load_testset("wizardlm")
    assert seen == [testsets.SOURCES["wizardlm"]] and "nlpxucan/WizardLM" in seen[0]
    assert ts.source == str(tmp_path / "home" / "data" / "testsets" / "wizardlm.jsonl")
    assert len(ts.prompts) == 2
    load_testset("wizardlm")  # second time from the cache
    assert len(seen) == 1

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(testsets.urllib.request, "urlopen", offline)
    with pytest.raises(TestSetError, match="--testset koala=PATH"):
        load_testset("koala")
    assert not list((tmp_path / "home" / "data" / "testsets").glob(".koala*"))  # nothing half-written
