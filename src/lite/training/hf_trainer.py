"""What lite plugs into Hugging Face Trainer: the exit-loss Trainer, callbacks, what it trains, checkpoints.

* :func:`lite_trainer_class`: ``LiteTrainer``, a ``transformers.Trainer`` whose ``compute_loss`` runs the
  model once for its hidden states (no full-vocab logits) and applies the exit losses of
  :mod:`lite.training.losses` (CE, self-distillation, or both); per-layer losses are logged as ``loss_l<k>``
  / ``kl_l<k>``.
* callbacks: the training clock kept across resumes in each checkpoint (:func:`train_clock_callback`,
  ``TIME_FILE``), a time budget, snapshots of exit modules (which checkpoints count, and the log entries at
  each, are :mod:`lite.training.checkpoints`).
* what Trainer trains besides a plain model: :class:`FrozenBackbone` (exit modules on a frozen backbone)
  and the frozen teacher of ``--targets distill|mixed`` (:func:`make_teacher`).
* Trainer's arguments: the activation checkpointing options under the installed transformers' names.

:mod:`lite.training.trainer` (``train``) puts these together; transformers is imported only inside the
functions, so importing :mod:`lite.training` stays light.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .fsdp import direct_head
from .losses import distill_loss, distill_rows_loss, lite_loss, lite_rows_loss, response_mask


def process_rank() -> int:
    """This process's rank under torchrun (``RANK``; 0 alone): only rank 0 writes lite's files."""
    return int(os.environ.get("RANK", "0"))


def lite_trainer_class():
    """The class ``LiteTrainer`` (a ``transformers.Trainer``), built on first call so that importing
    lite.training does not import transformers. Beyond Trainer's arguments it takes ``lite_model`` (the
    LiteModel the loss runs), ``exit_weights`` ({layer: weight}), ``loss_mode``, ``chunk_size``, ``targets``,
    ``ce_weight``, ``teacher`` (:func:`make_teacher`) and ``state_cache`` (:class:`StateCache`)."""
    from transformers import Trainer

    class LiteTrainer(Trainer):
        """Trainer whose loss is the LITE loss over exit layers; logs ``loss_l<k>`` per exit."""

        # lite_loss returns a per-micro-batch mean: Trainer divides it by the accumulation steps.
        loss_is_scaled_for_ga = False

        def __init__(self, *args, lite_model, exit_weights: dict[int, float], loss_mode: str,
                     chunk_size: int, targets: str = "data", ce_weight: float = 0.5, teacher=None,
                     state_cache: StateCache | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False
            self.lite_model = lite_model
            self.exit_weights = exit_weights
            self.loss_mode = loss_mode
            self.chunk_size = chunk_size
            self.targets = targets
            self.ce_weight = ce_weight
            self.teacher = teacher  # (model, inputs) -> (B, T, D) normed teacher states; None = own layer L
            self.state_cache = state_cache  # a frozen backbone's states by sequence (exit-module runs)
            self._layer_sums: dict[str, float] = {}
            self._layer_count = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if isinstance(model, FrozenBackbone):
                return self._frozen_backbone_loss(model, inputs, return_outputs)
            labels, lm = inputs["labels"], self.lite_model
            layers = sorted(self.exit_weights)
            own_teacher = self.targets != "data" and self.teacher is None  # frozen backbone: layer L
            wanted = sorted(set(layers) | ({lm.num_layers} if own_teacher else set()))
            states = lm.forward_exit_states(inputs["input_ids"], inputs.get("attention_mask"), layers=wanted,
                                            module=model)
            exits = {k: states[k] for k in layers}
            head = direct_head(lm.lm_head) if self.is_fsdp_enabled else lm.lm_head
            parts: dict[str, Any] = {}
            if self.targets != "data":
                teacher = states[lm.num_layers].detach() if own_teacher else self.teacher(model, inputs)
                parts["kl_l"] = distill_loss(exits, teacher, labels, head, self.exit_weights,
                                             chunk_size=self.chunk_size, mode=self.loss_mode)
            if self.targets != "distill":
                parts["loss_l"] = lite_loss(exits, labels, head, self.exit_weights,
                                            chunk_size=self.chunk_size, mode=self.loss_mode)
            return self._combine(model, parts, return_outputs)

        def _frozen_backbone_loss(self, model, inputs, return_outputs):
            """Exit modules on a frozen backbone: the losses need the backbone's states at the response
            positions only (at every position of the sequence for an attention module, which reads the
            earlier ones), and those never change, so they come from ``state_cache`` once a sequence has
            been seen (the backbone then does not run for it); the modules and the head run on those rows."""
            lm, L = self.lite_model, self.lite_model.num_layers
            layers = sorted(self.exit_weights)
            wanted = sorted(set(layers) | ({L} if self.targets != "data" else set()))
            whole = {k for k in layers if lm.exit_reads_context(k)}
            raw, targets = _backbone_rows(model, inputs, wanted, self.state_cache, whole)
            exits = {k: raw[k] if k == L else _exit_rows(lm, raw[k], k, k in whole) for k in layers}
            parts: dict[str, Any] = {}
            if self.targets != "data":
                parts["kl_l"] = distill_rows_loss(exits, raw[L], lm.lm_head, self.exit_weights,
                                                  chunk_size=self.chunk_size, mode=self.loss_mode)
            if self.targets != "distill":
                parts["loss_l"] = lite_rows_loss(exits, targets, lm.lm_head, self.exit_weights,
                                                 chunk_size=self.chunk_size, mode=self.loss_mode)
            return self._combine(model, parts, return_outputs)

        def _combine(self, model, parts, return_outputs):
            """The total of the loss parts (``kl_l``: distillation, ``loss_l``: CE; mixed by ``ce_weight``),
            with their per-exit figures added to the sums that ``log`` reports."""
            if self.targets == "mixed":
                total = (1 - self.ce_weight) * parts["kl_l"].total + self.ce_weight * parts["loss_l"].total
            else:
                total = next(iter(parts.values())).total
            if model.training and all(r.num_tokens for r in parts.values()):
                for prefix, result in parts.items():
                    for k, v in result.per_layer.items():
                        key = f"{prefix}{k}"
                        self._layer_sums[key] = self._layer_sums.get(key, 0.0) + float(v)
                self._layer_count += 1
            return (total, {"parts": parts}) if return_outputs else total

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs and self._layer_count:
                for key in sorted(self._layer_sums):
                    logs[key] = round(self._layer_sums[key] / self._layer_count, 4)
                self._layer_sums, self._layer_count = {}, 0
            super().log(logs, start_time)

    return LiteTrainer


def _exit_rows(lm, raw, layer: int, whole: bool) -> torch.Tensor:
    """The normed exit states (N, D) at the response positions of a batch from the backbone's layer states
    ``raw`` (:func:`_backbone_rows`): (N, D) rows, or with ``whole`` one ``(states (n, D), response (n,))``
    per sequence, for a module that attends over the whole sequence (causal, from position 0)."""
    if not whole:
        return lm.exit_normed(raw, layer, direct=True)
    return torch.cat([lm.exit_normed(states[None], layer, direct=True, positions=response.nonzero()[:, 0])[0]
                      for states, response in raw])


def _backbone_rows(model, inputs: dict[str, torch.Tensor], layers: list[int], cache: StateCache | None,
                   whole: set[int] = frozenset()) -> tuple[dict[int, Any], torch.Tensor]:
    """The frozen backbone's states at the response positions of a batch, rows in batch order:
    ({layer: (N, D)}, targets (N,)); layer L's is already normed. A layer in ``whole`` (an attention exit
    module's) is kept at every position that predicts a token instead: one ``(states (n - 1, D), response
    (n - 1,) bool)`` per sequence, in batch order.

    Each sequence runs alone, without its padding (the batch is right-padded), so its states never depend
    on what it was batched with: the same in every epoch and after a resume, whether they come from
    ``cache`` (sequences seen before, when the batch carries ``index``) or are computed now."""
    ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
    index = inputs.get("index")
    lengths = (mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).tolist()
    no_position = torch.empty(0, dtype=torch.long, device=ids.device)
    rows = []
    for b, n in enumerate(lengths):
        key = int(index[b]) if index is not None and cache is not None else None
        row = cache.get_row(key, labels.device) if key is not None else None
        if row is None:
            out = model(input_ids=ids[b:b + 1, :n], attention_mask=None if mask is None else mask[b:b + 1, :n],
                        output_hidden_states=True, use_cache=False, logits_to_keep=no_position)
            response = response_mask(labels[b:b + 1, :n])[0]  # (n-1,): position t predicts token t+1
            states = {k: out.hidden_states[k][0, :-1] if k in whole else out.hidden_states[k][0, :-1][response]
                      for k in layers}
            if whole:
                states["response"] = response
            row = (states, labels[b, 1:n][response])
            if key is not None:
                cache.put_row(key, *row)
        rows.append(row)
    return ({k: [(r[0][k], r[0]["response"]) for r in rows] if k in whole else torch.cat([r[0][k] for r in rows])
             for k in layers}, torch.cat([r[1] for r in rows]))


TIME_FILE = "lite_train_seconds.json"  # in each checkpoint: training seconds spent up to it


def train_clock_callback(resume: str | None):
    """A callback that counts the wall seconds spent in training steps, over every resume: each checkpoint
    records the seconds up to it (``TIME_FILE``), a resumed run starts from that figure. ``seconds()``
    gives the total (the ``train_seconds`` of ``lite_config.json``, the training minutes of a recipe)."""
    import time

    from transformers import TrainerCallback

    before = 0.0
    if resume and (Path(resume) / TIME_FILE).is_file():
        try:
            before = float(json.loads((Path(resume) / TIME_FILE).read_text())["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            before = 0.0  # an unreadable clock only makes the figure smaller, never stops the run

    class TrainClock(TrainerCallback):
        def __init__(self) -> None:
            self.start: float | None = None

        def seconds(self) -> float:
            return before + (time.perf_counter() - self.start if self.start is not None else 0.0)

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir() and process_rank() == 0:
                (folder / TIME_FILE).write_text(json.dumps({"seconds": round(self.seconds(), 3),
                                                            "global_step": state.global_step}))
            return control

    return TrainClock()


def time_budget_callback(clock, max_minutes: float):
    """A callback that ends training once ``clock`` (the run's training clock, which resumes with the run)
    reaches ``max_minutes``: the step under way finishes and is logged, then the output is written as usual.
    ``stopped`` says whether the budget, rather than the planned steps, ended the run."""
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        stopped = False

        def on_step_end(self, args, state, control, **kwargs):
            if clock.seconds() >= max_minutes * 60.0 and state.global_step < state.max_steps:
                self.stopped = True
                control.should_training_stop = True
                control.should_log = True
            return control

    return TimeBudget()


SNAPSHOT_PREFIX = "step-"  # <out>.snapshots/step-000400: the exit modules after 400 steps (minutes inside)


def snapshot_folder(out: Path) -> Path:
    """Where a run's snapshots go: ``<out>.snapshots``, beside the output (it outlives the work folder)."""
    return out.with_name(out.name + ".snapshots")


def snapshot_callback(folder: Path, every_minutes: float, clock, write: Callable[[Path, int, float], None]):
    """A callback that keeps a loadable copy of the model every ``every_minutes`` of training (by ``clock``,
    the run's training clock, so resumed runs go on where they were): at the first checkpoint after each
    boundary, ``write(tmp_folder, step, seconds)`` fills a new ``folder/step-NNNNNN`` (made in one rename)."""
    from transformers import TrainerCallback

    from ..files import folder_in_place, process_prefix, sweep_dead_temporaries

    period = every_minutes * 60.0
    sweep_dead_temporaries(folder, f"{SNAPSHOT_PREFIX}*")  # snapshots a killed run was writing

    class Snapshots(TrainerCallback):
        def __init__(self) -> None:
            self.next = (math.floor(clock.seconds() / period) + 1) * period

        def on_save(self, args, state, control, **kwargs):
            seconds = clock.seconds()
            if seconds < self.next or process_rank() != 0:
                return control
            self.next = (math.floor(seconds / period) + 1) * period
            target = folder / f"{SNAPSHOT_PREFIX}{state.global_step:06d}"
            if not target.exists():
                folder.mkdir(parents=True, exist_ok=True)
                with folder_in_place(Path(tempfile.mkdtemp(prefix=process_prefix(target.name), dir=folder)),
                                     target) as tmp:
                    write(tmp, state.global_step, seconds)
            return control

    return Snapshots()


def checkpointing_args(arguments_class, enabled: bool) -> dict[str, Any]:
    """Trainer's activation (gradient) checkpointing options under the installed transformers' names:
    ``activation_checkpointing`` in recent 5.x, ``gradient_checkpointing`` (deprecated there) in 5.0."""
    import inspect

    kwargs = {"use_reentrant": False} if enabled else None
    params = inspect.signature(arguments_class.__init__).parameters
    name = "activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": kwargs}


