"""No code runs from a dataset pickle: every reader refuses a command-running payload, official layouts
(Python 3 and Python-2-style pickles) still load, and published checksums are checked once and cached."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import subprocess
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_meta.datamodules import cifar100 as c100
from lightning_meta.datamodules.checksums import (
    ChecksumMismatchWarning,
    check_md5,
    file_md5,
)
from lightning_meta.datamodules.cifar import CIFARFSDataModule
from lightning_meta.datamodules.features import LEOEmbeddingDataModule
from lightning_meta.datamodules.mini_imagenet import MiniImageNetDataModule
from lightning_meta.datamodules.safe_pickle import (
    UnsafePickleError,
    load_dataset_pickle,
)
from lightning_meta.datamodules.tiered_imagenet import TieredImageNetDataModule
from tests._tiny_data import SUPERCLASSES

SPLITS = ("train", "val", "test")
EPISODES = {"ways": 3, "shots": 1, "queries": 1, "tasks_per_batch": 1, "train_episodes": 2, "val_episodes": 2,
            "test_episodes": 2}  # fmt: skip


# --- payloads ---------------------------------------------------------------------------------------------


class Payload:
    """Pickles as ``fn(*args)``: what a tampered dataset file would contain."""

    def __init__(self, fn, args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _touch_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


PAYLOADS = {
    "os.system": lambda m: Payload(os.system, (f"touch '{m}'",)),
    "subprocess.call": lambda m: Payload(subprocess.call, (["touch", str(m)],)),
    "builtins.eval": lambda m: Payload(eval, (_touch_code(m),)),
    "builtins.exec": lambda m: Payload(exec, (_touch_code(m),)),
}
REFUSED_GLOBAL = {"os.system": f"{os.system.__module__}.system", "subprocess.call": "subprocess.call",
                  "builtins.eval": "builtins.eval", "builtins.exec": "builtins.exec"}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_payloads_are_live_under_plain_pickle(tmp_path: Path, kind: str) -> None:
    """The payloads do run a command when loaded with pickle.load, so the refusals below mean something."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps({"image_data": PAYLOADS[kind](marker)}))
    assert marker.exists()


# --- Python-2-style pickles, written opcode by opcode -----------------------------------------------------


