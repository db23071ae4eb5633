"""Per-step (and per-step per-tensor) inner rates and an UpdateRule as the inner optimizer, against
hand-unrolled float64 references with closed-form MLP gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_meta.functional import adapt, functional_forward, gradient_steps, loop_tasks, vmap_tasks
from lightning_meta.optim import AdamRule, MLPRule


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def tasks_data(tasks: int = 3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    sx = torch.randn(tasks, 6, 3, generator=g, dtype=torch.float64)
    sy = torch.randn(tasks, 6, 2, generator=g, dtype=torch.float64)
    qx = torch.randn(tasks, 5, 3, generator=g, dtype=torch.float64)
    qy = torch.randn(tasks, 5, 2, generator=g, dtype=torch.float64)
    return sx, sy, qx, qy


def manual_forward(w: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    h = torch.tanh(x @ w["0.weight"].T + w["0.bias"])
    return h @ w["2.weight"].T + w["2.bias"], h


def manual_grads(w: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Closed-form gradient of mean((mlp(x) - y)**2), written as a differentiable expression."""
    out, h = manual_forward(w, x)
    dout = 2 * (out - y) / out.numel()
    dh = dout @ w["2.weight"]
    dz = dh * (1 - h**2)
    return {"0.weight": dz.T @ x, "0.bias": dz.sum(0), "2.weight": dout.T @ h, "2.bias": dout.sum(0)}


def mse(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).mean()


NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


def per_step_per_tensor_rates() -> list[dict[str, Tensor]]:
    """MAML++-style learnable rates: one per layer tensor and per step (3 steps), all different."""
    return [
        {
            n: torch.tensor(0.05 * (s + 1) + 0.02 * i, dtype=torch.float64, requires_grad=True)
            for i, n in enumerate(NAMES)
        }
        for s in range(3)
    ]


def reference(model: nn.Module, data, rates: list) -> tuple[Tensor, list[Tensor]]:
    """Mean query loss after len(rates) hand-unrolled steps, and its gradient w.r.t. theta and the rates."""
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    sx, sy, qx, qy = data
    total = 0.0
    for t in range(sx.shape[0]):
        w = dict(theta)
        for r in rates:
            g = manual_grads(w, sx[t], sy[t])
            w = {n: w[n] - (r[n] if isinstance(r, dict) else r) * g[n] for n in w}
        total = total + mse(manual_forward(w, qx[t])[0], qy[t])
    total = total / sx.shape[0]
    leaves = list(theta.values()) + [v for r in rates if isinstance(r, dict) for v in r.values()]
    return total, list(torch.autograd.grad(total, leaves))


def library(model: nn.Module, data, rates: list, mode: str) -> tuple[Tensor, list[Tensor]]:
    sx, sy, qx, qy = data
    params = dict(model.named_parameters())

    def one_task(sx_t, sy_t, qx_t, qy_t):
        fast = adapt(model, params, sx_t, sy_t, steps=len(rates), lr=rates, loss_fn=mse)
        return mse(functional_forward(model, fast, qx_t), qy_t)

    losses = (vmap_tasks if mode == "vmap" else loop_tasks)(one_task, sx, sy, qx, qy)
    total = losses.mean()
    leaves = list(params.values()) + [v for r in rates if isinstance(r, dict) for v in r.values()]
    return total, list(torch.autograd.grad(total, leaves))


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_per_step_per_tensor_rates_match_hand_unrolled_reference(mode: str) -> None:
    model, data = mlp(), tasks_data()
    ref_loss, ref_grads = reference(model, data, per_step_per_tensor_rates())
    loss, grads = library(model, data, per_step_per_tensor_rates(), mode)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    assert len(grads) == len(ref_grads) == 4 + 12  # theta, then every rate of every step gets a gradient
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    assert all(g.abs().item() > 0 for g in grads[4:])


def test_per_step_scalar_rates_differ_from_a_constant_rate_and_match_reference() -> None:
    model, data = mlp(), tasks_data()
    ref_loss, ref_grads = reference(model, data, [0.1, 0.5])
    loss, grads = library(model, data, [0.1, 0.5], "loop")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    const_loss, _ = reference(model, data, [0.3, 0.3])
    assert abs(const_loss.item() - ref_loss.item()) > 1e-6  # the schedule matters in this setup


def test_per_step_rates_must_match_the_number_of_steps() -> None:
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="2 per-step rates but steps=3"):
        gradient_steps(lambda f: (f["w"] ** 2).sum(), {"w": w}, steps=3, lr=[0.1, 0.2])


def reference_adam(w0: dict[str, Tensor], x: Tensor, y: Tensor, steps: int, lr: float, betas=(0.9, 0.999), eps=1e-8):
    """Adam on the inner loss, unrolled by hand (Kingma & Ba, Algorithm 1), differentiable."""
    w = dict(w0)
    m = {n: torch.zeros_like(v) for n, v in w.items()}
    v2 = {n: torch.zeros_like(v) for n, v in w.items()}
    for t in range(1, steps + 1):
        g = manual_grads(w, x, y)
        for n in w:
            m[n] = betas[0] * m[n] + (1 - betas[0]) * g[n]
            v2[n] = betas[1] * v2[n] + (1 - betas[1]) * g[n] ** 2
            m_hat = m[n] / (1 - betas[0] ** t)
            v_hat = v2[n] / (1 - betas[1] ** t)
            w[n] = w[n] - lr * m_hat / (torch.sqrt(v_hat) + eps)
    return w


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_adam_rule_as_inner_optimizer_matches_hand_unrolled_adam(mode: str) -> None:
    model, (sx, sy, qx, qy) = mlp(), tasks_data()
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    ref_total = (
        sum(mse(manual_forward(reference_adam(theta, sx[t], sy[t], 3, 0.05), qx[t])[0], qy[t]) for t in range(3)) / 3
    )
    ref_grads = torch.autograd.grad(ref_total, list(theta.values()))
    params = dict(model.named_parameters())
    rule = AdamRule()

    def one_task(sx_t, sy_t, qx_t, qy_t):
        fast = adapt(model, params, sx_t, sy_t, steps=3, lr=0.05, loss_fn=mse, rule=rule)
        return mse(functional_forward(model, fast, qx_t), qy_t)

    total = (vmap_tasks if mode == "vmap" else loop_tasks)(one_task, sx, sy, qx, qy).mean()
    grads = torch.autograd.grad(total, list(params.values()))
    torch.testing.assert_close(total, ref_total, rtol=1e-12, atol=1e-14)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    plain = library(model, (sx, sy, qx, qy), [0.05] * 3, "loop")[0]
    assert abs(plain.item() - total.item()) > 1e-4  # Adam's steps are not plain gradient descent here


def test_learned_rule_weights_get_an_outer_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    sx, sy, qx, qy = (t.float() for t in tasks_data(1))
    rule = MLPRule()
    fast = adapt(model, dict(model.named_parameters()), sx[0], sy[0], steps=2, lr=0.01, loss_fn=mse, rule=rule)
    loss = mse(functional_forward(model, fast, qx[0]), qy[0])
    grads = torch.autograd.grad(loss, [p for p in rule.parameters()], allow_unused=True)
    assert any(g is not None and g.abs().sum().item() > 0 for g in grads)
    assert math.isfinite(loss.item())
