"""CIFAR-FS and FC100: few-shot splits of CIFAR-100.

CIFAR-FS: Bertinetto, Henriques, Torr, Vedaldi, "Meta-learning with differentiable closed-form solvers",
ICLR 2019, arXiv:1805.08136. FC100: Oreshkin, Rodriguez, Lacoste, "TADAM: Task dependent adaptive metric
for improved few-shot learning", NeurIPS 2018, arXiv:1805.10123.

Both are built from the CIFAR-100 python files that torchvision reads (Krizhevsky 2009): CIFAR's train and
test images are merged, giving 600 32x32 images for each of the 100 fine classes.

* CIFAR-FS splits the 100 fine classes 64/16/20. The class lists shipped in ``splits/cifar_fs/*.txt`` are
  Bertinetto et al.'s split as distributed with torchmeta (``torchmeta/datasets/assets/cifar100/cifar-fs``),
  the same lists learn2learn reads from ``cifar100/splits/bertinetto/*.txt``; the 20 test classes match the
  ones listed in REFERENCE.md section 3.4.
* FC100 splits the 20 superclasses 12/4/4 (60/20/20 fine classes), as in TADAM and MetaOptNet; the
  superclass lists (``splits/fc100/*.txt``) are torchmeta's train/test lists, val being the remaining four.

Both split folders can be replaced with ``split_dir`` (``train.txt``/``val.txt``/``test.txt``, one class
name a line: fine names for CIFAR-FS, superclass names for FC100).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_meta.datamodules.episodic import EpisodicDataModule
from lightning_meta.datamodules.mini_imagenet import Normalize, check_disjoint, fewshot_transforms
from lightning_meta.datamodules.store import ClassStore, cached_store

__all__ = [
    "CIFAR100_MD5",
    "CIFAR100_URL",
    "CIFAR100Data",
    "CIFARFSDataModule",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "FC100DataModule",
    "find_cifar100",
    "read_cifar100",
    "read_split_file",
]

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
_ARCHIVE = "cifar-100-python.tar.gz"
_FOLDER = "cifar-100-python"
_FILES = ("train", "test", "meta")
_SPLITS = ("train", "val", "test")
_SPLIT_ROOT = Path(__file__).resolve().parent / "splits"
# MetaOptNet's CIFAR-FS / FC100 pixel statistics (on the 0-255 scale).
CIFAR_MEAN = tuple(x / 255.0 for x in (129.37731888, 124.10583864, 112.47758569))
CIFAR_STD = tuple(x / 255.0 for x in (68.20947949, 65.43124043, 70.45866994))


@dataclass
class CIFAR100Data:
    """CIFAR-100 with train and test merged.

    Attributes:
        images: uint8 ``(n, 3, 32, 32)``, the train images first, then the test images.
        fine_labels: long ``(n,)``, indices into ``fine_names``.
        coarse_labels: long ``(n,)``, indices into ``coarse_names``.
        fine_names: the 100 fine class names, in CIFAR's label order.
        coarse_names: the 20 superclass names, in CIFAR's label order.
    """

    images: Tensor
    fine_labels: Tensor
    coarse_labels: Tensor
    fine_names: list[str]
    coarse_names: list[str]

    def qualified_names(self) -> list[str]:
        """``"<superclass>/<fine class>"`` for every fine label, from the labels of the images themselves.

        Raises:
            ValueError: if images of one fine class carry different superclasses.
        """
        pairs = torch.unique(torch.stack([self.fine_labels, self.coarse_labels], 1), dim=0)
        if len(pairs) != len(torch.unique(self.fine_labels)):
            raise ValueError(
                "CIFAR-100 files are inconsistent: some fine class has images with two different coarse labels; "
                "the files are corrupt or not CIFAR-100, download them again"
            )
        coarse_of = {int(f): int(c) for f, c in pairs}
        return [f"{self.coarse_names[coarse_of[i]]}/{name}" if i in coarse_of else name for i, name in enumerate(self.fine_names)]


def find_cifar100(root: str | Path, *, download: bool = False) -> list[Path]:
    """Locate the CIFAR-100 python files under ``root`` (downloading them if asked).

    Accepted layouts, in order: ``root/cifar-100-python/{train,test,meta}``, ``root/{train,test,meta}``
    (``root`` is the extracted folder itself) and ``root/cifar-100-python.tar.gz`` (read in place, not
    extracted, so ``root`` may be read-only).

    Returns:
        The three file paths ``[train, test, meta]``, or ``[archive]``.

    Raises:
        FileNotFoundError: when none of the layouts is present and ``download`` is False.
    """
    root = Path(root).expanduser()
    for folder in (root / _FOLDER, root):
        if all((folder / f).is_file() for f in _FILES):
            return [folder / f for f in _FILES]
    if (root / _ARCHIVE).is_file():
        return [root / _ARCHIVE]
    if download:
        from torchvision.datasets.utils import download_and_extract_archive

        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(CIFAR100_URL, download_root=root, filename=_ARCHIVE, md5=CIFAR100_MD5)
        return find_cifar100(root, download=False)
    partial = [str(root / _FOLDER / f) for f in _FILES if (root / _FOLDER).is_dir() and not (root / _FOLDER / f).is_file()]
    raise FileNotFoundError(
        f"CIFAR-100 not found under {str(root)!r}"
        + (f" (missing {partial})" if partial else "")
        + f": expected {_FOLDER}/train, {_FOLDER}/test and {_FOLDER}/meta (torchvision's layout) or the archive "
        f"{_ARCHIVE} there. Pass download=True to fetch it from {CIFAR100_URL}, or download and place it yourself."
    )


def _unpickle(stream: Any, name: str) -> dict:
    try:
        obj = pickle.load(stream, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise ValueError(
            f"{name} is not a readable CIFAR-100 pickle ({type(e).__name__}: {e}); the file is corrupt or "
            f"truncated: delete it and download again (download=True or {CIFAR100_URL})"
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{name} holds a {type(obj).__name__}, not CIFAR-100's dict; download the data again")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_members(sources: Sequence[Path]) -> dict[str, dict]:
    if len(sources) == 3:
        out = {}
        for f, path in zip(_FILES, sources):
            with open(path, "rb") as stream:
                out[f] = _unpickle(stream, str(path))
        return out
    (archive,) = sources
    try:
        with tarfile.open(archive, "r:*") as tar:
            out = {}
            for f in _FILES:
                try:
                    member = tar.extractfile(f"{_FOLDER}/{f}")
                except KeyError:
                    member = None
                if member is None:
                    raise ValueError(
                        f"{archive} has no member {_FOLDER}/{f}; it is not the CIFAR-100 python archive "
                        f"({CIFAR100_URL}): delete it and download again"
                    )
                out[f] = _unpickle(io.BytesIO(member.read()), f"{archive}:{_FOLDER}/{f}")
            return out
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(
            f"{archive} is not a readable tar.gz archive ({type(e).__name__}: {e}); it is corrupt or truncated: "
            f"delete it and download again (download=True, md5 {CIFAR100_MD5})"
        ) from e


def _names(meta: dict, key: str, expected: int, where: str) -> list[str]:
    names = meta.get(key)
    if names is None or len(names) != expected:
        found = "missing" if names is None else f"{len(names)} names"
        raise ValueError(f"{where}: '{key}' is {found}, expected {expected} names; download CIFAR-100 again")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_cifar100(sources: Sequence[Path]) -> CIFAR100Data:
    """Read CIFAR-100's train and test pickles (or the archive holding them) and merge them.

    Args:
        sources: what :func:`find_cifar100` returned.

    Raises:
        ValueError: on corrupt files or missing keys, naming the file and the fix.
    """
    members = _read_members(sources)
    where = str(sources[-1] if len(sources) == 3 else sources[0])
    fine_names = _names(members["meta"], "fine_label_names", 100, where)
    coarse_names = _names(members["meta"], "coarse_label_names", 20, where)
    images, fine, coarse = [], [], []
    for part in ("train", "test"):
        d = members[part]
        missing = [k for k in ("data", "fine_labels", "coarse_labels") if k not in d]
        if missing:
            raise ValueError(f"CIFAR-100 '{part}' file in {where} lacks keys {missing}; download CIFAR-100 again")
        data = np.asarray(d["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"CIFAR-100 '{part}' data has dtype {data.dtype} and shape {data.shape}, expected uint8 (n, 3072); "
                "download CIFAR-100 again"
            )
        f, c = np.asarray(d["fine_labels"], dtype=np.int64), np.asarray(d["coarse_labels"], dtype=np.int64)
        if not (len(f) == len(c) == len(data)):
            raise ValueError(
                f"CIFAR-100 '{part}': {len(data)} images but {len(f)} fine and {len(c)} coarse labels; download again"
            )
        if len(f) and (f.min() < 0 or f.max() >= 100 or c.min() < 0 or c.max() >= 20):
            raise ValueError(f"CIFAR-100 '{part}': labels out of range (fine 0..99, coarse 0..19); download again")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        fine.append(torch.from_numpy(f))
        coarse.append(torch.from_numpy(c))
    return CIFAR100Data(torch.cat(images), torch.cat(fine), torch.cat(coarse), fine_names, coarse_names)


def read_split_file(path: Path) -> list[str]:
    """Class names of a split file: one a line; blank lines and ``#`` comments ignored."""
    if not path.is_file():
        raise FileNotFoundError(f"split file {str(path)!r} not found; a split folder holds train.txt, val.txt, test.txt")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def _split_lists(split_dir: str | None, default: str) -> tuple[Path, dict[str, list[str]]]:
    folder = Path(split_dir).expanduser() if split_dir is not None else _SPLIT_ROOT / default
    lists = {s: read_split_file(folder / f"{s}.txt") for s in _SPLITS}
    empty = [s for s in _SPLITS if not lists[s]]
    if empty:
        raise ValueError(f"split files {[str(folder / f'{s}.txt') for s in empty]} name no classes; list one a line")
    return folder, lists


