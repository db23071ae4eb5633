"""lightning-meta: meta-learning for PyTorch Lightning."""

from lightning_meta.algorithms import ANIL, CAML, LEO, MAML, SNAIL, MetaLearner, MetaSGD, ProtoNet
from lightning_meta.algorithms import MatchingNetworks, ProtoMAML
from lightning_meta.callbacks import LearnedOptimizer
from lightning_meta.datamodules import (
    CIFARFSDataModule,
    ClassStore,
    EpisodeDataset,
    FeatureDataModule,
    LEOEmbeddingDataModule,
    EpisodeLoader,
    EpisodicDataModule,
    FC100DataModule,
    ImageFolderDataModule,
    MiniImageNetDataModule,
    OmniglotDataModule,
    SinusoidDataModule,
    TieredImageNetDataModule,
)
from lightning_meta.episode import Episode
from lightning_meta.functional import adapt, mean_ci95
from lightning_meta.optim import RuleOptimizer, UpdateRule, get_rule, load_pretrained

__version__ = "0.1.0"

__all__ = [
    "ANIL",
    "CAML",
    "LEO",
    "SNAIL",
    "CIFARFSDataModule",
    "ClassStore",
    "Episode",
    "FeatureDataModule",
    "LEOEmbeddingDataModule",
    "EpisodeDataset",
    "EpisodeLoader",
    "EpisodicDataModule",
    "FC100DataModule",
    "ImageFolderDataModule",
    "LearnedOptimizer",
    "MAML",
    "MatchingNetworks",
    "MetaLearner",
    "MetaSGD",
    "MiniImageNetDataModule",
    "OmniglotDataModule",
    "ProtoMAML",
    "ProtoNet",
    "RuleOptimizer",
    "SinusoidDataModule",
    "TieredImageNetDataModule",
    "UpdateRule",
    "__version__",
    "adapt",
    "get_rule",
    "load_pretrained",
    "mean_ci95",
]
