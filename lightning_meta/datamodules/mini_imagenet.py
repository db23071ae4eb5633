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
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_meta.datamodules.episodic import EpisodicDataModule
from lightning_meta.datamodules.store import ClassStore, cached_store

__all__ = [
    "MINI_IMAGENET_CLASSES",
    "MINI_IMAGENET_IMAGES",
    "MiniImageNetDataModule",
    "check_split_sizes",
    "decode_image_files",
    "fewshot_transforms",
    "read_mini_imagenet_csv",
    "read_mini_imagenet_pickle",
]

SPLITS = ("train", "val", "test")
MINI_IMAGENET_CLASSES = {"train": 64, "val": 16, "test": 20}
MINI_IMAGENET_IMAGES = {"train": 38_400, "val": 9_600, "test": 12_000}
# MetaOptNet's miniImageNet pixel statistics (REFERENCE.md section 3.8), on the 0-1 scale.
MINI_IMAGENET_MEAN = tuple(x / 255.0 for x in (120.39586422, 115.59361427, 104.54012653))
MINI_IMAGENET_STD = tuple(x / 255.0 for x in (70.68188272, 68.27635443, 72.54505529))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PICKLE_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
_HOW_TO_GET = (
    "miniImageNet needs a manual download (Google Drive): either Ravi & Larochelle's split CSVs "
    "(github.com/twitter/meta-learning-lstm, data/miniImagenet/{train,val,test}.csv) into <root>/ and the 60,000 "
    "84x84 JPEGs into <root>/images/ (e.g. built with the MAML repo's proc_images.py), or Ren et al.'s pickles "
    "mini-imagenet-cache-{train,val,test}.pkl into <root>/ (the files learn2learn downloads)"
)


def _thread_count() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _decode_one(path: Path, size: int) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), resample=Image.LANCZOS)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode image {str(path)!r} ({e}); the file is corrupt: replace it") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def decode_image_files(paths: Sequence[Path], size: int) -> Tensor:
    """Decode image files to RGB uint8 ``(n, 3, size, size)`` (LANCZOS resize), in parallel threads."""
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)

    def work(i: int) -> None:
        out[i] = _decode_one(paths[i], size)

    with ThreadPoolExecutor(_thread_count()) as pool:
        list(pool.map(work, range(len(paths))))
    return out


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


def read_mini_imagenet_csv(csv_path: Path, images_dir: Path, image_size: int = 84) -> tuple[Tensor, list[str]]:
    """Read one split in the CSV + JPEG-folder format.

    Args:
        csv_path: ``train.csv``, ``val.csv`` or ``test.csv``.
        images_dir: the folder holding the images; a row's image is ``images_dir/<filename>``
            (``.jpg`` appended when the filename has no extension).
        image_size: side of the square output images.

    Returns:
        uint8 images ``(n, 3, image_size, image_size)`` and the ``n`` labels (wnids), in CSV order.
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
    return decode_image_files(paths, image_size), [label for _, label in rows]


def read_mini_imagenet_pickle(path: Path, image_size: int = 84) -> tuple[Tensor, list[str]]:
    """Read one split of Ren et al.'s pickle cache (``image_data`` + ``class_dict``).

    Returns:
        uint8 images ``(n, 3, image_size, image_size)`` (resized with antialiased bilinear interpolation when
        ``image_size`` is not 84) and the ``n`` labels (wnids), class by class in ``class_dict`` order.
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
        raise ValueError(f"{path}: {len(unlabeled)} rows of image_data (e.g. {unlabeled[:5]}) are in no class_dict entry")
    out = torch.from_numpy(images[np.asarray(order, dtype=np.int64)]).permute(0, 3, 1, 2)
    if out.shape[-2:] != (image_size, image_size):
        out = resize_uint8(out, image_size)
    return out.contiguous(), labels


