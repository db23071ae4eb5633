"""Episode sampling: a map-style dataset over episode indices, its loader and the base DataModule.

Episode ``i`` of epoch ``e`` of split ``s`` is a pure function of ``(seed, s, e, i)``: it is drawn
with a ``torch.Generator`` seeded from a stable hash of the four. So validation and test episodes
are identical on every run, worker count and number of ranks; training episodes change per epoch;
and Lightning's own ``DistributedSampler`` shards episodes across ranks with no custom sampler.

The epoch reaches the dataset through :class:`EpisodeLoader`, a ``DataLoader`` whose default
sampler (:class:`EpochSampler`, a ``SequentialSampler``) has ``set_epoch``. Lightning calls
``set_epoch`` on the loader's sampler every epoch, and under DDP replaces it by its own
``DistributedSampler`` (which also has ``set_epoch``). The loader reads the epoch from its sampler
when the first batch of an epoch is requested (not at ``iter()``: Lightning 2.6 creates the
first iterator before it calls ``set_epoch``), hands it to the dataset and only then starts workers.
The loader is stateful: Lightning saves its ``state_dict`` (epoch, batches consumed) in
checkpoints, and a mid-epoch resume skips the consumed episodes without generating them.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any, Callable, Iterator, Protocol, Sequence, Sized

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from typing_extensions import override

from lightning_meta.datamodules.store import ClassStore
from lightning_meta.episode import Episode

__all__ = [
    "ClassAugment",
    "EpisodeDataset",
    "EpisodeLoader",
    "EpisodicDataModule",
    "EpochSampler",
    "Rotations",
    "episode_generator",
    "episode_seed",
]

SPLITS = ("train", "val", "test")


def episode_seed(seed: int, split: str, epoch: int, index: int) -> int:
    """A stable 63-bit seed for episode ``index`` of ``epoch`` of ``split`` (blake2b, not ``hash()``).

    Example:
        >>> episode_seed(0, "train", 0, 0) == episode_seed(0, "train", 0, 0) != episode_seed(0, "train", 1, 0)
        True
    """
    digest = hashlib.blake2b(f"{int(seed)}/{split}/{int(epoch)}/{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def episode_generator(seed: int, split: str, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded with :func:`episode_seed`."""
    return torch.Generator().manual_seed(episode_seed(seed, split, epoch, index))


class ClassAugment(Protocol):
    """Turns each class into ``multiplier`` classes (e.g. rotations as new classes).

    Virtual class ``v`` of a store with ``C`` classes is base class ``v % C`` under variant ``v // C``.
    """

    multiplier: int

    def __call__(self, images: Tensor, variant: int) -> Tensor:
        """Apply variant ``variant`` to uint8 images ``(n, C, H, W)``."""
        ...

    def suffix(self, variant: int) -> str:
        """Name suffix of a variant, e.g. ``"rot090"``."""
        ...


class Rotations:
    """Rotations by multiples of 90 degrees as new classes (Omniglot, Santoro et al. 2016).

    Args:
        angles: counter-clockwise angles, multiples of 90; variant ``k`` rotates by ``angles[k]``.
    """

    def __init__(self, angles: Sequence[int] = (0, 90, 180, 270)) -> None:
        bad = [a for a in angles if a % 90 != 0]
        if bad or len(angles) == 0 or len(set(a % 360 for a in angles)) != len(angles):
            raise ValueError(f"angles={list(angles)} must be distinct multiples of 90, e.g. (0, 90, 180, 270)")
        self.angles = [int(a) % 360 for a in angles]
        self.multiplier = len(self.angles)

    def __call__(self, images: Tensor, variant: int) -> Tensor:
        k = self.angles[variant] // 90
        return images if k == 0 else torch.rot90(images, k, dims=(-2, -1))

    def suffix(self, variant: int) -> str:
        return f"rot{self.angles[variant]:03d}"


