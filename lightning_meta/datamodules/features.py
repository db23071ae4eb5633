"""Episodes of feature vectors instead of images, for learners on fixed features (LEO, Rusu et al.,
ICLR 2019, arXiv:1807.05960).

* :class:`FeatureDataModule` wraps any image :class:`EpisodicDataModule` and a frozen backbone: every
  image of every split (and every class-augmentation variant, e.g. rotation) goes through the backbone
  once, at ``setup``; episodes then index the feature table. The episodes are the wrapped datamodule's
  own (same classes, rows, labels and order for the same index), with features in place of images.
  Features are computed from the images after the wrapped module's *evaluation* transform (random
  training augmentation cannot be cached).
* :class:`LEOEmbeddingDataModule` reads the embeddings released with LEO (``embeddings.zip`` of
  deepmind/leo): one pickle per split, ``{split}_embeddings.pkl``, a dict with ``embeddings``
  ``(n, 640)``, ``labels`` ``(n,)`` and ``keys`` (``"<id>-<class>-<image>"``; the class is taken from
  the key when present, else from the label). The pickles (written by Python 2) are read with
  :func:`~lightning_meta.datamodules.safe_pickle.load_dataset_pickle`, so no code from them runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_meta.datamodules.episodic import SPLITS, EpisodeDataset, EpisodicDataModule
from lightning_meta.datamodules.safe_pickle import UnsafePickleError, load_dataset_pickle
from lightning_meta.datamodules.store import ClassStore
from lightning_meta.episode import Episode

__all__ = ["FeatureDataModule", "FeatureEpisodeDataset", "LEOEmbeddingDataModule", "compute_features"]


class FeatureEpisodeDataset(Dataset):
    """The episodes of ``base`` with rows of ``features`` in place of images.

    Args:
        base: the image (or placeholder) episode dataset that draws classes and rows.
        features: ``(variants, rows, feature_dim)``: row ``r`` of the store under class-augmentation
            variant ``v`` (one variant without augmentation).
    """

    def __init__(self, base: EpisodeDataset, features: Tensor) -> None:
        variants = base.class_augment.multiplier if base.class_augment is not None else 1
        if features.dim() != 3 or features.shape[:2] != (variants, len(base.store)):
            raise ValueError(
                f"features must be (variants={variants}, rows={len(base.store)}, dim), got {tuple(features.shape)}"
            )
        self.base, self.features = base, features

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the following draws."""
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Episode:
        b = self.base
        classes, sr, sy, qr, qy = b.episode_rows(index)  # the same draw as the image EpisodeDataset
        variant = classes // b.store.num_classes  # (ways,): class-augmentation variant of each label
        return Episode(self.features[variant[sy], sr], sy, self.features[variant[qy], qr], qy)