def py2_dumps(obj) -> bytes:
    """Protocol 2 as Python 2's cPickle with numpy 1.x wrote it; Python ``bytes`` stand for Python 2 ``str``.

    Written from the opcode table (pickletools), independently of the code under test: ``str`` is
    BINUNICODE (Python 2 ``unicode``), ``bytes`` SHORT_BINSTRING/BINSTRING, arrays
    ``numpy.core.multiarray._reconstruct`` + a BUILD state holding the raw buffer as a byte string.
    """
    out = io.BytesIO()
    out.write(b"\x80\x02")

    def pstr(b: bytes) -> None:
        out.write(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b)

    def dtype(dt: np.dtype) -> None:
        out.write(b"cnumpy\ndtype\n")
        pstr(dt.str[1:].encode())  # e.g. 'u1', 'i8', 'f4'
        out.write(b"K\x00K\x01\x87R(K\x03")
        pstr(b"|" if dt.itemsize == 1 else b"<")
        out.write(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")

    def emit(x) -> None:
        if isinstance(x, dict):
            out.write(b"}(")
            for k, v in x.items():
                emit(k)
                emit(v)
            out.write(b"u")
        elif isinstance(x, list):
            out.write(b"](")
            for v in x:
                emit(v)
            out.write(b"e")
        elif isinstance(x, tuple):
            out.write(b"(")
            for v in x:
                emit(v)
            out.write(b"t")
        elif isinstance(x, bytes):
            pstr(x)
        elif isinstance(x, str):
            b = x.encode("utf-8")
            out.write(b"X" + struct.pack("<I", len(b)) + b)
        elif isinstance(x, (bool, np.bool_)):
            out.write(b"\x88" if x else b"\x89")
        elif isinstance(x, (int, np.integer)):
            out.write(b"J" + struct.pack("<i", int(x)))
        elif isinstance(x, float):
            out.write(b"G" + struct.pack(">d", x))
        elif isinstance(x, np.ndarray):
            assert x.dtype.kind in "uif" and x.flags.c_contiguous
            out.write(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85")
            pstr(b"b")
            out.write(b"\x87R(K\x01")
            emit(tuple(x.shape))
            dtype(x.dtype)
            out.write(b"\x89")
            pstr(x.astype(x.dtype.newbyteorder("<")).tobytes())
            out.write(b"tb")
        else:
            raise TypeError(type(x))

    emit(obj)
    out.write(b".")
    return out.getvalue()


def test_py2_writer_matches_what_python2_wrote() -> None:
    """The crafted pickle names numpy 1.x globals, stores byte strings as BINSTRING, and stdlib pickle agrees."""
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    blob = py2_dumps({b"data": a, b"names": [b"caf\xe9"], "u": "x"})
    ops = [(op.name, arg) for op, arg, _ in __import__("pickletools").genops(blob)]
    assert ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops and ("SHORT_BINSTRING", "data") in ops
    ref = pickle.loads(blob, encoding="latin1")  # the stdlib unpickler, unrestricted
    assert ref["data"].tolist() == a.tolist() and ref["names"] == ["caf\xe9"] and ref["u"] == "x"


@pytest.mark.parametrize("encoding", ["latin1", "bytes"])
def test_python2_pickles_load_like_stdlib(encoding: str) -> None:
    obj = {b"data": np.arange(3072 * 2, dtype=np.int64).astype(np.uint8).reshape(2, 3072),
           b"fine_labels": [3, 99], b"batch_label": b"training batch 1 of 1", b"png": b"\x89PNG\r\n\x1a\n\xff"}  # fmt: skip
    blob = py2_dumps(obj)
    got = load_dataset_pickle(io.BytesIO(blob), "py2.pkl", encoding=encoding)
    ref = pickle.loads(blob, encoding=encoding)
    assert got.keys() == ref.keys()
    key = (lambda k: k.encode()) if encoding == "bytes" else (lambda k: k)
    assert np.array_equal(got[key("data")], obj[b"data"]) and got[key("data")].dtype == np.uint8
    assert got[key("fine_labels")] == [3, 99] and got[key("png")] == ref[key("png")]


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_python3_pickles_of_every_protocol_load(protocol: int) -> None:
    """numpy 2 writes numpy._core globals; protocol 5 arrays go through _frombuffer; bytes at <=2 via _codecs."""
    obj = {"image_data": np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3), "f": np.float32(1.5), "i": np.int64(7),
           "class_dict": {"n1": [0, 1]}, "raw": b"\x00\xff", "empty": b"", "ba": bytearray(b"\x01"),
           "keys": np.array(["1-n1-a.jpg"]), "skeys": np.array([b"1-n1-a.jpg"]), "emb": np.ones((2, 3), np.float32).T}  # fmt: skip
    got = load_dataset_pickle(io.BytesIO(pickle.dumps(obj, protocol=protocol)), "p.pkl")
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(got[k], v) and got[k].dtype == v.dtype
        else:
            assert got[k] == v and type(got[k]) is type(v)


def test_numpy1_module_names_in_python3_pickles_load() -> None:
    blob = pickle.dumps(np.arange(4, dtype=np.int16), protocol=2).replace(
        b"numpy._core.multiarray", b"numpy.core.multiarray"
    )
    assert b"numpy.core.multiarray" in blob
    assert load_dataset_pickle(io.BytesIO(blob), "old.pkl").tolist() == [0, 1, 2, 3]


# --- refusals of the unpickler itself ---------------------------------------------------------------------


def test_refusal_names_file_and_global(tmp_path: Path) -> None:
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    marker = tmp_path / "ran"
    path.write_bytes(pickle.dumps({"image_data": PAYLOADS["builtins.eval"](marker)}))
    with pytest.raises(UnsafePickleError, match=r"mini-imagenet-cache-train\.pkl: refused .*'builtins\.eval'") as e:
        load_dataset_pickle(path)
    assert e.value.source == str(path) and e.value.global_name == "builtins.eval"
    assert not marker.exists()


@pytest.mark.parametrize(
    "blob, refused",
    [
        (b"cos\nsystem\n(S'true'\ntR.", "os.system"),  # protocol 0 GLOBAL + REDUCE
        (b"(S'true'\nios\nsystem\n.", "os.system"),  # protocol 0 INST (calls without REDUCE)
        (b"\x80\x02cnumpy\nload\nq\x00.", "numpy.load"),  # numpy, but not an array constructor
        (b"\x80\x02c__builtin__\ngetattr\nq\x00.", "__builtin__.getattr"),  # Python 2 module name
        (b"\x80\x02ccopy_reg\n_reconstructor\nq\x00.", "copy_reg._reconstructor"),
        (b"\x80\x02c_codecs\nencode\nX\x04\x00\x00\x00abcdX\x05\x00\x00\x00rot13\x86R.", "_codecs.encode"),
        # numpy.ndarray called directly: an object array whose pointers are the file's bytes
        (
            b"\x80\x02cnumpy\nndarray\nK\x01\x85cnumpy\ndtype\nU\x02O8K\x00K\x01\x87RC\x08AAAAAAAA\x87R.",
            "numpy.ndarray",
        ),
        # _reconstruct of a type other than ndarray
        (
            b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85U\x01b\x87R.",
            "numpy.core.multiarray._reconstruct",
        ),
    ],
)
def test_crafted_opcodes_are_refused(blob: bytes, refused: str) -> None:
    with pytest.raises(UnsafePickleError, match=r"crafted\.pkl") as e:
        load_dataset_pickle(io.BytesIO(blob), "crafted.pkl")
    assert e.value.global_name == refused


def test_persistent_ids_and_extension_codes_are_refused() -> None:
    with pytest.raises(UnsafePickleError, match="persistent id"):
        load_dataset_pickle(io.BytesIO(b"\x80\x02X\x01\x00\x00\x00xQ."), "pid.pkl")
    import copyreg

    copyreg.add_extension("os", "system", 0x7FF0)  # an extension code only resolves through find_class
    try:
        with pytest.raises(UnsafePickleError) as e:
            load_dataset_pickle(io.BytesIO(b"\x80\x02\x83\xf0\x7f."), "ext.pkl")
        assert e.value.global_name == "os.system"
    finally:
        copyreg.remove_extension("os", "system", 0x7FF0)


# --- every reader, through its datamodule ----------------------------------------------------------------


def _png(rng: np.random.Generator, size: int = 84) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_mini(root: Path, dumps, *, evil=None, classes: int = 3, per_class: int = 2) -> dict:
    """mini-imagenet-cache-{split}.pkl: {'image_data': uint8 [n, 84, 84, 3], 'class_dict': {wnid: rows}}."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for s, split in enumerate(SPLITS):
        data = rng.integers(0, 256, (classes * per_class, 84, 84, 3), dtype=np.uint8)
        class_dict = {f"n{s}{c:07d}".encode(): list(range(c * per_class, (c + 1) * per_class)) for c in range(classes)}
        obj = {b"image_data": data, b"class_dict": class_dict}
        if dumps is not py2_dumps:
            obj = {"image_data": data, "class_dict": {k.decode(): v for k, v in class_dict.items()}}
        if evil is not None and split == "val":
            obj["class_dict" if dumps is not py2_dumps else b"class_dict"] = evil
        (root / f"mini-imagenet-cache-{split}.pkl").write_bytes(dumps(obj))
        out[split] = (data, class_dict)
    return out


def write_tiered(root: Path, dumps, *, evil_in: str | None = None, evil=None, as_str: bool = True) -> dict:
    """{split}_images_png.pkl (PNG byte strings or uint8 arrays) and {split}_labels.pkl (the label dict)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out = {}
    for s, split in enumerate(SPLITS):
        specific = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)
        pngs = [_png(rng) for _ in specific]
        images = pngs if as_str else [np.frombuffer(p, dtype=np.uint8) for p in pngs]
        labels = {b"label_specific": specific, b"label_general": specific // 2,
                  b"label_specific_str": [f"n{s}{c:07d}".encode() for c in range(3)],
                  b"label_general_str": [f"n9{s}{c:06d}".encode() for c in range(2)]}  # fmt: skip
        if dumps is not py2_dumps:
            labels = {k.decode(): ([x.decode() for x in v] if isinstance(v, list) else v) for k, v in labels.items()}
        if evil is not None and split == "test":
            if evil_in == "images":
                images = images[:2] + [evil] + images[3:]
            else:
                labels[next(iter(labels))] = evil
        (root / f"{split}_images_png.pkl").write_bytes(dumps(images))
        (root / f"{split}_labels.pkl").write_bytes(dumps(labels))
        out[split] = pngs
    return out


