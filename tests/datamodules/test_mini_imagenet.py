"""MiniImageNetDataModule on tiny files written in the official CSV+JPEG and pickle layouts."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_meta.datamodules import mini_imagenet as mi
from lightning_meta.datamodules.mini_imagenet import MiniImageNetDataModule
from lightning_meta.episode import Episode

SPLIT_CLASSES = {"train": 6, "val": 5, "test": 5}
PER_CLASS = 4


def wnid(split: str, c: int) -> str:
    return f"n{ {'train': 1, 'val': 2, 'test': 3}[split] }{c:07d}"


def two_colors(split: str, c: int, k: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Left-half and right-half RGB colours of image k of class c (distinct channels, far from JPEG rounding)."""
    s = {"train": 0, "val": 1, "test": 2}[split]
    left = (40 + 30 * s, 20 + 25 * c, 200 - 35 * k)
    right = (230 - 20 * c, 60 + 40 * k, 30 + 50 * s)
    return left, right


def write_mini_csv(root: Path, size: tuple[int, int] = (40, 32), with_ext: bool = True) -> Path:
    """Ravi & Larochelle layout: {split}.csv ('filename,label') + images/<filename>.jpg (w x h = size)."""
    (root / "images").mkdir(parents=True)
    w, h = size
    for split, n in SPLIT_CLASSES.items():
        with open(root / f"{split}.csv", "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["filename", "label"])
            for c in range(n):
                for k in range(PER_CLASS):
                    name = f"{wnid(split, c)}{k + 1:08d}"
                    left, right = two_colors(split, c, k)
                    arr = np.zeros((h, w, 3), np.uint8)
                    arr[:, : w // 2] = left
                    arr[:, w // 2 :] = right
                    Image.fromarray(arr).save(root / "images" / f"{name}.jpg", quality=98)
                    out.writerow([f"{name}.jpg" if with_ext else name, wnid(split, c)])
    return root


def write_mini_pickles(root: Path, val_name: str = "val", size: int = 84) -> dict[str, dict]:
    """Ren et al. cache layout: mini-imagenet-cache-{split}.pkl with image_data [n,H,W,3] and class_dict."""
    root.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    written = {}
    for split, n in SPLIT_CLASSES.items():
        total = n * PER_CLASS
        data = g.integers(0, 256, size=(total, size, size, 3), dtype=np.uint8)
        rows = g.permutation(total)  # classes interleaved in row order, as a real cache need not group them
        class_dict = {wnid(split, c): rows[c::n].tolist() for c in range(n)}
        written[split] = {"image_data": data, "class_dict": class_dict}
        name = val_name if split == "val" else split
        with open(root / f"mini-imagenet-cache-{name}.pkl", "wb") as fh:
            pickle.dump(written[split], fh)
    return written


def dm(root: Path, **kw) -> MiniImageNetDataModule:
    kw = {
        "strict": False,
        "ways": 3,
        "shots": 1,
        "queries": 2,
        "tasks_per_batch": 2,
        "train_episodes": 4,
        "val_episodes": 2,
        "test_episodes": 2,
        **kw,
    }
    return MiniImageNetDataModule(str(root), **kw)


def test_csv_layout_counts_pixels_and_episodes(tmp_path: Path) -> None:
    root = write_mini_csv(tmp_path / "mini")
    d = dm(root, format="auto")
    stores = d.build_stores()
    assert {s: stores[s].num_classes for s in stores} == SPLIT_CLASSES
    assert all(stores[s].counts().tolist() == [PER_CLASS] * SPLIT_CLASSES[s] for s in stores)
    names = {s: set(stores[s].class_names) for s in stores}
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    st = stores["val"]
    assert st.images.dtype == torch.uint8 and st.images.shape[1:] == (3, 84, 84)
    # image k of class c is row offsets[c] + k (CSV order kept within a class); its halves keep their colours
    c = st.class_names.index(wnid("val", 3))
    img = st.images[int(st.offsets[c]) + 2].int()
    left, right = two_colors("val", 3, 2)
    assert (img[:, 42, 5] - torch.tensor(left)).abs().max() <= 4
    assert (img[:, 42, 78] - torch.tensor(right)).abs().max() <= 4
    d.setup("fit")
    batch = next(iter(d.train_dataloader()))
    assert isinstance(batch, Episode)
    assert batch.support_x.shape == (2, 3, 3, 84, 84) and batch.query_x.shape == (2, 6, 3, 84, 84)
    assert batch.support_x.dtype == torch.float32 and 0 <= batch.support_x.min() and batch.support_x.max() <= 1
    assert sorted(batch.query_y[0].tolist()) == [0, 0, 1, 1, 2, 2]


def test_csv_filenames_without_extension_and_image_size(tmp_path: Path) -> None:
    root = write_mini_csv(tmp_path / "mini", size=(16, 16), with_ext=False)
    stores = dm(root, format="csv", image_size=20).build_stores()
    assert stores["train"].images.shape == (6 * PER_CLASS, 3, 20, 20)


def test_pickle_layout_round_trips_exactly(tmp_path: Path) -> None:
    written = write_mini_pickles(tmp_path / "mini", val_name="validation")
    stores = dm(tmp_path / "mini", format="auto").build_stores()
    for split, raw in written.items():
        st = stores[split]
        assert st.num_classes == SPLIT_CLASSES[split]
        for c, name in enumerate(st.class_names):
            expect = torch.from_numpy(raw["image_data"][raw["class_dict"][name]]).permute(0, 3, 1, 2)
            assert torch.equal(st.images[int(st.offsets[c]) : int(st.offsets[c + 1])], expect)


def test_pickle_resized_when_image_size_differs(tmp_path: Path) -> None:
    write_mini_pickles(tmp_path / "mini")
    stores = dm(tmp_path / "mini", image_size=42).build_stores()
    assert stores["test"].images.shape == (5 * PER_CLASS, 3, 42, 42)


def test_strict_reports_found_vs_expected(tmp_path: Path) -> None:
    write_mini_pickles(tmp_path / "mini")
    with pytest.raises(
        ValueError, match=r"split 'train' has 6 classes, expected 64.*24 images, expected 38400.*strict=False"
    ):
        dm(tmp_path / "mini", strict=True).setup("fit")


def test_typo_split_hint() -> None:
    with pytest.raises(ValueError, match="64/12/24 is the MAML paper's typo"):
        mi.check_mini_imagenet_sizes(
            {"train": 64, "val": 12, "test": 24}, {"train": 1, "val": 1, "test": 1}, strict=True
        )
    mi.check_mini_imagenet_sizes({"train": 64, "val": 12, "test": 24}, {"train": 1, "val": 1, "test": 1}, strict=False)


def test_missing_and_malformed_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder.*manual download"):
        dm(tmp_path / "nowhere").setup("fit")
    root = write_mini_csv(tmp_path / "mini")
    (root / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['test.csv'\].*images"):
        dm(root).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"mini-imagenet-cache-train.pkl"):
        dm(root, format="pickle").setup("fit")
    with pytest.raises(ValueError, match="format='zip'"):
        dm(root, format="zip")
    with pytest.raises(ValueError, match="image_size=0 must be a positive integer"):
        dm(root, image_size=0)


def test_hyperparameters_are_recorded(tmp_path: Path) -> None:
    d = dm(tmp_path, format="pickle", image_size=42, normalize="imagenet", augment=True, eval_ways=2)
    assert {
        k: d.hparams[k] for k in ("root", "format", "image_size", "normalize", "augment", "strict", "eval_ways")
    } == {
        "root": str(tmp_path),
        "format": "pickle",
        "image_size": 42,
        "normalize": "imagenet",
        "augment": True,
        "strict": False,
        "eval_ways": 2,
    }


def test_csv_errors_name_the_file(tmp_path: Path) -> None:
    root = write_mini_csv(tmp_path / "mini")
    victim = next((root / "images").glob(f"{wnid('val', 0)}*.jpg"))
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"1 of the 20 images listed in .*val.csv.*{victim.name}"):
        dm(root).setup("fit")
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=f"cannot decode image .*{victim.name}.*corrupt"):
        dm(root).setup("fit")
    (root / "val.csv").write_text("image,class\na.jpg,n1\n")
    with pytest.raises(ValueError, match="header 'filename,label'"):
        dm(root).setup("fit")


def test_corrupt_and_wrong_pickles(tmp_path: Path) -> None:
    root = tmp_path / "mini"
    write_mini_pickles(root)
    good = (root / "mini-imagenet-cache-test.pkl").read_bytes()
    (root / "mini-imagenet-cache-test.pkl").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="mini-imagenet-cache-test.pkl is not a readable pickle.*download it again"):
        dm(root).setup("fit")
    with open(root / "mini-imagenet-cache-test.pkl", "wb") as fh:
        pickle.dump({"images": np.zeros((2, 84, 84, 3), np.uint8)}, fh)
    with pytest.raises(ValueError, match=r"holds \['images'\], expected a dict with 'image_data' and 'class_dict'"):
        dm(root).setup("fit")
    with open(root / "mini-imagenet-cache-test.pkl", "wb") as fh:
        pickle.dump({"image_data": np.zeros((3, 84, 84, 3), np.uint8), "class_dict": {"n9": [0, 1]}}, fh)
    with pytest.raises(ValueError, match=r"1 rows of image_data \(e.g. \[2\]\) are in no class_dict entry"):
        dm(root).setup("fit")


