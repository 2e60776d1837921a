"""Self-speculative decoding driven by the dynamic exits: early exit without any change in output.

A *round* drafts tokens with dynamic early exit and then lets the full model check them, reusing every
block the draft ran (LayerSkip's idea, with the draft depth chosen per token by the LITE exits):

1. **Draft.** Starting at position P (the last accepted token, not yet processed), each step runs its
   token through the blocks and checks the exit layers as ``dynamic`` does (:mod:`lite.decoding.confidence`,
   thresholds of the policy or ``lite_config.json``, times ``threshold_scale``; or a learned gate). A token
   that leaves at exit k is a *draft*: its raw layer-k state is kept, exactly as the ``recompute`` strategy
   keeps an exited token's state. Drafting stops when ``max_draft_tokens`` drafts are made (or the token
   budget is reached), or when a token's confidence at a checked exit falls below
   ``draft_stop_confidence`` (it checks no further exits), or when no exit lets a token leave.
2. **Verify.** The step that does not draft runs its own token through all L blocks, and on the way the
   recompute push of the one step (:func:`lite.decoding.step.decode_step`) moves the pending drafted
   positions through the blocks they skipped, in the same call per block as its own position. No block runs twice for the same position: the
   blocks below a draft's exit ran during drafting and cached their K/V; the blocks above it run once, in
   the verify pass, from the kept exit state. The head then reads all d + 1 layer-L states. By default
   (``invariant``) each verified position is its own block call and its own head call, the calls the full
   model makes for it when it decodes token by token, so the verify logits are bitwise the full model's in
   any dtype; batching the d + 1 positions into one call is faster, but a product over several rows can
   round differently from one over one row, which flips near-ties (bfloat16 on native bf16 kernels).
3. **Accept.** Row i of those logits is the full model's next-token distribution after position P + i,
   computed from an exact cache. Greedy: drafts are accepted while they equal the full model's argmax;
   the first disagreement is replaced by the full model's token, and when all d agree the full model's
   token after the last draft comes for free, so a round emits between 1 and d + 1 tokens. The cache is
   rolled back (:meth:`KVCache.truncate`) to the positions that hold accepted tokens, so after every
   round every block holds exactly the full model's K/V for the tokens so far (tests check this).

Sampling (``temperature > 0``) keeps the full model's distribution with the standard speculative
rejection rule (Leviathan et al. 2023; Chen et al. 2023). q_i is the draft exit's distribution and p_i the
full model's, both after the same transformation :func:`sampling_probs` (temperature, then top-p nucleus
renormalised: the distribution :func:`lite.decoding.sampling.pick_token` samples from), applied independently to
each. Draft y ~ q_i is accepted with probability min(1, p_i(y) / q_i(y)); the first rejected one is
replaced by a sample from the normalised positive part of p_i - q_i; when all are accepted the extra token
is sampled from p_d. Every emitted token is then distributed exactly as when sampling the full model with
the same temperature and top-p. Exit decisions use the untransformed logits, as in ``dynamic``.

Records and cost. Every emitted token is the full model's, so :class:`TokenRecord` says ``exit_layer = L``
and ``draft_layer`` = the exit that drafted it (None for the full model's own correction / extra token);
the cost's exit layer is L (layer cost improvement 0: speculation saves no layer, it batches them). The
work of a round is charged to the tokens it emits: an accepted draft carries its draft step; the round's
last token carries the verify step plus the steps of rejected drafts (``TokenCost.other_blocks``), and
the round's ``drafted`` / ``accepted`` counts. All verify-pass head evaluations are counted (d + 1).
The speed comes from batching: at batch 1 on a CPU a block over d + 1 positions costs little more than
over one (see docs/speculative.md and benchmarks/bench_speculative.py).

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

import dataclasses

import torch

from ..model.adapter import LiteModel
from .cost import TokenCost, merge_costs
from .engine import Decoder, GenerationSettings, TokenRecord
from .policy import ExitPolicy


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The distribution :func:`lite.decoding.sampling.pick_token` samples from, as probabilities.

    Softmax of ``logits / temperature``; with ``top_p < 1`` only the smallest set of most likely tokens
    whose mass reaches ``top_p`` is kept (the top token always), renormalised. Same nucleus rule as
    ``pick_token``.

    Args:
        logits: (..., V).
        temperature: > 0.
        top_p: in (0, 1].
    Returns:
        (..., V) float32 probabilities summing to 1 along the last axis.
    """
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p  # mass strictly before a token < top_p
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
    return kept / kept.sum(-1, keepdim=True)


