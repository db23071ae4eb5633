"""MAML/FOMAML: module-level meta-gradients against a hand-unrolled reference, chunking, learning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_meta.algorithms import MAML
from lightning_meta.episode import Episode
from lightning_meta.nn import MLP, Conv4, convert_batchnorm
from tests.algorithms._meta_helpers import (
    batch,
    blob_episode,
    grads_of_training_step,
    loader,
    manual_ce_grads,
    reference,
    sine_episode,
    trainer,
    two_layer,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*self.log.*")  # Lightning's advice for real training runs


@pytest.mark.parametrize("mode", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_matches_reference(mode: str, steps: int, first_order: bool) -> None:
    maml = MAML(two_layer(), inner_lr=0.5, inner_steps=steps, first_order=first_order, task_mode=mode)
    b = batch()
    got = grads_of_training_step(maml, b)
    ref = reference(maml.backbone, b, 0.5, steps, first_order)
    for n in ref:
        torch.testing.assert_close(got[f"backbone.{n}"], ref[n], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 3])
def test_task_chunks_give_the_same_meta_gradient(chunk: int) -> None:
    b = batch(4)
    whole = grads_of_training_step(MAML(two_layer(), inner_lr=0.5, inner_steps=2, task_mode="loop"), b)
    chunked = grads_of_training_step(
        MAML(two_layer(), inner_lr=0.5, inner_steps=2, task_mode="vmap", task_chunk=chunk), b
    )
    for n in whole:
        torch.testing.assert_close(chunked[n], whole[n], rtol=1e-9, atol=1e-12)


def test_surrogate_loss_value_is_the_mean_query_loss() -> None:
    maml = MAML(two_layer(), inner_lr=0.5, inner_steps=1, task_mode="loop")
    b = batch()
    losses, _ = maml.task_losses(b)
    torch.testing.assert_close(maml.training_step(b, 0).detach(), losses.mean().detach())


def test_eval_adapts_with_eval_steps_and_without_graph() -> None:
    maml = MAML(two_layer(), inner_lr=0.5, inner_steps=1, eval_inner_steps=3, task_mode="loop").eval()
    b = batch(1)
    state = maml.adapt(b.support_x[0], b.support_y[0])
    assert all(not t.requires_grad for t in state.values())
    w = {n: p.detach() for n, p in maml.backbone.named_parameters()}
    for _ in range(3):
        g = manual_ce_grads(w, b.support_x[0], b.support_y[0])
        w = {n: w[n] - 0.5 * g[n] for n in w}
    for n in w:
        torch.testing.assert_close(state[n], w[n])


def test_fused_batchnorm_is_not_vmapped_for_second_order() -> None:
    net = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.ReLU(), nn.Linear(6, 3)
    ).double()
    b = batch(2)
    with pytest.raises(ValueError, match="convert_batchnorm"):
        grads_of_training_step(MAML(net, task_mode="vmap"), b)
    auto = grads_of_training_step(MAML(net, task_mode="auto"), b)  # falls back to the loop
    converted = grads_of_training_step(MAML(convert_batchnorm(net), task_mode="vmap"), b)
    for n in auto:  # the fused-BN vmap error is ~1e-2; fused vs primitive BN differ by rounding only
        torch.testing.assert_close(converted[n], auto[n], rtol=1e-6, atol=1e-8)


def test_running_stats_batchnorm_is_rejected() -> None:
    with pytest.raises(ValueError, match="track_running_stats=False"):
        MAML(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)))


def test_unbatched_episode_is_rejected() -> None:
    with pytest.raises(ValueError, match="Episode.collate"):
        MAML(two_layer())(blob_episode(0))


def test_maml_learns_sinusoid_regression() -> None:
    """150 meta-steps on sinusoids: post-adaptation MSE on held-out tasks falls well below that of the initial weights."""
    torch.manual_seed(0)
    maml = MAML(MLP(), inner_lr=0.01, inner_steps=1, eval_inner_steps=5, meta_lr=1e-2, task_mode="vmap")
    train = loader([sine_episode(1000 + i) for i in range(1500)], tasks=10)
    val = loader([sine_episode(i) for i in range(50)], tasks=50)
    t = trainer(max_epochs=1)
    before = t.validate(maml, val, verbose=False)[0]["val/mse"]
    t.fit(maml, train)
    after = t.validate(maml, val, verbose=False)[0]["val/mse"]
    assert after < 0.5 * before, (before, after)


def test_conv4_maml_step_runs_vmapped_with_transductive_bn() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 1, 28, 28)
    y = torch.arange(3).repeat(2, 1)
    b = Episode(x, y, x, y)
    maml_v = MAML(Conv4(3, hidden=8), inner_lr=0.4, task_mode="vmap")
    maml_l = MAML(Conv4(3, hidden=8), inner_lr=0.4, task_mode="loop")
    maml_l.load_state_dict(maml_v.state_dict())
    gv, gl = grads_of_training_step(maml_v, b), grads_of_training_step(maml_l, b)
    for n in gv:
        torch.testing.assert_close(gv[n], gl[n], rtol=1e-4, atol=1e-6)


def test_vmap_gives_each_task_its_own_dropout_mask() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 3))
    maml = MAML(net, inner_lr=0.1, task_mode="vmap").train()
    one = Episode.collate([blob_episode(0)])
    same = Episode.collate([blob_episode(0)] * 3)  # three identical tasks
    out = maml(same)
    assert out.shape == (3, 6, 3) and not torch.allclose(out[0], out[1])
    maml.eval()
    torch.testing.assert_close(maml(same)[1], maml(one)[0])  # no dropout at evaluation: identical tasks agree


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_zero_init_head_adapts_to_the_closed_form_and_stays_zero(mode: str) -> None:
    """The zeroing trick: with W = 0 the logits are the bias b, so one inner step on the mean CE gives
    W' = -alpha/N * sum_i (softmax(b) - onehot(y_i)) f_i^T, with f_i the body's features (a closed form)."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(3, 6), nn.Tanh())
    net = nn.Sequential(body, nn.Linear(6, 4))
    with pytest.raises(ValueError, match="not adapted parameters"):
        MAML(net, zero_init=("1.weigth",))
    model = MAML(net, inner_lr=0.7, inner_steps=1, zero_init=("1.weight",), task_mode=mode)
    assert torch.count_nonzero(net[1].weight) == 0
    model.train()
    sx, sy = torch.randn(2, 8, 3), torch.randint(0, 4, (2, 8))
    with torch.no_grad():
        net[1].weight.fill_(5.0)  # a stale non-zero value (e.g. an old checkpoint) must not leak into the inner loop
    for t in range(2):
        fast = model.adapt(sx[t], sy[t])
        feats = body(sx[t])
        p = torch.softmax(net[1].bias, 0).expand(8, 4)
        expected = -0.7 / 8 * (p - nn.functional.one_hot(sy[t], 4)).T @ feats
        torch.testing.assert_close(fast["1.weight"], expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        net[1].weight.zero_()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    loss = model.training_step(Episode(sx, sy, torch.randn(2, 8, 3), torch.randint(0, 4, (2, 8))), 0)
    loss.backward()
    assert torch.count_nonzero(net[1].weight.grad) == 0 and net[0][0].weight.grad.abs().sum() > 0
    opt.step()
    assert torch.count_nonzero(net[1].weight) == 0  # no outer gradient: it stays zero
