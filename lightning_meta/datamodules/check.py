"""``lightning-meta data check ROOT``: say which dataset layout a folder holds, verify it, and say what to fix.

Detected layouts (every one present is checked): Omniglot zips/folders, miniImageNet (CSV + images, or the
pickles), tieredImageNet pickles, CIFAR-100 (python version), an ILSVRC-2012 training folder (for building
miniImageNet/tieredImageNet), Meta-Dataset converted records (``dataset_spec.json`` in ROOT or its
subfolders) and, when nothing else matches, a plain folder of class subfolders.

Each finding is ``ok``, ``note`` (usable, but something optional is absent) or ``PROBLEM`` (missing,
incomplete or not the published file); the command exits with 1 when there is a problem and 2 when no layout
is recognised. Published md5s are compared with :func:`~lightning_meta.datamodules.checksums.file_md5`, which
remembers each file's hash in the cache folder, so a second check does not re-read large files. Images are
counted and listed, not decoded: a corrupt image is still only found when the datamodule decodes it.
"""

from __future__ import annotations

import argparse
import csv
import functools
import re
import struct
import sys
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning_meta.datamodules.checksums import file_md5

__all__ = ["Finding", "LayoutReport", "check_root", "main"]

_SPLITS = ("train", "val", "test")
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp")
_SYNSET = re.compile(r"^n\d{8}$")


@dataclass
class Finding:
    level: str  # "ok", "note" or "PROBLEM"
    message: str
    fix: str = ""


@dataclass
class LayoutReport:
    """The findings about one dataset layout found under the checked folder."""

    layout: str
    where: Path
    findings: list[Finding] = field(default_factory=list)

    def ok(self, message: str) -> None:
        self.findings.append(Finding("ok", message))

    def note(self, message: str, fix: str = "") -> None:
        self.findings.append(Finding("note", message, fix))

    def problem(self, message: str, fix: str = "") -> None:
        self.findings.append(Finding("PROBLEM", message, fix))

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "PROBLEM"]


def _md5(report: LayoutReport, path: Path, expected: str, what: str, cache_dir: str | None, fix: str) -> None:
    actual = file_md5(path, cache_dir)
    if actual == expected:
        report.ok(f"{path.name}: md5 {actual} matches {what}")
    else:
        report.problem(
            f"{path.name}: md5 {actual}, but {what} has md5 {expected} (modified, re-packaged or corrupt)", fix
        )


# --- Omniglot ---------------------------------------------------------------------------------------------

# (alphabets, characters) of the official files; every character has 20 drawings.
_OMNIGLOT_COUNTS = {
    "images_background": (30, 964),
    "images_evaluation": (20, 659),
    "images_background_small1": (5, 136),
    "images_background_small2": (5, 156),
}


def _omniglot(root: Path, cache_dir: str | None) -> list[LayoutReport]:
    from lightning_meta.datamodules.omniglot import MD5, URL

    found: dict[str, Path] = {}
    for base in (root, root / "omniglot-py"):
        for name in _OMNIGLOT_COUNTS:
            for cand in (base / f"{name}.zip", base / name):
                if name not in found and cand.exists():
                    found[name] = cand
    if not found:
        return []
    report = LayoutReport("Omniglot", root)
    fix = f"delete it and download it again (OmniglotDataModule(download=True), or {URL}/<name>.zip)"
    for name, path in found.items():
        try:
            if path.is_file():
                with zipfile.ZipFile(path) as zf:
                    bad = zf.testzip()
                    if bad is not None:
                        report.problem(f"{path.name}: member {bad} fails its CRC check", fix)
                        continue
                    members = [n.strip("/").split("/") for n in zf.namelist() if n.lower().endswith(".png")]
            else:
                members = [list(f.relative_to(path).parts) for f in path.rglob("*.png")]
        except (zipfile.BadZipFile, OSError) as e:
            report.problem(f"{path.name} is not a readable zip ({e})", fix)
            continue
        drawings = Counter("/".join(p[-3:-1]) for p in members if len(p) >= 3)
        alphabets = {c.split("/")[0] for c in drawings}
        want_a, want_c = _OMNIGLOT_COUNTS[name]
        short = sorted(c for c, n in drawings.items() if n != 20)
        if (len(alphabets), len(drawings)) != (want_a, want_c) or short:
            detail = f"; characters without 20 drawings: {short[:5]}" if short else ""
            report.problem(
                f"{path.name}: {len(alphabets)} alphabets, {len(drawings)} characters (official: {want_a}, {want_c}, "
                f"20 drawings each){detail}",
                fix,
            )
        else:
            report.ok(f"{path.name}: {want_a} alphabets, {want_c} characters, 20 drawings each")
        if name in MD5 and path.is_file():
            _md5(report, path, MD5[name], f"the official {name}.zip", cache_dir, fix)
    if "images_background" not in found or "images_evaluation" not in found:
        absent = [n for n in ("images_background", "images_evaluation") if n not in found]
        report.note(
            f"{' and '.join(absent)} absent: the Vinyals and Lake splits need the full background and evaluation "
            "sets; the seeded and custom splits work on what is here",
            f"OmniglotDataModule(download=True) fetches them from {URL}/",
        )
    return [report]


