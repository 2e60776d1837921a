"""`lite demo`: the whole story on the embedded default model, offline, in a few minutes.

For each built-in prompt: the full model's answer (transformers' own ``generate``, timed: the reference for
both quality and wall-clock), then the same prompt with early exit (streamed token by token with its exit
layer), then the three cost figures and the similarity of the two answers. The model is the embedded
default with the LITE adapter shipped inside the package when there is one (``lite/assets``), which
carries its calibrated thresholds and exit gate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import LiteError

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Explain what a neural network is in two sentences.",
    "Write a haiku about the sea.",
]


@dataclass
class DemoAnswer:
    """One prompt answered by the full model and with early exit."""

    prompt: str
    full_text: str
    early_text: str
    tokens_full: int
    tokens_early: int
    mean_exit_layer: float
    layer_cost_improvement: float
    compute_cost_improvement: float
    seconds_full: float  # transformers' generate
    seconds_early: float
    similarity: float | None
    # lossless self-speculative decoding of the same prompt (None when not run)
    seconds_lossless: float | None = None
    identical_lossless: bool | None = None  # same tokens as transformers' generate
    drafted: int = 0
    accepted: int = 0

    @property
    def speedup(self) -> float:
        return self.seconds_full / self.seconds_early if self.seconds_early > 0 else float("nan")

    @property
    def speedup_lossless(self) -> float | None:
        if not self.seconds_lossless:
            return None
        return self.seconds_full / self.seconds_lossless


@dataclass
class DemoResult:
    model: str
    adapter: str | None  # the shipped adapter folder, when used
    policy: str  # the exit spec used ("gate", "dynamic", or the hand-set fallback)
    num_layers: int
    exit_layers: list[int]
    checked_layers: list[int]  # exit layers below L the policy checks (what the colours stand for)
    dtype: str = "float32"  # the dtype both the full model and early exit ran in
    answers: list[DemoAnswer] = field(default_factory=list)
    lossless_policy: str | None = None  # how the lossless run drafted, when it ran

    def overall(self) -> DemoAnswer:
        """Totals over the prompts: costs weighted by tokens, speedup = total time ratio."""
        a = self.answers
        n_early = sum(x.tokens_early for x in a) or 1
        sims = [x.similarity for x in a if x.similarity is not None]
        lossless = [x for x in a if x.seconds_lossless is not None]
        return DemoAnswer(
            prompt="(all)", full_text="", early_text="",
            tokens_full=sum(x.tokens_full for x in a), tokens_early=sum(x.tokens_early for x in a),
            mean_exit_layer=sum(x.mean_exit_layer * x.tokens_early for x in a) / n_early,
            layer_cost_improvement=sum(x.layer_cost_improvement * x.tokens_early for x in a) / n_early,
            compute_cost_improvement=sum(x.compute_cost_improvement * x.tokens_early for x in a) / n_early,
            seconds_full=sum(x.seconds_full for x in a), seconds_early=sum(x.seconds_early for x in a),
            similarity=sum(sims) / len(sims) if sims else None,
            seconds_lossless=sum(x.seconds_lossless for x in lossless) if lossless else None,
            identical_lossless=all(x.identical_lossless for x in lossless) if lossless else None,
            drafted=sum(x.drafted for x in lossless), accepted=sum(x.accepted for x in lossless),
        )


# Hand-set fallback when the model carries no calibration: exits only in the last third, where even an
# un-tuned model's layers often agree with the final one. Shown as such, never as a calibrated result.
FALLBACK_EXIT = "dynamic"
FALLBACK_THRESHOLD = 0.9


def demo_policy(lm, exit_spec: str | None):
    """The policy the demo decodes with, and its name: the request, else the model's own best policy (what
    ``--exit auto`` means on every verb: the one calibration recorded, else its gate, else its thresholds),
    else the labelled hand-set fallback."""
    from .decoding import ExitPolicy
    from .decoding.spec import default_exit, parse_exit

    if exit_spec and exit_spec.strip() != "auto":
        return parse_exit(lm, exit_spec), exit_spec
    own = default_exit(lm)
    if own != "none":
        return parse_exit(lm, own), own
    late = [k for k in lm.exit_layers if 2 * lm.num_layers / 3 <= k < lm.num_layers]
    policy = ExitPolicy(kind="dynamic", thresholds={k: FALLBACK_THRESHOLD for k in late}, exit_layers=late + [lm.num_layers])
    return policy, f"dynamic, hand-set max-prob >= {FALLBACK_THRESHOLD} at layers {late} (not calibrated)"


LOSSLESS_MAX_DRAFT = 4
LOSSLESS_DRAFT_VOCAB = 8192


def lossless_policy(lm):
    """Self-speculative decoding for the demo's lossless row, and its description; (None, reason) when the
    model has neither a gate nor calibrated thresholds to draft with. Drafts leave as the model's default
    policy decides (the learned gate, or the calibrated thresholds), over the calibrated exit vocabulary,
    else over an exit vocabulary when ``draft_vocab.json`` exists."""
    from .decoding.draft_vocab import load_ranking
    from .decoding.spec import ExitOptions, build_policy, default_exit, is_calibrated, model_gate

    gate = model_gate(lm)
    if gate is None and not is_calibrated(lm):
        return None, "not calibrated"
    if gate is not None and is_calibrated(lm) and default_exit(lm) != "gate":
        gate = None  # the thresholds are the default policy: they draft
    exit_vocab = lm.lite_config.exit_vocab
    vocab = None if exit_vocab else (min(LOSSLESS_DRAFT_VOCAB, lm.vocab_size) if load_ranking(lm.folder) else None)
    policy = build_policy(lm, ExitOptions(exit="speculative", gate=gate is not None, max_draft=LOSSLESS_MAX_DRAFT,
                                          draft_vocab=vocab))
    what = f"self-speculative, drafts by the {'learned gate' if gate else 'calibrated thresholds'}, " \
           f"up to {LOSSLESS_MAX_DRAFT} per round, draft head over {exit_vocab or vocab or 'all'} tokens"
    return policy, what


def run_demo(*, model: str | None = None, prompts: list[str] | None = None, max_new_tokens: int = 48,
             dtype: str | None = None, device: str | None = None, exit_spec: str | None = None,
             similarity: bool = True,
             lossless: bool = True, progress: Callable[[str], None] | None = None,
             on_ready: Callable[[DemoResult], None] | None = None,
             on_answer_start: Callable[[str], None] | None = None,
             on_token: Callable[[object], None] | None = None) -> DemoResult:
    """Answer ``prompts`` with the full model and with early exit; returns every figure.

    Args:
        model: a model/adapter folder; None = the embedded default with the shipped LITE adapter if any.
        device: where to run (see :func:`lite.model.loading.parse_device`; default: the accelerator, else cpu).
        exit_spec: override the exit policy ("gate", "dynamic", "static:K", "speculative", ...).
        similarity: compute answer similarity with the offline MiniLM model (a few seconds to load).
        lossless: also decode each prompt with lossless self-speculative decoding (:func:`lossless_policy`)
            and time it against the same ``generate`` run.
        on_ready / on_answer_start / on_token: hooks for the CLI: the (still empty) result once the model and
            policy are known; each prompt before its early-exit answer; each early-exit TokenRecord.
    """
    from .decoding import GenerationSettings, decoder_for, generate
    from .decoding.reference import hf_generate
    from .model.loading import load_model, shipped_adapter_dir
    from .model.prompts import default_format, encode_prompt

    if prompts is not None and (not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts)):
        raise LiteError("--prompt must not be empty: give some text (or leave --prompt out for the built-ins)")
    prompts = prompts or DEMO_PROMPTS
    if max_new_tokens < 1:
        raise LiteError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    adapter = shipped_adapter_dir() if model is None else None
    spec = str(adapter) if adapter is not None else model
    if progress and model is None and adapter is None:
        progress("no LITE adapter is shipped in this install: showing the un-tuned embedded default")
    lm = load_model(spec, dtype=dtype, device=device, progress=progress)
    policy, policy_name = demo_policy(lm, exit_spec)
    fmt = default_format(lm)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    embedder = None
    if similarity:
        from .evaluation.metrics import MiniLMEmbedder, cosine_similarities

        embedder = MiniLMEmbedder()
    if progress:
        progress("warming up")
    warm = encode_prompt(lm.tokenizer, "Hi", fmt=fmt)
    hf_generate(lm, warm, 4)
    generate(lm, warm, policy, GenerationSettings(max_new_tokens=4))
    spec_policy, spec_name = lossless_policy(lm) if lossless else (None, None)
    if spec_policy is not None:
        generate(lm, warm, spec_policy, GenerationSettings(max_new_tokens=4))
    if embedder is not None:
        embedder.encode(["warm up"])  # load MiniLM now, not in the middle of the first answer
    checked = sorted(k for k in (policy.exit_layers or lm.exit_layers) if k < lm.num_layers)
    result = DemoResult(model=lm.source or "", adapter=str(adapter) if adapter else None, policy=policy_name,
                        dtype=str(lm.dtype).replace("torch.", ""),
                        num_layers=lm.num_layers, exit_layers=lm.exit_layers, checked_layers=checked,
                        lossless_policy=spec_name if spec_policy is not None else None)
    if on_ready:
        on_ready(result)
    for prompt in prompts:
        ids = encode_prompt(lm.tokenizer, prompt, fmt=fmt)
        full_ids, full_seconds = hf_generate(lm, ids, max_new_tokens)
        full_text = lm.tokenizer.decode(full_ids, skip_special_tokens=True)
        if on_answer_start:
            on_answer_start(prompt)
        decoder = decoder_for(policy)(lm, [ids], policy, settings)
        for _, record in decoder.run():
            if on_token is not None:
                on_token(record)
        # compute cost against the full model's own answer length: longer early-exit answers count against it
        early = decoder.result(0, reference_tokens=len(full_ids))
        n = max(len(early.tokens), 1)
        sim = None
        if embedder is not None:
            sim = cosine_similarities(embedder, [full_text.strip()], [early.text.strip()])[0]
        result.answers.append(DemoAnswer(
            prompt=prompt, full_text=full_text, early_text=early.text, tokens_full=len(full_ids),
            tokens_early=len(early.tokens), mean_exit_layer=sum(t.exit_layer for t in early.tokens) / n,
            layer_cost_improvement=early.layer_cost_improvement,
            compute_cost_improvement=early.compute_cost_improvement, seconds_full=full_seconds,
            seconds_early=early.seconds, similarity=sim,
        ))
        if spec_policy is not None:
            spec = generate(lm, ids, spec_policy, settings)
            a = result.answers[-1]
            a.seconds_lossless, a.identical_lossless = spec.seconds, spec.token_ids == list(full_ids)
            a.drafted, a.accepted = spec.cost.drafted, spec.cost.accepted
    return result
