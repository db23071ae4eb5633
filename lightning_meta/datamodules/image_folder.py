"""Few-shot episodes from any folder of class subfolders (``root/<class>/<image>``).

The classes go to train/val/test by explicit lists or by a seeded split of the sorted class
names; images are decoded with ``torchvision.io``, resized (antialiased) to ``image_size`` and
cached as a :class:`~lightning_meta.datamodules.store.ClassStore` keyed by the folder listing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_meta.datamodules.episodic import EpisodicDataModule
from lightning_meta.datamodules.omniglot import seeded_split
from lightning_meta.datamodules.store import ClassStore, cached_store
from lightning_meta.datamodules.variable import VariableEpisodes
from lightning_meta.progress import progress

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataModule", "decode_image_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp")


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist; it should hold one subfolder per class with the class's images "
            "(root/<class>/<image>.png|jpg)"
        )
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class subfolders; put each class's images in root/<class>/")
    return classes


def decode_image_folder(root: str | Path, image_size: int, channels: int) -> ClassStore:
    """Decode ``root/<class>/<image>`` into a store of uint8 ``(channels, image_size, image_size)`` images.

    Raises:
        ValueError: naming an empty class folder or an image that does not decode.
    """
    from torchvision.transforms.v2.functional import resize

    with warnings.catch_warnings():  # torchvision 0.29 deprecates torchvision.io in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_image

    mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}[channels]
    images, labels = [], []
    for folder in progress(_class_folders(Path(root)), f"decoding {Path(root).name}"):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        if not files:
            raise ValueError(
                f"class folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
        for f in files:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    img = decode_image(str(f), mode=mode)
            except Exception as err:  # torchvision raises RuntimeError with a terse message
                raise ValueError(f"cannot decode image {f} ({err}); replace or remove it") from err
            if img.shape[-2:] != (image_size, image_size):
                img = resize(img, [image_size, image_size], antialias=True)
            images.append(img)
            labels.append(folder.name)
    return ClassStore.from_labeled(torch.stack(images), labels, class_names=sorted(set(labels)))


class ImageFolderDataModule(EpisodicDataModule):
    """Episodes from ``root/<class>/<image>`` folders.

    Args:
        root: the folder of class subfolders (only read; the decoded store goes to ``cache_dir``).
        train_classes: class (subfolder) names of the training split. Give all three lists or none.
        val_classes: validation class names.
        test_classes: test class names.
        split_fractions: train/val/test fractions of the classes for the seeded split (no lists).
        split_seed: seed of the seeded class split.
        image_size: side of the square resized images.
        channels: 1 (grayscale) or 3 (RGB).
        train_transform: per-image transform of training episodes (float ``(C, H, W)`` in [0, 1]).
        eval_transform: per-image transform of validation/test episodes.
        ways: see :class:`~lightning_meta.datamodules.episodic.EpisodicDataModule` for this and the rest.
    """

    def __init__(
        self,
        root: str,
        *,
        train_classes: Sequence[str] | None = None,
        val_classes: Sequence[str] | None = None,
        test_classes: Sequence[str] | None = None,
        split_fractions: tuple[float, float, float] = (0.64, 0.16, 0.20),
        split_seed: int = 0,
        image_size: int = 84,
        channels: int = 3,
        train_transform: Callable[[Tensor], Tensor] | None = None,
        eval_transform: Callable[[Tensor], Tensor] | None = None,
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
            cache_dir=cache_dir,
            pin_memory=pin_memory,
            variable_episodes=variable_episodes,
        )
        lists = (train_classes, val_classes, test_classes)
        if any(x is not None for x in lists) and any(x is None for x in lists):
            raise ValueError(
                "give train_classes, val_classes and test_classes together, or none of them for a seeded split"
            )
        if channels not in (1, 3):
            raise ValueError(f"channels={channels} must be 1 (grayscale) or 3 (RGB)")
        if image_size < 1:
            raise ValueError(f"image_size={image_size} must be positive")
        seeded_split(["a", "b", "c"], split_fractions, 0)  # validates the fractions
        self.root = Path(root).expanduser()
        self.class_lists = None if train_classes is None else [list(map(str, x)) for x in lists]  # type: ignore[arg-type]
        self.split_fractions, self.split_seed = tuple(split_fractions), split_seed
        self.image_size, self.channels = image_size, channels
        self._train_transform, self._eval_transform = train_transform, eval_transform
        self.save_hyperparameters(ignore=["train_transform", "eval_transform"])

    @property
    @override
    def train_transform(self) -> Callable[[Tensor], Tensor] | None:
        return self._train_transform

    @property
    @override
    def eval_transform(self) -> Callable[[Tensor], Tensor] | None:
        return self._eval_transform

    @override
    def prepare_data(self) -> None:
        """Decode into the cache once (local rank zero only), so DDP ranks do not all decode."""
        self.decoded()

    def decoded(self) -> ClassStore:
        """Every class of ``root``, decoded (or loaded from the cache)."""
        _class_folders(self.root)  # a clear error before hashing or decoding
        return cached_store(
            f"imagefolder-{self.image_size}-{self.channels}",
            [self.root],
            lambda: decode_image_folder(self.root, self.image_size, self.channels),
            self.cache_dir,
        )

    @override
    def build_stores(self) -> dict[str, ClassStore]:
        store = self.decoded()
        parts: Sequence[list[str]]
        if self.class_lists is None:
            parts = seeded_split(store.class_names, self.split_fractions, self.split_seed)
        else:
            parts = tuple(self.class_lists)
            named = [c for p in parts for c in p]
            unknown = sorted(set(named) - set(store.class_names))
            if unknown:
                raise ValueError(
                    f"{len(unknown)} listed classes have no folder in {self.root} (e.g. {unknown[:5]}); "
                    f"available classes include {store.class_names[:5]}"
                )
            unused = sorted(set(store.class_names) - set(named))
            if unused:
                rank_zero_warn(f"{len(unused)} class folders of {self.root} are in no split (e.g. {unused[:3]})")
        return {s: store.select(p) for s, p in zip(("train", "val", "test"), parts)}
