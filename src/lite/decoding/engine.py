"""Early-exit decoding: the public contract and the engine.

The shape is gpt-fast's: a per-layer cache allocated once (:meth:`LiteModel.new_cache`), explicit positions,
a small per-token step function, and a plain Python loop that yields one :class:`TokenRecord` per token
(and calls ``on_token``). Everything runs through the model adapter (:mod:`lite.model.adapter`); no transformers
forward is copied.

Decode steps. The prompt's first ``n - 1`` positions are prefilled through all L blocks. Step t then
consumes the previous token (for t = 1 the last prompt token) at position ``n - 1 + t - 1`` and produces
token t, so every generated token, the first included, goes through the same exit policy.

Policies (:class:`ExitPolicy`, defined and validated in :mod:`lite.decoding.policy`):
``none`` runs all L blocks; ``static`` always leaves at layer K; ``dynamic`` checks the exit layers below
L in increasing order and leaves at the first one whose confidence (:mod:`lite.decoding.confidence`) is >= its
threshold times ``threshold_scale``, or asks a learned gate (:class:`ExitGate`) instead. The one host
sync per check is the exit decision itself.
``speculative`` drafts with the dynamic exits and verifies with the full model (lossless); it runs in
:class:`lite.decoding.speculative.SpeculativeDecoder`, a subclass of :class:`Decoder`; the entry points of
:mod:`lite.decoding` (``make_decoder``, ``stream``, ``generate``) pick the class for a policy.

Skipped layers (``GenerationSettings.kv``), what later tokens see at the blocks a token skipped:

* ``copy``: the exit state stands in for the input of every skipped block; only its K/V projections run
  (:meth:`LiteModel.fill_kv`). After every step every block has cached exactly the positions processed.
* ``recompute``: the exited token's state is kept; the next token that goes deeper first pushes the pending
  positions through each block they skipped, in the same batched call as its own position, so the cache
  becomes exactly the full model's. Block k then holds every position whose token (or a later, deeper
  one) reached layer k; positions still pending at the end cost nothing.

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import LiteError
from ..model.adapter import LiteModel
from . import confidence as conf_mod
from .cost import ModelShape, SequenceCost, TokenCost, sequence_cost
from .draft_vocab import shortlist_head, widen
from .policy import ExitPolicy, resolve_policy
from .sampling import TextStream, eos_ids, pick_token

KV_STRATEGIES = ("copy", "recompute")


@dataclass
class GenerationSettings:
    """Sampling and stopping. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    kv: str = "copy"  # what later tokens see at skipped layers: "copy" or "recompute"


@dataclass
class TokenRecord:
    """One generated token and where it left the network."""

    id: int
    text: str  # the text this token releases (held back while it may be part of a stop string)
    exit_layer: int
    confidence: float | None  # confidence at the exit layer (None when exits are off)
    draft_layer: int | None = None  # speculative: the exit that drafted this (verified) token, else None


