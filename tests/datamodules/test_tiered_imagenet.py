"""TieredImageNetDataModule on tiny pickles written in Ren et al.'s layout (PNG bytes + label dicts)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_meta.datamodules import tiered_imagenet as ti
from lightning_meta.datamodules.tiered_imagenet import TieredImageNetDataModule

SPLIT_CLASSES = {"train": 5, "val": 3, "test": 4}
PER_CLASS = 3


def png(img: torch.Tensor) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def write_tiered(root: Path, *, size: int = 84, names: bool = True, as_arrays: bool = False) -> dict[str, tuple]:
    """{split}_images_png.pkl (list of PNG bytes, or 1-D uint8 arrays) + {split}_labels.pkl (label dict)."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    written = {}
    for s_id, (split, n) in enumerate(SPLIT_CLASSES.items()):
        total = n * PER_CLASS
        images = torch.randint(0, 256, (total, 3, size, size), dtype=torch.uint8, generator=g)
        specific = rng.permutation(np.repeat(np.arange(n, dtype=np.int64), PER_CLASS))  # classes interleaved
        general = specific // 2
        encoded = [png(img) for img in images]
        items = encoded if as_arrays else [e.tobytes() for e in encoded]
        labels = {"label_specific": specific, "label_general": general}
        if names:
            labels["label_specific_str"] = [f"n{s_id}{c:07d}" for c in range(n)]
            labels["label_general_str"] = [f"n9{s_id}{c:06d}" for c in range(n // 2 + 1)]
        with open(root / f"{split}_images_png.pkl", "wb") as fh:
            pickle.dump(items, fh)
        with open(root / f"{split}_labels.pkl", "wb") as fh:
            pickle.dump(labels, fh)
        written[split] = (images, specific)
    return written


def dm(root: Path, **kw) -> TieredImageNetDataModule:
    kw = {
        "strict": False,
        "ways": 3,
        "shots": 1,
        "queries": 2,
        "tasks_per_batch": 2,
        "train_episodes": 2,
        "val_episodes": 2,
        "test_episodes": 2,
        **kw,
    }
    return TieredImageNetDataModule(str(root), **kw)


@pytest.mark.parametrize("as_arrays", [False, True])
def test_round_trip_counts_and_episodes(tmp_path: Path, as_arrays: bool) -> None:
    written = write_tiered(tmp_path / "tiered-imagenet", as_arrays=as_arrays)
    d = dm(tmp_path)  # root may be the parent of tiered-imagenet/
    stores = d.build_stores()
    for split, (images, specific) in written.items():
        st = stores[split]
        assert st.num_classes == SPLIT_CLASSES[split]
        assert st.counts().tolist() == [PER_CLASS] * SPLIT_CLASSES[split]
        s_id = list(SPLIT_CLASSES).index(split)
        for c in range(SPLIT_CLASSES[split]):
            k = st.class_names.index(f"n{s_id}{c:07d}")
            expect = images[torch.from_numpy(np.flatnonzero(specific == c))]
            assert torch.equal(st.images[int(st.offsets[k]) : int(st.offsets[k + 1])], expect)
    all_names = [set(stores[s].class_names) for s in stores]
    assert sum(map(len, all_names)) == len(set().union(*all_names))  # disjoint splits
    d.setup("fit")
    b = next(iter(d.val_dataloader()))
    assert b.support_x.shape == (2, 3, 3, 84, 84) and b.query_y.shape == (2, 6)


def test_unnamed_labels_stay_disjoint_and_resize(tmp_path: Path) -> None:
    write_tiered(tmp_path, size=24, names=False)
    stores = dm(tmp_path, image_size=16).build_stores()
    assert stores["val"].class_names == ["val/000", "val/001", "val/002"]
    assert stores["train"].images.shape == (5 * PER_CLASS, 3, 16, 16)


def test_strict_sizes(tmp_path: Path) -> None:
    write_tiered(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"split 'train' has 5 classes, expected 351.*split 'test' has 12 images, "
        r"expected 206209.*strict=False",
    ):
        dm(tmp_path, strict=True).setup("fit")


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing in .*train_images_png.pkl.*manual download"):
        dm(tmp_path).setup("fit")
    write_tiered(tmp_path)
    (tmp_path / "val_labels.pkl").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['val_labels.pkl'\]"):
        dm(tmp_path).setup("fit")
    with open(tmp_path / "val_labels.pkl", "wb") as fh:
        pickle.dump({"label_specific": np.zeros(2, np.int64)}, fh)
    with pytest.raises(ValueError, match="has 9 images but .*val_labels.pkl has 2 labels"):
        dm(tmp_path).setup("fit")
    with open(tmp_path / "val_labels.pkl", "wb") as fh:
        pickle.dump({"labels": [0]}, fh)
    with pytest.raises(ValueError, match=r"holds \['labels'\], expected a dict with 'label_specific'"):
        dm(tmp_path).setup("fit")
    (tmp_path / "val_labels.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="val_labels.pkl is not a readable pickle"):
        dm(tmp_path).setup("fit")


def test_corrupt_png_names_the_image(tmp_path: Path) -> None:
    write_tiered(tmp_path)
    with open(tmp_path / "test_images_png.pkl", "rb") as fh:
        items = pickle.load(fh)
    items[4] = items[4][:40]  # truncated PNG
    items[7] = np.zeros((2, 3), np.uint8)  # not bytes at all
    with open(tmp_path / "test_images_png.pkl", "wb") as fh:
        pickle.dump(items, fh)
    with pytest.raises(ValueError, match=r"test_images_png.pkl: (image 4 is not a decodable PNG|item 7 is a ndarray)"):
        dm(tmp_path).setup("fit")


def test_too_many_ways(tmp_path: Path) -> None:
    write_tiered(tmp_path)
    with pytest.raises(ValueError, match="ways=4 but split 'val' has only 3 classes"):
        dm(tmp_path, eval_ways=4).setup("fit")


def test_cache_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tiered(tmp_path / "data")
    first = dm(tmp_path / "data", cache_dir=str(tmp_path / "c")).build_stores()
    monkeypatch.setattr(ti, "decode_pngs", lambda *a, **k: pytest.fail("decoded again despite the cache"))
    second = dm(tmp_path / "data", cache_dir=str(tmp_path / "c")).build_stores()
    assert torch.equal(first["test"].images, second["test"].images)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(
        f"{s}_{k}.pkl" for s in SPLIT_CLASSES for k in ("images_png", "labels")
    )