class EpisodeDataset(Dataset):
    """Few-shot classification episodes drawn from a :class:`ClassStore`; map-style over indices.

    ``__getitem__(i)`` returns a single :class:`~lightning_meta.episode.Episode` (no task dim):
    ``support_x`` float ``(ways * shots, C, H, W)`` in [0, 1] (before ``transform``), ``support_y``
    long ``(ways * shots,)`` in ``0..ways-1``, and the same for ``queries``. The classes, their
    labels (a random permutation per episode), the disjoint support/query rows and the order of
    both sets are drawn from :func:`episode_generator` ``(seed, split, epoch, i)``.

    Args:
        store: the classes of this split.
        ways: classes per episode.
        shots: support examples per class.
        queries: query examples per class.
        length: episodes per epoch.
        seed: base seed.
        split: split name mixed into the seed, so splits never share episodes.
        transform: applied to each float image ``(C, H, W)`` separately (random transforms see
            per-image parameters); it runs under ``torch.random.fork_rng`` seeded from the episode,
            so random augmentation keeps episodes a pure function of the index.
        class_augment: e.g. :class:`Rotations`; multiplies the classes.
        resample_per_epoch: if False (evaluation splits), the epoch is ignored and every epoch
            sees the same episodes.
    """

    def __init__(
        self,
        store: ClassStore,
        *,
        ways: int,
        shots: int,
        queries: int,
        length: int,
        seed: int,
        split: str,
        transform: Callable[[Tensor], Tensor] | None = None,
        class_augment: ClassAugment | None = None,
        resample_per_epoch: bool = True,
    ) -> None:
        _check_positive(ways=ways, shots=shots, length=length)
        if queries < 0:
            raise ValueError(f"queries={queries} must be >= 0")
        self.store = store
        self.ways, self.shots, self.queries, self.length = ways, shots, queries, length
        self.seed, self.split = seed, split
        self.transform = transform
        self.class_augment = class_augment
        self.resample_per_epoch = resample_per_epoch
        self.epoch = 0
        self._multiplier = class_augment.multiplier if class_augment is not None else 1
        counts = store.counts()
        if self.num_classes < ways:
            raise ValueError(
                f"ways={ways} but split '{split}' has only {self.num_classes} classes; "
                "lower ways (or eval_ways) or use a split with more classes"
            )
        need = shots + queries
        if len(counts) and int(counts.min()) < need:
            small = int(torch.argmin(counts))
            raise ValueError(
                f"shots + queries = {shots} + {queries} = {need} but class '{store.class_names[small]}' of split "
                f"'{split}' has only {int(counts[small])} examples; lower shots/queries (or eval_shots/eval_queries) "
                f"to at most {int(counts.min())} in total"
            )

    @property
    def num_classes(self) -> int:
        """Classes available to episodes (store classes times the class augmentation)."""
        return self.store.num_classes * self._multiplier

    def class_name(self, v: int) -> str:
        """Name of (virtual) class ``v``."""
        c, k = v % self.store.num_classes, v // self.store.num_classes
        name = self.store.class_names[c]
        return name if self.class_augment is None else f"{name}/{self.class_augment.suffix(k)}"

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that the following ``__getitem__`` calls draw from."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def episode_classes(self, index: int) -> Tensor:
        """The (virtual) classes of episode ``index``, in label order, long ``(ways,)``."""
        return self._draw(index)[0]

    def _draw(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, torch.Generator]:
        """Classes and the permuted store rows/labels of support and query; pure in (seed, split, epoch, index)."""
        if not 0 <= index < self.length:
            raise IndexError(f"episode index {index} out of range for {self.length} episodes")
        epoch = self.epoch if self.resample_per_epoch else 0
        g = episode_generator(self.seed, self.split, epoch, index)
        classes = torch.randperm(self.num_classes, generator=g)[: self.ways]  # label j -> classes[j]
        base = classes % self.store.num_classes
        counts = self._counts[base]  # (ways,)
        # a uniform random subset of each class's rows: sort random keys, padding rows past the count last
        keys = torch.rand(self.ways, self._max_count, generator=g)
        keys.masked_fill_(self._arange_max >= counts.unsqueeze(1), 2.0)
        rows = keys.argsort(dim=1)[:, : self.shots + self.queries] + self._offsets[base].unsqueeze(1)
        labels = torch.arange(self.ways).unsqueeze(1)
        s, q = self.shots, self.queries
        sp = torch.randperm(self.ways * s, generator=g)
        qp = torch.randperm(self.ways * q, generator=g)
        support = rows[:, :s].flatten()[sp]  # (ways * shots,)
        query = rows[:, s:].flatten()[qp]  # (ways * queries,)
        return classes, support, labels.expand(-1, s).flatten()[sp], query, labels.expand(-1, q).flatten()[qp], g

    def _images(self, rows: Tensor, labels: Tensor, classes: Tensor) -> Tensor:
        x = self.store.images[rows]  # (..., C, H, W) uint8
        if self.class_augment is not None:
            variant = classes[labels] // self.store.num_classes
            x = x.clone()
            for v in variant.unique().tolist():
                mask = variant == v
                x[mask] = self.class_augment(x[mask], v)
        return x.float().div_(255)

    def __getitem__(self, index: int) -> Episode:
        classes, sr, sy, qr, qy, g = self._draw(int(index))
        sx, qx = self._images(sr, sy, classes), self._images(qr, qy, classes)
        if self.transform is not None:
            aug_seed = int(torch.randint(0, 2**62, (1,), generator=g))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(aug_seed)
                sx = _map_images(self.transform, sx)
                qx = _map_images(self.transform, qx)
        return Episode(sx, sy, qx, qy)

    def __getitems__(self, indices: Sequence[int]) -> list[Episode]:
        """Episodes ``indices`` (what ``DataLoader`` calls for a batch); equal to ``[self[i] for i in indices]``.

        Without a transform the images of the whole batch are gathered and converted at once, and
        the returned list carries the stacked batch, which :class:`EpisodeLoader` uses directly.
        """
        if self.transform is not None or len(indices) == 0:
            return [self[i] for i in indices]
        draws = [self._draw(int(i)) for i in indices]
        classes = torch.stack([d[0] for d in draws])  # (tasks, ways)
        sr, sy, qr, qy = (torch.stack([d[k] for d in draws]) for k in (1, 2, 3, 4))  # (tasks, ways * n)
        task = torch.arange(len(draws)).unsqueeze(1)
        sx = self._images(sr, sy + task * self.ways, classes.flatten())
        qx = self._images(qr, qy + task * self.ways, classes.flatten())
        batch = Episode(sx, sy, qx, qy)
        out = _EpisodeList(batch.task(t) for t in range(len(draws)))
        out.batched = batch
        return out

    @property
    def _counts(self) -> Tensor:
        return self._cache("counts", lambda: self.store.counts())

    @property
    def _offsets(self) -> Tensor:
        return self._cache("offsets", lambda: self.store.offsets[:-1])

    @property
    def _max_count(self) -> int:
        return self._cache("max_count", lambda: int(self._counts.max()))

    @property
    def _arange_max(self) -> Tensor:
        return self._cache("arange_max", lambda: torch.arange(self._max_count))

    def _cache(self, key: str, make: Callable[[], Any]) -> Any:
        cache = self.__dict__.setdefault("_derived", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]


