"""miniImageNet and tieredImageNet built from the user's own ILSVRC-2012 training images.

The Google Drive copies of both benchmarks often fail to download; the images are a subset of ILSVRC-2012's
training set, which many users already have. This module reads that set in its official layout
(``train/<synset>/<synset>_<n>.JPEG``, what extracting each per-synset tar of ``ILSVRC2012_img_train.tar``
gives) and selects and resizes the images the way the public generation tools do.

* **miniImageNet** (Ravi & Larochelle's split, 64/16/20 classes x 600 images): the split CSVs ship with
  the package (``splits/mini_imagenet_ravi/{train,val,test}.csv.gz``, the files of
  github.com/twitter-research/meta-learning-lstm ``data/miniImagenet/``, MIT licence, byte-identical and
  md5-checked on read). A row ``n0153282900000005.jpg,n01532829`` names the 5th image of synset
  ``n01532829`` when that synset's files are sorted by the number after the underscore
  (``n01532829_<n>.JPEG``) -- the convention of the tools that build miniImageNet from ILSVRC
  (A. Berenguel's 2017 script, yaoyao-liu/mini-imagenet-tools). Ravi & Larochelle did not publish the
  mapping itself, so the classes are exactly theirs but an image may differ from the one in their
  original folder. Images are resized straight to 84x84 with area averaging (PIL's ``BOX`` filter, the
  equivalent of OpenCV's ``INTER_AREA`` that those tools use).
* **tieredImageNet** (Ren et al. 2018, 351/97/160 classes in 20/6/8 categories): the class lists ship
  with the package (``splits/tiered_imagenet_ren/{train,val,test}.csv``, rows ``<synset>,<category
  synset>``, from github.com/renmengye/few-shot-ssl-public ``fewshot/data/tiered_imagenet_split/``, MIT
  licence). Every training image of each synset is used, resized to 84x84 with bicubic interpolation
  without antialiasing (OpenCV's ``INTER_CUBIC`` of the original code; ``torch``'s bicubic kernel uses
  the same a = -0.75 and half-pixel centres).

ILSVRC-2012 itself may not be redistributed: every error that finds it missing says where to get it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lightning_meta.datamodules.fewshot_images import (
    SPLITS,
    grouped_store,
    thread_count,
)
from lightning_meta.datamodules.store import ClassStore, cached_store
from lightning_meta.progress import progress

__all__ = [
    "ILSVRC2012_TRAIN_TAR_MD5",
    "ILSVRC_HOW_TO_GET",
    "MINI_IMAGENET_SPLIT_MD5",
    "TIERED_IMAGENET_SPLIT_MD5",
    "decode_resized",
    "find_ilsvrc_train",
    "ilsvrc_stores",
    "mini_imagenet_split_rows",
    "parse_mini_imagenet_filename",
    "read_mini_imagenet_ilsvrc",
    "read_tiered_imagenet_ilsvrc",
    "split_file",
    "synset_images",
    "tiered_imagenet_split_classes",
]

SPLITS_DIR = Path(__file__).parent / "splits"
# md5 of the uncompressed CSVs as published (twitter-research/meta-learning-lstm at commit 0cffa24; the same
# files are in yaoyao-liu/mini-imagenet-tools csv_files/ and renmengye/few-shot-ssl-public).
MINI_IMAGENET_SPLIT_MD5 = {
    "train": "9525e1538f67719f18f1936bf8d0782d",
    "val": "ce315ce99b41fbf84fa6acd69315d918",
    "test": "5b89df877c6cbe5d291e43118a2a9591",
}
# md5 of renmengye/few-shot-ssl-public fewshot/data/tiered_imagenet_split/{train,val,test}.csv (commit 4ce8726).
TIERED_IMAGENET_SPLIT_MD5 = {
    "train": "d31866264a7d9e25735ddcc19b25a256",
    "val": "0264f187700d234a93329634cec0cdc8",
    "test": "c3dce8918768c997e1d00ba588079d3d",
}
# Published with the archive (and repeated by yaoyao-liu/mini-imagenet-tools): 138 GB, 1,281,167 images.
ILSVRC2012_TRAIN_TAR_MD5 = "1d675b47d978889d74fa0da5fadfb00e"
ILSVRC_HOW_TO_GET = (
    "ILSVRC-2012 cannot be redistributed: request access at https://image-net.org/download-images (free for "
    "non-commercial research under the ImageNet terms of access), download ILSVRC2012_img_train.tar (138 GB, md5 "
    f"{ILSVRC2012_TRAIN_TAR_MD5}) and extract each per-synset tar inside it into its own folder, so that "
    "<ilsvrc root>/train/<synset>/<synset>_<n>.JPEG (the Kaggle copy's ILSVRC/Data/CLS-LOC/train/ is accepted too)"
)
_MINI_NAME = re.compile(r"^(n\d{8})(\d{8})\.jpg$")
_SYNSET = re.compile(r"^n\d{8}$")
_IMAGE_NUMBER = re.compile(r"_(\d+)\.[A-Za-z]+$")
Dataset = Literal["mini_imagenet", "tiered_imagenet"]


def split_file(dataset: Dataset, split: str, split_dir: str | Path | None = None) -> Path:
    """The split file in use: ``split_dir/<split>.csv`` when given, else the packaged one.

    Raises:
        FileNotFoundError: naming the missing file.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    if split_dir is not None:
        path = Path(split_dir).expanduser() / f"{split}.csv"
        if not path.is_file():
            raise FileNotFoundError(
                f"split file {path} is missing; split_dir must hold train.csv, val.csv and test.csv "
                "(or pass split_dir=None to use the packaged split)"
            )
        return path
    folder = "mini_imagenet_ravi" if dataset == "mini_imagenet" else "tiered_imagenet_ren"
    suffix = ".csv.gz" if dataset == "mini_imagenet" else ".csv"
    return SPLITS_DIR / folder / f"{split}{suffix}"


