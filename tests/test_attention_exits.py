"""Attention exit modules: one decoder block per exit, with keys and values of its own in the decode cache.

Every token whose layer-k state exists writes the K/V of the exit of layer k (the tests check the cache
against the module run teacher-forced over the whole sequence), the full model is untouched, every policy
decodes with them in both K/V strategies and in batches, the writes and reads are in the cost, and the
modules save, load and train.
"""

import dataclasses
import json
import shutil

import pytest
import torch

from lite import load_model
from lite.decoding import ExitPolicy, GenerationSettings, generate, generate_batch
from lite.decoding.cost import ModelShape, token_flops
from lite.decoding.engine import Decoder
from lite.decoding.gate import LearnedExitGate
from lite.errors import LiteError
from lite.model.config import LiteConfig
from lite.model.exit_modules import EXIT_MODULES_FILE, ExitModules

from tiny import agreeing_model, decode_joining, random_prompts

PROMPTS = [[5, 17, 9, 22, 3], [7, 8], [11, 12, 13, 14, 15, 16, 17], [4]]
LAYERS = [1, 2, 3]  # every exit below L = 4


def _with_attention(lm, seed: int = 0, noise: float = 0.3):
    """``lm`` with attention modules at layers 1..3: copies of the next block, moved off it by noise (an
    untouched copy of block 4 at layer 3 would be the final layer itself, and hide a module reading the
    wrong K/V)."""
    lm.exit_modules = ExitModules("attention", LAYERS, lm.hidden_size, lm.blocks)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.exit_modules.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
    return lm


@pytest.fixture(scope="module")
def lm():
    return _with_attention(agreeing_model())


def _medians(lm) -> tuple[dict[int, float], dict[int, float]]:
    """Each exit's median max-prob (through its module) and median state cosine (against the previous
    exit's raw state) on teacher-forced random sequences: thresholds at which tokens leave at every exit."""
    conf, cos = {k: [] for k in LAYERS}, {k: [] for k in LAYERS}
    with torch.no_grad():
        for ids in random_prompts(6, seed=5):
            x = torch.tensor([ids + ids])
            normed = lm.hidden_states(x, layers=LAYERS)
            raw = lm.decoder(input_ids=x, output_hidden_states=True).hidden_states
            for k in LAYERS:
                conf[k].append(torch.softmax(lm.lm_head(normed[k][0]), -1).max(-1).values)
                cos[k].append(torch.cosine_similarity(raw[k][0], raw[k - 1][0], dim=-1))
    return tuple({k: float(torch.cat(v[k]).median()) for k in LAYERS} for v in (conf, cos))


@pytest.fixture(scope="module")
def thresholds(lm):
    return _medians(lm)[0]


@pytest.fixture(scope="module")
def cosines(lm):
    return _medians(lm)[1]


def _gate(lm, features: str, confirm: dict | None = None) -> LearnedExitGate:
    width = lm.hidden_size * (2 if features == "state+delta" else 1)
    g = torch.Generator().manual_seed(3)
    params = {k: [(torch.randn(1, width, generator=g) * 0.5, torch.zeros(1))] for k in LAYERS}
    return LearnedExitGate(params, {k: 0.5 for k in LAYERS}, features=features, confirm=confirm)


def _policies(lm, thresholds, cosines) -> dict[str, ExitPolicy]:
    return {
        "static": ExitPolicy(kind="static", layer=2),
        "dynamic": ExitPolicy(kind="dynamic", thresholds=thresholds),
        "cosine": ExitPolicy(kind="dynamic", confidence="state_cosine", thresholds=cosines),
        "gate-exit": ExitPolicy(kind="gate", gate=_gate(lm, "exit")),
        "gate-state": ExitPolicy(kind="gate", gate=_gate(lm, "state+delta")),
        "cascade": ExitPolicy(kind="gate", gate=_gate(lm, "exit", confirm={k: 0.1 for k in LAYERS})),
    }


def _settings(kv: str, n: int = 10) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=n, kv=kv)


def _key(r):
    return r.token_ids, r.exit_layers, [t.confidence for t in r.tokens]


