"""`lite calibrate`: per-layer exit thresholds (and a learned exit gate) from held-out data."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from ..errors import LiteError
from . import add_device_argument, add_dtype_argument, add_threads_argument
from .numbers import nonnegative_int, number, open_unit, positive_int, seed

# lite.decoding.gate.FEATURES and DEFAULT_FEATURES, spelled here so --help imports no torch (tests/test_gate.py
# checks they agree)
GATE_FEATURES = ("state+delta", "state", "exit")
QUALITY_MEASURES = ("both", "rouge", "loglik")  # lite.evaluation.quality.MEASURES (tests/test_calibration_quality.py)
EXAMPLE = "lite calibrate --model runs/mine --rule agreement --target 0.9 --gate"

# The typed functions behind this verb; see lite.cli.train_cmd.CONTRACT (checked by tests/test_cli.py).
# Their data arguments (the model, the rows, the collected statistics) are what the verb itself prepares.
CONTRACT = {
    "lite.calibration.check_options": {},
    "lite.calibration.collect": {"lm": None, "examples": None, "with_states": "gate", "progress": None,
                                 "ranking": None},  # --draft-vocab ranks it in memory first
    "lite.calibration.select": {"data": None, "cascade_prices": "gate_cascade"},  # priced from the model
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder, LoRA adapter folder, or smollm2-135m-instruct "
                   "(thresholds are written into its lite_config.json)")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="held-out rows in any shape lite train reads (default: the held-out split recorded by "
                        "lite train in the model's lite_config.json)")
    p.add_argument("--filter", action="append", default=None, metavar="FIELD=VALUE",
                   help="keep only rows where FIELD equals VALUE, e.g. status=ok (repeatable)")
    p.add_argument("--rule", default="paper", choices=["paper", "agreement", "ltt"],
                   help="paper: mean confidence of agreeing tokens; agreement: lowest threshold whose exits "
                        "agree with the final layer at rate >= --target; ltt: risk control (--epsilon, --delta)")
    p.add_argument("--target", type=number(float, 0, 1, low_open=True), default=0.9, help="agreement rule: required agreement rate A in (0, 1]")
    p.add_argument("--epsilon", type=open_unit, default=0.1, help="ltt: tolerated disagreement rate of exits, (0, 1)")
    p.add_argument("--delta", type=open_unit, default=0.1, help="ltt: allowed failure probability, (0, 1)")
    p.add_argument("--source", default="reference", choices=["reference", "generated"],
                   help="reference: teacher-forced on the rows' responses; generated: on the model's own "
                        "greedy answers (slower, the distribution it decodes)")
    p.add_argument("--confidence", default=None,
                   help="max_prob (paper), margin, entropy or state_cosine (default: the model's recorded one)")
    p.add_argument("--max-examples", type=positive_int, default=100, help="use at most this many rows (the first ones)")
    p.add_argument("--max-length", type=positive_int, default=256, help="cut prompt + response at this many tokens")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="answer budget of --source generated")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="held-out rows whose answers are generated together (--source generated; default 8)")
    p.add_argument("--gate", action="store_true",
                   help="also train a learned exit gate (logistic regression per exit on the state's features)")
    p.add_argument("--gate-features", choices=GATE_FEATURES, default=GATE_FEATURES[0],
                   help="what the gate reads at exit k: state+delta (the normed state of block k and its change "
                        "over the block; no exit module runs for a check), state (the normed state alone), exit "
                        "(the exit state the head reads: the exit module runs at every check)")
    p.add_argument("--gate-cascade", action="store_true",
                   help="with --gate: where the gate lets a token out, read the head there and let it leave only if "
                        "its max-prob reaches a second cut (both cuts chosen together, the cheapest pair that meets "
                        "the rule's agreement bar): the head is read only where the gate is sure enough")
    p.add_argument("--quality-bar", type=number(float, 0, 1, low_open=True), default=None, metavar="B",
                   help="choose --exit auto by the answers users get: decode --quality-prompts rows (at most 64 new "
                        "tokens, greedy) with the full model and with the calibrated thresholds and gate (and with their cuts raised 5, 10 and "
                        "20%%), and keep the candidate saving the most FLOPs whose quality is at least B of the full "
                        "model's (by --quality-measure); none meeting it: auto decodes in full. Default: off (auto by "
                        "agreement)")
    p.add_argument("--quality-measure", choices=QUALITY_MEASURES, default=QUALITY_MEASURES[0],
                   help="with --quality-bar: what B applies to: rouge (ROUGE-L against the rows' references, over the "
                        "full model's), loglik (the full model's likelihood of the answers per token, over that of "
                        "its own answers), both (default: each must keep B). Without references: the likelihood")
    p.add_argument("--quality-prompts", type=positive_int, default=24, metavar="N",
                   help="with --quality-bar: rows decoded per candidate (the first N calibration rows; default 24)")
    p.add_argument("--gate-hidden", type=nonnegative_int, default=0, help="gate hidden width (0 = logistic regression)")
    p.add_argument("--gate-steps", type=positive_int, default=300, help="optimiser steps of gate training")
    p.add_argument("--draft-vocab", action="store_true",
                   help="also rank tokens by frequency in the responses of the training sources recorded in "
                        "lite_config.json (else of the calibration rows) into draft_vocab.json, for "
                        "'lite generate --speculative --draft-vocab N'")
    p.add_argument("--exit-vocab", type=nonnegative_int, default=None, metavar="N",
                   help="measure (and record) the exits as they decode with an exit vocabulary: every exit below "
                        "the final layer reads the head over the N most frequent tokens of draft_vocab.json "
                        "(N/V of the head's cost) and emits only those; 0 = the full head; default: the model's "
                        "recorded one")
    p.add_argument("--min-tokens", type=positive_int, default=None, metavar="N",
                   help="refuse to choose thresholds on fewer than N tokens per exit, or gate thresholds on fewer "
                        "than N held-out tokens (default 200: an agreement rate known to about +-0.07)")
    p.add_argument("--ceiling", type=nonnegative_int, default=40, metavar="N",
                   help="after calibrating, teacher-forced on the model's own greedy answers to the first N "
                        "calibration rows: the oracle saving (each token leaving at the first exit that agrees "
                        "with the final layer) and each decision rule's saving-versus-agreement frontier, with "
                        "the calibrated policies on it; printed, and written as ceiling.md and ceiling.png into "
                        "the model folder (default 40; 0: skip)")
    p.add_argument("--seed", type=seed, default=0, help="seed of gate training")
    add_dtype_argument(p, "float32")
    add_device_argument(p)
    add_threads_argument(p)


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def _threshold(v: float) -> str:
    from ..calibration.thresholds import NEVER_EXIT

    return "never" if v >= NEVER_EXIT else f"{v:.4f}"


def _interval(stats, i: int) -> str:
    """The Wilson 95% interval of layer i's exited-token agreement, with its n: '[0.81, 0.95] n=120'."""
    lo, hi = stats.exit_agreement_interval[i]
    return "-" if math.isnan(lo) else f"[{lo:.2f}, {hi:.2f}] n={stats.exit_count[i]}"


