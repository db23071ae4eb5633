"""Meta-SGD: constant rates reproduce MAML; the rates' meta-gradient has the closed form of one step."""

from __future__ import annotations

import pytest
import torch

from lightning_meta.algorithms import MAML, MetaSGD
from lightning_meta.nn import MLP
from tests.algorithms._meta_helpers import (
    batch,
    blob_episode,
    grads_of_training_step,
    loader,
    manual_ce_grads,
    trainer,
    two_layer,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*self.log.*")  # Lightning's advice for real training runs


def test_constant_rates_equal_maml() -> None:
    b = batch()
    msgd = MetaSGD(two_layer(), inner_lr_init=0.4, inner_steps=2, task_mode="vmap")
    maml = MAML(two_layer(), inner_lr=0.4, inner_steps=2, task_mode="loop")
    gs, gm = grads_of_training_step(msgd, b), grads_of_training_step(maml, b)
    for n in gm:
        torch.testing.assert_close(gs[n], gm[n], rtol=1e-9, atol=1e-12)
    assert set(msgd.inner_lrs) == {n.replace(".", "__") for n, _ in msgd.backbone.named_parameters()}


def test_rate_gradient_closed_form_one_step() -> None:
    """dL/d alpha = -(1/B) sum_t grad_{theta'} L_query,t  *  grad_theta L_support,t for one inner step."""
    b = batch()
    msgd = MetaSGD(two_layer(), inner_lr_init=0.3, inner_steps=1, task_mode="loop")
    got = grads_of_training_step(msgd, b)
    theta = {n: p.detach() for n, p in msgd.backbone.named_parameters()}
    expected = {n: torch.zeros_like(p) for n, p in theta.items()}
    for t in range(b.tasks):
        gs = manual_ce_grads(theta, b.support_x[t], b.support_y[t])
        fast = {n: theta[n] - 0.3 * gs[n] for n in theta}
        gq = manual_ce_grads(fast, b.query_x[t], b.query_y[t])
        for n in theta:
            expected[n] -= gq[n] * gs[n] / b.tasks
    for n in theta:
        torch.testing.assert_close(got[f"inner_lrs.{n.replace('.', '__')}"], expected[n], rtol=1e-8, atol=1e-11)


def test_rates_are_trained_by_the_default_optimizer() -> None:
    torch.manual_seed(0)
    msgd = MetaSGD(MLP(4, 3, hidden=(8,)), inner_lr_init=0.1, task_mode="loop")
    before = {n: p.detach().clone() for n, p in msgd.inner_lrs.items()}
    trainer(max_steps=2).fit(msgd, loader([blob_episode(i) for i in range(8)], tasks=4))
    assert all(not torch.equal(before[n], p) for n, p in msgd.inner_lrs.items())
    assert dict(msgd.hparams)["inner_lr_init"] == 0.1 and "inner_lr" not in msgd.hparams


def test_random_rate_initialisation_is_uniform_in_the_range_and_seeded() -> None:
    torch.manual_seed(3)
    a = MetaSGD(two_layer(), inner_lr_init_range=(0.005, 0.1))
    torch.manual_seed(3)
    b = MetaSGD(two_layer(), inner_lr_init_range=(0.005, 0.1))
    rates = torch.cat([r.detach().flatten() for r in a.inner_lrs.values()])
    assert rates.min() >= 0.005 and rates.max() < 0.1
    assert rates.std() > 0.02  # not a constant: uniform on [0.005, 0.1) has std 0.027
    for k in a.inner_lrs:
        torch.testing.assert_close(a.inner_lrs[k], b.inner_lrs[k], rtol=0, atol=0)
    assert all(a.inner_lrs[n.replace(".", "__")].shape == p.shape for n, p in a.backbone.named_parameters())
    try:
        MetaSGD(two_layer(), inner_lr_init_range=(0.1, 0.01))
    except ValueError as err:
        assert "low < high" in str(err)
    else:
        raise AssertionError("a reversed range must be refused")
