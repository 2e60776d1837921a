"""Cost accounting for early-exit decoding: what every generated token really cost, in FLOPs.

Conventions (all counts are floating-point operations, a multiply-add = 2 FLOPs, batch 1):

* A decoder block over one position at absolute position ``p`` (it attends to ``p + 1`` positions):
  attention projections q, k, v, o = ``2*D*(H*d) + 2*2*D*(H_kv*d) + 2*(H*d)*D``; attention scores and the
  weighted sum of values = ``2 * 2*H*d*(p+1)``; SwiGLU MLP (gate, up, down) = ``3 * 2*D*I``.
* The LM head for one position: ``2*D*V``. The softmax/log-sum-exp over V that a confidence check adds is
  about ``5*V`` and is counted with the head evaluation (``head_check_flops``).
* A K/V fill (``copy`` strategy) of one skipped block for one position: the k and v projections,
  ``2*2*D*(H_kv*d)``.
* A recompute of one pending position through one skipped block: a whole block at that position
  (``block_flops(p)``), counted on the token whose step does it.
* A learned gate check: whatever ``gate.flops(layer)`` reports (the engine sums it per token).
* Speculative decoding (:mod:`lite.decoding.speculative`): the verify pass is the recompute push above (counted in
  ``recomputed``) plus one head evaluation per verified position; the blocks that drafts later rejected
  ran for other positions are ``other_blocks`` (whole blocks, with their attention context).
* A state-cosine check: ``6*D`` (two norms and a dot product).
* Batched decoding, a row riding along (:mod:`lite.decoding.step`): a block run for a row that has already
  left, because other rows of its batch go on; its K/V are the ones a fill would write (its input is its
  exit state), the rest is discarded. Charged as the K/V fill it stands in for: the rest is work of the
  batch's execution, like the padded positions of a batched ``generate``, not of the token's policy, so a
  token costs the same alone and in any batch. The count is kept (``rode``), and wall-clock figures
  include whatever it cost.
* An exit module (:mod:`lite.model.exit_modules`): what ``LiteModel.exit_module_flops(layer, position)``
  reports, for every evaluation of an exit that has one (a gate check, a head check, the exit that emits).
  For an attention module that is its q and o projections, attention over ``position + 1`` positions and
  its MLP; its own K/V are separate (next item).
* The K/V write of an attention exit module for one position (``exit_kv_writes``): its k and v
  projections, priced as a K/V fill. Every token writes one at every such exit, whether it passed the
  layer (from its state there), left below it (from its exit state under ``copy``, in the fill or riding
  along) or has it recomputed later (``recompute``: counted on the token whose step pushes it). The
  prefill writes one per prompt position and exit (in ``prefill_flops``).
* Not counted, and negligible here: RMSNorms (~4*D per norm), rotary embeddings, residual adds, the
  embedding lookup, sampling. They are the same for every policy to within a few D per layer.

Decode steps only. The prefill runs all L blocks over the ``prompt_len`` prompt positions; it is identical
for every policy, is reported separately (``prefill_flops``) and is left out of the improvement figures.
Token 1 is decided from the prefill's states at the last prompt position (position ``prompt_len - 1``): its
record holds only what the policy adds there (exit checks, heads; no blocks). Step t >= 2 consumes token
t - 1 at position ``prompt_len + t - 2`` and produces token t.

The full-model reference: ``full_flops(n)`` = the first token's head plus n - 1 decode steps of all L
blocks and one head evaluation each, from the same prompt. ``compute_cost_improvement`` compares the early-exit sequence with the full model
generating ``reference_tokens`` tokens: the full model's own answer length when the caller knows it
(evaluation decodes both), so that an early-exit answer that runs longer counts against it;
when it is not known, the same number of tokens the early-exit run produced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class ModelShape:
    """The dimensions cost depends on, read from a transformers config."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    exit_kv: int = 0  # exits whose module keeps K/V of its own (attention modules): the prefill writes them too

    @classmethod
    def from_config(cls, config, exit_kv: int = 0) -> ModelShape:
        """The shape of a transformers config; ``exit_kv``: how many attention exit modules the model has
        (``len(lm.exit_kv_layers)``)."""
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(
            num_layers=int(config.num_hidden_layers), hidden=int(config.hidden_size),
            intermediate=int(config.intermediate_size), heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads), head_dim=head_dim,
            vocab=int(config.vocab_size), exit_kv=int(exit_kv),
        )

    # ------------------------------------------------------------- unit costs (FLOPs)
    def projection_flops(self) -> int:
        """q, k, v, o projections of one block for one position."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return 2 * self.hidden * q + 2 * 2 * self.hidden * kv + 2 * q * self.hidden

    def attention_flops(self, context: int) -> int:
        """Scores and weighted values of one block for one query attending to ``context`` positions."""
        return 2 * 2 * self.heads * self.head_dim * context

    def mlp_flops(self) -> int:
        """SwiGLU MLP (gate, up, down) of one block for one position."""
        return 3 * 2 * self.hidden * self.intermediate

    def block_flops(self, position: int) -> int:
        """One decoder block for one query at absolute position ``position`` (0-based; it sees position+1)."""
        return self.projection_flops() + self.attention_flops(position + 1) + self.mlp_flops()

    def head_flops(self) -> int:
        """The LM head for one position (the final norm is not counted)."""
        return 2 * self.hidden * self.vocab

    def head_check_flops(self) -> int:
        """One head evaluation plus the softmax-style reduction a confidence measure needs over V."""
        return self.head_flops() + 5 * self.vocab

    def shortlist_check_flops(self, rows: int) -> int:
        """A head over ``rows`` of its rows (an exit or draft vocabulary) with the same reduction over them."""
        return rows * (2 * self.hidden + 5)

    def kv_fill_flops(self) -> int:
        """k and v projections of one skipped block for one position (``copy`` strategy)."""
        return 2 * 2 * self.hidden * self.kv_heads * self.head_dim

    def cosine_flops(self) -> int:
        """One state-cosine check."""
        return 6 * self.hidden

    def full_step_flops(self, position: int) -> int:
        """The full model's decode step at ``position``: all L blocks and one head evaluation."""
        return self.num_layers * self.block_flops(position) + self.head_flops()

    def full_flops(self, prompt_len: int, num_tokens: int) -> int:
        """The full model generating ``num_tokens`` tokens after a prompt of ``prompt_len`` tokens (see the
        module docstring): the first token's head (its blocks ran in the prefill), then one full step per
        later token."""
        if num_tokens < 1:
            return 0
        return self.head_flops() + sum(self.full_step_flops(prompt_len - 1 + t) for t in range(1, num_tokens))

    def prefill_flops(self, prompt_len: int) -> int:
        """All L blocks over the ``prompt_len`` prompt positions (the same for every policy), and the K/V
        writes of the attention exit modules there."""
        n = max(prompt_len, 0)
        blocks = self.num_layers * sum(self.block_flops(p) for p in range(n))
        return blocks + self.exit_kv * n * self.kv_fill_flops()