# --- miniImageNet -----------------------------------------------------------------------------------------


def _mini_imagenet(root: Path, cache_dir: str | None) -> list[LayoutReport]:
    from lightning_meta.datamodules.ilsvrc import MINI_IMAGENET_SPLIT_MD5
    from lightning_meta.datamodules.mini_imagenet import MINI_IMAGENET_CLASSES

    how = (
        "get Ravi & Larochelle's {train,val,test}.csv (github.com/twitter-research/meta-learning-lstm) and the "
        "images, or build them from your ILSVRC-2012 copy: MiniImageNetDataModule(<ilsvrc root>, format='ilsvrc')"
    )
    reports = []
    csvs = [root / f"{s}.csv" for s in _SPLITS]
    if any(p.is_file() for p in csvs):
        report = LayoutReport("miniImageNet (CSV + images/)", root)
        images = root / "images"
        if not images.is_dir():
            report.problem("images/ folder missing", f"put the 84x84 JPEGs in {images}; {how}")
        for split, path in zip(_SPLITS, csvs):
            if not path.is_file():
                report.problem(f"{path.name} missing", how)
                continue
            if file_md5(path, cache_dir) == MINI_IMAGENET_SPLIT_MD5[split]:
                report.ok(f"{path.name}: md5 matches Ravi & Larochelle's file")
            else:
                report.note(f"{path.name}: not Ravi & Larochelle's file (md5 differs): a different split or edited")
            with open(path, newline="") as fh:
                rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
            if not rows or [c.strip().lower() for c in rows[0][:2]] != ["filename", "label"] or any(
                    len(r) < 2 for r in rows[1:]):  # fmt: skip
                report.problem(f"{path.name} is not a 'filename,label' CSV with that header", how)
                continue
            labelled = [(r[0].strip(), r[1].strip()) for r in rows[1:]]
            classes = Counter(label for _, label in labelled)
            if len(classes) != MINI_IMAGENET_CLASSES[split] or set(classes.values()) != {600}:
                report.problem(
                    f"{path.name}: {len(classes)} classes with {sorted(set(classes.values()))} images each "
                    f"(published: {MINI_IMAGENET_CLASSES[split]} classes x 600)",
                    how,
                )
            if images.is_dir():
                names = [n if Path(n).suffix else f"{n}.jpg" for n, _ in labelled]
                missing = [n for n in names if not (images / n).is_file()]
                if missing:
                    report.problem(
                        f"{len(missing)} of the {len(names)} images of {path.name} missing from images/ "
                        f"(e.g. {missing[:3]})",
                        how,
                    )
                else:
                    report.ok(f"{path.name}: all {len(names)} images present ({len(classes)} classes)")
        reports.append(report)
    pickles = {s: [root / f"mini-imagenet-cache-{n}.pkl" for n in ((s, "validation") if s == "val" else (s,))]
               for s in _SPLITS}  # fmt: skip
    if any(p.is_file() for ps in pickles.values() for p in ps):
        from lightning_meta.datamodules.fewshot_images import load_pickle

        report = LayoutReport("miniImageNet (pickles)", root)
        for split, cands in pickles.items():
            pkl = next((p for p in cands if p.is_file()), None)
            if pkl is None:
                report.problem(f"{cands[0].name} missing", how)
                continue
            try:
                data = load_pickle(pkl)
                counts = {str(k): len(v) for k, v in data["class_dict"].items()}  # type: ignore[index]
                n = len(data["image_data"])  # type: ignore[index]
            except (ValueError, KeyError, TypeError) as e:
                report.problem(f"{pkl.name}: not a miniImageNet pickle ({e})", how)
                continue
            if len(counts) != MINI_IMAGENET_CLASSES[split] or set(counts.values()) != {600} or n != 600 * len(counts):
                report.problem(
                    f"{pkl.name}: {len(counts)} classes, {n} images (published: {MINI_IMAGENET_CLASSES[split]} "
                    "classes x 600)",
                    how,
                )
            else:
                report.ok(f"{pkl.name}: {len(counts)} classes x 600 images")
        report.note("the pickles publish no checksum: only their structure and sizes are checked")
        reports.append(report)
    return reports


