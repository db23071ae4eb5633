"""ClassStore grouping, selection, persistence and the checksum-keyed cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_meta.datamodules.store import ClassStore, cached_store, default_cache_dir, file_digest


def _images(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 3).contiguous()


def test_from_labeled_groups_stably_in_sorted_order():
    labels = ["b", "a", "b", "c", "a", "b"]
    s = ClassStore.from_labeled(_images(6), labels)
    assert s.class_names == ["a", "b", "c"]
    assert s.offsets.tolist() == [0, 2, 5, 6]
    assert s.images[:, 0, 0, 0].tolist() == [1, 4, 0, 2, 5, 3]  # input order kept inside a class
    assert s.counts().tolist() == [2, 3, 1] and s.num_classes == 3 and len(s) == 6


def test_from_labeled_respects_class_names_and_names_mismatches():
    s = ClassStore.from_labeled(_images(4), torch.tensor([1, 0, 1, 0]), class_names=["1", "0"])
    assert s.class_names == ["1", "0"] and s.images[:, 0, 0, 0].tolist() == [0, 2, 1, 3]
    with pytest.raises(ValueError, match=r"1 named classes have no images .*'7'.* 1 labels are not named .*'0'"):
        ClassStore.from_labeled(_images(4), [1, 0, 1, 0], class_names=["1", "7"])
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        ClassStore.from_labeled(_images(4), [1, 0, 1])


def test_invalid_stores_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        ClassStore(torch.zeros(2, 1, 2, 2), torch.tensor([0, 2]), ["a"])
    with pytest.raises(ValueError, match="num_classes \\+ 1"):
        ClassStore(_images(2), torch.tensor([0, 2]), ["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        ClassStore(_images(2), torch.tensor([0, 1, 2]), ["a", "a"])


def test_select_and_concat_keep_rows_of_each_class():
    s = ClassStore.from_labeled(_images(6), [0, 0, 1, 1, 2, 2])
    t = s.select(["2", "0"])
    assert t.class_names == ["2", "0"] and t.images[:, 0, 0, 0].tolist() == [4, 5, 0, 1]
    u = ClassStore.concat([t, s.select(["1"])])
    assert u.class_names == ["2", "0", "1"] and u.offsets.tolist() == [0, 2, 4, 6]
    assert u.images[:, 0, 0, 0].tolist() == [4, 5, 0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"2 classes are not in the store .*'x'"):
        s.select(["0", "x", "y"])
    with pytest.raises(ValueError, match="different image shapes"):
        ClassStore.concat([s, ClassStore.from_labeled(torch.zeros(1, 1, 5, 5, dtype=torch.uint8), [9])])


def test_save_load_roundtrip(tmp_path: Path):
    s = ClassStore.from_labeled(_images(5), ["x", "y", "x", "z", "y"])
    s.save(tmp_path / "s.pt")
    r = ClassStore.load(tmp_path / "s.pt")
    assert torch.equal(r.images, s.images) and torch.equal(r.offsets, s.offsets) and r.class_names == s.class_names


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LIGHTNING_META_CACHE")
    assert default_cache_dir().name == "lightning_meta"


def test_file_digest_of_files_and_folders(tmp_path: Path):
    import hashlib

    f = tmp_path / "a.bin"
    f.write_bytes(b"hello")
    assert file_digest(f) == hashlib.sha256(b"hello").hexdigest()
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "x.png").write_bytes(b"1")
    before = file_digest(d)
    assert file_digest(d) == before
    (d / "sub" / "y.png").write_bytes(b"2")
    assert file_digest(d) != before
    with_file = file_digest(d)
    (d / "empty").mkdir()
    assert file_digest(d) != with_file
    with pytest.raises(FileNotFoundError, match="nope"):
        file_digest(tmp_path / "nope")


def test_cached_store_builds_once_and_keys_on_source_content(tmp_path: Path):
    src = tmp_path / "data"
    src.mkdir()
    (src / "raw.bin").write_bytes(b"v1")
    os.chmod(src, 0o555)  # read-only data folder: nothing may be written next to it
    cache = tmp_path / "cache"
    calls = []

    def build() -> ClassStore:
        calls.append(1)
        return ClassStore.from_labeled(_images(3), [0, 1, 0])

    try:
        a = cached_store("toy", [src / "raw.bin"], build, cache)
        b = cached_store("toy", [src / "raw.bin"], build, cache)
        assert len(calls) == 1 and torch.equal(a.images, b.images)
        files = list(cache.glob("toy-*.pt"))
        assert len(files) == 1 and not list(cache.glob("*.tmp"))
        assert sorted(p.name for p in src.iterdir()) == ["raw.bin"]
        cached_store("toy", [src / "raw.bin"], build, cache, version="2")  # new decoder version: rebuild
        assert len(calls) == 2
    finally:
        os.chmod(src, 0o755)
    (src / "raw.bin").write_bytes(b"v2 changed")
    cached_store("toy", [src / "raw.bin"], build, cache)
    assert len(calls) == 3 and len(list(cache.glob("toy-*.pt"))) == 3
    files[0].write_bytes(b"corrupt")  # a damaged cache entry is rebuilt, not trusted
    (src / "raw.bin").write_bytes(b"v1")
    cached_store("toy", [src / "raw.bin"], build, cache)
    assert len(calls) == 4


def test_source_digests_are_remembered_across_processes_until_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A second process finds the sha256 of unchanged sources in the cache folder's record instead of reading them;
    a file with another size or modification time is read and hashed again."""
    import hashlib
    import json

    import lightning_meta.datamodules.store as store

    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"first source")
    b.write_bytes(b"second")
    cache, reads, builds = tmp_path / "cache", [], []

    def counting_open(file, mode="r", *args, **kwargs):
        if "b" in mode and Path(file).resolve() in (a.resolve(), b.resolve()):
            reads.append(Path(file).name)
        return open(file, mode, *args, **kwargs)

    def build() -> ClassStore:
        builds.append(1)
        return ClassStore.from_labeled(_images(2), [0, 1])

    def new_process() -> None:  # the per-process memo starts empty
        monkeypatch.setattr(store, "_DIGESTS", {})
        reads.clear()

    monkeypatch.setattr(store, "open", counting_open, raising=False)
    new_process()
    cached_store("two", [a, b], build, cache)
    assert sorted(reads) == ["a.bin", "b.bin"] and len(builds) == 1

    new_process()
    cached_store("two", [a, b], build, cache)
    assert reads == [] and len(builds) == 1  # nothing re-read, the store loaded from the cache
    record = json.loads((cache / "file-sha256.json").read_text())
    assert record[str(a.resolve())]["sha256"] == hashlib.sha256(b"first source").hexdigest()
    assert file_digest(a, cache) == hashlib.sha256(b"first source").hexdigest() and reads == []

    new_process()
    st = b.stat()
    b.write_bytes(b"SECOND")  # same size, new content and mtime
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cached_store("two", [a, b], build, cache)
    assert reads == ["b.bin"] and len(builds) == 2  # only the changed file re-hashed; a new key, so rebuilt
    assert file_digest(b, cache) == hashlib.sha256(b"SECOND").hexdigest()

    new_process()
    mtime = b.stat().st_mtime_ns
    b.write_bytes(b"SECOND!")  # another size, the same mtime
    os.utime(b, ns=(mtime, mtime))
    assert file_digest(b, cache) == hashlib.sha256(b"SECOND!").hexdigest() and reads == ["b.bin"]

    new_process()
    (cache / "file-sha256.json").write_text("{not json")  # a damaged record is ignored and rewritten
    assert file_digest(a, cache) == hashlib.sha256(b"first source").hexdigest() and reads == ["a.bin"]
    assert json.loads((cache / "file-sha256.json").read_text())[str(a.resolve())]["stamp"][0] == a.stat().st_size


