"""The early-exit decoding engine against transformers' own generate, and its cache invariants."""

import json

import pytest
import torch
from tiny import full_cache

from lite import load_model
from lite.cli import main
from lite.decoding import (
    CONFIDENCES,
    Decoder,
    ExitPolicy,
    GenerationSettings,
    generate,
    parse_exit,
    parse_thresholds,
    stream,
)
from lite.decoding.sampling import TextStream
from lite.errors import LiteError
from lite.model.prompts import encode_prompt

PROMPT = "hello there the world"
N = 16



@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def prompt_ids(lm):
    return lm.tokenizer(PROMPT)["input_ids"]


def hf_greedy(lm, ids, n):
    out = lm.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


class FakeGate:
    """Leaves at ``layer`` on the decode steps listed in ``exit_steps``; counts its calls."""

    def __init__(self, layer, exit_steps):
        self.layer, self.exit_steps, self.step, self.calls = layer, set(exit_steps), -1, []

    def should_exit(self, layer, normed_state):
        assert normed_state.shape == (32,)
        if layer == 1:
            self.step += 1
        self.calls.append(layer)
        return layer == self.layer and self.step in self.exit_steps

    def flops(self, layer):
        return 1000


def mixed_gate():
    """Exits at layer 1 on steps 0, 1, 5; layer 2 on steps 2, 6, 7; layer 3 on step 9; else layer 4."""

    plan = {0: 1, 1: 1, 5: 1, 2: 2, 6: 2, 7: 2, 9: 3}

    class Gate(FakeGate):
        def should_exit(self, layer, normed_state):
            if layer == 1:
                self.step += 1
            self.calls.append(layer)
            return plan.get(self.step) == layer

    return Gate(None, [])


# ----------------------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("kv", ["copy", "recompute"])
@pytest.mark.parametrize("policy", [
    ExitPolicy("none"), ExitPolicy("static", layer=4),
    *[ExitPolicy("dynamic", thresholds={1: 2.0, 2: 2.0, 3: 2.0}, confidence=c) for c in CONFIDENCES],
], ids=["none", "static4", *[f"dynamic-{c}" for c in CONFIDENCES]])
def test_greedy_equals_transformers_generate(lm, prompt_ids, policy, kv):
    result = generate(lm, prompt_ids, policy, GenerationSettings(max_new_tokens=N, kv=kv))
    assert result.token_ids == hf_greedy(lm, prompt_ids, N)
    assert [t.exit_layer for t in result.tokens] == [4] * len(result.tokens)
    assert result.layer_cost_improvement == 0.0
    if policy.kind == "none":
        assert result.compute_cost_improvement == 0.0 and all(t.confidence is None for t in result.tokens)


def test_single_token_prompt_and_chat_prompt_match_transformers(lm):
    for ids in ([5], encode_prompt(lm.tokenizer, "name a colour", fmt="chat")):
        assert generate(lm, ids, ExitPolicy(), GenerationSettings(max_new_tokens=8)).token_ids == \
            hf_greedy(lm, ids, 8)


# ----------------------------------------------------------------------------- caches
def _run_with_gate(lm, prompt_ids, kv, n=12):
    gate = mixed_gate()
    decoder = Decoder(lm, [prompt_ids], ExitPolicy("gate", gate=gate), GenerationSettings(max_new_tokens=n, kv=kv))
    snapshots = []
    decoder.after_step = lambda d: snapshots.append([lengths[0] for lengths in d.cache.lengths])
    records = [record for _, record in decoder.run()]
    return decoder, records, snapshots, gate


