"""Training: LITE instruction tuning (losses at intermediate exits) on Hugging Face Trainer.

Modules: :mod:`.config` (:class:`TrainConfig`: the run, its checks, the recipe's resolution), :mod:`.data`
(rows, prompt formats, the held-out split), :mod:`.losses` (the exit losses, small pure functions),
:mod:`.exit_fit` (the closed-form start of affine exit modules), :mod:`.hf_trainer` (what lite plugs
into Hugging Face Trainer), :mod:`.trainer` (:func:`train`, the ``lite train`` verb). Built on :mod:`lite.model`.
"""

from .config import DEFAULT_LORA_TARGETS, TrainConfig, TrainError
from .trainer import TrainResult, loss_summary, train

__all__ = ["DEFAULT_LORA_TARGETS", "TrainConfig", "TrainError", "TrainResult", "loss_summary", "train"]