# --- tieredImageNet ---------------------------------------------------------------------------------------


def _tiered_imagenet(root: Path, cache_dir: str | None) -> list[LayoutReport]:
    import numpy as np

    from lightning_meta.datamodules.fewshot_images import load_pickle
    from lightning_meta.datamodules.tiered_imagenet import (
        TIERED_IMAGENET_CLASSES,
        TIERED_IMAGENET_IMAGES,
    )

    folders = [
        f for f in (root, root / "tiered-imagenet") if any(f.glob("*_labels.pkl")) or any(f.glob("*_images_png.pkl"))
    ]
    if not folders:
        return []
    folder = folders[0]
    report = LayoutReport("tieredImageNet (pickles)", folder)
    how = (
        "download Ren et al.'s release (linked from github.com/renmengye/few-shot-ssl-public), or build it from your "
        "ILSVRC-2012 copy: TieredImageNetDataModule(<ilsvrc root>, format='ilsvrc')"
    )
    for split in _SPLITS:
        images, labels = folder / f"{split}_images_png.pkl", folder / f"{split}_labels.pkl"
        for p in (images, labels):
            if not p.is_file():
                report.problem(f"{p.name} missing", how)
        if not labels.is_file():
            continue
        try:
            specific = np.asarray(load_pickle(labels)["label_specific"]).reshape(-1)  # type: ignore[index]
        except (ValueError, KeyError, TypeError) as e:
            report.problem(f"{labels.name}: not a tieredImageNet labels pickle ({e})", how)
            continue
        classes, n = len(np.unique(specific)), len(specific)
        if (classes, n) != (TIERED_IMAGENET_CLASSES[split], TIERED_IMAGENET_IMAGES[split]):
            report.problem(
                f"{labels.name}: {classes} classes, {n} images (published: {TIERED_IMAGENET_CLASSES[split]}, "
                f"{TIERED_IMAGENET_IMAGES[split]})",
                how,
            )
        else:
            report.ok(f"{labels.name}: {classes} classes, {n} images")
    report.note("the images pickles are not opened here (GBs); their length is checked against the labels on load")
    return [report]


# --- CIFAR-100 --------------------------------------------------------------------------------------------


def _cifar100(root: Path, cache_dir: str | None) -> list[LayoutReport]:
    from lightning_meta.datamodules.cifar100 import (
        CIFAR100_FILE_MD5,
        CIFAR100_MD5,
        find_cifar100,
    )

    try:
        sources = find_cifar100(root)
    except FileNotFoundError:
        return []
    report = LayoutReport("CIFAR-100 (python version)", root)
    fix = "delete it and download it again (CIFARFSDataModule(download=True) or www.cs.toronto.edu/~kriz/cifar.html)"
    if len(sources) == 1:
        _md5(report, sources[0], CIFAR100_MD5, "the published cifar-100-python.tar.gz", cache_dir, fix)
    else:
        for path in sources:
            _md5(
                report,
                path,
                CIFAR100_FILE_MD5[path.name],
                f"the published cifar-100-python/{path.name}",
                cache_dir,
                fix,
            )
    return [report]