@pytest.mark.parametrize("kv", ["copy", "recompute"])
def test_cache_holds_exactly_the_processed_positions_after_every_step(lm, prompt_ids, kv):
    _, records, snapshots, _ = _run_with_gate(lm, prompt_ids, kv)
    exits = [r.exit_layer for r in records]
    assert exits == [1, 1, 2, 4, 4, 1, 2, 2, 4, 3, 4, 4]
    n = len(prompt_ids)
    expected = [n] * 4  # prefill: all blocks hold every prompt position; the first token reads its states
    for t, (exit_layer, lengths) in enumerate(zip(exits, snapshots)):
        pos = n - 1 + t
        if t == 0:
            pass  # decided from the prefill's states: no block ran, nothing is pending
        elif kv == "copy":
            expected = [pos + 1] * 4  # the exit state's K/V filled into every skipped block
        else:  # blocks up to the exit hold every position so far; deeper ones wait for a deeper token
            expected = [pos + 1 if k <= exit_layer else expected[k - 1] for k in range(1, 5)]
        assert lengths == expected, f"step {t}"
    if kv == "recompute":
        assert snapshots[0] == [n] * 4 and snapshots[1] == [n + 1, n, n, n] and snapshots[3] == [n + 3] * 4


def test_recompute_leaves_the_full_models_cache(lm, prompt_ids):
    decoder, records, _, _ = _run_with_gate(lm, prompt_ids, "recompute", n=10)  # ends with an exit at 3
    processed = prompt_ids + [r.id for r in records[:-1]]  # the last token is produced, never consumed
    full = full_cache(lm, processed)
    lengths = [n[0] for n in decoder.cache.lengths]
    assert lengths[0] == len(processed) and lengths[-1] < len(processed)  # some positions still pending
    for i, n in enumerate(lengths):
        torch.testing.assert_close(decoder.cache.keys[i][:, :, :n], full.keys[i][:, :, :n], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(decoder.cache.values[i][:, :, :n], full.values[i][:, :, :n], rtol=1e-4, atol=1e-4)
    # a token that went all the way down saw an exact cache, so it is the full model's greedy choice
    with torch.no_grad():
        ref = lm.model(torch.tensor([processed])).logits[0].argmax(-1).tolist()
    n0 = len(prompt_ids) - 1
    deep = [t for t, r in enumerate(records) if r.exit_layer == 4]
    assert deep and all(records[t].id == ref[n0 + t] for t in deep)


def test_copy_fills_skipped_blocks_from_the_exit_state(lm, prompt_ids):
    decoder, records, _, _ = _run_with_gate(lm, prompt_ids, "copy")
    costs = decoder.rows[0].costs
    # the first token's position was run through every block by the prefill: nothing to fill
    assert [c.kv_fills for c in costs] == [0] + [4 - r.exit_layer for r in records[1:]]
    assert all(c.recomputed == 0 for c in costs)


def test_recompute_cost_counts_pending_positions(lm, prompt_ids):
    decoder, records, _, _ = _run_with_gate(lm, prompt_ids, "recompute")
    # step 2 (exit 2) pushes steps 0, 1 through block 2; step 3 (exit 4) pushes step 0..2 through 3, 4 and
    # step 1, 2 ... : count (block, position) pairs by hand from the exit pattern
    level, pairs = [4], [0]  # the first token's position went through every block in the prefill
    for r in records[1:]:
        count = sum(max(0, r.exit_layer - lv) for lv in level)
        level = [max(lv, r.exit_layer) for lv in level] + [r.exit_layer]
        pairs.append(count)
    assert [c.recomputed for c in decoder.rows[0].costs] == pairs
    assert sum(pairs) > 0 and all(c.kv_fills == 0 for c in decoder.rows[0].costs)


# ----------------------------------------------------------------------------- the learned gate
def test_gate_decides_and_head_runs_only_where_it_exits(lm, prompt_ids):
    gate = FakeGate(layer=2, exit_steps={0, 2})
    heads = []
    hook = lm.lm_head.register_forward_hook(lambda *a: heads.append(1))
    try:
        result = generate(lm, prompt_ids, ExitPolicy("gate", gate=gate), GenerationSettings(max_new_tokens=4))
    finally:
        hook.remove()
    assert [t.exit_layer for t in result.tokens] == [2, 4, 2, 4]
    assert len(heads) == 4  # one head evaluation per token: at the gate's exit, or at L
    assert gate.calls == [1, 2, 1, 2, 3, 1, 2, 1, 2, 3]  # asked at each exit layer below L until it says go
    costs = result.cost.tokens
    assert [c.head_evals for c in costs] == [1, 1, 1, 1]
    assert [c.gate_flops for c in costs] == [2000, 3000, 2000, 3000]


# ----------------------------------------------------------------------------- sampling and stopping
def test_sampling_is_reproducible_with_a_seed(lm, prompt_ids):
    def run(seed, **kw):
        s = GenerationSettings(max_new_tokens=N, temperature=1.0, seed=seed, **kw)
        return generate(lm, prompt_ids, ExitPolicy(), s).token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)
    # a nucleus so small that only the top token survives is greedy
    assert run(3, top_p=1e-6) == hf_greedy(lm, prompt_ids, N)


