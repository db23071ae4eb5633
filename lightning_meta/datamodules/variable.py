"""Variable-way, variable-shot episodes: the Meta-Dataset sampling protocol.

Triantafillou et al., "Meta-Dataset: A Dataset of Datasets for Learning to Learn from Few
Examples", ICLR 2020 (arXiv:1903.03096), Section 3.2. Each episode draws, in this order:

1. ways ``N`` uniform in ``[min_ways, min(max_ways, classes)]`` and ``N`` classes uniformly, or, given a
   class hierarchy (:class:`~lightning_meta.datamodules.ClassHierarchy`), the classes of one superclass or
   DAG node as Meta-Dataset draws them for Omniglot and ImageNet (:mod:`~lightning_meta.datamodules.hierarchy`);
2. a query count per class, the same for every class of the episode:
   ``min(max_query, floor(min_c count_c / 2))`` (query sets are balanced);
3. a support-set size ``min(max_support, sum_c floor(beta * min(max_support_per_class, remaining_c)) + 1)``
   with ``beta ~ U(0, 1)`` and ``remaining_c = count_c - queries``;
4. per-class shots proportional to the class sizes perturbed by ``exp(U(log 0.5, log 2))``:
   ``min(floor(p_c * (size - N)) + 1, remaining_c)``, so every class has at least one shot and the
   support set is class-imbalanced like the data.

The defaults are the paper's (5 to 50 ways, 10 queries, support size 500, 100 per class). Everything
is drawn from :func:`~lightning_meta.datamodules.sampling.episode_generator` ``(seed, split, epoch, i)``,
so an episode is a pure function of those four like the fixed-shape ones, and DDP sharding and
mid-epoch resume (:class:`~lightning_meta.datamodules.loader.EpisodeLoader`) work unchanged.

A single episode has its own sizes; :meth:`Episode.collate <lightning_meta.episode.Episode.collate>`
pads a batch to its largest support and query sets with label ``-1`` (see :class:`~lightning_meta.episode.Episode`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_meta.datamodules.hierarchy import ClassGroups, ClassHierarchy
from lightning_meta.datamodules.sampling import (
    ClassAugment,
    EpisodeDataset,
    episode_generator,
)
from lightning_meta.datamodules.store import ClassStore
from lightning_meta.episode import Episode

__all__ = ["VariableEpisodeDataset", "VariableEpisodes", "sample_composition"]


@dataclass(frozen=True)
class VariableEpisodes:
    """Parameters of Meta-Dataset's episode sampler (defaults: the paper's).

    Args:
        min_ways: fewest classes of an episode.
        max_ways: most classes (capped by the classes of the split).
        max_query: most query examples per class.
        max_support: most support examples in an episode.
        max_support_per_class: most that one class contributes to drawing the support-set size.
        min_log_weight: lower end of the log-uniform perturbation of class proportions.
        max_log_weight: upper end.

    Example:
        >>> VariableEpisodes(min_ways=2, max_ways=3).max_support
        500
    """

    min_ways: int = 5
    max_ways: int = 50
    max_query: int = 10
    max_support: int = 500
    max_support_per_class: int = 100
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2.0)

    def __post_init__(self) -> None:
        for k in ("min_ways", "max_ways", "max_query", "max_support", "max_support_per_class"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{k}={v!r} must be a positive integer")
        if self.max_ways < self.min_ways:
            raise ValueError(f"max_ways={self.max_ways} < min_ways={self.min_ways}; raise max_ways")
        if self.max_support < self.max_ways:
            raise ValueError(
                f"max_support={self.max_support} < max_ways={self.max_ways}: every class needs a support example"
            )
        if not self.min_log_weight <= self.max_log_weight:
            raise ValueError(f"min_log_weight={self.min_log_weight} > max_log_weight={self.max_log_weight}")


def sample_composition(
    counts: Tensor,
    num_classes: int,
    config: VariableEpisodes,
    generator: torch.Generator,
    *,
    groups: ClassGroups | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Draw an episode's classes, per-class shots and per-class query count (steps 1-4 of the module docstring).

    Args:
        counts: examples of each class, long ``(num_classes,)`` (virtual classes included).
        num_classes: classes to draw from.
        config: the sampler's parameters.
        generator: the episode's generator (the only randomness used).
        groups: draw the classes from one of these groups (a hierarchy bound to the split,
            :meth:`ClassHierarchy.bind <lightning_meta.datamodules.ClassHierarchy.bind>`) instead of uniformly.

    Returns:
        ``(classes (ways,), shots (ways,), queries)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> classes, shots, q = sample_composition(torch.full((20,), 20), 20, VariableEpisodes(max_ways=8), g)
        >>> 5 <= len(classes) <= 8, q, bool((shots >= 1).all() and (shots <= 10).all())
        (True, 10, True)
    """
    if groups is None:
        hi = min(config.max_ways, num_classes)
        ways = int(torch.randint(config.min_ways, hi + 1, (1,), generator=generator))
        classes = torch.randperm(num_classes, generator=generator)[:ways]
    else:
        classes = groups.draw(config.min_ways, config.max_ways, generator)[1]
        ways = len(classes)
    n = counts[classes]
    queries = min(config.max_query, int(n.min()) // 2)
    remaining = n - queries
    beta = float(torch.rand((), generator=generator))
    contrib = remaining.clamp(max=config.max_support_per_class).double()
    size = min(int(torch.floor(beta * contrib + 1).sum()), config.max_support)
    log_w = torch.empty(ways, dtype=torch.float64).uniform_(
        config.min_log_weight, config.max_log_weight, generator=generator
    )
    prop = n.double() * log_w.exp()
    prop = prop / prop.sum()
    shots = (torch.floor(prop * (size - ways)).long() + 1).minimum(remaining)
    return classes, shots, queries


class VariableEpisodeDataset(EpisodeDataset):
    """Episodes of varying ways and shots (Meta-Dataset's protocol) from a :class:`ClassStore`.

    ``__getitem__(i)`` returns an unpadded :class:`~lightning_meta.episode.Episode` whose support set
    has ``shots.sum()`` rows and whose query set has ``ways * queries`` rows, labels ``0..ways-1``
    (a random assignment), both in random order; :class:`~lightning_meta.datamodules.loader.EpisodeLoader`
    pads a batch with label ``-1``. Arguments as :class:`EpisodeDataset` (which documents them),
    with ``config`` in place of ways/shots/queries, and ``hierarchy``: draw each episode's classes from one
    superclass or DAG node of this :class:`~lightning_meta.datamodules.ClassHierarchy` (it must place every
    class of the store; under ``class_augment`` each group has one copy per variant, see
    :mod:`~lightning_meta.datamodules.hierarchy`). Its bound groups are :attr:`class_groups`.

    Raises:
        ValueError: when the split has fewer than ``config.min_ways`` classes or a class with fewer
            than 2 examples (one support, one query), or from :meth:`ClassHierarchy.eligible
            <lightning_meta.datamodules.ClassHierarchy.eligible>` when the hierarchy does not fit the split.
    """

    def __init__(
        self,
        store: ClassStore,
        config: VariableEpisodes,
        *,
        length: int,
        seed: int,
        split: str,
        transform: Callable[[Tensor], Tensor] | None = None,
        class_augment: ClassAugment | None = None,
        resample_per_epoch: bool = True,
        hierarchy: ClassHierarchy | None = None,
    ) -> None:
        if hierarchy is not None and not isinstance(hierarchy, ClassHierarchy):
            raise ValueError(f"hierarchy={hierarchy!r} must be a ClassHierarchy or None")
        counts = store.counts()
        if len(counts) and int(counts.min()) < 2:
            small = int(torch.argmin(counts))
            raise ValueError(
                f"class '{store.class_names[small]}' of split '{split}' has {int(counts[small])} example(s); "
                "variable-shot episodes need at least 2 per class (one support, one query): drop such classes"
            )
        super().__init__(
            store,
            ways=config.min_ways,
            shots=1,
            queries=1,
            length=length,
            seed=seed,
            split=split,
            transform=transform,
            class_augment=class_augment,
            resample_per_epoch=resample_per_epoch,
        )
        self.config = config
        self.hierarchy = hierarchy
        self.class_groups = (
            None
            if hierarchy is None
            else hierarchy.bind(
                store.class_names,
                config.min_ways,
                multiplier=self._multiplier,
                suffix=None if class_augment is None else class_augment.suffix,
                split=split,
            )
        )
        self.ways = self.shots = self.queries = None  # type: ignore[assignment]  # they vary per episode

    def composition(self, index: int) -> tuple[Tensor, Tensor, int]:
        """``(classes, shots, queries)`` of episode ``index`` (label ``j`` is ``classes[j]``)."""
        d = self._draw(index)
        return d[0], torch.bincount(d[2], minlength=len(d[0])), len(d[4]) // len(d[0])

    def _draw(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, torch.Generator]:
        if not 0 <= index < self.length:
            raise IndexError(f"episode index {index} out of range for {self.length} episodes")
        epoch = self.epoch if self.resample_per_epoch else 0
        g = episode_generator(self.seed, self.split, epoch, index)
        virtual_counts = self._counts.repeat(self._multiplier)
        classes, shots, q = sample_composition(
            virtual_counts, self.num_classes, self.config, g, groups=self.class_groups
        )
        ways = len(classes)
        base = classes % self.store.num_classes
        counts = self._counts[base]
        width = int(shots.max()) + q
        keys = torch.rand(ways, self._max_count, generator=g)
        keys.masked_fill_(self._arange_max >= counts.unsqueeze(1), 2.0)
        rows = keys.argsort(dim=1)[:, :width] + self._offsets[base].unsqueeze(1)  # (ways, width)
        col = torch.arange(width)
        labels = torch.arange(ways).unsqueeze(1).expand(-1, width)
        s_mask = col < shots.unsqueeze(1)
        q_mask = (col >= shots.unsqueeze(1)) & (col < shots.unsqueeze(1) + q)
        support, sy = rows[s_mask], labels[s_mask]
        query, qy = rows[q_mask], labels[q_mask]
        sp = torch.randperm(len(support), generator=g)
        qp = torch.randperm(len(query), generator=g)
        return classes, support[sp], sy[sp], query[qp], qy[qp], g

    def __getitems__(self, indices: Sequence[int]) -> list[Episode]:
        """Episodes ``indices``; equal to ``[self[i] for i in indices]`` (shapes differ, so nothing is pre-stacked)."""
        return [self[i] for i in indices]