def test_remembered_file_hash_refuses_variable_length_or_unknown_algorithms_and_paths_as_records(tmp_path: Path):
    from lightning_meta.datamodules.store import remembered_file_hash

    f = tmp_path / "blob"
    f.write_bytes(b"abc")
    for algorithm in ("shake_128", "no-such-hash"):
        with pytest.raises(ValueError, match=f"algorithm='{algorithm}'.*'sha256'"):
            remembered_file_hash(f, algorithm, "file-x.json", tmp_path)
    for record in ("sub/file.json", "..", ""):
        with pytest.raises(ValueError, match="plain file name"):
            remembered_file_hash(f, "sha256", record, tmp_path)
    assert (
        remembered_file_hash(f, "sha1", "file-sha1.json", tmp_path / "c") == "a9993e364706816aba3e25717850c26c9cd0d89d"
    )
    assert (tmp_path / "c" / "file-sha1.json").is_file()


def test_cached_store_defaults_to_env_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "envcache"))
    (tmp_path / "s").write_bytes(b"x")
    cached_store("e", [tmp_path / "s"], lambda: ClassStore.from_labeled(_images(1), [0]))
    assert len(list((tmp_path / "envcache").glob("e-*.pt"))) == 1


def test_progress_passes_items_through_on_every_path(monkeypatch):
    from lightning_meta.progress import progress

    items = [3, 1, 2]
    assert list(progress(iter(items), "bar", total=3)) == items  # rich installed: the bar path
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert list(progress(iter(items), "bar")) == items  # non-zero rank: no bar
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("LIGHTNING_META_PROGRESS", "0")
    assert list(progress(iter(items), "bar")) == items
