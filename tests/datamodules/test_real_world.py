"""CD-FSL test-only datamodules, the Meta-Album reader and the multi-source datamodule, on tiny files in
the official layouts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_meta.datamodules import (
    ChestXDataModule,
    ClassStore,
    CropDiseaseDataModule,
    EuroSATDataModule,
    ISICDataModule,
    MetaAlbumDataModule,
    MultiSourceDataModule,
    MultiSourceEpisodeDataset,
    VariableEpisodes,
    read_meta_album,
)
from lightning_meta.datamodules.sampling import EpisodeDataset


def write_image(path: Path, value: int, size: int = 12, mode: str = "RGB", fmt: str | None = None) -> None:
    """A flat image whose pixels all equal ``value`` (so a decoded image names its source file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode).save(path, format=fmt)


def values(x: torch.Tensor) -> list[int]:
    return (x[..., 0, 0, 0] * 255).round().long().flatten().tolist()


def class_folders(folder: Path, classes: list[str], per_class: int, ext: str = ".jpg") -> dict[int, str]:
    """Class c's images have values 10 * c + i; returns value -> class."""
    truth = {}
    for c, name in enumerate(classes):
        for i in range(per_class):
            v = 10 * c + i
            write_image(folder / name / f"{name}_{i}{ext}", v, fmt="PNG")  # PNG bytes: exact values
            truth[v] = name
    return truth


def check_episodes(dm, truth: dict[int, str], ways: int) -> None:
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    for t in range(batch.tasks):
        sv, qv = values(batch.support_x[t]), values(batch.query_x[t])
        labels = {}
        for v, y in zip(sv + qv, batch.support_y[t].tolist() + batch.query_y[t].tolist()):
            assert labels.setdefault(y, truth[v]) == truth[v]  # one class per label
        assert len(labels) == ways and not set(sv) & set(qv)
    with pytest.raises(RuntimeError, match="test-only"):
        dm.train_dataloader()
    with pytest.raises(RuntimeError, match="test-only"):
        dm.val_dataloader()


def test_eurosat(tmp_path: Path):
    from lightning_meta.datamodules.cdfsl import EUROSAT_CLASSES

    classes = list(EUROSAT_CLASSES)
    truth = class_folders(tmp_path / "2750", classes, per_class=4)
    with pytest.raises(ValueError, match="incomplete or modified"):
        EuroSATDataModule(str(tmp_path), cache_dir=str(tmp_path / "c")).setup("test")
    dm = EuroSATDataModule(
        str(tmp_path),
        strict=False,
        shots=1,
        queries=2,
        test_episodes=3,
        tasks_per_batch=3,
        image_size=12,
        cache_dir=str(tmp_path / "c"),
    )
    check_episodes(dm, truth, 5)
    assert dm.datasets["test"].store.class_names == sorted(classes)
    with pytest.raises(FileNotFoundError, match=r"2750/<class>/ folders not found under .*github.com/phelber/EuroSAT"):
        EuroSATDataModule(str(tmp_path / "nothing")).setup("test")


def test_cropdisease(tmp_path: Path):
    classes = [f"Plant___disease{c}" for c in range(6)]
    truth = class_folders(tmp_path / "dataset" / "train", classes, per_class=3)
    with pytest.raises(ValueError, match="has 6 classes, expected 38"):
        CropDiseaseDataModule(str(tmp_path), cache_dir=str(tmp_path / "c")).setup("test")
    dm = CropDiseaseDataModule(
        str(tmp_path),
        strict=False,
        shots=1,
        queries=2,
        test_episodes=2,
        tasks_per_batch=2,
        image_size=12,
        cache_dir=str(tmp_path / "c"),
    )
    check_episodes(dm, truth, 5)
    with pytest.raises(FileNotFoundError, match="saroz014/plant-disease"):
        CropDiseaseDataModule(str(tmp_path / "x")).setup("test")


def test_isic2018(tmp_path: Path):
    from lightning_meta.datamodules.cdfsl import ISIC_CLASSES

    classes = list(ISIC_CLASSES)
    (tmp_path / "ISIC2018_Task3_Training_GroundTruth").mkdir()
    truth = {}
    with open(
        tmp_path / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv", "w", newline=""
    ) as fh:
        w = csv.writer(fh)
        w.writerow(["image"] + classes)
        for c, name in enumerate(classes):
            for i in range(3):
                image_id = f"ISIC_{c:03d}{i:04d}"
                v = 10 * c + i
                write_image(tmp_path / "ISIC2018_Task3_Training_Input" / f"{image_id}.jpg", v, fmt="PNG")
                truth[v] = name
                w.writerow([image_id] + ["1.0" if k == c else "0.0" for k in range(7)])
    dm = ISICDataModule(
        str(tmp_path),
        strict=False,
        shots=1,
        queries=2,
        test_episodes=2,
        tasks_per_batch=2,
        image_size=12,
        cache_dir=str(tmp_path / "c"),
    )
    check_episodes(dm, truth, 5)
    assert dict(zip(dm.datasets["test"].store.class_names, dm.datasets["test"].store.counts().tolist())) == {
        c: 3 for c in classes
    }
    with pytest.raises(ValueError, match=r"found, expected\) images per class"):
        ISICDataModule(str(tmp_path), cache_dir=str(tmp_path / "c")).setup("test")
    with pytest.raises(FileNotFoundError, match="challenge.isic-archive.com"):
        ISICDataModule(str(tmp_path / "x")).setup("test")


