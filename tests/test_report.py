"""`lite report` on tiny `lite eval` folders: every section, a row per model, exit marks in the samples, both
figures, and bad input refused with a message naming the problem and the fix, nothing written."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import VICUNA, FakeEmbedder, make_tiny_model_dir

from lite import LiteConfig
from lite.cli import main
from lite.decoding.gate import LearnedExitGate, save_gate
from lite.evaluation import evaluate


@pytest.fixture(autouse=True)
def _fake_embedder(monkeypatch):
    """The report's similarities from the tests' tiny embedder instead of MiniLM."""
    monkeypatch.setattr("lite.evaluation.metrics.MiniLMEmbedder", FakeEmbedder)

SELF_INSTRUCT = [{"id": "user_oriented_task_1", "motivation_app": "app", "instruction": "Fix the spelling.",
                  "instances": [{"input": "teh cat", "output": "the cat"}]}]
EVAL = dict(limit=1, max_new_tokens=4, kv="copy", embedder=FakeEmbedder(), batch_size=2)


def calibrated_copy(tiny_model_dir: Path, folder: Path) -> Path:
    """The tiny model with max-prob thresholds and a gate that lets every token leave at layer 2."""
    shutil.copytree(tiny_model_dir, folder)
    params = {k: [(torch.zeros(1, 32), torch.tensor([20.0 if k == 2 else -20.0]))] for k in (1, 2, 3)}
    gate_file = save_gate(LearnedExitGate(params, {k: 0.5 for k in (1, 2, 3)}), folder)
    LiteConfig(num_layers=4, exit_layers=[1, 2, 3, 4], thresholds={"1": 0.1, "2": 0.1, "3": 0.1},
               gate_file=gate_file.name, calibration={
                   "rule": "agreement", "parameters": {"target": 0.9}, "examples": 8, "tokens": 64,
                   "agreement": {"1": 0.2, "2": 0.4, "3": 0.7},
                   "exit_agreement": {"1": 0.9, "2": 0.9, "3": 0.9},
                   "gate": {"thresholds": {"1": 0.5, "2": 0.5, "3": 0.5},
                            "exit_agreement": {"1": 0.8, "2": 0.85, "3": 0.9}}}).save(folder)
    return folder


def fake_agreement(path: Path, specs: dict[str, float]) -> Path:
    """exit_agreement.py's JSON shape: per model, per layer agreement, its interval and the losses."""
    models = {}
    for spec, final_loss in specs.items():
        layers = {str(k): {"agreement": a, "agreement_ci95": [a * 0.8, min(1.0, a * 1.2)],
                           "kl_final_to_exit": 1 - a, "ce_own_answers": 2 - a,
                           "ce_reference": final_loss + 2 * (1 - a), "positions": 30, "reference_tokens": 20}
                  for k, a in ((1, 0.2), (2, 0.4), (3, 0.6), (4, 1.0))}
        models[spec] = {"spec": spec, "folder": None, "num_layers": 4, "exit_layers": [1, 2, 3, 4],
                        "layers": layers, "prompts": 3, "final_layer_reference_loss": final_loss,
                        "reference_tokens": 20, "answer_tokens": 30, "seconds": 1.0}
    path.write_text(json.dumps({"command": "exit_agreement.py ...", "date": "2026-01-01T00:00:00+00:00",
                                "rows": 3, "heldout_from": "winner-model", "max_new_tokens": 8,
                                "models": models}))
    return path


