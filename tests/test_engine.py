"""The one engine's contracts: how a policy runs (batch_limit) everywhere, one policy object, the exit flags
defined once, and streaming text in O(1) per token."""

import inspect
import json
from dataclasses import fields

import numpy as np
import pytest
import torch

from lite import load_model
from lite.decoding import (
    Decoder,
    ExitOptions,
    ExitPolicy,
    GenerationSettings,
    SpeculativeDecoder,
    batch_limit,
    decoder_for,
    generate,
    generate_batch,
    make_policy,
)
from lite.decoding.sampling import TextStream
from lite.errors import LiteError

THRESHOLDS = {1: 0.0, 2: 0.0, 3: 0.0}  # every token is drafted at layer 1
PROMPTS = [[5, 17, 42, 99, 3], [7, 8], [11, 12, 13, 14, 15, 16], [21, 22, 23]]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu")


# ----------------------------------------------------------------------------- how a policy runs
def test_speculative_runs_one_sequence_at_a_time_everywhere_and_stays_lossless(lm):
    spec = ExitPolicy("speculative", thresholds=THRESHOLDS, max_draft_tokens=3)
    assert batch_limit(spec, 8) == 1 and batch_limit(ExitPolicy(), 8) == 8
    assert decoder_for(spec) is SpeculativeDecoder and decoder_for(ExitPolicy("static", layer=2)) is Decoder
    settings = GenerationSettings(max_new_tokens=8)
    full = generate_batch(lm, PROMPTS, ExitPolicy(), settings)
    batched = generate_batch(lm, PROMPTS, spec, settings, batch_size=8)  # decodes them one by one
    assert [r.token_ids for r in batched] == [r.token_ids for r in full]
    assert sum(r.cost.drafted for r in batched) > 0
    with pytest.raises(LiteError, match="one sequence at a time"):
        SpeculativeDecoder(lm, PROMPTS[:2], spec, settings)
    with pytest.raises(LiteError, match="one sequence at a time"):
        Decoder(lm, PROMPTS[:1], spec, settings)  # the plain decoder does not pretend to run it
    d = SpeculativeDecoder.open(lm, spec)
    d.add(PROMPTS[0], settings)
    with pytest.raises(LiteError, match="one sequence at a time"):
        d.add(PROMPTS[1], settings)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_lite_eval_runs_speculative_at_any_batch_size(tiny_model_dir, tmp_path, capsys, batch_size):
    from lite.cli import main

    sets = tmp_path / "vicuna.jsonl"
    sets.write_text("".join(json.dumps({"question_id": i, "category": "x", "turns": [t]}) + "\n"
                            for i, t in enumerate(["Name a color.", "Say hello.", "Count to three."], 1)))
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(tiny_model_dir), "--testset", f"vicuna={sets}", "--exit", "speculative",
                 "--thresholds", "0.1", "--max-new-tokens", "4", "--batch-size", str(batch_size), "--no-hf-baseline",
                 "--threads", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert ("decodes one sequence at a time" in err) is (batch_size > 1)  # said when it matters
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:  # lossless: the speculative answer is the full model's
        (run,) = r["runs"].values()
        assert run["token_ids"] == r["full"]["token_ids"]


# ----------------------------------------------------------------------------- one policy object
def test_the_policy_is_frozen_hashable_and_complete(lm, monkeypatch):
    monkeypatch.setattr(lm.lite_config, "thresholds", {"1": 0.1, "2": 0.08, "3": 0.06})
    a = make_policy(lm, exit="dynamic", threshold_scale=2.0)
    b = make_policy(lm, exit="dynamic", threshold_scale=2.0)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1  # equal requests share a lane
    assert a.checks == pytest.approx({1: 0.2, 2: 0.16, 3: 0.12})  # scaled once, at build time
    assert make_policy(lm, exit="dynamic", exit_layers="2") != a  # every field counts
    with pytest.raises(Exception):
        a.kind = "none"  # frozen
    with pytest.raises(LiteError, match="kind 'gate'"):
        ExitPolicy("dynamic", gate=object())  # a gate is a kind of its own, not a flavour of dynamic


