"""``lightning-meta data check ROOT``: which datasets a folder holds, and what is missing from them.

Looks for every layout that the datamodules read, in ``ROOT`` and in its direct subfolders, without
decoding any image: files are listed and counted, Omniglot's zips are md5-checked (the only published
checksums among these sources), CSV files are cross-checked against the image files they list. A layout
counts as *found* when its anchor file or folder exists; then every missing piece is reported with
where to get the data. Exit status 0 when something was found and nothing found is incomplete, else 1.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Finding", "check_folder", "main"]

_IMAGES = (".png", ".jpg", ".jpeg", ".gif", ".webp")


@dataclass
class Finding:
    """What one layout check found in one folder."""

    dataset: str
    folder: Path
    summary: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        head = f"{'OK ' if self.ok else 'BAD'} {self.dataset} in {self.folder}: {self.summary}"
        return [head] + [f"    - {p}" for p in self.problems]


def _images_in(folder: Path) -> int:
    return sum(1 for f in folder.iterdir() if f.is_file() and f.suffix.lower() in _IMAGES)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _omniglot(d: Path) -> Finding | None:
    from lightning_meta.datamodules.omniglot import MD5, SOURCES, URL

    present = [n for n in SOURCES if (d / f"{n}.zip").is_file() or (d / n).is_dir()]
    if not present:
        return None
    problems = []
    for name, md5 in MD5.items():
        z = d / f"{name}.zip"
        if z.is_file() and _md5(z) != md5:
            problems.append(f"{z.name} has md5 {_md5(z)}, expected {md5}: re-download it from {URL}/{z.name}")
    if not any(n in present for n in ("images_background", "images_background_small1")):
        problems.append(f"no background set (images_background.zip): get it from {URL}")
    return Finding("Omniglot", d, f"{', '.join(present)}", problems)


MINI_WHERE = (
    "miniImageNet needs a manual download: Ravi & Larochelle's {train,val,test}.csv (github.com/twitter/"
    "meta-learning-lstm) next to images/, or Ren et al.'s mini-imagenet-cache-{train,val,test}.pkl"
)


def _mini(d: Path) -> Finding | None:
    names = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
    pkls = [s for s, ns in names.items() if any((d / f"mini-imagenet-cache-{n}.pkl").is_file() for n in ns)]
    csvs = [s for s in ("train", "val", "test") if (d / f"{s}.csv").is_file()]
    if not pkls and not (csvs and (d / "images").is_dir()):
        return None
    problems = []
    if pkls:
        problems += [f"mini-imagenet-cache-{s}.pkl missing; {MINI_WHERE}" for s in names if s not in pkls]
        return Finding("miniImageNet (pickles)", d, f"{len(pkls)} of 3 split pickles", problems)
    problems += [f"{s}.csv missing; {MINI_WHERE}" for s in ("train", "val", "test") if s not in csvs]
    have = {f.name for f in (d / "images").iterdir()}
    absent = 0
    for s in csvs:
        with open(d / f"{s}.csv", newline="") as fh:
            absent += sum(1 for r in list(csv.reader(fh))[1:] if r and r[0] not in have)
    if absent:
        problems.append(f"{absent} images listed in the CSVs are not in images/")
    return Finding("miniImageNet (CSV + images)", d, f"{len(csvs)} split CSVs, {len(have)} files in images/", problems)


def _tiered(d: Path) -> Finding | None:
    found = [s for s in ("train", "val", "test") if (d / f"{s}_images_png.pkl").is_file()]
    if not found:
        return None
    problems = [f"{s}_{kind}.pkl missing" for s in ("train", "val", "test") for kind in ("images_png", "labels")
                if not (d / f"{s}_{kind}.pkl").is_file()]
    return Finding("tieredImageNet", d, f"{len(found)} of 3 split image pickles", problems)


def _cifar(d: Path) -> Finding | None:
    if (d / "cifar-100-python.tar.gz").is_file():
        return Finding("CIFAR-100 (CIFAR-FS, FC100)", d, "cifar-100-python.tar.gz")
    folder = d / "cifar-100-python"
    if not folder.is_dir():
        return None
    problems = [f"cifar-100-python/{f} missing: re-extract the archive" for f in ("train", "test", "meta")
                if not (folder / f).is_file()]
    return Finding("CIFAR-100 (CIFAR-FS, FC100)", d, "cifar-100-python/", problems)


def _eurosat(d: Path) -> Finding | None:
    from lightning_meta.datamodules.cdfsl import EUROSAT_CLASSES, EuroSATDataModule

    folder = d / "2750"
    if not folder.is_dir():
        return None
    problems = []
    total = 0
    for c, n in EUROSAT_CLASSES.items():
        got = _images_in(folder / c) if (folder / c).is_dir() else 0
        total += got
        if got != n:
            problems.append(f"2750/{c}/ has {got} images, the release has {n}")
    if problems:
        problems.append(EuroSATDataModule.where)
    return Finding("EuroSAT", d, f"{total} images", problems)


def _isic(d: Path) -> Finding | None:
    from lightning_meta.datamodules.cdfsl import ISICDataModule

    images = d / "ISIC2018_Task3_Training_Input"
    truth = d / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    if not images.is_dir() and not truth.parent.is_dir():
        return None
    problems = []
    if not images.is_dir():
        problems.append(f"{images.name}/ missing; {ISICDataModule.where}")
    if not truth.is_file():
        problems.append(f"{truth.relative_to(d)} missing; {ISICDataModule.where}")
    n = 0
    if not problems:
        with open(truth, newline="") as fh:
            ids = [r[0] for r in list(csv.reader(fh))[1:] if r]
        n = len(ids)
        absent = [i for i in ids if not (images / f"{i}.jpg").is_file()]
        if absent:
            problems.append(f"{len(absent)} of {n} listed images are missing from {images.name}/ (e.g. {absent[:3]})")
        if n != 10015:
            problems.append(f"the ground truth lists {n} images, the release has 10015")
    return Finding("ISIC 2018 Task 3", d, f"{n} labelled images", problems)


def _chestx(d: Path) -> Finding | None:
    from lightning_meta.datamodules.cdfsl import ChestXDataModule

    table = d / "Data_Entry_2017.csv"
    folders = [f for f in [d / "images", *sorted(d.glob("images_*/images"))] if f.is_dir()]
    if not table.is_file() and not any(f.parent != d for f in folders):  # a bare images/ is any dataset's
        return None
    problems = []
    if not table.is_file():
        problems.append(f"Data_Entry_2017.csv missing; {ChestXDataModule.where}")
    if not folders:
        problems.append(f"images/ missing; {ChestXDataModule.where}")
    n = sum(_images_in(f) for f in folders)
    return Finding("ChestX-ray14", d, f"{n} images in {len(folders)} folder(s)", problems)


def _crop(d: Path) -> Finding | None:
    from lightning_meta.datamodules.cdfsl import CropDiseaseDataModule

    folder = d / "dataset" / "train"
    if not folder.is_dir():
        return None
    classes = [c for c in folder.iterdir() if c.is_dir()]
    problems = [] if len(classes) == 38 else [f"dataset/train has {len(classes)} classes, expected 38; {CropDiseaseDataModule.where}"]
    return Finding("CropDisease", d, f"{len(classes)} classes, {sum(_images_in(c) for c in classes)} images", problems)


def _meta_album(d: Path) -> Finding | None:
    import json

    if not (d / "labels.csv").is_file() and not (d / "info.json").is_file():
        return None
    problems = [f"{n} missing" for n in ("info.json", "labels.csv", "images") if not (d / n).exists()]
    n = 0
    if not problems:
        info = json.loads((d / "info.json").read_text())
        col = info.get("image_column_name", "FILE_NAME")
        with open(d / "labels.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        n = len(rows)
        if rows and col not in rows[0]:
            problems.append(f"labels.csv has no column {col!r} (named by info.json)")
        else:
            have = {f.name for f in (d / "images").iterdir()}
            absent = [r[col] for r in rows if r[col] not in have]
            if absent:
                problems.append(f"{len(absent)} of {n} images listed in labels.csv are missing (e.g. {absent[:3]})")
    return Finding("Meta-Album", d, f"{n} labelled images", problems)


def _meta_dataset(d: Path) -> Finding | None:
    from lightning_meta.datamodules.meta_dataset import WHERE, read_dataset_spec

    if not (d / "dataset_spec.json").is_file():
        return None
    try:
        spec = read_dataset_spec(d)
    except ValueError as err:
        return Finding("Meta-Dataset records", d, "unsupported dataset_spec.json", [str(err)])
    ids = [c for split in spec.values() for c, _ in split]
    absent = [c for c in ids if not (d / f"{c}.tfrecords").is_file() and not any(d.glob(f"{c}_*.tfrecords"))]
    problems = [f"{len(absent)} of {len(ids)} class record files missing (e.g. {absent[:3]}); {WHERE}"] if absent else []
    sizes = ", ".join(f"{k} {len(v)}" for k, v in spec.items())
    return Finding("Meta-Dataset records", d, f"classes: {sizes}", problems)


CHECKS: Sequence[Callable[[Path], Finding | None]] = (
    _omniglot, _mini, _tiered, _cifar, _eurosat, _isic, _chestx, _crop, _meta_album, _meta_dataset,
)


def check_folder(root: str | Path) -> list[Finding]:
    """Every dataset layout found in ``root`` or its direct subfolders, with the problems of each."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    out = []
    for d in folders:
        for check in CHECKS:
            f = check(d)
            if f is not None:
                out.append(f)
    return out


def main(argv: Sequence[str]) -> int:
    """``check ROOT``: print the findings; return the exit status."""
    if len(argv) != 2 or argv[0] != "check":
        print("usage: lightning-meta data check ROOT")
        return 2
    findings = check_folder(argv[1])
    for f in findings:
        print("\n".join(f.lines()))
    if not findings:
        print(f"no known dataset layout in {argv[1]} or its subfolders (see the README's Datasets section)")
        return 1
    return 0 if all(f.ok for f in findings) else 1