def test_text_stream_holds_back_and_cuts_stop_strings(lm):
    tok = lm.tokenizer
    ids = tok("hello world, the end")["input_ids"]
    stream_ = TextStream(tok, stop=[", the"])
    pieces, stopped = [], False
    for i in ids:
        piece, stopped = stream_.push(i)
        pieces.append(piece)
        if stopped:
            break
    assert stopped and stream_.text == "hello world" and "".join(pieces) == "hello world"


def test_stop_string_ends_generation_without_the_stop_text(lm, prompt_ids):
    plain = generate(lm, prompt_ids, ExitPolicy(), GenerationSettings(max_new_tokens=N))
    assert "".join(t.text for t in plain.tokens) == plain.text
    stop = plain.text[3:5]
    cut = plain.text.find(stop)
    result = generate(lm, prompt_ids, ExitPolicy(), GenerationSettings(max_new_tokens=N, stop=[stop]))
    assert result.text == plain.text[:cut] and result.finish_reason == "stop"
    assert "".join(t.text for t in result.tokens) == result.text
    assert len(result.tokens) < len(plain.tokens)


def test_eos_stops_and_is_kept_as_the_last_token(lm, prompt_ids):
    plain = generate(lm, prompt_ids, ExitPolicy(), GenerationSettings(max_new_tokens=N))
    decoder = Decoder(lm, [prompt_ids], ExitPolicy(), GenerationSettings(max_new_tokens=N))
    decoder.eos = {plain.token_ids[2]}
    out = [record for _, record in decoder.run()]
    first = plain.token_ids.index(plain.token_ids[2])
    assert [r.id for r in out] == plain.token_ids[: first + 1] and decoder.rows[0].finish_reason == "stop"


def test_stream_yields_the_same_records_and_calls_on_token(lm, prompt_ids):
    seen = []
    records = list(stream(lm, prompt_ids, ExitPolicy("static", layer=2), GenerationSettings(max_new_tokens=6),
                          on_token=seen.append))
    assert records == seen and [r.exit_layer for r in records] == [2] * 6
    assert all(0.0 < r.confidence <= 1.0 for r in records)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("policy, settings, prompt, match", [
    (ExitPolicy("sometimes"), GenerationSettings(), None, "not a policy"),
    (ExitPolicy("static", layer=5), GenerationSettings(), None, r"static:5.*out of range"),
    (ExitPolicy("static", layer=0), GenerationSettings(), None, "out of range"),
    (ExitPolicy("dynamic"), GenerationSettings(), None, "needs thresholds"),
    (ExitPolicy("dynamic", thresholds={1: 0.5}), GenerationSettings(), None, r"layers \[2, 3\] have no threshold"),
    (ExitPolicy("dynamic", thresholds={1: .5, 2: .5, 3: .5}, confidence="vibes"), GenerationSettings(), None,
     "--confidence"),
    (ExitPolicy(), GenerationSettings(kv="forget"), None, "--kv"),
    (ExitPolicy(), GenerationSettings(max_new_tokens=0), None, "--max-new-tokens"),
    (ExitPolicy(), GenerationSettings(), [], "prompt is empty"),
    (ExitPolicy(), GenerationSettings(), [5] * 600, "context is 512"),
])
def test_bad_input_is_one_clear_error(lm, prompt_ids, policy, settings, prompt, match):
    with pytest.raises(LiteError, match=match):
        generate(lm, prompt_ids if prompt is None else prompt, policy, settings)


