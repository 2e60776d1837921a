"""The ceiling of early exit: the oracle saving and each decision rule's frontier, checked by hand."""

import json
import shutil

import numpy as np
import pytest
import torch

from lite import load_model
from lite.calibration.calibrate import CalibrationData
from lite.calibration.ceiling import ceiling, frontier, markdown, measure_ceiling, oracle_layers, plot, point
from lite.cli import main
from lite.errors import LiteError
from lite.model.prompts import default_format, encode_prompt
from lite.training.data import Example


def _data(agree, scores, layers=(1, 2, 3), num_layers=4, states=None):
    agree = np.asarray(agree, dtype=bool)
    scores = np.asarray(scores, dtype=np.float32)
    conf = {m: scores for m in ("max_prob", "margin", "entropy", "state_cosine")}
    return CalibrationData(layers=list(layers), num_layers=num_layers, confidences=conf, agree=agree,
                           example_index=np.zeros(agree.shape[1], dtype=np.int64), states=states,
                           source="generated", examples=1)


# 3 exits (layers 1, 2, 3) of L = 4, five tokens
AGREE = [[1, 0, 0, 0, 0],
         [1, 1, 0, 0, 0],
         [0, 1, 1, 0, 1]]
SCORES = [[0.875, 0.25, 0.75, 0.125, 0.125],  # binary fractions: exact in float32
          [0.5, 0.875, 0.375, 0.625, 0.25],
          [0.125, 0.125, 0.875, 0.25, 0.9375]]


def test_oracle_is_the_first_agreeing_exit_worked_by_hand():
    # token 0 leaves at 1, token 1 at 2, tokens 2 and 4 at 3, token 3 (no exit agrees) at L = 4
    assert oracle_layers(np.array(AGREE, bool), [1, 2, 3], 4).tolist() == [1, 2, 3, 4, 3]
    c = ceiling(_data(AGREE, SCORES))
    assert c.oracle_saving == pytest.approx(1 - (1 + 2 + 3 + 4 + 3) / 5 / 4)  # 0.35
    assert c.oracle_share == pytest.approx({1: 0.2, 2: 0.2, 3: 0.4, 4: 0.2})
    assert c.agreement == pytest.approx({1: 0.2, 2: 0.4, 3: 0.6})
    # with exits 2 and 3 only, token 0 leaves at 2: (2 + 2 + 3 + 4 + 3) / 5
    fewer = ceiling(_data(AGREE, SCORES), layers=[2, 3])
    assert fewer.oracle_saving == pytest.approx(1 - 14 / 5 / 4)
    assert "state_cosine" not in fewer.frontiers and "state_cosine" in c.frontiers  # it needs every exit


def test_frontier_points_worked_by_hand():
    data = _data(AGREE, SCORES)
    # cut 0.75 at every exit: token 0 leaves at 1 (0.875, agrees), token 1 at 2 (0.875, agrees), token 2 at 1
    # (0.75, disagrees), token 3 reaches L, token 4 at 3 (0.9375, agrees)
    p = point(data.confidences["max_prob"], data.agree, np.full(3, 0.75), [1, 2, 3], 4, 0.75)
    assert p.saving == pytest.approx(1 - (1 + 2 + 1 + 4 + 3) / 5 / 4)
    assert p.agreement == pytest.approx(4 / 5)
    # cut 0.875: token 2 now goes on to layer 3 (0.875) and agrees
    p = point(data.confidences["max_prob"], data.agree, np.full(3, 0.875), [1, 2, 3], 4, 0.875)
    assert (p.saving, p.agreement) == (pytest.approx(1 - (1 + 2 + 3 + 4 + 3) / 5 / 4), pytest.approx(1.0))
    pts = frontier(data.confidences["max_prob"].astype(np.float64), data.agree, [1, 2, 3], 4, cuts=200)
    assert pts[-1].saving == 0.0 and pts[-1].agreement == 1.0  # a cut above every score: nobody leaves
    assert pts[0].saving == pytest.approx(0.75)  # the lowest cut: every token leaves at layer 1
    c = ceiling(data)
    assert c.saving_at("max_prob", 1.0) == pytest.approx(0.35)  # the best cut reaches the oracle here
    assert c.saving_at("max_prob", 0.8) == pytest.approx(max(q.saving for q in pts if q.agreement >= 0.8))
    with pytest.raises(LiteError, match="were not measured"):
        ceiling(data, layers=[5])


class _FakeGate:
    """The gate's contract: per-layer probabilities of the normed states, and per-layer cuts."""

    def __init__(self, thresholds):
        self.thresholds = thresholds

    def probability(self, layer, states):
        return states[:, 0]  # the first feature is the probability


def test_gate_and_calibrated_policies_sit_where_their_cuts_put_them():
    states = np.zeros((3, 5, 2), dtype=np.float32)
    states[:, :, 0] = np.array(SCORES)[::-1]  # the gate scores differ from the confidences
    data = _data(AGREE, SCORES, states=states)
    gate = _FakeGate({1: 0.9, 3: 0.5})  # layer 2 closed: no token leaves there
    c = ceiling(data, gate=gate, thresholds={1: 0.85, 2: 0.85, 3: 0.85}, default="gate")
    g = np.array(SCORES)[::-1]
    # gate: token n leaves at 1 when g[0, n] >= 0.9, else at 3 when g[2, n] >= 0.5
    exits = [1 if g[0, n] >= 0.9 else 3 if g[2, n] >= 0.5 else 4 for n in range(5)]
    agreeing = [exits[n] == 4 or AGREE[[1, 2, 3].index(exits[n])][n] for n in range(5)]
    assert c.policies["gate"].saving == pytest.approx(1 - np.mean(exits) / 4)
    assert c.policies["gate"].agreement == pytest.approx(np.mean(agreeing))
    # thresholds 0.85 on the confidences: tokens 0, 1, 2, 3, 4 leave at 1, 2, 3, L, 3; all agree but none at L
    assert c.policies["dynamic"].saving == pytest.approx(1 - (1 + 2 + 3 + 4 + 3) / 5 / 4)
    assert "gate" in c.frontiers and c.default == "gate"
    text = markdown(c)
    assert "| oracle" in text and "35.0%" in text and "(the default, --exit auto)" in text
    assert "learned gate" in text and json.loads(json.dumps(c.record()))["oracle_saving"] == 0.35


