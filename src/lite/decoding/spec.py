"""Exit specs and flags: the one place where text and flags become an :class:`ExitPolicy`.

An exit spec is a kind with an optional argument: ``none``, ``static:K``, ``dynamic`` (thresholds: the
calibrated ones of ``lite_config.json`` or ``--thresholds``, times the threshold scale), ``gate`` (the
learned exit gate saved by ``lite calibrate --gate``), ``speculative[:N]`` (lossless self-speculative
decoding drafted by the exits) and ``auto`` (the model's own best policy: the one calibration recorded,
else the gate, else dynamic when calibrated, else none).

:class:`ExitOptions` are the exit flags, defined once: their names, defaults and help (field metadata)
generate the CLI flags (:func:`lite.cli.add_exit_flags`), and ``LiteLM.generate`` and ``custom_generate``
take the same names with the same defaults (tested). :func:`build_policy` is the one function that turns
them into a frozen :class:`ExitPolicy` for one model: ``auto`` resolved, thresholds read and scaled, the
gate and the exit vocabulary's ids loaded (once per model), every combination checked, so a bad one is
refused, naming the flag, before anything is decoded. :func:`parse_exit` is its text-only form (the
server's ``exit`` field, ``lite demo --exit``).

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field, fields, replace

from ..errors import LiteError
from ..model.adapter import LiteModel
from ..model.config import parse_exit_layers, threshold_problem
from .cost import PRICE_POSITION
from .policy import CONFIDENCES, ExitPolicy, check_policy

SPEC_KINDS = ("none", "static", "dynamic", "gate", "speculative", "auto")
THRESHOLD_KINDS = ("dynamic", "speculative")  # kinds whose exits may be decided by thresholds

_PER_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # lm -> {"gate": ..., ("vocab", n): ids}
_LOCK = threading.Lock()


def _per_model(lm: LiteModel, key, make):
    """``make()`` once per model and key (the gate, exit vocabularies: read from the folder once)."""
    with _LOCK:
        store = _PER_MODEL.setdefault(lm, {})
        if key not in store:
            store[key] = make()
        return store[key]


def model_gate(lm: LiteModel):
    """The learned exit gate saved with ``lm`` (read once per model, then shared), or None."""
    from .gate import load_gate

    return _per_model(lm, "gate", lambda: load_gate(lm))


def _require_gate(lm: LiteModel, what: str):
    gate = model_gate(lm)
    if gate is None:
        raise LiteError(f"{what}: this model has no learned exit gate; run 'lite calibrate --gate' on it, or "
                        f"use 'dynamic'")
    return gate


def exit_vocab_ids(lm: LiteModel, size: int | None, flag: str = "--exit-vocab",
                   ranking: list[int] | None = None) -> tuple[int, ...] | None:
    """The exit vocabulary of ``size`` tokens: the first ``size`` ids of the model's ``draft_vocab.json``
    ranking (or of ``ranking``) plus its special tokens, sorted; None for 0, None or the whole vocabulary
    (the full head). Read once per model and size.

    Raises:
        LiteError: a size that is not an integer >= 0, a model without a ranking (naming ``flag``).
    """
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise LiteError(f"{flag} must be an integer >= 0 (0 = the full head), got {size!r}")
    if not size or size >= lm.vocab_size:
        return None

    def make() -> tuple[int, ...]:
        from .draft_vocab import load_ranking, vocab_ids
        from .sampling import eos_ids

        always = set(eos_ids(lm.tokenizer, getattr(lm.model, "generation_config", None)))
        always |= set(getattr(lm.tokenizer, "all_special_ids", []) or [])
        ranked = load_ranking(lm.folder) if ranking is None else ranking
        return tuple(vocab_ids(ranked, size, lm.vocab_size, always, where=lm.folder, flag=flag))

    if ranking is not None:
        return make()
    return _per_model(lm, ("vocab", size, flag), make)


def is_calibrated(lm: LiteModel) -> bool:
    """True when every exit layer below L has a threshold in ``lite_config.json``."""
    cfg = lm.lite_config
    return all(cfg.threshold_for(k) is not None for k in cfg.exit_layers if k < lm.num_layers)


PRICE_MARGIN = 0.10  # recorded by calibration (calibration.price_margin), which the model card reads
"""``auto`` decodes with exits at a batch size only where their priced step (:func:`priced_speedup`) is at
least this much faster than the full model's. The price left out 3-8% in what was measured against lite's
exits off (float32, 2-core CPU; priced with CHECK_OVERHEAD at its earlier 0.05): the shipped default priced 1.20x at batch 1 and ran 1.09x, 1.01x at batch 8
and ran 0.98x; the dense-exit cascade priced 1.22x at batch 1 and ran 1.15x."""


def gate_check_price(lm: LiteModel, record: dict, checked) -> tuple[float, float]:
    """What one check of a calibrated gate costs at :data:`lite.decoding.cost.PRICE_POSITION`, in blocks of
    one row, beyond :data:`lite.decoding.cost.CHECK_OVERHEAD`: (the gate's own FLOPs, the largest of
    calibration's ``flops_per_check``; the exit module it runs at every check, the largest over ``checked``,
    for a gate on the exit state, else 0). ``record``: ``lite_config.json``'s ``calibration.gate``."""
    from .cost import ModelShape

    block = ModelShape.from_config(lm.config).block_flops(PRICE_POSITION)
    gate = max((float(v) for v in (record.get("flops_per_check") or {}).values()), default=0.0) / block
    if record.get("features", "exit") != "exit":  # the raw state (and its change): no module runs to check
        return gate, 0.0
    return gate, max((lm.exit_module_flops(k, PRICE_POSITION) for k in checked), default=0) / block


