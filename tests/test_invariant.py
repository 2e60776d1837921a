"""Batch invariance: a greedy request gets bitwise the same tokens, exits and confidences whatever else is in
the batch, and a speculative verify gives exactly the full model's token-by-token output, in float32 and in
bfloat16.

The comparisons are bitwise (``==`` on token ids, exit layers and the float confidences the exit decisions
were made from), never within a tolerance: a confidence a rounding apart is the near-tie that flips a token
on a real model. With the mode off the same comparisons fail on this CPU (float32 MKL rounds a one-row
product differently from a many-row one, and attention over a padded key length differs from the exact
length in both dtypes).
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from tiny import THRESHOLDS, agreeing_model, make_tiny_model

from lite.decoding import Decoder, ExitPolicy, GenerationSettings, decoder_for, generate, generate_batch
from lite.decoding.reference import hf_generate
from lite.errors import LiteError
from lite.model import LiteModel
from lite.serving import ServeConfig
from lite.serving.queue import DecodeWorker, Job

DTYPES = [torch.float32, torch.bfloat16]


def policy_of(lm: LiteModel, exit: str) -> ExitPolicy:
    """``none``; ``never`` (exits checked, none can be taken); or ``dynamic`` with each exit's threshold at the median max-prob of that layer over a few
    greedy tokens, so that tokens leave at every exit and some run to L."""
    if exit == "none":
        return ExitPolicy("none")
    if exit == "never":  # the full model too, but every token's final-layer max-prob is recorded and compared
        return ExitPolicy("dynamic", thresholds={k: 2.0 for k in range(1, lm.num_layers)})
    thresholds = {}
    for k in range(1, lm.num_layers):
        confs = sorted(t.confidence for r in generate_batch(lm, prompts(4, seed=9), ExitPolicy("static", layer=k),
                                                            GenerationSettings(max_new_tokens=6)) for t in r.tokens)
        thresholds[k] = confs[len(confs) // 2]
    return ExitPolicy("dynamic", thresholds=thresholds)


@pytest.fixture(scope="module", params=DTYPES, ids=["float32", "bfloat16"])
def lm(request) -> LiteModel:
    model, tok = make_tiny_model(num_layers=4, hidden=64, vocab_size=96, seed=3)
    return LiteModel(model.to(request.param), tok)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Distinct prompts of different lengths (so rows sit at different positions in every step)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 96) for _ in range(rng.randrange(2, 14))] for _ in range(n)]


def answer(result) -> tuple:
    """What must not depend on the load: tokens, exit layers and the exact confidences."""
    return result.token_ids, result.exit_layers, [t.confidence for t in result.tokens]


def served(lm: LiteModel, requests: list[list[int]], policy: ExitPolicy, together: bool,
           invariant: bool = True, max_tokens: int = 12) -> list[tuple]:
    """The answers of the server's decode worker (``lite serve``'s loop) to ``requests``: all submitted at
    once (continuous batching, up to 16 rows), or one after another; batch-invariant unless told."""
    async def run() -> list[tuple]:
        loop = asyncio.get_running_loop()
        worker = DecodeWorker(lm, max_queue=64, max_batch=16, invariant=invariant)
        try:
            jobs = [Job(ids, policy, GenerationSettings(max_new_tokens=max_tokens), loop) for ids in requests]
            out = []
            if together:
                for job in jobs:
                    worker.submit(job)
            for job in jobs:
                if not together:
                    worker.submit(job)
                kind, result = await asyncio.wait_for(job.events.get(), 120)
                assert kind == "done", result
                out.append(answer(result))
            peak = worker.stats()["peak_batch"]
        finally:
            await asyncio.to_thread(worker.close)
        assert peak > 1 if together else peak == 1
        return out

    return asyncio.run(run())


def test_the_server_default_is_batch_invariant_in_half_precision():
    """The default (flag, config): by dtype, on in bfloat16/float16 (the default dtype on CPUs with native
    bf16), off in float32; what the server's worker then runs with, and what it reports."""
    import argparse

    from lite.cli import serve_cmd
    from lite.decoding.engine import default_invariant
    from lite.serving.app import create_app

    parser = argparse.ArgumentParser()
    serve_cmd.add_arguments(parser)
    assert parser.parse_args([]).batch_invariant is None
    assert parser.parse_args(["--batch-invariant"]).batch_invariant is True
    assert parser.parse_args(["--no-batch-invariant"]).batch_invariant is False
    assert ServeConfig().batch_invariant is None
    for dtype, expected in ((torch.bfloat16, True), (torch.float16, True), (torch.float32, False)):
        fake = type("M", (), {"dtype": dtype})()
        assert default_invariant(fake) is expected
    from fastapi.testclient import TestClient

    for dtype, flag, expected in ((torch.bfloat16, None, True), (torch.float32, None, False),
                                  (torch.float32, True, True), (torch.bfloat16, False, False)):
        model, tok = make_tiny_model(num_layers=2, hidden=32, vocab_size=96, seed=3)
        lm = LiteModel(model.to(dtype), tok)
        with TestClient(create_app(lm, ServeConfig(exit="none", batch_invariant=flag))) as client:
            assert client.app.state.worker.invariant is expected


