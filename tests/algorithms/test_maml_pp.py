"""MAML++: every switch off is MAML; MSL against a hand-unrolled reference with the annealed weights; LSLR,
per-step batch norm (weights and running statistics), derivative-order annealing, cosine annealing; the warning
when the support loss rises during evaluation adaptation."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lightning_meta.algorithms.maml import MAML
from lightning_meta.algorithms.maml_pp import MAMLPlusPlus, per_step_loss_weights
from lightning_meta.episode import Episode
from lightning_meta.nn import Conv4, StepBatchNorm
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

OFF = {"multi_step_loss": False, "learnable_inner_rates": False, "per_step_bn_weights": False, "per_step_bn_stats": False,
           "first_order_epochs": 0, "cosine_annealing": False}  # fmt: skip


def small_conv() -> Conv4:
    torch.manual_seed(0)
    return Conv4(3, in_channels=1, hidden=4).double()


def image_batch(tasks: int = 2) -> Episode:
    g = torch.Generator().manual_seed(0)
    sx = torch.randn(tasks, 6, 1, 12, 12, generator=g, dtype=torch.float64)
    qx = torch.randn(tasks, 6, 1, 12, 12, generator=g, dtype=torch.float64)
    y = torch.tensor([[0, 1, 2, 0, 1, 2]] * tasks)
    return Episode(sx, y, qx, y)


def test_per_step_loss_weights_follow_the_reference_schedule() -> None:
    assert per_step_loss_weights(5, 0, 10) == pytest.approx([0.2] * 5)
    assert per_step_loss_weights(5, 5, 10) == pytest.approx([0.1] * 4 + [0.6])
    assert per_step_loss_weights(5, 100, 10) == pytest.approx([0.006] * 4 + [0.976])
    for epoch in range(15):
        assert sum(per_step_loss_weights(4, epoch, 10)) == pytest.approx(1.0)


@pytest.mark.parametrize("adapt_norm", [True, False])
def test_all_switches_off_equals_maml_on_a_batch_norm_network(adapt_norm: bool) -> None:
    b = image_batch()
    pp = MAMLPlusPlus(small_conv(), inner_lr=0.3, inner_steps=2, adapt_norm=adapt_norm, task_mode="loop", **OFF)
    maml = MAML(small_conv(), inner_lr=0.3, inner_steps=2, adapt_norm=adapt_norm, task_mode="loop")
    assert set(dict(pp.named_parameters())) == set(dict(maml.named_parameters()))
    got, ref = grads_of_training_step(pp, b), grads_of_training_step(maml, b)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)
    pp.eval()
    maml.eval()
    torch.testing.assert_close(pp(b), maml(b), rtol=1e-10, atol=1e-12)
    assert isinstance(pp.configure_optimizers(), torch.optim.Adam)


def test_zero_init_with_switches_off_equals_maml_with_the_zeroing_trick() -> None:
    b = image_batch()
    kw = {"inner_lr": 0.3, "inner_steps": 2, "adapt_norm": False, "task_mode": "loop"}
    pp = MAMLPlusPlus(small_conv(), zero_init=("head.weight",), **kw, **OFF)
    maml = MAML(small_conv(), zero_init=("head.weight",), **kw)
    assert pp.backbone.head.weight.abs().max() == 0
    got, ref = grads_of_training_step(pp, b), grads_of_training_step(maml, b)
    assert got["backbone.head.weight"].abs().max() == 0  # the head's weight never leaves zero
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)
    plain = grads_of_training_step(MAML(small_conv(), **kw), b)
    assert not torch.allclose(plain["backbone.features.0.weight"], got["backbone.features.0.weight"])
    pp.eval()
    maml.eval()
    torch.testing.assert_close(pp(b), maml(b), rtol=1e-10, atol=1e-12)


def test_constant_learned_rates_and_msl_on_the_last_step_only_equal_maml() -> None:
    b = batch(3)
    pp = MAMLPlusPlus(two_layer(), inner_lr=0.4, inner_steps=3, adapt_norm=True, multi_step_loss_epochs=10,
                      per_step_bn_weights=False, per_step_bn_stats=False, first_order_epochs=0, task_mode="loop")  # fmt: skip
    pp.schedule_epoch = 10  # MSL annealed away: last step only
    got = grads_of_training_step(pp, b)
    ref = grads_of_training_step(MAML(two_layer(), inner_lr=0.4, inner_steps=3, task_mode="loop"), b)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)
    rates = [n for n in got if n.startswith("inner_lrs.")]
    assert len(rates) == 4 and all(got[n].abs().min() > 0 for n in rates)  # every step's rate is learned


def msl_reference(model, b: Episode, rates, weights) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Hand-unrolled MSL with per-step per-tensor rates ``rates[s][name]``; gradients w.r.t. weights and rates."""
    theta = {
        n[len("backbone.") :]: p.detach().clone().requires_grad_()
        for n, p in model.named_parameters()
        if n.startswith("backbone.")
    }
    lrs = [{n: torch.tensor(r[n], dtype=torch.float64, requires_grad=True) for n in theta} for r in rates]
    total = 0.0
    for t in range(b.tasks):
        w = dict(theta)
        for s, weight in enumerate(weights):
            g = manual_ce_grads(w, b.support_x[t], b.support_y[t])
            w = {n: w[n] - lrs[s][n] * g[n] for n in w}
            logits = (
                torch.relu(b.query_x[t] @ w["features.0.weight"].T + w["features.0.bias"]) @ w["head.weight"].T
                + w["head.bias"]
            )
            total = total + weight * F.cross_entropy(logits, b.query_y[t])
    leaves = list(theta.values()) + [lrs[s][n] for s in range(len(weights)) for n in theta]
    grads = torch.autograd.grad(total / b.tasks, leaves)
    out = {f"backbone.{n}": g for n, g in zip(theta, grads)}
    k = len(theta)
    for s in range(len(weights)):
        for i, n in enumerate(theta):
            out[f"inner_lrs.{n.replace('.', '__')}.{s}"] = grads[k + s * len(theta) + i]
    return out, total / b.tasks


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_multi_step_loss_with_learned_rates_matches_hand_unrolled_reference(mode: str) -> None:
    b = batch(3)
    pp = MAMLPlusPlus(two_layer(), inner_lr=0.4, inner_steps=3, adapt_norm=True, multi_step_loss_epochs=4,
                      per_step_bn_weights=False, per_step_bn_stats=False, first_order_epochs=0, task_mode=mode)  # fmt: skip
    with torch.no_grad():  # distinct per-step per-tensor rates
        for i, r in enumerate(pp.inner_lrs.values()):
            r.copy_(torch.tensor([0.2 + 0.05 * i, 0.4, 0.3 - 0.02 * i]))
    pp.schedule_epoch = 1
    weights = per_step_loss_weights(3, 1, 4)
    assert weights[0] != weights[-1]
    rates = [{n.replace("__", "."): float(r[s].detach()) for n, r in pp.inner_lrs.items()} for s in range(3)]
    ref, ref_loss = msl_reference(pp, b, rates, weights)
    pp.zero_grad()
    pp.train()
    loss = pp.training_step(b, 0)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-10, atol=1e-12)
    loss.backward()
    for n, p in pp.named_parameters():
        if n.startswith("backbone."):
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-9, atol=1e-11)
        else:
            name = n[len("inner_lrs.") :]
            for s in range(3):
                torch.testing.assert_close(p.grad[s], ref[f"inner_lrs.{name}.{s}"], rtol=1e-9, atol=1e-11)