# ----------------------------------------------------------------------------- (a) the full model untouched
@pytest.mark.parametrize("kv", ["copy", "recompute"])
def test_the_full_model_is_untouched(lm, kv):
    modules, lm.exit_modules = lm.exit_modules, None
    try:
        plain = [generate(lm, p, ExitPolicy(kind="none"), _settings(kv)).token_ids for p in PROMPTS]
    finally:
        lm.exit_modules = modules
    never = ExitPolicy(kind="dynamic", thresholds={k: 2.0 for k in LAYERS})  # every check runs, nobody leaves
    for policy in (ExitPolicy(kind="none"), never):
        assert [generate(lm, p, policy, _settings(kv)).token_ids for p in PROMPTS] == plain
        assert [r.token_ids for r in generate_batch(lm, PROMPTS, policy, _settings(kv))] == plain
    checked = generate(lm, PROMPTS[0], never, _settings(kv))
    assert all(t.exit_module_flops > 0 for t in checked.cost.tokens)  # the modules really ran


# ----------------------------------------------------------------------------- (b) every policy, batches
@pytest.mark.parametrize("name", ["static", "dynamic", "cosine", "gate-exit", "gate-state", "cascade"])
@pytest.mark.parametrize("kv", ["copy", "recompute"])
def test_every_policy_decodes_and_a_batch_is_each_row_alone(lm, thresholds, cosines, name, kv):
    policy = _policies(lm, thresholds, cosines)[name]
    alone = [generate(lm, p, policy, _settings(kv)) for p in PROMPTS]
    if name != "static":  # the test means something: tokens leave at several exits, some at L
        assert len({k for r in alone for k in r.exit_layers}) >= 2
    invariant = generate_batch(lm, PROMPTS, policy, _settings(kv), invariant=True)
    alone_invariant = [generate_batch(lm, [p], policy, _settings(kv), invariant=True)[0] for p in PROMPTS]
    assert [_key(r) for r in invariant] == [_key(r) for r in alone_invariant]  # bitwise: each row's own calls
    for regroup in ([True, False] if kv == "copy" else [True]):  # regrouped, and riding along
        batch = generate_batch(lm, PROMPTS, policy, _settings(kv), regroup=regroup, invariant=False)
        assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
        assert [r.exit_layers for r in batch] == [r.exit_layers for r in alone]
        assert [[t.exit_kv_writes for t in r.cost.tokens] for r in batch] == \
            [[t.exit_kv_writes for t in r.cost.tokens] for r in alone]  # a ride is counted as the write alone


@pytest.mark.parametrize("kv", ["copy", "recompute"])
def test_rows_that_join_a_running_batch_get_what_they_get_alone(lm, thresholds, kv):
    """Continuous batching: a row that joins later writes its prompt's exit K/V in its own prefill, into a
    cache that grows for it (exit layers included), and a released slot reused starts clean."""
    policy = ExitPolicy(kind="dynamic", thresholds=thresholds)
    alone = [generate_batch(lm, [p], policy, _settings(kv), invariant=True)[0] for p in PROMPTS]
    d = Decoder.open(lm, policy, kv=kv, invariant=True)
    got = decode_joining(d, PROMPTS, [_settings(kv)] * len(PROMPTS), _settings(kv, 20), first=2)
    assert [_key(got[i]) for i in range(len(PROMPTS))] == [_key(r) for r in alone]
    assert len(d.cache.keys) == lm.num_layers + len(LAYERS)


def test_speculative_stays_lossless_with_attention_exits(lm, thresholds):
    full = [generate(lm, p, ExitPolicy(kind="none"), _settings("copy", 12)).token_ids for p in PROMPTS]
    low = {k: 0.8 * v for k, v in thresholds.items()}  # drafts that the full model sometimes rejects
    spec = [generate(lm, p, ExitPolicy(kind="speculative", thresholds=low), _settings("copy", 12)) for p in PROMPTS]
    assert [r.token_ids for r in spec] == full
    assert sum(r.cost.drafted for r in spec) > 0 and sum(r.cost.drafted - r.cost.accepted for r in spec) > 0