def _print_table(result) -> None:
    s = result.stats
    print(f"rule {result.rule} {result.parameters or ''} | confidence {result.confidence} | source "
          f"{result.source} | {result.examples} examples, {result.tokens} tokens")
    print(f"{'layer':>5}  {'threshold':>9}  {'agree(all)':>10}  {'exit rate':>9}  {'agree(exited)':>13}  "
          f"95% interval (Wilson)")
    for i, k in enumerate(result.layers):
        print(f"{k:>5}  {_threshold(result.thresholds[k]):>9}  {_fmt(s.agreement[i]):>10}  "
              f"{_fmt(s.exit_rate[i]):>9}  {_fmt(s.exit_agreement[i]):>13}  {_interval(s, i)}")
    print(f"final layer reached by {_fmt(s.final_rate)} of tokens; exited tokens agree at "
          f"{_fmt(s.exited_agreement)} (cascade on the calibration tokens)")
    if result.gate is not None:
        g = result.gate
        print(f"gate ({'logistic' if g.gate.hidden == 0 else f'mlp {g.gate.hidden}'}), trained on "
              f"{g.train_examples} examples, thresholds chosen on {g.selection_examples} ({g.selection_tokens} "
              f"tokens):")
        print(f"{'layer':>5}  {'p cut':>7}  {'acc@0.5':>7}  {'base acc':>8}  {'exit rate':>9}  {'agree(exited)':>13}  "
              f"95% interval (Wilson)")
        for i, k in enumerate(result.layers):
            cut = "closed" if k in g.closed else _fmt(g.gate.thresholds[k])
            print(f"{k:>5}  {cut:>7}  {_fmt(g.accuracy[k]):>7}  {_fmt(g.base_accuracy[k]):>8}"
                  f"  {_fmt(g.stats.exit_rate[i]):>9}  {_fmt(g.stats.exit_agreement[i]):>13}  "
                  f"{_interval(g.stats, i)}")
        if g.closed:
            print(f"closed: layers {g.closed} (their gate did not beat always giving the majority answer on the "
                  f"held-out tokens; no token leaves there)")