# --- ILSVRC-2012 training folder --------------------------------------------------------------------------


def _ilsvrc(root: Path, cache_dir: str | None) -> list[LayoutReport]:
    from lightning_meta.datamodules import ilsvrc
    from lightning_meta.datamodules.tiered_imagenet import TIERED_IMAGENET_IMAGES

    try:
        train = ilsvrc.find_ilsvrc_train(root)
    except FileNotFoundError:
        return []
    report = LayoutReport("ILSVRC-2012 training images (source of miniImageNet / tieredImageNet)", train)
    present = {p.name for p in train.iterdir() if p.is_dir() and _SYNSET.match(p.name)}
    report.ok(f"{len(present)} synset folders (the full training set has 1000)")

    @functools.cache
    def count(synset: str) -> int:
        try:
            return len(ilsvrc.synset_images(train, synset))
        except FileNotFoundError:
            return 0

    needed: dict[str, int] = {}
    for split in _SPLITS:
        for s, k in ilsvrc.mini_imagenet_split_rows(split):
            needed[s] = max(needed.get(s, 0), k)
    missing = sorted(s for s in needed if s not in present)
    short = sorted(f"{s} ({count(s)} < {k})" for s, k in needed.items() if s in present and count(s) < k)
    mini_ok = not missing and not short
    totals, missing_t = {}, []
    for split in _SPLITS:
        synsets = [s for s, _ in ilsvrc.tiered_imagenet_split_classes(split)]
        missing_t += [s for s in synsets if s not in present]
        totals[split] = sum(count(s) for s in synsets if s in present)
    tiered_ok = not missing_t and totals == TIERED_IMAGENET_IMAGES
    # a folder that can build one of the two benchmarks is usable: the other one's gaps are a note, not a problem
    flag = report.note if mini_ok or tiered_ok else report.problem
    if mini_ok:
        report.ok("miniImageNet: all 100 synsets present with every image its CSVs index")
    else:
        flag(
            f"miniImageNet: {len(missing)} of its 100 synsets missing (e.g. {missing[:3]}), {len(short)} with fewer "
            f"images than its CSVs index (e.g. {short[:3]})",
            ilsvrc.ILSVRC_HOW_TO_GET,
        )
    if tiered_ok:
        report.ok(f"tieredImageNet: all 608 synsets present, {sum(totals.values())} images as published")
    elif missing_t:
        flag(
            f"tieredImageNet: {len(missing_t)} of its 608 synsets missing (e.g. {missing_t[:3]})",
            ilsvrc.ILSVRC_HOW_TO_GET,
        )
    else:
        flag(
            f"tieredImageNet: {totals} images per split, published {TIERED_IMAGENET_IMAGES}: some synset folders "
            "are incomplete or hold extra files",
            ilsvrc.ILSVRC_HOW_TO_GET,
        )
    return [report]


# --- Meta-Dataset records ---------------------------------------------------------------------------------


def _count_records(path: Path) -> int:
    """Records in a TFRecord file, from the length headers alone (payloads are skipped, not read)."""
    n, size = 0, path.stat().st_size
    with open(path, "rb") as fh:
        pos = 0
        while pos < size:
            head = fh.read(12)
            if len(head) < 12:
                raise ValueError("truncated record header")
            (length,) = struct.unpack("<Q", head[:8])
            pos += 12 + length + 4
            if pos > size:
                raise ValueError("truncated record")
            fh.seek(pos)
            n += 1
    return n


