"""The guide's examples (examples/write_your_own/): they are what the page shows, they compute the papers' updates
(checked against hand-unrolled float64 references), and a learner written only against the public API trains like
the built-ins: loop and vmap, bf16 autocast, 2-process DDP on CPU."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from examples.write_your_own.maml_msl import MultiStepLossMAML
from examples.write_your_own.reptile import Reptile
from lightning_meta.episode import Episode
from lightning_meta.nn import MLP
from tests.algorithms._meta_helpers import (
    EpisodeList,
    batch,
    blob_episode,
    grads_of_training_step,
    loader,
    manual_ce_grads,
    trainer,
    two_layer,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "write_your_own"
GUIDE = REPO / "docs" / "guide" / "write_your_own.md"

pytestmark = pytest.mark.filterwarnings("ignore:.*(self.log|num_workers|val_dataloader|sync_dist).*")


def logits(w: dict[str, Tensor], x: Tensor) -> Tensor:
    return torch.relu(x @ w["features.0.weight"].T + w["features.0.bias"]) @ w["head.weight"].T + w["head.bias"]


def strip(model) -> dict[str, Tensor]:
    return {n[len("backbone.") :]: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- the page shows the files
@pytest.mark.parametrize("name", ["reptile.py", "maml_msl.py"])
def test_the_guide_shows_each_example_file_verbatim_and_it_is_short(name: str) -> None:
    code = (EXAMPLES / name).read_text()
    page = GUIDE.read_text()
    blocks = re.findall(rf"<!-- examples/write_your_own/{re.escape(name)} -->\n```python\n(.*?)```", page, re.DOTALL)
    assert blocks == [code], f"docs/guide/write_your_own.md must include examples/write_your_own/{name} verbatim"
    assert len(code.splitlines()) < 40
    # only the public API: no private name (``_x``, ``self._x``), imports from the public subpackages only
    assert re.findall(r"(?<![\w.])_[A-Za-z]\w*|\._[A-Za-z]\w*", code.replace("__init__", "")) == []
    imports = re.findall(r"^from (lightning_meta[\w.]*) import", code, re.MULTILINE)
    assert imports and set(imports) <= {"lightning_meta.algorithms", "lightning_meta.functional"}


# ---------------------------------------------------------------- Reptile: the numbers
def test_reptile_step_is_mean_of_theta_prime_minus_theta_times_meta_lr() -> None:
    model = Reptile(two_layer(), inner_lr=0.3, inner_steps=3, meta_lr=0.7, task_mode="loop")
    b = batch(4)
    theta = strip(model)
    expect_loss, direction = [], {n: torch.zeros_like(v) for n, v in theta.items()}
    for t in range(b.tasks):  # inner SGD by hand (closed-form gradients)
        w = dict(theta)
        for _ in range(3):
            g = manual_ce_grads(w, b.support_x[t], b.support_y[t])
            w = {n: w[n] - 0.3 * g[n] for n in w}
        for n in w:
            direction[n] += (w[n] - theta[n]) / b.tasks
        expect_loss.append(F.cross_entropy(logits(w, b.query_x[t]), b.query_y[t]))
    model.train()
    opt = model.configure_optimizers()
    loss = model.training_step(b, 0)
    torch.testing.assert_close(loss.detach(), torch.stack(expect_loss).mean(), rtol=1e-12, atol=1e-12)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = strip(model)
    for n in theta:  # theta <- theta + meta_lr * mean(theta' - theta)
        torch.testing.assert_close(after[n], theta[n] + 0.7 * direction[n], rtol=1e-12, atol=1e-12)
    assert max(v.abs().max().item() for v in direction.values()) > 1e-3


def test_reptile_adapt_and_predict_fine_tunes_for_the_given_steps() -> None:
    model = Reptile(two_layer(), inner_lr=0.3, inner_steps=2, task_mode="loop")
    b = batch(2)
    theta = strip(model)
    w = dict(theta)
    for _ in range(4):
        g = manual_ce_grads(w, b.support_x[1], b.support_y[1])
        w = {n: w[n] - 0.3 * g[n] for n in w}
    got = model.adapt_and_predict(b.support_x, b.support_y, b.query_x, steps=4)
    torch.testing.assert_close(got[1], logits(w, b.query_x[1]), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- MAML++ multi-step loss: the numbers
def test_multi_step_loss_gradient_matches_the_hand_unrolled_objective() -> None:
    model = MultiStepLossMAML(two_layer(), inner_lr=0.4, inner_steps=3, task_mode="loop")
    model.step_weights = (0.2, 0.3, 0.5)
    b = batch(4)
    theta = {n: v.requires_grad_() for n, v in strip(model).items()}
    total = 0.0
    for t in range(b.tasks):  # second order: the inner gradients stay in the graph
        w = dict(theta)
        for weight in (0.2, 0.3, 0.5):
            g = manual_ce_grads(w, b.support_x[t], b.support_y[t])
            w = {n: w[n] - 0.4 * g[n] for n in w}
            total = total + weight * F.cross_entropy(logits(w, b.query_x[t]), b.query_y[t])
    ref = torch.autograd.grad(total / b.tasks, list(theta.values()))
    got = grads_of_training_step(model, b)
    for (n, _), r in zip(theta.items(), ref):
        torch.testing.assert_close(got[f"backbone.{n}"], r, rtol=1e-9, atol=1e-11)


def test_multi_step_loss_weights_anneal_to_the_last_step() -> None:
    model = MultiStepLossMAML(two_layer(), inner_steps=4, msl_epochs=10)
    assert model.step_weights == (0.25,) * 4
    for epoch, early in [(0, 0.25), (5, 0.125), (10, 0.0075), (50, 0.0075)]:  # floor 0.03 / steps
        model._trainer = SimpleNamespace(current_epoch=epoch)  # what LightningModule.current_epoch reads
        try:
            model.on_train_epoch_start()
        finally:
            model._trainer = None
        assert model.step_weights[:3] == pytest.approx((early,) * 3)
        assert sum(model.step_weights) == pytest.approx(1.0)


# ---------------------------------------------------------------- trains like the built-ins
def fit(cls, steps: int = 3, **kwargs) -> dict[str, Tensor]:
    torch.manual_seed(0)
    model = cls(MLP(4, 3, hidden=(8,)), inner_lr=0.3, inner_steps=2, **kwargs)
    t = trainer(max_steps=steps)
    t.fit(model, loader([blob_episode(i) for i in range(4 * steps)], tasks=4))
    assert torch.isfinite(t.callback_metrics["train/loss"]) and int(model.skipped_steps) == 0
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("cls", [Reptile, MultiStepLossMAML])
def test_examples_train_under_loop_and_vmap_with_the_same_result(cls) -> None:
    torch.manual_seed(0)
    start = {n: p.detach().clone() for n, p in cls(MLP(4, 3, hidden=(8,))).named_parameters()}
    looped = fit(cls, task_mode="loop")
    vmapped = fit(cls, task_mode="vmap", task_chunk=2)
    assert any(not torch.equal(looped[n], start[n]) for n in start)
    for n in looped:
        torch.testing.assert_close(vmapped[n], looped[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [Reptile, MultiStepLossMAML])
def test_examples_train_under_bf16_autocast(cls) -> None:
    torch.manual_seed(0)
    model = cls(MLP(4, 3, hidden=(8,)), inner_lr=0.3, inner_steps=2, task_mode="loop")
    before = [p.detach().clone() for p in model.parameters()]
    t = trainer(max_steps=3, precision="bf16-mixed")
    t.fit(model, loader([blob_episode(i) for i in range(12)], tasks=4))
    assert torch.isfinite(t.callback_metrics["train/loss"]) and int(model.skipped_steps) == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


class _Strided(torch.utils.data.Sampler[int]):
    """Episodes ``rank, rank + 2, ...``: the two ranks together see the single process's batches of 4."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        import torch.distributed as dist

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        import torch.distributed as dist

        return self.n // (dist.get_world_size() if dist.is_initialized() else 1)


def _ddp_fit(cls) -> dict[str, Tensor]:
    def run():
        torch.manual_seed(0)
        model = cls(MLP(4, 3, hidden=(8,)), inner_lr=0.3, inner_steps=2, task_mode="loop", meta_lr=0.5)
        data = [blob_episode(i) for i in range(8)]
        t = trainer(max_steps=2, strategy="ddp_spawn", devices=2, use_distributed_sampler=False)
        t.fit(model, DataLoader(EpisodeList(data), batch_size=2, sampler=_Strided(8), collate_fn=Episode.collate))
        return model

    model = run()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("cls", [Reptile, MultiStepLossMAML])
def test_examples_under_two_process_ddp_equal_one_process(cls) -> None:
    torch.manual_seed(0)
    single_model = cls(MLP(4, 3, hidden=(8,)), inner_lr=0.3, inner_steps=2, task_mode="loop", meta_lr=0.5)
    trainer(max_steps=2).fit(single_model, loader([blob_episode(i) for i in range(8)], tasks=4))
    single = {n: p.detach() for n, p in single_model.named_parameters()}
    ddp = _ddp_fit(cls)
    for n, value in single.items():
        torch.testing.assert_close(ddp[n], value, rtol=1e-5, atol=1e-6)
