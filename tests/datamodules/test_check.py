"""``lightning-meta data check ROOT`` on the real Omniglot subsets and on tiny trees in every supported layout."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tfrecord.writer import TFRecordWriter

from lightning_meta import cli
from lightning_meta.datamodules.check import check_root, main
from tests._tiny_data import (
    write_tiny_cifar100,
    write_tiny_mini_imagenet,
    write_tiny_omniglot,
)

OMNIGLOT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot"


def run(root: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["check", str(root), "--cache-dir", str(cache)])
    return code, capsys.readouterr().out


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason="needs ../shared/data/omniglot")
def test_real_omniglot_subsets_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(OMNIGLOT, tmp_path, capsys)
    assert code == 0, out
    assert "images_background_small1.zip: 5 alphabets, 136 characters, 20 drawings each" in out
    assert "images_background_small2.zip: 5 alphabets, 156 characters" in out
    assert "images_background and images_evaluation absent" in out and "download=True" in out
    with pytest.raises(SystemExit) as exit_info:  # the console script's subcommand
        cli.main(["data", "check", str(OMNIGLOT), "--cache-dir", str(tmp_path)])
    assert exit_info.value.code == 0


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason="needs ../shared/data/omniglot")
def test_omniglot_corrupt_zip_and_wrong_checksum(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    data = bytearray((OMNIGLOT / "images_background_small1.zip").read_bytes())
    shutil.copy(OMNIGLOT / "images_background_small2.zip", root / "images_background.zip")  # not the official file
    data[5000] ^= 0xFF  # inside a member's compressed data: its CRC no longer matches
    (root / "images_background_small1.zip").write_bytes(bytes(data))
    code, out = run(root, tmp_path / "cache", capsys)
    assert code == 1
    assert "images_background_small1.zip: member images_background_small1/" in out and "fails its CRC check" in out
    assert "images_background.zip: 5 alphabets, 156 characters (official: 30, 964" in out
    assert "has md5 68d2efa1b9178cc56df9314c21c6e718" in out
    assert out.rstrip().endswith("3 problem(s)")


def test_tiny_omniglot_folder_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_tiny_omniglot(tmp_path / "omniglot", alphabets=2, characters=3, drawings=20)
    (root / "images_background" / "Alphabet_0" / "character01" / "00_00.png").unlink()
    code, out = run(root, tmp_path / "cache", capsys)
    assert code == 1
    assert "images_background: 2 alphabets, 6 characters (official: 30, 964, 20 drawings each)" in out
    assert "characters without 20 drawings: ['Alphabet_0/character01']" in out


def write_mini_csv_tree(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    for s, split in enumerate(("train", "val", "test")):
        with open(root / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["filename", "label"])
            for k in (1, 2):
                name = f"n0{s}00000{s}{k:08d}.jpg"
                w.writerow([name, f"n0{s}00000{s}"])
                Image.new("RGB", (8, 8), (s * 50, k * 60, 9)).save(root / "images" / name)
    return root


def test_mini_imagenet_csv_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_mini_csv_tree(tmp_path / "mini")
    (root / "images" / "n0100000100000002.jpg").unlink()
    code, out = run(root, tmp_path / "cache", capsys)
    assert code == 1 and "miniImageNet (CSV + images/)" in out
    assert "1 of the 2 images of val.csv missing from images/ (e.g. ['n0100000100000002.jpg'])" in out
    assert "train.csv: all 2 images present (1 classes)" in out
    assert "train.csv: not Ravi & Larochelle's file" in out
    assert "train.csv: 1 classes with [2] images each (published: 64 classes x 600)" in out
    assert "twitter-research/meta-learning-lstm" in out and "format='ilsvrc'" in out


def test_mini_imagenet_pickles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_tiny_mini_imagenet(tmp_path / "mini", classes={"train": 3, "val": 2}, per_class=4)
    code, out = run(root, tmp_path / "cache", capsys)
    assert code == 1
    assert "mini-imagenet-cache-train.pkl: 3 classes, 12 images (published: 64 classes x 600)" in out
    assert "mini-imagenet-cache-test.pkl missing" in out


def test_tiered_imagenet_pickles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "tiered"
    root.mkdir()
    with open(root / "train_labels.pkl", "wb") as fh:
        pickle.dump({"label_specific": np.array([0, 0, 1, 2]), "label_general": np.array([0, 0, 0, 1])}, fh)
    code, out = run(root, tmp_path / "cache", capsys)
    assert code == 1
    assert "train_labels.pkl: 3 classes, 4 images (published: 351, 448695)" in out
    assert "train_images_png.pkl missing" in out and "val_labels.pkl missing" in out


def test_cifar100_checksums(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_tiny_cifar100(tmp_path / "cifar", per_class=(1, 1))
    code, out = run(root, tmp_path / "cache", capsys)
    assert code == 1 and "CIFAR-100 (python version)" in out
    assert "has md5 16019d7e3df5f24257cddd939b257f8d" in out  # the published md5 of cifar-100-python/train
    assert (tmp_path / "cache" / "file-md5.json").is_file()  # hashes are remembered


def test_ilsvrc_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    train = tmp_path / "ilsvrc" / "train"
    for synset in ("n01532829", "n09999999"):
        (train / synset).mkdir(parents=True)
        for n in (1, 2, 3):
            (train / synset / f"{synset}_{n}.JPEG").write_bytes(b"")  # counted, not decoded
    code, out = run(tmp_path / "ilsvrc", tmp_path / "cache", capsys)
    assert code == 1 and "2 synset folders" in out
    assert (
        "miniImageNet: 99 of its 100 synsets missing" in out and "n01532829 (3 < 1298)" in out
    )  # its highest CSV index is 1298
    assert "tieredImageNet: 607 of its 608 synsets missing" in out
    assert "image-net.org" in out and "cannot be redistributed" in out
    # a folder complete for one benchmark is usable: the other one's gaps become a note (exit 0)
    from lightning_meta.datamodules import ilsvrc

    rows = {"train": [("n01532829", 3)], "val": [("n09999999", 2)], "test": [("n09999999", 1)]}
    monkeypatch.setattr(ilsvrc, "mini_imagenet_split_rows", lambda split: rows[split])
    code, out = run(tmp_path / "ilsvrc", tmp_path / "cache", capsys)
    assert code == 0 and "ok      miniImageNet: all 100 synsets present" in out
    assert "note    tieredImageNet: 607 of its 608 synsets missing" in out


def test_meta_dataset_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "records" / "tiny"
    source.mkdir(parents=True)
    spec = {"name": "tiny", "classes_per_split": {"TRAIN": 1, "VALID": 1, "TEST": 1},
            "images_per_class": {"0": 2, "1": 3, "2": 2}, "class_names": {"0": "a", "1": "b", "2": "c"},
            "path": "/x", "file_pattern": "{}.tfrecords", "__class__": "DatasetSpecification"}  # fmt: skip
    (source / "dataset_spec.json").write_text(json.dumps(spec))
    for k, n in ((0, 2), (1, 3), (2, 2)):
        w = TFRecordWriter(str(source / f"{k}.tfrecords"))
        for _ in range(n):
            w.write({"image": (b"\x89PNG fake", "byte"), "label": (k, "int")})
        w.close()
    code, out = run(tmp_path / "records", tmp_path / "cache", capsys)
    assert code == 0, out
    assert "tiny: 3 class files, record counts match the spec; classes {'train': 1, 'val': 1, 'test': 1}" in out
    data = (source / "1.tfrecords").read_bytes()
    (source / "1.tfrecords").write_bytes(data[:-3])
    (source / "2.tfrecords").unlink()
    code, out = run(source, tmp_path / "cache", capsys)
    assert code == 1
    assert "1 of 3 class files missing (e.g. ['2.tfrecords'])" in out
    assert "1.tfrecords: truncated record" in out


def test_image_folder_and_unknown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "folder"
    for c, n in (("cat", 2), ("dog", 3)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (4, 4)).save(root / c / f"{i}.png")
    code, out = run(root, tmp_path / "cache", capsys)
    assert code == 0 and "2 classes with images, 2 to 3 images per class (5 in all)" in out
    (root / "empty").mkdir()
    code, out = run(root, tmp_path / "cache", capsys)
    assert code == 1 and "1 class folders hold no images (e.g. ['empty'])" in out
    (tmp_path / "nothing").mkdir()
    code, out = run(tmp_path / "nothing", tmp_path / "cache", capsys)
    assert code == 2 and "no supported dataset layout found" in out
    code, out = run(tmp_path / "missing", tmp_path / "cache", capsys)
    assert code == 2 and "is not a folder" in out
    assert check_root(root, str(tmp_path / "cache"))[0].layout == "image folder (<class>/<image>)"