@dataclass
class TokenCost:
    """The work one decode step did for one token. Filled in by a :class:`Meter`; ``flops`` by
    :func:`token_flops`.

    Attributes:
        position: absolute position of the step's input token (it attends to position + 1 positions).
        exit_layer: the layer the token left at (1..L).
        blocks_run: decoder blocks run for this token's own position (= exit_layer).
        head_evals: LM head evaluations (every checked exit with a head-based confidence, plus the one
            that produced the token when it was not already evaluated).
        head_checks: how many of ``head_evals`` also computed a confidence reduction over V.
        cosine_checks: state-cosine checks made.
        gate_flops: FLOPs reported by the learned gate for the checks it made (``gate.flops``).
        exit_module_flops: FLOPs of the exit modules run for this token (every checked or emitting exit
            below L that has one).
        draft_head_rows: vocabulary rows evaluated by exit-vocabulary heads (speculative drafts, ``--draft-vocab``, and
            exits that read an exit vocabulary, ``--exit-vocab``):
            each row is one dot product over D plus its share of the confidence reduction.
        kv_fills: skipped blocks whose K/V were filled from the exit state (``copy``).
        rode: skipped blocks run for this position while riding along in a batch (``copy``, batched
            decoding): each stands in for a K/V fill and is charged as one.
        exit_kv_writes: K/V writes of attention exit modules, one per (exit, position): this position's at
            every such exit, and pending positions' pushed along (``recompute``); each priced as a fill.
        recomputed: (block, pending position) pairs pushed through blocks they had skipped (``recompute``).
        recompute_context: sum of the attended context lengths of those pairs (for their attention cost).
        other_blocks: (block, position) pairs run for other positions and charged to this token
            (speculative: the draft steps of rejected drafts), whole blocks.
        other_context: sum of the attended context lengths of those pairs.
        drafted: speculative, on the token that closes a round: tokens drafted in that round.
        accepted: speculative, on the same token: how many of those the full model accepted.
        flops: total FLOPs of this step.
    """

    position: int
    exit_layer: int = 0
    blocks_run: int = 0
    head_evals: int = 0
    head_checks: int = 0
    cosine_checks: int = 0
    gate_flops: int = 0
    exit_module_flops: int = 0
    draft_head_rows: int = 0
    kv_fills: int = 0
    rode: int = 0
    exit_kv_writes: int = 0
    recomputed: int = 0
    recompute_context: int = 0
    other_blocks: int = 0
    other_context: int = 0
    drafted: int = 0
    accepted: int = 0
    flops: int = 0


