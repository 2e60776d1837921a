"""The evaluation harness: early exit against the full model on the paper's test sets (``lite eval``).

For every prompt of every test set, with greedy decoding and the same ``max_new_tokens``:

* the full model's answer (exits off, through the engine), with its FLOPs and seconds;
* Hugging Face ``generate`` on the same prompt ids (same dtype, greedy, same end-of-sequence ids), timed,
  the reference for wall-clock speedup; whether its tokens equal the engine's full answer is recorded;
* the early-exit answer under each chosen policy: ``--exit`` (dynamic by default) x ``--kv`` strategies x
  ``--threshold-scales``, with per-token exit layers and confidences;
* optionally (``--static-layers``) static exit at every exit layer below L: how well each layer generates
  on its own (the paper's per-layer picture); and a second model (``--compare-model``) through the full
  answer, static layers, and dynamic exit when it is calibrated;
* optionally an LLM judge's position-swapped verdict, early exit vs full (:mod:`lite.evaluation.judge`);
* once every prompt of a model is decoded, that model's own judgement of every answer it gave (full,
  early-exit, static): the mean per-token log-likelihood under its full model, teacher-forced with exits
  off (:mod:`lite.evaluation.loglik`; ``loglik=False`` leaves it out). It is not kept in the records: it is
  recomputed, cheaply, whenever the report is written.

Resumable: each finished prompt is appended as one JSON line to ``DIR/records.jsonl`` with the hash of the
configuration (``DIR/run.json``); a rerun with the same configuration skips the prompts already there.
The report (:mod:`lite.evaluation.report`) is written only when every selected prompt is done, atomically; a rerun
first removes a report that its new work would make stale.

Prompt format: ``--prompt-format``, else ``prompt_format`` of the model's ``lite_config.json``, else the
tokenizer's chat template when it has one, else the Alpaca template (the paper's).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import decoding
from ..decoding.reference import hf_generate, hf_generate_batch
from ..decoding.spec import THRESHOLD_KINDS, ExitOptions, build_policy, resolve_exit_spec, threshold_values
from ..errors import LiteError
from ..files import check_output_folder, write_json_atomic
from .testsets import TestPrompt, TestSet, load_testset

RECORDS = "records.jsonl"
RUN_FILE = "run.json"
REPORT_FILES = ("report.json", "report.md")


class EvalError(LiteError):
    """Bad evaluation settings, or an output folder that holds another configuration's records."""