def write_cifar(root: Path, dumps, *, evil_in: str | None = None, evil=None) -> Path:
    """cifar-100-python/{train,test,meta}: dicts keyed by (Python 2) strings, as the Toronto release."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    coarse = sorted(SUPERCLASSES)
    fine = sorted(f for fs in SUPERCLASSES.values() for f in fs)
    coarse_of = {f: coarse.index(c) for c, fs in SUPERCLASSES.items() for f in fs}
    rng = np.random.default_rng(2)
    for part in ("train", "test"):
        labels = rng.permutation(np.repeat(np.arange(100), 1))
        obj = {b"filenames": [f"img_{i}.png".encode() for i in range(100)], b"batch_label": f"{part}ing batch 1 of 1".encode(),
               b"fine_labels": labels.tolist(), b"coarse_labels": [coarse_of[fine[k]] for k in labels],
               b"data": rng.integers(0, 256, (100, 3072), dtype=np.uint8)}  # fmt: skip
        if evil is not None and evil_in == part:
            obj[b"coarse_labels"] = evil
        (folder / part).write_bytes(dumps(obj))
    meta = {b"fine_label_names": [f.encode() for f in fine], b"coarse_label_names": [c.encode() for c in coarse]}
    if evil is not None and evil_in == "meta":
        meta[b"fine_label_names"] = evil
    (folder / "meta").write_bytes(dumps(meta))
    return folder


def write_leo(root: Path, dumps, *, evil=None, dim: int = 8) -> dict:
    """{split}_embeddings.pkl: {'embeddings': float32 (n, dim), 'labels': (n,), 'keys': ['<i>-<wnid>-<image>']}."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    out = {}
    for s, split in enumerate(SPLITS):
        labels = np.repeat(np.arange(3), 2)
        emb = rng.standard_normal((6, dim)).astype(np.float32)
        keys = [f"{i}-n{s}{c:07d}-n{s}{c:07d}_{i}.JPEG".encode() for i, c in enumerate(labels)]
        obj = {b"embeddings": emb, b"labels": labels.astype(np.int64), b"keys": keys}
        if evil is not None and split == "train":
            obj[b"keys"] = evil
        if dumps is not py2_dumps:
            obj = {k.decode(): v for k, v in obj.items()}
        (root / f"{split}_embeddings.pkl").write_bytes(dumps(obj))
        out[split] = (emb, keys)
    return out