def priced_speedup(lm: LiteModel, kind: str, batch: int = 1, ride: bool | None = None) -> float | None:
    """The full model's step cost over that of the calibrated policy ``kind`` ("dynamic" or "gate"), priced
    at ``batch`` rows (:func:`lite.decoding.cost.batch_step_price`) from where the calibration tokens left
    (``lite_config.json``'s ``calibration``); > 1 is faster. ``ride``: rows that leave ride along (None: the
    engine's default, up to its ride-along limit). None when calibration recorded nothing to price."""
    from .cost import StepPrices, batch_step_price, step_prices
    from .engine import RIDE_ALONG_ROWS

    cal = lm.lite_config.calibration or {}
    record = cal.get("gate") if kind == "gate" else cal if kind == "dynamic" else None
    if not record or not record.get("expected_exit_rate"):
        return None
    rates = {int(k): float(v) for k, v in record["expected_exit_rate"].items() if v is not None}
    chosen = lm.lite_config.quality_choice()
    if chosen is not None and chosen["kind"] == kind:  # --quality-bar: where its decoded answers left
        rates = {int(k): float(v) for k, v in chosen["exit_rates"].items()}
    checked = [int(k) for k in cal.get("layers") or rates]
    fill, read, head = step_prices(lm, cal.get("exit_vocab") or lm.lite_config.exit_vocab)
    heads = None
    if kind == "dynamic":  # every check reads the module and the head; leaving adds nothing
        prices = StepPrices(head=head, exit_read=0.0, check=read, kv_fill=fill)
    else:
        check, module = gate_check_price(lm, record, checked)
        check, read = check + module, read - module  # a module run at the check is not run again to leave
        if record.get("head_rate"):  # the cascade: the head is read where the gate lets a row pass
            heads = {int(k): float(v) for k, v in record["head_rate"].items()}
            prices = StepPrices(head=head, exit_read=0.0, check=check, kv_fill=fill, cascade_read=read)
        else:
            prices = StepPrices(head=head, exit_read=read, check=check, kv_fill=fill)
    prices = replace(prices, exit_kv=len(lm.exit_kv_layers) * fill)
    ride = batch <= RIDE_ALONG_ROWS if ride is None else ride
    cost, full = batch_step_price(rates, checked, lm.num_layers, batch, prices, ride and batch > 1, heads)
    return full / cost


PRICED_BATCHES = (1, 2, 4, 8, 16)  # the batch sizes calibration records prices at (the model card shows them)


def priced_table(lm: LiteModel, batches=PRICED_BATCHES) -> dict[str, dict[str, float]]:
    """:func:`priced_speedup` of each calibrated policy ("gate", "dynamic") at each of ``batches``, rounded:
    {kind: {str(batch): speedup}}; kinds calibration recorded nothing for are left out."""
    table = {kind: {str(b): priced_speedup(lm, kind, b) for b in batches} for kind in ("gate", "dynamic")}
    return {k: {b: round(v, 3) for b, v in row.items()} for k, row in table.items() if None not in row.values()}


