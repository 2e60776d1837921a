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
   recompute machinery (:meth:`Decoder._block`) pushes the pending drafted positions through the blocks
   they skipped, in the same batched call per block. No block runs twice for the same position: the
   blocks below a draft's exit ran during drafting and cached their K/V; the blocks above it run once, in
   the verify pass, from the kept exit state. The head then runs once over all d + 1 layer-L states.
3. **Accept.** Row i of those logits is the full model's next-token distribution after position P + i,
   computed from an exact cache. Greedy: drafts are accepted while they equal the full model's argmax;
   the first disagreement is replaced by the full model's token, and when all d agree the full model's
   token after the last draft comes for free, so a round emits between 1 and d + 1 tokens. The cache is
   rolled back (:meth:`LayerCache.truncate`) to the positions that hold accepted tokens, so after every
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
import time
from collections.abc import Callable, Iterator

import torch

from ..model.adapter import LiteModel
from .cost import TokenCost
from .draft_vocab import shortlist_head
from .engine import Decoder, ExitPolicy, GenerationSettings, TokenRecord


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


def merge_costs(into: TokenCost, other: TokenCost) -> None:
    """Add the work of step ``other`` (at another position) to ``into``: its own blocks become
    ``other_blocks`` of ``into``; every other count adds up."""
    into.other_blocks += other.blocks_run + other.other_blocks
    into.other_context += other.blocks_run * (other.position + 1) + other.other_context
    for name in ("head_evals", "head_checks", "cosine_checks", "gate_flops", "exit_module_flops",
                 "draft_head_rows", "kv_fills", "recomputed", "recompute_context", "drafted", "accepted"):
        setattr(into, name, getattr(into, name) + getattr(other, name))


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
    token: torch.Tensor  # 0-d long
    layer: int  # the exit it left at
    confidence: float | None
    q: torch.Tensor | None  # (V,) the draft distribution it was sampled from (sampling only)