class Meter:
    """What one decode step did, row by row: the step reports each piece of work here as it does it, and
    the meter keeps one :class:`TokenCost` per row (``tokens``, in the order of the step's rows).

    Every method takes the indices (into the step's rows) of the rows the work was done for. Nothing here
    touches a tensor: the counts are host-side integers, so metering costs no device sync.
    """

    def __init__(self, positions: list[int], module_flops: Callable[[int, int], int], gate=None) -> None:
        self.tokens = [TokenCost(position=p) for p in positions]
        self._module_flops = module_flops
        self._gate = gate

    def blocks(self, rows: Iterable[int]) -> None:
        """One decoder block ran for each row's own position."""
        for i in rows:
            self.tokens[i].blocks_run += 1

    def rode(self, rows: Iterable[int]) -> None:
        """One block ran for each row after it had left (riding along in a batch: stands in for a fill)."""
        for i in rows:
            self.tokens[i].rode += 1

    def fills(self, rows: Iterable[int]) -> None:
        """One skipped block's K/V filled from each row's exit state (``copy``)."""
        for i in rows:
            self.tokens[i].kv_fills += 1

    def exit_kv(self, rows: Iterable[int], positions: int = 1) -> None:
        """An attention exit module's K/V written for ``positions`` positions of each row."""
        for i in rows:
            self.tokens[i].exit_kv_writes += positions

    def recompute(self, row: int, start: int, stop: int) -> None:
        """Pending positions ``start..stop-1`` of ``row`` pushed through one block they had skipped."""
        tc = self.tokens[row]
        tc.recomputed += stop - start
        tc.recompute_context += sum(p + 1 for p in range(start, stop))

    def head(self, rows: Iterable[int], vocab: int | None = None, reduce: bool = False) -> None:
        """One head read per row: the full head (``vocab`` None; ``reduce``: a confidence reduction over V
        follows) or the head over an exit vocabulary of ``vocab`` ids (its reduction included)."""
        for i in rows:
            tc = self.tokens[i]
            if vocab is None:
                tc.head_evals += 1
                tc.head_checks += int(reduce)
            else:
                tc.draft_head_rows += vocab

    def reduction(self, rows: Iterable[int]) -> None:
        """A confidence reduction over the full vocabulary on logits already read."""
        for i in rows:
            self.tokens[i].head_checks += 1

    def module(self, rows: Iterable[int], layer: int) -> None:
        """The exit module of ``layer`` ran for each row, at its position (0 FLOPs without one)."""
        for i in rows:
            tc = self.tokens[i]
            tc.exit_module_flops += self._module_flops(layer, tc.position)

    def gate(self, rows: Iterable[int], layer: int) -> None:
        """The learned gate was asked at ``layer`` for each row."""
        flops = int(self._gate.flops(layer))
        for i in rows:
            self.tokens[i].gate_flops += flops

    def cosine(self, rows: Iterable[int]) -> None:
        """One state-cosine check per row."""
        for i in rows:
            self.tokens[i].cosine_checks += 1

    def exits(self, layers: list[int]) -> None:
        """The layer each row left at."""
        for tc, k in zip(self.tokens, layers):
            tc.exit_layer = k


def merge_costs(into: TokenCost, other: TokenCost) -> None:
    """Add the work of step ``other`` (at another position) to ``into``: its own blocks become
    ``other_blocks`` of ``into`` (with their attention context); every other count adds up."""
    into.other_blocks += other.blocks_run + other.other_blocks
    into.other_context += other.blocks_run * (other.position + 1) + other.other_context
    for f in fields(TokenCost):
        if f.name not in ("position", "exit_layer", "blocks_run", "other_blocks", "other_context", "flops"):
            setattr(into, f.name, getattr(into, f.name) + getattr(other, f.name))