def default_exit(lm: LiteModel, batch: int = 1) -> str:
    """The model's own best exit policy at ``batch`` rows decoded together, what ``auto`` means: the one
    calibration recorded (``lite_config.json``'s ``default_exit``), else the learned gate when the folder has
    one, else ``dynamic`` when it has calibrated thresholds, else ``none`` (an uncalibrated model decodes in
    full). A calibrated policy whose priced step at ``batch`` rows (:func:`priced_speedup`) is not at least
    :data:`PRICE_MARGIN` faster than the full model's gives way to ``none``: in a batch a step lasts until
    its deepest row leaves, so exits that pay alone can cost more than they save. Batch-invariant decoding
    computes every row alone: price it at 1."""
    cfg = lm.lite_config
    has_gate = bool(cfg.gate_file)
    recorded = (cfg.default_exit or "").strip()
    if recorded and recorded != "auto" and (recorded != "gate" or has_gate) and \
            (recorded != "dynamic" or is_calibrated(lm)):
        chosen = recorded
    elif has_gate:
        chosen = "gate"
    else:
        chosen = "dynamic" if is_calibrated(lm) else "none"
    if chosen in ("gate", "dynamic"):
        speedup = priced_speedup(lm, chosen, batch)
        if speedup is not None and speedup < 1.0 + PRICE_MARGIN:
            return "none"
    return chosen


def resolve_exit_spec(lm: LiteModel, spec: str, batch: int = 1) -> str:
    """``auto`` becomes the model's own best policy at ``batch`` rows (:func:`default_exit`); others pass
    through."""
    spec = spec.strip()
    if spec == "auto":
        return default_exit(lm, batch)
    return spec


def threshold_values(lm: LiteModel, text: str | dict[int, float] | None, measure: str = "max_prob",
                     layers: list[int] | None = None) -> dict[int, float]:
    """``--thresholds``: one value for every checked exit below L ("0.9") or per layer ("8:0.9,11:0.85");
    {} = the calibrated ones from ``lite_config.json``.

    Args:
        measure: the confidence measure the values belong to; each value must lie in its range
            (:data:`lite.model.config.CONFIDENCE_RANGES`).
        layers: the exit layers checked (``--exit-layers``); None = the model's.
    Raises:
        LiteError: not numbers, not finite, or outside the measure's range (names ``--thresholds``).
    """
    if not text:
        return {}
    if isinstance(text, dict):
        values = {int(k): float(v) for k, v in text.items()}
    elif ":" not in text:
        try:
            value = float(text)
        except ValueError:
            raise LiteError(f"--thresholds {text!r}: give one number or LAYER:VALUE pairs like '8:0.9'") from None
        values = {k: value for k in (layers or lm.exit_layers) if k < lm.num_layers}
    else:
        values = parse_thresholds(text)
    for layer, value in values.items():
        problem = threshold_problem(value, measure)
        if problem:
            raise LiteError(f"--thresholds: layer {layer}: {problem}")
    return values


def parse_thresholds(text: str) -> dict[int, float]:
    """``--thresholds "8:0.9,11:0.85"`` -> {8: 0.9, 11: 0.85}."""
    out: dict[int, float] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        try:
            layer, value = part.split(":")
            out[int(layer)] = float(value)
        except ValueError:
            raise LiteError(f"--thresholds: {part!r} is not LAYER:VALUE; write e.g. '8:0.9,11:0.85'") from None
        if not math.isfinite(out[int(layer)]):
            raise LiteError(f"--thresholds: {part!r}: a threshold must be a finite number, e.g. '8:0.9'")
    if not out:
        raise LiteError("--thresholds is empty; write e.g. '8:0.9,11:0.85'")
    return out


def _meta(flag: str, help: str, **cli) -> dict:
    return {"metadata": {"flag": flag, "help": help, **cli}}