@dataclass
class EvalConfig:
    """Everything that decides the numbers of an evaluation (hashed for resuming; ``limit`` is not: a
    larger limit continues a run, a smaller one reports on a prefix).

    Attributes:
        model: the evaluated model (folder, adapter folder, hub id, alias; None = embedded default).
        testsets: ``--testset`` values, ``NAME`` or ``NAME=PATH``.
        limit: first N prompts of each set (None = all).
        exit: the early-exit policy compared with the full model: "auto" (default: the model's own best
            policy recorded by calibration, see :func:`lite.decoding.spec.default_exit`), "dynamic"
            (thresholds from ``lite_config.json`` or ``thresholds``), "gate" (the learned exit gate),
            "static:K" or "speculative[:N]" (decoded one sequence at a time, whatever ``batch_size``).
        kv: skipped-layer strategies, each run separately ("copy", "recompute").
        threshold_scales: each dynamic run is made at every scale; the first is the headline one.
        thresholds: ``--thresholds`` override ("0.9" for every exit, or "8:0.9,11:0.85"); None = calibrated.
        confidence: confidence measure with ``thresholds`` (None = max_prob, or the calibrated one).
        static_layers: also decode with static exit at every exit layer below L.
        compare_model: a second model (e.g. the final-layer baseline) for the per-layer figure.
        max_new_tokens: cap per answer, the same for every run and for HF generate.
        dtype: "float32", "bfloat16", "float16" or "auto" (the same for every run).
        prompt_format: "alpaca", "chat", "raw" or None (see the module docstring).
        judge_url / judge_model: an OpenAI-compatible endpoint and model for the pairwise judge.
        hf_baseline: time transformers' ``generate`` for the speedup figure.
        batch_size: prompts decoded together (``--batch-size``), by lite's batched engine and by HF
            ``generate`` alike, so that the speedup compares the same batch size.
    """

    model: str | None = None
    testsets: list[str] = field(default_factory=lambda: ["vicuna", "koala", "wizardlm", "self_instruct"])
    limit: int | None = None
    exit: str = "auto"
    kv: list[str] = field(default_factory=lambda: ["copy"])
    threshold_scales: list[float] = field(default_factory=lambda: [1.0])
    thresholds: str | None = None
    confidence: str | None = None
    static_layers: bool = False
    compare_model: str | None = None
    max_new_tokens: int = 128
    dtype: str = "auto"
    prompt_format: str | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    hf_baseline: bool = True
    batch_size: int = 8

    def validate(self) -> None:
        if not self.testsets:
            raise EvalError("give at least one --testset: vicuna, koala, wizardlm, self_instruct, NAME=PATH")
        if self.max_new_tokens < 1:
            raise EvalError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise EvalError(f"--batch-size must be >= 1, got {self.batch_size}")
        bad_kv = [k for k in self.kv if k not in decoding.KV_STRATEGIES]
        if not self.kv or bad_kv:
            raise EvalError(f"--kv must be one or more of {decoding.KV_STRATEGIES}, got {self.kv}")
        if not self.threshold_scales or not all(s > 0 and math.isfinite(s) for s in self.threshold_scales):
            raise EvalError(f"--threshold-scales must be finite numbers > 0, got {self.threshold_scales}")
        if self.exit.strip() in ("none", ""):
            raise EvalError(f"--exit {self.exit!r}: the full model is always run; give the early-exit policy "
                            f"to compare with it: auto (default), dynamic, gate or static:K")
        if bool(self.judge_url) != bool(self.judge_model):
            raise EvalError("--judge-url and --judge-model go together: give both or neither")
        if self.confidence is not None and self.confidence not in decoding.CONFIDENCES:
            raise EvalError(f"--confidence must be one of {decoding.CONFIDENCES}, got {self.confidence!r}")

    def hashed(self) -> str:
        """Hash of every field that changes the records (all but ``limit``)."""
        data = {k: v for k, v in asdict(self).items() if k != "limit"}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class EvalResult:
    """What :func:`evaluate` returns.

    Attributes:
        out: the output folder.
        complete: every selected prompt was evaluated and the report was written (always True on return:
            an interrupted or failed run raises, and leaves ``records.jsonl`` but no report).
        report: the content of ``report.json`` (None when incomplete).
        files: the files written (report.json, report.md, plots).
        prompts_run: prompts decoded in this call (the others came from ``records.jsonl``).
    """

    out: Path
    complete: bool
    report: dict[str, Any] | None
    files: list[Path]
    prompts_run: int


# ----------------------------------------------------------------------------------- records
def _read_records(path: Path, config_hash: str) -> dict[tuple[str, str, str], dict]:
    """Records of this configuration keyed by (role, testset, id). A torn last line (an interrupted
    write) is cut off so that appending continues on a clean line."""
    out: dict[tuple[str, str, str], dict] = {}
    if not path.is_file():
        return out
    raw = path.read_bytes()
    good_end = 0
    for line in raw.splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if not line.endswith(b"\n"):
            break
        good_end += len(line)
        if rec.get("config_hash") != config_hash:
            raise EvalError(f"{path} holds records of another configuration; use another --out or --restart")
        out[(rec["role"], rec["testset"], rec["id"])] = rec
    if good_end != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return out


