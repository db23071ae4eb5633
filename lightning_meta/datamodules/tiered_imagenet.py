"""tieredImageNet (Ren et al., "Meta-Learning for Semi-Supervised Few-Shot Classification", ICLR 2018,
arXiv:1803.00676).

608 ILSVRC-12 classes (779,165 images, 84x84) grouped into 34 high-level categories; the categories are split
20/6/8, giving 351/97/160 classes and 448,695 / 124,261 / 206,209 images. The counts are validated on load.

Format (Ren et al.'s release, also what learn2learn downloads): per split, ``{split}_images_png.pkl`` (a list or
array of PNG images: bytes, Python 2 strings or uint8 arrays) and ``{split}_labels.pkl`` (a dict with ``label_specific``,
the class index of each image, ``label_general``, its category index, and when present ``label_specific_str`` /
``label_general_str``, the names of those indices). PNGs are decoded once (PIL, in parallel threads) into the
class store, which is cached (the decoded train split is about 9.5 GB of uint8).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_meta.datamodules.episodic import EpisodicDataModule
from lightning_meta.datamodules.fewshot_images import (
    SPLITS,
    Normalize,
    check_disjoint,
    check_image_size,
    check_split_sizes,
    fewshot_transforms,
    grouped_store,
    load_pickle,
    resize_uint8,
    thread_count,
)
from lightning_meta.datamodules.mini_imagenet import MINI_IMAGENET_MEAN, MINI_IMAGENET_STD
from lightning_meta.datamodules.store import ClassStore, cached_store
from lightning_meta.datamodules.variable import VariableEpisodes
from lightning_meta.progress import progress

__all__ = [
    "TIERED_IMAGENET_CLASSES",
    "TIERED_IMAGENET_IMAGES",
    "TieredImageNetDataModule",
    "decode_pngs",
    "find_tiered_imagenet",
    "read_tiered_imagenet",
]

TIERED_IMAGENET_CLASSES = {"train": 351, "val": 97, "test": 160}
TIERED_IMAGENET_IMAGES = {"train": 448_695, "val": 124_261, "test": 206_209}
_HOW_TO_GET = (
    "tieredImageNet needs a manual download (Google Drive, ~12 GB, linked from github.com/renmengye/few-shot-ssl-public): "
    "extract it so that <root>/ (or <root>/tiered-imagenet/) holds {train,val,test}_images_png.pkl and "
    "{train,val,test}_labels.pkl"
)


def find_tiered_imagenet(root: str | Path) -> Path:
    """The folder holding the six pickles: ``root`` or ``root/tiered-imagenet``.

    Raises:
        FileNotFoundError: naming the missing files and how to get them.
    """
    root = Path(root).expanduser()
    names = [f"{s}_{kind}.pkl" for s in SPLITS for kind in ("images_png", "labels")]
    for folder in (root, root / "tiered-imagenet"):
        if all((folder / n).is_file() for n in names):
            return folder
    folder = root / "tiered-imagenet" if (root / "tiered-imagenet").is_dir() else root
    missing = [n for n in names if not (folder / n).is_file()]
    raise FileNotFoundError(f"tieredImageNet files missing in {str(folder)!r}: {missing}. {_HOW_TO_GET}")


def _as_bytes(item: object, index: int, path: Path) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str) and max(item, default="\0") <= "\xff":
        return item.encode("latin1")  # a Python 2 byte string read with encoding="latin1": this maps it back exactly
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise ValueError(
        f"{path}: item {index} is a {type(item).__name__}"
        + (f" {item.dtype} {item.shape}" if isinstance(item, np.ndarray) else "")
        + ", expected PNG-encoded bytes (or a 1-D uint8 array of them); download the file again"
    )


def decode_pngs(
    encoded: Sequence[object] | np.ndarray, image_size: int, path: Path, order: Sequence[int] | None = None
) -> Tensor:
    """Decode PNG-encoded images to RGB uint8 ``(n, 3, image_size, image_size)`` in parallel threads.

    Row ``i`` of the output is item ``order[i]`` (default: item ``i``); ``path`` names the source in errors.

    Decoding uses PIL (torchvision 0.29 deprecates its own ``torchvision.io`` decoders); images of another
    size are resized (antialiased bilinear).
    """
    from PIL import Image, UnidentifiedImageError

    items = list(range(len(encoded))) if order is None else list(order)
    out = torch.empty(len(items), 3, image_size, image_size, dtype=torch.uint8)

    def work(row: int) -> None:
        i = items[row]
        data = _as_bytes(encoded[i], i, path)
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.format != "PNG":
                    raise UnidentifiedImageError(f"a {im.format} image, not a PNG")
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(
                f"{path}: image {i} is not a decodable PNG ({e}); the file is corrupt: download it again"
            ) from e
        img = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        if img.shape[-2:] != (image_size, image_size):
            img = resize_uint8(img[None], image_size)[0]
        out[row] = img

    with ThreadPoolExecutor(thread_count()) as pool:
        list(progress(pool.map(work, range(len(items))), f"decoding {path.name}", total=len(items)))
    return out


def read_tiered_imagenet(folder: Path, split: str, image_size: int = 84) -> ClassStore:
    """Read one split: decode its PNGs and name each image's class.

    Class names are the ``label_specific_str`` entries (wnids) when the labels file has them, else
    ``"<split>/<index>"`` (indices restart at 0 in every split, so the split keeps the names disjoint).

    Returns:
        The split's store: classes sorted by name, images ``(n, 3, image_size, image_size)`` in pickle order
        within a class (decoded straight into that order, so the images are held once).
    """
    images_path, labels_path = folder / f"{split}_images_png.pkl", folder / f"{split}_labels.pkl"
    labels = load_pickle(labels_path)
    if not isinstance(labels, dict) or "label_specific" not in labels:
        keys = sorted(labels) if isinstance(labels, dict) else type(labels).__name__
        raise ValueError(f"{labels_path} holds {keys}, expected a dict with 'label_specific'; download it again")
    specific = np.asarray(labels["label_specific"]).reshape(-1)
    if specific.size and (not np.issubdtype(specific.dtype, np.integer) or specific.min() < 0):
        raise ValueError(f"{labels_path}: label_specific must hold non-negative integers, got {specific.dtype}")
    encoded = load_pickle(images_path)
    if not isinstance(encoded, (list, tuple, np.ndarray)):
        raise ValueError(f"{images_path} holds a {type(encoded).__name__}, expected a list of PNG-encoded images")
    if len(encoded) != len(specific):
        raise ValueError(
            f"{images_path} has {len(encoded)} images but {labels_path} has {len(specific)} labels; "
            "the two files are from different releases or truncated: download both again"
        )
    strings = labels.get("label_specific_str")
    if strings is not None:
        strings = [s.decode() if isinstance(s, bytes) else str(s) for s in strings]
        if specific.size and specific.max() >= len(strings):
            raise ValueError(
                f"{labels_path}: label_specific goes up to {int(specific.max())} but label_specific_str has only "
                f"{len(strings)} names; download it again"
            )
        names = [strings[i] for i in specific.tolist()]
    else:
        names = [f"{split}/{i:03d}" for i in specific.tolist()]
    return grouped_store(names, lambda order: decode_pngs(encoded, image_size, images_path, order))


class TieredImageNetDataModule(EpisodicDataModule):
    """tieredImageNet episodes (Ren et al. split, 351/97/160 classes).

    Files go in ``root`` or ``root/tiered-imagenet`` (manual download, ~12 GB): ``{train,val,test}_images_png.pkl``
    and ``{train,val,test}_labels.pkl``. Each split's PNGs are decoded once and the store is cached in
    ``cache_dir`` (keyed by the pickles' checksums and ``image_size``), never in ``root``. With
    ``format="ilsvrc"``, ``root`` is your ILSVRC-2012 copy instead (``root/train/<synset>/<synset>_<n>.JPEG``)
    and the packaged class lists of Ren et al. select the synsets (see :mod:`lightning_meta.datamodules.ilsvrc`).

    Args:
        root: the folder holding the pickles (or their ``tiered-imagenet`` parent).
        image_size: side of the square images (84 in the release; other sizes are resized).
        normalize: ``"none"``, ``"imagenet"`` or ``"dataset"`` (MetaOptNet's miniImageNet mean/std, which
            MetaOptNet also uses for tieredImageNet); see
            :func:`~lightning_meta.datamodules.mini_imagenet.fewshot_transforms`.
        augment: random crop (padding 8), color jitter and horizontal flip on training episodes (MetaOptNet).
        strict: check the published sizes (351/97/160 classes, 448,695 / 124,261 / 206,209 images); pass
            False to use a subset.
        format: ``"pickle"`` (Ren et al.'s release) or ``"ilsvrc"`` (built from ILSVRC-2012).
        split_dir: with ``format="ilsvrc"``, a folder of ``{train,val,test}.csv`` (``<synset>,<category>``
            rows) to use instead of the packaged class lists.
        ways: see :class:`~lightning_meta.datamodules.episodic.EpisodicDataModule` for this and the rest.
    """

    def __init__(
        self,
        root: str,
        *,
        image_size: int = 84,
        normalize: Normalize = "none",
        augment: bool = False,
        strict: bool = True,
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
        format: Literal["pickle", "ilsvrc"] = "pickle",
        split_dir: str | None = None,
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
        if format not in ("pickle", "ilsvrc"):
            raise ValueError(f"format={format!r} must be 'pickle' or 'ilsvrc'")
        self.format, self.split_dir = format, split_dir
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.normalize = normalize
        self.augment = augment
        self.strict = strict
        self._train_t, self._eval_t = fewshot_transforms(
            image_size,
            augment=augment,
            normalize=normalize,
            dataset_mean=MINI_IMAGENET_MEAN,
            dataset_std=MINI_IMAGENET_STD,
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

    def _read(self, folder: Path, split: str) -> ClassStore:
        return read_tiered_imagenet(folder, split, self.image_size)

    @override
    def build_stores(self) -> dict[str, ClassStore]:
        if self.format == "ilsvrc":
            from lightning_meta.datamodules.ilsvrc import ilsvrc_stores

            stores = ilsvrc_stores("tiered_imagenet", self.root, image_size=self.image_size, split_dir=self.split_dir,
                                   cache_dir=self.cache_dir)  # fmt: skip
            return self._checked(stores)
        folder = find_tiered_imagenet(self.root)
        stores = {
            split: cached_store(
                f"tiered_imagenet-{split}-{self.image_size}",
                [folder / f"{split}_images_png.pkl", folder / f"{split}_labels.pkl"],
                functools.partial(self._read, folder, split),
                self.cache_dir,
            )
            for split in SPLITS
        }
        return self._checked(stores)

    def _checked(self, stores: dict[str, ClassStore]) -> dict[str, ClassStore]:
        check_disjoint("tieredImageNet", {s: stores[s].class_names for s in SPLITS})
        check_split_sizes(
            "tieredImageNet",
            {s: stores[s].num_classes for s in SPLITS},
            {s: len(stores[s]) for s in SPLITS},
            TIERED_IMAGENET_CLASSES,
            TIERED_IMAGENET_IMAGES,
            strict=self.strict,
        )
        return stores