def test_derivative_order_annealing_is_first_order_then_second_order() -> None:
    b = batch(2)
    kw = {"inner_lr": 0.4, "inner_steps": 2, "adapt_norm": True, "multi_step_loss": False, "learnable_inner_rates": False,
              "per_step_bn_weights": False, "per_step_bn_stats": False, "cosine_annealing": False, "task_mode": "loop"}  # fmt: skip
    pp = MAMLPlusPlus(two_layer(), first_order_epochs=3, **kw)
    fo = grads_of_training_step(MAML(two_layer(), inner_lr=0.4, inner_steps=2, first_order=True, task_mode="loop"), b)
    so = grads_of_training_step(MAML(two_layer(), inner_lr=0.4, inner_steps=2, task_mode="loop"), b)
    pp.schedule_epoch = 2
    early = grads_of_training_step(pp, b)
    pp.schedule_epoch = 3
    late = grads_of_training_step(pp, b)
    for n in fo:
        torch.testing.assert_close(early[n], fo[n], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(late[n], so[n], rtol=1e-10, atol=1e-12)
    assert max((fo[n] - so[n]).abs().max().item() for n in fo) > 1e-4


def test_per_step_bn_weights_with_equal_rows_sum_to_the_shared_parameter_gradient() -> None:
    b = image_batch()
    pp = MAMLPlusPlus(small_conv(), inner_lr=0.3, inner_steps=2, per_step_bn_weights=True, per_step_bn_stats=False,
                      multi_step_loss=False, learnable_inner_rates=False, first_order_epochs=0,
                      cosine_annealing=False, task_mode="loop")  # fmt: skip
    maml = MAML(small_conv(), inner_lr=0.3, inner_steps=2, adapt_norm=False, task_mode="loop")
    norms = [n for n, m in pp.backbone.named_modules() if isinstance(m, StepBatchNorm)]
    assert len(norms) == 4 and pp.backbone.get_parameter(f"{norms[0]}.weight").shape == (2, 4)
    got, ref = grads_of_training_step(pp, b), grads_of_training_step(maml, b)
    for n in ref:
        g = got[n]
        if any(n == f"backbone.{m}.{p}" for m in norms for p in ("weight", "bias")):
            assert g.shape == (2, 4) and g[0].abs().sum() > 0 and g[1].abs().sum() > 0
            g = g.sum(0)  # both steps' rows are used: shared parameter = sum over rows
        torch.testing.assert_close(g, ref[n], rtol=1e-10, atol=1e-12)
    assert all(not n.startswith(tuple(norms)) for n in pp.adapt_names)  # per-step BN is meta-learned, not adapted


def test_per_step_running_statistics_are_collected_in_training_and_used_at_evaluation() -> None:
    b = image_batch()
    pp = MAMLPlusPlus(small_conv(), inner_lr=0.3, inner_steps=2, multi_step_loss=False, first_order_epochs=0,
                      cosine_annealing=False, task_mode="auto")  # fmt: skip
    norm = pp.backbone.features[1]
    assert isinstance(norm, StepBatchNorm) and pp.vmap_unsafe_reason() is not None
    with pytest.raises(ValueError, match="per-step running statistics"):
        MAMLPlusPlus(small_conv(), task_mode="vmap").training_step(b, 0)
    pp.train()
    pp.training_step(b, 0)
    assert not torch.equal(norm.running_mean[0], norm.running_mean[1])  # each step updated its own row
    assert norm.running_mean.abs().sum() > 0
    pp.eval()
    before = pp(b)
    with torch.no_grad():
        norm.running_var[1].mul_(4.0)  # the last step's statistics drive the query forward at evaluation
    assert not torch.allclose(pp(b), before)
    pp.eval()
    assert pp.vmap_unsafe_reason() is None


def test_cosine_annealing_of_the_meta_learning_rate() -> None:
    pp = MAMLPlusPlus(two_layer(), meta_lr=1e-3, min_meta_lr=1e-5, total_epochs=4, iterations_per_epoch=3)
    conf = pp.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["frequency"] == 3 and conf["lr_scheduler"]["interval"] == "step"
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR) and sched.T_max == 4 and sched.eta_min == 1e-5
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in ids for p in pp.inner_lrs.parameters())