def py3_dumps(obj) -> bytes:
    return pickle.dumps(obj)


def setup_mini(root: Path, cache: Path) -> MiniImageNetDataModule:
    d = MiniImageNetDataModule(str(root), format="pickle", strict=False, cache_dir=str(cache), **EPISODES)
    d.setup("fit")
    return d


def setup_tiered(root: Path, cache: Path) -> TieredImageNetDataModule:
    d = TieredImageNetDataModule(str(root), strict=False, cache_dir=str(cache), **EPISODES)
    d.setup("fit")
    return d


def setup_cifar(root: Path, cache: Path) -> CIFARFSDataModule:
    d = CIFARFSDataModule(str(root), strict=False, cache_dir=str(cache), **EPISODES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChecksumMismatchWarning)  # the tiny files are not the published ones
        d.setup("fit")
    return d


def setup_leo(root: Path, cache: Path) -> LEOEmbeddingDataModule:
    d = LEOEmbeddingDataModule(str(root), **EPISODES)
    d.setup("fit")
    return d


READERS = {
    "mini": lambda root, evil: write_mini(root, py3_dumps, evil=evil),
    "tiered-labels": lambda root, evil: write_tiered(root, py3_dumps, evil_in="labels", evil=evil),
    "tiered-images": lambda root, evil: write_tiered(root, py3_dumps, evil_in="images", evil=evil),
    "cifar-train": lambda root, evil: write_cifar(root, py3_dumps, evil_in="train", evil=evil),
    "cifar-meta": lambda root, evil: write_cifar(root, py3_dumps, evil_in="meta", evil=evil),
    "cifar-archive": None,
    "leo": lambda root, evil: write_leo(root, py3_dumps, evil=evil),
}
SETUP = {"mini": setup_mini, "tiered": setup_tiered, "cifar": setup_cifar, "leo": setup_leo}
EVIL_FILE = {"mini": "mini-imagenet-cache-val.pkl", "tiered-labels": "test_labels.pkl",
             "tiered-images": "test_images_png.pkl", "cifar-train": "cifar-100-python/train",
             "cifar-meta": "cifar-100-python/meta", "cifar-archive": "cifar-100-python.tar.gz:cifar-100-python/test",
             "leo": "train_embeddings.pkl"}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_refuses_a_command_payload(tmp_path: Path, reader: str, kind: str) -> None:
    marker = tmp_path / "ran"
    evil = PAYLOADS[kind](marker)
    root = tmp_path / "data"
    if reader == "cifar-archive":
        write_cifar(tmp_path / "src", py3_dumps, evil_in="test", evil=evil)
        root.mkdir()
        with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
            tar.add(tmp_path / "src" / "cifar-100-python", arcname="cifar-100-python")
    else:
        READERS[reader](root, evil)
    with pytest.raises(UnsafePickleError) as e:
        SETUP[reader.split("-")[0]](root, tmp_path / "cache")
    assert e.value.source.endswith(EVIL_FILE[reader]) and e.value.global_name == REFUSED_GLOBAL[kind]
    assert EVIL_FILE[reader].rsplit("/", 1)[-1] in str(e.value) and REFUSED_GLOBAL[kind] in str(e.value)
    assert not marker.exists()


