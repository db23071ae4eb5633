"""The class-indexed tensor store: decoded images grouped by class, cached on disk.

Every image datamodule decodes its raw files once into a :class:`ClassStore` (uint8 ``(n, C, H, W)``
rows grouped by class plus the row offsets of each class); episode sampling is then tensor
indexing. :func:`cached_store` keys the decoded store by the checksums of its source files and
keeps it in a cache folder (never next to the data, which may be read-only or shared).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["ClassStore", "cached_store", "default_cache_dir", "file_digest", "remembered_file_hash"]

CACHE_ENV = "LIGHTNING_META_CACHE"


@dataclass
class ClassStore:
    """Images grouped by class.

    Attributes:
        images: uint8 ``(n, C, H, W)``; the rows of class ``c`` are ``images[offsets[c]:offsets[c + 1]]``.
        offsets: long ``(num_classes + 1,)``, non-decreasing, ``offsets[0] == 0``, ``offsets[-1] == n``.
        class_names: one unique name per class, in store order.

    Example:
        >>> s = ClassStore.from_labeled(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), ["b", "a", "b", "a", "a"])
        >>> s.class_names, s.counts().tolist()
        (['a', 'b'], [3, 2])
        >>> s.select(["b"]).num_classes
        1
    """

    images: Tensor
    offsets: Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        self.class_names = [str(c) for c in self.class_names]
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (n, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}; "
                "decode to uint8 and add the channel dimension"
            )
        if self.offsets.dim() != 1 or self.offsets.numel() != len(self.class_names) + 1:
            raise ValueError(
                f"offsets has shape {tuple(self.offsets.shape)} but there are {len(self.class_names)} classes; "
                "offsets must have num_classes + 1 entries"
            )
        self.offsets = self.offsets.long()
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != len(self.images):
            raise ValueError(
                f"offsets must start at 0 and end at n={len(self.images)}, got {int(self.offsets[0])}..{int(self.offsets[-1])}"
            )
        if bool((self.offsets[1:] < self.offsets[:-1]).any()):
            raise ValueError("offsets must be non-decreasing")
        if len(set(self.class_names)) != len(self.class_names):
            dup = sorted({c for c in self.class_names if self.class_names.count(c) > 1})
            raise ValueError(f"class names must be unique, duplicated: {dup[:5]}")

    @classmethod
    def from_labeled(cls, images: Tensor, labels: Sequence, class_names: Sequence[str] | None = None) -> ClassStore:
        """Group labelled rows by class (stable: rows of a class keep their input order).

        Args:
            images: uint8 ``(n, C, H, W)``.
            labels: ``n`` labels (strings, ints or a tensor); a label's class name is ``str(label)``.
            class_names: the class order of the store; it must name exactly the labels present.
                Default: the sorted distinct labels.
        """
        if isinstance(labels, Tensor):
            labels = labels.tolist()
        names_of_rows = [str(x) for x in labels]
        if len(names_of_rows) != len(images):
            raise ValueError(f"got {len(images)} images but {len(names_of_rows)} labels; pass one label per image")
        present = set(names_of_rows)
        if class_names is None:
            raw = sorted(set(labels), key=lambda x: (str(type(x)), x))
            order = [str(x) for x in raw]
        else:
            order = [str(c) for c in class_names]
            missing = [c for c in order if c not in present]
            extra = sorted(present - set(order))
            if missing or extra:
                raise ValueError(
                    f"class_names does not match the labels: {len(missing)} named classes have no images "
                    f"(e.g. {missing[:5]}) and {len(extra)} labels are not named (e.g. {extra[:5]}); "
                    "pass class_names listing exactly the labels present"
                )
        index = {c: k for k, c in enumerate(order)}
        codes = torch.tensor([index[c] for c in names_of_rows], dtype=torch.long)
        perm = torch.argsort(codes, stable=True)
        counts = torch.bincount(codes, minlength=len(order))
        offsets = torch.zeros(len(order) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(counts, 0)
        return cls(images[perm].contiguous(), offsets, order)

    @classmethod
    def concat(cls, stores: Sequence[ClassStore]) -> ClassStore:
        """Concatenate stores with disjoint class names (images must share ``C, H, W``)."""
        if len(stores) == 0:
            raise ValueError("concat needs at least one store")
        shapes = {tuple(s.images.shape[1:]) for s in stores}
        if len(shapes) != 1:
            raise ValueError(f"stores have different image shapes {sorted(shapes)}; resize them to one shape first")
        offsets = [torch.zeros(1, dtype=torch.long)]
        base = 0
        for s in stores:
            offsets.append(s.offsets[1:] + base)
            base += len(s.images)
        names = [c for s in stores for c in s.class_names]
        return cls(torch.cat([s.images for s in stores]), torch.cat(offsets), names)

    def select(self, names: Sequence[str]) -> ClassStore:
        """A new store holding the named classes, in the given order.

        Raises:
            ValueError: naming the unknown classes (a few and their count).
        """
        index = {c: k for k, c in enumerate(self.class_names)}
        unknown = [n for n in names if str(n) not in index]
        if unknown:
            raise ValueError(
                f"{len(unknown)} classes are not in the store (e.g. {[str(u) for u in unknown[:5]]}); "
                f"the store has {self.num_classes} classes such as {self.class_names[:3]}"
            )
        ks = [index[str(n)] for n in names]
        rows = [torch.arange(int(self.offsets[k]), int(self.offsets[k + 1])) for k in ks]
        counts = torch.tensor([len(r) for r in rows], dtype=torch.long)
        offsets = torch.zeros(len(ks) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(counts, 0)
        idx = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        return ClassStore(self.images[idx].contiguous(), offsets, [str(n) for n in names])

    def counts(self) -> Tensor:
        """Examples per class, long ``(num_classes,)``."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def save(self, path: str | os.PathLike) -> None:
        """Write the store with ``torch.save`` (plain tensors and a list of strings)."""
        torch.save({"images": self.images, "offsets": self.offsets, "class_names": list(self.class_names)}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassStore:
        """Read a store written by :meth:`save` (``weights_only=True``, so no code runs on load)."""
        d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(d["images"], d["offsets"], list(d["class_names"]))


def default_cache_dir() -> Path:
    """The store cache folder: env ``LIGHTNING_META_CACHE``, else the user cache dir + ``lightning_meta``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("lightning_meta", appauthor=False))


_DIGESTS: dict[tuple, str] = {}
#: the record of file sha256s in the cache folder (see :func:`file_digest`)
DIGEST_RECORD = "file-sha256.json"


def file_digest(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """A hex sha256 identifying a source.

    For a file, the sha256 of its bytes, computed once per (resolved path, size, mtime_ns): memoised in the process
    and remembered in ``<cache_dir>/file-sha256.json``, so a later process does not read an unchanged file again
    (tieredImageNet's sources are 12 GB); a file whose size or modification time changed is hashed again. For a
    folder, the sha256 of its sorted recursive listing of ``(relative path, size, mtime_ns)`` of
    its files and the relative paths of its subfolders:
    decoding a folder of thousands of images is what the cache avoids, so the folder's digest
    does not read every byte; any added, removed, resized or touched file changes it.

    Args:
        path: the file or folder.
        cache_dir: the folder of the record (default :func:`default_cache_dir`); where it cannot be written the
            digest is still returned, only not remembered.

    Raises:
        FileNotFoundError: naming the missing path.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"source {p} does not exist")
    if p.is_dir():
        h = hashlib.sha256(b"dir\0")
        for f in sorted(p.rglob("*")):
            rel = f.relative_to(p).as_posix()
            if f.is_dir():  # folders count too: an added empty class folder must change the key
                h.update(f"{rel}/\n".encode())
                continue
            st = f.stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    return remembered_file_hash(p, "sha256", DIGEST_RECORD, cache_dir)


def remembered_file_hash(
    path: str | os.PathLike, algorithm: str, record: str, cache_dir: str | os.PathLike | None = None
) -> str:
    """The hex ``algorithm`` digest of a file's bytes, computed once per (resolved path, size, mtime_ns).

    A digest is memoised in the process and remembered in the JSON record ``<cache_dir>/<record>`` (entries
    ``{path: {"stamp": [size, mtime_ns], algorithm: hex}}``), so a later process does not read an unchanged file
    again; a file whose size or modification time changed is hashed again, and a missing, damaged or malformed
    record or entry is ignored (recomputed, never trusted). The record is replaced atomically and is readable like
    the stores of a shared cache. :func:`file_digest` (sha256) and
    :func:`~lightning_meta.datamodules.checksums.file_md5` (md5) keep their records this way.

    Args:
        path: the file.
        algorithm: a fixed-length :mod:`hashlib` algorithm, e.g. ``"sha256"`` or ``"md5"``.
        record: the record's file name in ``cache_dir``, e.g. ``"file-sha256.json"``.
        cache_dir: the folder of the record (default :func:`default_cache_dir`); where it cannot be written the
            digest is still returned, only not remembered.

    Raises:
        ValueError: naming an algorithm that :mod:`hashlib` lacks or whose digest length is not fixed, or a
            ``record`` that is not a plain file name.
        FileNotFoundError: for a missing file.

    Example:
        >>> import hashlib, tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / "blob").write_bytes(b"abc")
        3
        >>> remembered_file_hash(folder / "blob", "md5", "file-md5.json", folder) == hashlib.md5(b"abc").hexdigest()
        True
        >>> sorted(json.loads((folder / "file-md5.json").read_text()).popitem()[1])
        ['md5', 'stamp']
    """
    try:
        size = hashlib.new(algorithm, usedforsecurity=False).digest_size
    except (ValueError, TypeError):
        size = 0
    if not size:  # unknown, or a variable-length shake_* (whose hexdigest needs a length)
        raise ValueError(f"algorithm={algorithm!r} is not a fixed-length hashlib algorithm; use e.g. 'sha256' or 'md5'")
    if not record or Path(record).name != record or record in (".", ".."):
        raise ValueError(f"record={record!r} must be a plain file name inside cache_dir, e.g. 'file-{algorithm}.json'")
    p = Path(path).resolve()
    st = p.stat()
    key = (algorithm, str(p), st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    record_path = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / record
    entry = _read_record(record_path).get(key[1])
    stamp = [key[2], key[3]]
    if isinstance(entry, dict) and entry.get("stamp") == stamp and _is_hex(entry.get(algorithm), 2 * size):
        _DIGESTS[key] = entry[algorithm]
        return _DIGESTS[key]
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    _DIGESTS[key] = h.hexdigest()
    _remember(record_path, key[1], {"stamp": stamp, algorithm: _DIGESTS[key]})
    return _DIGESTS[key]


def _is_hex(value: object, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)


def _read_record(path: Path) -> dict:
    try:
        with open(path) as fh:
            record = json.load(fh)
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or corrupt: digests are recomputed, never trusted blindly


def _remember(record_path: Path, name: str, entry: dict) -> None:
    """Add ``entry`` under ``name`` to the JSON record, atomically (readers never see a partial file)."""
    try:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record = _read_record(record_path)  # re-read: another process may have added entries meanwhile
        record[name] = entry
        fd, tmp = tempfile.mkstemp(dir=record_path.parent, prefix=f".{record_path.stem}-", suffix=".tmp")
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # readable like the stores of a shared cache (mkstemp makes 0600)
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
            os.replace(tmp, record_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass  # a read-only cache: correct, only slower next time


def cached_store(
    name: str,
    sources: Sequence[str | os.PathLike],
    build: Callable[[], ClassStore],
    cache_dir: str | os.PathLike | None = None,
    *,
    version: str = "1",
) -> ClassStore:
    """Load a decoded store from the cache, or build it and cache it.

    The cache file is ``<cache_dir>/<name>-<key>.pt`` with ``key`` a sha256 of ``name``,
    ``version`` and the :func:`file_digest` of every source (remembered in the same folder); it is
    written atomically (temporary file in the cache folder, then ``os.replace``), so concurrent
    builders (DDP ranks, workers) never read a partial file.

    Args:
        name: a file-name-safe name of what is built, including anything that changes the result
            (e.g. ``"omniglot-28"``).
        sources: the raw files/folders the store is decoded from.
        build: decodes the sources into a store (called only on a cache miss).
        cache_dir: default :func:`default_cache_dir`.
        version: bump it when the decoding code changes.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    h = hashlib.sha256(f"{name}\0{version}\0".encode())
    for s in sources:
        h.update(file_digest(s, folder).encode())
    path = folder / f"{name}-{h.hexdigest()[:20]}.pt"
    if path.exists():
        try:
            return ClassStore.load(path)
        except Exception:  # a corrupt cache entry is rebuilt, never trusted
            pass
    store = build()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}-", suffix=".tmp")
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a shared cache should be readable like any file
        store.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return store
