"""Reading CIFAR-100's python release (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009).

The files torchvision reads: ``cifar-100-python/{train,test,meta}``, pickled dicts with ``data`` (uint8
``[n, 3072]``, channel planes of 32x32), ``fine_labels``, ``coarse_labels`` and, in ``meta``,
``fine_label_names`` / ``coarse_label_names``. The archive ``cifar-100-python.tar.gz`` is read in place.
Used by :mod:`lightning_meta.datamodules.cifar` (CIFAR-FS and FC100).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_meta.datamodules.checksums import check_md5
from lightning_meta.datamodules.safe_pickle import UnsafePickleError, load_dataset_pickle

__all__ = [
    "CIFAR100_FILE_MD5",
    "CIFAR100_MD5",
    "CIFAR100_URL",
    "CIFAR100Data",
    "check_cifar100",
    "find_cifar100",
    "read_cifar100",
]  # fmt: skip

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
# The archive's md5 is published on https://www.cs.toronto.edu/~kriz/cifar.html; it and the md5s of the three
# extracted files are the ones torchvision's CIFAR100 checks.
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_FILE_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
_ARCHIVE = "cifar-100-python.tar.gz"
_FOLDER = "cifar-100-python"
_FILES = ("train", "test", "meta")


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
        return [
            f"{self.coarse_names[coarse_of[i]]}/{name}" if i in coarse_of else name
            for i, name in enumerate(self.fine_names)
        ]


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
        try:
            download_and_extract_archive(CIFAR100_URL, download_root=root, filename=_ARCHIVE, md5=CIFAR100_MD5)
        except OSError as err:  # URLError, timeouts, refused connections: no network
            raise RuntimeError(
                f"downloading CIFAR-100 failed ({type(err).__name__}: {err}); without network access, fetch "
                f"{CIFAR100_URL} (md5 {CIFAR100_MD5}) elsewhere and place {_ARCHIVE} in {Path(root).resolve()}/ "
                "(it is read without extracting; download=False is then enough)"
            ) from err
        return find_cifar100(root, download=False)
    partial = [
        str(root / _FOLDER / f) for f in _FILES if (root / _FOLDER).is_dir() and not (root / _FOLDER / f).is_file()
    ]
    raise FileNotFoundError(
        f"CIFAR-100 not found under {str(root)!r}"
        + (f" (missing {partial})" if partial else "")
        + f": expected {_FOLDER}/train, {_FOLDER}/test and {_FOLDER}/meta (torchvision's layout) or the archive "
        f"{_ARCHIVE} there. Pass download=True to fetch it from {CIFAR100_URL}, or download and place it yourself."
    )


def check_cifar100(sources: Sequence[Path], *, verify: bool = False, cache_dir: str | Path | None = None) -> bool:
    """Compare what :func:`find_cifar100` returned with the published md5s (each file hashed once, then cached).

    A mismatch warns (:class:`~lightning_meta.datamodules.checksums.ChecksumMismatchWarning`), naming the
    file and the expected md5, or raises ``ValueError`` when ``verify``.

    Returns:
        Whether every file matches.
    """
    if len(sources) == 1:
        expected = {sources[0]: (CIFAR100_MD5, f"the CIFAR-100 python archive ({CIFAR100_URL})")}
    else:
        expected = {
            path: (CIFAR100_FILE_MD5[f], f"CIFAR-100's '{_FOLDER}/{f}' (extracted from {CIFAR100_URL})")
            for f, path in zip(_FILES, sources)
        }
    ok = [check_md5(p, md5, what=what, verify=verify, cache_dir=cache_dir) for p, (md5, what) in expected.items()]
    return all(ok)


def _unpickle(stream: Any, name: str) -> dict:
    try:
        obj = load_dataset_pickle(stream, name)  # Python 2 pickles; refuses anything but arrays and containers
    except UnsafePickleError:
        raise
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
