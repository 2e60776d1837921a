"""How well each exit layer agrees with the final layer, on held-out prompts, for one or more models.

The measure that decides between ways of training the exits (`lite.evaluation.agreement.exit_agreement`:
agreement with layer L and its bootstrap interval over prompts, KL and CE on the model's own answers, CE on the
reference responses). This script runs it over several models on the same held-out rows (the rows `lite
train` kept aside, never the test sets): each model writes its own greedy answers with
`lite.training.own_answers.own_answers` (models over one frozen backbone share them), and the tables go to
--out.

Run (from the repository root; a few minutes on one CPU thread):
    .venv/bin/python benchmarks/exit_agreement.py --model smollm2-135m-lite --model smollm2-135m-instruct \
        --heldout-from smollm2-135m-lite --limit 40 --threads 1 --out benchmarks/results/exit_agreement.md
Writes the markdown table to --out and the JSON beside it (same stem, .json).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

from lite import load_model
from lite.calibration.scoring import answer_sequences, reference_sequences
from lite.evaluation.agreement import agreement_markdown, exit_agreement
from lite.evaluation.metrics import BOOTSTRAP_DRAWS
from lite.files import write_atomic, write_json_atomic
from lite.model.config import LiteConfig
from lite.model.loading import resolve_model
from lite.model.prompts import default_format
from lite.training.data import load_heldout, prompt_ids
from lite.training.own_answers import own_answers

BATCH = 8  # rows decoded together for the greedy answers (lite's batched engine, exits off)


def answers(lm, rows, max_new_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy answer ids) per row: the full model (exits off), ``BATCH`` rows at a time."""
    prompts = [prompt_ids(lm.tokenizer, row, default_format(lm)) for row in rows]
    made = own_answers(lm, prompts, max_new_tokens=max_new_tokens, batch_size=BATCH,
                       progress=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    return list(zip(prompts, made.ids))


def backbone_key(spec: str, lm) -> str | None:
    """Models whose full model is the same frozen backbone, prompted the same way, give the same greedy
    answers: a plain model and folders of exit modules only over it (their base_model) share one key; a
    LoRA adapter, a full fine-tune, or a folder with weights of its own besides modules get none."""
    import hashlib
    import json

    folder = resolve_model(spec)
    config = LiteConfig.load(folder)  # None: a model lite did not train
    # exit modules only (what lite train --exit-modules writes): no weights of its own, neither a model nor
    # an adapter, over the backbone its lite_config.json names
    modules_only = config is not None and bool(config.exit_modules) and not any(
        (Path(folder) / name).is_file() for name in ("config.json", "adapter_config.json"))
    if config is None:
        base = folder
    elif modules_only and config.base_model:
        base = resolve_model(config.base_model)
    else:
        return None
    tok = lm.tokenizer
    prompting = json.dumps([sorted(tok.get_vocab().items()), getattr(tok, "chat_template", None),
                            default_format(lm)])
    return f"{Path(base).resolve()}|{hashlib.sha256(prompting.encode()).hexdigest()[:16]}"


def measure(spec: str, rows, heldout_ids, heldout_from: str, max_new_tokens: int,
            shared: dict[str, list] | None = None) -> dict:
    """One model's figures; ``shared`` keeps the greedy answers by :func:`backbone_key` across models."""
    start = time.perf_counter()
    lm = load_model(spec, dtype="float32", device="cpu")
    recorded = (lm.lite_config.data or {}).get("heldout_ids") if lm.lite_config is not None else None
    if recorded is not None and recorded != heldout_ids:  # None: a model lite did not train (the base)
        raise SystemExit(f"{spec}: its held-out split differs from {heldout_from}'s, so it may have trained on "
                         f"these rows; train both on the same data, seed and --heldout-fraction")
    key = backbone_key(spec, lm) if shared is not None else None
    reused = key is not None and key in shared
    if key is not None and not reused:
        shared[key] = answers(lm, rows, max_new_tokens)
    pairs = shared[key] if key is not None else answers(lm, rows, max_new_tokens)
    figures = exit_agreement(lm, answer_sequences(pairs),
                             reference_sequences(lm.tokenizer, rows, default_format(lm)))
    return {"spec": spec, "folder": str(lm.folder) if lm.folder is not None else None, **figures,
            "seconds": time.perf_counter() - start, "answers_shared_by_backbone": reused}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, metavar="SPEC",
                    help="model folder or alias (repeatable)")
    ap.add_argument("--heldout-from", default=None, metavar="SPEC",
                    help="model whose recorded held-out rows every model is measured on (default: the first)")
    ap.add_argument("--limit", type=int, default=40, help="number of held-out prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "exit_agreement.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    heldout_from = args.heldout_from or args.model[0]
    config = LiteConfig.load(resolve_model(heldout_from))
    if config is None:
        raise SystemExit(f"--heldout-from {heldout_from}: it has no lite_config.json (not trained by lite train)")
    rows = load_heldout(config)[: args.limit]
    heldout_ids = config.data.get("heldout_ids")
    models, shared = {}, {}
    for spec in args.model:
        print(f"{spec}: {len(rows)} prompts", file=sys.stderr, flush=True)
        models[spec] = measure(spec, rows, heldout_ids, heldout_from, args.max_new_tokens, shared)
    import transformers

    res = {"command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
           "max_new_tokens": args.max_new_tokens, "heldout_from": heldout_from,
           "heldout_note": f"held-out rows come from the lite_config.json of {heldout_from}",
           "batch": BATCH, "made_by": "benchmarks/exit_agreement.py",
           "rows": len(rows), "row_ids": [r.row_id for r in rows], "agreement_interval":
           f"95% percentile bootstrap over prompts, {BOOTSTRAP_DRAWS} draws, seed 0", "models": models}
    out = Path(args.out)
    text = agreement_markdown(res)
    write_json_atomic(out.with_suffix(".json"), res)
    write_atomic(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
