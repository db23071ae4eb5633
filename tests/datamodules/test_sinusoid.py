"""Sinusoid tasks: closed-form targets, parameter ranges, the evaluation grid and determinism."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_meta.datamodules.sinusoid import SinusoidDataModule, SinusoidDataset


def test_targets_follow_the_task_parameters_in_closed_form():
    ds = SinusoidDataset(shots=10, queries=7, length=50, seed=0, split="train")
    amps, phases = [], []
    for i in range(50):
        e = ds[i]
        assert e.support_x.shape == (10, 1) and e.support_y.shape == (10,) and e.query_x.shape == (7, 1)
        assert e.support_x.dtype == e.support_y.dtype == torch.float32 and e.is_regression
        a, phi = ds.task_params(i)
        for x, y in ((e.support_x, e.support_y), (e.query_x, e.query_y)):
            assert torch.allclose(y, a * torch.sin(x[:, 0] - phi), atol=1e-5)
            assert x.min() >= -5 and x.max() <= 5
        amps.append(a)
        phases.append(phi)
    assert 0.1 <= min(amps) and max(amps) <= 5.0 and 0 <= min(phases) and max(phases) <= math.pi
    # uniform draws: means near the interval midpoints (std of a mean of 50 U[0.1,5] is ~0.2)
    assert abs(sum(amps) / 50 - 2.55) < 0.7 and abs(sum(phases) / 50 - math.pi / 2) < 0.45


def test_eval_grid_and_determinism_across_epochs_and_workers():
    dm = SinusoidDataModule(
        shots=5, queries=5, tasks_per_batch=4, train_episodes=8, val_episodes=8, eval_grid=100, eval_shots=10
    )
    dm.setup()
    vb = next(iter(dm.val_dataloader()))
    assert vb.support_x.shape == (4, 10, 1) and vb.query_x.shape == (4, 100, 1)
    assert torch.allclose(vb.query_x[0, :, 0], torch.linspace(-5, 5, 100))
    train, val = dm.datasets["train"], dm.datasets["val"]
    e0 = train[3]
    train.set_epoch(1)
    assert not torch.equal(train[3].support_x, e0.support_x)
    train.set_epoch(0)
    assert torch.equal(train[3].support_y, e0.support_y)
    v0 = val[2].support_y
    val.set_epoch(4)
    assert torch.equal(val[2].support_y, v0)
    fresh = SinusoidDataModule(shots=5, queries=5, tasks_per_batch=4, train_episodes=8, num_workers=2)
    fresh.setup()
    a = [b.support_y for b in dm.train_dataloader()]
    b = [b.support_y for b in fresh.train_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == 2


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="shots=0"):
        SinusoidDataModule(shots=0)
    with pytest.raises(ValueError, match="eval_grid=0"):
        SinusoidDataModule(eval_grid=0)
    with pytest.raises(ValueError, match=r"amplitude=\(5, 1\)"):
        SinusoidDataset(shots=1, queries=1, length=1, seed=0, split="t", amplitude=(5, 1))
