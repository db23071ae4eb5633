"""Reptile: the update is theta + epsilon * mean(theta' - theta) with theta' from a hand-written inner Adam."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_meta.algorithms.reptile import Reptile
from lightning_meta.episode import Episode
from lightning_meta.nn import MLP, Conv4
from tests.algorithms._meta_helpers import (
    batch,
    blob_episode,
    grads_of_training_step,
    loader,
    manual_ce_grads,
    trainer,
    two_layer,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*(self.log|val_dataloader|num_workers).*")


def hand_adam(w: dict[str, Tensor], sx: Tensor, sy: Tensor, lr: float, steps: int, betas=(0.0, 0.999), eps=1e-8):
    m = {n: torch.zeros_like(v) for n, v in w.items()}
    v = {n: torch.zeros_like(t) for n, t in w.items()}
    for t in range(1, steps + 1):
        g = manual_ce_grads(w, sx, sy)
        m = {n: betas[0] * m[n] + (1 - betas[0]) * g[n] for n in w}
        v = {n: betas[1] * v[n] + (1 - betas[1]) * g[n] ** 2 for n in w}
        w = {n: w[n] - lr / (1 - betas[0] ** t) * m[n] / (v[n].sqrt() / math.sqrt(1 - betas[1] ** t) + eps) for n in w}
    return w


def test_default_optimizer_step_is_theta_plus_epsilon_times_mean_displacement_float64() -> None:
    model = Reptile(two_layer(), inner_lr=0.05, inner_steps=3, inner_batch_size=None, meta_step_size=0.7,
                    meta_iterations=10, task_mode="loop")  # fmt: skip
    b = batch(4)
    theta = {n[len("backbone.") :]: p.detach().clone() for n, p in model.named_parameters()}
    mean_disp = {n: torch.zeros_like(v) for n, v in theta.items()}
    for t in range(b.tasks):
        prime = hand_adam(dict(theta), b.support_x[t], b.support_y[t], lr=0.05, steps=3)
        for n, value in theta.items():
            mean_disp[n] += (prime[n] - value) / b.tasks
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.SGD) and conf["lr_scheduler"]["interval"] == "step"
    model.train()
    model.training_step(b, 0).backward()
    opt.step()
    sched.step()
    for n, p in model.named_parameters():
        expect = theta[n[len("backbone.") :]] + 0.7 * mean_disp[n[len("backbone.") :]]
        torch.testing.assert_close(p.detach(), expect, rtol=1e-12, atol=1e-12)
    assert max(v.abs().max().item() for v in mean_disp.values()) > 1e-3
    # epsilon anneals linearly to meta_step_size_final (0) over meta_iterations steps, then stays there
    assert opt.param_groups[0]["lr"] == pytest.approx(0.7 * 0.9)
    assert model.meta_step_size_at(5) == pytest.approx(0.35) and model.meta_step_size_at(20) == 0.0


def test_fit_moves_towards_the_adapted_weights_and_sgd_inner_loop() -> None:
    torch.manual_seed(0)
    model = Reptile(MLP(4, 3, hidden=(8,)), inner_lr=0.3, inner_steps=2, inner_batch_size=None,
                    inner_optimizer="sgd", meta_step_size=0.5, task_mode="loop")  # fmt: skip
    episodes = [blob_episode(i) for i in range(4)]
    b = Episode.collate(episodes)
    theta = {n[len("backbone.") :]: p.detach().clone() for n, p in model.named_parameters()}
    disp = {n: torch.zeros_like(v) for n, v in theta.items()}
    for t in range(4):  # plain gradient descent inner loop, by hand
        w = dict(theta)
        for _ in range(2):
            g = manual_ce_grads(w, b.support_x[t], b.support_y[t])
            w = {n: w[n] - 0.3 * g[n] for n in w}
        for n in w:
            disp[n] += (w[n] - theta[n]) / 4
    trainer(max_steps=1).fit(model, loader(episodes, tasks=4))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), theta[n[len("backbone."):]] + 0.5 * disp[n[len("backbone."):]],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_minibatches_cycle_through_permutations_of_the_support_set() -> None:
    torch.manual_seed(0)
    idx = Reptile.minibatch_indices(10, 5, 4, None)
    assert idx.shape == (5, 4)
    flat = idx.reshape(-1)
    assert sorted(flat[:10].tolist()) == list(range(10))  # first pass: every example once
    assert sorted(flat[10:20].tolist()) == list(range(10))
    assert Reptile.minibatch_indices(10, 5, None, None) is None and Reptile.minibatch_indices(10, 5, 10, None) is None


def test_training_with_minibatches_uses_only_the_drawn_examples() -> None:
    # with a batch of 1 and one step, the displacement equals one Adam step on the drawn example
    model = Reptile(two_layer(), inner_lr=0.05, inner_steps=1, inner_batch_size=1, task_mode="loop")
    b = batch(1)
    model.train()
    torch.manual_seed(3)
    directions, _, _ = model.task_meta_gradient(b.support_x[0], b.support_y[0], b.query_x[0], b.query_y[0])
    torch.manual_seed(3)
    i = int(Reptile.minibatch_indices(b.support_x.shape[1], 1, 1, None)[0, 0])
    theta = {n[len("backbone.") :]: p.detach() for n, p in model.named_parameters()}
    prime = hand_adam(dict(theta), b.support_x[0][i : i + 1], b.support_y[0][i : i + 1], lr=0.05, steps=1)
    for n, value in theta.items():
        torch.testing.assert_close(directions[f"backbone.{n}"], value - prime[n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_loop_equals_vmap(optimizer: str) -> None:
    b = batch(3)
    got = {}
    for mode in ("loop", "vmap"):
        model = Reptile(two_layer(), inner_lr=0.05, inner_steps=3, inner_batch_size=None,
                        inner_optimizer=optimizer, task_mode=mode)  # fmt: skip
        got[mode] = grads_of_training_step(model, b)
        model.eval()
        got[mode + "_eval"] = model(b)
    for n in got["loop"]:
        torch.testing.assert_close(got["vmap"][n], got["loop"][n], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got["vmap_eval"], got["loop_eval"], rtol=1e-9, atol=1e-12)


def test_non_transductive_prediction_sees_one_query_at_a_time() -> None:
    torch.manual_seed(0)
    net = Conv4(3, in_channels=1, hidden=8)
    model = Reptile(
        net, inner_steps=2, eval_inner_steps=2, eval_inner_batch_size=None, transductive=False, task_mode="loop"
    )
    model.eval()
    sx, sy = torch.randn(1, 3, 1, 28, 28), torch.tensor([[0, 1, 2]])
    qx = torch.randn(1, 4, 1, 28, 28)
    out = model.adapt_and_predict(sx, sy, qx)
    qx2 = qx.clone()
    qx2[:, 1:] = torch.randn(1, 3, 1, 28, 28) * 3  # change the other queries
    torch.testing.assert_close(model.adapt_and_predict(sx, sy, qx2)[:, 0], out[:, 0], rtol=1e-5, atol=1e-6)
    model.transductive = True
    trans = model.adapt_and_predict(sx, sy, qx)
    assert not torch.allclose(model.adapt_and_predict(sx, sy, qx2)[:, 0], trans[:, 0], atol=1e-4)  # batch stats
    assert not torch.allclose(trans, out, atol=1e-4)


def test_bf16_autocast_on_cpu_gives_a_finite_loss() -> None:
    model = Reptile(MLP(4, 3, hidden=(8,)), inner_steps=2, inner_batch_size=None, task_mode="loop")
    b = Episode.collate([blob_episode(i) for i in range(2)])
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_step(b, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.parameters())


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="inner_optimizer='rmsprop'"):
        Reptile(MLP(), inner_optimizer="rmsprop")
    with pytest.raises(ValueError, match="inner_batch_size=0"):
        Reptile(MLP(), inner_batch_size=0)
