"""Batched early-exit decoding: B sequences at once, each row leaving the network at its own layer.

The engine of :mod:`lite.decoding.engine` for many sequences. Rows have their own prompt lengths, sampling
settings (temperature, top-p, seed), stop strings and token budgets; each row's cache positions sit at
slots 0, 1, ... of a shared :class:`lite.model.adapter.BatchCache` (no left padding), and every block call
masks what a row must not see.

One decode step over the rows still generating: block after block over the rows still inside the
network. At an exit layer, the rows whose policy says leave emit their token there, and then one of two
things happens to them (:func:`rides_along`):

* regroup (the DREX idea): the deeper blocks run on the remaining rows only, regrouped into a smaller
  batch, and the rows that left get their skipped blocks' K/V filled from their exit state (``copy``) or
  left pending (``recompute``). Nothing is computed for a row that left; what it saves is arithmetic.
* ride along (``copy``, the default for small batches): the deeper blocks keep running on every row, a row
  that left with its exit state as input, so the block writes the very K/V a fill would write and its
  output is discarded. A small batch is bound by reading the weights, so a block over 8 rows costs what it
  costs over 7; riding saves the regrouped calls' cache gathers and the fill calls.

Either way, when every row has left, the step stops there. Each row's exit decisions, tokens and cache are
the ones the batch-1 engine produces for it alone (tested), up to float rounding of batched matrix
products; so are its cost records and FLOPs, except that a block ridden along is counted as such
(``rode``) where batch 1 counts a K/V fill (it is charged as one: :mod:`lite.decoding.cost`).

Exits off, this is plain batched greedy/sampled decoding. Speculative decoding stays batch 1
(:mod:`lite.decoding.speculative`): its verify pass would need per-row rollback of a shared cache.

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from ..errors import LiteError
from ..model.adapter import LiteModel
from . import confidence as conf_mod
from .cost import ModelShape, TokenCost, sequence_cost
from .draft_vocab import shortlist_head, widen
from .engine import GenerationResult, GenerationSettings, TokenRecord, check_settings
from .policy import ExitPolicy, resolve_policy
from .sampling import TextStream, eos_ids, pick_token

RIDE_ALONG_ROWS = 16  # regroup=None: rows that left ride along in steps of at most this many rows


def rides_along(kv: str, rows: int, regroup: bool | None = None) -> bool:
    """Whether the rows that leave early during a step of ``rows`` rows ride along, or drop out (regroup).

    ``regroup`` True: the deeper blocks run on the rows still inside only (DREX), and the rows that left
    get their skipped blocks' K/V filled; False: they ride along (``copy`` only), the deeper blocks run on
    every row and write those K/V themselves; None: ride along in steps of at most :data:`RIDE_ALONG_ROWS`
    rows under ``copy``, regroup otherwise. A small batch is bound by reading the weights, not by
    arithmetic, so a block over fewer rows takes no less time, while a regrouped call gathers the rows'
    caches and the fills add calls of their own (measured in ``benchmarks/results/batch.md``); a large
    batch is bound by arithmetic, which regrouping saves.
    """
    if kv != "copy":
        return False
    return rows <= RIDE_ALONG_ROWS if regroup is None else not regroup


class BatchDecoder:
    """The decode-time state of B sequences: one cache, per-row positions, texts, costs.

    Two ways to use it:

    * a fixed batch: ``BatchDecoder(lm, prompts, policy, settings)`` then :meth:`run` (what
      :func:`lite.decoding.generate_batch` and :func:`lite.decoding.stream_batch` do);
    * continuous batching (``lite serve``): ``BatchDecoder.open(lm, policy, kv)``, then :meth:`add` rows at
      any token boundary, :meth:`step` once per token for every row still generating, :meth:`result` and
      :meth:`release` a row when it has finished (or :meth:`release` it early to cancel it). A released
      row's slot is reused by the next :meth:`add`; the cache grows when a row needs more slots or room.

    The class is public for tests and tools that look at the cache between steps (``after_step(self)``
    after every step of :meth:`run`).
    """

    def __init__(self, lm: LiteModel, prompts: list[list[int]], policy: ExitPolicy,
                 settings: GenerationSettings | list[GenerationSettings], regroup: bool | None = None) -> None:
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
        self._open(lm, policy, per_row[0].kv, regroup)
        self._reserve(len(prompts), max(self._need(ids, s) for ids, s in zip(prompts, per_row)))
        self._fresh = [self._admit(ids, s) for ids, s in zip(prompts, per_row)]  # prefilled by run()

    @classmethod
    def open(cls, lm: LiteModel, policy: ExitPolicy, kv: str = "copy", regroup: bool | None = None) -> BatchDecoder:
        """An empty decoder for continuous batching: rows come with :meth:`add` and go with :meth:`release`."""
        decoder = cls.__new__(cls)
        decoder._open(lm, policy, kv, regroup)
        decoder._fresh = []
        return decoder

    def _open(self, lm: LiteModel, policy: ExitPolicy, kv: str, regroup: bool | None) -> None:
        if policy.kind == "speculative":
            raise LiteError("speculative decoding runs one sequence at a time: use batch size 1 for it")
        if regroup is False and kv != "copy":
            raise LiteError(f"rows ride along with --kv copy only (a fill's K/V), not --kv {kv}: "
                            f"use regroup=True or None with it")
        self.regroup = regroup
        self.lm = lm
        self.plan = resolve_policy(lm, policy)
        # an exit vocabulary: the exits below L read the head over these ids only (see Decoder._exit_head)
        self.check_ids, self.check_head = shortlist_head(lm, self.plan.check_ids)
        self.kv = kv
        self.eos = eos_ids(lm.tokenizer, getattr(lm.model, "generation_config", None))
        self.cache = lm.new_batch_cache(0, 0)
        # recompute: latest raw hidden state of every position of every row
        self.states = (torch.zeros(0, 0, lm.hidden_size, dtype=lm.dtype, device=lm.device)
                       if kv == "recompute" else None)
        self.prompts: list[list[int]] = []
        self.settings: list[GenerationSettings] = []
        self.max_steps: list[int] = []
        self.generators: list[torch.Generator | None] = []
        self.texts: list[TextStream] = []
        self.token_costs: list[list[TokenCost]] = []
        self.records: list[list[TokenRecord]] = []
        self.finish_reasons: list[str] = []
        self.seconds: list[float] = []
        self._started: list[float] = []
        self._free: list[int] = []  # released slots, reused by the next add
        self.active: list[int] = []  # rows still generating, in admission order
        self._next_token: dict[int, int] = {}
        self._position: dict[int, int] = {}
        self.after_step: Callable[[BatchDecoder], None] | None = None

    # ------------------------------------------------------------------ rows in and out
    def _max_steps(self, ids: list[int], s: GenerationSettings) -> int:
        """Tokens a row may generate: its budget, cut where the context ends."""
        return min(s.max_new_tokens, self.lm.max_context - (len(ids) - 1))

    def _need(self, ids: list[int], s: GenerationSettings) -> int:
        """Cache slots a row needs: its prompt but the last token, then one per generated token."""
        return len(ids) - 1 + self._max_steps(ids, s)

    def _reserve(self, rows: int, length: int) -> None:
        """Grow the cache (and the recompute states) to at least ``rows`` rows of ``length`` slots."""
        c = self.cache
        if rows <= c.batch and length <= c.max_len:
            return
        new_len = c.max_len if length <= c.max_len else max(length, min(2 * c.max_len, self.lm.max_context))
        self.cache.grow(max(rows, c.batch), new_len)
        if self.states is not None:
            old = self.states
            self.states = torch.zeros(self.cache.batch, self.cache.max_len, self.lm.hidden_size,
                                      dtype=old.dtype, device=old.device)
            self.states[:old.shape[0], :old.shape[1]] = old

    def _admit(self, ids: list[int], s: GenerationSettings) -> int:
        """Give a checked row a slot (a released one, else a new one) and fresh per-row state."""
        row = self._free.pop(0) if self._free else len(self.prompts)
        self._reserve(row + 1, self._need(ids, s))
        g = None
        if s.temperature > 0:
            g = torch.Generator(device=self.lm.device)
            g.manual_seed(s.seed if s.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        fields = dict(prompts=[int(i) for i in ids], settings=s, generators=g,
                      max_steps=self._max_steps(ids, s),
                      texts=TextStream(self.lm.tokenizer, s.stop), token_costs=[], records=[],
                      finish_reasons="length", seconds=0.0, _started=time.perf_counter())
        for name, value in fields.items():
            column = getattr(self, name)
            if row == len(column):
                column.append(value)
            else:
                column[row] = value
        for block in range(self.lm.num_layers):
            self.cache.lengths[block][row] = 0
        return row

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
        rows = [self._admit(ids, s) for ids, s in zip(prompts, settings)]  # each row's clock starts here
        with torch.inference_mode():
            self._prefill(rows)
        self._activate(rows)
        return rows

    def _activate(self, rows: list[int]) -> None:
        for r in rows:
            if self.max_steps[r] > 0:
                self.active.append(r)
                self._next_token[r] = self.prompts[r][-1]
                self._position[r] = len(self.prompts[r]) - 1

    def release(self, row: int) -> None:
        """Free ``row``'s slot: a finished row after its :meth:`result` was read, or a running row that is
        cancelled (it stops at once; nothing of it is computed any more)."""
        if row in self.active:
            self.active.remove(row)
        self._next_token.pop(row, None)
        self._position.pop(row, None)
        if row not in self._free:
            self._free.append(row)

    @property
    def rows_in_use(self) -> int:
        """Rows holding a sequence (generating, or finished and not yet released)."""
        return len(self.prompts) - len(self._free)

    # ------------------------------------------------------------------ per block / per step
    def _block(self, layer: int, h: torch.Tensor, rows: list[int], positions: list[int],
               tcs: list[TokenCost]) -> torch.Tensor:
        """Block ``layer`` for the current tokens of ``rows`` (h: (b, 1, D)). Under ``recompute``, a row
        whose earlier positions skipped this block pushes them through first, in its own call (recorded in
        its cost, ``tcs`` in the order of ``rows``)."""
        lm, cache = self.lm, self.cache
        pending = [i for i, r in enumerate(rows) if cache.lengths[layer - 1][r] != positions[i]]
        if not pending:
            return lm.run_block_rows(layer, h, cache, rows)
        out = torch.empty_like(h)
        plain = [i for i in range(len(rows)) if i not in set(pending)]
        if plain:
            out[plain] = lm.run_block_rows(layer, h[plain], cache, [rows[i] for i in plain])
        for i in pending:  # pending positions start..pos-1 have been through exactly layer-1 blocks
            r, pos = rows[i], positions[i]
            start = cache.lengths[layer - 1][r]
            x = torch.cat([self.states[r:r + 1, start:pos], h[i:i + 1]], dim=1)  # (1, pos - start + 1, D)
            y = lm.run_block_rows(layer, x, cache, [r])
            self.states[r, start:pos] = y[0, :-1]
            out[i] = y[0, -1:]
            tcs[i].recomputed += pos - start
            tcs[i].recompute_context += sum(p + 1 for p in range(start, pos))
        return out

    def _check(self, layer: int, h: torch.Tensor, tcs: list[TokenCost], prev: torch.Tensor
               ) -> tuple[list[bool], torch.Tensor | None, list[float | None], torch.Tensor, torch.Tensor | None]:
        """One exit check for every row still inside (h: (b, 1, D), raw output of block ``layer``).

        As the batch-1 engine's check, per row: the gate decides from the normed state (the head runs later,
        once per step for every row, see :meth:`_step`); a head-based measure evaluates the head for every
        row; ``state_cosine`` compares with each row's previous checked state. Returns (leave per row,
        logits (b, V) or None, confidence per row, prev for the next cosine check, the normed states (b, D)
        when the gate decided). One host sync: the decisions.
        """
        lm, plan = self.lm, self.plan
        b = h.shape[0]
        if plan.gate is not None:
            normed = lm.exit_normed(h[:, -1], layer)  # (b, D)
            for tc in tcs:
                tc.gate_flops += int(plan.gate.flops(layer))
                tc.exit_module_flops += lm.exit_module_flops(layer)
            rows_fn = getattr(plan.gate, "should_exit_rows", None)  # one decision call for every row
            leave = ([bool(x) for x in rows_fn(layer, normed)] if rows_fn is not None
                     else [bool(plan.gate.should_exit(layer, normed[i])) for i in range(b)])
            return leave, None, [None] * b, prev, normed
        threshold = plan.checks[layer]
        head_fn = conf_mod.HEAD_FUNCTIONS.get(plan.confidence)
        if head_fn is not None:
            normed = lm.exit_normed(h[:, -1], layer)
            # (b, V), or (b, N) over an exit vocabulary (its reduction is charged with its rows)
            logits = lm.head_logits(normed) if self.check_head is None else self.check_head(normed)
            for tc in tcs:
                if self.check_head is None:
                    tc.head_evals += 1
                    tc.head_checks += 1
                else:
                    tc.draft_head_rows += len(self.check_ids)
                tc.exit_module_flops += lm.exit_module_flops(layer)
            values = head_fn(logits).tolist()  # the exit decisions
            return [v >= threshold for v in values], logits, values, prev, None
        values = conf_mod.state_cosine(h[:, -1], prev).tolist()  # no head
        for tc in tcs:
            tc.cosine_checks += 1
        return [v >= threshold for v in values], None, values, h[:, -1], None

    def _step(self, rows: list[int], tokens: torch.Tensor, positions: list[int]
              ) -> tuple[torch.Tensor, list[int], list[float | None], list[TokenCost]]:
        """One decode step of ``rows``: their tokens (b, 1) at ``positions`` through the blocks until each
        exits. Returns (exit logits (b, V), exit layer per row, confidence per row, cost per row).

        A row that leaves either drops out of the batch (the deeper blocks run on the rows still inside,
        regrouped) or rides along (:func:`rides_along`): the deeper blocks keep running on every row, a
        row that left with its exit state as input, so that the block writes the K/V a fill would write
        and its output is discarded. Either way its token, exit layer and cache are the same; when every
        row has left, the step stops and fills the rest."""
        lm, plan = self.lm, self.plan
        L, b = lm.num_layers, len(rows)
        tcs = [TokenCost(position=p) for p in positions]
        out_logits = torch.empty(b, lm.vocab_size, dtype=lm.dtype, device=lm.device)
        exit_layer = [plan.stop_layer] * b
        conf: list[float | None] = [None] * b
        has_logits = [False] * b
        exit_state: list[torch.Tensor | None] = [None] * b  # raw state at the exit, for K/V fill
        exit_normed: list[torch.Tensor | None] = [None] * b  # normed exit state, when the gate made it
        ride = rides_along(self.kv, b, self.regroup)
        inside = list(range(b))  # indices (into rows) of the rows still inside the network
        run = inside  # the rows the blocks run on, in the order of h: inside, or every row when riding
        left = torch.zeros(b, 1, 1, dtype=torch.bool, device=lm.device) if ride else None  # rows riding
        pinned = None  # riding: by row, the exit states of the rows that left (their input from then on)
        h = lm.embed(tokens)  # (b, 1, D)
        prev = h[:, -1]  # state_cosine: "layer 0" is the input embedding, of the rows inside
        last = 0  # the last block run this step
        for layer in range(1, plan.stop_layer + 1):
            h = self._block(layer, h, [rows[i] for i in run], [positions[i] for i in run], [tcs[i] for i in run])
            last = layer
            for i in inside:
                tcs[i].blocks_run += 1
            if pinned is not None:  # riding rows keep their exit state as the next block's input
                h = torch.where(left, pinned, h)
                for i in run:
                    tcs[i].rode += exit_layer[i] < layer
            if plan.checks.get(layer) is None:
                continue
            h_in = h if len(run) == len(inside) else h[inside]
            leave, logits, values, prev, normed = self._check(layer, h_in, [tcs[i] for i in inside], prev)
            if not any(leave):
                continue
            stay = [j for j, go in enumerate(leave) if not go]
            for j, go in enumerate(leave):
                if go:
                    i = inside[j]
                    exit_layer[i], conf[i], exit_state[i] = layer, values[j], h_in[j:j + 1]
                    if logits is not None:
                        out_logits[i], has_logits[i] = self._widen(logits[j]), True
                    elif normed is not None:
                        exit_normed[i] = normed[j]
                    if ride:
                        left[i] = True
            prev = prev[stay]
            if ride:
                pinned = h if pinned is None else torch.where(left, h, pinned)
                inside = [inside[j] for j in stay]
            else:
                inside = run = [inside[j] for j in stay]
                h = h[stay]
            if not inside:
                break
        for j, i in enumerate(inside):  # the rows that reached the stop layer
            k = i if ride else j
            exit_state[i] = h[k:k + 1]
        missing = [i for i in range(b) if not has_logits[i]]
        if missing:  # gate exits, static:K, the rows that ran to L, state-cosine exits: the head runs now,
            # once for all of them (the head's weights are read once per step, not once per exit layer)
            for k in sorted({exit_layer[i] for i in missing}):
                group = [i for i in missing if exit_layer[i] == k and exit_normed[i] is None]
                if group:
                    normed_k = lm.exit_normed(torch.cat([exit_state[i] for i in group])[:, -1], k)  # (g, D)
                    for i, row in zip(group, normed_k):
                        exit_normed[i] = row
                        tcs[i].exit_module_flops += lm.exit_module_flops(k)
            # with an exit vocabulary, the rows that left below L read its head (and record their
            # confidence over it); the rows at L (or static:K) the full head
            short = [i for i in missing if self.check_head is not None and exit_layer[i] < L]
            full = [i for i in missing if i not in set(short)]
            if short:
                sub = self.check_head(torch.stack([exit_normed[i] for i in short]))  # (s, N)
                head_fn = conf_mod.HEAD_FUNCTIONS.get(plan.confidence) or conf_mod.max_prob
                values = head_fn(sub).tolist() if plan.confidence != "state_cosine" else [None] * len(short)
                out_logits[short] = self._widen(sub)
                for j, i in enumerate(short):
                    tcs[i].draft_head_rows += len(self.check_ids)
                    if conf[i] is None and values[j] is not None:
                        conf[i] = values[j]
            if full:
                out_logits[full] = lm.head_logits(torch.stack([exit_normed[i] for i in full]))
            for i in full:
                tcs[i].head_evals += 1
        if plan.kind != "none":
            self._record_confidence(conf, out_logits, exit_layer, tcs, inside, h, prev, ride)
        for i, tc in enumerate(tcs):
            tc.exit_layer = exit_layer[i]
        if self.kv == "copy":  # fill the blocks no row ran for its position, from its exit state, by layer
            done = [max(exit_layer[i], last) if ride else exit_layer[i] for i in range(b)]
            for layer in range(min(done) + 1, L + 1):
                group = [i for i in range(b) if done[i] < layer]
                lm.fill_kv_rows(layer, torch.cat([exit_state[i] for i in group]), self.cache,
                                [rows[i] for i in group])
                for i in group:
                    tcs[i].kv_fills += 1
        else:
            for i in range(b):
                if exit_layer[i] < L:
                    self.states[rows[i], positions[i]] = exit_state[i][0, -1]
        return out_logits, exit_layer, conf, tcs

    def _widen(self, logits: torch.Tensor) -> torch.Tensor:
        """Exit-vocabulary logits (..., N) as (..., V), -inf outside it; full-head logits pass through."""
        return widen(logits, self.check_ids, self.lm.vocab_size)

    def _record_confidence(self, conf: list[float | None], logits: torch.Tensor, exit_layer: list[int],
                           tcs: list[TokenCost], inside: list[int], h: torch.Tensor, prev: torch.Tensor,
                           ride: bool) -> None:
        """The exit's confidence of every row whose check did not record one (the gate's exits, static:K,
        the rows that ran to L), in one reduction over their logits, as the batch-1 engine records it;
        under ``state_cosine``, the rows that ran to L only (``inside``, ``prev``: the rows still inside and
        their last checked states; ``h``: the last block's output, by row when ``ride``)."""
        measure, L = self.plan.confidence, self.lm.num_layers
        if measure == "state_cosine":
            if self.plan.gate is None:  # rows that ran to L: their final state against their last check
                for j, i in enumerate(inside):
                    if exit_layer[i] == L:
                        conf[i] = float(conf_mod.state_cosine(h[i if ride else j, -1], prev[j]))
                        tcs[i].cosine_checks += 1
            return
        todo = [i for i in range(len(conf)) if conf[i] is None]
        if not todo:
            return
        head_fn = conf_mod.HEAD_FUNCTIONS.get(measure) or conf_mod.max_prob
        for i, value in zip(todo, head_fn(logits[todo]).tolist()):
            conf[i] = value
            tcs[i].head_checks += 1

    def _prefill(self, rows: list[int]) -> None:
        """All L blocks over the first n - 1 prompt positions of ``rows`` (fresh rows, empty cache),
        right-padded into one batch call per block (padded positions write slots that the row overwrites
        later and that its masks hide)."""
        lm = self.lm
        lengths = {r: len(self.prompts[r]) - 1 for r in rows}
        rows = [r for r in rows if lengths[r] > 0]
        if not rows:
            return
        width = max(lengths[r] for r in rows)
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=lm.device)
        for j, r in enumerate(rows):
            ids[j, :lengths[r]] = torch.tensor(self.prompts[r][:-1], device=lm.device)
        h = lm.embed(ids)  # (b, width, D)
        for layer in range(1, lm.num_layers + 1):
            h = lm.run_block_rows(layer, h, self.cache, rows)
        for block in range(lm.num_layers):
            for r in rows:
                self.cache.lengths[block][r] = lengths[r]

    # ------------------------------------------------------------------ the loop
    def run(self, on_token: Callable[[int, TokenRecord], None] | None = None) -> Iterator[tuple[int, TokenRecord]]:
        """Prefill the rows given at construction, then one :meth:`step` per token until every row has
        finished; yields ``(row, TokenRecord)``."""
        start = time.perf_counter()
        fresh, self._fresh = self._fresh, []
        for r in fresh:
            self._started[r] = start
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

    def step(self) -> list[tuple[int, TokenRecord, bool]]:
        """One token for every active row: ``[(row, record, finished), ...]`` in row order of
        :attr:`active`. A row that finished leaves :attr:`active` (its slot stays taken until
        :meth:`release`, so that :meth:`result` can read it)."""
        active = list(self.active)
        if not active:
            return []
        ids = torch.tensor([[self._next_token[r]] for r in active], device=self.lm.device)
        with torch.inference_mode():
            logits, exits, confs, tcs = self._step(active, ids, [self._position[r] for r in active])
            picks = [pick_token(logits[j], self.settings[r].temperature, self.settings[r].top_p,
                                self.generators[r]) for j, r in enumerate(active)]
        now = time.perf_counter()
        out = []
        for j, r in enumerate(active):
            token_id = int(picks[j])
            self.token_costs[r].append(tcs[j])
            piece, stopped = self.texts[r].push(token_id)
            done = stopped or token_id in self.eos
            if done:
                self.finish_reasons[r] = "stop"
            last = len(self.records[r]) + 1 >= self.max_steps[r]
            if not stopped and (done or last):
                piece += self.texts[r].flush()
            record = TokenRecord(id=token_id, text=piece, exit_layer=exits[j], confidence=confs[j])
            self.records[r].append(record)
            self.seconds[r] = now - self._started[r]
            finished = done or last
            if finished:
                self.active.remove(r)
                self._next_token.pop(r)
                self._position.pop(r)
            else:
                self._next_token[r] = token_id
                self._position[r] += 1
            out.append((r, record, finished))
        return out

    def result(self, r: int) -> GenerationResult:
        """Row ``r``'s sequence so far with its cost (the batch-1 engine's record for it once finished)."""
        shape = ModelShape.from_config(self.lm.config)
        prompt, records = self.prompts[r], self.records[r]
        cost = sequence_cost(shape, len(prompt), self.token_costs[r], self.seconds[r])
        return GenerationResult(
            prompt_ids=list(prompt), token_ids=[t.id for t in records], text=self.texts[r].text,
            tokens=list(records), num_layers=self.lm.num_layers, finish_reason=self.finish_reasons[r],
            seconds=self.seconds[r], layer_cost_improvement=cost.layer_cost_improvement,
            compute_cost_improvement=cost.compute_cost_improvement, cost=cost,
        )

    def results(self) -> list[GenerationResult]:
        """Every row's finished sequence with its cost (the batch-1 engine's record for it), in row order."""
        return [self.result(r) for r in range(len(self.prompts))]
