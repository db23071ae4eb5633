"""CIFAR-FS and FC100: few-shot splits of CIFAR-100.

CIFAR-FS: Bertinetto, Henriques, Torr, Vedaldi, "Meta-learning with differentiable closed-form solvers",
ICLR 2019, arXiv:1805.08136. FC100: Oreshkin, Rodriguez, Lacoste, "TADAM: Task dependent adaptive metric
for improved few-shot learning", NeurIPS 2018, arXiv:1805.10123.

Both are built from the CIFAR-100 python files that torchvision reads (Krizhevsky 2009): CIFAR's train and
test images are merged, giving 600 32x32 images for each of the 100 fine classes.

* CIFAR-FS splits the 100 fine classes 64/16/20. The class lists shipped in ``splits/cifar_fs/*.txt`` are
  Bertinetto et al.'s split as distributed with torchmeta (``torchmeta/datasets/assets/cifar100/cifar-fs``),
  the same lists learn2learn reads from ``cifar100/splits/bertinetto/*.txt``; the 20 test classes match the
  ones listed in docs/guide/datasets.md.
* FC100 splits the 20 superclasses 12/4/4 (60/20/20 fine classes), as in TADAM and MetaOptNet; the
  superclass lists (``splits/fc100/*.txt``) are torchmeta's train/test lists, val being the remaining four.

Both split folders can be replaced with ``split_dir`` (``train.txt``/``val.txt``/``test.txt``, one class
name a line: fine names for CIFAR-FS, superclass names for FC100).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor
from typing_extensions import override

from lightning_meta.datamodules.cifar100 import check_cifar100, find_cifar100, read_cifar100
from lightning_meta.datamodules.episodic import EpisodicDataModule
from lightning_meta.datamodules.fewshot_images import Normalize, check_disjoint, fewshot_transforms
from lightning_meta.datamodules.store import ClassStore, cached_store
from lightning_meta.datamodules.variable import VariableEpisodes

__all__ = ["CIFARFSDataModule", "CIFAR_MEAN", "CIFAR_STD", "FC100DataModule", "read_split_file"]

_SPLITS = ("train", "val", "test")
_SPLIT_ROOT = Path(__file__).resolve().parent / "splits"
# MetaOptNet's CIFAR-FS / FC100 pixel statistics (on the 0-255 scale).
CIFAR_MEAN = tuple(x / 255.0 for x in (129.37731888, 124.10583864, 112.47758569))
CIFAR_STD = tuple(x / 255.0 for x in (68.20947949, 65.43124043, 70.45866994))


def read_split_file(path: Path) -> list[str]:
    """Class names of a split file: one a line; blank lines and ``#`` comments ignored."""
    if not path.is_file():
        raise FileNotFoundError(
            f"split file {str(path)!r} not found; a split folder holds train.txt, val.txt, test.txt"
        )
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
        verify: bool = False,
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
        self.root = Path(root).expanduser()
        self.split_dir = split_dir
        self.download = download
        self.normalize = normalize
        self.augment = augment
        self.strict = strict
        self.verify = verify
        self._train_t, self._eval_t = fewshot_transforms(
            32, augment=augment, normalize=normalize, dataset_mean=CIFAR_MEAN, dataset_std=CIFAR_STD, padding=4
        )
        self.save_hyperparameters()
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
        check_cifar100(sources, verify=self.verify, cache_dir=self.cache_dir)

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
        augment: random crop (padding 4), color jitter (0.4, 0.4, 0.4) and horizontal flip on training episodes,
            as MetaOptNet's ``CIFAR_FS.py`` (read in a copy of that file; docs/guide/datasets.md lists the padding as unverified).
        strict: check 100 classes x 600 images and a 64/16/20 split; pass False for subsets or custom splits.
        verify: refuse files whose md5 differs from the published one (by default a mismatch only warns).
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
        verify: refuse files whose md5 differs from the published one (by default a mismatch only warns).
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
