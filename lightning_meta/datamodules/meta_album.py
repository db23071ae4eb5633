"""Meta-Album datasets (Ullah et al., NeurIPS 2022 Datasets and Benchmarks, https://meta-album.github.io).

Meta-Album has 40 image datasets from 10 domains, each released in three sizes: *Micro* (20 classes,
40 images each), *Mini* (every class with at least 40 images, 40 each) and *Extended* (every image).
Every release is one folder in the same layout, e.g. ``BCT_Mini/``::

    <dataset>/info.json     "image_column_name" (FILE_NAME), "category_column_name" (CATEGORY), ...
    <dataset>/labels.csv    one row per image: its file name and its class
    <dataset>/images/       the 128x128 images

:func:`read_meta_album` decodes such a folder into a :class:`~lightning_meta.datamodules.ClassStore`
(cached); :class:`MetaAlbumDataModule` splits one dataset's classes into train/val/test by a seeded split
(or by explicit lists). For the cross-domain protocol of the paper (whole datasets for meta-training and
others for testing), combine stores with :class:`~lightning_meta.datamodules.MultiSourceDataModule`.
The datasets carry their own licences (listed on the website); this library downloads none.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from typing_extensions import override

from lightning_meta.datamodules.cdfsl import decode_files
from lightning_meta.datamodules.episodic import EpisodicDataModule
from lightning_meta.datamodules.omniglot import seeded_split
from lightning_meta.datamodules.store import ClassStore, cached_store
from lightning_meta.datamodules.variable import VariableEpisodes

__all__ = ["MetaAlbumDataModule", "find_meta_album", "read_meta_album"]

WHERE = (
    "Download a Meta-Album dataset (Micro, Mini or Extended) from https://meta-album.github.io and extract it so "
    "that <folder>/info.json, <folder>/labels.csv and <folder>/images/ exist."
)


def find_meta_album(root: str | Path, dataset: str | None = None) -> Path:
    """The dataset folder: ``root/dataset`` if ``dataset`` is given, else ``root`` itself.

    Raises:
        FileNotFoundError: saying which file is missing and where to get the data.
    """
    folder = Path(root).expanduser() / dataset if dataset else Path(root).expanduser()
    for need in ("info.json", "labels.csv", "images"):
        if not (folder / need).exists():
            others = (
                sorted(p.name for p in folder.parent.iterdir() if (p / "labels.csv").exists())
                if folder.parent.is_dir()
                else []
            )
            hint = f" Meta-Album folders next to it: {others[:8]}." if others else ""
            raise FileNotFoundError(f"Meta-Album: {folder / need} not found.{hint} {WHERE}")
    return folder


def read_meta_album(
    folder: str | Path, *, image_size: int = 128, channels: int = 3, cache_dir: str | None = None
) -> ClassStore:
    """Decode (or load from the cache) one Meta-Album dataset folder; class names are ``<folder name>/<class>``.

    Raises:
        ValueError: naming a missing column or a listed image that is absent.
    """
    folder = find_meta_album(folder)
    info = json.loads((folder / "info.json").read_text())
    image_col = info.get("image_column_name", "FILE_NAME")
    class_col = info.get("category_column_name", "CATEGORY")
    with open(folder / "labels.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in (image_col, class_col) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{folder / 'labels.csv'} has no column {missing} (info.json names them); columns: {reader.fieldnames}"
            )
        rows = [(r[image_col], r[class_col]) for r in reader]
    images = folder / "images"
    files, labels = [], []
    for name, label in rows:
        f = images / name
        if not f.is_file():
            raise ValueError(f"{f} is listed in labels.csv but missing; re-extract the dataset")
        files.append(f)
        labels.append(f"{folder.name}/{label}")
    return cached_store(
        f"metaalbum-{folder.name}-{image_size}-{channels}",
        [folder / "labels.csv", images],
        lambda: decode_files(files, labels, image_size, channels, f"Meta-Album {folder.name}"),
        cache_dir,
    )


class MetaAlbumDataModule(EpisodicDataModule):
    """Episodes from one Meta-Album dataset, its classes split into train/val/test.

    Args:
        root: the folder holding the dataset folder (or the dataset folder itself, with ``dataset=None``).
        dataset: the dataset folder's name, e.g. ``"BCT_Micro"``, ``"BCT_Mini"`` or ``"BCT_Extended"``.
        train_classes: class names (as in ``labels.csv``) of the training split; give all three lists or none.
        val_classes: validation classes.
        test_classes: test classes.
        split_fractions: train/val/test fractions of the classes for the seeded split (no lists).
        split_seed: seed of the seeded split.
        image_size: side of the decoded images (Meta-Album's are 128).
        ways: see :class:`~lightning_meta.datamodules.EpisodicDataModule` for this and the rest.
    """

    def __init__(
        self,
        root: str,
        dataset: str | None = None,
        *,
        train_classes: Sequence[str] | None = None,
        val_classes: Sequence[str] | None = None,
        test_classes: Sequence[str] | None = None,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        split_seed: int = 0,
        image_size: int = 128,
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
        lists = (train_classes, val_classes, test_classes)
        if any(x is not None for x in lists) and any(x is None for x in lists):
            raise ValueError("give train_classes, val_classes and test_classes together, or none for a seeded split")
        seeded_split(["a", "b", "c"], split_fractions, 0)  # validates the fractions
        self.root, self.dataset = Path(root).expanduser(), dataset
        self.class_lists = None if train_classes is None else [list(map(str, x)) for x in lists]  # type: ignore[arg-type]
        self.split_fractions, self.split_seed, self.image_size = tuple(split_fractions), split_seed, image_size
        self.save_hyperparameters()

    def decoded(self) -> ClassStore:
        """The dataset's classes, decoded (or from the cache)."""
        return read_meta_album(
            find_meta_album(self.root, self.dataset), image_size=self.image_size, cache_dir=self.cache_dir
        )

    @override
    def prepare_data(self) -> None:
        self.decoded()

    @override
    def build_stores(self) -> dict[str, ClassStore]:
        store = self.decoded()
        prefix = store.class_names[0].split("/")[0] + "/"
        parts: Sequence[list[str]]
        if self.class_lists is None:
            parts = seeded_split(store.class_names, self.split_fractions, self.split_seed)
        else:
            parts = tuple([prefix + c for c in lst] for lst in self.class_lists)
        return {s: store.select(list(p)) for s, p in zip(("train", "val", "test"), parts)}
