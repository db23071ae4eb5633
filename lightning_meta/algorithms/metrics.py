"""Stateful metrics of episodic evaluation that reduce across ranks."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["MeanCI95"]


class MeanCI95(Metric):
    """Half-width ``1.96 * std / sqrt(n)`` of the normal 95% interval of per-episode values.

    The states (sum, sum of squares, count) are summed across processes, so the interval is the one
    over all episodes of all ranks. ``std`` is the population std (``ddof=0``), as in cbfinn/maml and
    :func:`lightning_meta.functional.mean_ci95`. Update it with one value per episode, not per batch.

    Example:
        >>> m = MeanCI95()
        >>> m.update(torch.tensor([0.5, 1.0]))
        >>> m.compute()
        tensor(0.3465, dtype=torch.float64)
    """

    full_state_update = False
    higher_is_better = False
    total: Tensor
    total_sq: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        """Add per-episode values (any shape; every element is one episode)."""
        v = values.detach().to(torch.float64).flatten()
        self.total += v.sum()
        self.total_sq += (v * v).sum()
        self.count += v.numel()

    def compute(self) -> Tensor:
        """The half-width over all episodes seen (NaN before any update)."""
        mean = self.total / self.count
        var = (self.total_sq / self.count - mean * mean).clamp_min(0.0)
        return 1.96 * var.sqrt() / self.count.sqrt()
