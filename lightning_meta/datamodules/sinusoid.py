"""Sinusoid regression tasks (Finn, Abbeel, Levine, ICML 2017, arXiv:1703.03400, section 5.1).

A task is ``y = A * sin(x - phi)`` with ``A ~ U[0.1, 5]``, ``phi ~ U[0, pi]`` and inputs
``x ~ U[-5, 5]``; K support and K query points per task (MAML), or, with ``eval_grid``, query
points on an evenly spaced grid over the input range at validation/test (CAVIA's protocol,
Zintgraf et al., ICML 2019, arXiv:1810.03642). Report which one you use: their MSEs differ.

Shapes (single episode): ``support_x`` float ``(shots, 1)``, ``support_y`` float ``(shots,)``
(targets have no trailing feature dim, like class labels; a model returning ``(n, 1)`` squeezes
it), ``query_x`` ``(queries or eval_grid, 1)``, ``query_y`` ``(queries or eval_grid,)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from lightning_meta.datamodules.episodic import EpisodicDataModule, episode_generator
from lightning_meta.episode import Episode
from lightning_meta.utils import check_positive

__all__ = ["SinusoidDataModule", "SinusoidDataset"]


class SinusoidDataset(Dataset):
    """Sinusoid tasks; episode ``i`` is a pure function of ``(seed, split, epoch, i)``.

    Args:
        shots: support points per task (K).
        queries: random query points per task (ignored when ``grid`` is set).
        length: tasks per epoch.
        seed: base seed.
        split: split name mixed into the seed.
        grid: if set, the query points are ``grid`` evenly spaced x over ``x_range`` (endpoints included).
        amplitude: range of the uniform amplitude A.
        phase: range of the uniform phase phi.
        x_range: range of the uniform inputs x.
        resample_per_epoch: if False the epoch is ignored (evaluation splits).
    """

    def __init__(
        self,
        *,
        shots: int,
        queries: int,
        length: int,
        seed: int,
        split: str,
        grid: int | None = None,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        resample_per_epoch: bool = True,
    ) -> None:
        check_positive(shots=shots, length=length)
        if grid is None and queries < 1:
            raise ValueError(f"queries={queries} must be positive (or set eval_grid)")
        if grid is not None:
            check_positive(grid=grid)
        for k, (lo, hi) in {"amplitude": amplitude, "phase": phase, "x_range": x_range}.items():
            if not lo <= hi:
                raise ValueError(f"{k}=({lo}, {hi}) must be an interval (low <= high)")
        self.shots, self.queries, self.length, self.grid = shots, queries, length, grid
        self.seed, self.split = seed, split
        self.amplitude, self.phase, self.x_range = _interval(amplitude), _interval(phase), _interval(x_range)
        self.resample_per_epoch = resample_per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that the following draws use."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _generator(self, index: int) -> torch.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"task index {index} out of range for {self.length} tasks")
        return episode_generator(self.seed, self.split, self.epoch if self.resample_per_epoch else 0, index)

    @staticmethod
    def _uniform(g: torch.Generator, lo_hi: tuple[float, float], *shape: int) -> torch.Tensor:
        lo, hi = lo_hi
        return torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo

    def task_params(self, index: int) -> tuple[float, float]:
        """``(A, phi)`` of task ``index`` at the current epoch (for plotting the true curve)."""
        g = self._generator(index)
        a, phi = self._uniform(g, self.amplitude, 1), self._uniform(g, self.phase, 1)
        return float(a), float(phi)

    def __getitem__(self, index: int) -> Episode:
        g = self._generator(int(index))
        a, phi = self._uniform(g, self.amplitude, 1), self._uniform(g, self.phase, 1)
        sx = self._uniform(g, self.x_range, self.shots, 1)  # (shots, 1)
        if self.grid is None:
            qx = self._uniform(g, self.x_range, self.queries, 1)  # (queries, 1)
        else:
            qx = torch.linspace(*self.x_range, self.grid, dtype=torch.float64).unsqueeze(1)  # (grid, 1)
        sy, qy = a * torch.sin(sx[:, 0] - phi), a * torch.sin(qx[:, 0] - phi)
        return Episode(sx.float(), sy.float(), qx.float(), qy.float())


class SinusoidDataModule(EpisodicDataModule):
    """Sinusoid regression episodes (see the module docstring for shapes).

    Args:
        shots: support points per training task (K).
        queries: query points per training task.
        tasks_per_batch: tasks per batch (MAML: 25).
        train_episodes: training tasks per epoch.
        val_episodes: validation tasks (fixed).
        test_episodes: test tasks (fixed; MAML: 600).
        eval_shots: support points at validation/test; default ``shots``.
        eval_queries: random query points at validation/test; default ``queries``.
        eval_grid: if set, validation/test queries are this many evenly spaced x (e.g. 100).
        amplitude: range of A.
        phase: range of phi.
        x_range: range of x (and of the evaluation grid).
        seed: seed of every task draw.
        num_workers: DataLoader workers (tasks do not depend on it).
    """

    def __init__(
        self,
        *,
        shots: int = 10,
        queries: int = 10,
        tasks_per_batch: int = 25,
        train_episodes: int = 2500,
        val_episodes: int = 100,
        test_episodes: int = 600,
        eval_shots: int | None = None,
        eval_queries: int | None = None,
        eval_grid: int | None = None,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            ways=1,
            shots=shots,
            queries=queries,
            tasks_per_batch=tasks_per_batch,
            train_episodes=train_episodes,
            val_episodes=val_episodes,
            test_episodes=test_episodes,
            eval_shots=eval_shots,
            eval_queries=eval_queries,
            seed=seed,
            num_workers=num_workers,
        )
        if eval_grid is not None:
            check_positive(eval_grid=eval_grid)
        self.eval_grid = eval_grid
        self.amplitude, self.phase, self.x_range = _interval(amplitude), _interval(phase), _interval(x_range)
        self.save_hyperparameters()

    def make_datasets(self) -> dict[str, Dataset]:
        """One :class:`SinusoidDataset` per split (training tasks change per epoch, evaluation tasks do not)."""
        out: dict[str, Dataset] = {}
        for split in ("train", "val", "test"):
            _, shots, queries, n = self.episode_shape(split)
            out[split] = SinusoidDataset(
                shots=shots,
                queries=queries,
                length=n,
                seed=self.seed,
                split=split,
                grid=None if split == "train" else self.eval_grid,
                amplitude=self.amplitude,
                phase=self.phase,
                x_range=self.x_range,
                resample_per_epoch=split == "train",
            )
        return out


def _interval(lo_hi: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` as a tuple (a YAML/CLI config gives a list)."""
    lo, hi = lo_hi
    return lo, hi