def accept_greedy(draft_ids: list[int], full_logits: torch.Tensor) -> tuple[int, int]:
    """Greedy verification: drafts are accepted while they equal the full model's argmax.

    Args:
        draft_ids: the d drafted tokens, in order.
        full_logits: (d + 1, V) full-model logits; row i predicts the token after draft i (row 0: after the
            round's input token).
    Returns:
        (j accepted drafts, the full model's token at the first disagreement, or after all d).
    """
    target = full_logits.argmax(-1).tolist()  # the one host sync of the verify pass
    j = 0
    while j < len(draft_ids) and target[j] == draft_ids[j]:
        j += 1
    return j, int(target[j])


def accept_sampled(draft_ids: list[int], q: torch.Tensor | None, p: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[int, int]:
    """The speculative rejection rule: emitted tokens are distributed exactly as samples from ``p``.

    Draft i (sampled from ``q[i]``) is accepted with probability ``min(1, p[i, y] / q[i, y])``; the first
    rejected one is replaced by a sample from ``max(p[i] - q[i], 0)`` renormalised; when all are accepted
    the next token is sampled from ``p[d]``.

    Args:
        draft_ids: the d drafted tokens.
        q: (d, V) the distributions they were drafted from (None when d = 0).
        p: (d + 1, V) the full model's distributions (same temperature/top-p transform as ``q``).
        generator: the random source.
    Returns:
        (j accepted drafts, the token emitted after them).
    """
    d = len(draft_ids)
    if d:
        u = torch.rand(d, generator=generator, device=p.device)
        rows = torch.arange(d, device=p.device)
        y = torch.tensor(draft_ids, device=p.device)
        ok = (u * q[rows, y] < p[rows, y]).tolist()  # u < p/q, without dividing
        for i in range(d):
            if ok[i]:
                continue
            residual = (p[i] - q[i]).clamp_min(0)
            total = residual.sum()
            dist = residual / total if float(total) > 0 else p[i]
            return i, int(torch.multinomial(dist, 1, generator=generator)[0])
    return d, int(torch.multinomial(p[d], 1, generator=generator)[0])


@dataclasses.dataclass
class _Draft:
    token: int
    layer: int  # the exit it left at
    confidence: float | None
    q: torch.Tensor | None  # (V,) the draft distribution it was sampled from (sampling only)


class SpeculativeDecoder(Decoder):
    """Self-speculative decoding, one sequence at a time (see the module docstring).

    The :class:`Decoder` with a round on top of the same step (:func:`lite.decoding.step.decode_step`):
    its rows, cache, pending states and recompute pushes (``settings.kv`` is ignored: the draft states are
    always kept and pushed, which is the verify pass). :meth:`step` is one round: it returns every token
    the round emits. ``after_step`` is called once per round, after the rollback, when the cache holds
    exactly the positions of the accepted tokens.

    ``invariant`` (the default): the verify pass computes every position with the very calls the full model
    makes for it when it decodes token by token (one position per block call, the head over one position),
    so greedy output is the full model's token for token in every dtype, by construction. False batches
    the d + 1 positions into one call per block and one head call: faster where a block over several
    positions costs little more than over one, but a matrix product over several rows may round
    differently from one over one row (bfloat16 on hardware with native bf16 kernels; float32 MKL), so
    a near-tie can then go the other way: not lossless.
    """

    max_rows = 1  # the verify pass rolls back one sequence's cache
    runs = ("speculative",)
    first_token_checks = False  # the first token is the full model's, from the prefill

    def __init__(self, lm: LiteModel, prompts: list[list[int]], policy: ExitPolicy,
                 settings: GenerationSettings | list[GenerationSettings], regroup: bool | None = None,
                 invariant: bool = True) -> None:
        per_row = settings if isinstance(settings, list) else [settings] * len(prompts)
        super().__init__(lm, prompts, policy, [dataclasses.replace(s, kv="recompute") for s in per_row],
                         invariant=invariant)
        self.rounds: list[tuple[int, int]] = []  # (drafted, accepted) per round

    @classmethod
    def open(cls, lm: LiteModel, policy: ExitPolicy, kv: str = "copy", regroup: bool | None = None,
             invariant: bool = True):
        decoder = super().open(lm, policy, "recompute", invariant=invariant)
        decoder.rounds = []
        return decoder

    def add_many(self, prompts: list[list[int]], settings: list[GenerationSettings]) -> list[int]:
        return super().add_many(prompts, [dataclasses.replace(s, kv="recompute") for s in settings])

    def _pick_draft(self, logits: torch.Tensor, r: int) -> tuple[int, torch.Tensor | None]:
        """The draft token and, when sampling, the distribution q it came from (``logits`` (V,), -inf outside
        the exit vocabulary, so q is zero there: the rejection rule holds for any q)."""
        row = self.rows[r]
        s = row.settings
        if s.temperature <= 0:
            return int(logits.argmax()), None
        q = sampling_probs(logits, s.temperature, s.top_p)  # (V,)
        return int(torch.multinomial(q, 1, generator=row.generator)[0]), q

    def _accept(self, r: int, drafts: list[_Draft], full_logits: torch.Tensor) -> tuple[int, int]:
        """(accepted drafts j, the full model's token after them) from the verify logits (d + 1, V)."""
        row = self.rows[r]
        s = row.settings
        ids = [x.token for x in drafts]
        if s.temperature <= 0:
            return accept_greedy(ids, full_logits)
        q = torch.stack([x.q for x in drafts]) if drafts else None
        p = sampling_probs(full_logits, s.temperature, s.top_p)  # (d + 1, V)
        return accept_sampled(ids, q, p, row.generator)

    def _round(self, r: int) -> tuple[list[tuple[int, _Draft | None, TokenCost]], int, int]:
        """Draft from row ``r``'s next token, verify, accept, roll back.

        Returns ([(token id, its draft or None, its cost)] for the 1..d+1 emitted tokens, drafted, accepted).
        """
        lm, row = self.lm, self.rows[r]
        L = lm.num_layers
        pos, budget = row.position, row.max_steps - len(row.records)
        drafts: list[_Draft] = []
        costs: list[TokenCost] = []
        x = row.next_token
        while True:
            p = pos + len(drafts)
            may_draft = len(drafts) < min(self.policy.max_draft_tokens, budget - 1)
            out = self._step_rows([r], torch.tensor([[x]], device=lm.device), [p], check=may_draft,
                                  stop_below=self.policy.draft_stop_confidence, final_head=False)
            costs.append(out.costs[0])
            if out.exit_layers[0] == L:  # no exit let it leave: this step was the verify pass
                h = out.states  # (1, 1, D) its layer-L state
                break
            y, q = self._pick_draft(out.logits[0], r)
            drafts.append(_Draft(y, out.exit_layers[0], out.confidences[0], q))
            x = y
        d = len(drafts)
        # the verify pass left the layer-L states of the drafted positions in the pending states; one head call
        states = torch.cat([self.pending[r:r + 1, pos:pos + d], h], dim=1)  # (1, d + 1, D)
        if self.invariant:  # one position per head call, as the full model reads it token by token
            full_logits = torch.cat([lm.exit_logits(states[0, i:i + 1], L) for i in range(d + 1)])
        else:
            full_logits = lm.exit_logits(states, L)[0]  # (d + 1, V)
        costs[-1].head_evals += d + 1
        j, z = self._accept(r, drafts, full_logits)
        self.cache.truncate(r, pos + j + 1)  # positions pos..pos+j hold accepted tokens
        emitted: list[tuple[int, _Draft | None, TokenCost]] = []
        for i in range(j):
            costs[i].exit_layer = L
            emitted.append((drafts[i].token, drafts[i], costs[i]))
        last = costs[j]
        for other in costs[j + 1:]:  # the steps of rejected drafts and the verify step
            merge_costs(last, other)
        last.exit_layer = L
        last.drafted, last.accepted = d, j
        emitted.append((z, None, last))
        return emitted, d, j

    def step(self) -> list[tuple[int, TokenRecord, bool]]:
        """One round for the active row: ``[(row, record, finished), ...]`` for every token it emits (every
        token is the full model's: ``exit_layer`` L, ``draft_layer`` the exit that drafted it)."""
        if not self.active:
            return []
        (r,) = self.active
        if self.rows[r].first is not None:  # the first token: the full model's, from the prefill
            self.rounds.append((0, 0))  # a round that drafted nothing
            return super().step()
        with torch.inference_mode():
            emitted, drafted, accepted = self._round(r)
        self.rounds.append((drafted, accepted))
        start, L, out = self.rows[r].position, self.lm.num_layers, []
        for k, (token_id, draft, tc) in enumerate(emitted):
            record, finished = self._emit(r, token_id, L, None if draft is None else draft.confidence, tc,
                                          draft_layer=None if draft is None else draft.layer)
            out.append((r, record, finished))
            if finished:
                for _, _, rest in emitted[k + 1:]:  # work after the end still counts
                    merge_costs(tc, rest)
                self.cache.truncate(r, start + k + 1)
                break
        return out