@pytest.fixture(scope="module")
def evals(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    for name, rows in (("vicuna", VICUNA), ("self_instruct", SELF_INSTRUCT)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = [f"vicuna={root / 'vicuna.jsonl'}", f"self_instruct={root / 'self_instruct.jsonl'}"]
    winner = calibrated_copy(tiny_model_dir, root / "winner-model")
    baseline = make_tiny_model_dir(root / "baseline-model", seed=1)
    evaluate(str(winner), sets, out=root / "winner-gate", exit="gate", **EVAL)
    evaluate(str(winner), sets, out=root / "winner", exit="dynamic", threshold_scales=[1.0, 3.0],
             static_layers=True, **EVAL)
    evaluate(str(baseline), sets, out=root / "baseline", exit="static:2", static_layers=True, **EVAL)
    agreement = fake_agreement(root / "agreement.json", {str(winner): 2.0, str(baseline): 2.0,
                                                         "smollm2-135m-instruct": 2.2})
    return {"root": root, "winner": winner, "baseline": baseline, "agreement": agreement}


def test_report_tells_the_story_for_every_model(evals, tmp_path, capsys):
    root = evals["root"]
    out = tmp_path / "report"
    code = main([
        "report", f"winner={root / 'winner-gate'},{root / 'winner'}", f"baseline={root / 'baseline'}",
        "--agreement", str(evals["agreement"]),
        "--agreement-label", f"winner={evals['winner']}",
        "--agreement-label", f"baseline={evals['baseline']}",
        "--agreement-label", "untuned=smollm2-135m-instruct",
        "--samples", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    md = (out / "report.md").read_text()
    assert md.startswith("# Early exit compared") and "lite report winner=" in md
    for section in ("## What was run", "## Headline", "## Per exit layer",
                    "## Cost against quality, every policy", "## Exit thresholds", "## Sample answers",
                    "## Definitions", "## Versions"):
        assert section in md, section
    headline = md.split("## Headline")[1].split("##")[0]
    for label in ("winner", "baseline", "untuned"):
        assert f"| **{label}** |" in headline, label
    assert "| **winner** | 2.000 | +0.0% |" in headline and "`gate/copy`" in headline  # first folder's policy
    assert "`static:2/copy`" in headline  # the baseline's policy
    assert "not evaluated" in headline  # untuned: agreement only
    assert "<sup>2</sup>" in md  # the gate lets every token leave at layer 2 < L = 4
    assert "| 1 | 0.100 | 0.500 | 0.200 | 0.900 | 0.800 |" in md  # layer | max-prob | gate | agreements
    for plot in ("per_layer.png", "frontier.png"):
        data = (out / "plots" / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    report = json.loads((out / "report.json").read_text())
    winner = report["models"]["winner"]
    assert set(winner["runs"]) == {"gate/copy", "dynamic@1/copy", "dynamic@3/copy"}  # the folders merged
    lo, hi = winner["headline"]["speedup_ci95"]
    assert lo <= winner["headline"]["speedup"] <= hi
    static = winner["static_similarity"]  # from the dynamic folder's static runs; the final layer is 1
    assert sorted(static) == ["1", "2", "3", "4"] and static["4"] == 1.0
    assert {p["run"] for p in report["frontier"]} == {"gate/copy", "dynamic@1/copy", "dynamic@3/copy"}
    answers = report["samples"]["answers"]
    assert len(answers) == 2 and all(a["pieces_match_text"] for a in answers)


def test_a_users_own_folders_are_labelled_by_their_names(evals, tmp_path):
    root = evals["root"]
    out = tmp_path / "mine"
    assert main(["report", str(root / "winner"), str(root / "baseline"), "--samples", "0", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["winner", "baseline"] and report["samples"] is None
    assert "## Headline" in (out / "report.md").read_text()
    # written again over its own earlier report
    assert main(["report", str(root / "winner"), "--samples", "0", "--out", str(out)]) == 0


def test_bad_input_is_named_and_nothing_is_written(evals, tmp_path, capsys):
    root = evals["root"]
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "report.json").write_text("{")
    (tmp_path / "torn" / "records.jsonl").write_text("")
    cases = [(["winner="], "give LABEL=DIR[,DIR...] or DIR"),
             ([f"winner={tmp_path / 'nope'}"], "is not a folder"),
             ([f"winner={tmp_path}"], "has no report.json"),
             ([str(root / "winner"), f"winner={root / 'baseline'}"], "the label 'winner' is given twice"),
             ([f"x={tmp_path / 'torn'}"], "holds a file that is not JSON"),
             ([f"winner={root / 'winner'}", "--agreement", str(evals["agreement"]),
               "--agreement-label", "LITE=runs/lite"], "has no model 'runs/lite'"),
             ([f"winner={root / 'winner'}", "--agreement", str(tmp_path / "none.json")], "no such file"),
             ([f"winner={root / 'winner'}", "--agreement-label", "LITE=x"], "needs --agreement"),
             ([f"winner={root / 'winner'}", "--agreement-label", "LITE"], "give LABEL=MODELKEY"),
             ([f"winner={root / 'winner'}", "--samples", "-1"], "--samples"),
             ([f"winner={root / 'winner'}", "--out", str(root / "winner")], "is a `lite eval` folder"),
             ([f"winner={root / 'winner'}", "--out", str(tmp_path / "theirs")], "holds files lite did not write")]
    for argv, message in cases:
        if "--out" not in argv:
            argv = argv + ["--out", str(tmp_path / "out")]
        assert main(["report", *argv]) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1 and "Traceback" not in err, (message, err)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["notes.txt"]
    assert json.loads((root / "winner" / "report.json").read_text())["complete"] is True