def _meta_dataset(root: Path, cache_dir: str | None) -> list[LayoutReport]:
    from lightning_meta.datamodules.meta_dataset import load_dataset_spec

    specs = [root / "dataset_spec.json"] if (root / "dataset_spec.json").is_file() else sorted(
        root.glob("*/dataset_spec.json"))  # fmt: skip
    reports = []
    for path in specs:
        report = LayoutReport("Meta-Dataset records", path.parent)
        try:
            spec = load_dataset_spec(path.parent)
        except (ValueError, KeyError) as e:
            report.problem(str(e), "convert the source again with Meta-Dataset's conversion scripts")
            reports.append(report)
            continue
        missing, wrong = [], []
        for k in sorted(spec.class_names):
            files = spec.class_files(k)
            if not files or not all(f.is_file() for f in files):
                missing.append(spec.file_pattern.format(k, "*"))
                continue
            try:
                n = sum(_count_records(f) for f in files)
            except ValueError as e:
                wrong.append(f"{files[0].name}: {e}")
                continue
            if n != spec.images_per_class.get(k, n):
                wrong.append(f"class {k}: {n} records, spec says {spec.images_per_class[k]}")
        fix = "convert the source again with Meta-Dataset's conversion scripts"
        if missing:
            report.problem(
                f"{spec.name}: {len(missing)} of {len(spec.class_names)} class files missing (e.g. {missing[:3]})", fix
            )
        if wrong:
            report.problem(
                f"{spec.name}: {len(wrong)} class files disagree with dataset_spec.json (e.g. {wrong[:3]})", fix
            )
        if not missing and not wrong:
            sizes = {s: len(v) for s, v in spec.splits.items()}
            report.ok(
                f"{spec.name}: {len(spec.class_names)} class files, record counts match the spec; classes {sizes}"
            )
        reports.append(report)
    return reports


# --- a folder of class subfolders -------------------------------------------------------------------------


def _image_folder(root: Path, cache_dir: str | None) -> list[LayoutReport]:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    counts = {c.name: sum(1 for f in c.iterdir() if f.suffix.lower() in _IMAGE_EXT and f.is_file()) for c in classes}
    if not counts or not any(counts.values()):
        return []
    report = LayoutReport("image folder (<class>/<image>)", root)
    empty = sorted(c for c, n in counts.items() if n == 0)
    if empty:
        report.problem(f"{len(empty)} class folders hold no images (e.g. {empty[:3]})", "add images or remove them")
    full = [n for n in counts.values() if n]
    report.ok(f"{len(full)} classes with images, {min(full)} to {max(full)} images per class ({sum(full)} in all)")
    return [report]


_DETECTORS: Sequence[Callable[[Path, str | None], list[LayoutReport]]] = (
    _omniglot,
    _mini_imagenet,
    _tiered_imagenet,
    _cifar100,
    _meta_dataset,
    _ilsvrc,
)


def check_root(root: str | Path, cache_dir: str | None = None) -> list[LayoutReport]:
    """Detect and verify every supported layout in ``root`` (a folder of class subfolders only as a fallback).

    Raises:
        FileNotFoundError: when ``root`` is not a folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is not a folder")
    reports = [r for detect in _DETECTORS for r in detect(root, cache_dir)]
    return reports or _image_folder(root, cache_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-meta data check ROOT [--cache-dir DIR]``; returns the exit code (0 ok, 1 problems, 2 unknown)."""
    parser = argparse.ArgumentParser(prog="lightning-meta data", description="Dataset folder tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="detect the dataset layout in ROOT, verify it and say what is missing")
    check.add_argument("root", help="the dataset folder (what you pass as a datamodule's root)")
    check.add_argument("--cache-dir", default=None, help="where file md5s are remembered (default: the store cache)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        reports = check_root(args.root, args.cache_dir)
    except FileNotFoundError as e:
        print(f"error: {e}")
        return 2
    if not reports:
        print(
            f"{args.root}: no supported dataset layout found. Expected one of: Omniglot zips/folders "
            "(images_background[.zip], ...), miniImageNet {train,val,test}.csv + images/ or "
            "mini-imagenet-cache-*.pkl, tieredImageNet *_images_png.pkl + *_labels.pkl, cifar-100-python/, an "
            "ILSVRC-2012 train/<synset>/ folder, Meta-Dataset records (dataset_spec.json), or <class>/<image> folders"
        )
        return 2
    problems = 0
    for r in reports:
        print(f"{r.where}: {r.layout}")
        for f in r.findings:
            print(f"  {f.level:<7} {f.message}")
            if f.fix and f.level != "ok":
                print(f"          fix: {f.fix}")
        problems += len(r.problems)
    print(f"{problems} problem(s)" if problems else "all checks passed")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
