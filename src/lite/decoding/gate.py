"""A learned exit gate (CALM's "meta" measure): a tiny classifier per exit layer, no LM head needed.

For exit layer k the gate reads features of the token's state ``h_k`` (the output of block k) and predicts
whether layer k's argmax equals the final layer's. Which features is the gate's ``features``:

* ``"state+delta"`` (the default of ``lite calibrate --gate``): ``final_norm(h_k)`` and the change the block
  made, ``final_norm(h_k) - final_norm(h_{k-1})`` (2D features). No exit module runs for a check: the module
  and the head run only where a token leaves.
* ``"state"``: ``final_norm(h_k)`` alone (D features).
* ``"exit"``: the exit state the head would read, the exit module of layer k and then the final norm (D
  features; the module runs at every check). Gate files written before ``features`` existed are this kind. The token
leaves at the first checked layer where the predicted probability reaches the layer's decision threshold;
only then is the head evaluated, once. One check costs :meth:`LearnedExitGate.flops` (2*D multiply-adds for
logistic regression), against the 2*D*V of a head evaluation (V = 49152 on the default model).

The gate is trained by ``lite calibrate --gate`` on the collected states (:func:`train_gate`), its decision
thresholds are chosen on examples it was not trained on (see :mod:`lite.calibration`), and it is saved
next to the model as a safetensors file named in ``lite_config.json`` (``gate_file``); the decision
thresholds live in ``lite_config.json`` under ``calibration.gate.thresholds``. :func:`load_gate` reads it
back. The gate implements the engine's :class:`lite.decoding.ExitGate` protocol.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import LiteError
from ..files import ordinary_mode, temporary_beside

GATE_FILE = "exit_gate.safetensors"
GATE_FORMAT = "lite-exit-gate-v1"
FEATURES = ("state+delta", "state", "exit")
DEFAULT_FEATURES = "state+delta"


def check_features(features: str, flag: str = "--gate-features") -> str:
    """``features`` if it is a gate feature kind, else a :class:`LiteError` naming ``flag``."""
    if features not in FEATURES:
        raise LiteError(f"{flag} must be one of {', '.join(FEATURES)}, got {features!r}")
    return features


def gate_features(lm, features: str, layer: int, raw: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """The features a gate of kind ``features`` reads at ``layer``: ``raw`` (..., D) is the output of block
    ``layer``, ``before`` (..., D) its input (the output of block ``layer - 1``; the embedding at layer 1).
    Returns (..., D) or (..., 2D), in the model's dtype."""
    if features == "exit":
        return lm.exit_normed(raw, layer)
    state = lm.final_norm(raw)
    if features == "state":
        return state
    return torch.cat([state, state - lm.final_norm(before)], dim=-1)


def _logit(p: float) -> float:
    if p >= 1.0:
        return math.inf
    if p <= 0.0:
        return -math.inf
    return math.log(p / (1.0 - p))


