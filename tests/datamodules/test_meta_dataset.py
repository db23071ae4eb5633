"""Meta-Dataset's converted records: small TFRecord files and dataset_spec.json files in the official layout."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import crc32c
import numpy as np
import pytest
import torch
from PIL import Image
from tfrecord.writer import TFRecordWriter

from lightning_meta.datamodules import MultiSourceDataModule, VariableEpisodes
from lightning_meta.datamodules.meta_dataset import (
    MetaDatasetDataModule,
    load_dataset_spec,
    read_class_records,
    read_meta_dataset_split,
)


def png(rgb: tuple[int, int, int], size: tuple[int, int] = (20, 14)) -> bytes:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = rgb
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def rgb(class_id: int, i: int) -> tuple[int, int, int]:
    return (10 * class_id + 5, 30 * i + 7, 200 - 9 * class_id)


def write_records(path: Path, class_id: int, n: int, label: int | None = None) -> None:
    w = TFRecordWriter(str(path))
    for i in range(n):
        w.write({"image": (png(rgb(class_id, i)), "byte"), "label": (class_id if label is None else label, "int")})
    w.close()


def write_source(folder: Path, per_split: tuple[int, int, int] = (4, 2, 3), images: int = 5) -> Path:
    """A DatasetSpecification source like Meta-Dataset's dtd: class ids 0.. train, then valid, then test."""
    folder.mkdir(parents=True)
    n = sum(per_split)
    spec = {
        "name": "tiny_dtd",
        "classes_per_split": {"TRAIN": per_split[0], "VALID": per_split[1], "TEST": per_split[2]},
        "images_per_class": {str(k): images for k in range(n)},
        "class_names": {str(k): f"texture{k:02d}" for k in range(n)},
        "path": "/path/to/records/tiny_dtd",
        "file_pattern": "{}.tfrecords",
        "__class__": "DatasetSpecification",
    }
    (folder / "dataset_spec.json").write_text(json.dumps(spec, indent=2))
    for k in range(n):
        write_records(folder / f"{k}.tfrecords", k, images)
    return folder


# --- an independent encoder: TFRecord framing and the tf.train.Example wire format written out by hand ---


def write_bilevel(folder: Path, images: int = 4) -> Path:
    """A BiLevelDatasetSpecification source like Meta-Dataset's omniglot: superclasses A, B (train), C (valid), D
    (test) with 3, 4, 3 and 2 classes; classes 0 and 1 share a name, so the train store prefixes names with ids."""
    folder.mkdir(parents=True)
    per_super = [3, 4, 3, 2]
    n = sum(per_super)
    names = {str(k): ("dup" if k < 2 else f"char{k:02d}") for k in range(n)}
    (folder / "dataset_spec.json").write_text(json.dumps({
        "name": "omniglot", "superclasses_per_split": {"TRAIN": 2, "VALID": 1, "TEST": 1},
        "classes_per_superclass": {str(s): c for s, c in enumerate(per_super)},
        "images_per_class": {str(k): images for k in range(n)},
        "superclass_names": {"0": "A", "1": "B", "2": "C", "3": "D"}, "class_names": names, "path": "/x",
        "file_pattern": "{}.tfrecords", "__class__": "BiLevelDatasetSpecification",
    }))  # fmt: skip
    for k in range(n):
        write_records(folder / f"{k}.tfrecords", k, images)
    return folder


def dag_node(w: str, children: list[str]) -> dict:
    return {"wn_id": w, "words": w, "children_ids": children, "parents_ids": []}  # parents are not read


