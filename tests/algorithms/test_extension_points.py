"""The public extension points of MetaLearner: a per-task objective (task_loss), an outer update given as
directions (task_meta_gradient), the inference entry point (adapt_and_predict, Trainer.predict), the one
execution configuration of the gradient-based learners, and the stop after consecutive skipped steps."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import lightning_meta.algorithms.base as base
import lightning_meta.algorithms.execution as execution
from lightning_meta.algorithms import ANIL, CAML, LEO, MAML, MetaSGD
from lightning_meta.episode import Episode
from lightning_meta.functional import adapt, default_inner_loss, functional_forward
from lightning_meta.nn import MLP
from lightning_meta.optim import AdamRule
from tests.algorithms._meta_helpers import (
    batch,
    blob_episode,
    grads_of_training_step,
    loader,
    manual_ce_grads,
    trainer,
    two_layer,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*(self.log|val_dataloader|num_workers|predict_dataloader).*")


def manual_logits(w: dict[str, Tensor], x: Tensor) -> Tensor:
    return torch.relu(x @ w["features.0.weight"].T + w["features.0.bias"]) @ w["head.weight"].T + w["head.bias"]


# ---------------------------------------------------------------- task_loss: MAML++'s multi-step loss
class MSLMAML(MAML):
    """MAML with the multi-step loss (Antoniou et al. 2019): sum_s weights[s] * query loss after step s+1."""

    def __init__(self, backbone, weights=(0.2, 0.3, 0.5), **kwargs) -> None:
        super().__init__(backbone, inner_steps=len(weights), **kwargs)
        self.step_weights = tuple(weights)

    def task_loss(self, support_x, support_y, query_x, query_y):
        params = dict(self.backbone.named_parameters())
        fast = params if self.training else {n: p.detach() for n, p in params.items()}
        total = 0.0
        for w in self.step_weights:
            fast = adapt(self.backbone, fast, support_x, support_y, steps=1, lr=self.inner_lr,
                         first_order=self.first_order or not self.training, loss_scale=self.inner_loss_scale)  # fmt: skip
            outputs = functional_forward(self.backbone, fast, query_x)
            total = total + w * self.query_loss(outputs, query_y)
        return total, outputs


def msl_reference(model, b: Episode, lr: float, weights) -> dict[str, Tensor]:
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    total = 0.0
    for t in range(b.tasks):
        w = {n[len("backbone.") :]: v for n, v in theta.items()}
        for weight in weights:
            g = manual_ce_grads(w, b.support_x[t], b.support_y[t])
            w = {n: w[n] - lr * g[n] for n in w}
            total = total + weight * F.cross_entropy(manual_logits(w, b.query_x[t]), b.query_y[t])
    return dict(zip(theta, torch.autograd.grad(total / b.tasks, list(theta.values()))))


@pytest.mark.parametrize("mode,chunk", [("loop", "auto"), ("loop", None), ("vmap", "auto"), ("vmap", 2)])
def test_multi_step_loss_through_task_loss_matches_hand_unrolled_reference(mode: str, chunk) -> None:
    model = MSLMAML(two_layer(), inner_lr=0.4, task_mode=mode, task_chunk=chunk)
    b = batch(4)
    got = grads_of_training_step(model, b)
    ref = msl_reference(model, b, 0.4, (0.2, 0.3, 0.5))
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-11)
    plain = grads_of_training_step(MAML(two_layer(), inner_lr=0.4, inner_steps=3, task_mode=mode), b)
    assert max((plain[n] - got[n]).abs().max().item() for n in got) > 1e-4  # the objective did change


def test_auto_task_mode_times_the_task_loss_that_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    timed: list[str] = []
    real = base.run_tasks

    def spy(fn, *args, mode, **kwargs):
        timed.append(getattr(fn, "__name__", "?"))
        return real(fn, *args, mode=mode, **kwargs)

    monkeypatch.setattr(base, "run_tasks", spy)
    monkeypatch.setattr(execution, "run_tasks", spy)  # the task-mode trial runs there
    model = MSLMAML(two_layer(), inner_lr=0.4, task_mode="auto")
    model.training_step(batch(4), 0)
    assert len(model.task_mode_selector.choices) == 1
    assert set(timed) == {"task_loss"}  # the trial and the step both ran the overridden objective
    assert len(timed) > 4  # warm-ups and timed runs of both modes, then the step


def test_task_loss_is_used_at_evaluation_without_gradients_of_the_meta_parameters() -> None:
    model = MSLMAML(two_layer(), inner_lr=0.4, task_mode="loop")
    model.eval()
    b = batch(2)
    with torch.no_grad():
        losses, outputs = model.task_losses(b)
    assert not losses.requires_grad and losses.shape == (2,) and outputs.shape == (2, 6, 3)
    # evaluation: first order from detached weights, the same three steps as the hand reference's values
    w = {n[len("backbone.") :]: p.detach() for n, p in model.named_parameters()}
    expect = []
    for t in range(2):
        wt, total = dict(w), 0.0
        for weight in (0.2, 0.3, 0.5):
            g = manual_ce_grads(wt, b.support_x[t], b.support_y[t])
            wt = {n: wt[n] - 0.4 * g[n] for n in wt}
            total = total + weight * F.cross_entropy(manual_logits(wt, b.query_x[t]), b.query_y[t])
        expect.append(total)
    torch.testing.assert_close(losses, torch.stack(expect), rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- task_meta_gradient: Reptile
class Reptile(MAML):
    """Reptile (Nichol, Achiam, Schulman 2018): the outer direction of a task is theta - theta'."""

    def task_meta_gradient(self, support_x, support_y, query_x, query_y):
        params = {n: p.detach() for n, p in self.backbone.named_parameters()}
        fast = adapt(self.backbone, params, support_x, support_y, steps=self.inner_steps, lr=self.inner_lr,
                     first_order=True, loss_fn=default_inner_loss(support_y))  # fmt: skip
        outputs = functional_forward(self.backbone, fast, query_x)
        directions = {f"backbone.{n}": params[n] - fast[n] for n in params}
        return directions, self.query_loss(outputs, query_y), outputs