def _read_text(path: Path, expected_md5: str | None) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if expected_md5 is not None and hashlib.md5(raw, usedforsecurity=False).hexdigest() != expected_md5:
        raise ValueError(
            f"the packaged split file {path} is corrupt (its md5 is not the published {expected_md5}); "
            "reinstall lightning-meta"
        )
    return raw.decode("utf-8")


def parse_mini_imagenet_filename(name: str) -> tuple[str, int]:
    """``"n0153282900000005.jpg"`` -> ``("n01532829", 5)``: the synset and the 1-based image number.

    Raises:
        ValueError: naming the filename when it is not ``<synset><8-digit number>.jpg``.
    """
    m = _MINI_NAME.match(name)
    if m is None or int(m.group(2)) < 1:
        raise ValueError(
            f"{name!r} is not a miniImageNet filename of the form <synset><8-digit image number>.jpg, "
            "e.g. n0153282900000005.jpg"
        )
    return m.group(1), int(m.group(2))


def mini_imagenet_split_rows(split: str, split_dir: str | Path | None = None) -> list[tuple[str, int]]:
    """``(synset, image number)`` for every row of a Ravi & Larochelle CSV, in file order.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        split_dir: a folder of ``{train,val,test}.csv`` in the same format to use instead of the
            packaged files (which are checked against the published md5s).

    Raises:
        ValueError: naming the file and line of a malformed row, or a row whose label is not the
            synset its filename encodes.
    """
    path = split_file("mini_imagenet", split, split_dir)
    text = _read_text(path, MINI_IMAGENET_SPLIT_MD5[split] if split_dir is None else None)
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["filename", "label"]:
        raise ValueError(f"{path} must start with the header 'filename,label' (Ravi & Larochelle's format)")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < 2:
            raise ValueError(f"{path}, line {line}: {row!r} is not 'filename,label'")
        try:
            synset, number = parse_mini_imagenet_filename(row[0].strip())
        except ValueError as e:
            raise ValueError(f"{path}, line {line}: {e}") from None
        if row[1].strip() != synset:
            raise ValueError(f"{path}, line {line}: label {row[1].strip()!r} is not the synset {synset} of {row[0]!r}")
        out.append((synset, number))
    return out


