"""StepBudget: a step budget, a cosine over it checked against the closed form, completeness, CPU and wall time."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_meta.callbacks import StepBudget, cosine_to_fraction


class ConstantLR(BoringModel):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordLR(Callback):
    """The learning rate the optimizer step of each batch uses (read after StepBudget set it)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _trainer(tmp_path: Path, max_steps: int | None, callbacks: list, **kw) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=-1 if max_steps else 1,
        max_steps=max_steps or -1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        **kw,
    )


def test_cosine_to_fraction_closed_form() -> None:
    assert cosine_to_fraction(0, 10, 0.05) == 1.0
    assert cosine_to_fraction(5, 10, 0.05) == pytest.approx(0.05 + 0.95 * 0.5)
    assert cosine_to_fraction(10, 10, 0.05) == pytest.approx(0.05)
    assert cosine_to_fraction(25, 10, 0.05) == pytest.approx(0.05)  # clamped past the budget
    assert cosine_to_fraction(3, 12, 0.0) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    with pytest.raises(ValueError, match="total=0"):
        cosine_to_fraction(0, 0, 0.1)


def test_step_budget_anneals_over_steps_and_reports(tmp_path: Path) -> None:
    budget, seen = StepBudget(cosine_to=0.1), RecordLR()
    trainer = _trainer(tmp_path, 10, [budget, seen])
    trainer.fit(ConstantLR())
    # the lr of step t (0-based) is 0.1 * (0.1 + 0.9 * (1 + cos(pi t / 10)) / 2), written out independently
    expected = [0.1 * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t / 10))) for t in range(10)]
    assert seen.lrs == pytest.approx(expected, rel=1e-12)
    summary = budget.summary()
    assert summary["steps"] == summary["max_steps"] == 10 and summary["complete"] is True
    assert summary["cpu_seconds"] > 0 and summary["wall_seconds"] > 0


def test_step_budget_constant_lr_and_incomplete_run(tmp_path: Path) -> None:
    budget, seen = StepBudget(), RecordLR()
    _trainer(tmp_path, 10, [budget, seen, StopAt(4)]).fit(ConstantLR())
    assert seen.lrs == [0.1] * 4
    assert budget.steps == 4 and budget.max_steps == 10 and budget.complete is False  # stopped early: not a figure


def test_step_budget_resumed_run_continues_the_schedule(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    first = RecordLR()
    _trainer(tmp_path, 10, [StepBudget(cosine_to=0.2), first, ckpt, StopAt(4)]).fit(ConstantLR())
    resumed, budget = RecordLR(), StepBudget(cosine_to=0.2)
    _trainer(tmp_path, 10, [budget, resumed]).fit(ConstantLR(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    expected = [0.1 * cosine_to_fraction(t, 10, 0.2) for t in range(10)]
    assert first.lrs + resumed.lrs == pytest.approx(expected, rel=1e-12)  # base lr restored, not the annealed one
    assert budget.complete and budget.steps == 10


def test_step_budget_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cosine_to=1.5.*fraction"):
        StepBudget(cosine_to=1.5)
    with pytest.raises(ValueError, match=r"max_steps=-1.*max_steps=N"):
        _trainer(tmp_path, None, [StepBudget()], max_time=None).fit(ConstantLR())
    with pytest.raises(ValueError, match="LR scheduler"):
        _trainer(tmp_path, 3, [StepBudget(cosine_to=0.1)]).fit(BoringModel())  # BoringModel returns a StepLR
