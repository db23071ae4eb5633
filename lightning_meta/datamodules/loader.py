"""The epoch-aware, resumable ``DataLoader`` of episode batches.

The epoch reaches the dataset through :class:`EpisodeLoader`, a ``DataLoader`` whose default
sampler (:class:`EpochSampler`, a ``SequentialSampler``) has ``set_epoch``. Lightning calls
``set_epoch`` on the loader's sampler every epoch, and under DDP replaces it by its own
``DistributedSampler`` (which also has ``set_epoch`` and shards the episode indices across ranks).
The loader reads the epoch from its sampler when the first batch of an epoch is requested (not at
``iter()``: Lightning 2.6 creates the first iterator before it calls ``set_epoch``), hands it to
the dataset and only then starts workers. The loader is stateful: Lightning saves its
``state_dict`` (epoch, batches consumed) in checkpoints, and a mid-epoch resume skips the consumed
episodes without generating them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any, cast

from torch.utils.data import DataLoader, Dataset, SequentialSampler
from typing_extensions import override

from lightning_meta.episode import Episode

__all__ = ["BatchedEpisodeList", "EpisodeLoader", "EpochSampler"]


class BatchedEpisodeList(list):
    """A list of single episodes that also carries them already stacked, as ``batched``.

    A dataset's ``__getitems__`` may return one (as :meth:`EpisodeDataset.__getitems__` does) so that
    the default collate of :class:`EpisodeLoader` uses ``batched`` as the batch instead of stacking the
    episodes again; ``batched`` must equal ``Episode.collate(list(self))``. A plain list is stacked as usual.

    Example:
        >>> import torch
        >>> eps = [Episode(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2, 3), torch.tensor([0, 1]))] * 2
        >>> out = BatchedEpisodeList(eps)
        >>> out.batched = Episode.collate(eps)
        >>> out.batched.support_x.shape  # (tasks, examples, features)
        torch.Size([2, 2, 3])
    """

    batched: Episode


def _collate(items: Sequence[Episode]) -> Episode:
    batched = getattr(items, "batched", None)
    return batched if batched is not None else Episode.collate(items)


class EpochSampler(SequentialSampler):
    """``SequentialSampler`` with ``set_epoch``: where :class:`EpisodeLoader` reads the epoch.

    Lightning calls ``set_epoch`` on a loader's sampler every epoch; under DDP it replaces this
    sampler by its own ``DistributedSampler`` (``shuffle=False``), which also carries the epoch.
    """

    def __init__(self, data_source: Sized) -> None:
        super().__init__(data_source)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that the loader hands to the dataset."""
        self.epoch = int(epoch)


class _SkipBatches:
    """An index sampler that skips its first ``skip`` batches (indices only; nothing is generated)."""

    def __init__(self, base: Any, skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.base) - self.skip, 0)


class _EpisodeIterator:
    """Starts the real DataLoader iterator at the first ``next``, after the epoch is known."""

    def __init__(self, loader: EpisodeLoader) -> None:
        self.loader = loader
        self.epoch: int | None = None
        self.consumed = 0
        self._it: Iterator | None = None

    def __iter__(self) -> _EpisodeIterator:
        return self

    def __len__(self) -> int:
        return len(self.loader)

    def __next__(self) -> Any:
        it = self._it if self._it is not None else self._start()
        batch = next(it)
        self.consumed += 1
        return batch

    def _start(self) -> Iterator:
        loader = self.loader
        epoch = loader.current_epoch
        skip = 0
        if loader._pending is not None:
            if loader._pending["epoch"] == epoch:
                skip = int(loader._pending["batches"])
            loader._pending = None
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)  # before workers start: they receive a copy of the dataset
        loader._skip = skip
        try:
            self._it = it = DataLoader.__iter__(loader)
        finally:
            loader._skip = 0
        self.epoch, self.consumed = epoch, skip
        return it


class EpisodeLoader(DataLoader):
    """A ``DataLoader`` of episode batches that passes the epoch to the dataset and resumes mid-epoch.

    Takes the ``DataLoader`` arguments; ``collate_fn`` defaults to :meth:`Episode.collate` (using
    the batch that a dataset's ``__getitems__`` already stacked into a :class:`BatchedEpisodeList`, as
    :meth:`EpisodeDataset.__getitems__` does, when there is one) and
    ``sampler`` to :class:`EpochSampler`. ``persistent_workers=True`` is refused: persistent workers
    keep the dataset copy of their first epoch, so training episodes would not change per epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int | None = 1,
        sampler: Any = None,
        *,
        collate_fn: Callable[[list], Any] | None = None,
        persistent_workers: bool = False,
        **kwargs: Any,
    ) -> None:
        if persistent_workers:
            raise ValueError(
                "persistent_workers=True is not supported by EpisodeLoader: workers would keep the dataset of "
                "their first epoch and training episodes would stop changing; use persistent_workers=False"
            )
        if kwargs.get("shuffle"):
            raise ValueError("shuffle=True is not supported: episodes are already random draws; use shuffle=False")
        if sampler is None and kwargs.get("batch_sampler") is None:
            sampler = EpochSampler(cast(Sized, dataset))  # a map-style dataset; torch's Dataset declares no __len__
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_fn if collate_fn is not None else _collate,
            persistent_workers=False,
            **kwargs,
        )
        self._pending: dict[str, int] | None = None
        self._skip = 0
        self._live: _EpisodeIterator | None = None

    @property
    def current_epoch(self) -> int:
        """The epoch of the sampler (set by Lightning through ``set_epoch``), 0 if it has none."""
        for s in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if s is not None and hasattr(s, "epoch"):
                return int(s.epoch)
        return 0

    def set_epoch(self, epoch: int) -> None:
        """Set the sampler's epoch (for use outside Lightning)."""
        for s in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if s is not None and hasattr(s, "set_epoch"):
                s.set_epoch(epoch)

    @property
    def _index_sampler(self) -> Any:
        base = super()._index_sampler
        return _SkipBatches(base, self._skip) if self._skip else base

    @override
    def __iter__(self) -> _EpisodeIterator:  # type: ignore[override]
        self._live = _EpisodeIterator(self)
        return self._live

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: the epoch of the current pass and the batches it has yielded."""
        if self._live is not None and self._live.epoch is not None:
            return {"epoch": self._live.epoch, "batches": self._live.consumed}
        if self._pending is not None:
            return dict(self._pending)
        return {"epoch": self.current_epoch, "batches": 0}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume: the next pass over epoch ``state_dict["epoch"]`` skips its first ``batches`` batches."""
        self._pending = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}
        self.set_epoch(self._pending["epoch"])