def _episode_ok(d, split: str = "train") -> None:
    ep = d.datasets[split][0]
    assert sorted(ep.support_y.tolist()) == [0, 1, 2] and sorted(ep.query_y.tolist()) == [0, 1, 2]


@pytest.mark.parametrize("dumps", [py2_dumps, py3_dumps], ids=["py2", "py3"])
def test_official_layouts_load_through_the_datamodules(tmp_path: Path, dumps) -> None:
    mini = write_mini(tmp_path / "mini", dumps)
    d = setup_mini(tmp_path / "mini", tmp_path / "cache")
    data, class_dict = mini["test"]
    store = d.datasets["test"].store
    assert store.class_names == [k.decode() for k in sorted(class_dict)]
    rows = class_dict[sorted(class_dict)[1]]
    assert torch.equal(store.images[2:4], torch.from_numpy(data[rows]).permute(0, 3, 1, 2))
    _episode_ok(d)

    pngs = write_tiered(tmp_path / "tiered", dumps, as_str=True)
    d = setup_tiered(tmp_path / "tiered", tmp_path / "cache")
    store = d.datasets["val"].store
    assert store.class_names == ["n1" + f"{c:07d}" for c in range(3)]
    first_of_class1 = np.array(Image.open(io.BytesIO(pngs["val"][1])).convert("RGB"))
    assert torch.equal(store.images[2], torch.from_numpy(first_of_class1).permute(2, 0, 1))
    _episode_ok(d)

    write_cifar(tmp_path / "cifar", dumps)
    d = setup_cifar(tmp_path / "cifar", tmp_path / "cache")
    assert sum(ds.store.num_classes for ds in d.datasets.values()) == 100
    _episode_ok(d)

    leo = write_leo(tmp_path / "leo", dumps)
    d = setup_leo(tmp_path / "leo", tmp_path / "cache")
    emb, keys = leo["val"]
    ep = d.datasets["val"][0]
    table = {tuple(e.tolist()): k.decode().split("-")[1] for e, k in zip(emb, keys)}  # row -> class in the key
    classes_of_label: dict[int, set] = {}
    for x, y in zip(torch.cat([ep.support_x, ep.query_x]), torch.cat([ep.support_y, ep.query_y])):
        classes_of_label.setdefault(int(y), set()).add(table[tuple(x.tolist())])
    assert all(len(v) == 1 for v in classes_of_label.values())
    assert set.union(*classes_of_label.values()) == {f"n1{c:07d}" for c in range(3)}


def test_tiered_png_arrays_in_python2_pickles(tmp_path: Path) -> None:
    """Ren et al.'s images file holds PNGs as uint8 arrays (cv2.imencode); written by Python 2 + numpy 1.x."""
    pngs = write_tiered(tmp_path / "t", py2_dumps, as_str=False)
    d = setup_tiered(tmp_path / "t", tmp_path / "cache")
    img = np.array(Image.open(io.BytesIO(pngs["train"][0])).convert("RGB"))
    assert torch.equal(d.datasets["train"].store.images[0], torch.from_numpy(img).permute(2, 0, 1))


# --- checksums ---------------------------------------------------------------------------------------------


def test_md5_is_computed_once_per_size_and_mtime(tmp_path: Path) -> None:
    f = tmp_path / "blob"
    f.write_bytes(b"a" * 1000)
    first = file_md5(f, tmp_path / "cache")
    assert first == hashlib.md5(b"a" * 1000).hexdigest() and (tmp_path / "cache" / "file-md5.json").is_file()
    st = f.stat()
    f.write_bytes(b"b" * 1000)  # same size; restore the mtime: the remembered md5 is used, the file not re-read
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_md5(f, tmp_path / "cache") == first
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: hashed again
    assert file_md5(f, tmp_path / "cache") == hashlib.md5(b"b" * 1000).hexdigest()