def token_flops(shape: ModelShape, tc: TokenCost) -> int:
    """FLOPs of one decode step: its own blocks, head evaluations (with their V-reductions), cosine and
    gate checks, exit modules and their K/V writes, K/V fills (or the blocks ridden along in their place),
    and the recompute of pending positions."""
    own = tc.blocks_run * shape.block_flops(tc.position)
    heads = tc.head_evals * shape.head_flops() + tc.head_checks * 5 * shape.vocab + \
        shape.shortlist_check_flops(tc.draft_head_rows)
    fills = (tc.kv_fills + tc.rode + tc.exit_kv_writes) * shape.kv_fill_flops()  # a ride stands in for a fill
    pairs = tc.recomputed + tc.other_blocks
    recompute = pairs * (shape.projection_flops() + shape.mlp_flops()) + \
        shape.attention_flops(1) * (tc.recompute_context + tc.other_context)
    return own + heads + fills + recompute + tc.cosine_checks * shape.cosine_flops() + tc.gate_flops + \
        tc.exit_module_flops


@dataclass
class SequenceCost:
    """Cost of one generated sequence against the full model.

    Attributes:
        tokens: per-step costs, in order.
        num_layers: L.
        prompt_len: prompt tokens.
        flops: FLOPs of all decode steps of the early-exit run (everything in :func:`token_flops`).
        full_flops: FLOPs of the full model generating ``reference_tokens`` tokens from the same prompt.
        reference_tokens: the length the full model is charged for (its own answer length when known).
        prefill_flops: FLOPs of the shared prefill (not in either side of the improvements).
        layer_cost_improvement: ``1 - mean(exit layer) / L`` (the paper's figure).
        compute_cost_improvement: ``1 - flops / full_flops``.
        seconds: measured wall-clock seconds of the whole generation (prefill included).
        head_evals, kv_fills, rode, exit_kv_writes, recomputed: totals of the per-token counts.
        drafted, accepted, rejected: speculative decoding totals (accepted + rejected = drafted).
        acceptance_by_position: speculative, entry i = accepted / drafted among the rounds that drafted an
            (i+1)-th token (greedy: the chance the full model agrees that far); empty otherwise.
    """

    tokens: list[TokenCost]
    num_layers: int
    prompt_len: int
    flops: int
    full_flops: int
    reference_tokens: int
    prefill_flops: int
    layer_cost_improvement: float
    compute_cost_improvement: float
    seconds: float = 0.0
    head_evals: int = field(default=0)
    kv_fills: int = field(default=0)
    rode: int = field(default=0)
    exit_kv_writes: int = field(default=0)
    recomputed: int = field(default=0)
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0
    acceptance_by_position: list[float] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / drafted, or None when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else None

    def improvement_against(self, shape: ModelShape, reference_tokens: int) -> float:
        """Compute cost improvement against the full model generating ``reference_tokens`` tokens."""
        full = shape.full_flops(self.prompt_len, reference_tokens)
        return 1.0 - self.flops / full if full else 0.0


def layer_cost_improvement(exit_layers: list[int], num_layers: int) -> float:
    """``1 - mean(exit layer) / L``; 0 for an empty sequence."""
    if not exit_layers:
        return 0.0
    return 1.0 - sum(exit_layers) / (len(exit_layers) * num_layers)


def acceptance_by_position(tokens: list[TokenCost]) -> list[float]:
    """Per draft position i (0-based): the accepted fraction of the (i+1)-th drafted tokens over the
    speculative rounds (each round's counts sit on the token that closes it)."""
    rounds = [(tc.drafted, tc.accepted) for tc in tokens if tc.drafted]
    depth = max((d for d, _ in rounds), default=0)
    out = []
    for i in range(depth):
        drafted = sum(1 for d, _ in rounds if d > i)
        out.append(sum(1 for _, a in rounds if a > i) / drafted)
    return out