def test_chestx_keeps_the_seven_single_finding_classes(tmp_path: Path):
    from lightning_meta.datamodules.cdfsl import CHESTX_CLASSES

    rows, truth, k = [], {}, 0
    for c, name in enumerate(CHESTX_CLASSES):
        for i in range(3):
            fname = f"{k:08d}_000.png"
            folder = tmp_path / ("images_001" if k % 2 else "images_002") / "images"  # Kaggle's split folders
            write_image(folder / fname, 10 * c + i, mode="L")
            truth[10 * c + i] = name
            rows.append([fname, name])
            k += 1
    for extra, label in (("x1.png", "Pneumonia"), ("x2.png", "No Finding"), ("x3.png", "Mass|Nodule")):
        write_image(tmp_path / "images_001" / "images" / extra, 250, mode="L")
        rows.append([extra, label])
    with open(tmp_path / "Data_Entry_2017.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID"])
        for r in rows:
            w.writerow(r + ["0", "1"])
    dm = ChestXDataModule(
        str(tmp_path),
        shots=1,
        queries=2,
        test_episodes=2,
        tasks_per_batch=2,
        image_size=12,
        cache_dir=str(tmp_path / "c"),
    )
    check_episodes(dm, truth, 5)
    store = dm.datasets["test"].store
    assert sorted(store.class_names) == sorted(CHESTX_CLASSES) and len(store) == 21  # the 3 other rows are left out
    assert store.images.shape[1] == 3  # grayscale X-rays as RGB, as the benchmark feeds ImageNet backbones
    with pytest.raises(FileNotFoundError, match="nihcc.app.box.com"):
        ChestXDataModule(str(tmp_path / "x")).setup("test")


def write_meta_album(root: Path, name: str, classes: int, per_class: int, base: int = 0) -> dict[int, str]:
    folder = root / name
    (folder / "images").mkdir(parents=True)
    info = {
        "dataset_name": name,
        "image_column_name": "FILE_NAME",
        "category_column_name": "CATEGORY",
        "super_category_column_name": "SUPER_CATEGORY",
        "has_super_categories": True,
    }
    (folder / "info.json").write_text(json.dumps(info))
    truth = {}
    with open(folder / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["FILE_NAME", "CATEGORY", "SUPER_CATEGORY"])
        for c in range(classes):
            for i in range(per_class):
                v = base + 10 * c + i
                fname = f"img_{c}_{i}.png"
                write_image(folder / "images" / fname, v, size=8)
                truth[v] = f"{name}/class {c}"
                w.writerow([fname, f"class {c}", "all"])
    return truth