@pytest.mark.parametrize("exit", ["none", "never", "dynamic"])
def test_sixteen_concurrent_greedy_requests_equal_the_same_requests_alone(lm, exit):
    requests = prompts(16)
    policy = policy_of(lm, exit)
    alone = served(lm, requests, policy, together=False)
    together = served(lm, requests, policy, together=True)
    same = sum(a == b for a, b in zip(alone, together))
    assert same == 16, f"{same}/16 identical in {lm.dtype}, exit {exit}"
    if exit == "dynamic":  # the exits really were taken, at several layers
        assert len({k for _, layers, _ in alone for k in layers}) >= 3


def test_a_batch_of_the_engine_equals_each_row_alone_and_transformers(lm):
    """``generate_batch(invariant=True)`` (what ``lite.load(...).generate([...])`` does by default): each
    row is its batch-1 answer, which with exits off is transformers' own ``generate`` at batch 1."""
    requests = prompts(10, seed=1)
    for policy in (policy_of(lm, "dynamic"), policy_of(lm, "none")):
        batch = generate_batch(lm, requests, policy, GenerationSettings(max_new_tokens=10), invariant=True)
        alone = [generate(lm, ids, policy, GenerationSettings(max_new_tokens=10)) for ids in requests]
        assert [answer(r) for r in batch] == [answer(r) for r in alone]
    for ids, row in zip(requests, batch):
        if policy.kind == "none":
            assert row.token_ids == hf_generate(lm, ids, 10)[0]


def test_the_invariant_mode_runs_each_row_alone(lm, monkeypatch):
    """The construction itself: with ``invariant`` every block call covers one row and, after the prefill,
    one position, and attention reads a contiguous copy of exactly that row's positions."""
    policy = policy_of(lm, "dynamic")
    calls = []
    run_block = LiteModel.run_block

    def logged(self, layer, hidden, cache, rows=None):
        calls.append((hidden.shape[0], hidden.shape[1], rows))
        return run_block(self, layer, hidden, cache, rows)

    monkeypatch.setattr(LiteModel, "run_block", logged)
    decoder = Decoder(lm, prompts(5, seed=2), policy, GenerationSettings(max_new_tokens=6, kv="recompute"),
                      invariant=True)
    list(decoder.run())
    assert decoder.cache.exact
    assert all(b == 1 and len(rows) == 1 for b, _, rows in calls)
    prefill = sum(t > 1 for _, t, _ in calls)
    assert prefill <= 5 * lm.num_layers  # only the prompts' own prefill calls hold more than one position


def test_speculative_verify_is_the_full_models_token_by_token_output(monkeypatch):
    """In both dtypes: greedy speculative tokens equal exits-off decoding and transformers' ``generate``,
    and after every round the cache holds bitwise the K/V the full model writes token by token."""
    for dtype in DTYPES:
        lm = agreeing_model()
        lm.model.to(dtype)
        drafted = accepted = 0
        for ids in prompts(6, seed=4):
            ids = [i % 32 for i in ids]
            full = Decoder(lm, [ids], ExitPolicy("none"), GenerationSettings(max_new_tokens=14))
            list(full.run())
            policy = ExitPolicy("speculative", thresholds=THRESHOLDS, max_draft_tokens=4)
            spec = decoder_for(policy)(lm, [ids], policy, GenerationSettings(max_new_tokens=14))
            assert spec.invariant  # lossless by default

            def same_cache(d):
                for block in range(lm.num_layers):
                    n = d.cache.lengths[block][0]
                    assert torch.equal(d.cache.keys[block][0, :, :n], full.cache.keys[block][0, :, :n]), (dtype, block)
                    assert torch.equal(d.cache.values[block][0, :, :n], full.cache.values[block][0, :, :n])

            spec.after_step = same_cache
            list(spec.run())
            tokens = [t.id for t in spec.rows[0].records]
            assert tokens == [t.id for t in full.rows[0].records] == hf_generate(lm, ids, 14)[0], dtype
            drafted += sum(d for d, _ in spec.rounds)
            accepted += sum(j for _, j in spec.rounds)
        assert 0 < accepted < drafted, dtype  # drafts were accepted and rejected


def test_batch_invariant_must_be_a_bool(lm):
    with pytest.raises(LiteError, match="batch_invariant must be True or False"):
        Decoder(lm, prompts(1), ExitPolicy("none"), GenerationSettings(max_new_tokens=2), invariant="yes")
    from lite.api import LiteLM

    with pytest.raises(LiteError, match=r"batch_invariant must be True, False or None \(by dtype\)"):
        LiteLM(lm).generate(["a", "b"], batch_invariant=1)
    with pytest.raises(LiteError, match="--batch-invariant"):
        ServeConfig(batch_invariant="off").check(lm)
