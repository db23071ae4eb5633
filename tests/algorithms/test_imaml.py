"""iMAML: the implicit meta-gradient equals the exact gradient through the proximal solution (ridge regression,
closed form, float64); conjugate gradient converges to (I + H/lam)^{-1} g; loop equals vmap; bf16 is finite."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from lightning_meta.algorithms.imaml import IMAML, conjugate_gradient
from lightning_meta.episode import Episode
from lightning_meta.functional import functional_forward
from lightning_meta.nn import MLP
from tests.algorithms._meta_helpers import batch, blob_episode, grads_of_training_step, two_layer

pytestmark = pytest.mark.filterwarnings("ignore:.*(self.log|val_dataloader|num_workers).*")

D = 5


def regression_batch(tasks: int = 3, n: int = 8, q: int = 6) -> Episode:
    g = torch.Generator().manual_seed(0)
    sx = torch.randn(tasks, n, D, generator=g, dtype=torch.float64) * 0.6
    qx = torch.randn(tasks, q, D, generator=g, dtype=torch.float64) * 0.6
    w = torch.randn(tasks, D, generator=g, dtype=torch.float64)
    sy = torch.einsum("tnd,td->tn", sx, w) + 0.1 * torch.randn(tasks, n, generator=g, dtype=torch.float64)
    qy = torch.einsum("tnd,td->tn", qx, w)
    return Episode(sx, sy, qx, qy)


def linear_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(D, 1, bias=False).double()


def closed_form_meta_gradient(theta: Tensor, b: Episode, lam: float) -> Tensor:
    """d/dtheta mean_t L_query(phi*_t(theta)), phi* = argmin mean((X phi - y)^2) + lam/2 ||phi - theta||^2."""
    theta = theta.detach().clone().requires_grad_()
    total = 0.0
    for t in range(b.tasks):
        x, y = b.support_x[t], b.support_y[t]
        n = x.shape[0]
        hess = 2.0 / n * x.T @ x
        phi = torch.linalg.solve(hess + lam * torch.eye(D, dtype=x.dtype), 2.0 / n * x.T @ y + lam * theta)
        total = total + ((b.query_x[t] @ phi - b.query_y[t]) ** 2).mean()
    return torch.autograd.grad(total / b.tasks, theta)[0]


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_implicit_gradient_equals_the_gradient_through_the_closed_form_proximal_solution(mode: str) -> None:
    b = regression_batch()
    model = IMAML(linear_model(), lam=1.5, inner_lr=0.2, inner_steps=400, cg_steps=D, task_mode=mode)
    got = grads_of_training_step(model, b)["backbone.weight"]
    ref = closed_form_meta_gradient(model.backbone.weight.detach()[0], b, lam=1.5)
    torch.testing.assert_close(got[0], ref, rtol=1e-8, atol=1e-10)
    # it is not the first-order (query gradient at phi) approximation
    fo = IMAML(linear_model(), lam=1.5, inner_lr=0.2, inner_steps=400, cg_steps=1, task_mode=mode)
    assert (grads_of_training_step(fo, b)["backbone.weight"][0] - ref).abs().max() > 1e-4


def test_conjugate_gradient_converges_to_the_implicit_solution_on_a_nonlinear_net() -> None:
    model = IMAML(two_layer(), lam=2.0, inner_lr=0.3, inner_steps=5, cg_steps=30, task_mode="loop")
    b = batch(1)
    sx, sy = b.support_x[0], b.support_y[0]
    model.train()
    phi = model.adapt(sx, sy)
    names = list(phi)
    flat = torch.cat([phi[n].reshape(-1) for n in names])

    def unflatten(v: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n in names:
            out[n] = v[i : i + phi[n].numel()].view_as(phi[n])
            i += phi[n].numel()
        return out

    def support(v: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(functional_forward(model.backbone, unflatten(v), sx), sy)

    hess = torch.autograd.functional.hessian(support, flat)
    g = torch.randn(flat.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = torch.eye(flat.numel(), dtype=torch.float64) + hess / 2.0
    assert torch.linalg.eigvalsh(a).min() > 0  # lam large enough for a positive-definite system
    exact = torch.linalg.solve(a, g)
    errors, residuals = [], None
    for k in (1, 3, 10, 30):
        model.cg_steps = k
        x, residuals = model.implicit_gradient(phi, sx, sy, unflatten(g))
        e = torch.cat([x[n].reshape(-1) for n in names]) - exact
        errors.append(float(e @ a @ e))  # A-norm of the error: non-increasing in CG
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in itertools.pairwise(errors))
    assert residuals.shape == (31,) and residuals[-1] < 1e-6 * residuals[0]
    torch.testing.assert_close(torch.cat([x[n].reshape(-1) for n in names]), exact, rtol=1e-6, atol=1e-8)


def test_conjugate_gradient_on_a_known_matrix_and_a_zero_right_hand_side() -> None:
    a = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    b = {"v": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    x, res = conjugate_gradient(lambda v: {"v": a @ v["v"]}, b, steps=3)
    torch.testing.assert_close(x["v"], torch.linalg.solve(a, b["v"]))
    assert res[-1] < 1e-10
    x, res = conjugate_gradient(lambda v: {"v": a @ v["v"]}, {"v": torch.zeros(3, dtype=torch.float64)}, steps=3)
    assert torch.equal(x["v"], torch.zeros(3, dtype=torch.float64)) and torch.equal(
        res, torch.zeros(4, dtype=torch.float64)
    )


@pytest.mark.parametrize(
    "solver",
    [
        dict(inner_lr=0.3, inner_steps=4),
        dict(inner_solver="hessian_free", newton_steps=2, newton_cg_steps=3),
    ],
    ids=["gd", "hessian_free"],
)
def test_classification_loop_equals_vmap_and_the_inner_loop_keeps_no_graph(solver: dict) -> None:
    b = batch(3)
    got = {}
    for mode in ("loop", "vmap"):
        model = IMAML(two_layer(), lam=1.0, cg_steps=3, task_mode=mode, **solver)
        got[mode] = grads_of_training_step(model, b)
    for n in got["loop"]:
        torch.testing.assert_close(got["vmap"][n], got["loop"][n], rtol=1e-9, atol=1e-12)
    model.train()
    phi = model.adapt(b.support_x[0], b.support_y[0])
    assert all(not t.requires_grad and t.grad_fn is None for t in phi.values())
    theta = dict(model.backbone.named_parameters())
    assert all((phi[n] - theta[n]).abs().max() > 1e-6 for n in phi)  # it moved


def test_bf16_autocast_on_cpu_gives_a_finite_loss() -> None:
    model = IMAML(MLP(4, 3, hidden=(8,)), inner_steps=3, task_mode="loop")
    b = Episode.collate([blob_episode(i) for i in range(2)])
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_step(b, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.parameters())


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="lam=0"):
        IMAML(MLP(), lam=0)
    with pytest.raises(ValueError, match="cg_steps=0"):
        IMAML(MLP(), cg_steps=0)