def tiered_imagenet_split_classes(split: str, split_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """``(synset, category synset)`` of every class of a tieredImageNet split, in file order.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        split_dir: a folder of ``{train,val,test}.csv`` with rows ``<synset>,<category synset>`` to use
            instead of the packaged files (which are checked against the published md5s).
    """
    path = split_file("tiered_imagenet", split, split_dir)
    text = _read_text(path, TIERED_IMAGENET_SPLIT_MD5[split] if split_dir is None else None)
    out = []
    for line, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row:
            continue
        if len(row) < 2 or not _SYNSET.match(row[0].strip()) or not _SYNSET.match(row[1].strip()):
            raise ValueError(
                f"{path}, line {line}: {row!r} is not '<synset>,<category synset>' (e.g. n01530575,n01524359)"
            )
        out.append((row[0].strip(), row[1].strip()))
    return out


def find_ilsvrc_train(root: str | Path) -> Path:
    """The folder of per-synset folders: ``root/train``, ``root/ILSVRC/Data/CLS-LOC/train`` or ``root`` itself.

    Raises:
        FileNotFoundError: when none of them holds ``n########`` folders, saying where to get ILSVRC-2012.
    """
    root = Path(root).expanduser()
    for cand in (root / "train", root / "ILSVRC" / "Data" / "CLS-LOC" / "train", root):
        if cand.is_dir() and any(p.is_dir() and _SYNSET.match(p.name) for p in cand.iterdir()):
            return cand
    raise FileNotFoundError(
        f"no ILSVRC-2012 training folders (train/<synset>/) under {str(root)!r}. {ILSVRC_HOW_TO_GET}"
    )


def synset_images(train_dir: Path, synset: str) -> list[Path]:
    """The images of one synset folder sorted by their number (``<synset>_<n>.JPEG``, ``n`` compared as an integer).

    Raises:
        FileNotFoundError: when the folder is missing or holds no ``<synset>_<n>.<ext>`` files.
    """
    folder = train_dir / synset
    if not folder.is_dir():
        raise FileNotFoundError(f"synset folder {folder} is missing. {ILSVRC_HOW_TO_GET}")
    numbered = []
    for p in folder.iterdir():
        m = _IMAGE_NUMBER.search(p.name)
        if m and p.name.startswith(f"{synset}_") and p.is_file():
            numbered.append((int(m.group(1)), p.name, p))
    if not numbered:
        raise FileNotFoundError(
            f"{folder} holds no {synset}_<n>.JPEG images: extract {synset}.tar from ILSVRC2012_img_train.tar into it"
        )
    return [p for _, _, p in sorted(numbered)]


def _missing_synsets(train_dir: Path, synsets: Sequence[str], what: str) -> None:
    missing = [s for s in dict.fromkeys(synsets) if not (train_dir / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(set(synsets))} synsets of {what} are missing from {train_dir} "
            f"(e.g. {missing[:5]}). {ILSVRC_HOW_TO_GET}"
        )


def _resize_area(im, size: int):
    from PIL import Image

    return im.resize((size, size), resample=Image.Resampling.BOX)


def _resize_bicubic(arr: np.ndarray, size: int) -> Tensor:
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float()
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=False)
    return y[0].round_().clamp_(0, 255).to(torch.uint8)


