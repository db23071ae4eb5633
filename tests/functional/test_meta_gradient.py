"""The functional twin of MetaLearner.training_step (meta_gradient), the fp16 InnerLossScaler and the CUDA-graph key
of a module (module_graph_state), without Lightning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_meta.functional import InnerLossScaler, adapt, functional_forward, meta_gradient, module_graph_state


def tasks(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sx, qx = (
        torch.randn(n, 6, 3, generator=g, dtype=torch.float64),
        torch.randn(n, 4, 3, generator=g, dtype=torch.float64),
    )
    sy, qy = torch.randint(0, 2, (n, 6), generator=g), torch.randint(0, 2, (n, 4), generator=g)
    return sx, sy, qx, qy


def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 2).double()


def one_step_reference(w: torch.Tensor, b: torch.Tensor, batch, lr: float) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Second-order one-step MAML on a linear model, by hand: closed-form inner gradient, autograd outer."""
    w, b = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    total, losses, acc = 0.0, [], []
    sx, sy, qx, qy = batch
    for t in range(sx.shape[0]):
        p = (sx[t] @ w.T + b).softmax(-1)
        d = (p - F.one_hot(sy[t], 2).double()) / sx.shape[1]
        fw, fb = w - lr * d.T @ sx[t], b - lr * d.sum(0)
        out = qx[t] @ fw.T + fb
        loss = F.cross_entropy(out, qy[t])
        total = total + loss
        losses.append(loss.detach())
        acc.append((out.argmax(-1) == qy[t]).double().mean())
    gw, gb = torch.autograd.grad(total / sx.shape[0], (w, b))
    return gw, gb, [torch.stack(losses), torch.stack(acc)]


@pytest.mark.parametrize("mode,chunk", [("loop", 1), ("loop", None), ("vmap", 2), ("vmap", None)])
def test_meta_gradient_of_a_task_loss_matches_the_hand_reference_for_any_chunking(mode: str, chunk) -> None:
    net = linear()
    params = list(net.parameters())
    batch = tasks()

    def task_loss(sx, sy, qx, qy):
        fast = adapt(net, dict(net.named_parameters()), sx, sy, lr=0.7)
        out = functional_forward(net, fast, qx)
        return F.cross_entropy(out, qy), out

    got = meta_gradient(params, *batch, task_loss=task_loss, mode=mode, task_chunk=chunk)
    gw, gb, (losses, acc) = one_step_reference(net.weight, net.bias, batch, 0.7)
    torch.testing.assert_close(got.grads[0], gw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.grads[1], gb, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.losses, losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.scores, acc.to(got.scores.dtype))
    assert not got.nonfinite.any() and not got.losses.requires_grad


