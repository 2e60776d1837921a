"""How well each exit layer agrees with the final layer: the measure that decides between ways of training exits.

For one model, on sequences made of held-out prompts and the model's OWN full greedy answers (exits off),
teacher-forced once through the one scorer (:func:`lite.calibration.scoring.score_sequences`), at every
answer position (each predicting the next answer token) each exit layer k is scored against layer L:

* agreement: share of positions where exit k's argmax equals layer L's, with a 95% percentile bootstrap
  interval over prompts (:func:`lite.evaluation.metrics.bootstrap_interval`: the tokens of one answer are not
  independent, so prompts are the unit);
* KL(layer L || exit k) in nats per position (log-softmax in float32);
* cross-entropy of exit k against the answer tokens themselves (what it would have to emit).

Beside it, the teacher-forced cross-entropy of every layer on the rows' reference responses (+ EOS), whose
layer-L value is the final layer's own held-out loss (LITE must not hurt it).

The caller builds the sequences (``lite.training.own_answers.own_answers`` for the answers,
:func:`lite.calibration.scoring.answer_sequences` / :func:`~lite.calibration.scoring.reference_sequences`);
``benchmarks/exit_agreement.py`` runs it over several models on one held-out split and renders
:func:`agreement_markdown`, whose JSON ``lite report --agreement`` reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..calibration.scoring import TokenSequence, score_sequences
from .metrics import BOOTSTRAP_DRAWS, bootstrap_interval


def exit_agreement(lm, own: Sequence[TokenSequence | None], references: Sequence[TokenSequence | None]) -> dict:
    """Per-layer figures of one model (every exit layer and L).

    Args:
        lm: a loaded model (``lite.load_model``).
        own: prompt + the model's own greedy answer per prompt (``answer_sequences``); None or empty answers
            are skipped and counted.
        references: prompt + reference response (+ EOS) per row (``reference_sequences``).

    Returns:
        ``{"layers": {k: {agreement, agreement_ci95, kl_final_to_exit, ce_own_answers, ce_reference,
        positions, reference_tokens}}, "prompts", "prompts_skipped_empty_answer", "answer_tokens",
        "reference_tokens", "final_layer_reference_loss", "num_layers", "exit_layers"}``: agreement as a
        share of answer positions; losses in nats per position.
    """
    L = lm.num_layers
    layers = sorted(set(lm.exit_layers) | {L})
    scored = score_sequences(lm, own, layers=layers, losses=True)
    ref = score_sequences(lm, references, layers=layers, losses=True)
    ref_loss = ref.pooled(ref.ce)
    counts = scored.per_sequence(np.ones(scored.tokens))  # answer positions per prompt
    agreement, kl, ce = scored.agreement(), scored.pooled(scored.kl), scored.pooled(scored.ce)
    per_layer = {}
    for i, k in enumerate(layers):
        lo, hi = bootstrap_interval(scored.per_sequence(scored.agree[i]), counts)
        per_layer[str(k)] = {"agreement": agreement[k], "agreement_ci95": [lo, hi],
                             "kl_final_to_exit": kl[k], "ce_own_answers": ce[k], "ce_reference": ref_loss[k],
                             "positions": scored.tokens, "reference_tokens": ref.tokens}
    return {"num_layers": L, "exit_layers": list(lm.exit_layers), "layers": per_layer,
            "prompts": scored.sequences, "prompts_skipped_empty_answer": scored.skipped,
            "answer_tokens": scored.tokens, "reference_tokens": ref.tokens,
            "final_layer_reference_loss": ref_loss[L]}


def agreement_markdown(res: dict) -> str:
    """The tables of several models' :func:`exit_agreement` figures. ``res`` holds ``models`` ({name: figures
    plus ``seconds``}) and the run's ``rows``, ``command``, ``date``, ``torch``, ``transformers``, ``threads``,
    ``max_new_tokens``, ``heldout_from``, ``batch`` (rows decoded together for the answers) and ``made_by``."""
    lines = [f"# Exit-layer agreement with the final layer ({res['rows']} held-out prompts)", "",
             f"Command (repository root): `{res['command']}`  ",
             f"Date: {res['date']}; torch {res['torch']}, transformers {res['transformers']}; "
             f"{res['threads']} thread(s); answers of at most {res['max_new_tokens']} tokens.", "",
             f"Held-out rows: the first {res['rows']} of those recorded in the lite_config of "
             f"`{res['heldout_from']}` (rows `lite train` kept aside; no test set). Each model writes its own "
             f"greedy answer (exits off, {res['batch']} rows at a time; models over one frozen backbone, exit "
             f"modules and the plain model, share it), then prompt + answer is teacher-forced once. Agreement = "
             f"share of answer positions where exit k's argmax equals layer L's; 95% interval: percentile "
             f"bootstrap over prompts ({BOOTSTRAP_DRAWS} draws). KL(final ‖ exit k) and CE (own answers) in nats "
             f"per answer position; CE (reference) = teacher-forced on the rows' reference responses + EOS. "
             f"Produced by `{res['made_by']}` (`lite.evaluation.agreement`).", "",
             "| model | layer | agreement | 95% interval | KL(final‖exit) | CE own answers | CE reference | positions |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in res["models"].items():
        for k, r in m["layers"].items():
            lo, hi = r["agreement_ci95"]
            lines.append(f"| {name} | {k} | {r['agreement']:.3f} | {lo:.3f}–{hi:.3f} | {r['kl_final_to_exit']:.3f} "
                         f"| {r['ce_own_answers']:.3f} | {r['ce_reference']:.3f} | {r['positions']} |")
    lines += ["", "| model | final-layer reference loss (nats) | reference tokens | prompts | answer tokens | seconds |",
              "|---|---|---|---|---|---|"]
    for name, m in res["models"].items():
        lines.append(f"| {name} | {m['final_layer_reference_loss']:.3f} | {m['reference_tokens']} | {m['prompts']} "
                     f"| {m['answer_tokens']} | {m['seconds']:.0f} |")
    return "\n".join(lines) + "\n"
