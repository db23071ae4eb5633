"""miniImageNet / tieredImageNet built from a (tiny, fake) ILSVRC-2012 training folder in the official layout."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_meta.datamodules import ilsvrc
from lightning_meta.datamodules.mini_imagenet import MiniImageNetDataModule
from lightning_meta.datamodules.tiered_imagenet import TieredImageNetDataModule

# File numbers chosen so that numeric and lexicographic order differ (10 < 9 as strings, 1000 < 200).
NUMBERS = [9, 10, 200, 1000, 31]
SYNSETS = {"train": ["n01000001", "n01000002", "n01000003"], "val": ["n02000001"], "test": ["n03000001"]}


def color(synset: str, number: int) -> tuple[int, int, int]:
    """A distinct solid RGB colour per image (far apart, so JPEG rounding cannot confuse two images)."""
    s = int(synset[1:]) % 7
    return (20 + 30 * s, (37 * number) % 200 + 20, 240 - 40 * NUMBERS.index(number))


def write_fake_ilsvrc(root: Path, synsets: list[str], size: tuple[int, int] = (50, 36)) -> Path:
    """``root/train/<synset>/<synset>_<n>.JPEG``, one solid-colour image per number in NUMBERS."""
    for synset in synsets:
        folder = root / "train" / synset
        folder.mkdir(parents=True)
        for n in NUMBERS:
            arr = np.zeros((size[1], size[0], 3), np.uint8)
            arr[:] = color(synset, n)
            Image.fromarray(arr).save(folder / f"{synset}_{n}.JPEG", quality=98)
    return root


def write_mini_split(folder: Path, rows: dict[str, list[tuple[str, int]]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, entries in rows.items():
        with open(folder / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["filename", "label"])
            for synset, k in entries:
                w.writerow([f"{synset}{k:08d}.jpg", synset])
    return folder


def all_synsets() -> list[str]:
    return [s for v in SYNSETS.values() for s in v]


def test_packaged_mini_split_is_ravi_larochelle() -> None:
    """The shipped CSVs decompress to the published files (md5) with 64/16/20 classes x 600 images, disjoint."""
    rows = {s: ilsvrc.mini_imagenet_split_rows(s) for s in ("train", "val", "test")}
    for split, expected in {"train": 64, "val": 16, "test": 20}.items():
        synsets = [s for s, _ in rows[split]]
        counts = {s: synsets.count(s) for s in set(synsets)}
        assert len(counts) == expected and set(counts.values()) == {600}
        assert all(1 <= k <= 1300 for _, k in rows[split])
    assert rows["train"][0] == ("n01532829", 5)  # first row of train.csv: n0153282900000005.jpg
    sets = [{s for s, _ in rows[x]} for x in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    import gzip

    for split, md5 in ilsvrc.MINI_IMAGENET_SPLIT_MD5.items():
        raw = gzip.decompress(ilsvrc.split_file("mini_imagenet", split).read_bytes())
        assert hashlib.md5(raw).hexdigest() == md5


def test_packaged_tiered_split_is_ren_et_al() -> None:
    classes = {s: ilsvrc.tiered_imagenet_split_classes(s) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in classes.items()} == {"train": 351, "val": 97, "test": 160}
    assert {s: len({c for _, c in v}) for s, v in classes.items()} == {"train": 20, "val": 6, "test": 8}
    synsets = [s for v in classes.values() for s, _ in v]
    assert len(set(synsets)) == 608
    categories = [{c for _, c in v} for v in classes.values()]
    assert len(categories[0] | categories[1] | categories[2]) == 34
    mini = {s for split in ("train", "val", "test") for s, _ in ilsvrc.mini_imagenet_split_rows(split)}
    assert mini - set(synsets)  # the two benchmarks are different class sets (mini is not a subset of tiered)


def test_corrupt_packaged_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "tiered_imagenet_ren"
    folder.mkdir()
    (folder / "train.csv").write_text("n01530575,n01524359\n")
    monkeypatch.setattr(ilsvrc, "SPLITS_DIR", tmp_path)
    with pytest.raises(ValueError, match="corrupt.*reinstall"):
        ilsvrc.tiered_imagenet_split_classes("train")


def test_rows_map_to_numerically_sorted_files(tmp_path: Path) -> None:
    root = write_fake_ilsvrc(tmp_path / "ilsvrc", all_synsets())
    train_dir = ilsvrc.find_ilsvrc_train(root)
    assert train_dir == root / "train"
    files = ilsvrc.synset_images(train_dir, "n01000001")
    assert [f.name for f in files] == [f"n01000001_{n}.JPEG" for n in sorted(NUMBERS)]
    rows = [("n01000002", 4), ("n01000001", 1), ("n01000002", 2), ("n01000001", 5)]
    store = ilsvrc.read_mini_imagenet_ilsvrc(train_dir, rows, image_size=12)
    assert store.class_names == ["n01000001", "n01000002"] and store.counts().tolist() == [2, 2]
    assert store.images.shape == (4, 3, 12, 12)
    # image k (1-based) is the k-th file in numeric order: 9, 10, 31, 200, 1000
    expect = [color("n01000001", 9), color("n01000001", 1000), color("n01000002", 200), color("n01000002", 10)]
    got = store.images.float().mean(dim=(2, 3))
    assert torch.allclose(got, torch.tensor(expect, dtype=torch.float32), atol=3)


def test_other_accepted_layouts(tmp_path: Path) -> None:
    kaggle = tmp_path / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC"
    write_fake_ilsvrc(kaggle, ["n01000001"])
    assert ilsvrc.find_ilsvrc_train(tmp_path / "kaggle") == kaggle / "train"
    assert ilsvrc.find_ilsvrc_train(kaggle / "train") == kaggle / "train"  # root is the train folder itself


def test_errors_name_what_is_missing_and_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"image-net\.org.*ILSVRC2012_img_train\.tar"):
        ilsvrc.find_ilsvrc_train(tmp_path / "nothing")
    root = write_fake_ilsvrc(tmp_path / "ilsvrc", ["n01000001"])
    train_dir = root / "train"
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 synsets .*n01999999.*cannot be redistributed"):
        ilsvrc.read_mini_imagenet_ilsvrc(train_dir, [("n01000001", 1), ("n01999999", 1)], 8)
    with pytest.raises(FileNotFoundError, match=r"image 6 of synset n01000001 .*only 5 images.*n01000001\.tar"):
        ilsvrc.read_mini_imagenet_ilsvrc(train_dir, [("n01000001", 6)], 8)
    (train_dir / "n01000009").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no n01000009_<n>\.JPEG"):
        ilsvrc.synset_images(train_dir, "n01000009")
    (train_dir / "n01000001" / "n01000001_9.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"n01000001_9\.JPEG.*corrupt"):
        ilsvrc.read_mini_imagenet_ilsvrc(train_dir, [("n01000001", 1)], 8)


def test_malformed_split_rows_name_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "split"
    write_mini_split(folder, {"train": [("n01000001", 1)], "val": [], "test": []})
    (folder / "val.csv").write_text("filename,label\nn0100000100000001.jpg,n01000002\n")
    with pytest.raises(ValueError, match=r"val\.csv, line 2: label 'n01000002' is not the synset n01000001"):
        ilsvrc.mini_imagenet_split_rows("val", folder)
    (folder / "test.csv").write_text("filename,label\nimage5.jpg,n01000001\n")
    with pytest.raises(ValueError, match=r"test\.csv, line 2: 'image5\.jpg' is not a miniImageNet filename"):
        ilsvrc.mini_imagenet_split_rows("test", folder)
    with pytest.raises(FileNotFoundError, match="train.csv, val.csv and test.csv"):
        ilsvrc.mini_imagenet_split_rows("train", tmp_path / "elsewhere")


def _bicubic_reference(img: np.ndarray, size: int) -> np.ndarray:
    """Separable bicubic (a = -0.75, half-pixel centres, clamped borders) in float64, written out by hand."""

    def kernel(t: float) -> float:
        a, t = -0.75, abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.0

    def matrix(n_in: int, n_out: int) -> np.ndarray:
        m = np.zeros((n_out, n_in))
        for o in range(n_out):
            src = (o + 0.5) * n_in / n_out - 0.5
            i0 = int(np.floor(src))
            for i in range(i0 - 1, i0 + 3):
                m[o, min(max(i, 0), n_in - 1)] += kernel(src - i)
        return m

    h, w = img.shape[:2]
    out = np.einsum("oh,hwc,pw->opc", matrix(h, size), img.astype(np.float64), matrix(w, size))
    return np.clip(np.round(out), 0, 255)


def test_resizing_matches_the_original_tools(tmp_path: Path) -> None:
    g = np.random.default_rng(0)
    img = g.integers(0, 256, size=(24, 36, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    # area: each output pixel of a 2x (rows) by 3x (columns) reduction is the mean of its 2x3 block
    area = ilsvrc.decode_resized([tmp_path / "a.png"], 12, "area")[0].permute(1, 2, 0).numpy().astype(np.float64)
    blocks = img.reshape(12, 2, 12, 3, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(area - blocks).max() <= 1.0
    bicubic = ilsvrc.decode_resized([tmp_path / "a.png"], 10, "bicubic")[0].permute(1, 2, 0).numpy()
    assert np.abs(bicubic.astype(np.float64) - _bicubic_reference(img, 10)).max() <= 1.0
    with pytest.raises(ValueError, match="'area' or 'bicubic'"):
        ilsvrc.decode_resized([tmp_path / "a.png"], 10, "lanczos")  # type: ignore[arg-type]


def test_mini_imagenet_datamodule_from_ilsvrc(tmp_path: Path) -> None:
    root = write_fake_ilsvrc(tmp_path / "ilsvrc", all_synsets())
    split = write_mini_split(tmp_path / "split", {
        "train": [(s, k) for s in SYNSETS["train"] for k in (1, 3, 5)],
        "val": [("n02000001", k) for k in (2, 4, 5)],
        "test": [("n03000001", k) for k in (1, 2, 3)],
    })  # fmt: skip
    dm = MiniImageNetDataModule(
        str(root),
        format="ilsvrc",
        split_dir=str(split),
        strict=False,
        image_size=16,
        ways=2,
        shots=1,
        queries=1,
        eval_ways=1,
        tasks_per_batch=1,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup()
    stores = dm.build_stores()  # from the cache now
    assert {s: stores[s].class_names for s in stores} == SYNSETS
    assert stores["val"].images.shape == (3, 3, 16, 16)
    expect = torch.tensor([color("n02000001", n) for n in (10, 200, 1000)], dtype=torch.float32)
    assert torch.allclose(stores["val"].images.float().mean(dim=(2, 3)), expect, atol=3)
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape[-3:] == (3, 16, 16) and batch.query_y.numel() == 2
    with pytest.raises(ValueError, match="3 classes, expected 64"):  # strict: the published sizes
        MiniImageNetDataModule(
            str(root), format="ilsvrc", split_dir=str(split), cache_dir=str(tmp_path / "cache")
        ).setup()
    with pytest.raises(FileNotFoundError, match=r"synsets of miniImageNet's train split are missing.*image-net\.org"):
        MiniImageNetDataModule(str(root), format="ilsvrc", cache_dir=str(tmp_path / "cache")).setup()


def test_tiered_imagenet_datamodule_from_ilsvrc(tmp_path: Path) -> None:
    root = write_fake_ilsvrc(tmp_path / "ilsvrc", all_synsets())
    split = tmp_path / "split"
    split.mkdir()
    cats = {"train": "n00000010", "val": "n00000020", "test": "n00000030"}
    for s, syns in SYNSETS.items():
        (split / f"{s}.csv").write_text("".join(f"{x},{cats[s]}\n" for x in syns))
    dm = TieredImageNetDataModule(
        str(root),
        format="ilsvrc",
        split_dir=str(split),
        strict=False,
        image_size=8,
        ways=2,
        shots=1,
        queries=1,
        eval_ways=1,
        tasks_per_batch=1,
        cache_dir=str(tmp_path / "cache"),
    )
    stores = dm.build_stores()
    assert {s: stores[s].class_names for s in stores} == SYNSETS
    assert stores["train"].counts().tolist() == [len(NUMBERS)] * 3  # every image of the synset
    expect = torch.tensor([color("n01000003", n) for n in sorted(NUMBERS)], dtype=torch.float32)
    got = stores["train"].images[10:15].float().mean(dim=(2, 3))
    assert torch.allclose(got, expect, atol=3)
    with pytest.raises(ValueError, match="3 classes, expected 351"):
        TieredImageNetDataModule(
            str(root), format="ilsvrc", split_dir=str(split), cache_dir=str(tmp_path / "c")
        ).setup()
    with pytest.raises(ValueError, match="format='zip'"):
        TieredImageNetDataModule(str(root), format="zip")  # type: ignore[arg-type]