class FrozenBackbone(torch.nn.Module):
    """What Trainer optimises and checkpoints in an exit-module run: the modules, and nothing else.

    The backbone is kept outside the module tree (so it is neither in the optimiser nor in checkpoints)
    and runs without autograd; the exit modules are applied to its hidden states afterwards
    (``LiteModel.forward_exit_states``), so gradients reach only them.
    """

    def __init__(self, modules, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.exit_modules = modules
        object.__setattr__(self, "_backbone", backbone)

    def forward(self, **kwargs):
        with torch.no_grad():
            return self._backbone(**kwargs)


class StateCache:
    """A frozen backbone's states at the response positions of each training sequence, kept in CPU memory
    (also when training on an accelerator: the rows of a batch are moved there when used). For attention
    exit modules, which read every earlier position, their layers' states are kept at every position of
    the sequence (with its response mask), a few times the memory of the response positions alone.

    In an exit-module run the backbone never changes, so what the losses read of it (the raw state of each
    exit layer below L and the normed final state, the teacher, at the positions that predict a response
    token, plus those tokens) is the same in every epoch: kept after a sequence's first use, it spares
    the backbone's forward in every later one. Each sequence's states are computed alone
    (:func:`_backbone_rows`), so the cache changes no number: a run resumed with an empty cache trains
    exactly as one that kept it.

    ``limit_bytes`` caps the memory: once full, sequences not yet kept are computed each time. For SmolLM2-135M (hidden 576), 4 exits, the
    teacher and 64-token answers, a sequence takes about 0.7 MB: the 1763 training rows, 1.3 GB.
    """

    def __init__(self, limit_bytes: int, say: Callable[[str], None] | None = None) -> None:
        self.limit_bytes = int(limit_bytes)
        self.bytes = 0
        self.full = False
        self._say = say or (lambda _msg: None)
        self._rows: dict[int, tuple[dict[int, torch.Tensor], torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def get_row(self, index: int, device: torch.device | str = "cpu"
                ) -> tuple[dict[int | str, torch.Tensor], torch.Tensor] | None:
        """Sequence ``index``'s ({layer: (n, D)}, targets (n,)) on ``device``, or None when it is not kept
        (whole-sequence layers and their "response" mask as :func:`_backbone_rows` put them)."""
        row = self._rows.get(index)
        if row is None:
            return None
        return {k: v.to(device) for k, v in row[0].items()}, row[1].to(device)

    def put_row(self, index: int, states: dict[int, torch.Tensor], targets: torch.Tensor) -> None:
        """Keep sequence ``index``'s ``states`` {layer: (n, D)} and ``targets`` (n,) at its response
        positions, unless it is kept already or the cache is full."""
        if index in self._rows or self.full:
            return
        row = ({k: v.detach().to("cpu", copy=True) for k, v in states.items()}, targets.to("cpu", copy=True))
        size = sum(t.numel() * t.element_size() for t in (*row[0].values(), row[1]))
        if self.bytes + size > self.limit_bytes:
            self.full = True
            self._say(f"the backbone-state cache is full at {self.bytes / 2**30:.2f} GiB after "
                      f"{len(self._rows)} sequences; the rest are computed every epoch (raise "
                      f"--state-cache-gb to keep them)")
            return
        self._rows[index] = row
        self.bytes += size


def make_teacher(lm, lora: bool):
    """The frozen teacher of ``--targets distill|mixed`` for a trained backbone: the starting model's final
    layer. LoRA: the same model with its adapter switched off (no second copy); full fine-tuning: a frozen
    copy made before training. Returns ``teacher(model, inputs) -> (B, T, D)`` normed final states."""
    import copy

    frozen = None if lora else copy.deepcopy(lm.model).eval().requires_grad_(False)

    def teacher(model, inputs) -> torch.Tensor:
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        with torch.no_grad():
            if frozen is not None:
                out = frozen.model(input_ids=ids, attention_mask=mask, use_cache=False)
                return out.last_hidden_state  # already normed (transformers 5.x)
            peft_model = model.module if hasattr(model, "module") else model  # under DDP
            with peft_model.disable_adapter():
                out = peft_model.get_base_model().model(input_ids=ids, attention_mask=mask, use_cache=False)
            return out.last_hidden_state

    return teacher


__all__ = ["TIME_FILE", "FrozenBackbone", "StateCache", "checkpointing_args", "lite_trainer_class", "make_teacher",
           "process_rank", "snapshot_callback", "snapshot_folder", "time_budget_callback", "train_clock_callback"]
