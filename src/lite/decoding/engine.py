"""Early-exit decoding: the public records and the one decoder.

The shape is gpt-fast's: a cache allocated once (grown only when continuous batching needs room), explicit
positions, one small step function (:func:`lite.decoding.step.decode_step`) and a plain Python loop that
yields one :class:`TokenRecord` per token. :class:`Decoder` holds B sequences at once; a batch of one is
B = 1, not a second engine. Everything runs through the model adapter (:mod:`lite.model.adapter`); no
transformers forward is copied.

Decode steps. The prompt's ``n`` positions are prefilled through all L blocks in one call per block, as
transformers' ``generate`` does (so that exits off gives its very tokens, in bfloat16 too). Token 1 is
decided from the prefill's own states at the last prompt position (the exit policy reads them layer by
layer: no block runs again); step t >= 2 consumes token t - 1 at position ``n + t - 2`` and produces token
t. Every generated token, the first included, goes through the same exit policy. Each row keeps
its positions at cache slots 0, 1, ... (no left padding), has its own prompt length, sampling settings,
stop strings and budget, and leaves the network at its own layer; its tokens, exits, cache and cost are
the ones it gets alone (tested), up to float rounding of batched matrix products, except that a block
ridden along is counted as such (``rode``) where batch 1 counts a K/V fill (charged as one). With
``invariant=True`` there is no "up to": every row is computed by the very calls it gets alone, so its
tokens, exits and confidences are bitwise its batch-1 ones (see :class:`Decoder`).

Skipped layers (``GenerationSettings.kv``), what later tokens see at the blocks a token skipped:

* ``copy``: the exit state stands in for the input of every skipped block; only its K/V projections run
  (:meth:`LiteModel.fill_kv`), or the block itself while the row rides along in a batch. After every step
  every block has cached exactly the positions processed.
* ``recompute``: the exited token's state is kept; the next token that goes deeper first pushes the pending
  positions through each block they skipped, so the cache becomes exactly the full model's. Block k then
  holds every position whose token (or a later, deeper one) reached layer k.

``speculative`` drafts with the exits and verifies with the full model (lossless): it is
:class:`lite.decoding.speculative.SpeculativeDecoder`, the same decoder with a round on top of the same
step; :func:`lite.decoding.decoder_for` picks the class for a policy.

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
from .cost import ModelShape, SequenceCost, TokenCost, sequence_cost
from .policy import ExitPolicy
from .sampling import TextStream, eos_ids, pick_token
from .step import Plan, StepOut, decode_step

KV_STRATEGIES = ("copy", "recompute")
RIDE_ALONG_ROWS = 16  # regroup=None: rows that left ride along in steps of at most this many rows


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


def default_invariant(lm: LiteModel) -> bool:
    """Whether batch-invariant decoding is the default for ``lm`` (``lite serve``, ``LiteLM.generate`` on a
    list): on in bfloat16 and float16, whose batched kernels round differently with the batch's size often
    enough to change greedy answers (8 of 16 Vicuna answers under load); off in float32, where batching buys
    3.4x the tokens/s at batch 16 and the batched answers equalled the answers alone on 16/16 (measured,
    benchmarks/results/invariant.md, not guaranteed: pass the flag for the guarantee)."""
    return lm.dtype in (torch.bfloat16, torch.float16)


def rides_along(kv: str, rows: int, regroup: bool | None = None) -> bool:
    """Whether the rows that leave early during a step of ``rows`` rows ride along, or drop out (regroup).

    ``regroup`` True: the deeper blocks run on the rows still inside only (DREX), and the rows that left
    get their skipped blocks' K/V filled; False: they ride along (``copy`` only), the deeper blocks run on
    every row and write those K/V themselves; None: ride along in steps of at most :data:`RIDE_ALONG_ROWS`
    rows under ``copy``, regroup otherwise. A small batch is bound by reading the weights, not by
    arithmetic, so a block over fewer rows takes no less time, while a regrouped call gathers the rows'
    caches and the fills add calls of their own; a large batch is bound by arithmetic, which regrouping
    saves.
    """
    if kv != "copy":
        return False
    return rows <= RIDE_ALONG_ROWS if regroup is None else not regroup


def _joined(outs: list[StepOut]) -> StepOut:
    """The :class:`StepOut` of one-row steps, as one step over their rows in order."""
    return StepOut(logits=torch.cat([o.logits for o in outs]), exit_layers=[x for o in outs for x in o.exit_layers],
                   confidences=[x for o in outs for x in o.confidences], states=torch.cat([o.states for o in outs]),
                   costs=[x for o in outs for x in o.costs])


@dataclass
class Row:
    """The decode-time state of one sequence of a :class:`Decoder` (its cache lives in the shared cache,
    at this row's index)."""

    prompt: list[int]
    settings: GenerationSettings
    max_steps: int  # tokens it may generate: its budget, cut where the context ends
    generator: torch.Generator | None
    text: TextStream
    started: float
    costs: list[TokenCost] = field(default_factory=list)
    records: list[TokenRecord] = field(default_factory=list)
    finish_reason: str = "length"
    seconds: float = 0.0
    next_token: int = 0
    position: int = 0  # position of next_token, the input of the row's next step
    first: torch.Tensor | None = None  # (L + 1, 1, D) the prefill's states at the last prompt position


class Decoder:
    """B sequences decoding together: one cache, one :class:`Row` each, one step for all per token.

    Two ways to use it:

    * a fixed batch: ``Decoder(lm, prompts, policy, settings)`` then :meth:`run` (what
      :func:`lite.decoding.generate_batch` and :func:`lite.decoding.stream` do; one prompt is a batch of one);
    * continuous batching (``lite serve``): ``Decoder.open(lm, policy, kv)``, then :meth:`add` rows at any
      token boundary, :meth:`step` once per token for every row still generating, :meth:`result` and
      :meth:`release` a row when it has finished (or :meth:`release` it early to cancel it). A released
      row's slot is reused by the next :meth:`add`; the cache grows when a row needs more slots or room.

    ``after_step(self)`` is called after every step of :meth:`run` (tests look at the cache then); ``eos``
    holds the end-of-sequence ids (``custom_generate`` sets ``generate``'s own).

    ``invariant`` (batch-invariant decoding): every row is computed exactly as it is when it decodes alone,
    whatever else is in the batch. By construction, not by tolerance: each row's prefill, each row's step
    and each position of a recompute push (a speculative verify) is its own call with the shapes it has
    alone (one row; one position per step), and attention reads a contiguous copy of the row's own K/V
    (:class:`KVCache` ``exact``). Matrix-product kernels choose their blocking, and so their rounding, by
    the number of rows M (measured: float32 MKL rounds M = 1, 2, 3 and the other M differently, and
    attention over a padded key length differs from the exact length in float32 and bfloat16), so a
    batched product cannot promise this. The price is the batching speed-up (docs/serve.md gives the
    measured ratio); the output at batch 1 is the same either way.
    """

    max_rows: int | None = None  # rows that may generate at once (None: any number)
    runs = ("none", "static", "dynamic", "gate")  # the policy kinds this class decodes

    def __init__(self, lm: LiteModel, prompts: list[list[int]], policy: ExitPolicy,
                 settings: GenerationSettings | list[GenerationSettings], regroup: bool | None = None,
                 invariant: bool = False) -> None:
        if not prompts:
            raise LiteError("no prompts to decode: give at least one")
        per_row = settings if isinstance(settings, list) else [settings] * len(prompts)
        if len(per_row) != len(prompts):
            raise LiteError(f"{len(prompts)} prompts but {len(per_row)} settings: give one per prompt, or one")
        for ids, s in zip(prompts, per_row):
            check_settings(lm, ids, s)
        kvs = {s.kv for s in per_row}
        if len(kvs) > 1:
            raise LiteError(f"--kv must be the same for every row of a batch, got {sorted(kvs)}")
        self._open(lm, policy, per_row[0].kv, regroup, invariant)
        if self.max_rows is not None and len(prompts) > self.max_rows:
            raise LiteError(f"--exit {policy.describe()} decodes one sequence at a time: use batch size 1 for "
                            f"it (lite.decoding.generate_batch, lite eval and lite serve do so by themselves)")
        self._reserve(len(prompts), max(self._need(ids, s) for ids, s in zip(prompts, per_row)))
        self._fresh = [self._admit(ids, s) for ids, s in zip(prompts, per_row)]  # prefilled by run()

    @classmethod
    def open(cls, lm: LiteModel, policy: ExitPolicy, kv: str = "copy", regroup: bool | None = None,
             invariant: bool = False) -> Decoder:
        """An empty decoder for continuous batching: rows come with :meth:`add` and go with :meth:`release`."""
        decoder = cls.__new__(cls)
        decoder._open(lm, policy, kv, regroup, invariant)
        decoder._fresh = []
        return decoder

    def _open(self, lm: LiteModel, policy: ExitPolicy, kv: str, regroup: bool | None, invariant: bool) -> None:
        if not isinstance(invariant, bool):
            raise LiteError(f"batch_invariant must be True or False, got {invariant!r}")
        if regroup is False and kv != "copy":
            raise LiteError(f"rows ride along with --kv copy only (a fill's K/V), not --kv {kv}: "
                            f"use regroup=True or None with it")
        if kv not in KV_STRATEGIES:
            raise LiteError(f"--kv must be one of {KV_STRATEGIES}, got {kv!r}")
        self.plan = Plan.of(lm, policy)  # refuses a policy that does not fit the model
        if policy.kind not in self.runs:
            raise LiteError(f"--exit {policy.describe()}: this decoder runs {', '.join(self.runs)}; "
                            f"lite.decoding.decoder_for(policy) gives the one that runs it (speculative decoding "
                            f"runs one sequence at a time)")
        self.lm, self.policy, self.kv, self.regroup = lm, policy, kv, regroup
        self.eos = eos_ids(lm.tokenizer, getattr(lm.model, "generation_config", None))
        self.invariant = invariant
        self.cache = lm.new_cache(0, 0)
        self.cache.exact = invariant
        # recompute: latest raw hidden state of every position of every row (its level = blocks it has been through)
        self.pending = (torch.zeros(0, 0, lm.hidden_size, dtype=lm.dtype, device=lm.device)
                        if kv == "recompute" else None)
        self.rows: list[Row | None] = []
        self._free: list[int] = []  # released slots, reused by the next add
        self.active: list[int] = []  # rows still generating, in admission order
        self.after_step: Callable[[Decoder], None] | None = None

    # ------------------------------------------------------------------ rows in and out
    def _need(self, ids: list[int], s: GenerationSettings) -> int:
        """Cache slots a row needs: its prompt, then one per generated token but the last."""
        return len(ids) - 1 + min(s.max_new_tokens, self.lm.max_context - (len(ids) - 1))

    def _reserve(self, rows: int, length: int) -> None:
        """Grow the cache (and the recompute states) to at least ``rows`` rows of ``length`` slots."""
        c = self.cache
        if rows <= c.batch and length <= c.max_len:
            return
        new_len = c.max_len if length <= c.max_len else max(length, min(2 * c.max_len, self.lm.max_context))
        c.grow(max(rows, c.batch), new_len)
        if self.pending is not None:
            old = self.pending
            self.pending = torch.zeros(c.batch, c.max_len, self.lm.hidden_size, dtype=old.dtype, device=old.device)
            self.pending[:old.shape[0], :old.shape[1]] = old

    def _admit(self, ids: list[int], s: GenerationSettings) -> int:
        """Give a checked row a slot (a released one, else a new one) and a fresh :class:`Row`."""
        index = self._free.pop(0) if self._free else len(self.rows)
        self._reserve(index + 1, self._need(ids, s))
        g = None
        if s.temperature > 0:
            g = torch.Generator(device=self.lm.device)
            g.manual_seed(s.seed if s.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        row = Row(prompt=[int(i) for i in ids], settings=s, generator=g, text=TextStream(self.lm.tokenizer, s.stop),
                  max_steps=min(s.max_new_tokens, self.lm.max_context - (len(ids) - 1)), started=time.perf_counter())
        if index == len(self.rows):
            self.rows.append(row)
        else:
            self.rows[index] = row
        self.cache.reset(index)
        return index

    def add(self, prompt_ids: list[int], settings: GenerationSettings) -> int:
        """Admit one sequence at the next token boundary: checks it, prefills its prompt, and returns its
        row; its first token comes with the next :meth:`step`. Raises :class:`LiteError` on bad input."""
        return self.add_many([prompt_ids], [settings])[0]

    def add_many(self, prompts: list[list[int]], settings: list[GenerationSettings]) -> list[int]:
        """:meth:`add` for several sequences, prefilled together (one batched call per block)."""
        for ids, s in zip(prompts, settings, strict=True):
            check_settings(self.lm, ids, s)
            if s.kv != self.kv:
                raise LiteError(f"--kv {s.kv} cannot join a batch decoding with --kv {self.kv}")
        if self.max_rows is not None and len(self.active) + len(prompts) > self.max_rows:
            raise LiteError(f"--exit {self.policy.describe()} decodes one sequence at a time")
        rows = [self._admit(ids, s) for ids, s in zip(prompts, settings)]  # each row's clock starts here
        with torch.inference_mode():
            self._prefill(rows)
        self._activate(rows)
        return rows

    def _activate(self, rows: list[int]) -> None:
        for r in rows:
            row = self.rows[r]
            if row.max_steps > 0:
                self.active.append(r)  # the first token comes from the prefill's last position
                row.next_token, row.position = row.prompt[-1], len(row.prompt) - 1

    def release(self, r: int) -> None:
        """Free row ``r``'s slot: a finished row after its :meth:`result` was read, or a running row that is
        cancelled (it stops at once; nothing of it is computed any more)."""
        if r in self.active:
            self.active.remove(r)
        if r not in self._free:
            self._free.append(r)

    @property
    def rows_in_use(self) -> int:
        """Rows holding a sequence (generating, or finished and not yet released)."""
        return len(self.rows) - len(self._free)

    def _prefill(self, rows: list[int]) -> None:
        """All L blocks over the n prompt positions of ``rows`` (fresh rows, empty cache), right-padded into
        one batch call per block (padded positions write slots that the row overwrites later and that its
        masks hide); each row keeps its states at its last prompt position for its first token. After each
        block with an attention exit module, that exit's K/V are written for every prompt position."""
        lm = self.lm
        if not rows:
            return
        if self.invariant and len(rows) > 1:  # each prompt alone: no padding, its own M
            for r in rows:
                self._prefill([r])
            return
        lengths = {r: len(self.rows[r].prompt) for r in rows}
        width = max(lengths.values())
        pad = lm.tokenizer.pad_token_id if getattr(lm.tokenizer, "pad_token_id", None) is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=lm.device)
        for j, r in enumerate(rows):
            ids[j, :lengths[r]] = torch.tensor(self.rows[r].prompt, device=lm.device)
        last = torch.tensor([lengths[r] - 1 for r in rows], device=lm.device)
        at = torch.arange(len(rows), device=lm.device)
        h = lm.embed(ids)  # (b, width, D)
        states = [h[at, last]]  # per layer: (b, D) at each row's last prompt position
        for layer in range(1, lm.num_layers + 1):  # static:K: the cache needs them all, states up to K
            h = lm.run_block(layer, h, self.cache, rows)
            lm.write_exit_kv(layer, h, self.cache, rows)
            if layer <= self.plan.stop_layer:
                states.append(h[at, last])
        first = torch.stack(states)[:, :, None]  # (K + 1, b, 1, D)
        for j, r in enumerate(rows):
            self.rows[r].first = first[:, j:j + 1]
        for lengths_of_block in self.cache.lengths:
            for r in rows:
                lengths_of_block[r] = lengths[r]

    # ------------------------------------------------------------------ tokens out
    def _pick(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """The next token of every row from its logits (b, V): one argmax for the greedy rows, one draw per
        sampling row with its own generator."""
        greedy = [j for j, r in enumerate(rows) if self.rows[r].settings.temperature <= 0]
        picks = [0] * len(rows)
        if greedy:
            best = (logits if len(greedy) == len(rows) else logits[greedy]).argmax(-1).tolist()
            for j, t in zip(greedy, best):
                picks[j] = int(t)
        for j, r in enumerate(rows):
            s = self.rows[r].settings
            if s.temperature > 0:
                picks[j] = int(pick_token(logits[j], s.temperature, s.top_p, self.rows[r].generator))
        return picks

    def _emit(self, r: int, token_id: int, exit_layer: int, conf: float | None, cost: TokenCost,
              draft_layer: int | None = None, now: float | None = None) -> tuple[TokenRecord, bool]:
        """Append one token to row ``r``: its text (stop strings held back), EOS and budget; returns its
        record and whether the row has finished (it then leaves :attr:`active`)."""
        row = self.rows[r]
        row.costs.append(cost)
        piece, stopped = row.text.push(token_id)
        done = stopped or token_id in self.eos
        if done:
            row.finish_reason = "stop"
        last = len(row.records) + 1 >= row.max_steps
        if not stopped and (done or last):
            piece += row.text.flush()
        record = TokenRecord(id=token_id, text=piece, exit_layer=exit_layer, confidence=conf, draft_layer=draft_layer)
        row.records.append(record)
        row.seconds = (time.perf_counter() if now is None else now) - row.started
        finished = done or last
        if finished:
            self.active.remove(r)
        else:  # the next step consumes this token at the next position
            row.next_token, row.position = token_id, row.position + 1
        return record, finished

    def _step_rows(self, rows: list[int], tokens: torch.Tensor, positions: list[int], **options) -> StepOut:
        """:func:`decode_step` over cache rows ``rows`` with this decoder's cache, policy and strategy
        (batch-invariant: one call per row, the call it gets alone)."""
        if self.invariant and len(rows) > 1:
            return _joined([self._step_rows([r], tokens[j:j + 1], [p], **options)
                            for j, (r, p) in enumerate(zip(rows, positions))])
        return decode_step(self.lm, self.plan, self.cache, rows, tokens, positions, kv=self.kv,
                           ride=rides_along(self.kv, len(rows), self.regroup), pending=self.pending,
                           one_by_one=self.invariant, **options)

    first_token_checks = True  # the first token's exits are checked (speculative: it is the full model's)

    def _first_tokens(self, rows: list[int]) -> StepOut:
        """The first token of ``rows`` from their prefill states (:func:`decode_step` with ``given``)."""
        if self.invariant and len(rows) > 1:
            return _joined([self._first_tokens([r]) for r in rows])
        given = torch.cat([self.rows[r].first for r in rows], dim=1)  # (K + 1, b, 1, D)
        for r in rows:
            self.rows[r].first = None
        return decode_step(self.lm, self.plan, self.cache, rows, None, [self.rows[r].position for r in rows],
                           kv=self.kv, given=given, check=self.first_token_checks,
                           record_confidence=self.first_token_checks)

    def step(self) -> list[tuple[int, TokenRecord, bool]]:
        """One token for every active row: ``[(row, record, finished), ...]`` in row order of
        :attr:`active`. A row that finished leaves :attr:`active` (its slot stays taken until
        :meth:`release`, so that :meth:`result` can read it)."""
        active = list(self.active)
        if not active:
            return []
        fresh = [r for r in active if self.rows[r].first is not None]
        going = [r for r in active if self.rows[r].first is None]
        outs: dict[int, tuple] = {}
        with torch.inference_mode():
            for rows, first in ((fresh, True), (going, False)):
                if not rows:
                    continue
                if first:
                    out = self._first_tokens(rows)
                else:
                    ids = torch.tensor([[self.rows[r].next_token] for r in rows], device=self.lm.device)
                    out = self._step_rows(rows, ids, [self.rows[r].position for r in rows])
                picks = self._pick(out.logits, rows)
                for j, r in enumerate(rows):
                    outs[r] = (picks[j], out.exit_layers[j], out.confidences[j], out.costs[j])
        now = time.perf_counter()
        return [(r, *self._emit(r, *outs[r], now=now)) for r in active]

    def run(self, on_token: Callable[[int, TokenRecord], None] | None = None) -> Iterator[tuple[int, TokenRecord]]:
        """Prefill the rows given at construction, then one :meth:`step` per token until every row has
        finished; yields ``(row, TokenRecord)``."""
        start = time.perf_counter()
        fresh, self._fresh = self._fresh, []
        for r in fresh:
            self.rows[r].started = start
        with torch.inference_mode():
            self._prefill(fresh)
        self._activate(fresh)
        while self.active:
            for r, record, _ in self.step():
                if on_token is not None:
                    on_token(r, record)
                yield r, record
            if self.after_step is not None:
                self.after_step(self)

    def result(self, r: int, reference_tokens: int | None = None) -> GenerationResult:
        """Row ``r``'s sequence so far with its cost (``reference_tokens``: see
        :func:`lite.decoding.cost.sequence_cost`)."""
        row = self.rows[r]
        shape = ModelShape.from_config(self.lm.config, exit_kv=len(self.lm.exit_kv_layers))
        cost = sequence_cost(shape, len(row.prompt), row.costs, row.seconds,
                             reference_tokens)
        return GenerationResult(
            prompt_ids=list(row.prompt), token_ids=[t.id for t in row.records], text=row.text.text,
            tokens=list(row.records), num_layers=self.lm.num_layers, finish_reason=row.finish_reason,
            seconds=row.seconds, layer_cost_improvement=cost.layer_cost_improvement,
            compute_cost_improvement=cost.compute_cost_improvement, cost=cost,
        )

    def results(self) -> list[GenerationResult]:
        """Every row's sequence with its cost, in row order."""
        return [self.result(r) for r in range(len(self.rows))]