def decode_resized(paths: Sequence[Path], size: int, method: Literal["area", "bicubic"]) -> Tensor:
    """Decode images to RGB uint8 ``(n, 3, size, size)``, resized straight to a square, in parallel threads.

    ``"area"`` averages the source pixels under each output pixel (miniImageNet's tools); ``"bicubic"``
    is plain bicubic interpolation, no antialiasing (tieredImageNet's code).

    Raises:
        ValueError: naming a file that does not decode.
    """
    from PIL import Image, UnidentifiedImageError

    if method not in ("area", "bicubic"):
        raise ValueError(f"method={method!r} must be 'area' or 'bicubic'")
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)

    def work(i: int) -> None:
        try:
            with Image.open(paths[i]) as im:
                im = im.convert("RGB")
                if method == "area":
                    arr = np.asarray(_resize_area(im, size) if im.size != (size, size) else im, dtype=np.uint8)
                    out[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
                else:
                    out[i] = _resize_bicubic(np.asarray(im, dtype=np.uint8).copy(), size)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(
                f"cannot decode image {str(paths[i])!r} ({e}); the file is corrupt: extract it again"
            ) from e

    with ThreadPoolExecutor(thread_count()) as pool:
        list(progress(pool.map(work, range(len(paths))), "decoding ILSVRC images", total=len(paths)))
    return out


def read_mini_imagenet_ilsvrc(
    train_dir: Path, rows: Sequence[tuple[str, int]], image_size: int = 84, *, what: str = "miniImageNet"
) -> ClassStore:
    """Build a miniImageNet split from ILSVRC training folders.

    Args:
        train_dir: the folder of synset folders (see :func:`find_ilsvrc_train`).
        rows: ``(synset, 1-based image number)`` per image (:func:`mini_imagenet_split_rows`).
        image_size: side of the square output images (84 in every reference).
        what: the split's name, for errors.

    Returns:
        The split's store: classes are the synsets (sorted), images in row order within a class.

    Raises:
        FileNotFoundError: naming missing synset folders, or a synset with fewer images than a row needs.
    """
    _missing_synsets(train_dir, [s for s, _ in rows], what)
    listing: dict[str, list[Path]] = {}
    paths = []
    for synset, number in rows:
        if synset not in listing:
            listing[synset] = synset_images(train_dir, synset)
        files = listing[synset]
        if number > len(files):
            raise FileNotFoundError(
                f"{what} needs image {number} of synset {synset} (in the order of <n> in {synset}_<n>.JPEG) but "
                f"{train_dir / synset} holds only {len(files)} images: the folder is incomplete; extract {synset}.tar "
                f"from ILSVRC2012_img_train.tar again (md5 {ILSVRC2012_TRAIN_TAR_MD5})"
            )
        paths.append(files[number - 1])
    labels = [s for s, _ in rows]
    return grouped_store(labels, lambda order: decode_resized([paths[i] for i in order], image_size, "area"))


def read_tiered_imagenet_ilsvrc(
    train_dir: Path, synsets: Sequence[str], image_size: int = 84, *, what: str = "tieredImageNet"
) -> ClassStore:
    """Build a tieredImageNet split from ILSVRC training folders: every image of every listed synset.

    Returns:
        The split's store: classes are the synsets (sorted), images in numeric file order within a class.

    Raises:
        FileNotFoundError: naming missing synset folders.
    """
    _missing_synsets(train_dir, synsets, what)
    paths, labels = [], []
    for synset in synsets:
        files = synset_images(train_dir, synset)
        paths += files
        labels += [synset] * len(files)
    return grouped_store(labels, lambda order: decode_resized([paths[i] for i in order], image_size, "bicubic"))


def ilsvrc_stores(
    dataset: Dataset,
    root: str | Path,
    *,
    image_size: int = 84,
    split_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, ClassStore]:
    """The three split stores of miniImageNet or tieredImageNet built from ILSVRC-2012, each cached.

    The cache key covers the split file and the listing (names, sizes, times) of every synset folder used,
    so an added or replaced image rebuilds the store.

    Args:
        dataset: ``"mini_imagenet"`` or ``"tiered_imagenet"``.
        root: the ILSVRC-2012 folder (see :func:`find_ilsvrc_train`).
        image_size: side of the square images.
        split_dir: a folder of split CSVs to use instead of the packaged ones.
        cache_dir: the store cache folder (see :func:`~lightning_meta.datamodules.store.cached_store`).
    """
    if dataset not in ("mini_imagenet", "tiered_imagenet"):
        raise ValueError(f"dataset={dataset!r} must be 'mini_imagenet' or 'tiered_imagenet'")
    train_dir = find_ilsvrc_train(root)
    stores = {}
    for split in SPLITS:
        name = f"{dataset}-ilsvrc-{split}-{image_size}"
        what = f"{'miniImageNet' if dataset == 'mini_imagenet' else 'tieredImageNet'}'s {split} split"
        if dataset == "mini_imagenet":
            rows = mini_imagenet_split_rows(split, split_dir)
            synsets = list(dict.fromkeys(s for s, _ in rows))
            build = partial(read_mini_imagenet_ilsvrc, train_dir, rows, image_size, what=what)
        else:
            synsets = [s for s, _ in tiered_imagenet_split_classes(split, split_dir)]
            build = partial(read_tiered_imagenet_ilsvrc, train_dir, synsets, image_size, what=what)
        _missing_synsets(train_dir, synsets, what)  # before hashing the folders, with the helpful message
        sources = [split_file(dataset, split, split_dir), *(train_dir / s for s in synsets)]
        stores[split] = cached_store(name, sources, build, cache_dir)
    return stores
