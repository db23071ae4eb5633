"""lightning-meta: meta-learning for PyTorch Lightning."""

from importlib.metadata import PackageNotFoundError, version

from lightning_meta.algorithms import (
    ANIL,
    CAML,
    LEO,
    MAML,
    SNAIL,
    MatchingNetworks,
    MetaLearner,
    MetaSGD,
    ProtoMAML,
    ProtoNet,
)
from lightning_meta.callbacks import LearnedOptimizer
from lightning_meta.datamodules import (
    CIFARFSDataModule,
    ClassStore,
    EpisodeDataset,
    EpisodeLoader,
    EpisodicDataModule,
    FC100DataModule,
    FeatureDataModule,
    ImageFolderDataModule,
    LEOEmbeddingDataModule,
    MiniImageNetDataModule,
    OmniglotDataModule,
    SinusoidDataModule,
    TieredImageNetDataModule,
)
from lightning_meta.distributed import destroy_process_group_at_exit
from lightning_meta.episode import Episode
from lightning_meta.functional import adapt, mean_ci95
from lightning_meta.optim import RuleOptimizer, UpdateRule, get_rule, load_pretrained

# Lightning never destroys the process group it creates; without this, gloo workers can abort at exit (see the module).
destroy_process_group_at_exit()

try:  # the single version source is pyproject.toml, read back from the installed package's metadata
    __version__ = version("lightning-meta")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"

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
