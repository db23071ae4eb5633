"""Episodes from several sources (datasets), each episode from one source (Meta-Dataset's training protocol).

Episode ``i`` of epoch ``e`` of split ``s`` first draws its source from
:func:`~lightning_meta.datamodules.sampling.episode_generator` ``(seed, "s/source", e, i)``, uniformly or in
proportion to the sources' sizes (their images in that split), and is then that source's episode ``i``,
drawn with the split name ``"s/<source>"``, so it stays a pure function of ``(seed, split, epoch, index)``
and the loader's DDP sharding and mid-epoch resume apply unchanged. All sources of a split must have
images of the same shape (decode them at one ``image_size`` and channel count).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_meta.datamodules.episodic import (
    SPLITS,
    EpisodeLoader,
    EpisodicDataModule,
)
from lightning_meta.datamodules.sampling import EpisodeDataset, episode_generator
from lightning_meta.datamodules.store import ClassStore
from lightning_meta.datamodules.variable import VariableEpisodeDataset, VariableEpisodes
from lightning_meta.episode import Episode

__all__ = ["MultiSourceDataModule", "MultiSourceEpisodeDataset"]

Sampling = Literal["uniform", "size"]


class MultiSourceEpisodeDataset(Dataset):
    """Episodes each drawn from one of several episode datasets (see the module docstring).

    Args:
        sources: name -> episode dataset of this split; each must have at least ``length`` episodes and
            should use the split name ``f"{split}/{name}"`` so sources never share draws.
        length: episodes per epoch.
        seed: seed of the source draws.
        split: split name.
        sampling: ``"uniform"`` over sources or ``"size"`` (proportional to their images, class
            augmentation included).
        resample_per_epoch: False for evaluation splits (the epoch is ignored).
    """

    def __init__(
        self,
        sources: Mapping[str, EpisodeDataset],
        *,
        length: int,
        seed: int,
        split: str,
        sampling: Sampling = "uniform",
        resample_per_epoch: bool = True,
    ) -> None:
        if not sources:
            raise ValueError(f"split '{split}' has no sources")
        if sampling not in ("uniform", "size"):
            raise ValueError(f"sampling={sampling!r}; use 'uniform' or 'size'")
        shapes = {n: tuple(d.store.images.shape[1:]) for n, d in sources.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(
                f"sources of split '{split}' have different image shapes {shapes}; decode them at one size"
            )
        short = {n: len(d) for n, d in sources.items() if len(d) < length}
        if short:
            raise ValueError(f"sources {short} have fewer than length={length} episodes")
        self.sources, self.names = dict(sources), list(sources)
        self.length, self.seed, self.split, self.sampling = length, seed, split, sampling
        self.resample_per_epoch = resample_per_epoch
        self.epoch = 0
        if sampling == "uniform":
            w = torch.ones(len(self.names), dtype=torch.float64)
        else:
            w = torch.tensor(
                [float(len(d.store) * d.num_classes / d.store.num_classes) for d in self.sources.values()],
                dtype=torch.float64,
            )
        self.probs = w / w.sum()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the following draws (every source too)."""
        self.epoch = int(epoch)
        for d in self.sources.values():
            d.set_epoch(epoch)

    def __len__(self) -> int:
        return self.length

    def source_of(self, index: int) -> str:
        """The source of episode ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(f"episode index {index} out of range for {self.length} episodes")
        epoch = self.epoch if self.resample_per_epoch else 0
        g = episode_generator(self.seed, f"{self.split}/source", epoch, index)
        return self.names[int(torch.multinomial(self.probs, 1, generator=g))]

    def __getitem__(self, index: int) -> Episode:
        return self.sources[self.source_of(int(index))][int(index)]


class MultiSourceDataModule(EpisodicDataModule):
    """Episodes from several datamodules' class stores; each split draws its episodes from its own sources.

    Args:
        sources: name -> a few-shot datamodule (its :meth:`build_stores`, class augmentation and
            transforms are used; a test-only one gives its test classes) or a ``{split: ClassStore}`` dict.
        splits: split -> the names of its sources (e.g. ``{"train": ["omniglot", "aircraft"], "val": ["omniglot"],
            "test": ["eurosat"]}``); default: every source that has the split. Splits without sources
            have no loader.
        sampling: ``"uniform"`` over a split's sources, or ``"size"`` (proportional to their images).
        ways: see :class:`~lightning_meta.datamodules.EpisodicDataModule` for this and the rest.
    """

    def __init__(
        self,
        sources: Mapping[str, EpisodicDataModule | Mapping[str, ClassStore]],
        *,
        splits: Mapping[str, Sequence[str]] | None = None,
        sampling: Sampling = "uniform",
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
        pin_memory: bool = False,
        variable_episodes: VariableEpisodes | None = None,
    ) -> None:
        super().__init__(
            ways=ways,
            shots=shots,
            queries=queries,
            tasks_per_batch=tasks_per_batch,
            train_episodes=train_episodes,
            val_episodes=val_episodes,
            test_episodes=test_episodes,
            eval_ways=eval_ways,
            eval_shots=eval_shots,
            eval_queries=eval_queries,
            seed=seed,
            num_workers=num_workers,
            pin_memory=pin_memory,
            variable_episodes=variable_episodes,
        )
        if not sources:
            raise ValueError("sources is empty; pass name -> datamodule (or {split: ClassStore})")
        if sampling not in ("uniform", "size"):
            raise ValueError(f"sampling={sampling!r}; use 'uniform' or 'size'")
        unknown = {s: [n for n in names if n not in sources] for s, names in (splits or {}).items()}
        unknown = {s: n for s, n in unknown.items() if n}
        if unknown or any(s not in SPLITS for s in (splits or {})):
            raise ValueError(
                f"splits={dict(splits or {})} names unknown splits or sources {unknown}; sources: {list(sources)}"
            )
        self.sources, self.splits, self.sampling = dict(sources), splits, sampling

    def _stores(self, source: EpisodicDataModule | Mapping[str, ClassStore]) -> Mapping[str, ClassStore]:
        if isinstance(source, EpisodicDataModule):
            from lightning_meta.datamodules.cdfsl import TestOnlyDataModule

            return {"test": source.decoded()} if isinstance(source, TestOnlyDataModule) else source.build_stores()
        return source

    @override
    def prepare_data(self) -> None:
        for s in self.sources.values():
            if isinstance(s, EpisodicDataModule):
                s.prepare_data()

    @override
    def make_datasets(self) -> dict[str, Dataset]:
        stores = {name: self._stores(src) for name, src in self.sources.items()}
        out: dict[str, Dataset] = {}
        for split in SPLITS:
            names = (
                list(self.splits[split])
                if self.splits and split in self.splits
                else ([] if self.splits else [n for n in stores if split in stores[n]])
            )
            missing = [n for n in names if split not in stores[n]]
            if missing:
                raise ValueError(f"sources {missing} have no '{split}' split; remove them from splits['{split}']")
            if not names:
                continue
            ways, shots, queries, n = self.episode_shape(split)
            per_source: dict[str, EpisodeDataset] = {}
            for name in names:
                src = self.sources[name]
                dm = src if isinstance(src, EpisodicDataModule) else None
                common: dict[str, Any] = dict(
                    length=n,
                    seed=self.seed,
                    split=f"{split}/{name}",
                    resample_per_epoch=split == "train",
                    transform=None if dm is None else (dm.train_transform if split == "train" else dm.eval_transform),
                    class_augment=None if dm is None else dm.class_augment(split),
                )
                if self.variable_episodes is not None:
                    hierarchy = None if dm is None else dm.class_hierarchy(split, stores[name][split])
                    per_source[name] = VariableEpisodeDataset(
                        stores[name][split], self.variable_episodes, hierarchy=hierarchy, **common
                    )
                else:
                    per_source[name] = EpisodeDataset(
                        stores[name][split], ways=ways, shots=shots, queries=queries, **common
                    )
            out[split] = MultiSourceEpisodeDataset(
                per_source,
                length=n,
                seed=self.seed,
                split=split,
                sampling=self.sampling,
                resample_per_epoch=split == "train",
            )
        return out

    @override
    def _loader(self, split: str) -> EpisodeLoader:
        if self.datasets and split not in self.datasets:
            raise RuntimeError(f"no source of {type(self).__name__} has a '{split}' split (see `splits`)")
        return super()._loader(split)