def test_a_cascade_gate_sits_where_gate_and_max_prob_cuts_put_it():
    states = np.zeros((3, 5, 2), dtype=np.float32)
    states[:, :, 0] = np.array(SCORES)[::-1]
    data = _data(AGREE, SCORES, states=states)
    gate = _FakeGate({1: 0.5, 2: 0.5, 3: 0.5})
    gate.confirm = {1: 0.95, 2: 0.85, 3: 0.85}
    c = ceiling(data, gate=gate)
    g, m = np.array(SCORES)[::-1], np.array(data.confidences["max_prob"], dtype=np.float64)
    # token n leaves at the first exit where the gate passes (>= 0.5) and max-prob reaches that exit's cut
    exits = [next((k for i, k in enumerate([1, 2, 3]) if g[i, n] >= 0.5 and m[i, n] >= gate.confirm[k]), 4)
             for n in range(5)]
    plain = [next((k for i, k in enumerate([1, 2, 3]) if g[i, n] >= 0.5), 4) for n in range(5)]
    assert exits != plain  # the cuts on max-prob change where tokens leave, so this can fail
    assert c.policies["gate"].saving == pytest.approx(1 - np.mean(exits) / 4)


@pytest.fixture(scope="module")
def forced_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with blocks 3 and 4 turned into the identity (attention and MLP outputs zero): layer
    2's state is layer 4's, so exits 2 and 3 agree with the final layer on every token, by construction."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("forced") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for block in model.model.layers[2:]:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_the_ceiling_of_a_model_with_forced_exits_matches_a_hand_computation(forced_model):
    """Teacher-forced on the model's own answers, the oracle and a max-prob point equal what plain
    transformers' hidden states give, computed here without lite's scorer."""
    from lite.decoding import ExitPolicy, GenerationSettings, generate

    lm = load_model(forced_model, device="cpu")
    assert lm.exit_layers == [1, 2, 3, 4]
    rows = [Example(f"0:{i}", f"Write {i} words.", "", "") for i in range(3)]
    c, data = measure_ceiling(lm, rows, max_new_tokens=6)
    assert c.agreement[2] == c.agreement[3] == 1.0  # forced
    exits, probs, agree = [], [], []
    for row in rows:
        prompt = encode_prompt(lm.tokenizer, row.instruction, row.input, default_format(lm))
        answer = generate(lm, prompt, ExitPolicy(kind="none"), GenerationSettings(max_new_tokens=6)).token_ids
        ids = torch.tensor([prompt + list(answer)])
        with torch.no_grad():
            out = lm.model(ids, output_hidden_states=True)
            pos = slice(len(prompt) - 1, ids.shape[1] - 1)
            final = out.logits[0, pos].argmax(-1)
            per = [lm.model.lm_head(lm.model.model.norm(out.hidden_states[k][0, pos])) for k in (1, 2, 3)]
        agree.append(np.stack([(p.argmax(-1) == final).numpy() for p in per]))
        probs.append(np.stack([torch.softmax(p, -1).max(-1).values.numpy() for p in per]))
    agree, probs = np.concatenate(agree, 1), np.concatenate(probs, 1)
    assert c.tokens == agree.shape[1]
    exits = np.where(agree[0], 1, 2)  # exit 2 always agrees
    assert c.oracle_saving == pytest.approx(1 - exits.mean() / 4)
    cut = float(np.median(probs))
    leave = np.where(probs[0] >= cut, 1, np.where(probs[1] >= cut, 2, np.where(probs[2] >= cut, 3, 4)))
    ok = np.where(leave == 1, agree[0], True)
    mine = point(data.confidences["max_prob"].astype(np.float64), data.agree, np.full(3, cut), [1, 2, 3], 4)
    assert mine.saving == pytest.approx(1 - leave.mean() / 4, abs=1e-9)
    assert mine.agreement == pytest.approx(ok.mean())


def test_calibrate_reports_the_ceiling_table_and_plot(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    rows = [{"instruction": f"Repeat the word number {i}.", "input": "", "output": f"number {i}"} for i in range(8)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    code = main(["calibrate", "--model", str(model), "--data", str(data), "--gate", "--min-tokens", "16",
                 "--ceiling", "6", "--max-new-tokens", "8"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| oracle" in out and "learned gate" in out and "calibrated gate" in out
    assert (model / "ceiling.png").stat().st_size > 1000 and "| oracle" in (model / "ceiling.md").read_text()
    record = json.loads((model / "lite_config.json").read_text())["calibration"]["ceiling"]
    assert record["examples"] == 6 and 0.0 <= record["oracle_saving"] <= 0.75 and "frontiers" not in record
    plot(record | {"frontiers": {}}, tmp_path / "p.png")  # the summary alone draws (oracle and policies)