@dataclass
class ExitOptions:
    """The exit flags, the same on every verb (CLI), request (server), run (evaluator) and Python call.

    Each field's metadata holds its flag and help: the CLI's flags are generated from them.
    """

    exit: str | None = field(default=None, **_meta(
        "--exit", "exit policy: auto (the model's own best: the one lite calibrate recorded, else its gate, else "
        "its thresholds, else none), none, dynamic (calibrated thresholds), gate (the learned exit gate), "
        "static:K (always layer K), speculative[:N] (lossless: exits draft N tokens, the full model verifies); "
        "default: dynamic when --thresholds or --gate are given, else auto", type="exit_spec", metavar="POLICY"))
    threshold_scale: float = field(default=1.0, **_meta(
        "--threshold-scale", "multiply every threshold (>1 exits less)", type="positive_float"))
    thresholds: str | dict[int, float] | None = field(default=None, **_meta(
        "--thresholds", "dynamic exit thresholds: one for every exit ('0.9') or per exit layer "
        "('8:0.9,11:0.85'); default: lite_config.json", type="thresholds", metavar="K:T,..."))
    confidence: str | None = field(default=None, **_meta(
        "--confidence", "confidence measure of --thresholds (default max_prob, or the calibrated one)",
        choices=CONFIDENCES))
    exit_layers: str | list[int] | None = field(default=None, **_meta(
        "--exit-layers", "exit layers to check (default: the model's, from lite_config.json)", metavar="K,..."))
    gate: bool = field(default=False, **_meta(
        "--gate", "use the learned exit gate calibrated for this model (same as --exit gate)", action="store_true"))
    max_draft: int | None = field(default=None, **_meta(
        "--max-draft", "speculative: tokens drafted per round at most (default 4, or N of speculative:N)",
        type="positive_int", metavar="N"))
    draft_stop: float | None = field(default=None, **_meta(
        "--draft-stop", "speculative: a draft token whose confidence at a checked exit is below C checks no "
        "further exits and is verified at once (default 0 = never)", type="finite_float", metavar="C"))
    draft_vocab: int | None = field(default=None, **_meta(
        "--draft-vocab", "speculative: drafts read the head over the N most frequent tokens (draft_vocab.json, "
        "made by 'lite calibrate --draft-vocab'); the output does not change; default: the exit vocabulary",
        type="positive_int", metavar="N"))
    exit_vocab: int | None = field(default=None, **_meta(
        "--exit-vocab", "dynamic, gate and speculative: exits below the final layer read the head over the N "
        "most frequent tokens and emit only those (draft_vocab.json); 0 = the full head; default: what "
        "'lite calibrate --exit-vocab' recorded", type="nonnegative_int", metavar="N"))


EXIT_OPTION_NAMES = tuple(f.name for f in fields(ExitOptions))


def _exit_layers(lm: LiteModel, value: str | list[int]) -> list[int]:
    L = lm.num_layers
    if isinstance(value, str):
        parts = [t.strip() for t in value.split(",") if t.strip()]
        if not parts or not all(t.isdigit() for t in parts):
            raise LiteError(f"--exit-layers must be comma-separated integers like '8,15', got {value!r}")
        value = [int(t) for t in parts]
    layers = [int(k) for k in value]
    return parse_exit_layers(layers if layers and layers[-1] == L else layers + [L], L)


def _split_spec(lm: LiteModel, spec: str) -> tuple[str, int | None]:
    """``kind[:ARG]`` -> (kind, its integer argument or None), refusing unknown kinds and bad arguments."""
    kind, colon, arg = spec.partition(":")
    kind, arg = kind.strip(), arg.strip()
    if kind not in SPEC_KINDS:
        raise LiteError(f"--exit {spec!r}: unknown exit policy; use one of none, static:K, dynamic, gate, "
                        f"speculative[:N], auto")
    if kind == "static":
        try:
            k = int(arg)
        except ValueError:
            raise LiteError(f"--exit {spec!r}: K must be an integer layer, e.g. static:{lm.num_layers // 2}") from None
        if not 1 <= k <= lm.num_layers:
            raise LiteError(f"--exit static:{k}: K is out of range; this model has layers 1..{lm.num_layers}")
        return kind, k
    if kind == "speculative" and colon:
        try:
            return kind, int(arg)
        except ValueError:
            raise LiteError(f"--exit {spec!r}: N (max draft tokens) must be an integer, e.g. speculative:4") from None
    if colon:
        raise LiteError(f"exit policy '{kind}' takes no argument, got {spec!r}")
    return kind, None