def load_pickle(path: Path) -> object:
    """Unpickle a dataset file (Python 3 pickles, or Python 2 ones via ``encoding="latin1"``).

    Pickles can run code when loaded: only read dataset files from a source you trust.

    Raises:
        ValueError: naming the file when it is corrupt or truncated.
    """
    errors = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError)
    try:
        try:
            with open(path, "rb") as fh:
                return pickle.load(fh)
        except UnicodeDecodeError:
            with open(path, "rb") as fh:
                return pickle.load(fh, encoding="latin1")
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
) -> None:
    """Raise when the splits do not have the published class and image counts (only when ``strict``)."""
    if not strict:
        return
    problems = []
    for s in expected_classes:
        if class_counts[s] != expected_classes[s]:
            problems.append(f"split '{s}' has {class_counts[s]} classes, expected {expected_classes[s]}")
        if image_counts[s] != expected_images[s]:
            problems.append(f"split '{s}' has {image_counts[s]} images, expected {expected_images[s]}")
    if problems:
        hint = ""
        if dataset == "miniImageNet" and class_counts.get("val") == 12 and class_counts.get("test") == 24:
            hint = " (64/12/24 is the MAML paper's typo; the Ravi & Larochelle split is 64/16/20)"
        raise ValueError(
            f"{dataset} does not match the published split: {'; '.join(problems)}{hint}. The files are incomplete "
            "or a different split: replace them with the full data, or pass strict=False to use a subset."
        )


def check_disjoint(dataset: str, names: dict[str, Sequence[str]]) -> None:
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


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive integer, e.g. 84")


class MiniImageNetDataModule(EpisodicDataModule):
    """miniImageNet episodes (Ravi & Larochelle split, 64/16/20 classes).

    Files go in ``root`` (manual download; there is no public direct link):

    * ``format="csv"``: ``root/{train,val,test}.csv`` and ``root/images/<filename>`` (the JPEGs), or
    * ``format="pickle"``: ``root/mini-imagenet-cache-{train,val,test}.pkl`` (``val`` may be ``validation``).

    ``format="auto"`` picks the pickles when all three are present, else the CSVs. The decoded store is
    cached in ``cache_dir`` (keyed by the files' checksums, ``image_size`` and the format), never in ``root``.

    Args:
        root: the folder holding the files above.
        format: ``"auto"``, ``"csv"`` or ``"pickle"``.
        image_size: side of the square images (84 in every reference).
        normalize: ``"none"`` (pixels in [0, 1], MAML), ``"imagenet"`` (CAVIA, MAML++) or ``"dataset"``
            (MetaOptNet's miniImageNet mean/std); see :func:`fewshot_transforms`.
        augment: random crop (padding 8), color jitter and horizontal flip on training episodes (MetaOptNet).
        strict: check the published sizes (64/16/20 classes, 38,400/9,600/12,000 images); pass False to use
            a subset.
        ways: see :class:`~lightning_meta.datamodules.episodic.EpisodicDataModule` for this and the rest.
    """

    def __init__(
        self,
        root: str,
        *,
        format: Literal["auto", "csv", "pickle"] = "auto",
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
    ) -> None:
        super().__init__(
            ways=ways, shots=shots, queries=queries, tasks_per_batch=tasks_per_batch, train_episodes=train_episodes,
            val_episodes=val_episodes, test_episodes=test_episodes, eval_ways=eval_ways, eval_shots=eval_shots,
            eval_queries=eval_queries, seed=seed, num_workers=num_workers, cache_dir=cache_dir, pin_memory=pin_memory,
        )
        if format not in ("auto", "csv", "pickle"):
            raise ValueError(f"format={format!r} must be 'auto', 'csv' or 'pickle'")
        _check_image_size(image_size)
        self.root = Path(root).expanduser()
        self.format = format
        self.image_size = image_size
        self.normalize = normalize
        self.augment = augment
        self.strict = strict
        self._train_t, self._eval_t = fewshot_transforms(
            image_size, augment=augment, normalize=normalize, dataset_mean=MINI_IMAGENET_MEAN,
            dataset_std=MINI_IMAGENET_STD, padding=8,
        )

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
            images, labels = read_mini_imagenet_csv(path, self.root / "images", self.image_size)
        else:
            images, labels = read_mini_imagenet_pickle(path, self.image_size)
        return ClassStore.from_labeled(images, labels)

    @override
    def build_stores(self) -> dict[str, ClassStore]:
        fmt, files = self.locate()
        stores = {}
        for split, path in files.items():
            sources = [path, self.root / "images"] if fmt == "csv" else [path]
            stores[split] = cached_store(
                f"mini_imagenet-{fmt}-{split}-{self.image_size}", sources,
                lambda fmt=fmt, path=path: self._read(fmt, path), self.cache_dir,
            )
        check_disjoint("miniImageNet", {s: stores[s].class_names for s in SPLITS})
        check_split_sizes(
            "miniImageNet", {s: stores[s].num_classes for s in SPLITS}, {s: len(stores[s]) for s in SPLITS},
            MINI_IMAGENET_CLASSES, MINI_IMAGENET_IMAGES, strict=self.strict,
        )
        return stores