def write_hierarchical(folder: Path, images: int = 4) -> Path:
    """A HierarchicalDatasetSpecification source like ilsvrc_2012: the train subgraph r -> {a, b}, a -> {n1, n2, n3},
    b -> {n3, n4} (n3 has two parents); valid v -> {n5, n6}; test t -> {n7, n8}."""
    folder.mkdir(parents=True)
    graphs = {
        "TRAIN": [dag_node("r", ["a", "b"]), dag_node("a", ["n1", "n2", "n3"]), dag_node("b", ["n3", "n4"])]
        + [dag_node(f"n{k}", []) for k in (1, 2, 3, 4)],
        "VALID": [dag_node("v", ["n5", "n6"]), dag_node("n5", []), dag_node("n6", [])],
        "TEST": [dag_node("t", ["n7", "n8"]), dag_node("n7", []), dag_node("n8", [])],
    }
    leaves = {"TRAIN": [1, 2, 3, 4], "VALID": [5, 6], "TEST": [7, 8]}
    (folder / "dataset_spec.json").write_text(json.dumps({
        "name": "ilsvrc_2012", "split_subgraphs": graphs,
        "images_per_class": {s: {f"n{k}": images for k in ks} for s, ks in leaves.items()},
        "class_names": {str(k - 1): f"n{k}" for k in range(1, 9)}, "path": "/x", "file_pattern": "{}.tfrecords",
        "__class__": "HierarchicalDatasetSpecification",
    }))  # fmt: skip
    for k in range(8):
        write_records(folder / f"{k}.tfrecords", k, images)
    return folder


def varint(x: int) -> bytes:
    out = bytearray()
    x &= (1 << 64) - 1  # int64 values are encoded as unsigned 64-bit varints
    while True:
        b = x & 0x7F
        x >>= 7
        out.append(b | (0x80 if x else 0))
        if not x:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def example(image: bytes, label: int) -> bytes:
    """Example{features(1): Features{feature(1): map<string, Feature>}}; Feature: bytes_list(1) / int64_list(3)."""
    image_feature = field(1, field(1, image))  # Feature.bytes_list = BytesList{value: [image]}
    label_feature = field(3, field(1, varint(label)))  # Feature.int64_list = Int64List{value: [label]} (packed)
    entries = field(1, field(1, b"image") + field(2, image_feature)) + field(
        1, field(1, b"label") + field(2, label_feature)
    )
    return field(1, entries)


def masked_crc(data: bytes) -> bytes:
    crc = crc32c.crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def frame(record: bytes) -> bytes:
    length = struct.pack("<Q", len(record))
    return length + masked_crc(length) + record + masked_crc(record)


def test_hand_framed_records_are_read(tmp_path: Path) -> None:
    images = [png(rgb(3, i)) for i in range(3)]
    path = tmp_path / "3.tfrecords"
    path.write_bytes(b"".join(frame(example(im, 3)) for im in images))
    assert read_class_records([path], 3) == images
    assert read_class_records([path], 3, max_images=2) == images[:2]
    # the package's writer produces exactly this framing for the same records
    other = tmp_path / "w.tfrecords"
    write_records(other, 3, 3)
    assert read_class_records([other], 3) == images


def test_dataset_spec_schemas(tmp_path: Path) -> None:
    spec = load_dataset_spec(write_source(tmp_path / "flat"))
    assert spec.splits == {"train": [0, 1, 2, 3], "val": [4, 5], "test": [6, 7, 8]}
    assert spec.class_names[5] == "texture05" and spec.images_per_class[8] == 5
    bilevel = tmp_path / "omniglot"
    bilevel.mkdir()
    (bilevel / "dataset_spec.json").write_text(json.dumps({
        "name": "omniglot", "superclasses_per_split": {"TRAIN": 2, "VALID": 1, "TEST": 1},
        "classes_per_superclass": {"0": 3, "1": 2, "2": 4, "3": 1}, "images_per_class": {str(k): 20 for k in range(10)},
        "superclass_names": {"0": "A", "1": "B", "2": "C", "3": "D"},
        "class_names": {str(k): f"c{k}" for k in range(10)}, "path": "/x", "file_pattern": "{}.tfrecords",
        "__class__": "BiLevelDatasetSpecification",
    }))  # fmt: skip
    assert load_dataset_spec(bilevel).splits == {"train": [0, 1, 2, 3, 4], "val": [5, 6, 7, 8], "test": [9]}
    hier = tmp_path / "ilsvrc"
    hier.mkdir()

    def node(w: str, children: list[str], parents: list[str]) -> dict:
        return {"wn_id": w, "words": w, "children_ids": children, "parents_ids": parents}

    graphs = {
        "TRAIN": [node("n0", ["n1", "n2"], []), node("n1", [], ["n0"]), node("n2", [], ["n0"])],
        "VALID": [node("n9", ["n3"], []), node("n3", [], ["n9"])],
        "TEST": [node("n8", ["n4"], []), node("n4", [], ["n8"])],
    }
    (hier / "dataset_spec.json").write_text(json.dumps({
        "name": "ilsvrc_2012", "split_subgraphs": graphs,
        "images_per_class": {"TRAIN": {"n0": 7, "n1": 3, "n2": 4}, "VALID": {"n9": 5, "n3": 5}, "TEST": {"n8": 6, "n4": 6}},
        "class_names": {"0": "n1", "1": "n4", "2": "n2", "3": "n3"}, "path": "/x", "file_pattern": "{}.tfrecords",
        "__class__": "HierarchicalDatasetSpecification",
    }))  # fmt: skip
    h = load_dataset_spec(hier)
    assert h.splits == {"train": [0, 2], "val": [3], "test": [1]}
    assert h.images_per_class == {0: 3, 2: 4, 3: 5, 1: 6}


