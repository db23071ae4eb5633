"""The Episode: the one batch type every datamodule emits and every module eats."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Episode"]


@dataclass
class Episode:
    """Support and query sets of one or more few-shot tasks.

    Batched episodes (what a ``DataLoader`` over an episodic dataset yields) carry a leading
    task dimension::

        support_x  (tasks, ways * shots, *x_shape)
        support_y  (tasks, ways * shots)       long labels 0..ways-1 (float targets for regression)
        query_x    (tasks, ways * queries, *x_shape)
        query_y    (tasks, ways * queries)

    A single episode (what the dataset's ``__getitem__`` returns) has the same fields without the
    task dimension; :meth:`collate` stacks a list of them. Being a dataclass, Lightning moves an
    Episode between devices unchanged.

    ``query_y`` may be None (unlabelled queries): such episodes are for prediction only
    (:meth:`~lightning_meta.algorithms.MetaLearner.adapt_and_predict`, ``Trainer.predict``).

    Example:
        >>> e = Episode(torch.zeros(2, 1), torch.tensor([0, 1]), torch.zeros(4, 1), torch.tensor([0, 1, 1, 0]))
        >>> b = Episode.collate([e, e])
        >>> b.tasks, b.support_x.shape, b.query_y.shape
        (2, torch.Size([2, 2, 1]), torch.Size([2, 4]))
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor | None = None

    def __post_init__(self) -> None:
        if self.support_x.shape[: self.support_y.dim()] != self.support_y.shape:
            raise ValueError(
                f"support_x {tuple(self.support_x.shape)} does not start with support_y's shape "
                f"{tuple(self.support_y.shape)}; x must be (..., examples, *x_shape) and y (..., examples)"
            )
        if self.query_y is not None and self.query_x.shape[: self.query_y.dim()] != self.query_y.shape:
            raise ValueError(
                f"query_x {tuple(self.query_x.shape)} does not start with query_y's shape "
                f"{tuple(self.query_y.shape)}; x must be (..., examples, *x_shape) and y (..., examples)"
            )

    @property
    def tasks(self) -> int:
        """Size of the leading task dimension of a batched episode."""
        return self.support_y.shape[0]

    @property
    def is_regression(self) -> bool:
        """True when targets are floats (regression), False for class labels."""
        return self.support_y.is_floating_point()

    def check_batched(self, owner: str = "this learner", need_query_y: bool = True) -> "Episode":
        """Return self if it is a batched episode (a leading task dimension) with query labels where needed, else
        raise ``ValueError`` naming the shape and the fix; ``owner`` names the caller in the message."""
        if self.query_y is None and need_query_y:
            raise ValueError(
                f"{owner} needs query labels (query_y) for training and evaluation; the Episode has none "
                "(use adapt_and_predict or Trainer.predict for unlabelled queries)"
            )
        for name, dim in (("query_y", "queries"), ("support_y", "examples")):
            y = getattr(self, name)
            if y is not None and y.dim() != 2:
                raise ValueError(
                    f"expected a batched Episode with a leading task dimension ({name} (tasks, {dim})), got "
                    f"{name} {tuple(y.shape)}; batch episodes with a DataLoader or Episode.collate"
                )
        if self.support_x.shape[2:] != self.query_x.shape[2:]:
            raise ValueError(
                f"support inputs {tuple(self.support_x.shape[2:])} and query inputs "
                f"{tuple(self.query_x.shape[2:])} have different shapes"
            )
        return self

    def to(self, *args, **kwargs) -> "Episode":
        """Return a copy with every tensor moved/cast by ``Tensor.to`` (labels keep their dtype)."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t is None:
                out[f.name] = None
            else:
                out[f.name] = t.to(*args, **kwargs) if t.is_floating_point() else t.to(device=_device_of(args, kwargs, t))
        return Episode(**out)

    def pin_memory(self) -> "Episode":
        """Page-locked copy, so ``DataLoader(pin_memory=True)`` pins episodes (it calls this method)."""
        return Episode(*(None if getattr(self, f.name) is None else getattr(self, f.name).pin_memory() for f in fields(self)))

    def task(self, i: int) -> "Episode":
        """The i-th task of a batched episode, without the task dimension."""
        return Episode(self.support_x[i], self.support_y[i], self.query_x[i], None if self.query_y is None else self.query_y[i])

    @staticmethod
    def collate(episodes: Sequence["Episode"]) -> "Episode":
        """Stack single episodes into a batch with a leading task dimension."""
        if len(episodes) == 0:
            raise ValueError("cannot collate an empty list of episodes")
        unlabelled = [e.query_y is None for e in episodes]
        if any(unlabelled) and not all(unlabelled):
            raise ValueError("cannot collate episodes with and without query labels (query_y None) into one batch")
        return Episode(
            *(
                None if f.name == "query_y" and unlabelled[0] else torch.stack([getattr(e, f.name) for e in episodes])
                for f in fields(Episode)
            )
        )


def _device_of(args: tuple, kwargs: dict, like: Tensor) -> torch.device:
    if "device" in kwargs:
        return torch.device(kwargs["device"])
    for a in args:
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
        if isinstance(a, Tensor):
            return a.device
    return like.device
