"""Meta-Dataset's converted records, read without TensorFlow (Triantafillou et al., ICLR 2020).

Meta-Dataset's conversion scripts (google-research/meta-dataset, ``dataset_conversion``) write one folder per
source, e.g. ``<records>/aircraft/``, holding ``dataset_spec.json`` and one TFRecord file per class,
``<class id>.tfrecords`` (or shards ``<class id>_<k>.tfrecords``), whose examples carry the encoded image
(``image``, bytes) and the class id (``label``, int64). Class ids are contiguous per split: the training
classes first, then validation, then test (``classes_per_split`` in the spec; for Omniglot's bi-level spec,
``superclasses_per_split`` and ``classes_per_superclass``). The records are parsed with the ``tfrecord``
package (``pip install tfrecord``; no TensorFlow) and decoded once into cached
:class:`~lightning_meta.datamodules.ClassStore` objects, one per split, that any episode sampler (fixed or
``VariableEpisodes``) or :class:`~lightning_meta.datamodules.MultiSourceDataModule` uses.

ImageNet's spec (``ilsvrc_2012``, a class DAG) is not supported here; the conversion of the data is the
user's (its licences forbid redistribution), so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typing_extensions import override

from lightning_meta.datamodules.episodic import EpisodicDataModule
from lightning_meta.datamodules.store import ClassStore, cached_store
from lightning_meta.datamodules.variable import VariableEpisodes

__all__ = ["MetaDatasetRecordsDataModule", "read_dataset_spec", "read_meta_dataset_records"]

WHERE = (
    "Convert the source with Meta-Dataset's scripts (github.com/google-research/meta-dataset, "
    "'python -m meta_dataset.dataset_conversion.convert_datasets_to_records --dataset=<name> ...') and point "
    "root at the records folder that holds <name>/dataset_spec.json and <name>/<class id>.tfrecords"
)


def read_dataset_spec(folder: str | Path) -> dict[str, list[tuple[int, str]]]:
    """``{"train" | "val" | "test": [(class id, class name), ...]}`` from a source's ``dataset_spec.json``.

    Raises:
        FileNotFoundError: saying how to produce the records.
        ValueError: for a spec this reader does not handle (ImageNet's DAG).
    """
    path = Path(folder).expanduser() / "dataset_spec.json"
    if not path.is_file():
        raise FileNotFoundError(f"Meta-Dataset: {path} not found. {WHERE}")
    spec = json.loads(path.read_text())
    names = {int(k): str(v) for k, v in spec.get("class_names", {}).items()}
    if "classes_per_split" in spec:
        counts = [int(spec["classes_per_split"][k]) for k in ("TRAIN", "VALID", "TEST")]
    elif "superclasses_per_split" in spec:  # bi-level (Omniglot): superclass ids are contiguous per split too
        per_super = {int(k): int(v) for k, v in spec["classes_per_superclass"].items()}
        supers = [int(spec["superclasses_per_split"][k]) for k in ("TRAIN", "VALID", "TEST")]
        bounds = [0, supers[0], supers[0] + supers[1], sum(supers)]
        counts = [sum(per_super[s] for s in range(bounds[i], bounds[i + 1])) for i in range(3)]
    else:
        raise ValueError(
            f"{path} ({spec.get('name', '?')}) has neither classes_per_split nor superclasses_per_split; "
            "hierarchical specs (ilsvrc_2012) are not supported by this reader"
        )
    out, start = {}, 0
    for split, n in zip(("train", "val", "test"), counts):
        out[split] = [(c, names.get(c, str(c))) for c in range(start, start + n)]
        start += n
    return out


def _class_files(folder: Path, class_id: int) -> list[Path]:
    single = folder / f"{class_id}.tfrecords"
    files = [single] if single.is_file() else sorted(folder.glob(f"{class_id}_*.tfrecords"))
    if not files:
        raise FileNotFoundError(f"Meta-Dataset: {folder}/{class_id}.tfrecords not found (named by dataset_spec.json). {WHERE}")
    return files


def read_meta_dataset_records(
    folder: str | Path, split: str, *, image_size: int = 84, channels: int = 3, cache_dir: str | None = None
) -> ClassStore:
    """Decode (or load from the cache) one split of a converted Meta-Dataset source; class names are ``<source>/<name>``.

    Raises:
        ValueError: when a record's ``label`` is not the class id of its file (a corrupt or mixed-up record).
    """
    try:
        from tfrecord.reader import tfrecord_loader
    except ImportError as err:  # pragma: no cover - exercised only without the package
        raise ImportError("reading Meta-Dataset records needs the tfrecord package: pip install tfrecord") from err
    folder = Path(folder).expanduser()
    classes = read_dataset_spec(folder)[split]
    files = {c: _class_files(folder, c) for c, _ in classes}

    def build() -> ClassStore:
        import warnings

        from torchvision.transforms.v2.functional import resize

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_image
        mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}[channels]
        images, labels = [], []
        for c, name in classes:
            for f in files[c]:
                for rec in tfrecord_loader(str(f), None, {"image": "byte", "label": "int"}):
                    if int(rec["label"][0]) != c:
                        raise ValueError(f"{f} holds a record of class {int(rec['label'][0])}, expected {c}")
                    data = torch.frombuffer(bytearray(rec["image"]), dtype=torch.uint8)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)
                        img = decode_image(data, mode=mode)
                    if img.shape[-2:] != (image_size, image_size):
                        img = resize(img, [image_size, image_size], antialias=True)
                    images.append(img)
                    labels.append(f"{folder.name}/{name}")
        if not images:
            raise ValueError(f"split '{split}' of {folder} has no records")
        return ClassStore.from_labeled(torch.stack(images), labels, class_names=[f"{folder.name}/{n}" for _, n in classes])

    sources = [folder / "dataset_spec.json"] + [f for c, _ in classes for f in files[c]]
    return cached_store(f"metadataset-{folder.name}-{split}-{image_size}-{channels}", sources, build, cache_dir)


class MetaDatasetRecordsDataModule(EpisodicDataModule):
    """Episodes from one converted Meta-Dataset source, with its official class splits.

    For Meta-Dataset's own protocol combine ``variable_episodes=VariableEpisodes()`` with several sources
    in a :class:`~lightning_meta.datamodules.MultiSourceDataModule`.

    Args:
        root: the records folder (holding ``<source>/``), or the source folder itself with ``source=None``.
        source: the source's folder name, e.g. ``"aircraft"``, ``"cu_birds"``, ``"omniglot"``.
        image_size: side of the decoded images (Meta-Dataset uses 84).
        channels: 3 (RGB) or 1.
        ways: see :class:`~lightning_meta.datamodules.EpisodicDataModule` for this and the rest.
    """

    def __init__(
        self,
        root: str,
        source: str | None = None,
        *,
        image_size: int = 84,
        channels: int = 3,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        tasks_per_batch: int = 32,
        train_episodes: int = 3200,
        val_episodes: int = 640,
        test_episodes: int = 600,
        eval_ways: int | None = None,
        eval_shots: int | None = None,
        eval_queries: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        pin_memory: bool = False,
        variable_episodes: VariableEpisodes | None = None,
    ) -> None:
        super().__init__(
            ways=ways, shots=shots, queries=queries, tasks_per_batch=tasks_per_batch, train_episodes=train_episodes,
            val_episodes=val_episodes, test_episodes=test_episodes, eval_ways=eval_ways, eval_shots=eval_shots,
            eval_queries=eval_queries, seed=seed, num_workers=num_workers, cache_dir=cache_dir, pin_memory=pin_memory,
            variable_episodes=variable_episodes,
        )
        if channels not in (1, 3):
            raise ValueError(f"channels={channels} must be 1 (grayscale) or 3 (RGB)")
        self.folder = Path(root).expanduser() / source if source else Path(root).expanduser()
        self.image_size, self.channels = image_size, channels
        self.save_hyperparameters()

    @override
    def prepare_data(self) -> None:
        self.build_stores()

    @override
    def build_stores(self) -> dict[str, ClassStore]:
        return {
            s: read_meta_dataset_records(self.folder, s, image_size=self.image_size, channels=self.channels,
                                         cache_dir=self.cache_dir)
            for s in ("train", "val", "test")
        }
