"""iMAML's Hessian-free inner solver: one Newton step lands on the closed-form proximal solution of a quadratic
support loss (ridge regression, float64), so the meta-gradient matches the closed form; on logistic regression it
converges quadratically to the minimiser of G (found here by L-BFGS) and beats gradient descent at equal inner
iterations; the line search keeps G from rising on a non-convex net; loop equals vmap; bad arguments are named."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.algorithms.imaml import IMAML
from lightning_meta.functional import functional_forward
from lightning_meta.nn import MLP
from lightning_meta.optim import AdamRule
from tests.algorithms._meta_helpers import batch, blob_episode, grads_of_training_step, two_layer
from tests.algorithms.test_imaml import D, closed_form_meta_gradient, linear_model, regression_batch

pytestmark = pytest.mark.filterwarnings("ignore:.*(self.log|val_dataloader|num_workers).*")

Params = dict[str, Tensor]


def hf(backbone: nn.Module, **kwargs) -> IMAML:
    return IMAML(backbone, inner_solver="hessian_free", **kwargs)


def ridge_solution(x: Tensor, y: Tensor, theta: Tensor, lam: float) -> Tensor:
    """argmin_phi mean((x phi - y)^2) + lam/2 ||phi - theta||^2."""
    n = x.shape[0]
    return torch.linalg.solve(2.0 / n * x.T @ x + lam * torch.eye(D, dtype=x.dtype), 2.0 / n * x.T @ y + lam * theta)


@pytest.mark.parametrize("line_search_steps", [0, 5])
def test_one_newton_step_with_enough_cg_iterations_lands_on_the_proximal_solution(line_search_steps: int) -> None:
    b = regression_batch()
    model = hf(linear_model(), lam=1.5, newton_steps=1, newton_cg_steps=D, line_search_steps=line_search_steps)
    model.train()
    theta = model.backbone.weight.detach()[0]
    for t in range(b.tasks):
        phi = model.adapt(b.support_x[t], b.support_y[t])["weight"][0]
        torch.testing.assert_close(
            phi, ridge_solution(b.support_x[t], b.support_y[t], theta, 1.5), rtol=1e-10, atol=1e-12
        )
    # with fewer CG iterations than dimensions the step is truncated: not the solution
    model.newton_cg_steps = 2
    phi = model.adapt(b.support_x[0], b.support_y[0])["weight"][0]
    assert (phi - ridge_solution(b.support_x[0], b.support_y[0], theta, 1.5)).abs().max() > 1e-4


def test_damping_gives_the_damped_newton_step() -> None:
    b = regression_batch(tasks=1)
    lam, damping = 1.5, 0.7
    model = hf(linear_model(), lam=lam, newton_steps=1, newton_cg_steps=D, newton_damping=damping, line_search_steps=0)
    model.train()
    x, y = b.support_x[0], b.support_y[0]
    theta = model.backbone.weight.detach()[0]
    n = x.shape[0]
    hess_g = 2.0 / n * x.T @ x + lam * torch.eye(D, dtype=x.dtype)
    grad_g = 2.0 / n * x.T @ (x @ theta - y)  # the proximal term's gradient is 0 at phi = theta
    expected = theta - torch.linalg.solve(hess_g + damping * torch.eye(D, dtype=x.dtype), grad_g)
    torch.testing.assert_close(model.adapt(x, y)["weight"][0], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_meta_gradient_equals_the_gradient_through_the_closed_form_proximal_solution(mode: str) -> None:
    b = regression_batch()
    model = hf(linear_model(), lam=1.5, newton_steps=1, newton_cg_steps=D, cg_steps=D, task_mode=mode)
    got = grads_of_training_step(model, b)["backbone.weight"]
    ref = closed_form_meta_gradient(model.backbone.weight.detach()[0], b, lam=1.5)
    torch.testing.assert_close(got[0], ref, rtol=1e-8, atol=1e-10)


def logistic_problem() -> tuple[nn.Module, Tensor, Tensor, Params]:
    e = blob_episode(0, ways=3, shots=4)
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    theta = {n: p.detach().clone() for n, p in lin.named_parameters()}
    return lin, e.support_x.double(), e.support_y, theta


def test_newton_converges_quadratically_on_logistic_regression_and_beats_gradient_descent() -> None:
    lam = 0.5
    lin, x, y, theta = logistic_problem()

    def objective(p: Params) -> Tensor:  # G, written out: softmax regression + proximal term
        return F.cross_entropy(x @ p["weight"].T + p["bias"], y) + lam / 2 * sum(
            ((p[n] - theta[n]) ** 2).sum() for n in p
        )

    w = {n: t.clone().requires_grad_() for n, t in theta.items()}
    opt = torch.optim.LBFGS(
        list(w.values()), max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective(w)
        loss.backward()
        return loss

    opt.step(closure)
    g_min = float(objective(w).detach())

    model = hf(lin, lam=lam, newton_steps=6, task_mode="loop")
    model.train()
    trace: list[Tensor] = []
    phi = model.newton_solve(objective, theta, steps=6, trace=trace)
    gaps = [float(t) - g_min for t in trace]
    assert all(later < earlier for earlier, later in itertools.pairwise(gaps))  # strictly decreasing
    assert gaps[-1] < 1e-10 and gaps[-2] < 1e-5  # the last steps are in the quadratic phase
    torch.testing.assert_close(float(objective(phi)), float(trace[-1]), rtol=1e-12, atol=0.0)
    # adapt() solves the same problem (G with the module's loss) to the same point
    adapted = model.adapt(x, y)
    for n in phi:
        torch.testing.assert_close(adapted[n], phi[n], rtol=1e-9, atol=1e-12)
    # gradient descent at the same number of inner iterations, at any of these rates, is far from the minimum
    for lr in (0.1, 0.3, 1.0, 3.0):
        gd = IMAML(lin, lam=lam, inner_lr=lr, inner_steps=6, task_mode="loop")
        gd.train()
        assert float(objective(gd.adapt(x, y))) - g_min > 1e-4, lr


def test_line_search_keeps_g_from_rising_on_a_non_convex_net() -> None:
    lam = 0.1
    net = two_layer()
    e = blob_episode(0, ways=3, shots=4)
    x, y = e.support_x.double(), e.support_y
    theta = {n: p.detach().clone() for n, p in net.named_parameters()}

    def objective(p: Params) -> Tensor:
        return F.cross_entropy(functional_forward(net, p, x), y) + lam / 2 * sum(
            ((p[n] - theta[n]) ** 2).sum() for n in p
        )

    model = hf(net, lam=lam, task_mode="loop")
    searched: list[Tensor] = []
    model.newton_solve(objective, theta, steps=8, trace=searched)
    assert all(later <= earlier for earlier, later in itertools.pairwise(searched))
    assert searched[-1] < 0.5 * searched[0]
    model.line_search_steps = 0  # full Newton steps: the non-convex G rises somewhere
    full: list[Tensor] = []
    model.newton_solve(objective, theta, steps=8, trace=full)
    assert any(later > earlier for earlier, later in itertools.pairwise(full))


def test_evaluation_uses_eval_newton_steps() -> None:
    b = batch(1)
    model = hf(two_layer(), lam=1.0, newton_steps=2, eval_newton_steps=0, task_mode="loop")
    model.eval()
    phi = model.adapt(b.support_x[0], b.support_y[0])
    assert all(torch.equal(phi[n], p.detach()) for n, p in model.backbone.named_parameters())
    model.train()
    phi = model.adapt(b.support_x[0], b.support_y[0])
    assert not all(torch.equal(phi[n], p.detach()) for n, p in model.backbone.named_parameters())


def test_inference_mode_is_refused_with_the_fix() -> None:
    b = batch(1)
    model = hf(two_layer(), task_mode="loop")
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        model.adapt(b.support_x[0], b.support_y[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(inner_solver="newton"), "inner_solver='newton'"),
        (dict(inner_solver="hessian_free", inner_rule=AdamRule()), "inner_rule=AdamRule"),
        (dict(newton_steps=-1), "newton_steps=-1"),
        (dict(eval_newton_steps=-2), "eval_newton_steps=-2"),
        (dict(newton_cg_steps=0), "newton_cg_steps=0"),
        (dict(newton_damping=-0.5), "newton_damping=-0.5"),
        (dict(line_search_steps=-1), "line_search_steps=-1"),
        (dict(line_search_shrink=1.0), "line_search_shrink=1.0"),
        (dict(line_search_c=0.0), "line_search_c=0.0"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        IMAML(MLP(), **kwargs)
