"""The cross-domain few-shot (CD-FSL) target sets as test-only datamodules (Guo et al., ECCV 2020, arXiv:1912.07200).

Four domains far from natural images, read in the layouts that the benchmark's reference code reads
(IBM/cdfsl-benchmark); every class of a set is a test class, and meta-training happens on another
datamodule (``trainer.test(model, datamodule=EuroSATDataModule(...))``). The benchmark's protocol is
5-way, 5/20/50-shot, 15 queries, 600 episodes (the defaults here, with 5 shots).

=================  =====================================================================  =======
datamodule         files under ``root``                                                   classes
=================  =====================================================================  =======
EuroSAT            ``2750/<class>/*.jpg`` (the RGB release, ``EuroSAT.zip`` extracted)    10
ISIC 2018          ``ISIC2018_Task3_Training_Input/*.jpg`` and                            7
                   ``ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv``
ChestX-ray14       ``Data_Entry_2017.csv`` and ``images/*.png`` (or Kaggle's             7
                   ``images_001/images/*.png`` ... ``images_012/...``)
CropDisease        ``dataset/train/<class>/*`` (Kaggle's "plant-disease" set)             38
=================  =====================================================================  =======

None of them may be redistributed by this library (ISIC 2018 and ChestX-ray14 need a registration or a
Kaggle account, CropDisease comes from Kaggle), so nothing is downloaded: a missing file's error says
where to get it and where to put it. The sources publish no checksums; with ``strict=True`` the class
names and, where the release fixes them, the image counts are checked instead. ChestX-ray14 keeps the
benchmark's 7 single-label findings (Atelectasis, Cardiomegaly, Effusion, Infiltration, Mass, Nodule,
Pneumothorax; images with several findings or "No Finding" are left out). Images are decoded once,
resized to ``image_size`` (84 by default, like miniImageNet backbones; the benchmark used 224) and
cached as a :class:`~lightning_meta.datamodules.ClassStore`.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from typing_extensions import override

from lightning_meta.datamodules.episodic import EpisodeLoader, EpisodicDataModule
from lightning_meta.datamodules.image_folder import IMAGE_EXTENSIONS
from lightning_meta.datamodules.store import ClassStore, cached_store
from lightning_meta.datamodules.variable import VariableEpisodes
from lightning_meta.progress import progress

__all__ = [
    "ChestXDataModule",
    "CropDiseaseDataModule",
    "EuroSATDataModule",
    "ISICDataModule",
    "TestOnlyDataModule",
    "decode_files",
]

EUROSAT_CLASSES = {
    "AnnualCrop": 3000,
    "Forest": 3000,
    "HerbaceousVegetation": 3000,
    "Highway": 2500,
    "Industrial": 2500,
    "Pasture": 2000,
    "PermanentCrop": 2500,
    "Residential": 3000,
    "River": 2500,
    "SeaLake": 3000,
}
ISIC_CLASSES = {"MEL": 1113, "NV": 6705, "BCC": 514, "AKIEC": 327, "BKL": 1099, "DF": 115, "VASC": 142}
CHESTX_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax")


def decode_files(files: Sequence[Path], labels: Sequence[str], image_size: int, channels: int, what: str) -> ClassStore:
    """Decode image files into a store of uint8 ``(channels, image_size, image_size)`` images labelled ``labels``.

    Raises:
        ValueError: naming an image that does not decode.
    """
    from torchvision.transforms.v2.functional import resize

    with warnings.catch_warnings():  # torchvision 0.29 deprecates torchvision.io in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_image

    mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}[channels]
    images = []
    for f in progress(list(files), f"decoding {what}"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                img = decode_image(str(f), mode=mode)
        except Exception as err:
            raise ValueError(f"cannot decode image {f} ({err}); replace or remove it") from err
        if img.shape[-2:] != (image_size, image_size):
            img = resize(img, [image_size, image_size], antialias=True)
        images.append(img)
    if not images:
        raise ValueError(f"no images found for {what}")
    return ClassStore.from_labeled(torch.stack(images), list(labels))


class TestOnlyDataModule(EpisodicDataModule):
    """A datamodule whose every class is a test class (cross-domain evaluation); subclasses implement :meth:`decoded`.

    ``train_dataloader``/``val_dataloader`` raise: meta-train on another datamodule, then
    ``trainer.test(model, datamodule=this)``.

    Args:
        root: the dataset folder (see the module docstring for each layout).
        image_size: side of the square resized images.
        channels: 3 (RGB, the benchmark's) or 1.
        strict: check class names and published image counts.
        ways: classes per test episode (the benchmark: 5).
        shots: support examples per class (the benchmark: 5, 20 or 50).
        queries: query examples per class (the benchmark: 15).
        test_episodes: episodes (the benchmark: 600).

    The other arguments (``tasks_per_batch``, ``seed``, ``num_workers``, ``cache_dir``, ``pin_memory``,
    ``variable_episodes``) are those of :class:`~lightning_meta.datamodules.EpisodicDataModule`.
    """

    name = "dataset"
    where = ""

    def __init__(
        self,
        root: str,
        *,
        image_size: int = 84,
        channels: int = 3,
        strict: bool = True,
        ways: int = 5,
        shots: int = 5,
        queries: int = 15,
        test_episodes: int = 600,
        tasks_per_batch: int = 1,
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
            test_episodes=test_episodes,
            seed=seed,
            num_workers=num_workers,
            cache_dir=cache_dir,
            pin_memory=pin_memory,
            variable_episodes=variable_episodes,
        )
        if channels not in (1, 3):
            raise ValueError(f"channels={channels} must be 1 (grayscale) or 3 (RGB)")
        if image_size < 1:
            raise ValueError(f"image_size={image_size} must be positive")
        self.root = Path(root).expanduser()
        self.image_size, self.channels, self.strict = image_size, channels, strict
        self.save_hyperparameters()

    def decoded(self) -> ClassStore:
        """Every class of the dataset, decoded (or loaded from the cache)."""
        raise NotImplementedError

    def missing(self, what: str) -> FileNotFoundError:
        """The error for a missing file: what is missing, where to get the data and where to put it."""
        return FileNotFoundError(f"{self.name}: {what} not found under {self.root}. {self.where}")

    def _cached(self, key: str, sources: list[Path], files: list[Path], labels: list[str]) -> ClassStore:
        return cached_store(
            f"{key}-{self.image_size}-{self.channels}",
            sources,
            lambda: decode_files(files, labels, self.image_size, self.channels, self.name),
            self.cache_dir,
        )

    def _check_counts(self, store: ClassStore, expected: dict[str, int]) -> None:
        if not self.strict:
            return
        got = dict(zip(store.class_names, store.counts().tolist()))
        wrong = {c: (got.get(c, 0), n) for c, n in expected.items() if got.get(c, 0) != n}
        if wrong:
            raise ValueError(
                f"{self.name} under {self.root} is incomplete or modified: (found, expected) images per class {wrong}; "
                f"re-extract the original release, or pass strict=False to use it as it is"
            )

    @override
    def prepare_data(self) -> None:
        """Decode into the cache once (local rank zero only)."""
        self.decoded()

    @override
    def make_datasets(self) -> dict:
        from lightning_meta.datamodules.sampling import EpisodeDataset
        from lightning_meta.datamodules.variable import VariableEpisodeDataset

        store = self.decoded()
        ds: EpisodeDataset
        if self.variable_episodes is not None:
            ds = VariableEpisodeDataset(
                store,
                self.variable_episodes,
                length=self.test_episodes,
                seed=self.seed,
                split="test",
                transform=self.eval_transform,
                resample_per_epoch=False,
            )
        else:
            ds = EpisodeDataset(
                store,
                ways=self.eval_ways,
                shots=self.eval_shots,
                queries=self.eval_queries,
                length=self.test_episodes,
                seed=self.seed,
                split="test",
                transform=self.eval_transform,
                resample_per_epoch=False,
            )
        return {"test": ds}

    def _no_split(self, split: str) -> EpisodeLoader:
        raise RuntimeError(
            f"{type(self).__name__} is test-only (a cross-domain target set) and has no {split} split: meta-train on "
            f"another datamodule, then call trainer.test(model, datamodule=...)"
        )

    @override
    def train_dataloader(self) -> EpisodeLoader:
        return self._no_split("train")

    @override
    def val_dataloader(self) -> EpisodeLoader:
        return self._no_split("val")


class EuroSATDataModule(TestOnlyDataModule):
    """EuroSAT (Helber et al. 2019): 27,000 Sentinel-2 RGB patches of 10 land-use classes. See the module docstring."""

    name = "EuroSAT"
    where = (
        "Download EuroSAT.zip (the RGB version) from https://github.com/phelber/EuroSAT (MIT licence) and extract it so "
        "that root/2750/<class>/<image>.jpg exist (root may also be the 2750 folder itself)."
    )

    def folder(self) -> Path:
        """The folder of class subfolders."""
        for cand in (self.root / "2750", self.root / "EuroSAT" / "2750", self.root):
            if cand.is_dir() and any((cand / c).is_dir() for c in EUROSAT_CLASSES):
                return cand
        raise self.missing("the 2750/<class>/ folders")

    @override
    def decoded(self) -> ClassStore:
        folder = self.folder()
        files, labels = _class_folder_files(folder)
        store = self._cached("eurosat", [folder], files, labels)
        self._check_counts(store, EUROSAT_CLASSES)
        return store


class CropDiseaseDataModule(TestOnlyDataModule):
    """CropDisease (Mohanty et al. 2016, PlantVillage): 38 classes of plant leaves. See the module docstring."""

    name = "CropDisease"
    where = (
        "Download the Kaggle dataset 'saroz014/plant-disease' (`kaggle datasets download -d saroz014/plant-disease`) "
        "and extract it so that root/dataset/train/<class>/<image> exist."
    )
    expected_classes = 38

    @override
    def decoded(self) -> ClassStore:
        folder = self.root / "dataset" / "train"
        if not folder.is_dir():
            raise self.missing("dataset/train/")
        files, labels = _class_folder_files(folder)
        store = self._cached("cropdisease", [folder], files, labels)
        if self.strict and store.num_classes != self.expected_classes:
            raise ValueError(
                f"CropDisease under {folder} has {store.num_classes} classes, expected {self.expected_classes}; "
                "re-extract the original release, or pass strict=False"
            )
        return store


class ISICDataModule(TestOnlyDataModule):
    """ISIC 2018 Task 3 (HAM10000): 10,015 dermoscopic images of 7 lesion types. See the module docstring."""

    name = "ISIC 2018"
    where = (
        "Register at https://challenge.isic-archive.com/data/ (ISIC 2018, Task 3; CC BY-NC licence), download the "
        "training input and ground truth, and extract them into root/ISIC2018_Task3_Training_Input/ and "
        "root/ISIC2018_Task3_Training_GroundTruth/."
    )

    @override
    def decoded(self) -> ClassStore:
        images = self.root / "ISIC2018_Task3_Training_Input"
        truth = self.root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
        if not truth.is_file():
            raise self.missing(f"{truth.relative_to(self.root)}")
        if not images.is_dir():
            raise self.missing(f"{images.relative_to(self.root)}/")
        with open(truth, newline="") as fh:
            rows = list(csv.reader(fh))
        header, rows = rows[0], [r for r in rows[1:] if r]
        classes = header[1:]
        if self.strict and classes != list(ISIC_CLASSES):
            raise ValueError(f"{truth} has columns {header}, expected image,{','.join(ISIC_CLASSES)}")
        files, labels = [], []
        for r in rows:
            onehot = [float(v) for v in r[1:]]
            if sum(v != 0 for v in onehot) != 1:
                raise ValueError(f"{truth}: row {r} must have exactly one nonzero class column")
            f = images / f"{r[0]}.jpg"
            if not f.is_file():
                raise self.missing(f"image {f.name} (listed in the ground truth)")
            files.append(f)
            labels.append(classes[next(i for i, v in enumerate(onehot) if v != 0)])
        store = self._cached("isic2018", [truth, images], files, labels)
        self._check_counts(store, ISIC_CLASSES)
        return store


class ChestXDataModule(TestOnlyDataModule):
    """ChestX-ray14 (Wang et al. 2017): the 7 single-finding classes of the CD-FSL benchmark. See the module docstring."""

    name = "ChestX-ray14"
    where = (
        "Download the NIH ChestX-ray14 release (https://nihcc.app.box.com/v/ChestXray-NIHCC, or the Kaggle dataset "
        "'nih-chest-xrays/data'): put Data_Entry_2017.csv in root and the PNGs in root/images/ (Kaggle's "
        "root/images_001/images/ ... folders also work)."
    )

    @override
    def decoded(self) -> ClassStore:
        table = self.root / "Data_Entry_2017.csv"
        if not table.is_file():
            raise self.missing("Data_Entry_2017.csv")
        folders = [self.root / "images"] + sorted(self.root.glob("images_*/images"))
        folders = [f for f in folders if f.is_dir()]
        if not folders:
            raise self.missing("images/")
        with open(table, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader)
            if header[:2] != ["Image Index", "Finding Labels"]:
                raise ValueError(
                    f"{table} starts with columns {header[:2]}, expected ['Image Index', 'Finding Labels']"
                )
            entries = [(r[0], r[1]) for r in reader if r and r[1] in CHESTX_CLASSES]  # one finding, one of the 7
        where = {}
        for folder in folders:
            for f in folder.iterdir():
                where[f.name] = f
        files, labels = [], []
        for name, label in entries:
            if name not in where:
                raise self.missing(f"image {name} (listed in Data_Entry_2017.csv)")
            files.append(where[name])
            labels.append(label)
        store = self._cached("chestx14", [table, *folders], files, labels)
        if self.strict and sorted(store.class_names) != sorted(CHESTX_CLASSES):
            absent = sorted(set(CHESTX_CLASSES) - set(store.class_names))
            raise ValueError(
                f"{table} lists no single-finding images of {absent}; pass strict=False to go without them"
            )
        return store


def _class_folder_files(folder: Path) -> tuple[list[Path], list[str]]:
    files, labels = [], []
    for c in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        fs = sorted(f for f in c.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        files += fs
        labels += [c.name] * len(fs)
    return files, labels
