"""Learned update rules: coordinate-wise networks with weights shared across all parameters.

- :class:`LSTMRule`: Andrychowicz et al., "Learning to learn by gradient descent by gradient descent",
  NeurIPS 2016, arXiv:1606.04474. Two-layer coordinate-wise LSTM (20 units), log/sign gradient preprocessing
  (k = 5), output scaled by 0.1. Departure: the step is subtracted (``p - 0.1 * out``) so that a rule that
  learns "output the gradient" descends.
- :class:`MLPRule`: Metz et al., "Tasks, stability, architecture, and compute: training more effective learned
  optimizers, and using them to train themselves", arXiv:2009.11243 (the ``mlp_lopt`` of learned_optimization).
  Per-parameter MLP over tensor-normalised accumulator features; step ``d * exp(1e-3 m) * 1e-3``.
  Departure: one hidden layer by default (speed); the time features enter as a per-step bias.
- :class:`~lightning_meta.optim.celo2.Celo2Rule` (Celo2-style, normalised and horizon-aware) lives in
  :mod:`lightning_meta.optim.celo2`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_meta.optim.functional import (
    coordinate_mlp,
    flatten_features,
    lstm_preprocess,
    per_problem_bias,
    time_features,
)
from lightning_meta.optim.rules import State, UpdateRule, register_rule, zeros_state

__all__ = ["LSTMRule", "MLPRule"]


@register_rule
class LSTMRule(UpdateRule):
    """Coordinate-wise two-layer LSTM optimizer (Andrychowicz et al. 2016); the step size is learned.

    State: the hidden and cell vectors of both layers, ``4 * hidden_size`` floats per parameter.
    Initialisation: PyTorch's default LSTM/Linear initialisation (an untrained LSTM takes small random steps).

    Args:
        hidden_size: units per LSTM layer.
        preprocess_k: the ``k`` of the log/sign gradient preprocessing.
        output_scale: multiplies the network output to give the step.
    """

    name = "lstm"
    version = 1
    uses_lr = False

    def __init__(self, *, hidden_size: int = 20, preprocess_k: float = 5.0, output_scale: float = 0.1) -> None:
        super().__init__()
        if hidden_size < 1 or preprocess_k <= 0:
            raise ValueError(f"hidden_size={hidden_size} must be >= 1 and preprocess_k={preprocess_k} > 0")
        self.hidden_size = hidden_size
        self.preprocess_k = float(preprocess_k)
        self.output_scale = float(output_scale)
        self.cell1 = nn.LSTMCell(2, hidden_size)
        self.cell2 = nn.LSTMCell(hidden_size, hidden_size)
        self.head = nn.Linear(hidden_size, 1)

    def init_state(self, param: Tensor, *, batch_dims: int = 0) -> State:
        shape = (*param.shape, self.hidden_size)
        return {key: zeros_state(shape, param) for key in ("h1", "c1", "h2", "c2")}

    def update(
        self,
        param: Tensor,
        grad: Tensor,
        state: State,
        *,
        lr: float | Tensor,
        step: int | Tensor,
        horizon: int | None = None,
        loss: Tensor | None = None,
        batch_dims: int = 0,
    ) -> tuple[Tensor, State]:
        hidden = self.hidden_size
        x = torch.stack(lstm_preprocess(grad, self.preprocess_k), dim=-1).reshape(-1, 2)  # (coords, 2)
        flat = {key: value.reshape(-1, hidden) for key, value in state.items()}  # (coords, hidden)
        h1, c1 = self.cell1(x, (flat["h1"], flat["c1"]))
        h2, c2 = self.cell2(h1, (flat["h2"], flat["c2"]))
        delta = self.head(h2).reshape(param.shape) * self.output_scale
        shape = (*param.shape, hidden)
        new_state = {"h1": h1.reshape(shape), "c1": c1.reshape(shape), "h2": h2.reshape(shape), "c2": c2.reshape(shape)}
        return param - delta, new_state


@register_rule
class MLPRule(UpdateRule):
    """Per-parameter MLP over tensor-normalised features (Metz et al. 2020); the step size is learned.

    Features per coordinate, each normalised by its RMS over the tensor: gradient, parameter, momenta at
    ``momentum_decays``, ``sqrt(v)`` (second moment at ``rms_decay``) and each momentum times ``rsqrt(v)``;
    plus ``tanh(step / s - 1)`` for each timescale ``s``. Output: direction ``d`` and magnitude ``m``;
    ``step = d * exp(exp_mult * m) * step_mult``, subtracted from the parameter.

    State: ``len(momentum_decays) + 1`` floats per parameter. Initialisation: PyTorch's default Linear init.

    Args:
        hidden_size: width of the hidden layer.
        momentum_decays: decay rates of the momentum accumulators.
        rms_decay: decay rate of the second-moment accumulator.
        timescales: timescales of the step-count features.
        step_mult: overall step scale (tiny, so meta-training starts stable).
        exp_mult: scale of the magnitude output inside the exponential.
    """

    name = "mlp"
    version = 1
    uses_lr = False
    _decays: Tensor  # buffer registered in __init__ (declared so type checkers see a Tensor, not a Module)

    def __init__(
        self,
        *,
        hidden_size: int = 8,
        momentum_decays: tuple[float, ...] = (0.5, 0.9, 0.99),
        rms_decay: float = 0.999,
        timescales: tuple[float, ...] = (10.0, 100.0, 1000.0, 10000.0),
        step_mult: float = 1e-3,
        exp_mult: float = 1e-3,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or not momentum_decays or not all(0.0 <= b < 1.0 for b in (*momentum_decays, rms_decay)):
            raise ValueError(
                f"hidden_size={hidden_size} must be >= 1 and momentum_decays={momentum_decays}, "
                f"rms_decay={rms_decay} non-empty and in [0, 1)"
            )
        self.hidden_size = hidden_size
        self.momentum_decays = tuple(float(b) for b in momentum_decays)
        self.rms_decay = float(rms_decay)
        self.timescales = tuple(float(s) for s in timescales)
        self.step_mult = float(step_mult)
        self.exp_mult = float(exp_mult)
        n_features = 3 + 2 * len(self.momentum_decays)
        self.register_buffer("_decays", torch.tensor(self.momentum_decays), persistent=False)
        self.input = nn.Linear(n_features, hidden_size)
        self.time = nn.Linear(len(self.timescales), hidden_size, bias=False)
        self.output = nn.Linear(hidden_size, 2)

    def init_state(self, param: Tensor, *, batch_dims: int = 0) -> State:
        shape = (*param.shape[:batch_dims], len(self.momentum_decays), *param.shape[batch_dims:])
        return {"momentum": zeros_state(shape, param), "v": zeros_state(param.shape, param)}

    def update(
        self,
        param: Tensor,
        grad: Tensor,
        state: State,
        *,
        lr: float | Tensor,
        step: int | Tensor,
        horizon: int | None = None,
        loss: Tensor | None = None,
        batch_dims: int = 0,
    ) -> tuple[Tensor, State]:
        ones = [1] * (param.ndim - batch_dims)
        weight = (1 - self._decays).reshape(-1, *ones)
        momentum = torch.lerp(state["momentum"], grad.unsqueeze(batch_dims), weight)  # (*B, K, *rest)
        v = torch.lerp(state["v"], grad * grad, 1 - self.rms_decay)
        rsqrt_v = torch.rsqrt(v + 1e-12)

        def lift(t: Tensor) -> Tensor:  # a per-coordinate feature as one row of (*B, F, *rest)
            return t.unsqueeze(batch_dims)

        feats = torch.cat(
            [lift(grad), lift(param), momentum, lift(v * rsqrt_v), momentum * lift(rsqrt_v)], dim=batch_dims
        )  # (*B, F, *rest)
        x, scale = flatten_features(feats, batch_dims)  # (b, F, n), (b, F)
        times = time_features(step, self.timescales, device=param.device, dtype=param.dtype)  # (*steps, T)
        bias = per_problem_bias(self.time(times) + self.input.bias, x.shape[0])  # (b, H, 1)
        w1 = self.input.weight * scale.unsqueeze(-2)  # (b, H, F): the normalisation folded into the first layer
        out = coordinate_mlp(x, w1, bias, self.output.weight.unsqueeze(0), self.output.bias.reshape(1, 2, 1))
        direction, magnitude = out.unbind(1)  # (b, n) each
        delta = (direction * torch.exp(magnitude * self.exp_mult)).reshape(param.shape)
        return torch.add(param, delta, alpha=-self.step_mult), {"momentum": momentum, "v": v}
