"""Tiny update rules whose meta-losses have closed forms, for the meta-training tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_meta.optim.rules import UpdateRule


class LinearRule(UpdateRule):
    """``p <- p - theta0 * g - theta1 * p``: on a quadratic the parameters are affine in theta."""

    name = "test_linear"
    version = 1

    def __init__(self, theta: tuple[float, float] = (0.5, 0.0)) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta))

    def init_state(self, param: Tensor, *, batch_dims: int = 0) -> dict[str, Tensor]:
        return {"count": torch.zeros(param.shape[:batch_dims], dtype=param.dtype)}

    def update(self, param, grad, state, *, lr, step, horizon=None, loss=None, batch_dims=0):
        return param - self.theta[0] * grad - self.theta[1] * param, {"count": state["count"] + 1}


class LogLRRule(UpdateRule):
    """SGD whose step is ``lr * exp(log_scale)``: the simplest learned hyperparameter."""

    name = "test_loglr"
    version = 1

    def __init__(self, log_scale: float = 0.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(float(log_scale)))

    def init_state(self, param: Tensor, *, batch_dims: int = 0) -> dict[str, Tensor]:
        return {"count": torch.zeros(param.shape[:batch_dims], dtype=param.dtype)}

    def update(self, param, grad, state, *, lr, step, horizon=None, loss=None, batch_dims=0):
        return param - lr * torch.exp(self.log_scale) * grad, {"count": state["count"] + 1}


class TanhMomentumRule(UpdateRule):
    """A small nonlinear rule with state, in the dtype of the parameters (for float64 gradient checks)."""

    name = "test_tanh_momentum"
    version = 1

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.8, 0.3, 0.1]))
        self.log_scale = nn.Parameter(torch.tensor(-2.0))

    def init_state(self, param: Tensor, *, batch_dims: int = 0) -> dict[str, Tensor]:
        return {"m": torch.zeros_like(param)}

    def update(self, param, grad, state, *, lr, step, horizon=None, loss=None, batch_dims=0):
        m = 0.9 * state["m"] + grad
        w = self.w.to(param.dtype)
        direction = torch.tanh(w[0] * grad + w[1] * m + w[2] * param)
        return param - torch.exp(self.log_scale.to(param.dtype)) * direction, {"m": m}


class ScalarSGDRule(UpdateRule):
    """``p <- p - theta * g`` with one weight: closed-form smoothed meta-losses on quadratics."""

    name = "test_scalar_sgd"
    version = 1

    def __init__(self, theta: float = 0.5) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(float(theta)))

    def init_state(self, param: Tensor, *, batch_dims: int = 0) -> dict[str, Tensor]:
        return {"count": torch.zeros(param.shape[:batch_dims], dtype=param.dtype)}

    def update(self, param, grad, state, *, lr, step, horizon=None, loss=None, batch_dims=0):
        return param - self.theta * grad, {"count": state["count"] + 1}