def reptile_reference(model, b: Episode, lr: float, steps: int) -> tuple[dict[str, Tensor], Tensor]:
    theta = {n[len("backbone.") :]: p.detach().clone() for n, p in model.named_parameters()}
    direction = {n: torch.zeros_like(v) for n, v in theta.items()}
    losses = []
    for t in range(b.tasks):
        w = dict(theta)
        for _ in range(steps):
            g = manual_ce_grads(w, b.support_x[t], b.support_y[t])
            w = {n: w[n] - lr * g[n] for n in w}
        for n in w:
            direction[n] += (theta[n] - w[n]) / b.tasks
        losses.append(F.cross_entropy(manual_logits(w, b.query_x[t]), b.query_y[t]))
    return {f"backbone.{n}": v for n, v in direction.items()}, torch.stack(losses).mean()


@pytest.mark.parametrize("mode,chunk", [("loop", "auto"), ("loop", 3), ("vmap", "auto")])
def test_reptile_directions_reach_the_optimizer_and_train_loss_is_the_query_loss(mode: str, chunk) -> None:
    model = Reptile(two_layer(), inner_lr=0.3, inner_steps=3, task_mode=mode, task_chunk=chunk)
    b = batch(4)
    model.train()
    loss = model.training_step(b, 0)
    ref_dir, ref_loss = reptile_reference(model, b, 0.3, 3)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-10, atol=1e-12)  # the value Lightning sees
    model.zero_grad()
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_dir[n], rtol=1e-10, atol=1e-12)
    assert max(v.abs().max().item() for v in ref_dir.values()) > 1e-3