class SpeculativeDecoder(Decoder):
    """Self-speculative decoding for one sequence (see the module docstring).

    Built by :func:`lite.decoding.make_decoder` for ``ExitPolicy(kind="speculative")``. It reuses the
    engine's cache, positions, pending states and recompute pushes (``settings.kv`` is ignored: the draft
    states are always kept and pushed, which is the verify pass). ``after_step`` is called once per round,
    after the rollback, when the cache holds exactly the positions of the accepted tokens.
    """

    def __init__(self, lm: LiteModel, prompt_ids: list[int], policy: ExitPolicy,
                 settings: GenerationSettings) -> None:
        super().__init__(lm, prompt_ids, policy, dataclasses.replace(settings, kv="recompute"))
        self.max_draft = int(policy.max_draft_tokens)
        self.stop_confidence = float(policy.draft_stop_confidence)
        self.rounds: list[tuple[int, int]] = []  # (drafted, accepted) per round
        # --draft-vocab: drafts propose from a shortlist head (the verify head stays full)
        self.draft_ids, self.draft_head = shortlist_head(lm, self.plan.draft_ids)

    # ------------------------------------------------------------------ one step of a round
    def _draft_step(self, token: torch.Tensor, pos: int, tc: TokenCost, may_draft: bool
                    ) -> tuple[torch.Tensor | None, int, float | None, torch.Tensor]:
        """Run the token at ``pos`` (1, 1) through the blocks, checking exits while ``may_draft``.

        Returns (draft logits (1, V), or (1, N) over ``self.draft_ids`` with a shortlist head, or None,
        exit layer, confidence, raw state (1, 1, D)). None means the token went through all L blocks: this
        step is the verify pass (pending drafts were pushed along).
        """
        lm, plan = self.lm, self.plan
        L = lm.num_layers
        checking = may_draft
        h = lm.embed(token)  # (1, 1, D)
        prev_state = h[0, -1]  # state_cosine: "layer 0" is the input embedding
        for layer in range(1, L + 1):
            h = self._block(layer, h, pos, tc)
            if not checking or plan.checks.get(layer) is None:
                continue
            logits, value, leave, prev_state = self._check(layer, h, tc, prev_state)  # shared with dynamic
            if leave:
                if logits is None:  # state_cosine: the head runs only once the token leaves
                    logits = self._exit_head(lm.exit_normed(h[:, -1], layer), tc, check=False)
                    tc.exit_module_flops += lm.exit_module_flops(layer)
                self.states[:, pos] = h[:, -1]  # kept for the verify pass (the recompute push)
                return logits, layer, value, h
            if value is not None and value < self.stop_confidence:
                checking = False  # hopeless: go straight to L, the verify pass
        return None, L, None, h

    def _exit_head(self, normed: torch.Tensor, tc: TokenCost, check: bool) -> torch.Tensor:
        """Every exit this decoder checks is a draft exit: with ``--draft-vocab`` the shortlist head, logits
        (..., N) over ``self.draft_ids`` (counted as ``draft_head_rows``), else the full head."""
        if self.draft_head is None:
            return super()._exit_head(normed, tc, check)
        tc.draft_head_rows += len(self.draft_ids)
        return self.draft_head(normed)

    def _pick_draft(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The draft token (0-d) and, when sampling, the full-vocabulary distribution q it came from (zero
        outside the shortlist when there is one: the rejection rule holds for any q)."""
        s = self.settings
        logits = logits.reshape(-1)
        if s.temperature <= 0:
            best = logits.argmax()
            return (best if self.draft_ids is None else self.draft_ids[best]), None
        q = sampling_probs(logits, s.temperature, s.top_p)  # (V,) or (N,)
        if self.draft_ids is not None:
            q = torch.zeros(self.lm.vocab_size, dtype=q.dtype, device=q.device).index_copy_(0, self.draft_ids, q)
        return torch.multinomial(q, 1, generator=self.generator)[0], q

    def _accept(self, drafts: list[_Draft], full_logits: torch.Tensor) -> tuple[int, int]:
        """(accepted drafts j, the full model's token after them) from the verify logits (d + 1, V)."""
        s = self.settings
        ids = torch.stack([x.token for x in drafts]).tolist() if drafts else []
        if s.temperature <= 0:
            return accept_greedy(ids, full_logits)
        q = torch.stack([x.q for x in drafts]) if drafts else None
        p = sampling_probs(full_logits, s.temperature, s.top_p)  # (d + 1, V)
        return accept_sampled(ids, q, p, self.generator)

    def _round(self, token: torch.Tensor, pos: int, budget: int
               ) -> tuple[list[tuple[int, _Draft | None, TokenCost]], int, int]:
        """Draft from ``token`` at ``pos``, verify, accept, roll back.

        Returns ([(token id, its draft or None, its cost)] for the 1..d+1 emitted tokens, drafted, accepted).
        """
        lm = self.lm
        L = lm.num_layers
        drafts: list[_Draft] = []
        costs: list[TokenCost] = []
        x = token
        while True:
            p = pos + len(drafts)
            tc = TokenCost(position=p)
            may_draft = len(drafts) < min(self.max_draft, budget - 1)
            logits, layer, conf, h = self._draft_step(x, p, tc, may_draft)
            costs.append(tc)
            if logits is None:
                break
            y, q = self._pick_draft(logits)
            drafts.append(_Draft(y, layer, conf, q))
            x = y.view(1, 1)
        d = len(drafts)
        # the verify pass left the layer-L states of the drafted positions in self.states; one head call
        states = torch.cat([self.states[:, pos:pos + d], h], dim=1)  # (1, d + 1, D)
        full_logits = lm.exit_logits(states, L)[0]  # (d + 1, V)
        costs[-1].head_evals += d + 1
        j, z = self._accept(drafts, full_logits)
        self.cache.truncate(pos + j + 1)  # positions pos..pos+j hold accepted tokens
        emitted: list[tuple[int, _Draft | None, TokenCost]] = []
        for i in range(j):
            costs[i].exit_layer = L
            emitted.append((int(drafts[i].token), drafts[i], costs[i]))
        last = costs[j]
        for other in costs[j + 1:]:  # the steps of rejected drafts and the verify step
            merge_costs(last, other)
        last.exit_layer = L
        last.drafted, last.accepted = d, j
        emitted.append((z, None, last))
        return emitted, d, j

    # ------------------------------------------------------------------ the loop
    def run(self, on_token: Callable[[TokenRecord], None] | None = None) -> Iterator[TokenRecord]:
        """Prefill, then one round at a time; yields each emitted :class:`TokenRecord` (in bursts)."""
        start = time.perf_counter()
        with torch.inference_mode():
            self._prefill()
        token = torch.tensor([[self.prompt_ids[-1]]], device=self.lm.device)
        pos = len(self.prompt_ids) - 1
        done = 0
        L = self.lm.num_layers
        while done < self.max_steps:
            with torch.inference_mode():
                emitted, drafted, accepted = self._round(token, pos, self.max_steps - done)
            self.rounds.append((drafted, accepted))
            records, finished = [], False
            for k, (token_id, draft, tc) in enumerate(emitted):
                piece, stopped = self.text.push(token_id)
                finished = stopped or token_id in self.eos
                done += 1
                if finished:
                    self.finish_reason = "stop"
                if not stopped and (finished or done == self.max_steps):
                    piece += self.text.flush()
                records.append(TokenRecord(id=token_id, text=piece, exit_layer=L,
                                           confidence=None if draft is None else draft.confidence,
                                           draft_layer=None if draft is None else draft.layer))
                self.token_costs.append(tc)
                if finished:
                    for _, _, rest in emitted[k + 1:]:  # work after the end still counts
                        merge_costs(tc, rest)
                    self.cache.truncate(pos + k + 1)
                    break
            self.records.extend(records)
            self.seconds = time.perf_counter() - start
            if self.after_step is not None:
                self.after_step(self)
            for record in records:
                if on_token is not None:
                    on_token(record)
                yield record
            if finished:
                break
            pos += len(emitted)
            token = torch.tensor([[emitted[-1][0]]], device=self.lm.device)
        self.seconds = time.perf_counter() - start
