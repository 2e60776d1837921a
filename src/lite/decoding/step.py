"""The one decode step: B rows, one token each, through the blocks until each row leaves.

Every decode, at any batch size and under every policy, runs :func:`decode_step`; batch 1 is B = 1, and the
speculative decoder drafts and verifies through it too. A step runs block after block over the rows still
inside the network. At a checked exit layer the rows whose policy says leave emit their token there, and
then one of two things happens to them (``ride``):

* regroup (the DREX idea): the deeper blocks run on the remaining rows only, regrouped into a smaller
  batch, and the rows that left get their skipped blocks' K/V filled from their exit state (``copy``) or
  left pending (``recompute``). Nothing is computed for a row that left.
* ride along (``copy`` only): the deeper blocks keep running on every row, a row that left with its exit
  state as input, so the block writes the very K/V a fill would write and its output is discarded. A
  small batch is bound by reading the weights, so a block over 8 rows costs what it costs over 7.

When every row has left, the step stops there. Under ``recompute`` a row whose earlier positions skipped a
block pushes them through it first, in its own call, so its cache becomes exactly the full model's.

Attention exit modules (:mod:`lite.model.exit_modules`) keep K/V of their own in the cache, one cache
layer per exit, and those follow the backbone's blocks: right after block k, every row that ran it writes
the K/V of the exit of layer k at its position (from its layer-k state, or from its exit state when it
rides along), and under ``recompute`` the pending positions it just pushed through block k write theirs
too; a row that left below k gets them filled from its exit state (``copy``) or pushed later
(``recompute``), as its skipped blocks do. So the exit of layer k always holds exactly the positions
block k holds. The module itself (query, attention over those K/V, MLP) runs only where an exit state is
read: a check that needs it, the head of a row that leaves there (:func:`_exit_state`).

Cost is counted beside the step, not inside it: the step reports each piece of work (blocks over which
rows, head reads over which vocabulary, gate and cosine checks, K/V fills, rides, recomputed positions) to
a :class:`lite.decoding.cost.Meter`, which keeps one :class:`TokenCost` per row.

The host syncs per step are the exit decisions (one per checked exit with rows inside) and nothing else.

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..model.adapter import KVCache, LiteModel
from . import confidence as conf_mod
from .cost import Meter, TokenCost
from .draft_vocab import widen
from .policy import ExitPolicy, check_policy


@dataclass
class Plan:
    """What an :class:`ExitPolicy` means on one model, worked out once per decoder (no file is read).

    Attributes:
        kind: the policy's kind ("none" records no confidences).
        num_layers: L.
        stop_layer: the deepest block run (K for static, else L).
        checked: the exit layers below L where a token may leave.
        thresholds: {layer: threshold} for threshold-decided policies (empty for a gate).
        measure: the confidence measure of the checks and of the recorded confidences.
        gate: the learned gate, or None.
        exit_ids: the exit vocabulary's ids (a tensor), or None for the full head.
        exit_head: the head over those ids (normed (..., D) -> (..., N)), or None.
    """

    kind: str
    num_layers: int
    stop_layer: int
    checked: frozenset[int]
    thresholds: dict[int, float]
    measure: str
    gate: object | None
    exit_ids: torch.Tensor | None
    exit_head: object | None

    @classmethod
    def of(cls, lm: LiteModel, policy: ExitPolicy) -> Plan:
        check_policy(lm, policy)
        ids = policy.exit_ids
        return cls(
            kind=policy.kind, num_layers=lm.num_layers, stop_layer=policy.stop_layer(lm),
            checked=frozenset(policy.check_layers(lm)), thresholds=policy.checks,
            measure="max_prob" if policy.kind == "static" else policy.confidence, gate=policy.gate,
            exit_ids=None if ids is None else torch.tensor(ids, dtype=torch.long, device=lm.device),
            exit_head=None if ids is None else lm.vocab_head(list(ids)),
        )

    @property
    def vocab(self) -> int | None:
        """Size of the exit vocabulary, or None for the full head."""
        return None if self.exit_ids is None else int(self.exit_ids.numel())


@dataclass
class StepOut:
    """What one step produced for its b rows (in the order of the step's rows).

    Attributes:
        logits: (b, V) next-token logits of every row whose head was read (exit-vocabulary rows widened, -inf
            outside it); rows left without a head (``final_head=False`` at L) hold zeros.
        exit_layers: the layer each row left at (``stop_layer`` when it did not leave early).
        confidences: each row's confidence at its exit, or None.
        states: (b, 1, D) raw state of each row at its exit layer.
        costs: the :class:`TokenCost` of each row.
    """

    logits: torch.Tensor
    exit_layers: list[int]
    confidences: list[float | None]
    states: torch.Tensor
    costs: list[TokenCost]


def _block(lm: LiteModel, layer: int, h: torch.Tensor, cache: KVCache, pending: torch.Tensor | None,
           rows: list[int], positions: list[int], run: list[int], meter: Meter,
           one_by_one: bool = False) -> torch.Tensor:
    """Block ``layer`` for the current tokens of the step's rows ``run`` (h: (b, 1, D)). Under ``recompute``
    (``pending`` = the kept raw states (B, T, D)), a row whose earlier positions skipped this block pushes
    them through first, in its own call (metered); ``one_by_one``: one call per position, in order, each
    the very call the full model makes for that position when it decodes token by token."""
    cache_rows = [rows[i] for i in run]
    late, plain = _behind(cache.lengths[layer - 1], pending, rows, positions, run, h)
    if not late:
        return lm.run_block(layer, h, cache, cache_rows)
    out = torch.empty_like(h)
    if plain:
        out[plain] = lm.run_block(layer, h[plain], cache, [cache_rows[j] for j in plain])
    for j, start, x in late:  # pending positions start..pos-1 have been through exactly layer-1 blocks
        i = run[j]
        r, pos = rows[i], positions[i]
        y = torch.cat(_by_position(lm.run_block, layer, x, cache, r, one_by_one), dim=1)
        pending[r, start:pos] = y[0, :-1]
        out[j] = y[0, -1:]
        meter.recompute(i, start, pos)
    return out


def _behind(lengths: list[int], pending: torch.Tensor | None, rows: list[int], positions: list[int], run: list[int],
            h: torch.Tensor) -> tuple[list[tuple[int, int, torch.Tensor]], list[int]]:
    """Split ``run`` (h: (b, 1, D)) by one cache layer's ``lengths``: the rows whose earlier positions it lacks
    (``recompute``), each ``(j, start, x)`` with x (1, pos - start + 1, D) its pending states from its length
    on and its own, and the indices j of the rest."""
    late = []
    for j, i in enumerate(run):
        start = lengths[rows[i]]
        if pending is not None and start != positions[i]:
            kept = pending[rows[i]:rows[i] + 1, start:positions[i]]
            late.append((j, start, torch.cat([kept, h[j:j + 1]], dim=1)))
    behind = {j for j, _, _ in late}
    return late, [j for j in range(len(run)) if j not in behind]


def _by_position(fn, layer: int, x: torch.Tensor, cache: KVCache, r: int, one_by_one: bool) -> list:
    """``fn(layer, part, cache, [r])`` over x (1, T, D): one call, or (``one_by_one``) one per position in
    order, each the call that position gets when the row decodes token by token."""
    parts = [x[:, k:k + 1] for k in range(x.shape[1])] if one_by_one else [x]
    return [fn(layer, part, cache, [r]) for part in parts]


def _exit_kv(lm: LiteModel, layer: int, h: torch.Tensor, cache: KVCache, pending: torch.Tensor | None,
             rows: list[int], positions: list[int], run: list[int], meter: Meter, one_by_one: bool) -> None:
    """The K/V of the attention exit module of ``layer``, if it has one, for every row of ``run`` at its
    position (h: (b, 1, D), their output of block ``layer``, or a riding row's exit state). Under
    ``recompute`` a row whose earlier positions were just pushed through block ``layer`` (``pending`` holds
    their layer-``layer`` states now) writes theirs first, in its own call. Metered per position."""
    index = lm.exit_kv_index(layer)
    if index is None:
        return
    late, plain = _behind(cache.lengths[index], pending, rows, positions, run, h)
    if plain:
        lm.write_exit_kv(layer, h if not late else h[plain], cache, [rows[run[j]] for j in plain])
        meter.exit_kv(run[j] for j in plain)
    for j, _, x in late:
        _by_position(lm.write_exit_kv, layer, x, cache, rows[run[j]], one_by_one)
        meter.exit_kv([run[j]], x.shape[1])


def _exit_state(lm: LiteModel, cache: KVCache, rows: list[int], meter: Meter, h: torch.Tensor, layer: int,
                idx: list[int]) -> torch.Tensor:
    """The normed exit state (c, D) of the step's rows ``idx`` (h: (c, 1, D), their raw output of block
    ``layer``): the exit module (an attention module reads its own K/V of each cache row, its position
    included), then the norm. Metered."""
    normed = lm.exit_normed(h[:, -1], layer, cache=cache, rows=[rows[i] for i in idx])
    meter.module(idx, layer)
    return normed


def _exit_head(lm: LiteModel, plan: Plan, layer: int, h: torch.Tensor, idx: list[int], meter: Meter, state,
               normed: torch.Tensor | None = None) -> torch.Tensor:
    """The exit's head (the exit vocabulary's when there is one) over the rows ``idx`` (h: (c, 1, D), their raw
    output of block ``layer``), with its reduction; ``normed``: their exit state when a check already made
    it, else the exit module runs here (``state``: :func:`_exit_state` of the step). Both metered."""
    if normed is None:
        normed = state(h, layer, idx)
    meter.head(idx, plan.vocab, reduce=True)
    return lm.head_logits(normed) if plan.exit_head is None else plan.exit_head(normed)


def _check(lm: LiteModel, plan: Plan, layer: int, h: torch.Tensor, idx: list[int], prev: torch.Tensor,
           meter: Meter, state, before: torch.Tensor | None = None
           ) -> tuple[list[bool], torch.Tensor | None, list[float | None], torch.Tensor, torch.Tensor | None]:
    """One exit check for the rows ``idx`` (h: (c, 1, D), their raw output of block ``layer``; ``before``:
    their input to it, which a gate reading the block's change needs).

    The gate decides from its features of the state (the head runs later, once per step for every row that
    left; the exit module too, unless the gate read the exit state, which is then kept for the head); a
    head-based measure reads the head (the exit vocabulary's when there is one); ``state_cosine``
    compares with each row's previous checked state and reads no head. Returns (leave per row, logits
    (c, V or N) or None, confidence per row, prev for the next cosine check, normed states (c, D) when the
    gate decided). ``state``: the step's :func:`_exit_state` (a gate that reads the exit state gets the
    engine's, the module run with its cache). One host sync: the decisions.
    """
    gate = plan.gate
    if gate is not None:
        features_fn = getattr(gate, "features_of", None)
        exit_state = features_fn is None or gate.reads_exit_state
        feats = state(h, layer, idx) if exit_state else features_fn(lm, layer, h[:, -1], before[:, -1])  # (c, F)
        meter.gate(idx, layer)
        rows_fn = getattr(gate, "should_exit_rows", None)  # one decision call for every row
        leave = ([bool(x) for x in rows_fn(layer, feats)] if rows_fn is not None
                 else [bool(gate.should_exit(layer, feats[j])) for j in range(len(idx))])
        cut = (getattr(gate, "confirm", None) or {}).get(layer)
        if cut is None or not any(leave):
            return leave, None, [None] * len(idx), prev, feats if exit_state else None
        # the cascade: where the gate lets a row out, its head decides (max-prob >= cut), read once
        passed = [j for j, go in enumerate(leave) if go]
        read = _exit_head(lm, plan, layer, h[passed], [idx[j] for j in passed], meter, state,
                          feats[passed] if exit_state else None)
        logits = read.new_zeros(len(idx), read.shape[-1])
        logits[passed] = read
        values: list[float | None] = [None] * len(idx)
        for j, v in zip(passed, conf_mod.HEAD_FUNCTIONS["max_prob"](read).tolist()):
            values[j] = v
        return [v is not None and v >= cut for v in values], logits, values, prev, None
    threshold = plan.thresholds[layer]
    head_fn = conf_mod.HEAD_FUNCTIONS.get(plan.measure)
    if head_fn is not None:
        logits = _exit_head(lm, plan, layer, h, idx, meter, state)
        values = head_fn(logits).tolist()  # the exit decisions
        return [v >= threshold for v in values], logits, values, prev, None
    values = conf_mod.state_cosine(h[:, -1], prev).tolist()  # no head
    meter.cosine(idx)
    return [v >= threshold for v in values], None, values, h[:, -1], None


def decode_step(lm: LiteModel, plan: Plan, cache: KVCache, rows: list[int], tokens: torch.Tensor | None,
                positions: list[int], *, kv: str = "copy", ride: bool = False, pending: torch.Tensor | None = None,
                check: bool = True, stop_below: float | None = None, final_head: bool = True,
                given: torch.Tensor | None = None, record_confidence: bool = True,
                one_by_one: bool = False) -> StepOut:
    """One decode step of the cache rows ``rows``: their tokens (b, 1) at ``positions`` through the blocks
    until each leaves.

    Args:
        kv: "copy" (the blocks a row skipped get K/V filled from its exit state, or written by riding along)
            or "recompute" (its exit state is kept in ``pending`` at its position; later steps push it).
        ride: rows that left ride along (``copy`` only; see the module docstring), else they regroup.
        pending: recompute: the kept raw states of every cache row, (B, T, D).
        check: check the exits (False: every row runs to the stop layer, as a speculative verify does).
        stop_below: a row whose confidence at a check is below this checks no further exits this step.
        final_head: read the full head for the rows that reach L and record their confidence (False: the
            caller reads it, over more positions, from ``states``: a speculative verify).
        given: the raw states of every layer at these positions, already computed (the prompt's last
            position, run by the prefill): ``(L + 1, b, 1, D)``, entry 0 the input embedding. No block runs
            and no K/V is written: only the exit decisions and heads, and their cost.
        record_confidence: record each row's confidence at its exit (False: a speculative first token,
            which is the full model's).
        one_by_one: recompute pushes run one position per block call (batch-invariant decoding: every
            position is computed by the call the full model makes for it token by token).
    Returns:
        The :class:`StepOut`; every piece of work is in its ``costs``.
    """
    L, b = plan.num_layers, len(rows)
    meter = Meter(positions, lm.exit_module_flops, plan.gate)
    state = partial(_exit_state, lm, cache, rows, meter)
    out_logits = torch.zeros(b, lm.vocab_size, dtype=lm.dtype, device=lm.device)
    exit_layer = [plan.stop_layer] * b
    conf: list[float | None] = [None] * b
    has_logits = [False] * b
    exit_state: list[torch.Tensor | None] = [None] * b  # raw state at the exit
    exit_normed: list[torch.Tensor | None] = [None] * b  # normed exit state, when the gate made it
    inside = list(range(b))  # indices (into rows) of the rows still inside the network
    checking = set(inside) if check else set()  # rows whose exits are still checked this step
    run = inside  # the rows the blocks run on, in the order of h: inside, or every row when riding
    left = torch.zeros(b, 1, 1, dtype=torch.bool, device=lm.device) if ride else None  # rows riding
    pinned = None  # riding: by row, the exit states of the rows that left (their input from then on)
    h = lm.embed(tokens) if given is None else given[0]  # (b, 1, D)
    prev = h[:, -1]  # state_cosine: "layer 0" is the input embedding, of the rows inside
    last = 0  # the last block run this step
    for layer in range(1, plan.stop_layer + 1):
        before = h  # block `layer`'s input, for a gate that reads the block's change
        if given is None:
            h = _block(lm, layer, h, cache, pending, rows, positions, run, meter, one_by_one)
            meter.blocks(inside)
        else:  # computed by the prefill, charged there
            h = given[layer] if len(run) == b else given[layer][run]
        last = layer
        if pinned is not None:  # riding rows keep their exit state as the next block's input
            h = torch.where(left, pinned, h)
            meter.rode(i for i in run if exit_layer[i] < layer)
        if given is None:  # the prefill wrote the exits' K/V of given positions
            _exit_kv(lm, layer, h, cache, pending, rows, positions, run, meter, one_by_one)
        if layer not in plan.checked or not checking:
            continue
        at = [j for j, i in enumerate(inside) if i in checking]  # positions in `inside` of the rows checked
        idx = [inside[j] for j in at]
        h_in = h if len(run) == len(inside) else h[inside]
        h_chk = h_in if len(at) == len(inside) else h_in[at]
        prev_chk = prev if len(at) == len(inside) else prev[at]
        before_chk = None
        if plan.gate is not None:
            before_in = before if len(run) == len(inside) else before[inside]
            before_chk = before_in if len(at) == len(inside) else before_in[at]
        leave, logits, values, prev_chk, normed = _check(lm, plan, layer, h_chk, idx, prev_chk, meter, state,
                                                         before_chk)
        if len(at) == len(inside):
            prev = prev_chk
        else:
            prev = prev.clone()
            prev[at] = prev_chk
        if stop_below is not None:  # hopeless rows go straight to the end (a speculative verify)
            for i, v, go in zip(idx, values, leave):
                if not go and v is not None and v < stop_below:
                    checking.discard(i)
        if not any(leave):
            continue
        gone = set()
        for j, go in enumerate(leave):
            if go:
                i = idx[j]
                gone.add(i)
                exit_layer[i], conf[i], exit_state[i] = layer, values[j], h_chk[j:j + 1]
                if logits is not None:
                    out_logits[i], has_logits[i] = widen(logits[j], plan.exit_ids, lm.vocab_size), True
                elif normed is not None:
                    exit_normed[i] = normed[j]
                if ride:
                    left[i] = True
        stay = [j for j, i in enumerate(inside) if i not in gone]
        prev = prev[stay]
        if ride:
            pinned = h if pinned is None else torch.where(left, h, pinned)
            inside = [inside[j] for j in stay]
        else:
            inside = run = [inside[j] for j in stay]
            h = h[stay]
        checking -= gone
        if not inside:
            break
    for j, i in enumerate(inside):  # the rows that reached the stop layer
        exit_state[i] = h[i if ride else j:(i if ride else j) + 1]
    _read_heads(lm, plan, exit_layer, exit_state, exit_normed, has_logits, conf, out_logits, meter, state, final_head)
    if plan.kind != "none" and record_confidence:
        _record_confidence(plan, conf, out_logits, exit_layer, has_logits, inside, h, prev, ride, meter,
                           cosine_at_end=check and final_head)
    meter.exits(exit_layer)
    if given is not None:
        pass  # every block already holds these positions' own K/V
    elif kv == "copy":  # fill the blocks (and exits' K/V) no row ran for its position from its exit state
        done = [max(exit_layer[i], last) if ride else exit_layer[i] for i in range(b)]
        for layer in range(min(done) + 1, L + 1):
            group = [i for i in range(b) if done[i] < layer]
            stand_in = torch.cat([exit_state[i] for i in group])
            lm.fill_kv(layer, stand_in, cache, [rows[i] for i in group])
            meter.fills(group)
            if lm.write_exit_kv(layer, stand_in, cache, [rows[i] for i in group]):
                meter.exit_kv(group)
    else:
        for i in range(b):
            if exit_layer[i] < L:
                pending[rows[i], positions[i]] = exit_state[i][0, -1]
    return StepOut(out_logits, exit_layer, conf, torch.cat(exit_state), meter.tokens)


def _read_heads(lm: LiteModel, plan: Plan, exit_layer: list[int], exit_state: list, exit_normed: list,
                has_logits: list[bool], conf: list, out_logits: torch.Tensor, meter: Meter, state,
                final_head: bool) -> None:
    """The head for every row that has no logits yet (gate exits, static:K, the rows that ran to L,
    state-cosine exits), once per step for all of them: the exit vocabulary's head for rows that left below
    L when there is one (their confidence recorded over it), the full head for the rest; the exit states
    not made yet by ``state`` (the step's :func:`_exit_state`)."""
    L = plan.num_layers
    missing = [i for i in range(len(exit_layer)) if not has_logits[i] and (final_head or exit_layer[i] < L)]
    if not missing:
        return
    for k in sorted({exit_layer[i] for i in missing}):
        group = [i for i in missing if exit_layer[i] == k and exit_normed[i] is None]
        if group:
            normed_k = state(torch.cat([exit_state[i] for i in group]), k, group)  # (g, D)
            for i, row in zip(group, normed_k):
                exit_normed[i] = row
    short = [i for i in missing if plan.exit_head is not None and exit_layer[i] < L]
    full = [i for i in missing if i not in set(short)]
    if short:
        sub = plan.exit_head(torch.stack([exit_normed[i] for i in short]))  # (s, N)
        head_fn = conf_mod.HEAD_FUNCTIONS.get(plan.measure) or conf_mod.max_prob
        values = head_fn(sub).tolist() if plan.measure != "state_cosine" else [None] * len(short)
        out_logits[short] = widen(sub, plan.exit_ids, lm.vocab_size)
        meter.head(short, plan.vocab)
        for j, i in enumerate(short):
            has_logits[i] = True
            if conf[i] is None and values[j] is not None:
                conf[i] = values[j]
    if full:
        out_logits[full] = lm.head_logits(torch.stack([exit_normed[i] for i in full]))
        meter.head(full)
        for i in full:
            has_logits[i] = True


def _record_confidence(plan: Plan, conf: list, logits: torch.Tensor, exit_layer: list[int], has_logits: list[bool],
                       inside: list[int], h: torch.Tensor, prev: torch.Tensor, ride: bool, meter: Meter,
                       cosine_at_end: bool) -> None:
    """The exit's confidence of every row whose check did not record one (the gate's exits, static:K, the
    rows that ran to L), in one reduction over their logits; under ``state_cosine`` (no gate), the rows
    that ran to L only, against their last checked state (``inside``, ``prev``: the rows still inside and
    their last checked states; ``h``: the last block's output, by row when ``ride``)."""
    L = plan.num_layers
    if plan.measure == "state_cosine" and plan.gate is None:
        if cosine_at_end:
            done = []
            for j, i in enumerate(inside):
                if exit_layer[i] == L and conf[i] is None:
                    conf[i] = float(conf_mod.state_cosine(h[i if ride else j, -1], prev[j]))
                    done.append(i)
            meter.cosine(done)
        return
    todo = [i for i in range(len(conf)) if conf[i] is None and has_logits[i]]
    if not todo:
        return
    head_fn = conf_mod.HEAD_FUNCTIONS.get(plan.measure) or conf_mod.max_prob
    for i, value in zip(todo, head_fn(logits[todo]).tolist()):
        conf[i] = value
    meter.reduction(todo)