def test_loss_scale_changes_nothing_but_rounding_and_a_nonfinite_task_is_flagged() -> None:
    net = linear()
    batch = tasks(4)

    def task_loss(sx, sy, qx, qy):  # a finite loss whose gradient is NaN (sqrt at 0) for a marked task
        out = net(qx)
        return F.cross_entropy(out, qy) + torch.sqrt(net.weight.sum() * 0.0 + (sx[0, 0] < 1e3).double()), out

    plain = meta_gradient(list(net.parameters()), *batch, task_loss=task_loss)
    scaled = meta_gradient(list(net.parameters()), *batch, task_loss=task_loss, loss_scale=1024.0, task_chunk=3)
    for a, b in zip(plain.grads, scaled.grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    sx = batch[0].clone()
    sx[2, 0, 0] = 1e4
    bad = meta_gradient(list(net.parameters()), sx, *batch[1:], task_loss=task_loss, task_chunk=2)
    # task 2's loss is finite but its gradient is not: the tasks of its chunk {2, 3} cannot be told apart
    assert bad.nonfinite.tolist() == [False, False, True, True] and bad.losses.isfinite().all()
    assert not all(torch.isfinite(g).all() for g in bad.grads)


def test_meta_gradient_of_directions_is_their_mean_and_differentiates_nothing() -> None:
    net = linear()
    params = list(net.parameters())
    batch = tasks(4)

    def reptile(sx, sy, qx, qy):
        theta = {n: p.detach() for n, p in net.named_parameters()}
        fast = adapt(net, theta, sx, sy, steps=2, lr=0.5, first_order=True)
        out = functional_forward(net, fast, qx)
        return [theta[n] - fast[n] for n in ("weight", "bias")], F.cross_entropy(out, qy), out

    for mode in ("loop", "vmap"):
        got = meta_gradient(params, *batch, task_direction=reptile, mode=mode, task_chunk=3)
        expect = [torch.stack([reptile(*(t[i] for t in batch))[0][k] for i in range(4)]).mean(0) for k in range(2)]
        for g, e in zip(got.grads, expect):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
        assert not any(g.requires_grad for g in got.grads)
    with pytest.raises(ValueError, match="exactly one of task_loss= and task_direction="):
        meta_gradient(params, *batch)


def test_run_chunk_sees_every_chunk() -> None:
    net = linear()
    seen = []

    def run_chunk(fn, inputs):
        seen.append(inputs[0].shape[0])
        return fn(*inputs)

    def task_loss(sx, sy, qx, qy):
        out = net(qx)
        return F.cross_entropy(out, qy), out

    meta_gradient(list(net.parameters()), *tasks(5), task_loss=task_loss, task_chunk=2, run_chunk=run_chunk)
    assert seen == [2, 2, 1]


def test_inner_loss_scaler_grows_backs_off_and_round_trips() -> None:
    s = InnerLossScaler(init_scale=2.0**15, growth_interval=3)
    for _ in range(3):
        s.update(found_nonfinite=False)
    assert s.scale == 2.0**16 and s.good_steps == 0
    for _ in range(3):
        s.update(False)
    assert s.scale == 2.0**16  # capped at max_scale
    s.update(True)
    assert (s.scale, s.good_steps) == (2.0**15, 0)
    for _ in range(20):
        s.update(True)
    assert s.scale == 1.0  # floor min_scale
    s.update(False)
    fresh = InnerLossScaler()
    fresh.load_state_dict(s.state_dict())
    assert fresh.state_dict() == {"scale": 1.0, "good_steps": 1}
    fixed = InnerLossScaler(init_scale=8.0, dynamic=False)
    fixed.update(True)
    assert fixed.scale == 8.0
    with pytest.raises(ValueError, match="good_steps"):
        fresh.load_state_dict({"scale": 2.0})
    with pytest.raises(ValueError, match="backoff_factor=1.5"):
        InnerLossScaler(backoff_factor=1.5)


def test_graph_key_covers_dict_and_list_of_dict_settings_and_tensors_inside_them() -> None:
    net = nn.Linear(2, 2)
    net.rates = {"weight": 0.1, "bias": 0.2}  # a per-tensor rate
    net.per_step = [{"weight": 0.1}, {"weight": torch.tensor(0.5)}]  # a per-step list of dicts, a CPU scalar tensor
    net.big = {"weight": torch.zeros(100)}  # counted by storage, not values
    first = module_graph_state(net, 1.0)
    assert module_graph_state(net, 1.0) == first
    net.rates["bias"] = 0.3
    assert module_graph_state(net, 1.0) != first
    net.rates["bias"] = 0.2
    assert module_graph_state(net, 1.0) == first
    net.per_step[0]["weight"] = 0.2
    assert module_graph_state(net, 1.0) != first
    net.per_step[0]["weight"] = 0.1
    net.per_step[1]["weight"].fill_(0.6)  # a CPU scalar's value is baked into a recording
    assert module_graph_state(net, 1.0) != first
    net.per_step[1]["weight"].fill_(0.5)
    assert module_graph_state(net, 1.0) == first
    net.big["weight"].fill_(1.0)  # read from memory at replay: same key
    assert module_graph_state(net, 1.0) == first
    net.big["weight"] = torch.zeros(100)  # new storage: new key
    assert module_graph_state(net, 1.0) != first
    assert module_graph_state(net, 2.0) != module_graph_state(net, 1.0)