def test_fit_uses_the_schedule_epoch_of_the_global_step() -> None:
    torch.manual_seed(0)
    pp = MAMLPlusPlus(Conv4(3, in_channels=1, hidden=4), inner_steps=2, iterations_per_epoch=2, task_mode="loop")
    episodes = [Episode(torch.randn(6, 1, 12, 12), torch.tensor([0, 1, 2] * 2), torch.randn(3, 1, 12, 12), torch.tensor([0, 1, 2]))
                for _ in range(5)]  # fmt: skip
    trainer(max_steps=5).fit(pp, loader(episodes, tasks=1))
    assert pp.schedule_epoch == 2  # global step 4 // 2 at the last batch


def test_warns_once_when_the_support_loss_rises_during_evaluation() -> None:
    torch.manual_seed(0)
    episodes = [blob_episode(i) for i in range(4)]
    from lightning_meta.nn import MLP

    model = MAML(MLP(4, 3, hidden=(8,)), inner_lr=60.0, inner_steps=1, eval_inner_steps=3, task_mode="loop")
    model.eval()
    b = Episode.collate(episodes)
    mean = torch.stack([model.support_losses(b.support_x[t], b.support_y[t]) for t in range(4)]).mean(0)
    assert mean.shape == (4,) and mean[-1] > mean[0]
    with pytest.warns(RuntimeWarning, match=r"support loss rises during evaluation adaptation .*mean .*inner_lr"):
        trainer().validate(model, loader(episodes, tasks=2), verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # once per learner
        trainer().validate(model, loader(episodes, tasks=2), verbose=False)
    calm = MAML(MLP(4, 3, hidden=(8,)), inner_lr=0.1, eval_inner_steps=3, task_mode="loop")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer().validate(calm, loader(episodes, tasks=2), verbose=False)
    calm.eval()
    assert calm.check_support_loss(b) is not None  # it measured, and the loss fell


def test_warns_when_one_task_diverges_although_the_mean_falls() -> None:
    from lightning_meta.nn import MLP

    converging = [3.0, 0.5, 0.1, 0.05]
    traces = torch.tensor([converging, converging, [3.0, 0.01, 0.03, 0.09], converging])  # task 2 triples twice

    class Traced(MAML):
        def support_losses(self, support_x: torch.Tensor, support_y: torch.Tensor) -> torch.Tensor:
            return traces[int(support_y[0])]  # the test tells each task apart by its first label

    model = Traced(MLP(4, 3, hidden=(8,)), inner_lr=0.1, task_mode="loop")
    model.eval()
    b = Episode(torch.zeros(4, 3, 4), torch.arange(4).unsqueeze(1).expand(4, 3) % 4, torch.zeros(4, 3, 4),
                torch.zeros(4, 3, dtype=torch.long))  # fmt: skip
    assert bool((traces.mean(0)[1:] < traces.mean(0)[:-1]).all())
    with pytest.warns(RuntimeWarning, match=r"in 1 of the first 4 tasks .*task 2: 3 -> 0.01 -> 0.03 -> 0.09"):
        model.check_support_loss(b)
    calm = Traced(MLP(4, 3, hidden=(8,)), inner_lr=0.1, task_mode="loop")
    calm.eval()
    traces[2] = torch.tensor([3.0, 0.01, 0.0101, 0.0102])  # rises by 1 %: not a divergence
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert calm.check_support_loss(b) is not None


def test_bf16_autocast_on_cpu_gives_a_finite_loss() -> None:
    pp = MAMLPlusPlus(Conv4(3, in_channels=1, hidden=4), inner_steps=2, task_mode="loop")
    b = Episode(
        torch.randn(2, 6, 1, 12, 12),
        torch.tensor([[0, 1, 2] * 2] * 2),
        torch.randn(2, 3, 1, 12, 12),
        torch.tensor([[0, 1, 2]] * 2),
    )
    pp.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pp.training_step(b, 0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["MAMLPlusPlus", "Reptile", "IMAML"])
def test_new_learners_share_the_execution_arguments(name: str) -> None:
    import inspect

    from lightning_meta import algorithms

    expect = {"task_mode": "auto", "task_chunk": "auto", "inner_loss_scale": None, "cuda_graphs": False,
              "max_consecutive_skipped_steps": 100}  # fmt: skip
    params = inspect.signature(getattr(algorithms, name).__init__).parameters
    assert {k: params[k].default for k in expect} == expect
    assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in expect)