# ----------------------------------------------------------------------------- (c) K/V of every passing token
def _teacher_forced(lm, ids: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full model's raw layer-``layer`` states over ``ids`` (1, T, D) and the exit module's logits
    there, the module run over the whole sequence (T, V)."""
    with torch.no_grad():
        h = lm.embed(torch.tensor([ids]))
        cache = lm.new_cache(len(ids))
        for k in range(1, layer + 1):
            h = lm.run_block(k, h, cache)
        return h, lm.exit_logits(h, layer)[0]


@pytest.mark.parametrize("kv", ["copy", "recompute"])
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_a_static_exit_reads_what_the_module_reads_teacher_forced(lm, kv, layer):
    """static:K: every token runs blocks 1..K and writes the exit's K/V there, so at every step the exit's
    read is the module over the whole sequence of layer-K states, computed at once."""
    for prompt in PROMPTS:
        result = generate(lm, prompt, ExitPolicy(kind="static", layer=layer), _settings(kv, 8))
        seq = prompt + result.token_ids[:-1]
        _, logits = _teacher_forced(lm, seq, layer)
        at = logits[len(prompt) - 1:]  # token t is read at position n - 1 + t
        assert at.argmax(-1).tolist() == result.token_ids
        expected = torch.softmax(at, -1).max(-1).values
        torch.testing.assert_close(torch.tensor([t.confidence for t in result.tokens]), expected, rtol=1e-4, atol=1e-5)


def _decode(lm, prompts, policy, kv, **kwargs) -> Decoder:
    decoder = Decoder(lm, prompts, policy, _settings(kv, 12), **kwargs)
    decoder.seen = []
    decoder.after_step = lambda d: d.seen.append([list(x) for x in d.cache.lengths])
    for _ in decoder.run():
        pass
    return decoder


@pytest.mark.parametrize("regroup", [True, False])
def test_copy_writes_every_exits_kv_for_every_position_every_step(lm, thresholds, regroup):
    """copy: after every step every exit holds every processed position, as every block does, whether its
    token passed the exit, left below it (filled) or rode along in the batch."""
    d = _decode(lm, PROMPTS, ExitPolicy(kind="dynamic", thresholds=thresholds), "copy", regroup=regroup)
    L, E = lm.num_layers, len(LAYERS)
    for lengths in d.seen:
        assert len(lengths) == L + E
        for r in range(len(PROMPTS)):
            assert len({lengths[b][r] for b in range(L + E)}) == 1
    exits = [k for r in d.results() for k in r.exit_layers]
    assert min(exits) == 1 and max(exits) == L  # tokens left below every exit and passed every exit


@pytest.mark.parametrize("invariant", [False, True])
def test_recompute_pushes_the_exits_kv_and_they_become_exact(lm, thresholds, invariant):
    """recompute: the exit of layer k holds exactly the positions block k holds, and those are the K/V of
    the full model's own layer-k states (teacher-forced), including positions whose token left below k and
    were pushed through block k later."""
    policy = ExitPolicy(kind="dynamic", thresholds=thresholds)
    d = _decode(lm, PROMPTS, policy, "recompute", invariant=invariant)
    pushed = 0
    for r, result in enumerate(d.results()):
        seq = result.prompt_ids + result.token_ids[:-1]
        for k in LAYERS:
            index = lm.exit_kv_index(k)
            assert all(s[index][r] == s[k - 1][r] for s in d.seen)  # exit k follows block k, step by step
            n = d.cache.lengths[index][r]
            h, _ = _teacher_forced(lm, seq, k)
            ref = lm.new_cache(len(seq))
            with torch.no_grad():
                lm.write_exit_kv(k, h, ref)
            torch.testing.assert_close(d.cache.keys[index][r, :, :n], ref.keys[index][0, :, :n], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(d.cache.values[index][r, :, :n], ref.values[index][0, :, :n],
                                       rtol=1e-4, atol=1e-5)
            n_prompt = len(result.prompt_ids)
            pushed += sum(1 for t, e in enumerate(result.exit_layers[1:]) if e < k and n_prompt + t < n)
    assert pushed > 0  # some tokens left below an exit and had its K/V written when pushed


# ----------------------------------------------------------------------------- (d) cost
def test_the_writes_and_reads_are_in_the_cost(lm, thresholds):
    shape = ModelShape.from_config(lm.config, exit_kv=len(LAYERS))
    fill = shape.kv_fill_flops()
    E = len(LAYERS)
    copy = generate_batch(lm, PROMPTS, ExitPolicy(kind="dynamic", thresholds=thresholds), _settings("copy"))
    for r in copy:
        # the first token is read from the prefill (which wrote its K/V); every later one writes all E exits
        assert [t.exit_kv_writes for t in r.cost.tokens] == [0] + [E] * (len(r.tokens) - 1)
        assert r.cost.exit_kv_writes == E * (len(r.tokens) - 1)
        assert r.cost.prefill_flops == ModelShape.from_config(lm.config).prefill_flops(len(r.prompt_ids)) + \
            E * len(r.prompt_ids) * fill
        for tc in r.cost.tokens:
            assert tc.flops - token_flops(shape, dataclasses.replace(tc, exit_kv_writes=0)) == tc.exit_kv_writes * fill
    d = _decode(lm, PROMPTS, ExitPolicy(kind="dynamic", thresholds=thresholds), "recompute")
    for r, result in enumerate(d.results()):  # every position in an exit's cache was written once and counted
        held = sum(d.cache.lengths[lm.exit_kv_index(k)][r] for k in LAYERS)
        assert result.cost.exit_kv_writes + E * len(result.prompt_ids) == held


def test_a_read_costs_attention_over_every_earlier_position_and_the_mlp(lm):
    result = generate(lm, PROMPTS[2], ExitPolicy(kind="static", layer=2), _settings("copy", 8))
    block = lm.exit_modules.block(2)
    attn, mlp = block.self_attn, block.mlp
    weights = sum(m.weight.numel() for m in (attn.q_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    q_width = attn.q_proj.weight.shape[0]
    flops = [tc.exit_module_flops for tc in result.cost.tokens]
    assert flops == [2 * weights + 4 * q_width * (tc.position + 1) for tc in result.cost.tokens]
    assert all(a < b for a, b in zip(flops, flops[1:]))  # grows with the positions it attends to
    assert lm.exit_modules.kv_flops(2) == ModelShape.from_config(lm.config).kv_fill_flops()


# ----------------------------------------------------------------------------- (e) files
def test_save_and_load_give_the_same_exits(lm, tiny_model_dir, tmp_path, thresholds):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    base = load_model(folder, device="cpu")
    modules = ExitModules("attention", [1, 3], base.hidden_size, base.blocks)
    with torch.no_grad():
        for p in modules.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    modules.save(folder)
    config = LiteConfig.default_for(base.num_layers)
    config.exit_modules = "attention"
    config.save(folder)
    loaded = load_model(folder, device="cpu")
    assert loaded.exit_modules.kind == "attention" and loaded.exit_modules.layers == [1, 3]
    assert loaded.exit_kv_layers == [1, 3] and loaded.exit_kv_index(3) == base.num_layers + 1
    base.exit_modules = modules
    ids = torch.tensor([[5, 17, 9, 22, 3, 40, 41]])
    with torch.no_grad():
        states = base.decoder(input_ids=ids, output_hidden_states=True).hidden_states
        for k in (1, 3):
            assert torch.equal(loaded.exit_logits(states[k], k), base.exit_logits(states[k], k))
    policy = ExitPolicy(kind="dynamic", thresholds={1: 0.2, 2: 2.0, 3: 0.1})
    assert generate(loaded, PROMPTS[0], policy, _settings("copy")).token_ids == \
        generate(base, PROMPTS[0], policy, _settings("copy")).token_ids
    from safetensors import safe_open

    with safe_open(str(folder / EXIT_MODULES_FILE), framework="pt") as f:
        assert f.metadata()["kind"] == "attention"


def test_a_single_position_without_its_context_is_refused(lm):
    with pytest.raises(LiteError, match="reads every earlier position"):
        lm.exit_normed(torch.randn(3, lm.hidden_size), 2)


# ----------------------------------------------------------------------------- (f) training
TRAIN_ROWS = [{"instruction": f"{text} #{i}", "input": "", "output": answer} for i in range(8)
              for text, answer in (("Name a colour.", "Blue."), ("Add 2 and 2.", "4"), ("Greet.", "Hello there!"))]
FAST = {"batch_size": 4, "max_length": 200, "logging_steps": 1, "show_progress_bar": False}  # the flags below


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """Attention modules trained on the frozen backbone (own answers, distillation toward layer L), with a
    snapshot every checkpoint; and the same run by ``lite train`` without the backbone-state cache."""
    from lite.cli import main
    from lite.training import train

    folder = tmp_path_factory.mktemp("attention-train")
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TRAIN_ROWS))
    answers = str(folder / "answers.jsonl")
    cached = train(str(tiny_model_dir), str(data), folder / "out", max_steps=12, lr=1e-3, exit_modules="attention",
                   targets="distill", own_answers=True, own_answer_tokens=12, exit_layers="1,2,3,4", save_steps=6,
                   own_answers_cache=answers, snapshot_minutes=1e-6, **FAST)
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(folder / "plain"),
                 "--exit-modules", "attention", "--targets", "distill", "--own-answers", "--own-answer-tokens", "12",
                 "--own-answers-cache", answers, "--exit-layers", "1,2,3,4", "--max-steps", "12", "--lr", "1e-3",
                 "--save-steps", "6", "--batch-size", "4", "--max-length", "200", "--logging-steps", "1",
                 "--state-cache-gb", "0", "--no-progress-bar"]) == 0
    return cached, folder / "plain"


def test_training_lowers_the_loss_and_the_output_loads_and_decodes(trained, tiny_model_dir):
    result, _ = trained
    history = [h for h in result.log_history if "kl_l1" in h]
    assert history[-1]["kl_l1"] < 0.7 * history[0]["kl_l1"] and history[-1]["kl_l2"] < history[0]["kl_l2"]
    lm = load_model(result.output_dir, device="cpu")
    assert lm.lite_config.exit_modules == "attention" and lm.exit_modules.layers == LAYERS
    base = load_model(tiny_model_dir, device="cpu")
    for name, p in base.model.state_dict().items():  # the backbone is untouched
        assert torch.equal(lm.model.state_dict()[name], p), name
    started = ExitModules("attention", LAYERS, base.hidden_size, base.blocks).state_dict()
    assert not torch.equal(lm.exit_modules.state_dict()["per_layer.1.block.mlp.up_proj.weight"],
                           started["per_layer.1.block.mlp.up_proj.weight"])  # it trained: a copy of block 2 no more
    policy = ExitPolicy(kind="dynamic", thresholds={1: 0.0, 2: 2.0, 3: 2.0})  # every token leaves at layer 1
    out = generate(lm, PROMPTS[0], policy, _settings("recompute", 6))
    assert out.exit_layers == [1] * 6 and all(t.exit_module_flops > 0 for t in out.cost.tokens)
    assert generate(lm, PROMPTS[0], ExitPolicy(kind="none"), _settings("copy", 6)).token_ids == \
        generate(base, PROMPTS[0], ExitPolicy(kind="none"), _settings("copy", 6)).token_ids


def test_whole_sequence_states_are_cached_and_snapshots_load(trained):
    """The backbone-state cache keeps whole-sequence states for attention modules and changes no number; a
    snapshot taken at the last step is the output."""
    cached, plain = trained
    a, b = load_model(cached.output_dir, device="cpu"), load_model(plain, device="cpu")
    for name, p in a.exit_modules.state_dict().items():
        assert torch.equal(p, b.exit_modules.state_dict()[name]), name
    snaps = sorted((cached.output_dir.parent / "out.snapshots").iterdir())
    assert [s.name for s in snaps] == ["step-000006", "step-000012"]
    first, last = (load_model(s, device="cpu") for s in snaps)
    states = torch.randn(1, 5, a.hidden_size)
    assert torch.equal(last.exit_logits(states, 2), a.exit_logits(states, 2))
    assert not torch.allclose(first.exit_logits(states, 2), a.exit_logits(states, 2))


def test_calibration_reads_the_module_over_the_whole_sequence(tiny_model_dir):
    """Calibration's teacher-forced confidences at an attention exit are the engine's: static:K reports the
    same max-prob for the first answer token (read at the last prompt position, after the prefill)."""
    from lite.calibration.calibrate import collect
    from lite.model.prompts import default_format, encode_prompt
    from lite.training.data import Example

    lm = _with_attention(load_model(tiny_model_dir, device="cpu"))
    data = collect(lm, [Example("0:0", "Count.", "", "one two")], source="generated", max_new_tokens=4,
                   with_states=True, gate_features="exit")
    prompt = encode_prompt(lm.tokenizer, "Count.", "", default_format(lm))
    for k in LAYERS:
        first = generate(lm, prompt, ExitPolicy(kind="static", layer=k), _settings("recompute", 1)).tokens[0]
        i = data.layers.index(k)
        assert data.confidences["max_prob"][i, 0] == pytest.approx(first.confidence, rel=1e-4)
    lm.exit_modules = None  # without the modules the same exits read otherwise
    plain = collect(lm, [Example("0:0", "Count.", "", "one two")], source="generated", max_new_tokens=4)
    assert not (plain.confidences["max_prob"] == data.confidences["max_prob"]).all()


@pytest.mark.parametrize("kv", ["copy", "recompute"])
def test_the_modules_own_forward_reads_what_the_fast_path_reads(lm, thresholds, kv, monkeypatch):
    """Where blocks run as transformers modules (not plain Llama weights), an exit's read goes through the
    block's own attention with a cache view that only reads: the same tokens, exits and confidences."""
    import lite.model.adapter as adapter

    policy = ExitPolicy(kind="dynamic", thresholds=thresholds)
    fast = [generate(lm, p, policy, _settings(kv)) for p in PROMPTS]
    assert lm._fast_exits is not None
    monkeypatch.setattr(adapter, "fast_blocks", lambda model, blocks: None)
    slow = [generate(lm, p, policy, _settings(kv)) for p in PROMPTS]
    assert lm._fast_exits is None
    assert [_key(r) for r in slow] == [_key(r) for r in fast]
