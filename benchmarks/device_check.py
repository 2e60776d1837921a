"""lite on an accelerator: the engine's contracts on a tiny random model, then the step at LLaMA-2-7B's shape.

Part 1 (correctness, any device): a tiny random Llama built on the device; exits off equals transformers'
``generate`` token for token (batch 1 and a batch of 4 prompts of different lengths), forced dynamic exits
and a static exit decode each row of a batch as it decodes alone (both K/V strategies), and self-speculative
decoding is lossless. Part 2 (speed): a random-weight model of LLaMA-2-7B's shape (32 layers, hidden 4096,
vocab 32000; random weights need no download) in bfloat16: exits off, ``static:20`` and ``static:12``
against ``generate`` at batch 1, and the host synchronisations per generated token (CUDA's sync debug mode
counts them; on a CPU there are none to count). On a CPU, ``--shape tiny`` runs part 2 at a tiny shape, so
the whole check runs end to end anywhere (a test does).

    PYTHONPATH=src python benchmarks/device_check.py --device cuda --shape 7b --out gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lite
from lite.decoding import ExitPolicy, GenerationSettings, generate_batch
from lite.decoding.reference import hf_generate_batch

SHAPES = {
    "7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}


class IdsTokenizer:
    """Token ids only: the check compares ids, so no text (and no tokenizer download) is needed."""

    eos_token_id = None
    pad_token_id = 0
    all_special_ids: list[int] = []

    def decode(self, ids, **kwargs) -> str:
        return ""


def random_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0):
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    if shape == "tiny":  # larger weights separate the argmaxes, so exits differ between rows
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(3.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return lite.load(model, IdsTokenizer()).lite_model


def correctness(device: str) -> dict:
    lm = random_model("tiny", device, torch.float32)
    prompts = [[5, 17, 42, 99, 3], [7, 8], [11, 12, 13, 14, 15, 16, 17], [21, 22, 23]]
    n = 12
    out: dict[str, object] = {}
    hf = hf_generate_batch(lm, prompts, n)[0]
    alone = [generate_batch(lm, [p], ExitPolicy(), GenerationSettings(max_new_tokens=n))[0].token_ids for p in prompts]
    batched = [r.token_ids for r in generate_batch(lm, prompts, ExitPolicy(), GenerationSettings(max_new_tokens=n))]
    out["exits off = generate (batch 1)"] = alone == [hf_generate_batch(lm, [p], n)[0][0] for p in prompts]
    out["exits off = generate (batch 4)"] = batched == hf
    for kv in ("copy", "recompute"):
        for name, policy in (("static:2", ExitPolicy("static", layer=2)),
                             ("dynamic", ExitPolicy("dynamic", thresholds={1: 0.02, 2: 0.015, 3: 0.01}))):
            s = GenerationSettings(max_new_tokens=n, kv=kv)
            one = [generate_batch(lm, [p], policy, s)[0] for p in prompts]
            many = generate_batch(lm, prompts, policy, s)
            out[f"{name}/{kv}: batch rows = alone"] = all(
                a.token_ids == b.token_ids and a.exit_layers == b.exit_layers for a, b in zip(one, many))
    spec = ExitPolicy("speculative", thresholds={1: 0.0, 2: 0.0, 3: 0.0}, max_draft_tokens=3)
    out["speculative = exits off"] = [r.token_ids for r in generate_batch(
        lm, prompts, spec, GenerationSettings(max_new_tokens=n))] == batched
    return out


def host_syncs(fn, device: str) -> int | None:
    """Host synchronisations during ``fn()`` (CUDA sync debug mode warns once per sync), or None off CUDA."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def speed(device: str, shape: str, tokens: int, rounds: int) -> list[dict]:
    lm = random_model(shape, device, torch.bfloat16)
    prompt = [[(7 * i + 3) % lm.vocab_size for i in range(64)]]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    runs = {"generate": None, "exits off": ExitPolicy(), "static:20": ExitPolicy("static", layer=min(20, lm.num_layers)),
            "static:12": ExitPolicy("static", layer=min(12, lm.num_layers))}
    settings = GenerationSettings(max_new_tokens=tokens)

    def call(policy):
        if policy is None:
            return hf_generate_batch(lm, prompt, tokens)[0][0]
        return generate_batch(lm, prompt, policy, settings)[0].token_ids

    for policy in runs.values():  # warm-up
        call(policy)
    best: dict[str, tuple[float, list[int]]] = {}
    for _ in range(rounds):
        for name, policy in runs.items():
            sync()
            start = time.perf_counter()
            ids = call(policy)
            sync()
            seconds = time.perf_counter() - start
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, ids)
    ref = best["generate"][0]
    rows = []
    for name, (seconds, ids) in best.items():
        syncs = host_syncs(lambda p=runs[name]: call(p), device)
        rows.append({"what": name, "seconds": seconds, "tokens_per_s": len(ids) / seconds, "vs_generate": ref / seconds,
                     "identical_to_generate": ids == best["generate"][1] if name == "exits off" else None,
                     "host_syncs_per_token": None if syncs is None else syncs / max(len(ids), 1)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 7b on CUDA, tiny elsewhere")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    shape = args.shape or ("7b" if args.device.startswith("cuda") else "tiny")
    info = {"device": args.device, "torch": torch.__version__, "shape": shape,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    checks = correctness(args.device)
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    rows = speed(args.device, shape, args.tokens, args.rounds)
    print(f"\n{shape} shape, bfloat16, batch 1, 64-token prompt, {args.tokens} new tokens, best of {args.rounds}:")
    for r in rows:
        syncs = "-" if r["host_syncs_per_token"] is None else f"{r['host_syncs_per_token']:.1f}"
        same = "" if r["identical_to_generate"] is None else f", identical to generate: {r['identical_to_generate']}"
        print(f"  {r['what']:<10} {r['tokens_per_s']:8.1f} tokens/s  {r['vs_generate']:.2f}x generate  "
              f"host syncs/token {syncs}{same}")
    result = {"info": info, "checks": checks, "speed": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if not all(checks.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
