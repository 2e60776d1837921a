"""Sharded training (``lite train --fsdp``): Trainer's FSDP2 settings, and the one thing lite's loss does
differently under them.

Trainer (through accelerate) shards every decoder block into a unit of its own and puts the embedding,
the final norm and the LM head into another, which stays gathered from the model's forward to its
backward. lite's exit losses apply that norm and head after the forward, at response positions only; they
must use the gathered weights directly, not call the modules again: a module's FSDP hooks fire once per
forward, and entering them a second time broke the backward (a segmentation fault with torch 2.13 on
gloo). :meth:`lite.model.adapter.LiteModel.forward_exit_states` applies the norm that way; :func:`direct_head`
gives the loss a head that does the same.
"""

from __future__ import annotations

from typing import Any

import torch


def fsdp_config(lm) -> dict[str, Any]:
    """Trainer's ``fsdp_config`` for ``--fsdp``: FSDP2, full shard (parameters resharded after forward), one
    unit per decoder block (the class of the model's blocks), full state dicts in checkpoints."""
    return {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": [type(lm.blocks[0]).__name__],
            "state_dict_type": "FULL_STATE_DICT"}


def direct_head(head: torch.nn.Module) -> torch.nn.Module:
    """The LM head as a plain ``nn.Linear`` over the same weight, whose calls skip the head module's hooks:
    under FSDP2 the head's unit gathers its weight once per forward of the model and must not be entered
    again (see :meth:`lite.model.adapter.LiteModel.forward_exit_states`). Built at every step, after the
    forward, while the weight is gathered."""
    direct = torch.nn.Linear.__new__(torch.nn.Linear)
    torch.nn.Module.__init__(direct)
    direct.in_features, direct.out_features = head.in_features, head.out_features
    direct.weight, direct.bias = head.weight, head.bias
    return direct
