"""miniImageNet (Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016, arXiv:1606.04080),
with the class split of Ravi & Larochelle ("Optimization as a Model for Few-Shot Learning", ICLR 2017).

100 ILSVRC-12 classes x 600 images at 84x84, split 64/16/20 classes (38,400 / 9,600 / 12,000 images).
The MAML paper's "64/12/24" is a known typo; the counts are validated on load.

Two on-disk formats are read:

* **csv**: Ravi & Larochelle's ``train.csv`` / ``val.csv`` / ``test.csv`` (header ``filename,label``, rows like
  ``n0153282900000005.jpg,n01532829``) next to an ``images/`` folder holding the JPEGs; images are resized to
  ``image_size`` with PIL's LANCZOS filter (as in the MAML code's ``proc_images.py``).
* **pickle**: Ren et al.'s cache ``mini-imagenet-cache-{train,val,test}.pkl`` (``val`` may be named
  ``validation``), a dict with ``image_data`` (uint8 ``[n, 84, 84, 3]``) and ``class_dict``
  (``{wnid: [row indices]}``), as used by learn2learn.

Neither is downloadable without a Google Drive login, so there is no ``download`` flag: see
:class:`MiniImageNetDataModule` for where the files go.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_meta.datamodules.episodic import EpisodicDataModule
from lightning_meta.datamodules.fewshot_images import (
    SPLITS,
    Normalize,
    check_disjoint,
    check_image_size,
    check_split_sizes,
    decode_image_files,
    fewshot_transforms,
    grouped_store,
    load_pickle,
    resize_uint8,
)
from lightning_meta.datamodules.store import ClassStore, cached_store
from lightning_meta.datamodules.variable import VariableEpisodes

__all__ = [
    "MINI_IMAGENET_CLASSES",
    "MINI_IMAGENET_IMAGES",
    "MINI_IMAGENET_MEAN",
    "MINI_IMAGENET_STD",
    "MiniImageNetDataModule",
    "check_mini_imagenet_sizes",
    "read_mini_imagenet_csv",
    "read_mini_imagenet_pickle",
]

MINI_IMAGENET_CLASSES = {"train": 64, "val": 16, "test": 20}
MINI_IMAGENET_IMAGES = {"train": 38_400, "val": 9_600, "test": 12_000}
# MetaOptNet's miniImageNet pixel statistics (docs/guide/datasets.md), on the 0-1 scale.
MINI_IMAGENET_MEAN = tuple(x / 255.0 for x in (120.39586422, 115.59361427, 104.54012653))
MINI_IMAGENET_STD = tuple(x / 255.0 for x in (70.68188272, 68.27635443, 72.54505529))
_PICKLE_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
_HOW_TO_GET = (
    "miniImageNet needs a manual download (Google Drive): either Ravi & Larochelle's split CSVs "
    "(github.com/twitter/meta-learning-lstm, data/miniImagenet/{train,val,test}.csv) into <root>/ and the 60,000 "
    "84x84 JPEGs into <root>/images/ (e.g. built with the MAML repo's proc_images.py), or Ren et al.'s pickles "
    "mini-imagenet-cache-{train,val,test}.pkl into <root>/ (the files learn2learn downloads)"
)


def _read_csv_rows(csv_path: Path) -> list[tuple[str, str]]:
    with open(csv_path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{csv_path} is empty; expected a 'filename,label' header and one row per image")
    header = [c.strip().lower() for c in rows[0]]
    if header[:2] != ["filename", "label"]:
        raise ValueError(
            f"{csv_path} starts with {rows[0]!r}, expected the header 'filename,label' of Ravi & Larochelle's CSVs"
        )
    bad = [i + 2 for i, r in enumerate(rows[1:]) if len(r) < 2 or not r[0].strip() or not r[1].strip()]
    if bad:
        raise ValueError(f"{csv_path}: lines {bad[:5]} do not have the form 'filename,label'; fix or re-download it")
    return [(r[0].strip(), r[1].strip()) for r in rows[1:]]


def read_mini_imagenet_csv(csv_path: Path, images_dir: Path, image_size: int = 84) -> ClassStore:
    """Read one split in the CSV + JPEG-folder format.

    Args:
        csv_path: ``train.csv``, ``val.csv`` or ``test.csv``.
        images_dir: the folder holding the images; a row's image is ``images_dir/<filename>``
            (``.jpg`` appended when the filename has no extension).
        image_size: side of the square output images.

    Returns:
        The split's store: classes are the wnids (sorted), images ``(n, 3, image_size, image_size)``
        in CSV order within a class.
    """
    rows = _read_csv_rows(csv_path)
    paths = []
    for filename, _ in rows:
        p = images_dir / filename
        if not p.suffix and not p.exists():
            p = p.with_name(p.name + ".jpg")
        paths.append(p)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(paths)} images listed in {csv_path} are missing from {images_dir} "
            f"(e.g. {[str(p.name) for p in missing[:3]]}); put the 84x84 JPEGs in that folder. {_HOW_TO_GET}"
        )
    return grouped_store(
        [label for _, label in rows], lambda order: decode_image_files([paths[i] for i in order], image_size)
    )


def read_mini_imagenet_pickle(path: Path, image_size: int = 84) -> ClassStore:
    """Read one split of Ren et al.'s pickle cache (``image_data`` + ``class_dict``).

    Returns:
        The split's store: classes are the wnids (sorted), images ``(n, 3, image_size, image_size)`` (resized
        with antialiased bilinear interpolation when ``image_size`` is not 84) in ``class_dict`` order within a class.
    """
    data = load_pickle(path)
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} holds {keys}, expected a dict with 'image_data' and 'class_dict'; download it again")
    images = np.asarray(data["image_data"])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(
            f"{path}: image_data is {images.dtype} {images.shape}, expected uint8 [n, 84, 84, 3]; download it again"
        )
    n = len(images)
    owner: list[str | None] = [None] * n
    order: list[int] = []
    labels: list[str] = []
    for wnid, rows in data["class_dict"].items():
        for r in np.asarray(rows, dtype=np.int64).reshape(-1).tolist():
            if not 0 <= r < n:
                raise ValueError(f"{path}: class_dict[{wnid!r}] names row {r} but image_data has {n} rows")
            if owner[r] is not None:
                raise ValueError(f"{path}: row {r} is listed under both {owner[r]!r} and {wnid!r} in class_dict")
            owner[r] = str(wnid)
            order.append(r)
            labels.append(str(wnid))
    unlabeled = [i for i, x in enumerate(owner) if x is None]
    if unlabeled:
        raise ValueError(
            f"{path}: {len(unlabeled)} rows of image_data (e.g. {unlabeled[:5]}) are in no class_dict entry"
        )
    rows_of = np.asarray(order, dtype=np.int64)

    def gather(idx: list[int], chunk: int = 1024) -> Tensor:
        out = torch.empty(len(idx), 3, image_size, image_size, dtype=torch.uint8)
        for i in range(0, len(idx), chunk):
            part = torch.from_numpy(images[rows_of[idx[i : i + chunk]]]).permute(0, 3, 1, 2)
            out[i : i + chunk] = part if part.shape[-2:] == (image_size, image_size) else resize_uint8(part, image_size)
        return out

    return grouped_store(labels, gather)


def check_mini_imagenet_sizes(class_counts: dict[str, int], image_counts: dict[str, int], *, strict: bool) -> None:
    """Raise unless the splits have 64/16/20 classes and 38,400/9,600/12,000 images (only when ``strict``)."""
    hint = ""
    if class_counts.get("val") == 12 and class_counts.get("test") == 24:
        hint = " (64/12/24 is the MAML paper's typo; the Ravi & Larochelle split is 64/16/20)"
    check_split_sizes(
        "miniImageNet",
        class_counts,
        image_counts,
        MINI_IMAGENET_CLASSES,
        MINI_IMAGENET_IMAGES,
        strict=strict,
        hint=hint,
    )


class MiniImageNetDataModule(EpisodicDataModule):
    """miniImageNet episodes (Ravi & Larochelle split, 64/16/20 classes).

    Files go in ``root`` (manual download; there is no public direct link):

    * ``format="csv"``: ``root/{train,val,test}.csv`` and ``root/images/<filename>`` (the JPEGs), or
    * ``format="pickle"``: ``root/mini-imagenet-cache-{train,val,test}.pkl`` (``val`` may be ``validation``), or
    * ``format="ilsvrc"``: ``root`` is your ILSVRC-2012 copy (``root/train/<synset>/<synset>_<n>.JPEG``); the
      packaged Ravi & Larochelle CSVs select the images (see :mod:`lightning_meta.datamodules.ilsvrc`).

    ``format="auto"`` picks the pickles when all three are present, else the CSVs. The decoded store is
    cached in ``cache_dir`` (keyed by the files' checksums, ``image_size`` and the format), never in ``root``.

    Args:
        root: the folder holding the files above.
        format: ``"auto"``, ``"csv"``, ``"pickle"`` or ``"ilsvrc"`` (never chosen by ``"auto"``).
        image_size: side of the square images (84 in every reference).
        normalize: ``"none"`` (pixels in [0, 1], MAML), ``"imagenet"`` (CAVIA, MAML++) or ``"dataset"``
            (MetaOptNet's miniImageNet mean/std); see :func:`fewshot_transforms`.
        augment: random crop (padding 8), color jitter and horizontal flip on training episodes (MetaOptNet).
        strict: check the published sizes (64/16/20 classes, 38,400/9,600/12,000 images); pass False to use
            a subset.
        split_dir: with ``format="ilsvrc"``, a folder of ``{train,val,test}.csv`` to use instead of the
            packaged split.
        ways: see :class:`~lightning_meta.datamodules.episodic.EpisodicDataModule` for this and the rest.
    """

    def __init__(
        self,
        root: str,
        *,
        format: Literal["auto", "csv", "pickle", "ilsvrc"] = "auto",
        image_size: int = 84,
        normalize: Normalize = "none",
        augment: bool = False,
        strict: bool = True,
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
        split_dir: str | None = None,
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
        if format not in ("auto", "csv", "pickle", "ilsvrc"):
            raise ValueError(f"format={format!r} must be 'auto', 'csv', 'pickle' or 'ilsvrc'")
        check_image_size(image_size)
        self.root = Path(root).expanduser()
        self.format = format
        self.image_size = image_size
        self.normalize = normalize
        self.augment = augment
        self.strict = strict
        self.split_dir = split_dir
        self._train_t, self._eval_t = fewshot_transforms(
            image_size,
            augment=augment,
            normalize=normalize,
            dataset_mean=MINI_IMAGENET_MEAN,
            dataset_std=MINI_IMAGENET_STD,
            padding=8,
        )
        self.save_hyperparameters()

    @property
    @override
    def train_transform(self) -> Callable[[Tensor], Tensor] | None:
        return self._train_t

    @property
    @override
    def eval_transform(self) -> Callable[[Tensor], Tensor] | None:
        return self._eval_t

    def locate(self) -> tuple[str, dict[str, Path]]:
        """The format in use and each split's file (the CSV or the pickle).

        Raises:
            FileNotFoundError: naming the missing files, where they go and how to get them.
        """
        if not self.root.is_dir():
            raise FileNotFoundError(f"miniImageNet root {str(self.root)!r} is not a folder. {_HOW_TO_GET}")
        pickles: dict[str, Path] = {}
        for split, names in _PICKLE_NAMES.items():
            for n in names:
                if (self.root / f"mini-imagenet-cache-{n}.pkl").is_file():
                    pickles[split] = self.root / f"mini-imagenet-cache-{n}.pkl"
                    break
        csvs = {s: self.root / f"{s}.csv" for s in SPLITS if (self.root / f"{s}.csv").is_file()}
        has_images = (self.root / "images").is_dir()
        if self.format in ("auto", "pickle") and len(pickles) == 3:
            return "pickle", pickles
        if self.format in ("auto", "csv") and len(csvs) == 3 and has_images:
            return "csv", csvs
        if self.format == "pickle" or (self.format == "auto" and pickles and not csvs):
            missing = [f"mini-imagenet-cache-{s}.pkl" for s in SPLITS if s not in pickles]
            raise FileNotFoundError(f"miniImageNet pickles missing in {str(self.root)!r}: {missing}. {_HOW_TO_GET}")
        missing = [f"{s}.csv" for s in SPLITS if s not in csvs] + ([] if has_images else ["images/"])
        raise FileNotFoundError(f"miniImageNet files missing in {str(self.root)!r}: {missing}. {_HOW_TO_GET}")

    def _read(self, fmt: str, path: Path) -> ClassStore:
        if fmt == "csv":
            return read_mini_imagenet_csv(path, self.root / "images", self.image_size)
        return read_mini_imagenet_pickle(path, self.image_size)

    @override
    def build_stores(self) -> dict[str, ClassStore]:
        from lightning_meta.datamodules.ilsvrc import ilsvrc_stores

        fmt, files = ("ilsvrc", {}) if self.format == "ilsvrc" else self.locate()
        stores = {}
        if fmt == "ilsvrc":
            stores = ilsvrc_stores("mini_imagenet", self.root, image_size=self.image_size, split_dir=self.split_dir,
                                   cache_dir=self.cache_dir)  # fmt: skip
        for split, path in files.items():
            sources = [path, self.root / "images"] if fmt == "csv" else [path]
            stores[split] = cached_store(
                f"mini_imagenet-{fmt}-{split}-{self.image_size}",
                sources,
                functools.partial(self._read, fmt, path),
                self.cache_dir,
            )
        check_disjoint("miniImageNet", {s: stores[s].class_names for s in SPLITS})
        check_mini_imagenet_sizes(
            {s: stores[s].num_classes for s in SPLITS}, {s: len(stores[s]) for s in SPLITS}, strict=self.strict
        )
        return stores
