"""CAML/CAVIA: meta-gradients against a hand-written context-only MAML, the context's lifetime, the
meta-gradient clamp, FiLM, bf16, DDP and learning on sinusoids and Omniglot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_meta.algorithms.caml import CAML
from lightning_meta.episode import Episode
from lightning_meta.nn.film import ContextConv4, ContextMLP, FiLM
from tests.algorithms._meta_helpers import batch, blob_episode, grads_of_training_step, loader, sine_episode, trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(self.log|num_workers|val_dataloader|sync_dist|precision).*"
)  # Lightning's advice for real training runs


def tiny_net() -> ContextMLP:
    torch.manual_seed(0)
    return ContextMLP(4, 3, context_dim=2, hidden=(6,)).double()


def reference(net: ContextMLP, b: Episode, lr: float, steps: int, first_order: bool) -> dict[str, torch.Tensor]:
    """MAML that adapts only a zero-initialised context input, written out by hand with autograd."""
    theta = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}

    def f(x, phi):
        h = torch.relu(
            torch.cat([x, phi.expand(len(x), -1)], 1) @ theta["features.0.weight"].T + theta["features.0.bias"]
        )
        return h @ theta["head.weight"].T + theta["head.bias"]

    total = 0.0
    for t in range(b.tasks):
        phi = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        for _ in range(steps):
            (g,) = torch.autograd.grad(
                F.cross_entropy(f(b.support_x[t], phi), b.support_y[t]), phi, create_graph=not first_order
            )
            phi = phi - lr * (g.detach() if first_order else g)
        total = total + F.cross_entropy(f(b.query_x[t], phi), b.query_y[t])
    return dict(zip(theta, torch.autograd.grad(total / b.tasks, list(theta.values()))))


@pytest.mark.parametrize("mode", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_caml_meta_gradient_equals_context_only_maml(mode: str, steps: int, first_order: bool) -> None:
    caml = CAML(tiny_net(), inner_lr=0.7, inner_steps=steps, first_order=first_order, task_mode=mode)
    b = batch()
    got = grads_of_training_step(caml, b)
    ref = reference(caml.backbone, b, 0.7, steps, first_order)
    for n in ref:
        torch.testing.assert_close(got[f"backbone.{n}"], ref[n], rtol=1e-8, atol=1e-10)


def test_context_is_reset_per_task_and_never_a_meta_parameter() -> None:
    caml = CAML(tiny_net(), inner_lr=0.7, inner_steps=2, task_mode="loop")
    assert [n for n, _ in caml.named_parameters()] == [f"backbone.{n}" for n, _ in caml.backbone.named_parameters()]
    assert not any("context" in n for n in caml.state_dict())
    opt = caml.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in caml.backbone.parameters()}
    b = batch(3)
    # Every task starts from zero: a task's outputs do not depend on which tasks ran before it.
    together = caml(b)
    alone = caml(Episode(b.support_x[2:], b.support_y[2:], b.query_x[2:], b.query_y[2:]))
    torch.testing.assert_close(together[2], alone[0])
    state = caml.adapt(b.support_x[0], b.support_y[0])
    assert set(state) == {"context"} and state["context"].shape == (2,) and state["context"].abs().sum() > 0
    assert caml.initial_context(b.support_x).abs().sum() == 0


def test_meta_gradient_is_clamped_by_value_unless_the_trainer_clips() -> None:
    class SGDCAML(CAML):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0)

    eps = [blob_episode(i) for i in range(4)]
    for clamp, trainer_clip, bound in [(1e-4, None, 1e-4), (None, 2e-4, 2e-4)]:
        model = SGDCAML(
            ContextMLP(4, 3, context_dim=2, hidden=(6,)), inner_lr=0.7, meta_grad_clamp=clamp, task_mode="loop"
        )
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        raw = grads_of_training_step(model, Episode.collate(eps))
        assert max(g.abs().max() for g in raw.values()) > 10 * bound  # the clamp has something to do
        kw = {} if trainer_clip is None else dict(gradient_clip_val=trainer_clip, gradient_clip_algorithm="value")
        trainer(max_steps=1, **kw).fit(model, loader(eps, tasks=4))
        steps = torch.stack([(p.detach() - before[n]).abs().max() for n, p in model.named_parameters()])
        assert steps.max() <= bound + 1e-7 and steps.max() >= 0.5 * bound  # fp32 rounding of p - lr * g


def test_film_is_gamma_h_plus_beta_with_raw_gamma() -> None:
    film = FiLM(2, 3)
    with torch.no_grad():
        film.generator.weight.zero_()
        film.generator.bias.copy_(torch.tensor([0.0, 2.0, -1.0, 0.5, 0.0, 1.0]))
    h = torch.randn(4, 3, 2, 2)
    out = film(h, torch.zeros(2))
    expected = h * torch.tensor([0.0, 2.0, -1.0]).view(1, 3, 1, 1) + torch.tensor([0.5, 0.0, 1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)  # gamma = 0 closes channel 0: not 1 + delta
    net = ContextConv4(5, context_dim=3, hidden=4, image_size=28)
    assert list(net.films) == ["2"] and net.films["2"].generator.out_features == 8


def test_bf16_mixed_trains_caml_with_film() -> None:
    torch.manual_seed(0)
    model = CAML(ContextConv4(3, context_dim=4, hidden=4, image_size=16), inner_steps=2, task_mode="loop")
    g = torch.Generator().manual_seed(0)
    eps = [
        Episode(
            torch.rand(6, 1, 16, 16, generator=g),
            torch.arange(3).repeat(2),
            torch.rand(6, 1, 16, 16, generator=g),
            torch.arange(3).repeat(2),
        )
        for _ in range(4)
    ]
    before = [p.detach().clone() for p in model.parameters()]
    t = trainer(max_steps=2, precision="bf16-mixed")
    t.fit(model, loader(eps, tasks=2))
    assert torch.isfinite(t.callback_metrics["train/loss"]) and model.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_caml_learns_sinusoid_and_the_context_carries_the_task() -> None:
    torch.manual_seed(0)
    caml = CAML(ContextMLP(), inner_lr=1.0, inner_steps=1, meta_lr=1e-2, task_mode="vmap")
    train = loader([sine_episode(1000 + i) for i in range(1500)], tasks=10)
    val = loader([sine_episode(i) for i in range(50)], tasks=50)
    t = trainer(max_epochs=1)
    before = t.validate(caml, val, verbose=False)[0]["val/mse"]
    t.fit(caml, train)
    after = t.validate(caml, val, verbose=False)[0]["val/mse"]
    caml.eval_inner_steps = 0
    unadapted = t.validate(caml, val, verbose=False)[0]["val/mse"]
    assert after < 0.7 * before and after < 0.6 * unadapted, (before, after, unadapted)


@pytest.mark.slow
def test_caml_learns_omniglot_5way_1shot(omniglot_dir) -> None:
    from lightning_meta.datamodules import OmniglotDataModule

    torch.manual_seed(0)
    dm = OmniglotDataModule(
        str(omniglot_dir),
        split="seeded",
        ways=5,
        shots=1,
        queries=3,
        eval_queries=5,
        tasks_per_batch=4,
        train_episodes=4 * 150,
        test_episodes=40,
    )
    model = CAML(
        ContextConv4(5, context_dim=16, hidden=16, image_size=28),
        inner_lr=1.0,
        inner_steps=2,
        meta_lr=3e-3,
        task_mode="loop",
    )
    t = trainer(max_epochs=1, limit_val_batches=0)
    t.fit(model, dm)
    acc = t.test(model, dm, verbose=False)[0]["test/acc"]
    # chance is 0.2; 1000 test queries: 1 SE ~ 0.013. 150 steps reach 0.33-0.40 over seeds 0-2; the 60 of before
    # reached 0.27-0.33, and seed 0 fell under the bar on a machine whose kernels round differently.
    assert acc > 0.28, acc