def test_class_in_two_splits_is_refused(tmp_path: Path) -> None:
    root = write_mini_csv(tmp_path / "mini")
    rows = (root / "val.csv").read_text().splitlines()
    leaked = rows[1].split(",")[0]
    with open(root / "test.csv", "a") as fh:
        fh.write(f"{leaked},{wnid('train', 0)}\n")
    with pytest.raises(ValueError, match=r"in both split 'train' and split 'test'.*n10000000"):
        dm(root).setup("fit")


def test_too_many_ways_or_shots(tmp_path: Path) -> None:
    write_mini_pickles(tmp_path / "mini")
    with pytest.raises(ValueError, match="ways=7 but split 'train' has only 6 classes"):
        dm(tmp_path / "mini", ways=7).setup("fit")
    with pytest.raises(ValueError, match=r"^eval_shots \+ eval_queries = 2 \+ 3 = 5 .* has only 4 examples"):
        dm(tmp_path / "mini", eval_shots=2, eval_queries=3).setup("fit")


def test_normalize_and_augment(tmp_path: Path) -> None:
    write_mini_pickles(tmp_path / "mini")
    plain = dm(tmp_path / "mini")
    plain.setup("fit")
    norm = dm(tmp_path / "mini", normalize="dataset", augment=True)
    norm.setup("fit")
    mean = torch.tensor(mi.MINI_IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(mi.MINI_IMAGENET_STD).view(3, 1, 1)
    a, b = plain.datasets["val"][0], norm.datasets["val"][0]  # same episode: evaluation is not augmented
    assert torch.allclose(b.support_x, (a.support_x - mean) / std, atol=1e-5)
    ta, tb = plain.datasets["train"][1], norm.datasets["train"][1]
    assert torch.equal(ta.support_y, tb.support_y)
    assert not torch.allclose(tb.support_x, (ta.support_x - mean) / std, atol=1e-3)  # augmented
    assert torch.equal(norm.datasets["train"][1].support_x, tb.support_x)  # ... deterministically per episode
    with pytest.raises(ValueError, match="normalize='imagenet1k'"):
        dm(tmp_path / "mini", normalize="imagenet1k")


def test_decoded_store_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_mini_csv(tmp_path / "mini")
    cache = tmp_path / "cache"
    first = dm(root, cache_dir=str(cache)).build_stores()
    assert len(list(cache.glob("mini_imagenet-csv-*.pt"))) == 3
    monkeypatch.setattr(mi, "decode_image_files", lambda *a, **k: pytest.fail("decoded again despite the cache"))
    second = dm(root, cache_dir=str(cache)).build_stores()
    assert torch.equal(first["train"].images, second["train"].images)
    assert not list(root.glob("*.pt"))  # nothing written into the data folder
