"""Evaluation: cost and quality of early exit against the full model on the paper's test sets.

Modules: :mod:`.run` (:func:`evaluate`, the ``lite eval`` verb: resumable records per prompt),
:mod:`.testsets` (the four test sets and user files), :mod:`.metrics` (ROUGE-L, similarity, agreement, the
bootstrap over prompts), :mod:`.judge` (an optional LLM judge), :mod:`.report` (report.md, report.json and
plots), :mod:`.comparison` and :mod:`.comparison_report` (``lite report``: several eval folders side by side),
:mod:`.quality` (``lite calibrate --quality-bar``: the default policy chosen by decoded answers).
"""

from .run import RECORDS, EvalConfig, EvalError, EvalResult, evaluate

__all__ = ["RECORDS", "EvalConfig", "EvalError", "EvalResult", "evaluate"]