def test_md5_and_sha256_records_are_kept_alike(tmp_path: Path) -> None:
    """file_md5 keeps its record like the store cache's sha256 record: same entries, same permissions, and an entry
    whose digest is malformed is recomputed, not returned."""
    import json
    import stat

    from lightning_meta.datamodules.store import file_digest

    f, cache = tmp_path / "blob", tmp_path / "cache"
    f.write_bytes(b"abc")
    umask = os.umask(0o022)
    try:
        assert file_md5(f, cache) == hashlib.md5(b"abc").hexdigest()
        assert file_digest(f, cache) == hashlib.sha256(b"abc").hexdigest()
    finally:
        os.umask(umask)
    md5_record = json.loads((cache / "file-md5.json").read_text())
    sha_record = json.loads((cache / "file-sha256.json").read_text())
    key = str(f.resolve())
    assert md5_record[key]["stamp"] == sha_record[key]["stamp"] == [f.stat().st_size, f.stat().st_mtime_ns]
    modes = {stat.S_IMODE((cache / name).stat().st_mode) for name in ("file-md5.json", "file-sha256.json")}
    assert modes == {0o644}  # readable by the other users of a shared cache, as the umask allows

    other = tmp_path / "other"
    other.write_bytes(b"xyz")
    md5_record[str(other.resolve())] = {"stamp": [other.stat().st_size, other.stat().st_mtime_ns], "md5": "not-hex"}
    (cache / "file-md5.json").write_text(json.dumps(md5_record))
    assert file_md5(other, cache) == hashlib.md5(b"xyz").hexdigest()


def test_md5_without_a_writable_cache_still_hashes(tmp_path: Path) -> None:
    f = tmp_path / "blob"
    f.write_bytes(b"xyz")
    (tmp_path / "notadir").write_text("")
    assert file_md5(f, tmp_path / "notadir") == hashlib.md5(b"xyz").hexdigest()


def test_check_md5_warns_or_raises_naming_file_and_expected(tmp_path: Path) -> None:
    f = tmp_path / "cifar-100-python.tar.gz"
    f.write_bytes(b"repackaged")
    good = hashlib.md5(b"repackaged").hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_md5(f, good, what="the archive", cache_dir=tmp_path / "c")
    with pytest.warns(ChecksumMismatchWarning, match=rf"{f}.*has md5 {c100.CIFAR100_MD5}.*verify=True"):
        assert not check_md5(f, c100.CIFAR100_MD5, what="the archive", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match=rf"{f} has md5 {good}, but the archive has md5 {c100.CIFAR100_MD5}"):
        check_md5(f, c100.CIFAR100_MD5, what="the archive", verify=True, cache_dir=tmp_path / "c")


def test_cifar_datamodule_checks_the_published_md5s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert c100.CIFAR100_FILE_MD5 == {"train": "16019d7e3df5f24257cddd939b257f8d",  # torchvision's CIFAR100 list
                                      "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                                      "meta": "7973b15100ade9c7d40fb424638fde48"}  # fmt: skip
    folder = write_cifar(tmp_path / "c", py3_dumps)
    kw = {"strict": False, "cache_dir": str(tmp_path / "cache"), **EPISODES}
    with pytest.warns(ChecksumMismatchWarning) as rec:
        CIFARFSDataModule(str(tmp_path / "c"), **kw).setup("fit")
    messages = [str(w.message) for w in rec if issubclass(w.category, ChecksumMismatchWarning)]
    assert (
        len(messages) == 3
        and f"{folder / 'meta'} has md5" in messages[2]
        and c100.CIFAR100_FILE_MD5["meta"] in messages[2]
    )
    with pytest.raises(
        ValueError, match=rf"{folder / 'train'} has md5 .*{c100.CIFAR100_FILE_MD5['train']}.*verify=True"
    ):
        CIFARFSDataModule(str(tmp_path / "c"), verify=True, **kw).setup("fit")
    real = {f: hashlib.md5((folder / f).read_bytes()).hexdigest() for f in ("train", "test", "meta")}
    monkeypatch.setattr(c100, "CIFAR100_FILE_MD5", real)  # the files as if published: silent, and verify passes
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChecksumMismatchWarning)
        CIFARFSDataModule(str(tmp_path / "c"), verify=True, **kw).setup("fit")