def test_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset_spec\.json is missing.*convert_datasets_to_records"):
        load_dataset_spec(tmp_path)
    (tmp_path / "dataset_spec.json").write_text(json.dumps({"name": "x", "__class__": "Other"}))
    with pytest.raises(ValueError, match="not a Meta-Dataset dataset spec"):
        load_dataset_spec(tmp_path)
    folder = write_source(tmp_path / "s")
    d = json.loads((folder / "dataset_spec.json").read_text())
    d["classes_per_split"]["TEST"] = 2
    (folder / "dataset_spec.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="cover 8 class ids but class_names has 9"):
        load_dataset_spec(folder)
    del d["classes_per_split"]
    (folder / "dataset_spec.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"malformed DatasetSpecification \(KeyError: 'classes_per_split'\)"):
        load_dataset_spec(folder)
    d["classes_per_split"] = {"TRAIN": 9, "VALID": 0, "TEST": 0}  # an evaluation-only source: no datamodule
    (folder / "dataset_spec.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="val split no classes"):
        MetaDatasetDataModule(str(folder), cache_dir=str(tmp_path / "cache")).setup()


def test_split_store_pixels_and_order(tmp_path: Path) -> None:
    spec = load_dataset_spec(write_source(tmp_path / "src"))
    store = read_meta_dataset_split(spec, "val", image_size=8)
    assert store.class_names == ["texture04", "texture05"] and store.counts().tolist() == [5, 5]
    expect = torch.tensor([rgb(k, i) for k in (4, 5) for i in range(5)], dtype=torch.float32)
    assert torch.equal(store.images.float().mean(dim=(2, 3)), expect)  # PNG is lossless, resize keeps a flat colour
    capped = read_meta_dataset_split(spec, "val", image_size=8, max_images_per_class=2)
    assert capped.counts().tolist() == [2, 2]


def test_bilinear_align_corners_resize(tmp_path: Path) -> None:
    """A linear ramp stays the same ramp under bilinear resizing with align_corners=True (closed form)."""
    folder = write_source(tmp_path / "src", per_split=(1, 1, 1), images=1)
    y, x = np.mgrid[0:9, 0:9]
    ramp = np.stack([10 * x + 20 * y, 5 * x + 40, 25 * y + 3], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    (folder / "0.tfrecords").write_bytes(frame(example(buf.getvalue(), 0)))
    store = read_meta_dataset_split(load_dataset_spec(folder), "train", image_size=5)
    y5, x5 = np.mgrid[0:5, 0:5]  # output pixel i sits at source 2 * i
    expect = np.stack([20 * x5 + 40 * y5, 10 * x5 + 40, 50 * y5 + 3], axis=0)
    assert np.array_equal(store.images[0].numpy(), expect)


def test_record_errors_name_the_file(tmp_path: Path) -> None:
    folder = write_source(tmp_path / "src")
    spec = load_dataset_spec(folder)
    write_records(folder / "5.tfrecords", 5, 5, label=4)
    with pytest.raises(ValueError, match=r"5\.tfrecords: record 0 has label \[4\] but the file holds class 5"):
        read_meta_dataset_split(spec, "val")
    data = (folder / "4.tfrecords").read_bytes()
    (folder / "4.tfrecords").write_bytes(data[:-30])
    with pytest.raises(ValueError, match=r"4\.tfrecords is not a readable TFRecord.*truncated or corrupt"):
        read_meta_dataset_split(spec, "val")
    write_records(folder / "4.tfrecords", 4, 3)
    write_records(folder / "5.tfrecords", 5, 5)
    with pytest.raises(ValueError, match=r"class 4 \('texture04'\) of tiny_dtd has 3 records .* says 5"):
        read_meta_dataset_split(spec, "val")
    assert read_meta_dataset_split(spec, "val", strict=False).counts().tolist() == [3, 5]
    (folder / "7.tfrecords").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 class files of tiny_dtd's test split .*7\.tfrecords"):
        read_meta_dataset_split(spec, "test")
    (folder / "6.tfrecords").write_bytes(frame(b"\xff\xff\xff"))
    write_records(folder / "7.tfrecords", 7, 5)
    with pytest.raises(ValueError, match=r"6\.tfrecords is not a readable TFRecord"):
        read_meta_dataset_split(spec, "test")


def test_sharded_file_pattern(tmp_path: Path) -> None:
    folder = write_source(tmp_path / "src", per_split=(2, 1, 1), images=4)
    d = json.loads((folder / "dataset_spec.json").read_text())
    d["file_pattern"] = "{}_{}.tfrecords"
    d["images_per_class"] = {str(k): {"train": 3, "test": 1} for k in range(4)}
    (folder / "dataset_spec.json").write_text(json.dumps(d))
    for k in range(4):
        path = folder / f"{k}.tfrecords"
        data = path.read_bytes()
        path.unlink()
        write_records(folder / f"{k}_train.tfrecords", k, 3)
        write_records(folder / f"{k}_test.tfrecords", k, 1)
        del data
    store = read_meta_dataset_split(load_dataset_spec(folder), "train", image_size=4)
    assert store.counts().tolist() == [4, 4]


def test_datamodule_episodes_and_normalisation(tmp_path: Path) -> None:
    write_source(tmp_path / "records" / "tiny_dtd")
    dm = MetaDatasetDataModule(
        str(tmp_path / "records"),
        source="tiny_dtd",
        image_size=8,
        ways=2,
        shots=1,
        queries=2,
        eval_ways=2,
        tasks_per_batch=1,
        val_episodes=2,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup()
    ep = next(iter(dm.val_dataloader()))
    assert ep.support_x.shape[-3:] == (3, 8, 8) and ep.query_y.numel() == 4
    assert ep.support_x.min() >= -1 and ep.support_x.max() <= 1
    # Meta-Dataset's [-1, 1] scaling: 2 * (pixel / 255 - 0.5); every pixel value is one of the flat colours
    allowed = torch.tensor([2 * (v / 255 - 0.5) for k in (4, 5) for i in range(5) for v in rgb(k, i)])
    assert torch.isclose(ep.support_x.reshape(-1, 1), allowed.reshape(1, -1), atol=1e-5).any(dim=1).all()
    stores = dm.build_stores()  # cached
    assert stores["test"].class_names == ["texture06", "texture07", "texture08"]
    with pytest.raises(FileNotFoundError, match="dataset_spec.json is missing"):
        MetaDatasetDataModule(str(tmp_path / "records"), source="aircraft").setup()
    with pytest.raises(ValueError, match="max_images_per_class=0"):
        MetaDatasetDataModule(str(tmp_path), max_images_per_class=0)


def test_spec_hierarchies(tmp_path: Path) -> None:
    bilevel = load_dataset_spec(write_bilevel(tmp_path / "omniglot"))
    assert bilevel.superclasses == {"A": [0, 1, 2], "B": [3, 4, 5, 6], "C": [7, 8, 9], "D": [10, 11]}
    assert bilevel.store_names("train")[:3] == ["00000:dup", "00001:dup", "00002:char02"]
    h = bilevel.hierarchy("train")
    assert h is not None and h.kind == "superclasses"
    assert dict(h.groups) == {"A": ("00000:dup", "00001:dup", "00002:char02"),
                              "B": ("00003:char03", "00004:char04", "00005:char05", "00006:char06")}  # fmt: skip
    assert dict(bilevel.hierarchy("test").groups) == {"D": ("char10", "char11")}  # type: ignore[union-attr]
    # the names are those of the split's store (ids prefixed because two train classes are both "dup")
    store = read_meta_dataset_split(bilevel, "train", image_size=4)
    assert h.eligible(store.class_names, min_ways=3) == {"A": [0, 1, 2], "B": [3, 4, 5, 6]}
    dag = load_dataset_spec(write_hierarchical(tmp_path / "ilsvrc"))
    assert dag.subgraphs["val"] == {"v": ["n5", "n6"], "n5": [], "n6": []}
    d = dag.hierarchy("train", max_spanning_leaves=3)
    assert d is not None and d.kind == "dag" and d.max_spanning_leaves == 3
    assert dict(d.groups) == {"a": ("n1", "n2", "n3"), "b": ("n3", "n4"), "r": ("n1", "n2", "n3", "n4")}
    assert list(d.eligible(["n1", "n2", "n3", "n4"], min_ways=2)) == ["a", "b"]  # r spans 4 > 3
    assert load_dataset_spec(write_source(tmp_path / "flat")).hierarchy("train") is None


def test_datamodule_draws_classes_from_the_spec_hierarchy(tmp_path: Path) -> None:
    common = dict(image_size=4, tasks_per_batch=1, train_episodes=40, val_episodes=4, test_episodes=4,
                  cache_dir=str(tmp_path / "cache"), variable_episodes=VariableEpisodes(min_ways=2, max_ways=3))  # fmt: skip
    write_bilevel(tmp_path / "records" / "omniglot")
    dm = MetaDatasetDataModule(str(tmp_path / "records"), source="omniglot", **common)
    dm.setup()
    train = dm.datasets["train"]
    assert train.class_groups is not None and train.class_groups.names == ("A", "B")
    supers = {"A": {"00000:dup", "00001:dup", "00002:char02"}, "B": {f"0000{k}:char0{k}" for k in range(3, 7)}}
    seen = set()
    for i in range(len(train)):
        names = {train.class_name(c) for c in train.composition(i)[0].tolist()}
        group = [g for g, members in supers.items() if names <= members]
        assert len(group) == 1 and 2 <= len(names) <= 3, names
        seen.add(group[0])
    assert seen == {"A", "B"}
    assert dm.datasets["test"].class_groups.names == ("D",)
    off = MetaDatasetDataModule(str(tmp_path / "records"), source="omniglot", use_hierarchy=False, **common)
    off.setup()
    assert off.datasets["train"].class_groups is None
    uniform = off.datasets["train"]
    assert any(len({uniform.class_name(c) < "00003" for c in uniform.composition(i)[0].tolist()}) == 2
               for i in range(40))  # fmt: skip  # uniform draws mix superclasses
    # ILSVRC's DAG: every episode is the classes of node a or b (r spans 4 > max_spanning_leaves=3)
    write_hierarchical(tmp_path / "records" / "ilsvrc_2012")
    il = MetaDatasetDataModule(str(tmp_path / "records"), source="ilsvrc_2012", max_spanning_leaves=3, **common)
    il.setup()
    t = il.datasets["train"]
    assert t.class_groups is not None and t.class_groups.names == ("a", "b")
    draws = {tuple(sorted(t.class_name(c) for c in t.composition(i)[0].tolist())) for i in range(len(t))}
    assert draws == {("n1", "n2", "n3"), ("n3", "n4")}
    # several sources: a MetaDatasetDataModule source keeps its hierarchy
    multi = MultiSourceDataModule({"omniglot": dm, "ilsvrc": il}, tasks_per_batch=1, train_episodes=4, val_episodes=2,
                                  test_episodes=2, variable_episodes=VariableEpisodes(min_ways=2, max_ways=3))  # fmt: skip
    multi.setup()
    per_source = multi.datasets["train"].sources
    assert per_source["omniglot"].class_groups.names == ("A", "B")
    assert per_source["ilsvrc"].class_groups.names == ("a", "b")
    with pytest.raises(ValueError, match="max_spanning_leaves=0"):
        MetaDatasetDataModule(str(tmp_path), max_spanning_leaves=0)