@torch.no_grad()
def compute_features(
    backbone: nn.Module, dataset: EpisodeDataset, transform: Any = None, batch_size: int = 256
) -> Tensor:
    """Backbone features ``(variants, rows, dim)`` of every image of ``dataset.store`` (eval mode, no grad)."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters(), torch.empty(0)).device
    images = dataset.store.images
    variants = dataset.class_augment.multiplier if dataset.class_augment is not None else 1
    out = []
    for v in range(variants):
        chunks = []
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size]
            if dataset.class_augment is not None:
                x = dataset.class_augment(x, v)
            x = x.float().div_(255)
            if transform is not None:
                x = torch.stack([transform(img) for img in x])
            chunks.append(backbone(x.to(device)).float().cpu())
        out.append(torch.cat(chunks).flatten(1))
    backbone.train(was_training)
    return torch.stack(out)


class FeatureDataModule(EpisodicDataModule):
    """Feature-vector episodes from an image datamodule and a frozen backbone (features computed once).

    Episode settings (ways, shots, queries, batch size, episode counts, seed) are the wrapped
    datamodule's. The backbone is not trained; put it on the device you want features computed on.

    Args:
        datamodule: the image datamodule (e.g. :class:`~lightning_meta.datamodules.OmniglotDataModule`).
        backbone: image -> feature network, e.g. ``lightning_meta.nn.Conv4(None)`` or a timm model.
        batch_size: images per backbone forward.
    """

    def __init__(self, datamodule: EpisodicDataModule, backbone: nn.Module, *, batch_size: int = 256) -> None:
        dm = datamodule
        super().__init__(
            ways=dm.ways, shots=dm.shots, queries=dm.queries, tasks_per_batch=dm.tasks_per_batch,
            train_episodes=dm.train_episodes, val_episodes=dm.val_episodes, test_episodes=dm.test_episodes,
            eval_ways=dm.eval_ways, eval_shots=dm.eval_shots, eval_queries=dm.eval_queries, seed=dm.seed,
            num_workers=dm.num_workers, cache_dir=dm.cache_dir, pin_memory=dm.pin_memory,
        )  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        transductive = [
            n for n, m in backbone.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and not m.track_running_stats
        ]  # fmt: skip
        if transductive:
            raise ValueError(
                f"backbone norm layers {transductive[:3]} normalise with batch statistics, so cached features would "
                "depend on which images share a feature batch; use a backbone with running statistics in eval mode "
                "(e.g. lightning_meta.nn.conv4_protonet(), a timm model) or without batch norm"
            )
        self.datamodule, self.backbone, self.batch_size = dm, backbone, batch_size
        for p in backbone.parameters():
            p.requires_grad_(False)

    def prepare_data(self) -> None:
        """Delegate to the wrapped datamodule (downloads)."""
        self.datamodule.prepare_data()

    def make_datasets(self) -> dict[str, Dataset]:
        """The wrapped datasets with their images replaced by backbone features."""
        images = self.datamodule.make_datasets()
        out: dict[str, Dataset] = {}
        for split in SPLITS:
            base = images[split]
            if not isinstance(base, EpisodeDataset):
                raise TypeError(
                    f"{type(self.datamodule).__name__} gives {type(base).__name__} episodes; FeatureDataModule needs image EpisodeDatasets"
                )
            features = compute_features(self.backbone, base, self.datamodule.eval_transform, self.batch_size)
            out[split] = FeatureEpisodeDataset(base, features)
        return out


class LEOEmbeddingDataModule(EpisodicDataModule):
    """Episodes of the LEO release embeddings (``root/{train,val,test}_embeddings.pkl``).

    ``root`` is one folder of the release, e.g. ``embeddings/miniImageNet/center``. LEO's own test
    protocol uses every remaining image of a class as a query (``eval_queries = 600 - shots``) and
    10,000 test episodes; its training uses 12 tasks per batch and 15 queries.

    Args:
        root: folder holding the three pickles.
        ways: see :class:`~lightning_meta.datamodules.episodic.EpisodicDataModule` for this and the rest.
    """

    def __init__(
        self,
        root: str,
        *,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        tasks_per_batch: int = 12,
        train_episodes: int = 1200,
        val_episodes: int = 600,
        test_episodes: int = 600,
        eval_ways: int | None = None,
        eval_shots: int | None = None,
        eval_queries: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            ways=ways, shots=shots, queries=queries, tasks_per_batch=tasks_per_batch, train_episodes=train_episodes,
            val_episodes=val_episodes, test_episodes=test_episodes, eval_ways=eval_ways, eval_shots=eval_shots,
            eval_queries=eval_queries, seed=seed, num_workers=num_workers,
        )  # fmt: skip
        self.root = Path(root)
        self.save_hyperparameters()

    def load_split(self, split: str) -> tuple[ClassStore, Tensor]:
        """A placeholder store (one 1x1 pixel per row, for episode drawing) and the features ``(rows, dim)``."""
        path = self.root / f"{split}_embeddings.pkl"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; root must be a folder of the LEO embeddings release holding "
                "train_embeddings.pkl, val_embeddings.pkl and test_embeddings.pkl (e.g. embeddings/miniImageNet/center)"
            )
        try:
            raw = load_dataset_pickle(path)  # Python 2 pickles; refuses anything but arrays and containers
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise ValueError(
                f"{path} is not a readable pickle ({type(e).__name__}: {e}); it is corrupt or truncated: download "
                "LEO's embeddings.zip again"
            ) from e
        if not isinstance(raw, dict) or "embeddings" not in raw:
            raise ValueError(f"{path} holds {type(raw).__name__} without an 'embeddings' entry; expected LEO's dict")
        emb = torch.as_tensor(np.asarray(raw["embeddings"], dtype=np.float32))
        keys = raw.get("keys")
        if keys is not None and len(keys) == len(emb):
            names = [(k.decode() if isinstance(k, bytes) else str(k)).split("-")[1] for k in keys]
        elif "labels" in raw:
            names = [str(int(v)) for v in np.asarray(raw["labels"]).ravel()]
        else:
            raise ValueError(f"{path} has neither 'keys' nor 'labels' to group the embeddings by class")
        if emb.dim() != 2 or len(names) != len(emb):
            raise ValueError(
                f"{path}: embeddings {tuple(emb.shape)} must be (n, dim) with one class per row ({len(names)})"
            )
        order = sorted(set(names))
        index = {c: i for i, c in enumerate(order)}
        codes = torch.tensor([index[n] for n in names], dtype=torch.long)
        perm = torch.argsort(codes, stable=True)
        offsets = torch.zeros(len(order) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(torch.bincount(codes, minlength=len(order)), 0)
        store = ClassStore(torch.zeros(len(emb), 1, 1, 1, dtype=torch.uint8), offsets, order)
        return store, emb[perm]

    def make_datasets(self) -> dict[str, Dataset]:
        """One :class:`FeatureEpisodeDataset` per split."""
        out: dict[str, Dataset] = {}
        for split in SPLITS:
            store, emb = self.load_split(split)
            ways, shots, queries, n = self.episode_shape(split)
            base = EpisodeDataset(
                store, ways=ways, shots=shots, queries=queries, length=n, seed=self.seed, split=split,
                resample_per_epoch=split == "train",
            )  # fmt: skip
            out[split] = FeatureEpisodeDataset(base, emb.unsqueeze(0))
        return out
