"""``StepBudget``: a training budget fixed in optimizer steps, an optional cosine to a fraction, CPU and wall time."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["StepBudget", "cosine_to_fraction"]


def cosine_to_fraction(step: int, total: int, final: float) -> float:
    """The learning-rate factor at ``step`` of ``total``: a half cosine from 1 at step 0 down to ``final``.

    ``final + (1 - final) * (1 + cos(pi * step / total)) / 2``, clamped to ``final`` from ``step >= total`` on.
    """
    if total <= 0:
        raise ValueError(f"total={total}: the schedule needs a positive number of steps")
    frac = min(1.0, max(0.0, step / total))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * frac))


class StepBudget(Callback):
    """Train for a fixed number of optimizer steps, optionally with a cosine learning rate, and time it.

    The budget itself is Lightning's ``Trainer(max_steps=N)``: a number of optimizer steps means the same amount of
    training on any machine, whereas CPU or wall time buys very different amounts on a loaded or a quiet one. This
    callback adds what a reproducible accuracy figure needs around it:

    - with ``cosine_to``, every optimizer's learning rate follows a half cosine over the *step* budget, from its
      configured value at step 0 down to ``cosine_to`` times it (:func:`cosine_to_fraction`); the schedule is a
      function of ``trainer.global_step`` and ``max_steps`` only, so a resumed run continues it exactly;
    - it measures the CPU time of this process (``time.process_time()``: all its threads, not dataloader worker
      processes) and the wall time of the training loop, to *report* them; neither stops training;
    - :attr:`complete` says whether the run reached its budget. A run stopped early (``Trainer(max_time=...)``,
      early stopping, an interrupt) is not complete, and its score is not a figure of that budget.

    Use it with a constant-learning-rate optimizer: with ``cosine_to`` and an LR scheduler of the module's own
    the two would fight over the learning rate, so that combination raises. The Lightning-native alternative is a
    ``LambdaLR`` over ``max_steps`` returned from ``configure_optimizers`` with ``"interval": "step"``.

    Args:
        cosine_to: final learning rate as a fraction of the initial one (e.g. ``0.05``); ``None`` keeps the
            learning rate constant.

    Example::

        budget = StepBudget(cosine_to=0.05)
        trainer = Trainer(max_steps=12_000, callbacks=[budget])
        trainer.fit(model, datamodule=dm)
        print(budget.summary())  # {'steps': 12000, 'max_steps': 12000, 'complete': True, 'cpu_seconds': ..., ...}
    """

    def __init__(self, cosine_to: float | None = None) -> None:
        super().__init__()
        if cosine_to is not None and not 0.0 <= cosine_to <= 1.0:
            raise ValueError(
                f"cosine_to={cosine_to}: give the final learning rate as a fraction in [0, 1] of the "
                "initial one (e.g. 0.05), or None for a constant learning rate"
            )
        self.cosine_to = cosine_to
        self.base_lrs: list[list[float]] = []
        self.steps = 0
        self.max_steps = 0
        self.cpu_seconds = 0.0
        self.wall_seconds = 0.0
        self.interrupted = False
        self._cpu0 = self._wall0 = 0.0

    @property
    def complete(self) -> bool:
        """Whether training reached ``max_steps`` (and was not interrupted)."""
        return self.max_steps > 0 and self.steps >= self.max_steps and not self.interrupted

    def summary(self) -> dict[str, Any]:
        """Steps done and planned, whether the budget was reached, CPU and wall seconds of the training loop."""
        return {
            "steps": self.steps,
            "max_steps": self.max_steps,
            "complete": self.complete,
            "cpu_seconds": self.cpu_seconds,
            "wall_seconds": self.wall_seconds,
            "cosine_to": self.cosine_to,
        }

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_steps is None or trainer.max_steps <= 0:
            raise ValueError(
                f"StepBudget: Trainer(max_steps={trainer.max_steps}) sets no step budget; pass "
                "Trainer(max_steps=N, max_epochs=-1) with the number of optimizer steps to train"
            )
        if self.cosine_to is not None and trainer.lr_scheduler_configs:
            raise ValueError(
                "StepBudget(cosine_to=...) sets the learning rate itself, but the module also returns an "
                "LR scheduler; drop one of them (cosine_to=None keeps the module's scheduler)"
            )
        self.max_steps = int(trainer.max_steps)
        if not self.base_lrs:  # restored from a checkpoint otherwise: the configured, not the annealed, rates
            self.base_lrs = [[float(g["lr"]) for g in opt.param_groups] for opt in trainer.optimizers]
        self.steps = trainer.global_step
        self.interrupted = False
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.cosine_to is None:
            return
        factor = cosine_to_fraction(trainer.global_step, self.max_steps, self.cosine_to)
        for opt, bases in zip(trainer.optimizers, self.base_lrs):
            for group, base in zip(opt.param_groups, bases):
                group["lr"] = base * factor

    def _stop_clocks(self, trainer: pl.Trainer) -> None:
        self.steps = trainer.global_step
        self.cpu_seconds += time.process_time() - self._cpu0
        self.wall_seconds += time.perf_counter() - self._wall0
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_clocks(trainer)
        self.interrupted = bool(trainer.interrupted)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.max_steps:
            self._stop_clocks(trainer)
        self.interrupted = True

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": self.base_lrs, "cpu_seconds": self.cpu_seconds, "wall_seconds": self.wall_seconds}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_lrs = [list(b) for b in state_dict.get("base_lrs", [])]
        self.cpu_seconds = float(state_dict.get("cpu_seconds", 0.0))
        self.wall_seconds = float(state_dict.get("wall_seconds", 0.0))
