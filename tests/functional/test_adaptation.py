"""The functional inner loop against a hand-unrolled reference with closed-form MLP gradients."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_meta.functional import adapt, functional_forward, gradient_steps, loop_tasks, vmap_tasks


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


def reference_outer_grads(model: nn.Module, data, lr, steps: int, first_order: bool) -> dict[str, Tensor]:
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    sx, sy, qx, qy = data
    total = 0.0
    for t in range(sx.shape[0]):
        w = dict(theta)
        for _ in range(steps):
            g = manual_grads(w, sx[t], sy[t])
            if first_order:
                g = {n: v.detach() for n, v in g.items()}
            w = {n: w[n] - (lr[n] if isinstance(lr, dict) else lr) * g[n] for n in w}
        out, _ = manual_forward(w, qx[t])
        total = total + ((out - qy[t]) ** 2).mean()
    total = total / sx.shape[0]
    grads = torch.autograd.grad(total, list(theta.values()))
    return dict(zip(theta, grads))


def library_outer_grads(model: nn.Module, data, lr, steps: int, first_order: bool, mode: str) -> dict[str, Tensor]:
    sx, sy, qx, qy = data
    params = dict(model.named_parameters())
    mse = lambda out, y: ((out - y) ** 2).mean()  # noqa: E731

    def one_task(sx_t, sy_t, qx_t, qy_t):
        fast = adapt(model, params, sx_t, sy_t, steps=steps, lr=lr, first_order=first_order, loss_fn=mse)
        return mse(functional_forward(model, fast, qx_t), qy_t)

    run = vmap_tasks if mode == "vmap" else loop_tasks
    losses = run(one_task, sx, sy, qx, qy)
    grads = torch.autograd.grad(losses.mean(), list(params.values()))
    return dict(zip(params, grads))


@pytest.mark.parametrize("mode", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_outer_gradient_matches_hand_unrolled_reference(mode: str, steps: int, first_order: bool) -> None:
    model, data = mlp(), tasks_data()
    ref = reference_outer_grads(model, data, 0.3, steps, first_order)
    got = library_outer_grads(model, data, 0.3, steps, first_order, mode)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-11)


def test_second_order_differs_from_first_order() -> None:
    """Guards the reference itself: the second-order terms are not negligible in this setup."""
    model, data = mlp(), tasks_data()
    so = reference_outer_grads(model, data, 0.3, 3, False)
    fo = reference_outer_grads(model, data, 0.3, 3, True)
    assert max((so[n] - fo[n]).abs().max().item() for n in so) > 1e-3


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_per_tensor_and_per_element_rates(mode: str) -> None:
    model, data = mlp(), tasks_data()
    per_tensor = {"0.weight": 0.1, "0.bias": 0.2, "2.weight": 0.3, "2.bias": 0.4}
    ref = reference_outer_grads(model, data, per_tensor, 2, False)
    got = library_outer_grads(model, data, per_tensor, 2, False, mode)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-11)
    per_element = {n: torch.full_like(p, per_tensor[n]) for n, p in model.named_parameters()}
    got_el = library_outer_grads(model, data, per_element, 2, False, mode)
    for n in ref:
        torch.testing.assert_close(got_el[n], ref[n], rtol=1e-9, atol=1e-11)


def test_adapt_subset_leaves_others_and_matches_reference_step() -> None:
    model, (sx, sy, _, _) = mlp(), tasks_data()
    params = dict(model.named_parameters())
    mse = lambda out, y: ((out - y) ** 2).mean()  # noqa: E731
    fast = adapt(model, {"2.weight": params["2.weight"]}, sx[0], sy[0], steps=1, lr=0.5, loss_fn=mse)
    assert list(fast) == ["2.weight"]
    g = manual_grads({n: p.detach() for n, p in params.items()}, sx[0], sy[0])
    torch.testing.assert_close(fast["2.weight"].detach(), params["2.weight"].detach() - 0.5 * g["2.weight"])


def test_loss_scale_gives_the_same_step() -> None:
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    plain = gradient_steps(lambda f: (f["w"] ** 3).sum(), {"w": w}, steps=2, lr=0.01)
    scaled = gradient_steps(lambda f: (f["w"] ** 3).sum(), {"w": w}, steps=2, lr=0.01, loss_scale=1024.0)
    torch.testing.assert_close(plain["w"], scaled["w"])


def test_no_graph_when_first_order_on_detached_tensors() -> None:
    model, (sx, sy, _, _) = mlp(), tasks_data()
    fast = adapt(
        model,
        {n: p.detach() for n, p in model.named_parameters()},
        sx[0],
        sy[0],
        loss_fn=lambda o, y: ((o - y) ** 2).mean(),
        first_order=True,
    )
    # Evaluation-style adaptation keeps no graph at all: nothing to free, nothing to leak.
    assert all(not t.requires_grad and t.grad_fn is None for t in fast.values())


def test_errors_name_the_fix() -> None:
    model, (sx, sy, _, _) = mlp(), tasks_data()
    with pytest.raises(KeyError, match="not parameters"):
        adapt(model, {"nope": torch.zeros(1)}, sx[0], sy[0])
    with pytest.raises(KeyError, match="no rate"):
        adapt(model, dict(model.named_parameters()), sx[0], sy[0], lr={"0.weight": 0.1})
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"Trainer\(inference_mode=False\)"):
        adapt(model, dict(model.named_parameters()), sx[0], sy[0])
