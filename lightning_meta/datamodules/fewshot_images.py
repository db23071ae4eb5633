"""Helpers shared by the miniImageNet, tieredImageNet and CIFAR-FS/FC100 datamodules.

Image decoding in threads, pickle loading with clear errors (no code from the file runs), uint8 resizing,
checks of published split sizes and disjointness, and the per-image train/eval transforms of the few-shot literature
(docs/guide/datasets.md: MetaOptNet's augmentation and the normalisations in use).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lightning_meta.datamodules.safe_pickle import UnsafePickleError, load_dataset_pickle
from lightning_meta.datamodules.store import ClassStore
from lightning_meta.progress import progress

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Normalize",
    "SPLITS",
    "check_disjoint",
    "check_image_size",
    "check_split_sizes",
    "decode_image_files",
    "fewshot_transforms",
    "grouped_store",
    "load_pickle",
    "resize_uint8",
    "thread_count",
]

SPLITS = ("train", "val", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def thread_count() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _decode_one(path: Path, size: int) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), resample=Image.Resampling.LANCZOS)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode image {str(path)!r} ({e}); the file is corrupt: replace it") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def decode_image_files(paths: Sequence[Path], size: int) -> Tensor:
    """Decode image files to RGB uint8 ``(n, 3, size, size)`` (LANCZOS resize), in parallel threads."""
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)

    def work(i: int) -> None:
        out[i] = _decode_one(paths[i], size)

    with ThreadPoolExecutor(thread_count()) as pool:
        list(progress(pool.map(work, range(len(paths))), "decoding images", total=len(paths)))
    return out


def grouped_store(labels: Sequence[str], decode: Callable[[list[int]], Tensor]) -> ClassStore:
    """Build a :class:`ClassStore` by decoding items straight into class-grouped order.

    Same result as ``ClassStore.from_labeled(decode(range(n)), labels)`` (classes sorted by name, items of
    a class in input order) without a second full copy of the images: for tieredImageNet's 9.5 GB train
    split that halves the peak memory.

    Args:
        labels: the class name of each of the ``n`` items.
        decode: given item indices ``order``, returns uint8 images whose row ``i`` is item ``order[i]``.

    Example:
        >>> raw = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1)
        >>> s = grouped_store(["b", "a", "b", "a"], lambda order: raw[order])
        >>> s.class_names, s.images.flatten().tolist(), s.offsets.tolist()
        (['a', 'b'], [1, 3, 0, 2], [0, 2, 4])
    """
    names = sorted(set(labels))
    index = {n: k for k, n in enumerate(names)}
    codes = torch.tensor([index[x] for x in labels], dtype=torch.long)
    order = torch.argsort(codes, stable=True)
    offsets = torch.zeros(len(names) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.bincount(codes, minlength=len(names)), 0)
    images = decode(order.tolist())
    if len(images) != len(labels):
        raise ValueError(f"decode returned {len(images)} images for {len(labels)} labels")
    return ClassStore(images, offsets, names)


def load_pickle(path: Path) -> object:
    """Unpickle a dataset file with :func:`~lightning_meta.datamodules.safe_pickle.load_dataset_pickle`.

    Python 3 pickles and Python 2 ones (``str`` read as latin1) load; nothing but numpy arrays, dtypes,
    scalars and plain containers is reconstructed, so no code from the file runs.

    Raises:
        UnsafePickleError: the file names any other global (it is not an original dataset file).
        ValueError: naming the file when it is corrupt or truncated.
    """
    errors = (
        pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
        UnicodeDecodeError,
    )  # fmt: skip
    try:
        return load_dataset_pickle(path)
    except UnsafePickleError:
        raise
    except errors as e:
        raise ValueError(
            f"{path} is not a readable pickle ({type(e).__name__}: {e}); it is corrupt or truncated: download it again"
        ) from e


def resize_uint8(images: Tensor, size: int, chunk: int = 1024) -> Tensor:
    """Resize uint8 ``(n, C, H, W)`` images to ``size x size`` (antialiased bilinear), chunk by chunk."""
    out = torch.empty(len(images), images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk].float()
        y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def check_split_sizes(
    dataset: str,
    class_counts: dict[str, int],
    image_counts: dict[str, int],
    expected_classes: dict[str, int],
    expected_images: dict[str, int],
    *,
    strict: bool,
    hint: str = "",
) -> None:
    """Raise when the splits do not have the published class and image counts (only when ``strict``).

    ``hint`` is appended to the problems, e.g. a known mix-up of the dataset.
    """
    if not strict:
        return
    problems = []
    for s in expected_classes:
        if class_counts[s] != expected_classes[s]:
            problems.append(f"split '{s}' has {class_counts[s]} classes, expected {expected_classes[s]}")
        if image_counts[s] != expected_images[s]:
            problems.append(f"split '{s}' has {image_counts[s]} images, expected {expected_images[s]}")
    if problems:
        raise ValueError(
            f"{dataset} does not match the published split: {'; '.join(problems)}{hint}. The files are incomplete "
            "or a different split: replace them with the full data, or pass strict=False to use a subset."
        )


def check_disjoint(dataset: str, names: Mapping[str, Sequence[str]]) -> None:
    """Raise when a class appears in two splits."""
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            shared = sorted(set(names[a]) & set(names[b]))
            if shared:
                raise ValueError(
                    f"{dataset}: {len(shared)} classes are in both split '{a}' and split '{b}' (e.g. {shared[:3]}); "
                    "the split files are mixed up: re-download them"
                )


Normalize = Literal["none", "imagenet", "dataset"]


def fewshot_transforms(
    image_size: int,
    *,
    augment: bool,
    normalize: Normalize,
    dataset_mean: Sequence[float],
    dataset_std: Sequence[float],
    padding: int,
) -> tuple[Callable[[Tensor], Tensor] | None, Callable[[Tensor], Tensor] | None]:
    """Per-image ``(train, eval)`` transforms on float ``(C, H, W)`` images in [0, 1].

    ``augment`` adds, to training only, the ResNet-12-era augmentation (MetaOptNet, learn2learn's
    ``lee2019``): ``RandomCrop(image_size, padding)``, ``ColorJitter(0.4, 0.4, 0.4)``, ``RandomHorizontalFlip``.
    ``normalize`` then subtracts a mean and divides by a std: ``"none"`` (pixels stay in [0, 1], as in
    the MAML code), ``"imagenet"`` (ImageNet statistics, as CAVIA and MAML++) or ``"dataset"``
    (``dataset_mean`` / ``dataset_std``, as MetaOptNet).

    Example:
        >>> train, evaluate = fewshot_transforms(
        ...     8, augment=True, normalize="dataset", dataset_mean=(0.5,) * 3, dataset_std=(0.25,) * 3, padding=2
        ... )
        >>> evaluate(torch.full((3, 8, 8), 0.75)).unique().tolist()  # (0.75 - 0.5) / 0.25
        [1.0]
        >>> train(torch.rand(3, 8, 8)).shape
        torch.Size([3, 8, 8])
    """
    from torchvision.transforms import v2

    if normalize not in ("none", "imagenet", "dataset"):
        raise ValueError(f"normalize={normalize!r} must be 'none', 'imagenet' or 'dataset'")
    if padding < 0:
        raise ValueError(f"padding={padding} must be >= 0")
    norm = []
    if normalize == "imagenet":
        norm = [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    elif normalize == "dataset":
        norm = [v2.Normalize(list(dataset_mean), list(dataset_std))]
    eval_t = v2.Compose(norm) if norm else None
    if not augment:
        return eval_t, eval_t
    aug = [
        v2.RandomCrop(image_size, padding=padding),
        v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
        v2.RandomHorizontalFlip(),
    ]
    return v2.Compose(aug + norm), eval_t


def check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive integer, e.g. 84")
