"""Meta-Dataset's converted records (dataset_spec.json + <class id>.tfrecords), written here with ``tfrecord``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("tfrecord")

from tfrecord import TFRecordWriter

from lightning_meta.datamodules import (
    MetaDatasetRecordsDataModule,
    VariableEpisodes,
    read_dataset_spec,
)


def png(value: int, size: int = 10) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_source(folder: Path, per_split=(6, 3, 3), per_class: int = 5, bilevel: bool = False, shard: bool = False) -> None:
    folder.mkdir(parents=True)
    n = sum(per_split)
    spec = {"name": folder.name, "images_per_class": {str(c): per_class for c in range(n)},
            "class_names": {str(c): f"cls{c:02d}" for c in range(n)}, "path": str(folder), "file_pattern": "{}.tfrecords"}
    if bilevel:  # superclasses of 3 classes each
        spec["superclasses_per_split"] = {"TRAIN": per_split[0] // 3, "VALID": per_split[1] // 3, "TEST": per_split[2] // 3}
        spec["classes_per_superclass"] = {str(s): 3 for s in range(n // 3)}
    else:
        spec["classes_per_split"] = {"TRAIN": per_split[0], "VALID": per_split[1], "TEST": per_split[2]}
    (folder / "dataset_spec.json").write_text(json.dumps(spec))
    for c in range(n):
        names = [f"{c}_0.tfrecords", f"{c}_1.tfrecords"] if shard else [f"{c}.tfrecords"]
        writers = [TFRecordWriter(str(folder / name)) for name in names]
        for i in range(per_class):
            writers[i % len(writers)].write({"image": (png(10 * c + i), "byte"), "label": (c, "int")})
        for w in writers:
            w.close()


@pytest.mark.parametrize("bilevel,shard", [(False, False), (True, True)])
def test_records_become_split_stores_and_episodes(tmp_path: Path, bilevel: bool, shard: bool):
    write_source(tmp_path / "records" / "aircraft", bilevel=bilevel, shard=shard)
    spec = read_dataset_spec(tmp_path / "records" / "aircraft")
    assert [c for c, _ in spec["val"]] == [6, 7, 8] and spec["test"][0] == (9, "cls09")
    dm = MetaDatasetRecordsDataModule(str(tmp_path / "records"), "aircraft", image_size=10, ways=3, shots=1, queries=2,
                                      tasks_per_batch=2, train_episodes=2, val_episodes=2, test_episodes=2,
                                      cache_dir=str(tmp_path / "c"))
    dm.setup()
    test = dm.datasets["test"].store
    assert test.class_names == ["aircraft/cls09", "aircraft/cls10", "aircraft/cls11"] and test.counts().tolist() == [5, 5, 5]
    for k, name in enumerate(test.class_names):  # every decoded image is its class's (pixel value 10 * id + i)
        c = int(name[-2:])
        vals = sorted(test.images[test.offsets[k]:test.offsets[k + 1], 0, 0, 0].tolist())
        assert vals == [10 * c + i for i in range(5)]
    assert next(iter(dm.train_dataloader())).support_x.shape == (2, 3, 3, 10, 10)


def test_variable_episodes_and_errors(tmp_path: Path):
    write_source(tmp_path / "cu_birds", per_split=(8, 3, 3))
    dm = MetaDatasetRecordsDataModule(str(tmp_path / "cu_birds"), image_size=10, tasks_per_batch=2, train_episodes=2,
                                      cache_dir=str(tmp_path / "c"), variable_episodes=VariableEpisodes(min_ways=2, max_ways=8))
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b.support_y.max() < 8 and torch.equal(b.query_mask, b.query_y >= 0)
    with pytest.raises(FileNotFoundError, match="convert_datasets_to_records"):
        read_dataset_spec(tmp_path / "nope")
    (tmp_path / "cu_birds" / "3.tfrecords").unlink()
    with pytest.raises(FileNotFoundError, match=r"3.tfrecords not found"):
        MetaDatasetRecordsDataModule(str(tmp_path / "cu_birds"), cache_dir=str(tmp_path / "c2")).setup()
    (tmp_path / "ilsvrc").mkdir()
    (tmp_path / "ilsvrc" / "dataset_spec.json").write_text(json.dumps({"name": "ilsvrc_2012", "split_subgraphs": {}}))
    with pytest.raises(ValueError, match="hierarchical specs"):
        read_dataset_spec(tmp_path / "ilsvrc")
    w = TFRecordWriter(str(tmp_path / "cu_birds" / "3.tfrecords"))  # a record of the wrong class
    w.write({"image": (png(1), "byte"), "label": (4, "int")})
    w.close()
    with pytest.raises(ValueError, match="holds a record of class 4, expected 3"):
        MetaDatasetRecordsDataModule(str(tmp_path / "cu_birds"), cache_dir=str(tmp_path / "c3")).setup()


def test_data_check_finds_records_and_missing_class_files(tmp_path: Path):
    from lightning_meta.datacheck import check_folder

    write_source(tmp_path / "aircraft")
    (tmp_path / "aircraft" / "7.tfrecords").unlink()
    found = {f.dataset: f for f in check_folder(tmp_path)}["Meta-Dataset records"]
    assert found.summary == "classes: train 6, val 3, test 3"
    assert found.problems and found.problems[0].startswith("1 of 12 class record files missing (e.g. [7])")