@dataclass
class GenerationResult:
    """A generated sequence with its per-token exits and cost (see :mod:`lite.decoding.cost`)."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    tokens: list[TokenRecord]
    num_layers: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    seconds: float
    layer_cost_improvement: float  # 1 - mean(exit layer) / L
    compute_cost_improvement: float  # 1 - FLOPs(early exit, incl. head checks and K/V work) / FLOPs(full)
    cost: SequenceCost | None = None  # the detailed cost record (lite.decoding.cost)

    @property
    def exit_layers(self) -> list[int]:
        """The layer each generated token left the network at (L = the full model), in order."""
        return [t.exit_layer for t in self.tokens]




def check_settings(lm: LiteModel, prompt_ids: list[int], settings: GenerationSettings) -> None:
    """Reject bad sampling/stopping settings and prompts that do not fit, with the flag to fix."""
    if not prompt_ids:
        raise LiteError("the prompt is empty: give some text to continue (PROMPT)")
    if len(prompt_ids) >= lm.max_context:
        raise LiteError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is {lm.max_context}: shorten "
            f"the prompt"
        )
    if settings.max_new_tokens < 1:
        raise LiteError(f"--max-new-tokens must be >= 1, got {settings.max_new_tokens}")
    if not (settings.temperature >= 0 and math.isfinite(settings.temperature)):  # NaN fails both
        raise LiteError(f"--temperature must be a finite number >= 0, got {settings.temperature}")
    if not 0 < settings.top_p <= 1:
        raise LiteError(f"--top-p must be in (0, 1], got {settings.top_p}")
    if settings.kv not in KV_STRATEGIES:
        raise LiteError(f"--kv must be one of {KV_STRATEGIES}, got {settings.kv!r}")


# ---------------------------------------------------------------------------------------- engine
class Decoder:
    """The decode-time state of one sequence: cache, positions, pending states, costs.

    Use :func:`lite.decoding.stream` or :func:`lite.decoding.generate`; this class is public for tests and tools that need to look
    at the cache between steps (``after_step`` is called after every step with the decoder itself).
    """

    def __init__(self, lm: LiteModel, prompt_ids: list[int], policy: ExitPolicy,
                 settings: GenerationSettings) -> None:
        check_settings(lm, prompt_ids, settings)
        self.lm = lm
        self.plan = resolve_policy(lm, policy)
        self.settings = settings
        self.prompt_ids = [int(i) for i in prompt_ids]
        n = len(self.prompt_ids)
        # positions processed: n - 1 prefilled, then one per step; never past the model's context
        self.max_steps = min(settings.max_new_tokens, lm.max_context - (n - 1))
        self.max_len = n - 1 + self.max_steps
        self.cache = lm.new_cache(self.max_len)
        self.rope = lm.rope(0, self.max_len)
        # recompute: latest raw hidden state of every position (its level = blocks it has been through)
        self.states = (torch.zeros(1, self.max_len, lm.hidden_size, dtype=lm.dtype, device=lm.device)
                       if settings.kv == "recompute" else None)
        self.generator = None
        if settings.temperature > 0:
            self.generator = torch.Generator(device=lm.device)
            self.generator.manual_seed(settings.seed if settings.seed is not None else
                                       int(torch.randint(0, 2**62, (1,)).item()))
        self.eos = eos_ids(lm.tokenizer, getattr(lm.model, "generation_config", None))
        self.text = TextStream(lm.tokenizer, settings.stop)
        self.token_costs: list[TokenCost] = []
        self.records: list[TokenRecord] = []
        self.finish_reason = "length"
        self.seconds = 0.0
        self.after_step: Callable[[Decoder], None] | None = None
        # an exit vocabulary (dynamic): the exits below L read the head over these ids only
        self.check_ids, self.check_head = shortlist_head(lm, self.plan.check_ids if self.plan.kind == "dynamic"
                                                         else None)

    # ------------------------------------------------------------------ per block / per step
    def _block(self, layer: int, h: torch.Tensor, pos: int, tc: TokenCost) -> torch.Tensor:
        """Run block ``layer`` for the current token (h: (1, 1, D)); under ``recompute`` first push the
        pending positions that skipped this block, in the same batched call."""
        start = self.cache.lengths[layer - 1]
        tc.blocks_run += 1
        if start == pos:
            return self.lm.run_block(layer, h, self.rope, self.cache)
        # pending positions start..pos-1 have been through exactly layer-1 blocks (see the module docstring)
        x = torch.cat([self.states[:, start:pos], h], dim=1)  # (1, pos - start + 1, D)
        out = self.lm.run_block(layer, x, self.rope, self.cache)
        self.states[:, start:pos] = out[:, :-1]
        tc.recomputed += pos - start
        tc.recompute_context += sum(p + 1 for p in range(start, pos))
        return out[:, -1:]

    def _exit_head(self, normed: torch.Tensor, tc: TokenCost, check: bool) -> torch.Tensor:
        """Logits of a token leaving (or checked) at an exit below L, from its normed state (..., D): the
        full head, counted in ``tc`` (``check``: a confidence reduction over V follows), or with an exit
        vocabulary the head over its N ids, logits (..., N) (counted as ``draft_head_rows``, reduction
        included; :meth:`_widen` makes them (..., V)). The speculative decoder overrides this with its
        draft head."""
        if self.check_head is not None:
            tc.draft_head_rows += len(self.check_ids)
            return self.check_head(normed)
        tc.head_evals += 1
        tc.head_checks += int(check)
        return self.lm.head_logits(normed)

    def _widen(self, logits: torch.Tensor) -> torch.Tensor:
        """Exit-vocabulary logits (..., N) as (..., V), -inf outside it (a token that leaves is one of
        the N); full-head logits pass through."""
        return widen(logits, self.check_ids, self.lm.vocab_size)

    def _check(self, layer: int, h: torch.Tensor, tc: TokenCost, prev_state: torch.Tensor
               ) -> tuple[torch.Tensor | None, float | None, bool, torch.Tensor]:
        """One exit check of the current token (h: (1, 1, D), raw output of block ``layer``).

        The gate (when set) decides from the normed state and the head runs only if it says leave; a
        head-based measure evaluates the head (charged whether or not the token leaves); ``state_cosine``
        compares with the previous checked state and needs no head. The float conversion is the one host
        sync per check: the exit decision.

        The head is :meth:`_exit_head` (the full head here; the speculative decoder's draft head there).

        Returns (logits (1, V) if the head ran, confidence value or None, leave?, prev_state for the next
        cosine check).
        """
        lm, plan = self.lm, self.plan
        if plan.gate is not None:
            normed = lm.exit_normed(h[0, -1], layer)  # (D,)
            tc.exit_module_flops += lm.exit_module_flops(layer)
            tc.gate_flops += int(plan.gate.flops(layer))
            if plan.gate.should_exit(layer, normed):  # the exit decision
                return self._exit_head(normed, tc, check=False).unsqueeze(0), None, True, prev_state
            return None, None, False, prev_state
        threshold = plan.checks[layer]
        head_fn = conf_mod.HEAD_FUNCTIONS.get(plan.confidence)
        if head_fn is not None:
            logits = self._exit_head(lm.exit_normed(h[:, -1], layer), tc, check=True)  # (1, V)
            tc.exit_module_flops += lm.exit_module_flops(layer)
            value = float(head_fn(logits))  # the exit decision
            return logits, value, value >= threshold, prev_state
        value = float(conf_mod.state_cosine(h[0, -1], prev_state))  # the exit decision, no head
        tc.cosine_checks += 1
        return None, value, value >= threshold, h[0, -1]

    def _step(self, token: torch.Tensor, pos: int) -> tuple[torch.Tensor, int, float | None, TokenCost]:
        """One decode step: the token at ``pos`` (1, 1) through the blocks until it exits.

        Returns (exit logits (1, V), exit layer, confidence or None, the step's cost counts).
        """
        lm, plan = self.lm, self.plan
        L = lm.num_layers
        tc = TokenCost(position=pos)
        h = lm.embed(token)  # (1, 1, D)
        prev_state = h[0, -1]  # for state_cosine: the previous checked exit's state ("layer 0" first)
        measure = plan.confidence
        head_fn = conf_mod.HEAD_FUNCTIONS.get(measure)
        logits, conf, exit_layer = None, None, plan.stop_layer
        for layer in range(1, plan.stop_layer + 1):
            h = self._block(layer, h, pos, tc)
            if plan.checks.get(layer) is None:
                continue
            candidate, value, leave, prev_state = self._check(layer, h, tc, prev_state)
            if leave:
                logits, conf, exit_layer = candidate, value, layer
                break
        if logits is None and exit_layer < L and self.check_head is not None:  # state_cosine exits
            logits = self._exit_head(lm.exit_normed(h[:, -1], exit_layer), tc, check=False)
            tc.exit_module_flops += lm.exit_module_flops(exit_layer)
        if logits is None:
            logits = lm.exit_logits(h[:, -1], exit_layer)
            tc.head_evals += 1
            tc.exit_module_flops += lm.exit_module_flops(exit_layer)
        if conf is None and plan.kind != "none":  # record the exit's confidence (one more reduction)
            if measure == "state_cosine" and exit_layer == L:
                conf = float(conf_mod.state_cosine(h[0, -1], prev_state))
                tc.cosine_checks += 1
            elif measure != "state_cosine":
                conf = float((head_fn or conf_mod.max_prob)(logits))
                # over an exit vocabulary the reduction is charged with its rows (draft_head_rows)
                tc.head_checks += int(logits.shape[-1] == lm.vocab_size)
        logits = self._widen(logits)
        tc.exit_layer = exit_layer
        if exit_layer < L:
            if self.settings.kv == "copy":
                for layer in range(exit_layer + 1, L + 1):
                    lm.fill_kv(layer, h, self.rope, self.cache)
                    tc.kv_fills += 1
            else:
                self.states[:, pos] = h[:, -1]
        return logits, exit_layer, conf, tc

    def _prefill(self) -> None:
        n = len(self.prompt_ids)
        if n < 2:
            return
        ids = torch.tensor([self.prompt_ids[:-1]], device=self.lm.device)
        h = self.lm.embed(ids)  # (1, n-1, D)
        for layer in range(1, self.lm.num_layers + 1):
            h = self.lm.run_block(layer, h, self.rope, self.cache)

    # ------------------------------------------------------------------ the loop
    def run(self, on_token: Callable[[TokenRecord], None] | None = None) -> Iterator[TokenRecord]:
        """Prefill, then one step per token; yields each :class:`TokenRecord` as it is produced."""
        start = time.perf_counter()
        s = self.settings
        with torch.inference_mode():
            self._prefill()
        token = torch.tensor([[self.prompt_ids[-1]]], device=self.lm.device)
        pos = len(self.prompt_ids) - 1
        for t in range(self.max_steps):
            with torch.inference_mode():
                logits, exit_layer, conf, tc = self._step(token, pos)
                next_token = pick_token(logits, s.temperature, s.top_p, self.generator)
            token_id = int(next_token)
            self.token_costs.append(tc)
            piece, stopped = self.text.push(token_id)
            finished = stopped or token_id in self.eos
            if finished:
                self.finish_reason = "stop"
            if not stopped and (finished or t == self.max_steps - 1):
                piece += self.text.flush()
            record = TokenRecord(id=token_id, text=piece, exit_layer=exit_layer, confidence=conf)
            self.records.append(record)
            self.seconds = time.perf_counter() - start
            if self.after_step is not None:
                self.after_step(self)
            if on_token is not None:
                on_token(record)
            yield record
            if finished:
                break
            token = next_token.view(1, 1)
            pos += 1
        self.seconds = time.perf_counter() - start

    def result(self, reference_tokens: int | None = None) -> GenerationResult:
        """The finished sequence with its cost (``reference_tokens``: see :func:`lite.decoding.cost.sequence_cost`)."""
        shape = ModelShape.from_config(self.lm.config)
        cost = sequence_cost(shape, len(self.prompt_ids), self.token_costs, self.seconds, reference_tokens)
        return GenerationResult(
            prompt_ids=list(self.prompt_ids), token_ids=[r.id for r in self.records], text=self.text.text,
            tokens=list(self.records), num_layers=self.lm.num_layers, finish_reason=self.finish_reason,
            seconds=self.seconds, layer_cost_improvement=cost.layer_cost_improvement,
            compute_cost_improvement=cost.compute_cost_improvement, cost=cost,
        )
