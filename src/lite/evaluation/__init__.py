"""Evaluation: cost and quality of early exit against the full model on the paper's test sets.

Modules: :mod:`.run` (:func:`evaluate`, the ``lite eval`` verb: resumable records per prompt),
:mod:`.testsets` (the four test sets and user files), :mod:`.metrics` (ROUGE-L, similarity, agreement),
:mod:`.judge` (an optional LLM judge), :mod:`.report` (report.md, report.json and plots),
:mod:`.quality` (``lite calibrate --quality-bar``: the default policy chosen by decoded answers).
"""

from .run import RECORDS, EvalConfig, EvalError, EvalResult, evaluate

__all__ = ["RECORDS", "EvalConfig", "EvalError", "EvalResult", "evaluate"]
