"""`lite eval` end to end on tiny models: a complete report, resuming, the judge over `lite serve`, bad
input."""

import json
import shutil

import pytest
from tiny import VICUNA, FakeEmbedder, make_tiny_model_dir

from lite import LiteConfig, decoding, load_model
from lite.cli import main as cli_main
from lite.errors import LiteError
from lite.evaluation import RECORDS, EvalError, evaluate
from lite.evaluation import report as report_mod


SELF_INSTRUCT = [{"id": f"user_oriented_task_{i}", "motivation_app": "app", "instruction": t,
                  "instances": [{"input": inp, "output": out}]} for i, (t, inp, out) in
                 enumerate([("Fix the spelling.", "teh cat", "the cat"), ("Add the numbers.", "2 3", "5")])]
KEYS = ("n", "layer_cost_improvement", "compute_cost_improvement", "speedup", "rougeL_vs_full",
        "similarity_vs_full", "tokens_full", "tokens_early_exit")
REAL_GENERATE = decoding.generate
REAL_GENERATE_BATCH = decoding.generate_batch
COMMON = dict(max_new_tokens=4, thresholds="0.1", kv="copy")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sets")
    for name, rows in (("vicuna", VICUNA), ("self_instruct", SELF_INSTRUCT)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"vicuna={folder / 'vicuna.jsonl'}", f"self_instruct={folder / 'self_instruct.jsonl'}"]


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory):
    """A second tiny model (another seed) standing in for the final-layer baseline."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("baseline") / "model", seed=1)


def count_generate(monkeypatch, fail_after=None):
    """Count the prompts the engine decodes, one entry (the policy kind) per prompt and policy, whether
    alone or in a batch; optionally interrupt like Ctrl-C once ``fail_after`` entries were made."""
    calls = []

    def counting(*args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt
        calls.append(args[2].kind)
        return REAL_GENERATE(*args, **kwargs)

    def counting_batch(*args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt
        calls.extend([args[2].kind] * len(args[1]))
        return REAL_GENERATE_BATCH(*args, **kwargs)

    monkeypatch.setattr(decoding, "generate", counting)
    monkeypatch.setattr(decoding, "generate_batch", counting_batch)
    return calls


def test_tiny_run_writes_a_complete_report(tiny_model_dir, baseline_dir, sets, tmp_path, monkeypatch):
    calls = count_generate(monkeypatch)
    out = tmp_path / "eval"
    result = evaluate(str(tiny_model_dir), sets, out=out, limit=1, threshold_scales=[1.0, 3.0],
                      static_layers=True, compare_model=str(baseline_dir), embedder=FakeEmbedder(), **COMMON)
    assert result.complete and result.prompts_run == 4  # 2 prompts x 2 models
    # per prompt: main = full + 2 dynamic + 3 static; compare (uncalibrated) = full + 3 static;
    # plus one untimed warm-up generation per model
    assert calls.count("none") == 4 + 2 and calls.count("dynamic") == 4 and calls.count("static") == 12
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is True and report == json.loads(json.dumps(result.report))
    for name in ("vicuna", "self_instruct"):
        s = report["testsets"][name]
        for key in KEYS:
            assert key in s, key
        assert s["n"] == 1 and s["speedup"] > 0 and 0 <= s["rougeL_vs_full"] <= 1
        assert s["layer_cost_improvement"] <= 1 and s["tokens_full"] > 0
        assert set(s["static_layers"]) == {"1", "2", "3"}
    for key in KEYS:
        assert key in report["overall"]
    assert report["overall"]["n"] == 2
    # self_instruct has references; vicuna has none
    assert "rougeL_vs_reference" in report["testsets"]["self_instruct"]
    assert "rougeL_vs_reference" not in report["testsets"]["vicuna"]
    # static exit at layer 1 is cheaper than at layer 3, by the layer figure exactly
    static = report["overall"]["static_layers"]
    assert static["1"]["layer_cost_improvement"] == pytest.approx(0.75)
    assert static["3"]["layer_cost_improvement"] == pytest.approx(0.25)
    assert static["1"]["compute_cost_improvement"] > static["3"]["compute_cost_improvement"]
    # a higher threshold scale exits no earlier than a lower one
    runs = report["overall"]["runs"]
    assert set(runs) == {"dynamic@1/copy", "dynamic@3/copy"}
    lci = {key: s["layer_cost_improvement"] for key, s in runs.items()}
    assert lci["dynamic@3/copy"] <= lci["dynamic@1/copy"]
    assert [p["threshold_scale"] for p in report["frontier"]] == [1.0, 3.0]
    hist = report["overall"]["exit_layer_histogram"]
    assert sum(hist.values()) == sum(len(r["runs"]["dynamic@1/copy"]["exit_layers"])
                                     for r in map(json.loads, (out / RECORDS).read_text().splitlines())
                                     if r["role"] == "main")
    # the compare model: full + static layers, no dynamic (it is not calibrated), in its own section
    assert report["compare"]["model"]["source"] == str(baseline_dir)
    assert set(report["compare"]["overall"]["static_layers"]) == {"1", "2", "3"}
    assert report["compare"]["overall"]["runs"] == {}
    assert report["packages"]["torch"] and report["config"]["max_new_tokens"] == 4
    rows = [(p["testset"], p["tokens_full"] > 0) for p in report["prompts"]]
    assert rows == [("vicuna", True), ("self_instruct", True)]
    for plot in ("per_layer_quality.png", "frontier.png", "exit_layers.png"):
        data = (out / "plots" / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = (out / "report.md").read_text()
    assert "| vicuna | 1 |" in md and "Static exit at each layer" in md and "compare model" in md
    assert not list(out.glob(".*"))  # no temporary files left


def test_resume_does_not_redo_finished_prompts(tiny_model_dir, sets, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    # a warm-up call, then 5 prompts x 2 generate calls each (full + dynamic); interrupt in the third prompt
    calls = count_generate(monkeypatch, fail_after=6)
    with pytest.raises(KeyboardInterrupt):
        evaluate(str(tiny_model_dir), sets, out=out, embedder=FakeEmbedder(), batch_size=1, **COMMON)
    assert len(calls) == 6
    assert not (out / "report.json").exists() and not (out / "report.md").exists()
    assert len((out / RECORDS).read_text().splitlines()) == 2  # two prompts finished
    with open(out / RECORDS, "a") as f:  # a torn line from a write cut short
        f.write('{"config_hash": "x", "ro')

    calls = count_generate(monkeypatch)
    result = evaluate(str(tiny_model_dir), sets, out=out, embedder=FakeEmbedder(), batch_size=1, **COMMON)
    assert result.complete and result.prompts_run == 3
    assert len(calls) == 1 + 3 * 2  # warm-up, then only the 3 unfinished prompts
    assert json.loads((out / "report.json").read_text())["overall"]["n"] == 5
    lines = (out / RECORDS).read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line) for line in lines)

    # a third run has nothing left to decode and rewrites the same report
    calls = count_generate(monkeypatch)
    assert evaluate(str(tiny_model_dir), sets, out=out, embedder=FakeEmbedder(), batch_size=1,
                    **COMMON).prompts_run == 0
    assert calls == []

    # another configuration in the same folder is refused, naming what differs
    with pytest.raises(EvalError, match="max_new_tokens"):
        evaluate(str(tiny_model_dir), sets, out=out, embedder=FakeEmbedder(),
                 **{**COMMON, "max_new_tokens": 5})


def test_judge_against_lite_serve(tiny_model_dir, sets, tmp_path, monkeypatch):
    """The judge client speaks to the project's own OpenAI-compatible server (a tiny random model as judge:
    its verdicts are mostly unparseable, which the report counts)."""
    from lite.serving import ServeConfig, serve_in_thread

    judge_lm = load_model(tiny_model_dir, device="cpu")
    url, stop = serve_in_thread(judge_lm, ServeConfig(model_name="judge", api_key="k3y", max_tokens_cap=64,
                                                      exit="none"))
    try:
        monkeypatch.setenv("LITE_JUDGE_API_KEY", "wrong")
        with pytest.raises(LiteError, match="HTTP 401"):
            evaluate(str(tiny_model_dir), sets[:1], out=tmp_path / "x", judge_url=f"{url}/v1",
                     judge_model="judge", embedder=FakeEmbedder(), **COMMON)
        assert not (tmp_path / "x").exists()  # refused before any work

        monkeypatch.setenv("LITE_JUDGE_API_KEY", "k3y")
        result = evaluate(str(tiny_model_dir), sets[:1], out=tmp_path / "eval", limit=2,
                          judge_url=f"{url}/v1", judge_model="judge", embedder=FakeEmbedder(), **COMMON)
    finally:
        stop()
    judge = result.report["testsets"]["vicuna"]["judge"]
    assert judge["n"] == 2
    records = [json.loads(x) for x in (tmp_path / "eval" / RECORDS).read_text().splitlines()]
    for r in records:
        v = r["judge"]
        assert {v["full_first"], v["early_first"]} <= {"A", "B", "tie", "invalid"}
    assert judge["invalid_verdicts"] == sum((r["judge"]["full_first"] == "invalid") +
                                            (r["judge"]["early_first"] == "invalid") for r in records)


def test_bad_inputs_fail_before_any_work(tiny_model_dir, sets, tmp_path, monkeypatch, capsys):
    calls = count_generate(monkeypatch)
    out = tmp_path / "eval"
    with pytest.raises(LiteError, match="unknown test set; known sets are vicuna, koala, wizardlm"):
        evaluate(str(tiny_model_dir), ["mmlu"], out=out, **COMMON)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(VICUNA[0]) + "\n" + json.dumps({"question_id": 2, "turns": []}) + "\n")
    with pytest.raises(LiteError, match=f"{bad} row 2"):
        evaluate(str(tiny_model_dir), [f"vicuna={bad}"], out=out, **COMMON)
    with pytest.raises(LiteError, match="--judge-url http://127.0.0.1:9/v1 is unreachable"):
        evaluate(str(tiny_model_dir), sets, out=out, judge_url="http://127.0.0.1:9/v1", judge_model="j",
                 **COMMON)
    with pytest.raises(LiteError, match="--judge-url and --judge-model"):
        evaluate(str(tiny_model_dir), sets, out=out, judge_url="http://127.0.0.1:9/v1", **COMMON)
    assert not out.exists() and calls == []

    # dynamic exit on an uncalibrated model without --thresholds: refused before the first prompt
    with pytest.raises(LiteError, match="calibrate"):
        evaluate(str(tiny_model_dir), sets, out=out, max_new_tokens=4)
    assert calls == [] and not (out / "report.json").exists()

    # the CLI: one line on stderr, exit status 2, no report
    capsys.readouterr()
    code = cli_main(["eval", "--model", str(tiny_model_dir), "--testset", "nope", "--out", str(out / "cli")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("lite eval: error: --testset nope: unknown test set")
    assert not (out / "cli").exists()


def test_cli_run_uses_calibrated_thresholds(tiny_model_dir, sets, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "calibrated"
    shutil.copytree(tiny_model_dir, folder)
    LiteConfig.default_for(4, thresholds={"1": 0.1, "2": 0.1, "3": 0.1}, prompt_format="alpaca").save(folder)
    monkeypatch.setattr(report_mod, "MiniLMEmbedder", FakeEmbedder)
    out = tmp_path / "eval"
    code = cli_main(["eval", "--model", str(folder), "--testset", sets[0], "--limit", "1",
                     "--max-new-tokens", "3", "--threads", "1", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "vicuna" in captured.out and "overall" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["calibrated"] and report["model"]["prompt_format"] == "alpaca"
    assert report["machine"]["torch_threads"] == 1
    assert report["model"]["thresholds"] == {"1": 0.1, "2": 0.1, "3": 0.1}
    record = json.loads((out / RECORDS).read_text())
    assert record["prompt_tokens"] > 20  # the Alpaca template wraps the 13-character question
    # the ceiling, teacher-forced on the full run's answer: every answer token scored, the calibrated policy
    # on it, a table in report.md, its plot, and one line on the terminal
    ceiling = report["ceiling"]
    assert ceiling["tokens"] == len(record["full"]["token_ids"]) and ceiling["layers"] == [1, 2, 3]
    assert 0.0 <= ceiling["oracle_saving"] <= 0.75 and ceiling["default"] == "dynamic"
    assert set(ceiling["frontiers"]) == {"max_prob", "margin", "entropy", "state_cosine"}
    assert ceiling["policies"]["dynamic"]["saving"] <= ceiling["oracle_saving"] + 1e-9 or \
        ceiling["policies"]["dynamic"]["agreement"] < 1.0  # beating the oracle costs agreement
    assert "| oracle" in (out / "report.md").read_text() and (out / "plots" / "ceiling.png").is_file()
    assert "oracle layer saving" in captured.err
    # recalibrating the model between two runs into the same folder is refused, not silently mixed
    LiteConfig.default_for(4, thresholds={"1": 0.2, "2": 0.2, "3": 0.2}, prompt_format="alpaca").save(folder)
    with pytest.raises(EvalError, match="changed since the run .* started \\(thresholds\\)"):
        evaluate(str(folder), sets[:1], out=out, limit=2, max_new_tokens=3, embedder=FakeEmbedder(),
                 dtype="auto")  # the CLI's default, so that only the thresholds differ


def test_static_exit_policy_and_no_hf_baseline(tiny_model_dir, sets, tmp_path):
    result = evaluate(str(tiny_model_dir), sets[:1], out=tmp_path / "eval", limit=1, exit="static:2",
                      kv="recompute,copy", hf_baseline=False, embedder=FakeEmbedder(), max_new_tokens=3)
    s = result.report["testsets"]["vicuna"]
    assert result.report["primary_run"] == "static:2/recompute"
    assert list(s["runs"]) == ["static:2/recompute", "static:2/copy"]
    # what later tokens see differs between the strategies, the exit layers do not
    assert s["runs"]["static:2/copy"]["layer_cost_improvement"] == pytest.approx(0.5)
    assert s["layer_cost_improvement"] == pytest.approx(0.5) and s["speedup"] is None
    assert s["exit_layer_histogram"] == {"2": s["tokens_early_exit"]}
    with pytest.raises(LiteError, match="static:9"):
        evaluate(str(tiny_model_dir), sets[:1], out=tmp_path / "bad", exit="static:9",
                 embedder=FakeEmbedder())
    assert not (tmp_path / "bad" / "report.json").exists()


def test_batched_eval_decodes_what_one_at_a_time_decodes(tiny_model_dir, sets, tmp_path):
    """--batch-size 3 and 1 give the same answers, exit layers and costs per prompt; HF generate is timed at
    the batch size, and the batch's time is shared out by tokens (so sums are the calls' wall time)."""
    kw = dict(embedder=FakeEmbedder(), static_layers=True, **COMMON)
    one = evaluate(str(tiny_model_dir), sets, out=tmp_path / "one", batch_size=1, **kw)
    three = evaluate(str(tiny_model_dir), sets, out=tmp_path / "three", batch_size=3, **kw)
    rows = {}
    for name, res in (("one", one), ("three", three)):
        lines = [json.loads(line) for line in (res.out / RECORDS).read_text().splitlines()]
        rows[name] = {(r["testset"], r["id"]): r for r in lines}
    assert rows["one"].keys() == rows["three"].keys()
    for key, a in rows["one"].items():
        b = rows["three"][key]
        assert b["batch"] in (1, 2, 3) and a["batch"] == 1
        for part in ("full",):
            assert a[part]["token_ids"] == b[part]["token_ids"]
        for run in a["runs"]:
            assert a["runs"][run]["token_ids"] == b["runs"][run]["token_ids"]
            assert a["runs"][run]["exit_layers"] == b["runs"][run]["exit_layers"]
            assert a["runs"][run]["flops"] == b["runs"][run]["flops"]
        for layer in a["static"]:
            assert a["static"][layer]["token_ids"] == b["static"][layer]["token_ids"]
        assert b["hf"]["matches_full"] and b["hf"]["seconds"] > 0
    assert max(r["batch"] for r in rows["three"].values()) == 3