def test_meta_album_reader_and_datamodule(tmp_path: Path):
    truth = write_meta_album(tmp_path, "BCT_Micro", classes=10, per_class=4)
    store = read_meta_album(tmp_path / "BCT_Micro", image_size=8, cache_dir=str(tmp_path / "c"))
    assert store.num_classes == 10 and store.counts().tolist() == [4] * 10
    for c, name in enumerate(store.class_names):
        assert {truth[v] for v in values(store.images[store.offsets[c] : store.offsets[c + 1]].float() / 255)} == {name}
    dm = MetaAlbumDataModule(
        str(tmp_path),
        "BCT_Micro",
        image_size=8,
        ways=2,
        shots=1,
        queries=2,
        tasks_per_batch=2,
        split_fractions=(0.6, 0.2, 0.2),
        train_episodes=2,
        val_episodes=2,
        test_episodes=2,
        cache_dir=str(tmp_path / "c"),
    )
    dm.setup()
    parts = [set(dm.datasets[s].store.class_names) for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == 10 and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert next(iter(dm.train_dataloader())).support_x.shape == (2, 2, 3, 8, 8)
    listed = MetaAlbumDataModule(
        str(tmp_path),
        "BCT_Micro",
        image_size=8,
        ways=2,
        queries=2,
        train_classes=[f"class {i}" for i in range(6)],
        val_classes=["class 6", "class 7"],
        test_classes=["class 8", "class 9"],
        cache_dir=str(tmp_path / "c"),
    )
    listed.setup()
    assert listed.datasets["test"].store.class_names == ["BCT_Micro/class 8", "BCT_Micro/class 9"]
    with pytest.raises(
        FileNotFoundError, match=r"BCT_Mini/info.json not found. Meta-Album folders next to it: \['BCT_Micro'\]"
    ):
        MetaAlbumDataModule(str(tmp_path), "BCT_Mini").setup()
    (tmp_path / "BCT_Micro" / "images" / "img_0_0.png").unlink()
    with pytest.raises(ValueError, match="listed in labels.csv but missing"):
        read_meta_album(tmp_path / "BCT_Micro", cache_dir=str(tmp_path / "c2"))


def toy_store(prefix: str, classes: int, per_class: int, value: int) -> ClassStore:
    n = classes * per_class
    images = torch.full((n, 1, 2, 2), value, dtype=torch.uint8)
    return ClassStore.from_labeled(images, [f"{prefix}{i // per_class}" for i in range(n)])


def test_multi_source_sampling_purity_and_splits():
    a = {s: toy_store(f"a{s}", 6, 10, 10) for s in ("train", "val", "test")}
    b = {s: toy_store(f"b{s}", 6, 30, 20) for s in ("train", "val")}
    dm = MultiSourceDataModule(
        {"a": a, "b": b},
        ways=3,
        shots=1,
        queries=2,
        tasks_per_batch=4,
        train_episodes=400,
        val_episodes=40,
        test_episodes=8,
        sampling="size",
    )
    dm.setup()
    train = dm.datasets["train"]
    picks = [train.source_of(i) for i in range(400)]
    assert 0.15 < picks.count("a") / 400 < 0.35  # by size: 60 against 180 images -> 1/4
    for i in (0, 7):
        src = values(train[i].support_x)[0]
        assert src == {"a": 10, "b": 20}[picks[i]]
    assert set(dm.datasets["test"].source_of(i) for i in range(8)) == {"a"}  # only a has a test split
    again = MultiSourceDataModule({"a": a, "b": b}, ways=3, shots=1, queries=2, train_episodes=400, sampling="size")
    again.setup()
    assert [again.datasets["train"].source_of(i) for i in range(400)] == picks
    again.datasets["train"].set_epoch(1)
    assert [again.datasets["train"].source_of(i) for i in range(400)] != picks
    uniform = MultiSourceDataModule({"a": a, "b": b}, ways=3, shots=1, queries=2, train_episodes=400)
    uniform.setup()
    assert 0.4 < [uniform.datasets["train"].source_of(i) for i in range(400)].count("a") / 400 < 0.6
    only = MultiSourceDataModule({"a": a, "b": b}, splits={"train": ["b"], "test": ["a"]}, ways=3, shots=1, queries=2)
    only.setup()
    assert set(only.datasets) == {"train", "test"}
    assert only.val_dataloader() == []  # no source has a validation split: validation is off, as in every datamodule
    no_test = MultiSourceDataModule({"a": a, "b": b}, splits={"train": ["b"]}, ways=3, shots=1, queries=2)
    no_test.setup()
    with pytest.raises(RuntimeError, match="no source of MultiSourceDataModule has a 'test' split"):
        no_test.test_dataloader()
    with pytest.raises(ValueError, match=r"sources \['b'\] have no 'test' split"):
        MultiSourceDataModule({"a": a, "b": b}, splits={"test": ["b"]}).setup()
    with pytest.raises(ValueError, match="different image shapes"):
        MultiSourceEpisodeDataset(
            {
                "a": EpisodeDataset(a["train"], ways=2, shots=1, queries=1, length=4, seed=0, split="t"),
                "c": EpisodeDataset(
                    ClassStore.from_labeled(torch.zeros(4, 1, 3, 3, dtype=torch.uint8), [0, 0, 1, 1]),
                    ways=2,
                    shots=1,
                    queries=1,
                    length=4,
                    seed=0,
                    split="t",
                ),
            },
            length=4,
            seed=0,
            split="t",
        )


def test_multi_source_variable_episodes_and_meta_album_source(tmp_path: Path):
    write_meta_album(tmp_path, "AAA_Micro", classes=8, per_class=6)
    write_meta_album(tmp_path, "BBB_Micro", classes=8, per_class=6, base=100)
    # cross-domain: all of one dataset's classes for training, all of the other's for testing
    srcs = {
        "AAA": {"train": read_meta_album(tmp_path / "AAA_Micro", image_size=8, cache_dir=str(tmp_path / "c"))},
        "BBB": {"test": read_meta_album(tmp_path / "BBB_Micro", image_size=8, cache_dir=str(tmp_path / "c"))},
    }
    dm = MultiSourceDataModule(
        srcs,
        tasks_per_batch=3,
        train_episodes=6,
        test_episodes=3,
        variable_episodes=VariableEpisodes(min_ways=2, max_ways=5),
    )
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert all(v < 100 for v in values(b.support_x[b.support_mask]))
    t = next(iter(dm.test_dataloader()))
    assert all(v >= 100 for v in values(t.query_x[t.query_mask]))