def test_serve_lanes_keep_policies_that_differ_in_any_field_apart(lm):
    from lite.serving.queue import lane_key

    one = ExitPolicy("dynamic", thresholds=THRESHOLDS)
    assert lane_key(one, "copy") == lane_key(ExitPolicy("dynamic", thresholds=dict(THRESHOLDS)), "copy")
    for other in (ExitPolicy("dynamic", thresholds=THRESHOLDS, exit_ids=(1, 2, 3)),
                  ExitPolicy("dynamic", thresholds=THRESHOLDS, exit_layers=(1, 2, 3)),
                  ExitPolicy("dynamic", thresholds=THRESHOLDS, confidence="margin"),
                  ExitPolicy("speculative", thresholds=THRESHOLDS, draft_stop_confidence=0.5)):
        assert lane_key(one, "copy") != lane_key(other, "copy")
    assert lane_key(one, "copy") != lane_key(one, "recompute")


def test_exit_flags_are_defined_once_for_the_cli_the_api_and_custom_generate():
    from lite.api import LiteLM
    from lite.cli import build_parser
    from lite.decoding.hf_generate import custom_generate

    options = {f.name: f.default for f in fields(ExitOptions)}
    for fn in (LiteLM.generate, custom_generate):
        params = inspect.signature(fn).parameters
        missing = [n for n in options if n not in params]
        assert not missing, (fn.__qualname__, missing)
        assert {n: params[n].default for n in options if n != "exit"} == \
            {n: d for n, d in options.items() if n != "exit"}, fn.__qualname__
    generate_parser = build_parser()._subparsers._group_actions[0].choices["generate"]
    flags = {a.dest: a for a in generate_parser._actions}
    for f in fields(ExitOptions):
        assert flags[f.name].option_strings == [f.metadata["flag"]]
        assert flags[f.name].default == f.default


# ----------------------------------------------------------------------------- streaming text
def _stream_all(tok, ids, stop=None):
    s = TextStream(tok, stop)
    pieces, stopped = [], False
    for i in ids:
        piece, stopped = s.push(i)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        pieces.append(s.flush())
    return s, pieces, stopped


def test_text_stream_is_exact_with_multibyte_characters_split_across_tokens(lm):
    tok = lm.tokenizer  # byte-level: "é", "日本" and the emoji are several byte tokens each
    text = "café 日本語 the end 🙂 naïve"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.encode()) // 2  # many characters span several tokens
    s, pieces, stopped = _stream_all(tok, ids)
    assert not stopped and "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in p for p in pieces)  # an incomplete character is never released
    s, pieces, stopped = _stream_all(tok, ids, stop=["日本"])
    assert stopped and s.text == "café " and "".join(pieces) == "café "
    s, pieces, stopped = _stream_all(tok, ids, stop=["語 th", "🙂"])
    assert stopped and s.text == "café 日本" and "".join(pieces) == s.text


def test_text_stream_decodes_a_window_per_token_not_everything_so_far(lm):
    tok = lm.tokenizer
    ids = tok("the end " * 200, add_special_tokens=False)["input_ids"]
    lengths = []
    real = tok.decode

    class Counting:
        def decode(self, window, **kw):
            lengths.append(len(window))
            return real(window, **kw)

    s = TextStream(Counting())
    for i in ids:
        s.push(i)
    assert s.text + s.flush() == real(ids)
    assert max(lengths) <= 4 < len(ids)  # O(1) per token: a short window, whatever the length so far


def test_generated_text_equals_the_tokenizers_decode(lm):
    result = generate(lm, [5, 17, 42], ExitPolicy(), GenerationSettings(max_new_tokens=40))
    assert result.text == lm.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert "".join(t.text for t in result.tokens) == result.text
