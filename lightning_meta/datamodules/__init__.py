"""Few-shot datamodules: the class-indexed store, episode sampling and the dataset datamodules."""

from lightning_meta.datamodules.episodic import (
    ClassAugment,
    EpisodeDataset,
    EpisodeLoader,
    EpisodicDataModule,
    EpochSampler,
    Rotations,
    episode_generator,
    episode_seed,
)
from lightning_meta.datamodules.store import ClassStore, cached_store, default_cache_dir, file_digest

__all__ = [
    "ClassAugment",
    "ClassStore",
    "EpisodeDataset",
    "EpisodeLoader",
    "EpisodicDataModule",
    "EpochSampler",
    "Rotations",
    "cached_store",
    "default_cache_dir",
    "episode_generator",
    "episode_seed",
    "file_digest",
]
