"""`lite demo`: full model vs early exit on a few built-in prompts, tokens coloured by exit layer."""

from __future__ import annotations

import argparse
import os
import sys

from . import add_device_argument, add_dtype_argument, add_exit_argument, add_threads_argument
from .numbers import nonempty_text, positive_int

EXAMPLE = "lite demo --exit gate --prompt \"Name three primary colours.\""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model or adapter folder (default: the embedded default with the shipped LITE adapter)")
    add_exit_argument(p, default=None)
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="tokens per answer (default 48)")
    add_dtype_argument(p, "auto")
    add_device_argument(p)
    add_threads_argument(p)
    p.add_argument("--prompt", action="append", type=nonempty_text, default=None, help="your own prompt (repeatable) instead of the built-ins")
    p.add_argument("--no-similarity", action="store_true", help="skip the MiniLM similarity (saves a few seconds)")
    p.add_argument("--no-lossless", action="store_true",
                   help="skip the lossless self-speculative run of each prompt (saves about a third of the time)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="colour tokens by exit layer (auto: when stdout is a terminal and $NO_COLOR is unset)")


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo
    from . import progress
    from .generate_cmd import _colour_for

    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    state: dict = {}

    def on_ready(result) -> None:
        state["checked"], state["L"] = result.checked_layers, result.num_layers
        progress(f"exit policy: {result.policy}")
        if colour:
            legend = " ".join(f"{_colour_for(k, result.checked_layers, result.num_layers)}{k}\033[0m"
                              for k in result.checked_layers)
            print(f"exit layer colours: {legend} {result.num_layers} (final, uncoloured)", flush=True)

    def on_answer_start(prompt: str) -> None:
        print(f"\n\033[1m> {prompt}\033[0m" if colour else f"\n> {prompt}", flush=True)

    def on_token(record) -> None:
        c = _colour_for(record.exit_layer, state["checked"], state["L"]) if colour else None
        sys.stdout.write(f"{c}{record.text}\033[0m" if c else record.text)
        sys.stdout.flush()

    result = run_demo(model=args.model, prompts=args.prompt, max_new_tokens=args.max_new_tokens, dtype=args.dtype, device=args.device,
                      exit_spec=args.exit, similarity=not args.no_similarity, lossless=not args.no_lossless,
                      progress=progress,
                      on_ready=on_ready, on_answer_start=on_answer_start, on_token=on_token)
    print("\n")
    print(f"model: {result.model}  ({result.num_layers} layers, exits {result.exit_layers})")
    print(f"early exit: {result.policy}")
    header = f"{'prompt':<36} {'tokens full/ee':>14} {'mean exit':>9} {'layer cost':>10} {'compute cost':>12} {'speedup':>8} {'similarity':>10}"
    print(header)
    print("-" * len(header))
    for a in result.answers + [result.overall()]:
        sim = f"{a.similarity:.3f}" if a.similarity is not None else "-"
        print(f"{a.prompt[:36]:<36} {f'{a.tokens_full}/{a.tokens_early}':>14} {a.mean_exit_layer:>9.1f} "
              f"{a.layer_cost_improvement:>10.1%} {a.compute_cost_improvement:>12.1%} {a.speedup:>7.2f}x {sim:>10}")
    if result.lossless_policy:
        done = [a for a in result.answers if a.seconds_lossless is not None]
        total = result.overall()
        rate = f"{total.accepted / total.drafted:.0%}" if total.drafted else "-"
        print(f"\nlossless early exit ({result.lossless_policy}):")
        print(f"  same tokens as the full model on {sum(bool(a.identical_lossless) for a in done)}/{len(done)} "
              f"prompts; speedup vs generate {total.speedup_lossless:.2f}x; drafted {total.drafted}, accepted "
              f"{total.accepted} ({rate})")
        if not all(a.identical_lossless for a in done):
            print(f"  (not the full model's tokens in {result.dtype}: the verify pass computes every position with "
                  f"the calls token-by-token decoding makes, so this is a bug; please report it)")
    print("\nlayer cost = 1 - mean exit layer / L (the paper's figure); compute cost = 1 - FLOPs with every head "
          "check and K/V fill / FLOPs of the full model's own answer; speedup = wall-clock of transformers' "
          "generate / early exit, same prompts, same dtype, one run.")
    return 0
