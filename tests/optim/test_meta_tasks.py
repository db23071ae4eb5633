"""Task families: vmapped populations equal per-task loops, seeding, splits, Omniglot (when present)."""

from __future__ import annotations

import pytest
import torch

from lightning_meta.optim.meta.omniglot import OmniglotTaskFamily
from lightning_meta.optim.meta.tasks import (
    ConvTaskFamily,
    Task,
    TaskFamily,
    get_family,
    sample_batches,
    stack_params,
)


@pytest.mark.parametrize("name", ["quadratic", "mlp", "teacher_student", "conv"])
def test_vmapped_population_equals_a_loop(name):
    family = get_family(name)
    assert isinstance(family, TaskFamily)
    gen = torch.Generator().manual_seed(0)
    tasks = [family.sample(gen) for _ in range(3)]
    assert all(isinstance(t, Task) for t in tasks)
    params = stack_params([t.init(gen) for t in tasks])
    batch = sample_batches(tasks, gen)
    batched = torch.func.vmap(tasks[0].loss)(params, batch)
    grads, _ = torch.func.vmap(torch.func.grad_and_value(tasks[0].loss))(params, batch)
    for i, task in enumerate(tasks):
        p = {k: v[i].clone().requires_grad_(True) for k, v in params.items()}
        loss = task.loss(p, tuple(b[i] for b in batch))
        torch.testing.assert_close(batched[i], loss.detach())
        for k, g in zip(p, torch.autograd.grad(loss, list(p.values()))):
            torch.testing.assert_close(grads[k][i], g)


def test_tasks_are_a_pure_function_of_the_generator_and_differ_between_draws():
    family = get_family("teacher_student")
    a = family.sample(torch.Generator().manual_seed(4))
    b = family.sample(torch.Generator().manual_seed(4))
    xa, ya = a.sample_batch(torch.Generator().manual_seed(1))
    xb, yb = b.sample_batch(torch.Generator().manual_seed(1))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = family.sample(torch.Generator().manual_seed(5))
    _, yc = c.sample_batch(torch.Generator().manual_seed(1))
    assert not torch.allclose(ya, yc)  # another teacher labels the same inputs differently


def test_quadratic_loss_is_zero_at_the_centre_without_noise():
    task = get_family("quadratic", noise=0.0).sample(torch.Generator().manual_seed(0))
    batch = task.sample_batch(torch.Generator())
    assert task.loss({"x": task.center.clone()}, batch) == 0
    assert task.loss({"x": task.center + 1}, batch) == pytest.approx(0.5 * task.curvature.mean().item())


def test_conv_task_shapes_and_learnability():
    family = ConvTaskFamily(image_size=8, channels=(4, 4), classes=3, batch_size=12)
    task = family.sample(torch.Generator().manual_seed(0))
    x, y = task.sample_batch(torch.Generator().manual_seed(0))
    assert x.shape == (12, 1, 8, 8) and y.shape == (12,) and int(y.max()) < 3
    params = task.init(torch.Generator().manual_seed(0))
    opt_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(opt_params.values(), lr=0.02)
    gen = torch.Generator().manual_seed(1)
    first = None
    for _ in range(60):
        loss = task.loss(opt_params, task.sample_batch(gen))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first  # the synthetic templates are learnable


def test_omniglot_family_reads_the_shared_zips(omniglot_dir):
    family = OmniglotTaskFamily(omniglot_dir, image_size=10, ways=4, channels=(4,), batch_size=8)
    assert family.images.shape[1:] == (20, 10, 10) and family.images.shape[0] > 100
    assert 0.0 <= float(family.images.min()) and float(family.images.max()) <= 1.0
    task = family.sample(torch.Generator().manual_seed(0))
    x, y = task.sample_batch(torch.Generator().manual_seed(0), "valid")
    assert x.shape == (8, 1, 10, 10) and int(y.max()) < 4
    assert torch.isfinite(task.loss(task.init(torch.Generator().manual_seed(0)), (x, y)))
    flat = OmniglotTaskFamily(omniglot_dir, image_size=10, ways=4, channels=(), hidden=(8,), batch_size=8)
    xf, _ = flat.sample(torch.Generator().manual_seed(0)).sample_batch(torch.Generator().manual_seed(0))
    assert xf.shape == (8, 100)


def test_bad_arguments_name_the_value_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match="task family 'cifar'"):
        get_family("cifar")
    with pytest.raises(ValueError, match="activation='swish'"):
        get_family("mlp", activation="swish")
    with pytest.raises(ValueError, match="split='test'"):
        get_family("quadratic").sample(torch.Generator()).sample_batch(torch.Generator(), "test")
    with pytest.raises(FileNotFoundError, match="images_background_small"):
        OmniglotTaskFamily(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OmniglotTaskFamily(tmp_path / "missing")
