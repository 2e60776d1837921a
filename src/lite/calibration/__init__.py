"""Calibration: per-layer exit thresholds and the learned exit gate, from held-out data.

Modules: :mod:`.scoring` (the one teacher-forced scorer of exits: agreement with the final layer, confidences,
cross-entropy and KL at answer positions), :mod:`.calibrate` (collect per-layer statistics by running the model,
select, save into ``lite_config.json``), :mod:`.thresholds` (the selection rules, pure functions of the
statistics), :mod:`.ceiling` (the oracle saving and each rule's frontier). Built on :mod:`lite.decoding` and
:mod:`lite.training` (its data readers and :func:`lite.training.own_answers.own_answers`).
"""

from .calibrate import (
    CalibrationData,
    CalibrationResult,
    calibration_layers,
    calibration_sequences,
    cascade_prices,
    check_options,
    collect,
    collect_sequences,
    drop_training_rows,
    save_calibration,
    select,
)
from .scoring import ExitScores, answer_sequences, reference_sequences, score_sequences

__all__ = ["CalibrationData", "CalibrationResult", "ExitScores", "answer_sequences", "calibration_layers",
           "calibration_sequences", "cascade_prices", "check_options", "collect", "collect_sequences",
           "drop_training_rows", "reference_sequences", "save_calibration", "score_sequences", "select"]