class LearnedExitGate:
    """Per exit layer an MLP with zero or one hidden layer, in float32, on the state's features.

    Attributes:
        features: what it reads (:data:`FEATURES`, see :func:`gate_features`).
        params: {layer: [(W, b), ...]} linear layers applied in order with ReLU between them; the last
            one has one output, the logit of P(layer agrees with the final layer). W is (out, in). A layer
            without an entry is closed: no token leaves there (calibration closes the layers whose
            classifier does not beat the constant answer).
        thresholds: {layer: decision threshold on the probability}; a token leaves at ``layer`` when
            P >= threshold (>= 1 never leaves; <= 0 always leaves).
        confirm: {layer: max-prob cut}, the cascade (empty: none): where the gate lets a token out, the head
            (the exit vocabulary's, when there is one) is read there and the token leaves only if its max-prob
            reaches the cut; else it goes on. The head is then read only where the gate is sure enough, and
            the decision is as sharp as max-prob's where it is read.
    """

    def __init__(self, params: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
                 thresholds: dict[int, float] | None = None, hidden: int | None = None,
                 features: str = "exit", confirm: dict[int, float] | None = None) -> None:
        self.features = check_features(features, "the gate's features")
        self.confirm: dict[int, float] = {int(k): float(v) for k, v in (confirm or {}).items()}
        self.params = {int(k): [(w.float(), b.float()) for w, b in v] for k, v in params.items()}
        first = next(iter(self.params.values()), None)
        self._hidden = int(hidden) if hidden is not None else \
            (0 if first is None or len(first) == 1 else int(first[0][0].shape[0]))
        self.thresholds: dict[int, float] = {}
        self._cut: dict[int, float] = {}
        self.set_thresholds(thresholds or {k: 0.5 for k in self.params})

    @property
    def layers(self) -> list[int]:
        return sorted(self.params)

    @property
    def hidden(self) -> int:
        """Width of the hidden layer (0 for logistic regression)."""
        return self._hidden

    def drop_layers(self, layers: list[int]) -> None:
        """Close ``layers``: remove their classifiers and thresholds, so no token leaves there."""
        for k in layers:
            self.params.pop(int(k), None)
            self.thresholds.pop(int(k), None)
            self._cut.pop(int(k), None)
            self.confirm.pop(int(k), None)

    def set_thresholds(self, thresholds: dict[int, float]) -> None:
        """Decision thresholds on the probability, compared as logits so a check needs no sigmoid."""
        self.thresholds = {int(k): float(v) for k, v in thresholds.items()}
        self._cut = {k: _logit(v) for k, v in self.thresholds.items()}

    def features_of(self, lm, layer: int, raw: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """This gate's features (:func:`gate_features`) of block ``layer``'s output ``raw`` and input ``before``."""
        return gate_features(lm, self.features, layer, raw, before)

    @property
    def reads_exit_state(self) -> bool:
        """Whether its features are the exit state the head reads (the module ran for the check)."""
        return self.features == "exit"

    def logits(self, layer: int, states: torch.Tensor) -> torch.Tensor:
        """(..., F) features at ``layer`` -> (...) logits of P(agree with the final layer)."""
        x = states.float()
        linears = self.params[layer]
        for j, (w, b) in enumerate(linears):
            x = x @ w.T + b
            if j < len(linears) - 1:
                x = torch.relu(x)
        return x[..., 0]

    def probability(self, layer: int, states: torch.Tensor) -> torch.Tensor:
        """(..., F) features -> (...) predicted probability that ``layer`` agrees with layer L."""
        return torch.sigmoid(self.logits(layer, states))

    def should_exit(self, layer: int, normed_state: torch.Tensor) -> bool:
        """The engine's protocol: does the token with features ``(F,)`` (:meth:`features_of`) leave at ``layer``?

        Layers the gate has no classifier for never exit. The one host sync is this decision.
        """
        cut = self._cut.get(layer)
        if cut is None or layer not in self.params:
            return False
        return bool(self.logits(layer, normed_state) >= cut)

    def should_exit_rows(self, layer: int, normed_states: torch.Tensor) -> list[bool]:
        """:meth:`should_exit` for a batch of rows ``(b, D)`` in one call (one host sync for all of them);
        the same decisions as row by row."""
        cut = self._cut.get(layer)
        if cut is None or layer not in self.params:
            return [False] * normed_states.shape[0]
        return (self.logits(layer, normed_states) >= cut).tolist()

    def flops(self, layer: int) -> int:
        """FLOPs of one check at ``layer``: 2 per multiply-add of every linear layer (2*D for logistic
        regression, 2*F*H + 2*H with a hidden layer, F features); biases, ReLU, the norms of the features and the
        comparison are not counted."""
        if layer not in self.params:
            return 0
        return int(sum(2 * w.shape[0] * w.shape[1] for w, _ in self.params[layer]))


def train_gate(states: np.ndarray, agree: np.ndarray, layers: list[int], *, hidden: int = 0,
               steps: int = 300, lr: float = 0.01, weight_decay: float = 0.1, seed: int = 0,
               features: str = DEFAULT_FEATURES) -> LearnedExitGate:
    """Fit one classifier per exit layer predicting agreement with the final layer (binary cross-entropy,
    full-batch Adam, features standardised during training and folded back into the first layer).

    Args:
        states: (E, N, F) features (:func:`gate_features` of kind ``features``) of the E exit layers at N tokens.
        agree: (E, N) bool, layer i's argmax equals layer L's.
        layers: the E exit layers (1-indexed).
        hidden: 0 for logistic regression, else the width of one ReLU hidden layer.
        steps: optimiser steps (full batch).
        weight_decay: L2 penalty on the standardised weights. 0.1 by default: with D = 576 features and
            about a thousand tokens, 1e-4 overfit on the default model (held-out accuracy 0.59-0.80 against
            a majority baseline of 0.62-0.94); 0.1 came within 0.01 of the baseline at exits 8-19 and beat it at
            23 and 26 (0.72, 0.71 against 0.70, 0.62).
    Returns:
        the gate with decision thresholds 0.5 (calibration replaces them).
    """
    states = np.asarray(states, dtype=np.float32)
    if states.ndim != 3 or states.shape[:2] != np.shape(agree) or states.shape[0] != len(layers):
        raise ValueError(f"states {states.shape}, agree {np.shape(agree)} and {len(layers)} layers disagree")
    if states.shape[1] == 0:
        raise LiteError("the exit gate needs calibration tokens; none were collected")
    if hidden < 0:
        raise LiteError(f"--gate-hidden must be >= 0 (0 = logistic regression), got {hidden}")
    gen = torch.Generator().manual_seed(seed)
    params: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (N, D) x (D, H) steps are too small to share; threads only spin and wait
    try:
        for i, layer in enumerate(layers):
            params[int(layer)] = _fit_one(states[i], agree[i], hidden, steps, lr, weight_decay, gen)
    finally:
        torch.set_num_threads(threads)
    return LearnedExitGate(params, features=features)


def _fit_one(states: np.ndarray, agree: np.ndarray, hidden: int, steps: int, lr: float, weight_decay: float,
             gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One exit layer's classifier; returns its linear layers with the standardisation folded in."""
    x = torch.from_numpy(states)  # (N, D)
    y = torch.from_numpy(np.asarray(agree, dtype=np.float32))  # (N,)
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    d = x.shape[1]
    sizes = [d, hidden, 1] if hidden else [d, 1]
    linears = []
    for a, b in zip(sizes, sizes[1:]):
        w = (torch.randn(b, a, generator=gen) / math.sqrt(a)).requires_grad_()
        linears.append((w, torch.zeros(b, requires_grad=True)))
    opt = torch.optim.Adam([t for pair in linears for t in pair], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            h = z
            for j, (w, b) in enumerate(linears):
                h = h @ w.T + b
                if j < len(linears) - 1:
                    h = torch.relu(h)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(h[:, 0], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    # fold the standardisation into the first layer: W z + b = (W / std) x + (b - W (mean / std))
    w1, b1 = linears[0][0].detach(), linears[0][1].detach()
    return [(w1 / std, b1 - w1 @ (mean / std))] + [(w.detach(), b.detach()) for w, b in linears[1:]]


def save_gate(gate: LearnedExitGate, folder: str | os.PathLike[str], name: str = GATE_FILE) -> Path:
    """Write the gate's weights as safetensors into ``folder`` atomically (temporary file, then rename).

    Tensors are ``layer{k}.{j}.weight`` / ``layer{k}.{j}.bias`` for linear layer j of exit layer k; the
    decision thresholds are not in the file (they belong to ``lite_config.json``).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {}
    for k, linears in gate.params.items():
        for j, (w, b) in enumerate(linears):
            tensors[f"layer{k}.{j}.weight"] = w.contiguous()
            tensors[f"layer{k}.{j}.bias"] = b.contiguous()
    meta = {"format": GATE_FORMAT, "layers": ",".join(str(k) for k in gate.layers), "hidden": str(gate.hidden),
            "features": gate.features}
    tmp = temporary_beside(folder / name)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, ordinary_mode())  # save_file writes a new, private file
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / name


def read_gate(path: str | os.PathLike[str], thresholds: dict[int, float] | None = None) -> LearnedExitGate:
    """Load a gate file written by :func:`save_gate`, with the given decision thresholds."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LiteError(f"the exit gate file {path} is missing; rerun 'lite calibrate --gate'")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != GATE_FORMAT:
                raise LiteError(f"{path} is not a lite exit gate (format {meta.get('format')!r}); rerun "
                                f"'lite calibrate --gate'")
            layers = [int(k) for k in meta["layers"].split(",") if k]
            params = {}
            for k in layers:
                linears, j = [], 0
                while f"layer{k}.{j}.weight" in f.keys():
                    linears.append((f.get_tensor(f"layer{k}.{j}.weight"), f.get_tensor(f"layer{k}.{j}.bias")))
                    j += 1
                params[k] = linears
            hidden = int(meta.get("hidden", 0))
            features = meta.get("features", "exit")  # files from before the key read the exit state
            if features not in FEATURES:
                raise LiteError(f"{path} reads features {features!r}, which this lite does not know "
                                f"({', '.join(FEATURES)}); upgrade lite or rerun 'lite calibrate --gate'")
    except LiteError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a truncated or foreign file: name it and the fix
        raise LiteError(f"{path} is damaged or not a lite exit gate ({type(exc).__name__}: {str(exc)[:200]}); "
                        f"rerun 'lite calibrate --gate'") from exc
    return LearnedExitGate(params, thresholds, hidden=hidden, features=features)


def load_gate(lm) -> LearnedExitGate | None:
    """The gate saved with ``lm`` (``lite_config.json``: ``gate_file`` and ``calibration.gate.thresholds``),
    or None when the model has none."""
    cfg = lm.lite_config
    if not cfg.gate_file or lm.folder is None:
        return None
    where = Path(lm.folder) / "lite_config.json"
    recorded = (cfg.calibration.get("gate") or {}).get("thresholds") or {}
    try:
        thresholds = {int(k): float(v) for k, v in recorded.items()}
    except (TypeError, ValueError, AttributeError):
        raise LiteError(f"{where}: calibration.gate.thresholds must map layers to numbers; rerun "
                        f"'lite calibrate --gate'") from None
    bad = {k: v for k, v in thresholds.items() if not (math.isfinite(v) and 0.0 <= v <= 1.0)}
    if bad:
        raise LiteError(f"{where}: calibration.gate.thresholds {bad}: a gate threshold is a probability in [0, 1]; "
                        f"rerun 'lite calibrate --gate'")
    gate = read_gate(Path(lm.folder) / cfg.gate_file, thresholds)
    confirm = (cfg.calibration.get("gate") or {}).get("confirm") or {}
    try:
        gate.confirm = {int(k): float(v) for k, v in confirm.items()}
    except (TypeError, ValueError, AttributeError):
        raise LiteError(f"{where}: calibration.gate.confirm must map layers to max-prob cuts; rerun "
                        f"'lite calibrate --gate'") from None
    if not all(math.isfinite(v) for v in gate.confirm.values()):
        raise LiteError(f"{where}: calibration.gate.confirm {gate.confirm}: cuts must be finite; rerun "
                        f"'lite calibrate --gate'")
    missing = [k for k in gate.layers if k not in thresholds]
    if missing:
        raise LiteError(f"{where} has no gate decision thresholds for layers {missing}; rerun "
                        f"'lite calibrate --gate'")
    return gate
