"""Task families: vmapped populations equal per-task loops, seeding, splits, Omniglot (when present)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_meta.optim.meta.omniglot import OmniglotTaskFamily
from lightning_meta.optim.meta.tasks import (
    CHAR_VOCAB,
    ConvTaskFamily,
    GRULanguageModelTaskFamily,
    Task,
    TaskFamily,
    char_corpus,
    get_family,
    sample_batches,
    stack_params,
)


@pytest.mark.parametrize("name", ["quadratic", "mlp", "teacher_student", "conv", "gru_lm"])
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


def test_gru_lm_equals_torch_gru_and_starts_at_log_vocab():
    family = get_family("gru_lm")
    gen = torch.Generator().manual_seed(0)
    task = family.sample(gen)
    params = {k: v.double() for k, v in task.init(gen).items()}
    (windows,) = task.sample_batch(gen)
    assert windows.shape == (16, 33) and int(windows.max()) <= len(CHAR_VOCAB)
    # independent reference: torch.nn.GRU (gates r, z, n; weights (3 * hidden, in)) and a linear read-out
    gru = torch.nn.GRU(16, 32, batch_first=True).double()
    with torch.no_grad():
        gru.weight_ih_l0.copy_(params["w_ih"].T)
        gru.weight_hh_l0.copy_(params["w_hh"].T)
        gru.bias_ih_l0.copy_(params["b_ih"])
        gru.bias_hh_l0.copy_(params["b_hh"])
        states, _ = gru(params["embed"][windows[:, :-1]])
        logits = states @ params["w_out"] + params["b_out"]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), windows[:, 1:].reshape(-1))
    torch.testing.assert_close(task.loss(params, (windows,)), expected, rtol=1e-12, atol=1e-12)
    # at initialisation the prediction is close to uniform over the 97 character ids
    initial = [t.loss(t.init(gen), t.sample_batch(gen)) for t in (family.sample(gen) for _ in range(8))]
    assert abs(float(torch.stack(initial).mean()) - math.log(97)) < 0.3


def test_a_few_adam_steps_on_a_gru_lm_task_lower_its_training_and_validation_loss():
    task = get_family("gru_lm").sample(torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    params = {k: v.requires_grad_(True) for k, v in task.init(gen).items()}
    valid = [task.sample_batch(torch.Generator().manual_seed(3 + i), "valid") for i in range(4)]

    def valid_loss() -> float:
        with torch.no_grad():
            return float(torch.stack([task.loss(params, b) for b in valid]).mean())

    before = valid_loss()
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = task.loss(params, task.sample_batch(gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0  # from ~log(97) = 4.57 towards the character frequencies
    assert valid_loss() < before - 1.0


def test_gru_lm_texts_are_disjoint():
    meta, aside = char_corpus("meta-train"), char_corpus("held-aside")
    assert len(meta) > 200_000 and len(aside) > 40_000
    decoded = "".join(CHAR_VOCAB[i] if i < len(CHAR_VOCAB) else "?" for i in aside[:400].tolist())
    assert decoded not in "".join(CHAR_VOCAB[i] if i < len(CHAR_VOCAB) else "?" for i in meta.tolist())
    family = GRULanguageModelTaskFamily(task_chars=1024)
    task = family.sample(torch.Generator().manual_seed(0))
    assert len(task.train_text) == 896 and len(task.valid_text) == 128  # consecutive, so no window overlaps
    with pytest.raises(ValueError, match="corpus='test'"):
        GRULanguageModelTaskFamily(corpus="test")
    with pytest.raises(ValueError, match="task_chars=10000000 exceeds"):
        GRULanguageModelTaskFamily(task_chars=10_000_000)
