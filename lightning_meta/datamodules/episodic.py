"""The base few-shot DataModule: class stores in, episode loaders out.

Episode ``i`` of epoch ``e`` of split ``s`` is a pure function of ``(seed, s, e, i)``
(:mod:`~lightning_meta.datamodules.sampling`), so validation and test episodes are identical on
every run, worker count and number of ranks, and training episodes change per epoch; the epoch
reaches the dataset through :class:`~lightning_meta.datamodules.loader.EpisodeLoader`, which
Lightning shards under DDP with its own ``DistributedSampler`` and checkpoints for mid-epoch
resume. This module re-exports the sampling and loader API.
"""

from __future__ import annotations

from collections.abc import Callable

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_meta.datamodules.hierarchy import ClassHierarchy
from lightning_meta.datamodules.loader import BatchedEpisodeList, EpisodeLoader, EpochSampler
from lightning_meta.datamodules.sampling import (
    ClassAugment,
    EpisodeDataset,
    Rotations,
    episode_generator,
    episode_seed,
)
from lightning_meta.datamodules.store import ClassStore
from lightning_meta.datamodules.variable import VariableEpisodeDataset, VariableEpisodes
from lightning_meta.utils import check_positive

__all__ = [
    "BatchedEpisodeList",
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
        variable_episodes: draw every split's episodes with Meta-Dataset's variable-way, variable-shot
            sampler (:class:`~lightning_meta.datamodules.VariableEpisodes`, e.g. ``VariableEpisodes()`` for
            the paper's 5-50 ways) instead of ``ways``/``shots``/``queries`` (which are then unused);
            batches are padded (:class:`~lightning_meta.episode.Episode`). ``None``: fixed shapes.
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
        variable_episodes: VariableEpisodes | None = None,
    ) -> None:
        super().__init__()
        if variable_episodes is not None and not isinstance(variable_episodes, VariableEpisodes):
            raise ValueError(
                f"variable_episodes={variable_episodes!r} must be a VariableEpisodes (e.g. VariableEpisodes()) or None"
            )
        self.variable_episodes = variable_episodes
        check_positive(
            ways=ways,
            shots=shots,
            tasks_per_batch=tasks_per_batch,
            train_episodes=train_episodes,
            val_episodes=val_episodes,
            test_episodes=test_episodes,
        )
        for k, v in {"queries": queries, "eval_queries": eval_queries, "num_workers": num_workers}.items():
            if v is not None and v < 0:
                raise ValueError(f"{k}={v} must be >= 0")
        for k, v in {"eval_ways": eval_ways, "eval_shots": eval_shots}.items():
            if v is not None:
                check_positive(**{k: v})
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

    def class_hierarchy(self, split: str, store: ClassStore) -> ClassHierarchy | None:
        """Hierarchy that variable-way episodes of a split draw their classes from (superclasses or a DAG,
        :class:`~lightning_meta.datamodules.ClassHierarchy`); None by default: classes uniformly from the split."""
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
        if stores["train"].num_classes == 0:
            raise ValueError(
                f"the train split of {type(self).__name__} has no classes; it needs at least `ways` classes"
            )
        overlap = _overlap(stores)
        if overlap:
            raise ValueError(f"splits share classes {overlap[:5]}; train/val/test classes must be disjoint")
        out: dict[str, Dataset] = {}
        for split in SPLITS:
            if split != "train" and stores[split].num_classes == 0:
                # e.g. final training on every class: no episodes for this split (see val_dataloader)
                rank_zero_info(f"{type(self).__name__}: the {split} split has no classes; {split} is off")
                continue
            ways, shots, queries, n = self.episode_shape(split)
            if self.variable_episodes is not None:
                out[split] = VariableEpisodeDataset(
                    stores[split],
                    self.variable_episodes,
                    length=n,
                    seed=self.seed,
                    split=split,
                    transform=self.train_transform if split == "train" else self.eval_transform,
                    class_augment=self.class_augment(split),
                    resample_per_epoch=split == "train",
                    hierarchy=self.class_hierarchy(split, stores[split]),
                )
                continue
            out[split] = EpisodeDataset(
                stores[split],
                ways=ways,
                shots=shots,
                queries=queries,
                length=n,
                seed=self.seed,
                split=split,
                transform=self.train_transform if split == "train" else self.eval_transform,
                class_augment=self.class_augment(split),
                resample_per_epoch=split == "train",
            )
        return out

    @override
    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = self.make_datasets()

    def _loader(self, split: str) -> EpisodeLoader:
        if not self.datasets:
            raise RuntimeError(f"call setup() before {split}_dataloader()")
        if split not in self.datasets:
            raise ValueError(
                f"the {split} split has no classes, so there are no {split} episodes; give it classes (split files, "
                f"class lists or fractions) to {'test' if split == 'test' else 'evaluate'}"
            )
        return EpisodeLoader(
            self.datasets[split],
            batch_size=self.tasks_per_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    @override
    def train_dataloader(self) -> EpisodeLoader:
        return self._loader("train")

    @override
    def val_dataloader(self) -> EpisodeLoader | list:
        # An empty validation split (training on every class) turns validation off: Lightning skips an empty list.
        if self.datasets and "val" not in self.datasets:
            return []
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
