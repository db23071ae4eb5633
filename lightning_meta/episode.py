"""The Episode: the one batch type every datamodule emits and every module eats."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["PAD_LABEL", "Episode"]

#: Label of the padding rows of a batch of variable-size episodes (see :class:`Episode`).
PAD_LABEL = -1


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

    Variable-way, variable-shot episodes (:class:`~lightning_meta.datamodules.VariableEpisodes`) are
    padded, not split into one task per batch: :meth:`collate` pads every task to the largest support
    and query set of the batch with zero inputs and label ``PAD_LABEL`` (``-1``); ``support_mask``
    and ``query_mask`` (``y >= 0``) mark the real rows. A task's ways are ``support_y.max() + 1`` and
    differ between tasks. The built-in losses and accuracies (:mod:`lightning_meta.functional.losses`)
    average over real rows only, so confidence intervals are over episodes as before; learners drop
    the padding before their networks see it (:class:`~lightning_meta.algorithms.MetaLearner` runs
    such batches as a per-task loop). Regression targets are never padded.

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
    #: :attr:`is_padded` once computed (or assigned); None until then, and again after a field is reassigned
    _padded: bool | None = field(default=None, init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name in _FIELDS:  # new tensors: the cached padding check no longer applies
            object.__setattr__(self, "_padded", None)

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
    def support_mask(self) -> Tensor:
        """Bool mask of real (not padding) support rows, shaped like ``support_y``."""
        return _mask(self.support_y)

    @property
    def query_mask(self) -> Tensor:
        """Bool mask of real (not padding) query rows, shaped like ``query_y``."""
        if self.query_y is None:
            raise ValueError(
                "query_mask needs query labels, but query_y is None (an unlabelled episode); "
                "padding rows are marked by the labels, so pass query_y or use support_mask only"
            )
        return _mask(self.query_y)

    @property
    def is_padded(self) -> bool:
        """Whether any row is padding (label ``PAD_LABEL``).

        The check reads the labels, which synchronises with the device, so it runs once per instance and is cached
        (a training step asks several times); reassigning a field clears the cache, changing labels in place does
        not. Assign it where it is known without looking (e.g. the chunks of a batch without padding).
        """
        if self._padded is None:
            self._padded = not self.is_regression and _has_padding(self.support_y, self.query_y)
        return self._padded

    @is_padded.setter
    def is_padded(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"is_padded={value!r} must be True or False")
        self._padded = value

    @property
    def is_regression(self) -> bool:
        """True when targets are floats (regression), False for class labels."""
        return self.support_y.is_floating_point()

    def check_batched(self, owner: str = "this learner", need_query_y: bool = True) -> Episode:
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

    def to(self, *args, **kwargs) -> Episode:
        """Return a copy with every tensor moved/cast by ``Tensor.to`` (labels keep their dtype)."""

        def move(t: Tensor) -> Tensor:
            return t.to(*args, **kwargs) if t.is_floating_point() else t.to(device=_device_of(args, kwargs, t))

        return self._map(move)

    def pin_memory(self) -> Episode:
        """Page-locked copy, so ``DataLoader(pin_memory=True)`` pins episodes (it calls this method)."""
        return self._map(Tensor.pin_memory)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Episode:
        """A new episode of ``fn`` applied to every tensor field (``query_y`` None stays None)."""
        support_x, support_y, query_x = fn(self.support_x), fn(self.support_y), fn(self.query_x)
        out = Episode(support_x, support_y, query_x, None if self.query_y is None else fn(self.query_y))
        out._padded = self._padded  # the same labels, moved or pinned
        return out

    def task(self, i: int) -> Episode:
        """The i-th task of a batched episode, without the task dimension."""
        return Episode(
            self.support_x[i], self.support_y[i], self.query_x[i], None if self.query_y is None else self.query_y[i]
        )

    @staticmethod
    def collate(episodes: Sequence[Episode]) -> Episode:
        """Stack single episodes into a batch with a leading task dimension.

        Classification episodes of different sizes are padded to the largest support and query set
        (zero inputs, label ``PAD_LABEL``).

        Example:
            >>> a = Episode(torch.ones(1, 1), torch.tensor([0]), torch.ones(1, 1), torch.tensor([0]))
            >>> b = Episode(torch.ones(3, 1), torch.tensor([0, 1, 2]), torch.ones(1, 1), torch.tensor([1]))
            >>> Episode.collate([a, b]).support_y
            tensor([[ 0, -1, -1],
                    [ 0,  1,  2]])
        """
        if len(episodes) == 0:
            raise ValueError("cannot collate an empty list of episodes")
        unlabelled = [e.query_y is None for e in episodes]
        if any(unlabelled) and not all(unlabelled):
            raise ValueError("cannot collate episodes with and without query labels (query_y None) into one batch")

        def stack(name: str) -> Tensor:
            ts = [getattr(e, name) for e in episodes]
            if len({t.shape for t in ts}) > 1:
                if episodes[0].is_regression:
                    raise ValueError(
                        f"regression episodes must share shapes, got {name} shapes {sorted({tuple(t.shape) for t in ts})}"
                    )
                n = max(len(t) for t in ts)
                fill = PAD_LABEL if name.endswith("_y") else 0
                ts = [torch.cat([t, t.new_full((n - len(t), *t.shape[1:]), fill)]) if len(t) < n else t for t in ts]
            return torch.stack(ts)

        support_x, support_y, query_x = stack("support_x"), stack("support_y"), stack("query_x")
        return Episode(support_x, support_y, query_x, None if unlabelled[0] else stack("query_y"))


_FIELDS = frozenset({"support_x", "support_y", "query_x", "query_y"})


def _has_padding(support_y: Tensor, query_y: Tensor | None) -> bool:
    """Whether any class label is ``PAD_LABEL`` (one host synchronisation)."""
    padded = (support_y < 0).any()
    if query_y is not None:
        padded = padded | (query_y < 0).any()
    return bool(padded)


def _mask(y: Tensor) -> Tensor:
    return torch.ones_like(y, dtype=torch.bool) if y.is_floating_point() else y >= 0


def _device_of(args: tuple, kwargs: dict, like: Tensor) -> torch.device:
    if "device" in kwargs:
        return torch.device(kwargs["device"])
    for a in args:
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
        if isinstance(a, Tensor):
            return a.device
    return like.device