def sequence_cost(shape: ModelShape, prompt_len: int, tokens: list[TokenCost], seconds: float = 0.0,
                  reference_tokens: int | None = None) -> SequenceCost:
    """Total a sequence's per-step costs and compare them with the full model.

    Args:
        reference_tokens: the full model's own answer length for this prompt, when known; None charges the
            full model for the same number of tokens as this run.
    """
    for tc in tokens:
        tc.flops = token_flops(shape, tc)
    ref = len(tokens) if reference_tokens is None else int(reference_tokens)
    flops = sum(tc.flops for tc in tokens)
    full = shape.full_flops(prompt_len, ref)
    return SequenceCost(
        tokens=tokens, num_layers=shape.num_layers, prompt_len=prompt_len, flops=flops, full_flops=full,
        reference_tokens=ref, prefill_flops=shape.prefill_flops(prompt_len),
        layer_cost_improvement=layer_cost_improvement([tc.exit_layer for tc in tokens], shape.num_layers),
        compute_cost_improvement=(1.0 - flops / full) if full else 0.0, seconds=seconds,
        head_evals=sum(tc.head_evals for tc in tokens), kv_fills=sum(tc.kv_fills for tc in tokens),
        rode=sum(tc.rode for tc in tokens), exit_kv_writes=sum(tc.exit_kv_writes for tc in tokens),
        recomputed=sum(tc.recomputed for tc in tokens),
        drafted=sum(tc.drafted for tc in tokens), accepted=sum(tc.accepted for tc in tokens),
        rejected=sum(tc.drafted - tc.accepted for tc in tokens), acceptance_by_position=acceptance_by_position(tokens),
    )


# ------------------------------------------------------------------ pricing a step of B rows (wall-clock)
# FLOPs count the work of each token, the same alone and in any batch; what a batch of B rows waits for is
# another matter. A decode step at small batch is bound by reading the weights: a block over b rows costs
# about one block over one row plus a little per row, and the step lasts until its deepest row leaves. The
# functions below price one step of B rows in those terms ("blocks of one row"), for the decision of whether
# exits pay at a batch size (``--exit auto``, :func:`lite.decoding.spec.default_exit`).

ROW_COST = 0.095
"""A block over b rows costs ``1 + ROW_COST * (b - 1)`` blocks over one row: lite's engine with exits off ran
4.8x the tokens per second of batch 1 at batch 8 (1.67 blocks of one row for a block over 8) and 7.3x at 16
(2.20 for 16), float32 on a 2-core x86 CPU. A GPU at small batch is more weight-bound still (smaller)."""

CHECK_OVERHEAD = 0.15
"""What one exit check costs beyond its FLOPs, in blocks of one row: the host sync of its decision and the
Python around it. Measured by ``benchmarks/bench_check_cost.py`` (a gate that checks every exit and lets no
token out, against exits off; float32, batch 1, 2-core CPU, 2026-12-07): 0.150 blocks per check for a gate
on the raw state (state+delta: its FLOPs are nil), at 22 exits per token (the dense affine model). Was 0.05,
an estimate; the dense model then ran 0.93-0.95x lite's exits off at batch 1 where it was priced 1.17x
(``benchmarks/results/quality_bar_dense.md``). A gate on the exit state measured 0.53 blocks per check on
the shipped model against 0.24 priced (this constant plus the module's FLOPs; 0.14 with the old 0.05): the
rest is not yet priced."""


@dataclass(frozen=True)
class StepPrices:
    """What the pieces of a decode step cost, in blocks of one row (a block over one position).

    Attributes:
        head: the full LM head (a row that reaches L, or leaves without an exit vocabulary).
        exit_read: what an exit adds where a row leaves below L: its module and its head (the exit
            vocabulary's when there is one); 0 where a check already read them.
        check: one check over one row: the gate's dot products, or a head-based measure's module and head.
        kv_fill: one skipped block's K/V fill for one row.
        cascade_read: a cascade's confirm read at a check the gate let a row pass (its module and head).
        exit_kv: what every row writes each step into its attention exits' K/V (written as it passes, or
            filled), in blocks of one row; 0 without attention exit modules.
        overhead: :data:`CHECK_OVERHEAD`, per check call (not per row).
        row_cost: :data:`ROW_COST`.
    """

    head: float
    exit_read: float
    check: float
    kv_fill: float
    cascade_read: float = 0.0
    exit_kv: float = 0.0
    overhead: float = CHECK_OVERHEAD
    row_cost: float = ROW_COST

    def calls(self, rows: int, per_row: float = 1.0) -> float:
        """One call over ``rows`` rows of work ``per_row`` blocks of one row each: weights read once."""
        return 0.0 if rows <= 0 else per_row * (1.0 + self.row_cost * (rows - 1))

    def expected_calls(self, batch: int, p: float, per_row: float = 1.0) -> float:
        """E[:meth:`calls` (n, per_row)] for n ~ Binomial(batch, p), the rows of ``batch`` that each take part
        with probability ``p``: a call happens when n > 0 and costs ``per_row * ((1 - row_cost) + row_cost *
        n)`` then, so the mean is ``per_row * ((1 - row_cost) * P(n > 0) + row_cost * batch * p)``."""
        p = min(max(float(p), 0.0), 1.0)
        return per_row * ((1.0 - self.row_cost) * (1.0 - (1.0 - p) ** batch) + self.row_cost * batch * p)


