"""Meta-Dataset's converted records (Triantafillou et al., ICLR 2020, arXiv:1903.03096), read without TensorFlow.

Meta-Dataset's conversion scripts (github.com/google-research/meta-dataset, ``dataset_conversion/``) write, for
each source (``ilsvrc_2012``, ``omniglot``, ``aircraft``, ``cu_birds``, ``dtd``, ``quickdraw``, ``fungi``,
``vgg_flower``, ``traffic_sign``, ``mscoco``), one folder holding

* ``dataset_spec.json``: the source's name, its class split and per-class counts, in one of three schemas
  (``"__class__"``): ``DatasetSpecification`` (``classes_per_split`` ``{"TRAIN", "VALID", "TEST"}``: the
  class ids of a split are a contiguous range, train first), ``BiLevelDatasetSpecification`` (Omniglot:
  ``superclasses_per_split`` and ``classes_per_superclass``, contiguous the same way) or
  ``HierarchicalDatasetSpecification`` (ILSVRC: a WordNet subgraph per split, whose leaves are its classes);
  plus ``images_per_class`` and ``class_names`` keyed by class id, and ``file_pattern``;
* one TFRecord file per class, ``file_pattern.format(class_id)`` (``{}.tfrecords``; with ``{}_{}.tfrecords``
  every ``<class_id>_*.tfrecords`` shard is read and merged), each record a ``tf.train.Example`` with
  ``image`` (the encoded JPEG/PNG bytes) and ``label`` (the int64 class id).

The records are parsed with the ``tfrecord`` package (``pip install 'lightning-meta[metadataset]'``), decoded
with PIL to RGB and resized to ``image_size`` like Meta-Dataset's decoder (bilinear, ``align_corners=True``,
no antialiasing; the result is rounded to uint8 for the class store). The decoded source lives in memory as a
:class:`~lightning_meta.datamodules.store.ClassStore`, so the large sources (ILSVRC, Quick Draw, Fungi) need
``max_images_per_class`` or a lot of RAM. Record checksums are not verified (the reader package skips them);
a damaged record fails to parse or decode, and a record's label must equal its file's class id.

With ``variable_episodes``, :class:`MetaDatasetDataModule` draws an episode's classes as Meta-Dataset does for
the hierarchical sources: one Omniglot alphabet (``BiLevelDatasetSpecification``), or one node of the split's
WordNet subgraph and the ImageNet classes it spans (``HierarchicalDatasetSpecification``); see
:mod:`~lightning_meta.datamodules.hierarchy` and :meth:`MetaDatasetSpec.hierarchy`.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_meta.datamodules.episodic import EpisodicDataModule
from lightning_meta.datamodules.fewshot_images import (
    SPLITS,
    Normalize,
    check_image_size,
    fewshot_transforms,
    grouped_store,
    thread_count,
)
from lightning_meta.datamodules.hierarchy import MAX_SPANNING_LEAVES_ELIGIBLE, ClassHierarchy
from lightning_meta.datamodules.store import ClassStore, cached_store
from lightning_meta.datamodules.variable import VariableEpisodes
from lightning_meta.progress import progress

__all__ = [
    "MetaDatasetDataModule",
    "MetaDatasetSpec",
    "load_dataset_spec",
    "read_class_records",
    "read_meta_dataset_split",
    "split_files",
]

_SPLIT_KEYS = {"train": "TRAIN", "val": "VALID", "test": "TEST"}
_HOW_TO_GET = (
    "convert the source with Meta-Dataset's scripts (github.com/google-research/meta-dataset, "
    "meta_dataset/dataset_conversion/convert_datasets_to_records.py; each original dataset has its own licence "
    "and download page, listed in its doc/dataset_conversion.md) and point root at the records folder"
)


@dataclass
class MetaDatasetSpec:
    """What lightning-meta uses from a ``dataset_spec.json``.

    Attributes:
        name: the source's name (e.g. ``"dtd"``).
        folder: the folder holding the spec and the records.
        file_pattern: ``"{}.tfrecords"`` or ``"{}_{}.tfrecords"``.
        class_names: class id -> name.
        images_per_class: class id -> number of images (pools summed).
        splits: ``"train"``/``"val"``/``"test"`` -> the class ids of the split.
        superclasses: bi-level specs: superclass name -> its class ids (empty for the other schemas).
        subgraphs: hierarchical specs: split -> WordNet id -> the WordNet ids of its children (empty otherwise).
    """

    name: str
    folder: Path
    file_pattern: str
    class_names: dict[int, str]
    images_per_class: dict[int, int]
    splits: dict[str, list[int]]
    superclasses: dict[str, list[int]] = field(default_factory=dict)
    subgraphs: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def store_names(self, split: str) -> list[str]:
        """The class names of a split's store (:func:`read_meta_dataset_split`), in class-id order: ``class_names``,
        or ``"<zero-padded id>:<name>"`` for every class of a split in which two classes share a name."""
        ids = self.splits[split]
        names = [self.class_names[k] for k in ids]
        return names if len(set(names)) == len(names) else [f"{k:05d}:{self.class_names[k]}" for k in ids]

    def hierarchy(
        self, split: str, *, max_spanning_leaves: int = MAX_SPANNING_LEAVES_ELIGIBLE
    ) -> ClassHierarchy | None:
        """The class hierarchy of a split, in the names of its store; None for a flat ``DatasetSpecification``.

        Bi-level specs give the split's superclasses (Omniglot's alphabets), hierarchical ones the split's
        WordNet subgraph, whose leaves are the split's classes (ILSVRC). Pass it to
        :class:`~lightning_meta.datamodules.VariableEpisodeDataset` with the store of
        :func:`read_meta_dataset_split` (``MetaDatasetDataModule`` does so itself).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            max_spanning_leaves: for DAGs, most classes an eligible node spans (Meta-Dataset: 392).
        """
        ids = set(self.splits[split])
        store_name = dict(zip(self.splits[split], self.store_names(split)))
        if self.superclasses:
            groups = {g: [store_name[k] for k in ks if k in ids] for g, ks in self.superclasses.items()}
            return ClassHierarchy.from_superclasses({g: cs for g, cs in groups.items() if cs})
        if self.subgraphs:
            leaf = {self.class_names[k]: store_name[k] for k in ids}  # WordNet id -> store name
            graph = self.subgraphs[split]
            children = {leaf.get(n, n): [leaf.get(c, c) for c in cs] for n, cs in graph.items()}
            return ClassHierarchy.from_dag(children, max_spanning_leaves=max_spanning_leaves)
        return None

    def class_files(self, class_id: int) -> list[Path]:
        """The TFRecord file(s) of a class (shards of ``{}_{}.tfrecords`` sorted by name)."""
        if self.file_pattern == "{}.tfrecords":
            return [self.folder / f"{class_id}.tfrecords"]
        return sorted(self.folder.glob(f"{class_id}_*.tfrecords"))


def _contiguous(counts: dict[str, int], where: Path) -> dict[str, list[int]]:
    out, start = {}, 0
    for split in SPLITS:
        key = _SPLIT_KEYS[split]
        if key not in counts:
            raise ValueError(f"{where}: the split counts {sorted(counts)} lack {key!r}; expected TRAIN, VALID and TEST")
        out[split] = list(range(start, start + int(counts[key])))
        start += int(counts[key])
    return out


def _total(n: int | str | dict[str, int | str]) -> int:
    """An ``images_per_class`` entry of ``dataset_spec.json``: a count, or counts per image source."""
    return sum(int(v) for v in n.values()) if isinstance(n, dict) else int(n)


def load_dataset_spec(folder: str | Path) -> MetaDatasetSpec:
    """Read ``folder/dataset_spec.json`` (any of the three schemas; see the module docstring).

    Raises:
        FileNotFoundError: when the file is missing, saying how to produce it.
        ValueError: naming the file and the field when the schema is not Meta-Dataset's.
    """
    folder = Path(folder).expanduser()
    path = folder / "dataset_spec.json"
    if not path.is_file():
        hint = (
            " (an older conversion wrote dataset_spec.pkl: re-run the conversion to get the JSON)"
            if (folder / "dataset_spec.pkl").is_file()
            else ""
        )
        raise FileNotFoundError(f"{path} is missing{hint}; {_HOW_TO_GET}")
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); convert the source again") from e
    kind = d.get("__class__") if isinstance(d, dict) else None
    required = {"name", "class_names", "images_per_class", "file_pattern"}
    if kind not in ("DatasetSpecification", "BiLevelDatasetSpecification", "HierarchicalDatasetSpecification") or (
        required - set(d)
    ):
        raise ValueError(
            f"{path} is not a Meta-Dataset dataset spec: expected '__class__' DatasetSpecification, "
            f"BiLevelDatasetSpecification or HierarchicalDatasetSpecification and the fields {sorted(required)}"
        )
    if d["file_pattern"] not in ("{}.tfrecords", "{}_{}.tfrecords"):
        raise ValueError(
            f"{path}: file_pattern {d['file_pattern']!r} must be '{{}}.tfrecords' or '{{}}_{{}}.tfrecords'"
        )
    try:
        return _parse_spec(d, kind, folder, path)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{path}: malformed {kind} ({type(e).__name__}: {e}); it does not follow Meta-Dataset's schema: "
            "convert the source again"
        ) from e


def _parse_spec(d: dict, kind: str, folder: Path, path: Path) -> MetaDatasetSpec:
    class_names = {int(k): str(v) for k, v in d["class_names"].items()}
    superclasses: dict[str, list[int]] = {}
    subgraphs: dict[str, dict[str, list[str]]] = {}
    if kind == "DatasetSpecification":
        splits = _contiguous(d["classes_per_split"], path)
        images = {int(k): _total(v) for k, v in d["images_per_class"].items()}
    elif kind == "BiLevelDatasetSpecification":
        per_super = {int(k): int(v) for k, v in d["classes_per_superclass"].items()}
        supers = _contiguous(d["superclasses_per_split"], path)
        splits, start = {}, 0
        for split in SPLITS:
            n = sum(per_super[s] for s in supers[split])
            splits[split], start = list(range(start, start + n)), start + n
        # a superclass's classes follow those of the superclasses with smaller ids (Meta-Dataset's numbering)
        raw_names = {int(k): str(v) for k, v in d.get("superclass_names", {}).items()}
        names = [raw_names.get(s, str(s)) for s in sorted(per_super)]
        if len(set(names)) != len(names):
            names = [f"{s}:{n}" for s, n in zip(sorted(per_super), names)]
        start = 0
        for s, name in zip(sorted(per_super), names):
            superclasses[name], start = list(range(start, start + per_super[s])), start + per_super[s]
        images = {int(k): _total(v) for k, v in d["images_per_class"].items()}
    else:  # Hierarchical: a split's classes are the leaves of its subgraph, named by WordNet id
        ids = {name: k for k, name in class_names.items()}
        splits, images = {}, {}
        for split in SPLITS:
            nodes = d["split_subgraphs"][_SPLIT_KEYS[split]]
            subgraphs[split] = {str(n["wn_id"]): [str(c) for c in n.get("children_ids") or []] for n in nodes}
            leaves = [n["wn_id"] for n in nodes if not n.get("children_ids")]
            unknown = [w for w in leaves if w not in ids]
            if unknown:
                raise ValueError(f"{path}: leaves {unknown[:5]} of the {_SPLIT_KEYS[split]} subgraph have no class id")
            splits[split] = sorted(ids[w] for w in leaves)
            counts = d["images_per_class"][_SPLIT_KEYS[split]]
            images.update({ids[w]: int(counts[w]) for w in leaves})
    listed = sorted(k for v in splits.values() for k in v)
    if listed != sorted(class_names) or len(set(listed)) != len(listed):
        raise ValueError(
            f"{path}: the splits cover {len(listed)} class ids but class_names has {len(class_names)}; "
            "the spec is inconsistent: convert the source again"
        )
    return MetaDatasetSpec(
        str(d["name"]), folder, d["file_pattern"], class_names, images, splits, superclasses, subgraphs
    )


def _decode(data: bytes, size: int, where: str) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(
            f"{where}: the image does not decode ({e}); the file is corrupt: convert the source again"
        ) from e
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    if x.shape[-2:] == (size, size):
        return x
    y = torch.nn.functional.interpolate(x[None].float(), size=(size, size), mode="bilinear", align_corners=True)
    return y[0].round_().clamp_(0, 255).to(torch.uint8)


def read_class_records(files: list[Path], class_id: int, *, max_images: int | None = None) -> list[bytes]:
    """The encoded images of one class, in record order, checking each record's label.

    Raises:
        ImportError: when the ``tfrecord`` package is missing, saying how to install it.
        ValueError: naming the file when a record is truncated, not an Example with ``image`` and ``label``,
            or labelled with another class id.
    """
    try:
        from tfrecord.reader import example_loader
    except ImportError as e:
        raise ImportError(
            "reading Meta-Dataset records needs the 'tfrecord' package: pip install 'lightning-meta[metadataset]'"
        ) from e
    from google.protobuf.message import DecodeError

    out: list[bytes] = []
    for path in files:
        try:
            for i, ex in enumerate(example_loader(str(path), None, {"image": "byte", "label": "int"})):
                label = np.asarray(ex["label"]).reshape(-1)
                if label.size != 1 or int(label[0]) != class_id:
                    raise ValueError(
                        f"{path}: record {i} has label {label.tolist()} but the file holds class {class_id}; "
                        "the records are mixed up: convert the source again"
                    )
                out.append(bytes(ex["image"]))
                if max_images is not None and len(out) >= max_images:
                    return out
        except (RuntimeError, KeyError, TypeError, DecodeError) as e:
            raise ValueError(
                f"{path} is not a readable TFRecord file of tf.train.Example records with 'image' (bytes) and "
                f"'label' (int64) ({type(e).__name__}: {e}); it is truncated or corrupt: convert the source again"
            ) from e
    return out


def split_files(spec: MetaDatasetSpec, split: str) -> list[Path]:
    """The record files of a split's classes.

    Raises:
        FileNotFoundError: naming the missing class files and how to produce them.
    """
    ids = spec.splits[split]
    missing = [spec.file_pattern.format(k, "*") for k in ids if not spec.class_files(k) or not all(
        f.is_file() for f in spec.class_files(k))]  # fmt: skip
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(ids)} class files of {spec.name}'s {split} split are missing from "
            f"{spec.folder} (e.g. {missing[:5]}); {_HOW_TO_GET}"
        )
    return [f for k in ids for f in spec.class_files(k)]


def read_meta_dataset_split(
    spec: MetaDatasetSpec,
    split: str,
    image_size: int = 84,
    *,
    max_images_per_class: int | None = None,
    strict: bool = True,
) -> ClassStore:
    """Decode one split of a converted source into a class store.

    Classes are named by ``class_names`` (prefixed with their zero-padded id when two share a name) and sorted
    by name; a class's images keep their record order.

    Args:
        spec: from :func:`load_dataset_spec`.
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: side of the square images (84 in Meta-Dataset; 126 or 224 in later work).
        max_images_per_class: read at most this many records of each class (the first ones).
        strict: require each class's record count to equal ``images_per_class`` (capped as above).

    Raises:
        FileNotFoundError: naming the missing class files.
        ValueError: naming the class whose record count differs from the spec (when ``strict``).
    """
    ids = spec.splits[split]
    split_files(spec, split)  # raises naming the missing files
    encoded: list[bytes] = []
    labels: list[str] = []
    names = spec.store_names(split)  # class names must be unique in a store: id-prefixed when two clash
    for k, name in progress(list(zip(ids, names)), f"reading {spec.name} {split} records"):
        records = read_class_records(spec.class_files(k), k, max_images=max_images_per_class)
        expected = spec.images_per_class.get(k)
        if expected is not None and max_images_per_class is not None:
            expected = min(expected, max_images_per_class)
        if strict and expected is not None and len(records) != expected:
            raise ValueError(
                f"class {k} ({spec.class_names[k]!r}) of {spec.name} has {len(records)} records in "
                f"{[f.name for f in spec.class_files(k)]} but dataset_spec.json says {expected}; the conversion is "
                "incomplete: convert the source again, or pass strict=False"
            )
        if not records:
            raise ValueError(f"class {k} ({spec.class_names[k]!r}) of {spec.name} has no records; convert it again")
        encoded += records
        labels += [name] * len(records)

    def decode(order: list[int]) -> Tensor:
        out = torch.empty(len(order), 3, image_size, image_size, dtype=torch.uint8)

        def work(row: int) -> None:
            out[row] = _decode(encoded[order[row]], image_size, f"{spec.name} image {order[row]}")

        with ThreadPoolExecutor(thread_count()) as pool:
            list(progress(pool.map(work, range(len(order))), f"decoding {spec.name} {split}", total=len(order)))
        return out

    return grouped_store(labels, decode)


class MetaDatasetDataModule(EpisodicDataModule):
    """Episodes from one Meta-Dataset source in its converted TFRecord form, with the spec's class splits.

    ``root`` is the source's records folder (holding ``dataset_spec.json`` and ``<class_id>.tfrecords``), or
    the folder of all sources with ``source`` naming one (``root/<source>/``). Each split is decoded once
    and cached in ``cache_dir`` (keyed by the spec, the record files, ``image_size`` and the cap).

    Args:
        root: see above.
        source: the source's folder name under ``root`` (e.g. ``"dtd"``, ``"omniglot"``), or None.
        image_size: side of the square images (Meta-Dataset: 84).
        normalize: ``"dataset"`` (the default) maps pixels to [-1, 1] like Meta-Dataset's decoder;
            ``"imagenet"`` or ``"none"`` as in :func:`~lightning_meta.datamodules.fewshot_images.fewshot_transforms`.
        augment: random crop (padding 8), color jitter and horizontal flip on training episodes.
        max_images_per_class: read at most this many images per class (for the large sources).
        strict: require each class's record count to match the spec.
        use_hierarchy: with ``variable_episodes``, draw each episode's classes from one superclass (bi-level specs:
            Omniglot's alphabets) or one node of the split's WordNet subgraph (hierarchical specs: ILSVRC), as
            Meta-Dataset does (:meth:`MetaDatasetSpec.hierarchy`); False draws them uniformly from the split.
            Flat specs and fixed-shape episodes ignore it.
        max_spanning_leaves: most classes an ILSVRC node may span to be drawn (Meta-Dataset: 392).
        variable_episodes: Meta-Dataset's variable-way, variable-shot episodes
            (:class:`~lightning_meta.datamodules.VariableEpisodes`), or None for ``ways``/``shots``/``queries``.
        ways: see :class:`~lightning_meta.datamodules.episodic.EpisodicDataModule` for this and the rest.
    """

    def __init__(
        self,
        root: str,
        *,
        source: str | None = None,
        image_size: int = 84,
        normalize: Normalize = "dataset",
        augment: bool = False,
        max_images_per_class: int | None = None,
        strict: bool = True,
        use_hierarchy: bool = True,
        max_spanning_leaves: int = MAX_SPANNING_LEAVES_ELIGIBLE,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        tasks_per_batch: int = 1,  # Meta-Dataset trains on one episode per step
        train_episodes: int = 3200,
        val_episodes: int = 600,
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
            ways=ways,
            shots=shots,
            queries=queries,
            tasks_per_batch=tasks_per_batch,
            train_episodes=train_episodes,
            val_episodes=val_episodes,
            test_episodes=test_episodes,
            eval_ways=eval_ways,
            eval_shots=eval_shots,
            eval_queries=eval_queries,
            seed=seed,
            num_workers=num_workers,
            cache_dir=cache_dir,
            pin_memory=pin_memory,
            variable_episodes=variable_episodes,
        )
        check_image_size(image_size)
        if not isinstance(max_spanning_leaves, int) or max_spanning_leaves < 1:
            raise ValueError(f"max_spanning_leaves={max_spanning_leaves!r} must be a positive integer")
        if max_images_per_class is not None and max_images_per_class < 1:
            raise ValueError(f"max_images_per_class={max_images_per_class} must be >= 1 or None")
        self.root = Path(root).expanduser()
        self.source = source
        self.image_size = image_size
        self.normalize = normalize
        self.augment = augment
        self.max_images_per_class = max_images_per_class
        self.strict = strict
        self.use_hierarchy = use_hierarchy
        self.max_spanning_leaves = max_spanning_leaves
        self._train_t, self._eval_t = fewshot_transforms(
            image_size,
            augment=augment,
            normalize=normalize,
            dataset_mean=(0.5,) * 3,
            dataset_std=(0.5,) * 3,
            padding=8,
        )
        self.save_hyperparameters()

    @property
    @override
    def train_transform(self) -> Callable[[Tensor], Tensor] | None:
        return self._train_t

    @property
    @override
    def eval_transform(self) -> Callable[[Tensor], Tensor] | None:
        return self._eval_t

    @property
    def folder(self) -> Path:
        """The source's records folder."""
        return self.root / self.source if self.source else self.root

    @override
    def class_hierarchy(self, split: str, store: ClassStore) -> ClassHierarchy | None:
        if not self.use_hierarchy:
            return None
        return load_dataset_spec(self.folder).hierarchy(split, max_spanning_leaves=self.max_spanning_leaves)

    @override
    def build_stores(self) -> dict[str, ClassStore]:
        spec = load_dataset_spec(self.folder)
        stores = {}
        for split in SPLITS:
            if not spec.splits[split]:
                raise ValueError(
                    f"{spec.name}'s dataset_spec.json gives its {split} split no classes (Meta-Dataset uses such "
                    "sources for evaluation only): pick a source with classes in every split, or read the split "
                    "you need with read_meta_dataset_split(load_dataset_spec(folder), split)"
                )
            cap = self.max_images_per_class
            stores[split] = cached_store(
                f"meta_dataset-{spec.name}-{split}-{self.image_size}-{cap or 'all'}-{int(self.strict)}",
                [spec.folder / "dataset_spec.json", *split_files(spec, split)],
                functools.partial(
                    read_meta_dataset_split, spec, split, self.image_size, max_images_per_class=cap, strict=self.strict
                ),
                self.cache_dir,
            )
        return stores