def build_policy(lm: LiteModel, options: ExitOptions | None = None, batch: int = 1) -> ExitPolicy:
    """The :class:`ExitPolicy` that ``options`` ask for on ``lm``: the one place flags become a policy.
    ``batch``: the rows decoded together (1 under batch-invariant decoding), which ``auto`` is priced at
    (:func:`default_exit`).

    Raises:
        LiteError: unknown kind, K out of range, flags that do not apply to the kind, thresholds missing or
            for another confidence measure, a gate the model does not have, bad draft settings; each names
            the flag to fix.
    """
    o = options or ExitOptions()
    if not (isinstance(o.threshold_scale, (int, float)) and o.threshold_scale > 0
            and math.isfinite(o.threshold_scale)):  # also refuses NaN
        raise LiteError(f"--threshold-scale must be a finite number > 0, got {o.threshold_scale}")
    spec = o.exit.strip() if o.exit is not None else ("dynamic" if (o.thresholds or o.gate) else "auto")
    spec = resolve_exit_spec(lm, spec, batch)
    kind, arg = _split_spec(lm, spec)
    if kind != "speculative" and (o.max_draft is not None or o.draft_stop is not None or o.draft_vocab is not None):
        raise LiteError(f"--max-draft/--draft-stop/--draft-vocab apply to --speculative, not --exit {spec}")
    if o.exit_vocab is not None and kind in ("none", "static"):
        raise LiteError(f"--exit-vocab applies to --exit dynamic, gate and speculative, not --exit {spec}")
    if (o.gate or o.thresholds or o.confidence or o.exit_vocab is not None) and kind not in ("dynamic", "gate",
                                                                                            "speculative"):
        raise LiteError(f"--gate/--thresholds/--confidence/--exit-vocab apply to --exit dynamic, not --exit {spec}")
    if kind in ("none", "static"):
        policy = ExitPolicy(kind, layer=arg)
        check_policy(lm, policy)
        return policy
    gate = _require_gate(lm, "--gate" if o.gate else f"exit policy '{kind}'") if (o.gate or kind == "gate") else None
    if kind == "dynamic" and gate is not None:
        kind = "gate"
    layers = _exit_layers(lm, o.exit_layers) if o.exit_layers else None
    thresholds: dict[int, float] = {}
    measure = o.confidence or "max_prob"
    if gate is None:  # thresholds decide: the caller's, or the calibrated ones
        calibrated = bool(lm.lite_config.thresholds)
        if o.thresholds:
            thresholds = threshold_values(lm, o.thresholds, measure, layers)
            checked = [k for k in (layers or lm.exit_layers) if k < lm.num_layers]
            stray = sorted(k for k in thresholds if k not in checked)
            if stray:
                raise LiteError(f"--thresholds: layers {stray} are not exits checked here (exits: {checked}, the "
                                f"final layer {lm.num_layers} needs none); remove them, or add them to --exit-layers")
        else:
            if o.confidence and (o.confidence != lm.lite_config.confidence or not calibrated):
                raise LiteError(
                    f"--confidence {o.confidence}: the calibrated thresholds are for "
                    f"{lm.lite_config.confidence if calibrated else 'nothing (not calibrated)'}; give --thresholds "
                    f"for {o.confidence}")
            thresholds = {int(k): float(v) for k, v in lm.lite_config.thresholds.items()}
            measure = lm.lite_config.confidence
        thresholds = {k: v * o.threshold_scale for k, v in thresholds.items()}
    # the recorded exit vocabulary belongs to the recorded thresholds and gate: thresholds given here read the
    # full head unless an exit vocabulary is given with them
    size, flag = o.exit_vocab, "--exit-vocab"
    if size is None:
        size = 0 if o.thresholds else lm.lite_config.exit_vocab
        flag = "the exit vocabulary recorded in lite_config.json (exit_vocab; --exit-vocab 0 = the full head)"
    if kind == "speculative" and o.draft_vocab is not None:
        size, flag = o.draft_vocab, "--draft-vocab"
    policy = ExitPolicy(
        kind, thresholds=thresholds, confidence=measure, gate=gate, exit_layers=layers,
        exit_ids=exit_vocab_ids(lm, size, flag),
        max_draft_tokens=(o.max_draft if o.max_draft is not None else arg if arg is not None else 4),
        draft_stop_confidence=o.draft_stop if o.draft_stop is not None else 0.0,
    )
    check_policy(lm, policy)
    return policy


def make_policy(lm: LiteModel, **flags) -> ExitPolicy:
    """:func:`build_policy` with the flags as keyword arguments (``exit="dynamic", thresholds="0.9"``)."""
    unknown = sorted(set(flags) - set(EXIT_OPTION_NAMES))
    if unknown:
        raise LiteError(f"unknown exit options {unknown}; the exit options are {list(EXIT_OPTION_NAMES)}")
    return build_policy(lm, ExitOptions(**flags))


def parse_exit(lm: LiteModel, spec: str, threshold_scale: float = 1.0, batch: int = 1) -> ExitPolicy:
    """An exit spec as text (the server's ``exit`` field, ``lite demo --exit``) -> a checked policy.

    Args:
        spec: "none", "static:K", "dynamic", "gate", "auto" or "speculative[:N]".
        threshold_scale: multiplies every dynamic threshold (>1 exits less, <1 more).
        batch: the rows decoded together, which ``auto`` is priced at (:func:`build_policy`).
    Raises:
        LiteError: see :func:`build_policy`.
    """
    return build_policy(lm, ExitOptions(exit=spec, threshold_scale=threshold_scale), batch)