def test_parsers(lm, monkeypatch):
    monkeypatch.setattr(lm.lite_config, "thresholds", {"1": 0.5, "2": 0.5, "3": 0.5})
    assert parse_exit(lm, "static:3").layer == 3 and parse_exit(lm, "dynamic").kind == "dynamic"
    assert parse_exit(lm, "dynamic", 2.0).checks == {1: 1.0, 2: 1.0, 3: 1.0}  # the scale is applied once
    assert parse_thresholds("1:0.9, 3:0.5") == {1: 0.9, 3: 0.5}
    for bad in ("static:9", "static:x", "fast", "dynamic:2"):
        with pytest.raises(LiteError, match="--exit|argument"):
            parse_exit(lm, bad)
    with pytest.raises(LiteError, match="--thresholds"):
        parse_thresholds("1=0.9")


def test_calibrated_thresholds_come_from_lite_config(lm, prompt_ids, monkeypatch):
    monkeypatch.setattr(lm.lite_config, "thresholds", {"1": 0.0, "2": 0.0, "3": 0.0})
    monkeypatch.setattr(lm.lite_config, "confidence", "margin")
    result = generate(lm, prompt_ids, parse_exit(lm, "dynamic"), GenerationSettings(max_new_tokens=4))
    assert [t.exit_layer for t in result.tokens] == [1] * 4
    assert result.layer_cost_improvement == pytest.approx(0.75)


# ----------------------------------------------------------------------------- the CLI
def test_cli_json_is_one_object(tiny_model_dir, lm, capsys):
    code = main(["generate", "--model", str(tiny_model_dir), "--json", "--max-new-tokens", "5",
                 "--exit", "dynamic", "--thresholds", "1:0.8,2:0.8,3:0.8", "--confidence", "state_cosine",
                 "--kv", "recompute", "--threads", "1", "name a colour"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)  # exactly one JSON document
    assert out["prompt_ids"] == encode_prompt(lm.tokenizer, "name a colour", fmt="chat")
    assert out["num_layers"] == 4 and len(out["tokens"]) == 5
    assert set(out["tokens"][0]) == {"id", "text", "exit_layer", "confidence"}
    assert "".join(t["text"] for t in out["tokens"]) == out["text"]
    for key in ("layer_cost_improvement", "compute_cost_improvement", "seconds"):
        assert isinstance(out[key], float)


def test_cli_human_view_colours_tokens_and_prints_cost(tiny_model_dir, capsys):
    code = main(["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "4", "--exit", "static:2",
                 "--color", "always", "hi"])
    captured = capsys.readouterr()
    assert code == 0 and "\033[38;5;" in captured.out and "compute cost improvement" in captured.out
    assert "exit layer:" in captured.err  # the legend


@pytest.mark.parametrize("argv, match", [
    (["--exit", "sometimes", "hi"], "--exit"),
    (["--exit", "static:7", "hi"], "out of range"),
    (["--exit", "dynamic", "hi"], "needs thresholds"),
    (["   "], "prompt is empty"),
    (["--prompt-format", "raw", "hello " * 600], "context"),
])
def test_cli_bad_input_exits_2_with_one_line(tiny_model_dir, capsys, argv, match):
    assert main(["generate", "--model", str(tiny_model_dir), *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lite generate: error")]
    assert len(err) == 1 and pytest.importorskip("re").search(match, err[0])


# ----------------------------------------------------------------------------- the embedded default model
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_default_model_exits_off_equals_transformers_generate(dtype):
    lm = load_model(None, dtype=dtype, device="cpu")
    ids = encode_prompt(lm.tokenizer, "Name three primary colours.", fmt="chat")
    result = generate(lm, ids, ExitPolicy(), GenerationSettings(max_new_tokens=24))
    assert result.token_ids == hf_greedy(lm, ids, 24)
