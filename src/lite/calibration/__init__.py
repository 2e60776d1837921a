"""Calibration: per-layer exit thresholds and the learned exit gate, from held-out data.

Modules: :mod:`.calibrate` (collect per-layer statistics by running the model, select, save into
``lite_config.json``), :mod:`.thresholds` (the selection rules, pure functions of the statistics).
Built on :mod:`lite.decoding` and :mod:`lite.training.data`.
"""

from .calibrate import (
    CalibrationData,
    CalibrationResult,
    calibration_layers,
    cascade_prices,
    check_options,
    collect,
    drop_training_rows,
    save_calibration,
    select,
)

__all__ = ["CalibrationData", "CalibrationResult", "calibration_layers", "cascade_prices", "check_options", "collect",
           "drop_training_rows", "save_calibration", "select"]
