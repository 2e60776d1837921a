"""`lite generate`: early-exit generation for one prompt, coloured by exit layer, with its cost.

The human view streams each token coloured by the layer it left at (legend first) and ends with the cost
summary; ``--json`` prints exactly one JSON object on stdout (status lines go to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import LiteError
from . import add_device_argument, add_dtype_argument, add_exit_flags, add_threads_argument, exit_options
from .numbers import nonempty_text, nonnegative_float, number, positive_int, seed

# ANSI 256-colour codes from early (red) to late (blue); the final layer is printed uncoloured.
_PALETTE = [196, 202, 208, 214, 220, 190, 118, 48, 51, 39, 33, 99]


EXAMPLE = "lite generate --model runs/mine --exit gate --max-new-tokens 64 \"Give three tips for staying healthy.\""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", metavar="PROMPT", type=nonempty_text, help="the instruction (formatted with --prompt-format)")
    p.add_argument("--model", default=None, help="model folder, LoRA adapter folder, hub id, or smollm2-135m-instruct")
    add_exit_flags(p)
    p.add_argument("--kv", default="copy", choices=("copy", "recompute"),
                   help="what later tokens see at skipped layers (default copy)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0,
                   help="nucleus sampling: keep the smallest set of tokens whose probability reaches P, in (0, 1]")
    p.add_argument("--seed", type=seed, default=None, help="seed of sampling (--temperature > 0)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--prompt-format", default=None, choices=("alpaca", "chat", "raw"),
                   help="default: the model's lite_config.json, else chat if the tokenizer has a template, else alpaca")
    add_dtype_argument(p, "auto")
    add_device_argument(p)
    add_threads_argument(p)
    p.add_argument("--color", default="auto", choices=("auto", "always", "never"),
                   help="colour tokens by exit layer (auto: when stdout is a terminal and $NO_COLOR is unset)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the coloured view")


def build_policy(args: argparse.Namespace, lm):
    """The :class:`ExitPolicy` the flags ask for, checked against the model (:mod:`lite.decoding.spec`)."""
    from ..decoding.spec import build_policy

    return build_policy(lm, exit_options(args))


def _colour_for(layer: int, checked: list[int], L: int) -> str | None:
    if layer >= L:
        return None
    idx = checked.index(layer) if layer in checked else 0
    span = max(len(checked) - 1, 1)
    return f"\033[38;5;{_PALETTE[round(idx * (len(_PALETTE) - 1) / span)]}m"


def run(args: argparse.Namespace) -> int:
    from ..decoding import GenerationSettings, decoder_for
    from ..decoding.cost import ModelShape
    from ..model.loading import load_model
    from ..model.prompts import default_format, encode_prompt
    from . import progress

    lm = load_model(args.model, dtype=args.dtype, device=args.device, progress=progress)
    policy = build_policy(args, lm)
    fmt = args.prompt_format or default_format(lm)
    prompt_ids = encode_prompt(lm.tokenizer, args.prompt, fmt=fmt)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed, stop=list(args.stop), kv=args.kv)
    decoder = decoder_for(policy)(lm, [prompt_ids], policy, settings)
    L = lm.num_layers
    speculative = policy.kind == "speculative"
    checked = policy.check_layers(lm) if policy.kind not in ("none", "static") else (
        [policy.layer] if policy.kind == "static" else [])
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    on_token = None
    if not args.json:
        if colour and checked:
            legend = " ".join(f"{_colour_for(k, checked, L) or ''}{k}\033[0m" for k in checked if k < L)
            print(f"exit layer: {legend} {L}(final, uncoloured)", file=sys.stderr, flush=True)

        def on_token(record) -> None:
            layer = (record.draft_layer or L) if speculative else record.exit_layer  # speculative: drafting exit
            c = _colour_for(layer, checked, L) if colour else None
            sys.stdout.write(f"{c}{record.text}\033[0m" if c else record.text)
            sys.stdout.flush()

    for _, record in decoder.run():
        if on_token is not None:
            on_token(record)
    result = decoder.result(0)
    cost = result.cost
    shape = ModelShape.from_config(lm.config)
    n = len(result.tokens)
    if args.json:
        out = {
            "prompt_ids": result.prompt_ids,
            "text": result.text,
            "tokens": [{"id": t.id, "text": t.text, "exit_layer": t.exit_layer, "confidence": t.confidence,
                        **({"draft_layer": t.draft_layer} if speculative else {})} for t in result.tokens],
            "num_layers": L,
            "layer_cost_improvement": result.layer_cost_improvement,
            "compute_cost_improvement": result.compute_cost_improvement,
            "seconds": result.seconds,
            "finish_reason": result.finish_reason,
            "exit": policy.kind if policy.kind != "static" else f"static:{policy.layer}",
            "kv": "recompute" if speculative else settings.kv,
            "checked_layers": checked,
            "confidence_measure": None if (policy.gate is not None or policy.kind == "none") else policy.confidence,
            "gate": policy.gate is not None,
            "prompt_format": fmt,
            "dtype": str(lm.dtype).replace("torch.", ""),
            "flops": cost.flops,
            "full_flops": cost.full_flops,
            "head_evals": cost.head_evals,
            "kv_fills": cost.kv_fills,
            "exit_kv_writes": cost.exit_kv_writes,
            "recomputed": cost.recomputed,
            "tokens_per_second": n / result.seconds if result.seconds else None,
        }
        if speculative:
            out.update({"max_draft": policy.max_draft_tokens, "draft_stop": policy.draft_stop_confidence,
                        "draft_vocab": args.draft_vocab,
                        "drafted": cost.drafted, "accepted": cost.accepted, "rejected": cost.rejected,
                        "acceptance_by_position": cost.acceptance_by_position})
        print(json.dumps(out))
        return 0
    mean_exit = sum(t.exit_layer for t in result.tokens) / max(n, 1)
    head_cost = shape.head_flops() / shape.block_flops(len(prompt_ids))
    print()
    print(
        f"--- {n} tokens ({result.finish_reason}) in {result.seconds:.2f} s ({n / max(result.seconds, 1e-9):.1f} "
        f"tokens/s), {str(lm.dtype).replace('torch.', '')}, exit {args.exit or policy.kind}, kv {'recompute' if speculative else settings.kv}\n"
        f"mean exit layer {mean_exit:.1f} of {L}: layer cost improvement {result.layer_cost_improvement:.1%}\n"
        f"compute cost improvement {result.compute_cost_improvement:.1%} (FLOPs {cost.flops:.3g} vs full "
        f"{cost.full_flops:.3g}; {cost.head_evals / max(n, 1):.2f} head evaluations per token, one head = "
        f"{head_cost:.1f} blocks; {cost.kv_fills} K/V fills, {cost.recomputed} recomputed block-positions"
        f"{f', {cost.exit_kv_writes} exit-module K/V writes' if cost.exit_kv_writes else ''})",
    )
    if speculative:
        rates = ", ".join(f"{r:.0%}" for r in cost.acceptance_by_position) or "-"
        print(f"speculative: {cost.drafted} drafted, {cost.accepted} accepted, {cost.rejected} rejected "
              f"({(cost.acceptance_rate or 0):.0%}); acceptance by draft position: {rates}; every token is the "
              f"full model's (layer cost 0 by construction)")
    return 0