def test_reptile_fit_steps_along_the_directions_and_logs_the_query_loss() -> None:
    class SGDReptile(Reptile):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    model = SGDReptile(MLP(4, 3, hidden=(8,)), inner_lr=0.3, inner_steps=2, task_mode="loop")
    b = Episode.collate([blob_episode(i) for i in range(4)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    expect_loss = model.training_step(b, 0).detach()
    model.zero_grad()
    model.training_step(b, 0).backward()
    direction = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    t = trainer(max_steps=1)
    t.fit(model, loader([blob_episode(i) for i in range(4)], tasks=4))
    for n, p in model.named_parameters():  # theta <- theta + 0.5 * mean(theta' - theta)
        torch.testing.assert_close(p.detach(), before[n] - 0.5 * direction[n], rtol=1e-6, atol=1e-7)
    assert float(t.callback_metrics["train/loss"]) == pytest.approx(float(expect_loss), rel=1e-6)


def test_nonfinite_direction_skips_the_step() -> None:
    model = Reptile(MLP(4, 3, hidden=(8,)), inner_lr=0.3, task_mode="loop")
    episodes = [blob_episode(i) for i in range(4)]
    sx = episodes[1].support_x.clone()
    sx[0, 0] = float("nan")
    episodes[1] = Episode(sx, episodes[1].support_y, episodes[1].query_x, episodes[1].query_y)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer(max_steps=1).fit(model, loader(episodes, tasks=4))
    assert int(model.skipped_steps) == 1
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_direction_names_must_be_parameters() -> None:
    class Bad(MAML):
        def task_meta_gradient(self, support_x, support_y, query_x, query_y):
            out = self.task_outputs(support_x, support_y, query_x)
            return {"head.weight": torch.zeros(3)}, self.query_loss(out, query_y), out

    model = Bad(MLP(4, 3, hidden=(8,)), task_mode="loop")
    model.train()
    with pytest.raises(KeyError, match=r"\['head.weight'\].*backbone\."):
        model.training_step(Episode.collate([blob_episode(0)]), 0)


# ---------------------------------------------------------------- inference
def test_adapt_and_predict_equals_evaluation_forward_and_takes_the_steps() -> None:
    torch.manual_seed(0)
    model = MAML(MLP(4, 3, hidden=(8,)), inner_lr=0.5, inner_steps=1, eval_inner_steps=2, task_mode="loop")
    b = Episode.collate([blob_episode(i) for i in range(3)])
    model.train()
    got = model.adapt_and_predict(b.support_x, b.support_y, b.query_x)
    assert model.training and all(m.training for m in model.modules())  # the mode is restored
    assert not got.requires_grad
    model.eval()
    torch.testing.assert_close(got, model(b))
    # one task, no task dimension; steps=0 is the unadapted network; steps=3 equals eval_inner_steps=3
    one = model.adapt_and_predict(b.support_x[1], b.support_y[1], b.query_x[1])
    torch.testing.assert_close(one, got[1])
    torch.testing.assert_close(
        model.adapt_and_predict(b.support_x, b.support_y, b.query_x, steps=0), model.backbone(b.query_x)
    )
    three = model.adapt_and_predict(b.support_x, b.support_y, b.query_x, steps=3)
    assert model.eval_inner_steps == 2
    model.eval_inner_steps = 3
    torch.testing.assert_close(three, model(b))
    assert not torch.allclose(three, got)
    with pytest.raises(ValueError, match="steps=-1"):
        model.adapt_and_predict(b.support_x, b.support_y, b.query_x, steps=-1)


def test_trainer_predict_on_unlabelled_episodes() -> None:
    torch.manual_seed(0)
    model = MAML(MLP(4, 3, hidden=(8,)), inner_lr=0.5, task_mode="loop")
    labelled = [blob_episode(i) for i in range(4)]
    unlabelled = [Episode(e.support_x, e.support_y, e.query_x) for e in labelled]
    out = trainer().predict(model, loader(unlabelled, tasks=2))
    assert len(out) == 2 and out[0].shape == (2, 6, 3)
    model.eval()
    expect = model(Episode.collate(labelled))
    torch.testing.assert_close(torch.cat(out), expect)
    with pytest.raises(RuntimeError, match=r"Trainer\(inference_mode=False\)"):
        trainer(inference_mode=True).predict(model, loader(unlabelled, tasks=2))
    with pytest.raises(ValueError, match="needs query labels"):
        trainer().validate(model, loader(unlabelled, tasks=2), verbose=False)


# ---------------------------------------------------------------- configuration
EXECUTION = {
    "task_mode": "auto",
    "task_chunk": "auto",
    "inner_loss_scale": None,
    "cuda_graphs": False,
    "max_consecutive_skipped_steps": 100,
}


@pytest.mark.parametrize("cls", [MAML, MetaSGD, ANIL, CAML, LEO])
def test_gradient_based_learners_share_the_execution_arguments(cls) -> None:
    params = inspect.signature(cls.__init__).parameters
    assert {k: params[k].default for k in EXECUTION} == EXECUTION
    assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in EXECUTION)


def test_maml_per_step_rates_and_inner_rule_are_configurations() -> None:
    b = batch(3)
    same = grads_of_training_step(MAML(two_layer(), inner_lr=[0.4, 0.4], inner_steps=2, task_mode="loop"), b)
    scalar = grads_of_training_step(MAML(two_layer(), inner_lr=0.4, inner_steps=2, task_mode="loop"), b)
    for n in scalar:
        torch.testing.assert_close(same[n], scalar[n], rtol=0, atol=0)
    model = MAML(two_layer(), inner_lr=[0.1, 0.6], inner_steps=2, task_mode="loop")
    got = grads_of_training_step(model, b)
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    total = 0.0
    for t in range(b.tasks):
        w = {n[len("backbone.") :]: v for n, v in theta.items()}
        for lr in (0.1, 0.6):
            g = manual_ce_grads(w, b.support_x[t], b.support_y[t])
            w = {n: w[n] - lr * g[n] for n in w}
        total = total + F.cross_entropy(manual_logits(w, b.query_x[t]), b.query_y[t])
    ref = dict(zip(theta, torch.autograd.grad(total / b.tasks, list(theta.values()))))
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="2 per-step rates but inner_steps=3"):
        MAML(two_layer(), inner_lr=[0.1, 0.2], inner_steps=3)
    adam = MAML(two_layer(), inner_lr=0.05, inner_steps=2, task_mode="loop", inner_rule=AdamRule())
    with_rule = grads_of_training_step(adam, b)
    plain = grads_of_training_step(MAML(two_layer(), inner_lr=0.05, inner_steps=2, task_mode="loop"), b)
    assert max((with_rule[n] - plain[n]).abs().max().item() for n in plain) > 1e-4


