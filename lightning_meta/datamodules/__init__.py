"""Few-shot datamodules: the class-indexed store, episode sampling and the dataset datamodules."""

from lightning_meta.datamodules.cdfsl import (
    ChestXDataModule,
    CropDiseaseDataModule,
    EuroSATDataModule,
    ISICDataModule,
    TestOnlyDataModule,
)
from lightning_meta.datamodules.cifar import CIFARFSDataModule, FC100DataModule
from lightning_meta.datamodules.episodic import (
    BatchedEpisodeList,
    ClassAugment,
    EpisodeDataset,
    EpisodeLoader,
    EpisodicDataModule,
    EpochSampler,
    Rotations,
    episode_generator,
    episode_seed,
)
from lightning_meta.datamodules.features import (
    FeatureDataModule,
    FeatureEpisodeDataset,
    LEOEmbeddingDataModule,
    compute_features,
)
from lightning_meta.datamodules.hierarchy import ClassGroups, ClassHierarchy
from lightning_meta.datamodules.image_folder import ImageFolderDataModule, decode_image_folder
from lightning_meta.datamodules.meta_album import MetaAlbumDataModule, read_meta_album
from lightning_meta.datamodules.meta_dataset import MetaDatasetDataModule
from lightning_meta.datamodules.mini_imagenet import MiniImageNetDataModule
from lightning_meta.datamodules.multi_source import MultiSourceDataModule, MultiSourceEpisodeDataset
from lightning_meta.datamodules.omniglot import OmniglotDataModule, parse_split_file, seeded_split
from lightning_meta.datamodules.sinusoid import SinusoidDataModule, SinusoidDataset
from lightning_meta.datamodules.store import ClassStore, cached_store, default_cache_dir, file_digest
from lightning_meta.datamodules.tiered_imagenet import TieredImageNetDataModule
from lightning_meta.datamodules.variable import VariableEpisodeDataset, VariableEpisodes, sample_composition

__all__ = [
    "FeatureDataModule",
    "FeatureEpisodeDataset",
    "LEOEmbeddingDataModule",
    "compute_features",
    "CIFARFSDataModule",
    "ChestXDataModule",
    "CropDiseaseDataModule",
    "EuroSATDataModule",
    "ISICDataModule",
    "MetaAlbumDataModule",
    "MultiSourceDataModule",
    "MultiSourceEpisodeDataset",
    "TestOnlyDataModule",
    "BatchedEpisodeList",
    "ClassAugment",
    "ClassGroups",
    "ClassHierarchy",
    "ClassStore",
    "EpisodeDataset",
    "EpisodeLoader",
    "EpisodicDataModule",
    "EpochSampler",
    "FC100DataModule",
    "ImageFolderDataModule",
    "MetaDatasetDataModule",
    "MiniImageNetDataModule",
    "OmniglotDataModule",
    "Rotations",
    "SinusoidDataModule",
    "SinusoidDataset",
    "TieredImageNetDataModule",
    "VariableEpisodeDataset",
    "VariableEpisodes",
    "cached_store",
    "decode_image_folder",
    "default_cache_dir",
    "episode_generator",
    "episode_seed",
    "file_digest",
    "parse_split_file",
    "read_meta_album",
    "sample_composition",
    "seeded_split",
]