def run(args: argparse.Namespace) -> int:
    from ..calibration import (
        calibration_layers,
        cascade_prices,
        check_options,
        collect,
        drop_training_rows,
        save_calibration,
        select,
    )
    from ..model.loading import load_model
    from ..training.data import DataError, load_heldout, read_examples
    from . import progress

    check_options(rule=args.rule, target=args.target, epsilon=args.epsilon, delta=args.delta,
                  confidence=args.confidence or "max_prob", source=args.source)
    if args.gate_cascade and not args.gate:
        raise LiteError("--gate-cascade refines the learned gate: add --gate")
    check_model_folder_writable(args.model)
    examples, data_info = None, {}
    if args.data:  # read (and reject) the data before spending time on the model
        try:
            examples, entries = read_examples(args.data, args.filter)
        except DataError as exc:
            if str(exc).startswith("no rows left"):
                raise LiteError(f"no held-out rows to calibrate on in {args.data} (filter: {args.filter or 'none'}); "
                                f"check --data and --filter") from None
            raise
        data_info = {"sources": entries, "filter": args.filter or [], "heldout_split": False}
    lm = load_model(args.model, dtype=args.dtype, device=args.device, progress=progress)
    calibration_layers(lm)  # a model without exits below L: fail before collecting anything
    if examples is not None:
        examples, dropped = drop_training_rows(lm.lite_config, examples, data_info["sources"])
        data_info["training_rows_dropped"] = dropped
        if dropped:
            progress(f"left out {dropped} rows this model was trained on (kept its held-out rows)")
        if not examples:
            raise LiteError(f"every row of {args.data} was used to train this model; calibrate on held-out "
                            f"data (omit --data to use the recorded held-out split)")
    if examples is None:
        if not lm.lite_config.data.get("heldout_ids"):
            raise LiteError("no held-out data: --data was not given and this model's lite_config.json records no "
                            "held-out split (lite train records one); give --data PATH")
        examples = load_heldout(lm.lite_config)
        if not examples:
            raise LiteError("the held-out split recorded in lite_config.json is empty; give --data")
        data_info = {"sources": lm.lite_config.data.get("sources", []), "heldout_split": True}
    examples = examples[: args.max_examples]
    data_info["rows_used"] = len(examples)
    confidence = args.confidence or lm.lite_config.confidence
    check_options(confidence=confidence)
    exit_vocab = lm.lite_config.exit_vocab if args.exit_vocab is None else args.exit_vocab
    ranked = None  # (ranking, tokens counted, source)
    if args.draft_vocab and exit_vocab:  # the exit vocabulary is the head of this new ranking, written with
        ranked = rank_draft_vocab(lm, examples, progress)  # the calibration, once it has succeeded
    progress(f"collecting {args.source} statistics on {len(examples)} examples"
             + (f" (exit vocabulary: {exit_vocab} tokens)" if exit_vocab else ""))
    start = time.perf_counter()
    every = max(1, len(examples) // 10)

    def tick(done: int, total: int) -> None:
        if done % every == 0 or done == total:
            progress(f"{done}/{total} examples, {time.perf_counter() - start:.0f} s")

    data = collect(lm, examples, source=args.source, with_states=args.gate, gate_features=args.gate_features,
                   max_length=args.max_length,
                   batch_size=args.batch_size, exit_vocab=exit_vocab,
                   ranking=None if ranked is None else ranked[0],
                   max_new_tokens=args.max_new_tokens, progress=tick)
    progress(f"collected {data.tokens} tokens from {data.examples} examples in {time.perf_counter() - start:.1f} s")
    result = select(data, rule=args.rule, confidence=confidence, target=args.target, epsilon=args.epsilon,
                    delta=args.delta, gate=args.gate, gate_hidden=args.gate_hidden, gate_steps=args.gate_steps,
                    cascade_prices=cascade_prices(lm, exit_vocab or None) if args.gate_cascade else None,
                    seed=args.seed,
                    **({"min_tokens": args.min_tokens} if args.min_tokens else {}))
    result.data = data_info
    if args.quality_bar is not None:
        from ..evaluation.quality import choose_by_quality, quality_table
        from ..model.prompts import default_format
        from ..training.data import prompt_ids  # a conversation: up to its last trained turn, as calibration

        judged = examples[: args.quality_prompts]
        choose_by_quality(lm, result, [prompt_ids(lm.tokenizer, e, default_format(lm)) for e in judged],
                          [e.output or None for e in judged], args.quality_bar,
                          max_new_tokens=min(args.max_new_tokens, 64), batch_size=args.batch_size,
                          ranking=None if ranked is None else ranked[0], measure=args.quality_measure,
                          progress=progress)
        print(quality_table(result.quality))
    if ranked is not None:  # before the config that names the exit vocabulary
        from ..decoding.draft_vocab import save_ranking

        print(f"wrote {save_ranking(lm.folder, *ranked)}")
    path = save_calibration(lm, result)
    _print_table(result)
    cfg = lm.lite_config
    agree = cfg.calibration.get("expected_agreement", {})
    costs = ", ".join(f"{k} {v:.2f} (tokens agreeing with the final layer: {agree.get(k, float('nan')):.3f})"
                      for k, v in cfg.calibration.get("expected_compute", {}).items())
    why = (f"the cheapest whose decoded answers keep {args.quality_bar} of the full model's quality "
           f"(--quality-bar; else exits off)" if args.quality_bar is not None else
           "the cheapest that meets the rule's agreement bar over all tokens (else the one that agrees most)")
    print(f"default policy (--exit auto): {cfg.default_exit}, {why}; expected compute per step on these tokens, as a "
          f"fraction of the full model's: {costs}" + (f"; exit vocabulary {cfg.exit_vocab}" if cfg.exit_vocab else ""))
    by_batch = cfg.calibration.get("auto_by_batch") or {}
    priced = (cfg.calibration.get("priced_speedup") or {}).get(cfg.default_exit) or {}
    if by_batch and priced:
        print("--exit auto by the rows decoded together (priced step against the full model's): "
              + ", ".join(f"batch {b}: {by_batch[b]} ({priced[b]:.2f}x)" for b in by_batch if b in priced))
    print(f"wrote {path}")
    if args.draft_vocab and not exit_vocab:
        print(f"wrote {write_draft_vocab(lm, examples, progress)}")
    if args.ceiling:
        report_ceiling(lm, examples[: args.ceiling], args, data)
    return 0


def check_model_folder_writable(spec: str | None) -> None:
    """Calibration writes into the model folder (``lite_config.json``, the gate, the draft vocabulary): a
    folder lite cannot write, or a hub id (no folder of its own), is refused before anything is read."""
    from ..files import check_writable, looks_like_hub_id
    from ..model.loading import local_folder

    folder = local_folder(spec)
    if folder is None and spec is not None and looks_like_hub_id(str(spec)):
        raise LiteError("--model: calibration writes into the model folder's lite_config.json, but this model "
                        "comes from the hub; save it to a local folder first and calibrate that")
    if folder is not None:
        check_writable(folder, "--model", "calibration writes lite_config.json into the model folder: copy the "
                                          "model to a folder you can write and calibrate the copy")


def report_ceiling(lm, examples: list, args: argparse.Namespace, data) -> None:
    """The ceiling of the calibrated model (:mod:`lite.calibration.ceiling`) on ``examples``: printed as a
    table, written as ``ceiling.md`` and ``ceiling.png`` beside ``lite_config.json``, its summary recorded
    there under ``calibration.ceiling``. Statistics collected on the model's own answers with every state the
    gate needs are reused; otherwise the answers are generated here."""
    import dataclasses

    from ..calibration.ceiling import markdown, measure_ceiling, model_ceiling, plot
    from . import progress

    if args.source == "generated" and (data.states is not None or not lm.lite_config.gate_file) \
            and data.examples <= len(examples):
        ceiling = model_ceiling(lm, data)
    else:
        progress(f"ceiling: teacher-forced on the model's own answers to {len(examples)} rows")
        ceiling, _ = measure_ceiling(lm, examples, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                                     batch_size=args.batch_size)
    text = markdown(ceiling)
    print("\nThe ceiling of early exit on this model (calibration rows; one cut at every exit):\n" + text)
    (Path(lm.folder) / "ceiling.md").write_text("# Early-exit ceiling\n\n" + text, encoding="utf-8")
    plot(ceiling, Path(lm.folder) / "ceiling.png")
    summary = {k: v for k, v in ceiling.record().items() if k != "frontiers"}
    cfg = dataclasses.replace(lm.lite_config, calibration={**lm.lite_config.calibration, "ceiling": summary})
    cfg.save(lm.folder)
    lm.lite_config = cfg
    print(f"wrote {Path(lm.folder) / 'ceiling.md'}, {Path(lm.folder) / 'ceiling.png'}")


def write_draft_vocab(lm, examples, progress) -> Path:
    """:func:`rank_draft_vocab`, saved as ``draft_vocab.json`` into the model folder."""
    from ..decoding.draft_vocab import save_ranking

    return save_ranking(lm.folder, *rank_draft_vocab(lm, examples, progress))


def rank_draft_vocab(lm, examples, progress) -> tuple[list[int], int, str]:
    """Rank tokens over the responses of the model's training sources (every row, held-out ones included,
    when the files recorded in lite_config.json are readable here), else of the calibration rows: (ranking,
    tokens counted, what was counted)."""
    from ..decoding.draft_vocab import rank_tokens
    from ..training.data import DataError, load_recorded_rows
    from ..training.rows import response_texts

    if lm.folder is None:
        raise LiteError("--draft-vocab writes draft_vocab.json beside the model: give --model a local folder")
    texts, used = [t for e in examples for t in response_texts(e)], "calibration rows"
    data = lm.lite_config.data or {}
    if data.get("sources"):
        try:
            rows = load_recorded_rows(data, check_hash=False)  # a frequency count needs no row ids
            names = [s.get("path") or s.get("hub_dataset") for s in data["sources"]]
            filters = [f"{k}={v}" for k, v in (data.get("filter") or {}).items()]
            texts, used = [t for e in rows for t in response_texts(e)], f"training sources {names} (filter {filters or 'none'})"
        except DataError as exc:
            progress(f"draft vocabulary: training sources not readable here ({exc}); ranking the calibration "
                     f"rows only")
    ranking, tokens = rank_tokens(lm.tokenizer, texts)
    progress(f"draft vocabulary: {len(ranking)} distinct tokens in {tokens} response tokens of {used}")
    return ranking, tokens, used