# ---------------------------------------------------------------- non-finite runs stop
def test_a_run_whose_steps_are_all_skipped_stops_with_a_clear_error() -> None:
    episodes = []
    for i in range(12):
        e = blob_episode(i)
        episodes.append(Episode(torch.full_like(e.support_x, float("nan")), e.support_y, e.query_x, e.query_y))
    model = MAML(MLP(4, 3, hidden=(8,)), inner_lr=0.5, task_mode="loop", max_consecutive_skipped_steps=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"last 3 optimizer steps were all skipped.*max_consecutive_skipped_steps=3"):
        trainer(max_steps=10).fit(model, loader(episodes, tasks=1))
    assert int(model.skipped_steps) == 3
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    # a finite step in between resets the count: 2 bad, 1 good, 2 bad never reaches 3
    mixed = [episodes[0], episodes[1], blob_episode(20), episodes[2], episodes[3]]
    model = MAML(MLP(4, 3, hidden=(8,)), inner_lr=0.5, task_mode="loop", max_consecutive_skipped_steps=3)
    trainer(max_steps=5).fit(model, loader(mixed, tasks=1))
    assert int(model.skipped_steps) == 4
    with pytest.raises(ValueError, match="max_consecutive_skipped_steps=0"):
        MAML(MLP(), max_consecutive_skipped_steps=0)