class _CIFAR100FewShot(EpisodicDataModule):
    """Shared reading, caching and transforms of the CIFAR-100-based datamodules."""

    dataset_name = "CIFAR-100"
    default_split = ""
    expected_classes: dict[str, int] = {}

    def __init__(
        self,
        root: str,
        *,
        split_dir: str | None = None,
        download: bool = False,
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
        self.root = Path(root).expanduser()
        self.split_dir = split_dir
        self.download = download
        self.normalize = normalize
        self.augment = augment
        self.strict = strict
        self._train_t, self._eval_t = fewshot_transforms(
            32, augment=augment, normalize=normalize, dataset_mean=CIFAR_MEAN, dataset_std=CIFAR_STD, padding=4
        )
        _split_lists(split_dir, self.default_split)  # fail early on missing or empty split files

    @property
    @override
    def train_transform(self) -> Callable[[Tensor], Tensor] | None:
        return self._train_t

    @property
    @override
    def eval_transform(self) -> Callable[[Tensor], Tensor] | None:
        return self._eval_t

    @override
    def prepare_data(self) -> None:
        find_cifar100(self.root, download=self.download)  # downloads once, on local rank 0

    def cifar100_store(self) -> ClassStore:
        """All 100 fine classes (train + test images), named ``"<superclass>/<fine class>"``; cached."""
        sources = find_cifar100(self.root, download=self.download)

        def build() -> ClassStore:
            data = read_cifar100(sources)
            names = data.qualified_names()
            return ClassStore.from_labeled(data.images, [names[i] for i in data.fine_labels.tolist()])

        store = cached_store("cifar100", sources, build, self.cache_dir)
        if self.strict:
            counts = store.counts()
            if store.num_classes != 100 or bool((counts != 600).any()):
                raise ValueError(
                    f"{self.dataset_name}: CIFAR-100 should have 100 classes of 600 images (train + test), found "
                    f"{store.num_classes} classes with {int(counts.min())}..{int(counts.max())} images; download it "
                    "again, or pass strict=False to use a subset"
                )
        return store

    def split_classes(self, store: ClassStore) -> dict[str, list[str]]:
        """The store's class names of each split."""
        raise NotImplementedError

    @override
    def build_stores(self) -> dict[str, ClassStore]:
        store = self.cifar100_store()
        classes = self.split_classes(store)
        stores = {s: store.select(classes[s]) for s in _SPLITS}
        check_disjoint(self.dataset_name, classes)
        counts = {s: stores[s].num_classes for s in _SPLITS}
        if self.strict and counts != self.expected_classes:
            raise ValueError(
                f"{self.dataset_name} splits have {counts} classes, expected {self.expected_classes}; fix the split "
                "files (split_dir), or pass strict=False for a custom split"
            )
        return stores


class CIFARFSDataModule(_CIFAR100FewShot):
    """CIFAR-FS episodes (Bertinetto et al. 2019): 64/16/20 CIFAR-100 classes, 600 32x32 images each.

    The split is Bertinetto et al.'s (the ``bertinetto`` lists distributed with torchmeta and learn2learn),
    shipped in ``splits/cifar_fs``. Data: ``root/cifar-100-python/{train,test,meta}`` (torchvision's layout),
    ``root/cifar-100-python.tar.gz`` (read without extracting), or ``download=True``. The merged store is
    cached in ``cache_dir``, never in ``root``.

    Args:
        root: folder with CIFAR-100 (or where to download it).
        split_dir: a folder with ``train.txt``/``val.txt``/``test.txt`` naming fine classes, one a line
            (default: the shipped Bertinetto split).
        download: fetch ``cifar-100-python.tar.gz`` (md5-checked) into ``root`` when it is missing.
        normalize: ``"none"``, ``"imagenet"`` or ``"dataset"`` (MetaOptNet's CIFAR mean/std).
        augment: random crop (padding 4), color jitter and horizontal flip on training episodes (MetaOptNet).
        strict: check 100 classes x 600 images and a 64/16/20 split; pass False for subsets or custom splits.
        ways: see :class:`~lightning_meta.datamodules.episodic.EpisodicDataModule` for this and the rest.

    Example:
        >>> from lightning_meta.datamodules.cifar import read_split_file, _SPLIT_ROOT
        >>> [len(read_split_file(_SPLIT_ROOT / "cifar_fs" / f"{s}.txt")) for s in ("train", "val", "test")]
        [64, 16, 20]
    """

    dataset_name = "CIFAR-FS"
    default_split = "cifar_fs"
    expected_classes = {"train": 64, "val": 16, "test": 20}

    @override
    def split_classes(self, store: ClassStore) -> dict[str, list[str]]:
        folder, lists = _split_lists(self.split_dir, self.default_split)
        by_fine = {name.rsplit("/", 1)[-1]: name for name in store.class_names}
        out = {}
        for s in _SPLITS:
            unknown = [c for c in lists[s] if c not in by_fine]
            if unknown:
                raise ValueError(
                    f"split file {folder / f'{s}.txt'} names {len(unknown)} classes that CIFAR-100 does not have "
                    f"(e.g. {unknown[:5]}); use CIFAR-100 fine label names such as {sorted(by_fine)[:3]}"
                )
            out[s] = [by_fine[c] for c in lists[s]]
        return out


class FC100DataModule(_CIFAR100FewShot):
    """FC100 episodes (Oreshkin et al. 2018): CIFAR-100 split by superclass, 12/4/4 superclasses = 60/20/20 classes.

    Superclasses (CIFAR coarse ids): train 1-6, 9, 10, 15, 17-19; val 8, 11, 13, 16; test 0, 7, 12, 14
    (``splits/fc100``). Data as for :class:`CIFARFSDataModule`.

    Args:
        root: folder with CIFAR-100 (or where to download it).
        split_dir: a folder with ``train.txt``/``val.txt``/``test.txt`` naming superclasses, one a line
            (default: the shipped FC100 split).
        download: fetch ``cifar-100-python.tar.gz`` (md5-checked) into ``root`` when it is missing.
        normalize: ``"none"``, ``"imagenet"`` or ``"dataset"`` (MetaOptNet's CIFAR mean/std).
        augment: random crop (padding 4), color jitter and horizontal flip on training episodes (MetaOptNet).
        strict: check 100 classes x 600 images and a 60/20/20 split; pass False for subsets or custom splits.
        ways: see :class:`~lightning_meta.datamodules.episodic.EpisodicDataModule` for this and the rest.
    """

    dataset_name = "FC100"
    default_split = "fc100"
    expected_classes = {"train": 60, "val": 20, "test": 20}

    @override
    def split_classes(self, store: ClassStore) -> dict[str, list[str]]:
        folder, lists = _split_lists(self.split_dir, self.default_split)
        by_coarse: dict[str, list[str]] = {}
        for name in store.class_names:
            by_coarse.setdefault(name.split("/", 1)[0], []).append(name)
        out = {}
        for s in _SPLITS:
            unknown = [c for c in lists[s] if c not in by_coarse]
            if unknown:
                raise ValueError(
                    f"split file {folder / f'{s}.txt'} names {len(unknown)} superclasses that CIFAR-100 does not have "
                    f"(e.g. {unknown[:5]}); use CIFAR-100 coarse label names such as {sorted(by_coarse)[:3]}"
                )
            out[s] = [name for c in lists[s] for name in by_coarse[c]]
        return out