def _check_model_unchanged(out: Path, role: str, info: dict[str, Any]) -> None:
    """The model's exits, thresholds and prompt format are part of what the records mean: remember them in
    ``run.json`` the first time, and refuse to continue a run whose model has since been recalibrated."""
    run_file = out / RUN_FILE
    run = json.loads(run_file.read_text())
    keys = ("num_layers", "exit_layers", "thresholds", "confidence", "prompt_format", "dtype")
    mine = {k: info[k] for k in keys}
    seen = run.setdefault("models", {}).get(role)
    if seen is None:
        run["models"][role] = mine
        write_json_atomic(run_file, run)
    elif seen != mine:
        changed = sorted(k for k in keys if seen.get(k) != mine[k])
        raise EvalError(f"the {role} model changed since the run in {out} started ({', '.join(changed)}); "
                        f"give a new --out, or --restart to discard the old records")


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def prepare_out(out: Path, config: EvalConfig, restart: bool) -> None:
    """Create ``out`` with ``run.json``; refuse a folder that holds another configuration's run, or files
    lite did not write (no ``run.json``): those are never overwritten or deleted."""
    check_output_folder(out, RUN_FILE, "--out")
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / RUN_FILE
    has_records = (out / RECORDS).is_file() and (out / RECORDS).stat().st_size > 0
    if restart or not has_records:  # nothing decoded yet: nothing to protect
        for name in (RECORDS, RUN_FILE, *REPORT_FILES):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "plots", ignore_errors=True)
    if run_file.is_file():
        old = json.loads(run_file.read_text())
        if old.get("config_hash") != config.hashed():
            changed = sorted(k for k, v in asdict(config).items()
                             if k != "limit" and old.get("config", {}).get(k) != v)
            raise EvalError(
                f"--out {out} holds a run with another configuration (differs in: "
                f"{', '.join(changed) or '?'}); give a new --out, or --restart to discard its records"
            )
    else:
        write_json_atomic(run_file, {"config_hash": config.hashed(), "config": asdict(config),
                                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


# ----------------------------------------------------------------------------------- model side
def prompt_format(lm, override: str | None) -> str:
    """The prompt format for ``lm`` (see the module docstring)."""
    from ..model.prompts import default_format

    return override or default_format(lm)


@dataclass
class _Job:
    """One model's work: which runs to make per prompt."""

    role: str
    spec: str | None
    policies: dict[str, tuple[decoding.ExitPolicy, str]]  # run key -> (policy, kv)
    static: dict[str, tuple[decoding.ExitPolicy, str]]  # layer (str) -> (policy, kv)
    hf: bool
    fmt: str
    info: dict[str, Any]


def _exit_spec(lm, cfg: EvalConfig, role: str) -> str:
    """``--exit`` for this model: ``auto`` is ``dynamic`` when ``--thresholds`` are given for it, else the
    model's own best policy alone (:func:`lite.decoding.spec.default_exit` at batch 1: eval measures the
    calibrated policy even where ``auto`` would decode in full at the batch size; the report says which);
    others as given."""
    if cfg.exit.strip() == "auto" and cfg.thresholds and role == "main":
        return "dynamic"
    return resolve_exit_spec(lm, cfg.exit)


def _auto_at_batch(lm, batch: int) -> dict[str, Any]:
    """What ``--exit auto`` decodes with at the evaluation's batch size (eval itself runs the calibrated
    policy, to have one to measure), with the priced speedups it was decided by."""
    from ..decoding.spec import PRICE_MARGIN, default_exit, priced_table

    return {"batch": batch, "policy": default_exit(lm, batch), "margin": PRICE_MARGIN,
            "priced_speedup": priced_table(lm, sorted({1, batch}))}


def _policies(lm, cfg: EvalConfig, role: str) -> dict[str, tuple[decoding.ExitPolicy, str]]:
    """Run key -> (policy, kv) for ``--exit`` x ``--kv`` (x ``--threshold-scales`` for threshold-driven
    kinds), each built and checked by :func:`lite.decoding.spec.build_policy` (raises :class:`LiteError`
    naming the flag). The compare model gets ``--thresholds`` and ``--confidence`` only when it is the
    evaluated one."""
    policies: dict[str, tuple[decoding.ExitPolicy, str]] = {}
    spec = _exit_spec(lm, cfg, role)
    if spec == "none":
        raise EvalError(f"--exit {cfg.exit}: the {'--model' if role == 'main' else '--compare-model'} has no "
                        f"calibrated thresholds or exit gate, so it has no policy of its own; run 'lite calibrate' "
                        f"on it, or give --exit static:K or --exit dynamic --thresholds ...")
    kind = spec.split(":", 1)[0]
    mine = role == "main"
    for kv in cfg.kv:
        if kind in THRESHOLD_KINDS:
            for scale in cfg.threshold_scales:
                options = ExitOptions(exit=spec, threshold_scale=scale,
                                      thresholds=cfg.thresholds if mine else None,
                                      confidence=cfg.confidence if mine and cfg.thresholds else None)
                policies[f"{spec}@{scale:g}/{kv}"] = (build_policy(lm, options), kv)
        else:  # static:K, gate
            policies[f"{spec}/{kv}"] = (build_policy(lm, ExitOptions(exit=spec)), kv)
    return policies


def _plan(lm, role: str, spec: str | None, cfg: EvalConfig) -> _Job:
    """Check every policy against the model before any decoding (bad thresholds fail here, not mid-run).

    The compare model gets ``--thresholds`` only when it is the evaluated one; when its policy cannot run
    (typically: an uncalibrated baseline under dynamic exit) it is decoded full and static only."""
    L = lm.num_layers
    calibrated = bool(lm.lite_config.thresholds)
    thresholds = threshold_values(lm, cfg.thresholds, cfg.confidence or "max_prob") if role == "main" else {}
    skipped = None
    try:
        policies = _policies(lm, cfg, role)
    except LiteError as exc:
        if role == "main":
            raise
        policies, skipped = {}, f"--exit {cfg.exit} cannot run on the compare model: {exc}"
    static = {}
    if cfg.static_layers or role == "compare":
        static = {str(k): (decoding.ExitPolicy(kind="static", layer=k), cfg.kv[0])
                  for k in lm.exit_layers if k < L}
    fmt = prompt_format(lm, cfg.prompt_format)
    base = thresholds or {int(k): float(v) for k, v in lm.lite_config.thresholds.items()}
    info = {"source": spec or "smollm2-135m-instruct", "num_layers": L, "exit_layers": lm.exit_layers,
            "thresholds": {str(k): base[k] for k in sorted(base)}
            if _exit_spec(lm, cfg, role).split(":")[0] in THRESHOLD_KINDS
            else {},
            "calibrated": calibrated,
            "confidence": (cfg.confidence or "max_prob") if thresholds else lm.lite_config.confidence,
            "prompt_format": fmt,
            "dtype": str(lm.dtype).replace("torch.", ""), "calibration": lm.lite_config.calibration,
            "policy_skipped": skipped, "auto_at_batch": _auto_at_batch(lm, cfg.batch_size)}
    return _Job(role, spec, policies, static, hf=cfg.hf_baseline and role == "main", fmt=fmt, info=info)


def _run_record(result: decoding.GenerationResult) -> dict[str, Any]:
    cost = result.cost
    return {
        "text": result.text, "token_ids": list(result.token_ids),
        "exit_layers": [t.exit_layer for t in result.tokens],
        "confidences": [None if t.confidence is None else round(t.confidence, 5) for t in result.tokens],
        "finish_reason": result.finish_reason, "seconds": result.seconds,
        "flops": getattr(cost, "flops", None), "full_flops_same_length": getattr(cost, "full_flops", None),
        "head_evals": getattr(cost, "head_evals", None),
        "layer_cost_improvement": result.layer_cost_improvement,
    }


def _share(seconds: float, counts: list[int]) -> list[float]:
    """Split one batch call's wall time over its rows by their generated tokens (sums are kept)."""
    total = sum(counts)
    return [seconds * (c / total if total else 1 / len(counts)) for c in counts]


def _timed_batch(lm, prompts: list[list[int]], policy, settings) -> list[decoding.GenerationResult]:
    """``generate_batch`` whose results carry their share of the batch's wall time as ``seconds``."""
    start = time.perf_counter()
    results = decoding.generate_batch(lm, prompts, policy, settings)
    for r, share in zip(results, _share(time.perf_counter() - start, [len(r.tokens) for r in results])):
        r.seconds = share
    return results


def _evaluate_batch(lm, job: _Job, items: list[tuple[TestSet, TestPrompt]], cfg: EvalConfig, config_hash: str,
                    judge) -> list[dict[str, Any]]:
    """Records of up to ``--batch-size`` prompts decoded together: the full model, every policy, every
    static layer, and HF ``generate`` at the same batch size. A run's ``seconds`` is its share of the batch
    call by generated tokens, so sums over prompts (what the report compares) are the calls' wall time."""
    from ..model.prompts import encode_prompt

    records, ids = [], []
    for testset, prompt in items:
        prompt_ids = encode_prompt(lm.tokenizer, prompt.instruction, prompt.input, job.fmt)
        record: dict[str, Any] = {
            "config_hash": config_hash, "role": job.role, "testset": testset.name, "id": prompt.id,
            "instruction": prompt.instruction, "input": prompt.input, "reference": prompt.reference,
            "meta": prompt.meta, "prompt_tokens": len(prompt_ids), "batch": len(items),
        }
        if len(prompt_ids) >= lm.max_context:  # kept as a record so that a rerun does not retry it
            record["skipped"] = f"the prompt is {len(prompt_ids)} tokens, the model's context {lm.max_context}"
        else:
            ids.append(prompt_ids)
        records.append(record)
    live = [r for r in records if "skipped" not in r]
    if not live:
        return records

    def settings(kv: str) -> decoding.GenerationSettings:
        return decoding.GenerationSettings(max_new_tokens=cfg.max_new_tokens, kv=kv)

    full = _timed_batch(lm, ids, decoding.ExitPolicy(kind="none"), settings(cfg.kv[0]))
    for record, result in zip(live, full):
        record.update({"full": _run_record(result), "runs": {}, "static": {}})
    if job.hf:
        answers, seconds = hf_generate_batch(lm, ids, cfg.max_new_tokens)
        for record, answer, result, share in zip(live, answers, full, _share(seconds, [len(a) for a in answers])):
            record["hf"] = {"seconds": share, "tokens": len(answer), "matches_full": answer == result.token_ids}
    for key, (policy, kv) in job.policies.items():
        for record, result in zip(live, _timed_batch(lm, ids, policy, settings(kv))):
            record["runs"][key] = _run_record(result)
    for layer, (policy, kv) in job.static.items():
        for record, result in zip(live, _timed_batch(lm, ids, policy, settings(kv))):
            record["static"][layer] = _run_record(result)
    if judge is not None and job.policies:
        for record, result in zip(live, full):
            primary = record["runs"][next(iter(job.policies))]
            instruction = record["instruction"] if not record["input"] else \
                f"{record['instruction']}\n\n{record['input']}"
            record["judge"] = asdict(judge.judge(instruction, result.text, primary["text"]))
    return records


def _ceiling(lm, job: _Job, records: list[dict | None]) -> dict[str, Any] | None:
    """The model's ceiling teacher-forced on its full runs' answers (the prompts' own greedy answers), as
    :meth:`lite.calibration.ceiling.Ceiling.record`; None when the model has no exit below L or no answer."""
    from ..calibration.ceiling import measure_ceiling
    from ..model.prompts import encode_prompt

    pairs = [(encode_prompt(lm.tokenizer, r["instruction"], r["input"], job.fmt), list(r["full"]["token_ids"]))
             for r in records if r is not None and "full" in r and r["full"]["token_ids"]]
    if not pairs or not [k for k in lm.exit_layers if k < lm.num_layers]:
        return None
    return measure_ceiling(lm, answers=pairs)[0].record()


def _score_answers(lm, job: _Job, records: list[dict | None], batch_size: int) -> dict[str, Any]:
    """Every answer of ``records`` (full, runs, static) judged by ``lm``'s full model
    (:func:`lite.evaluation.loglik.answer_logliks`); each value is set as ``loglik`` of its run dict, in
    memory, for the report. Returns what the scoring cost."""
    from ..model.prompts import encode_prompt
    from .loglik import answer_logliks

    runs, pairs = [], []
    for r in records:
        if r is None or "full" not in r:
            continue
        prompt = encode_prompt(lm.tokenizer, r["instruction"], r["input"], job.fmt)
        for run in [r["full"], *r["runs"].values(), *r["static"].values()]:
            runs.append(run)
            pairs.append((prompt, list(run["token_ids"])))
    scores = answer_logliks(lm, pairs, batch_size)
    for run, value in zip(runs, scores.values):
        run["loglik"] = value
    return {"answers": len(pairs), "scored": scores.scored, "tokens": scores.tokens,
            "seconds": scores.seconds, "dtype": scores.dtype}


def _warm_up(lm, job: _Job, cfg: EvalConfig) -> None:
    """One short untimed generation each way, so that first-call allocations do not skew the timings."""
    from ..model.prompts import encode_prompt

    ids = encode_prompt(lm.tokenizer, "Say hello.", "", job.fmt)
    decoding.generate(lm, ids, decoding.ExitPolicy(kind="none"),
                      decoding.GenerationSettings(max_new_tokens=2))
    if job.hf:
        hf_generate(lm, ids, 2)


# ----------------------------------------------------------------------------------- entry point
def evaluate(model: str | None = None, testsets: list[str] | None = None, *,
             out: str | os.PathLike[str] = "lite-eval", limit: int | None = None, exit: str = "auto",
             kv: list[str] | str = "copy", threshold_scales: list[float] | None = None,
             thresholds: str | None = None,
             confidence: str | None = None, static_layers: bool = False, compare_model: str | None = None,
             max_new_tokens: int = 128, dtype: str = "auto", prompt_format: str | None = None,
             judge_url: str | None = None, judge_model: str | None = None, hf_baseline: bool = True,
             restart: bool = False, embedder=None, progress_bar: bool = False, device: str | None = None,
             batch_size: int = 8, ceiling: bool = True, loglik: bool = True,
             log: Callable[[str], None] | None = None) -> EvalResult:
    """Evaluate early exit against the full model and write the report into ``out``.

    Args:
        model: the model to evaluate (see :func:`lite.load_model`); None = the embedded default.
        testsets: ``--testset`` values (default: the paper's four sets).
        out: output folder: ``run.json``, ``records.jsonl``, and when complete ``report.json``,
            ``report.md`` and ``plots/*.png``.
        device: where both models run (default: the accelerator torch reports, else cpu).
        restart: discard the records of an earlier run in ``out`` instead of continuing it.
        ceiling: also report the evaluated model's ceiling (:mod:`lite.calibration.ceiling`), teacher-forced
            on its full runs' answers (its own greedy answers): the oracle saving and each decision rule's
            frontier, with its policies on it (a table in ``report.md``, ``plots/ceiling.png``).
        loglik: also report each model's own judgement of its answers: the mean per-token log-likelihood
            of the early-exit and the full answers under its full model (:mod:`lite.evaluation.loglik`),
            per prompt and aggregated.
        embedder: sentence embedder for similarity (default: offline all-MiniLM-L6-v2).
        progress_bar: a tqdm bar over prompts on stderr.
        log: called with short status lines.
        (the other arguments are the fields of :class:`EvalConfig`.)
    Returns:
        :class:`EvalResult` of the complete run (prompts too long for the context are counted as skipped).
    Raises:
        LiteError: unknown test set, a wrong-format file (naming the row), an unreachable judge, bad
            settings: all before any decoding.
    """
    from ..model.loading import load_model, parse_device, resolve_model

    cfg = EvalConfig(
        model=None if model is None else str(model),
        testsets=list(testsets) if testsets else EvalConfig().testsets, limit=limit, exit=exit,
        kv=[k.strip() for k in kv.split(",")] if isinstance(kv, str) else list(kv),
        threshold_scales=list(threshold_scales) if threshold_scales else [1.0], thresholds=thresholds,
        confidence=confidence, static_layers=static_layers,
        compare_model=None if compare_model is None else str(compare_model), max_new_tokens=max_new_tokens,
        dtype=dtype, prompt_format=prompt_format, judge_url=judge_url, judge_model=judge_model,
        hf_baseline=hf_baseline, batch_size=batch_size,
    )
    cfg.validate()
    parse_device(device)  # a bad --device is refused before anything is read or written
    check_output_folder(Path(out), RUN_FILE, "--out")  # a place lite cannot write: before anything is read
    log = log or (lambda message: None)
    # Bad input fails before any decoding: test sets and the judge before any model is loaded or any file
    # written, the exit policy right after the model loads (_plan).
    sets = [load_testset(spec, limit=limit) for spec in cfg.testsets]
    names = [s.name for s in sets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EvalError(f"--testset names must be unique, {dupes} given twice; rename one as NAME=PATH")
    for flag, spec in (("--model", cfg.model), ("--compare-model", cfg.compare_model)):
        if spec is not None:
            resolve_model(spec, flag=flag)  # a missing folder is named now, not after the first model's run
    judge = None
    if cfg.judge_url:
        from .judge import JudgeClient

        judge = JudgeClient(cfg.judge_url, cfg.judge_model)
        judge.check()
    out = Path(out)
    prepare_out(out, cfg, restart)
    config_hash = cfg.hashed()
    records_path = out / RECORDS
    done = _read_records(records_path, config_hash)

    roles = [("main", cfg.model)] + ([("compare", cfg.compare_model)] if cfg.compare_model else [])
    wanted = [(role, s, p) for role, _ in roles for s in sets for p in s.prompts]
    todo = [w for w in wanted if (w[0], w[1].name, w[2].id) not in done]
    if todo:
        for name in REPORT_FILES:  # a report from before would now be stale
            (out / name).unlink(missing_ok=True)
    bar = None
    ceiling_record = None
    scoring: dict[str, Any] = {}
    models_info: dict[str, Any] = {}
    ran = 0
    try:
        for role, spec in roles:
            lm = load_model(spec, dtype=cfg.dtype, device=device, progress=log,
                            flag="--model" if role == "main" else "--compare-model")
            job = _plan(lm, role, spec, cfg)
            alone = sorted({p.describe() for p, _ in job.policies.values()
                            if decoding.batch_limit(p, cfg.batch_size) < cfg.batch_size})
            if alone:
                log(f"lite eval: --exit {', '.join(alone)} decodes one sequence at a time (its verify pass rolls "
                    f"back one sequence's cache); --batch-size {cfg.batch_size} applies to the other runs")
            _check_model_unchanged(out, role, job.info)
            models_info[role] = job.info
            mine = [(s, p) for r, s, p in todo if r == role]
            if mine:
                _warm_up(lm, job, cfg)
                if progress_bar and bar is None:  # after the first load, so that its messages come first
                    from tqdm import tqdm

                    bar = tqdm(total=len(wanted), initial=len(wanted) - len(todo), desc="lite eval",
                               unit="prompt", file=sys.stderr, dynamic_ncols=True)
            for b in range(0, len(mine), cfg.batch_size):
                batch = mine[b:b + cfg.batch_size]
                if bar is not None:
                    bar.set_postfix_str(f"{role}:{batch[0][0].name}", refresh=False)
                for record in _evaluate_batch(lm, job, batch, cfg, config_hash, judge):
                    _append(records_path, record)  # one record per prompt: a kill loses one batch at most
                    done[(role, record["testset"], record["id"])] = record
                    ran += 1
                    if bar is not None:
                        bar.update(1)
            if ceiling and role == "main":
                ceiling_record = _ceiling(lm, job, [done.get((role, s.name, p.id)) for s in sets for p in s.prompts])
            if loglik:
                log(f"lite eval: scoring the {role} model's answers under its full model (teacher-forced)")
                scoring[role] = _score_answers(lm, job, [done.get((role, s.name, p.id)) for s in sets
                                                         for p in s.prompts], cfg.batch_size)
            del lm
    finally:
        if bar is not None:
            bar.close()

    from .report import build_report, write_report

    records = [done[(role, s.name, p.id)] for role, s, p in wanted]
    report = build_report(records, cfg, models_info, sets, embedder=embedder)
    if ceiling_record is not None:
        report["ceiling"] = ceiling_record
    if scoring:
        report["loglik_scoring"] = scoring
    files = write_report(out, report)
    return EvalResult(out=out, complete=True, report=report, files=files, prompts_run=ran)
