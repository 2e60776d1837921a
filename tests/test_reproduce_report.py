"""benchmarks/reproduce_report.py on tiny `lite eval` folders: every section, a row per model, exit marks in
the samples, both figures, and bad input refused with a message. The script runs as users run it, in its
own process (tests import no benchmark)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import VICUNA, FakeEmbedder, make_tiny_model_dir

from lite import LiteConfig
from lite.decoding.gate import LearnedExitGate, save_gate
from lite.evaluation import evaluate

REPO = Path(__file__).resolve().parent.parent


def reproduce_report(argv: list[str]) -> subprocess.CompletedProcess:
    """``python benchmarks/reproduce_report.py ARGV`` with this checkout's lite, offline."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "reproduce_report.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=600, check=False)

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


@pytest.mark.slow  # a child process that loads the sentence embedder
def test_report_tells_the_story_for_every_model(evals, tmp_path):
    root = evals["root"]
    out = tmp_path / "report"
    run = reproduce_report([
        "--eval", f"winner={root / 'winner-gate'},{root / 'winner'}",
        "--eval", f"baseline={root / 'baseline'}", "--agreement", str(evals["agreement"]),
        "--agreement-label", f"winner={evals['winner']}",
        "--agreement-label", f"baseline={evals['baseline']}",
        "--agreement-label", "untuned=smollm2-135m-instruct",
        "--samples", "2", "--out-dir", str(out)])
    assert run.returncode == 0, run.stderr[-2000:]
    md = (out / "report.md").read_text()
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


@pytest.mark.slow  # child processes
def test_bad_input_is_named(evals, tmp_path):
    root = evals["root"]
    cases = [(["--eval", "winner"], "give LABEL=DIR[,DIR...]"),
             (["--eval", f"winner={tmp_path / 'nope'}"], "is not a folder"),
             (["--eval", f"winner={tmp_path}"], "has no report.json"),
             (["--eval", f"winner={root / 'winner'}", "--agreement", str(evals["agreement"]),
               "--agreement-label", "LITE=runs/lite"], "has no model 'runs/lite'"),
             (["--eval", f"winner={root / 'winner'}", "--agreement-label", "LITE=x"], "needs --agreement")]
    for argv, message in cases:
        run = reproduce_report(argv + ["--out-dir", str(tmp_path / "out")])
        assert run.returncode == 2
        assert message in run.stderr, message
    assert not (tmp_path / "out").exists()