def batch_step_price(exit_rates: dict[int, float], checked: Iterable[int], num_layers: int, batch: int,
                     prices: StepPrices, ride: bool, head_reads: dict[int, float] | None = None
                     ) -> tuple[float, float]:
    """Expected cost of one decode step of ``batch`` rows under early exit, and the full model's, in blocks
    of one row. ``checked``: the exits checked below L. Each row leaves at exit layer k with probability
    ``exit_rates[k]`` (the rest reach L),
    independently (real exits correlate: easy spans come together, which helps ride-along).

    * full model: every block and the head over all B rows.
    * exits: the checks at each exit over the rows still inside, plus :data:`CHECK_OVERHEAD` per check call;
      each group of rows leaving at one layer reads its exit (module and head) in one call, the rows at L the
      full head. ``ride`` (the engine's default up to its ride-along limit): the blocks run over every row
      until the deepest row leaves, so rows that left write their K/V by riding along, and the layers above
      the deepest exit get every row's K/V by a fill; regroup: each block runs over the rows still inside and
      fills the K/V of those that left.
    ``head_reads``: a cascade's confirm reads per exit, as a share of all rows (``cascade_read`` each; the
    rows that leave were read there, so ``exit_read`` then holds what leaving adds beyond it, nothing).
    Returns (early exit, full model)."""
    L, B = num_layers, batch
    rates = {int(k): float(v) for k, v in exit_rates.items() if int(k) < L and v > 0}
    checks = {int(k) for k in checked if int(k) < L}
    full = prices.calls(B, L + prices.head)
    below = 0.0  # P(a row left before the current block)
    cost = 0.0
    deepest = 0.0  # E[the deepest layer a row reaches] = sum over l of P(some row reaches l)
    for layer in range(1, L + 1):
        inside = 1.0 - below
        p_any = 1.0 - below ** B
        deepest += p_any
        if not ride:
            cost += prices.expected_calls(B, inside) + prices.expected_calls(B, below, prices.kv_fill)
        if layer in checks:
            cost += prices.expected_calls(B, inside, prices.check) + prices.overhead * p_any
            share = (head_reads or {}).get(layer, 0.0)
            if share:
                cost += prices.expected_calls(B, share, prices.cascade_read)
        rate = rates.get(layer, 0.0)
        if rate:
            cost += prices.expected_calls(B, rate, prices.exit_read)
        below += rate
    cost += prices.expected_calls(B, 1.0 - below, prices.head)
    cost += prices.calls(B, prices.exit_kv)  # attention exits: every row's K/V at every exit, each step
    if ride:
        cost += prices.calls(B, deepest) + prices.calls(B, prices.kv_fill * (L - deepest))
    return cost, full


PRICE_POSITION = 256
"""The decode position at which steps are priced (attention grows with it): calibration's expected compute
and :func:`step_prices`."""


def step_prices(lm, exit_vocab: int | None, position: int = PRICE_POSITION) -> tuple[float, float, float]:
    """The prices of ``lm``'s exits at ``position``, in blocks of one row: (a skipped block's K/V fill, one
    head read at an exit with its module (the exit vocabulary's head when ``exit_vocab``), the full head with
    its reduction at L)."""
    shape = ModelShape.from_config(lm.config)
    block = shape.block_flops(position)
    read = shape.shortlist_check_flops(exit_vocab) if exit_vocab else shape.head_check_flops()
    module = max((lm.exit_module_flops(k, position) for k in lm.exit_layers if k < lm.num_layers), default=0)
    return shape.kv_fill_flops() / block, (read + module) / block, shape.head_check_flops() / block