class _EpisodeList(list):
    """A list of single episodes that also carries them stacked (``batched``)."""

    batched: Episode


def _collate(items: Sequence[Episode]) -> Episode:
    batched = getattr(items, "batched", None)
    return batched if batched is not None else Episode.collate(items)


def _map_images(transform: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    if len(x) == 0:
        return x
    return torch.stack([transform(img) for img in x])


def _check_positive(**values: int) -> None:
    for k, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{k}={v!r} must be a positive integer")


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

    def __init__(self, loader: "EpisodeLoader") -> None:
        self.loader = loader
        self.epoch: int | None = None
        self.consumed = 0
        self._it: Iterator | None = None

    def __iter__(self) -> "_EpisodeIterator":
        return self

    def __len__(self) -> int:
        return len(self.loader)

    def __next__(self) -> Any:
        if self._it is None:
            self._start()
        batch = next(self._it)
        self.consumed += 1
        return batch

    def _start(self) -> None:
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
            self._it = DataLoader.__iter__(loader)
        finally:
            loader._skip = 0
        self.epoch, self.consumed = epoch, skip


class EpisodeLoader(DataLoader):
    """A ``DataLoader`` of episode batches that passes the epoch to the dataset and resumes mid-epoch.

    Takes the ``DataLoader`` arguments; ``collate_fn`` defaults to :meth:`Episode.collate` (using
    the batch that :meth:`EpisodeDataset.__getitems__` already stacked, when there is one) and
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
            raise ValueError(
                "shuffle=True is not supported: episodes are already random draws; use shuffle=False"
            )
        if sampler is None and kwargs.get("batch_sampler") is None:
            sampler = EpochSampler(dataset)
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


class EpisodicDataModule(LightningDataModule):
    """Base DataModule of few-shot classification episodes.

    Subclasses implement :meth:`build_stores` (``{"train", "val", "test"}`` -> :class:`ClassStore`,
    usually via :func:`~lightning_meta.datamodules.store.cached_store`) and may override
    :attr:`train_transform`, :attr:`eval_transform` and :meth:`class_augment`. A meta-batch is
    ``tasks_per_batch`` episodes; an optimizer step sees ``tasks_per_batch * devices *
    accumulate_grad_batches`` tasks.

    Args:
        ways: classes per training episode.
        shots: support examples per class in training episodes.
        queries: query examples per class in training episodes.
        tasks_per_batch: episodes per batch (the DataLoader batch size).
        train_episodes: training episodes per epoch (an epoch is ``train_episodes / tasks_per_batch`` batches).
        val_episodes: validation episodes (fixed across epochs and runs).
        test_episodes: test episodes (fixed across runs).
        eval_ways: ways at validation/test; default ``ways``.
        eval_shots: shots at validation/test; default ``shots``.
        eval_queries: queries at validation/test; default ``queries``.
        seed: seed of every episode draw.
        num_workers: DataLoader workers (episodes do not depend on it).
        cache_dir: where decoded stores are cached; default ``LIGHTNING_META_CACHE`` or the user cache dir.
        pin_memory: DataLoader ``pin_memory``.
    """

    def __init__(
        self,
        *,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        tasks_per_batch: int = 32,
        train_episodes: int = 3200,
        val_episodes: int = 640,
        test_episodes: int = 600,
        eval_ways: int | None = None,
        eval_shots: int | None = None,
        eval_queries: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        _check_positive(
            ways=ways, shots=shots, tasks_per_batch=tasks_per_batch, train_episodes=train_episodes,
            val_episodes=val_episodes, test_episodes=test_episodes,
        )
        for k, v in {"queries": queries, "eval_queries": eval_queries, "num_workers": num_workers}.items():
            if v is not None and v < 0:
                raise ValueError(f"{k}={v} must be >= 0")
        for k, v in {"eval_ways": eval_ways, "eval_shots": eval_shots}.items():
            if v is not None:
                _check_positive(**{k: v})
        self.ways, self.shots, self.queries = ways, shots, queries
        self.tasks_per_batch = tasks_per_batch
        self.train_episodes, self.val_episodes, self.test_episodes = train_episodes, val_episodes, test_episodes
        self.eval_ways = eval_ways if eval_ways is not None else ways
        self.eval_shots = eval_shots if eval_shots is not None else shots
        self.eval_queries = eval_queries if eval_queries is not None else queries
        self.seed = seed
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.pin_memory = pin_memory
        self.datasets: dict[str, Dataset] = {}

    def build_stores(self) -> dict[str, ClassStore]:
        """Decode (or load from the cache) the class stores of ``"train"``, ``"val"`` and ``"test"``."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_stores()")

    @property
    def train_transform(self) -> Callable[[Tensor], Tensor] | None:
        """Per-image transform of training episodes (float ``(C, H, W)`` in [0, 1]); None by default."""
        return None

    @property
    def eval_transform(self) -> Callable[[Tensor], Tensor] | None:
        """Per-image transform of validation/test episodes; None by default."""
        return None

    def class_augment(self, split: str) -> ClassAugment | None:
        """Class augmentation of a split (e.g. :class:`Rotations`); None by default."""
        return None

    def episode_shape(self, split: str) -> tuple[int, int, int, int]:
        """``(ways, shots, queries, episodes)`` of a split."""
        if split == "train":
            return self.ways, self.shots, self.queries, self.train_episodes
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        n = self.val_episodes if split == "val" else self.test_episodes
        return self.eval_ways, self.eval_shots, self.eval_queries, n

    def make_datasets(self) -> dict[str, Dataset]:
        """Build the datasets of the three splits (calls :meth:`build_stores`; validates before sampling)."""
        stores = self.build_stores()
        missing = [s for s in SPLITS if s not in stores]
        if missing:
            raise ValueError(f"build_stores() of {type(self).__name__} returned no store for splits {missing}")
        overlap = _overlap(stores)
        if overlap:
            raise ValueError(f"splits share classes {overlap[:5]}; train/val/test classes must be disjoint")
        out = {}
        for split in SPLITS:
            ways, shots, queries, n = self.episode_shape(split)
            out[split] = EpisodeDataset(
                stores[split], ways=ways, shots=shots, queries=queries, length=n, seed=self.seed, split=split,
                transform=self.train_transform if split == "train" else self.eval_transform,
                class_augment=self.class_augment(split), resample_per_epoch=split == "train",
            )
        return out

    @override
    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = self.make_datasets()

    def _loader(self, split: str) -> EpisodeLoader:
        if not self.datasets:
            raise RuntimeError(f"call setup() before {split}_dataloader()")
        return EpisodeLoader(
            self.datasets[split], batch_size=self.tasks_per_batch, num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    @override
    def train_dataloader(self) -> EpisodeLoader:
        return self._loader("train")

    @override
    def val_dataloader(self) -> EpisodeLoader:
        return self._loader("val")

    @override
    def test_dataloader(self) -> EpisodeLoader:
        return self._loader("test")


def _overlap(stores: dict[str, ClassStore]) -> list[str]:
    seen: dict[str, str] = {}
    shared = []
    for split in SPLITS:
        for c in stores[split].class_names:
            if c in seen and seen[c] != split:
                shared.append(c)
            seen[c] = split
    return shared
