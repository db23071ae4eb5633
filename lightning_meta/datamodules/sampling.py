"""Episode sampling: a map-style dataset whose episode ``i`` of epoch ``e`` of split ``s`` is a pure
function of ``(seed, s, e, i)``.

Each episode is drawn with a ``torch.Generator`` seeded from a stable hash (blake2b) of the four, so
validation and test episodes are identical on every run, worker count and number of ranks, and
training episodes change per epoch. Sampling is tensor indexing into a
:class:`~lightning_meta.datamodules.store.ClassStore`; a batch of episodes is gathered at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_meta.datamodules.loader import BatchedEpisodeList
from lightning_meta.datamodules.store import ClassStore
from lightning_meta.episode import Episode
from lightning_meta.utils import check_positive

__all__ = ["ClassAugment", "EpisodeDataset", "Rotations", "episode_generator", "episode_seed"]


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
        check_positive(ways=ways, shots=shots, length=length)
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
        # the datamodules' names: train episodes take ways/shots/queries, val and test the eval_* arguments
        pre = "" if split == "train" else "eval_"
        if self.num_classes < ways:
            raise ValueError(
                f"{pre}ways={ways} but split '{split}' has only {self.num_classes} classes; "
                f"lower {pre}ways or use a split with more classes"
            )
        need = shots + queries
        if len(counts) and int(counts.min()) < need:
            small = int(torch.argmin(counts))
            raise ValueError(
                f"{pre}shots + {pre}queries = {shots} + {queries} = {need} but class '{store.class_names[small]}' of "
                f"split '{split}' has only {int(counts[small])} examples; lower {pre}shots/{pre}queries to at most "
                f"{int(counts.min())} in total"
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

    def episode_rows(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(classes, support_rows, support_labels, query_rows, query_labels)`` of episode ``index``: which store
        rows each episode uses, without loading images (e.g. to serve precomputed features of the same episodes)."""
        classes, sr, sy, qr, qy, _ = self._draw(int(index))
        return classes, sr, sy, qr, qy

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
        sr, sy = torch.stack([d[1] for d in draws]), torch.stack([d[2] for d in draws])  # (tasks, ways * n)
        qr, qy = torch.stack([d[3] for d in draws]), torch.stack([d[4] for d in draws])
        task = torch.arange(len(draws)).unsqueeze(1)
        sx = self._images(sr, sy + task * self.ways, classes.flatten())
        qx = self._images(qr, qy + task * self.ways, classes.flatten())
        batch = Episode(sx, sy, qx, qy)
        out = BatchedEpisodeList(batch.task(t) for t in range(len(draws)))
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


def _map_images(transform: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    if len(x) == 0:
        return x
    return torch.stack([transform(img) for img in x])


_check_positive = check_positive  # the old private name, kept for third-party imports
