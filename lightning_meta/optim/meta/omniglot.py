"""Omniglot inner tasks for learned optimizers: classify a few random characters at low resolution.

Omniglot: Lake, Salakhutdinov, Tenenbaum, "Human-level concept learning through probabilistic program
induction", Science 2015. Reads the official ``images_background_small{1,2}.zip`` files in place
(read-only) and decodes them once per process into memory; nothing is written next to the data.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lightning_meta.optim.meta.tasks import Batch, ConvTask, MLPTask, Task

__all__ = ["OmniglotTaskFamily"]

_OMNIGLOT_CACHE: dict[tuple[str, int], Tensor] = {}


def _load_omniglot(root: Path, image_size: int) -> Tensor:
    """All characters of the small background sets as ``(characters, 20, size, size)`` floats in [0, 1]."""
    key = (str(root), image_size)
    if key in _OMNIGLOT_CACHE:
        return _OMNIGLOT_CACHE[key]
    from PIL import Image

    zips = sorted(root.glob("images_background_small*.zip"))
    if not zips:
        raise FileNotFoundError(f"no images_background_small*.zip under {root}; pass the folder holding them")
    chars: dict[str, list[Tensor]] = {}
    for path in zips:
        with zipfile.ZipFile(path) as archive:
            for name in sorted(archive.namelist()):
                if not name.endswith(".png"):
                    continue
                with Image.open(io.BytesIO(archive.read(name))) as img:
                    small = img.convert("L").resize((image_size, image_size), Image.Resampling.BILINEAR)
                    pixels = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8)
                chars.setdefault(name.rsplit("/", 1)[0], []).append(pixels.view(image_size, image_size))
    # Omniglot strokes are dark on white; invert so ink is 1.
    data = [torch.stack(v[:20]) for v in chars.values() if len(v) >= 20]
    out = 1.0 - torch.stack(data).float() / 255.0
    _OMNIGLOT_CACHE[key] = out
    return out


@dataclass
class _OmniglotSampler:
    images: Tensor  # (ways, 20, 1, H, W)
    batch_size: int
    train_per_class: int

    def __call__(self, generator: torch.Generator, split: str) -> Batch:
        ways = self.images.shape[0]
        y = torch.randint(ways, (self.batch_size,), generator=generator)
        if split == "train":
            idx = torch.randint(self.train_per_class, (self.batch_size,), generator=generator)
        else:
            n_valid = self.images.shape[1] - self.train_per_class
            idx = self.train_per_class + torch.randint(n_valid, (self.batch_size,), generator=generator)
        return self.images[y, idx], y


class OmniglotTaskFamily:
    """Convnets or MLPs classifying ``ways`` random Omniglot characters (15 train / 5 valid images each).

    Args:
        root: Folder holding ``images_background_small{1,2}.zip`` (read-only; decoded in memory).
        image_size: Images are resized to ``image_size x image_size``.
        ways: Characters per task.
        channels: Convolution widths (empty: an MLP with ``hidden`` widths on flattened images).
        hidden: Hidden widths of the MLP variant.
        batch_size: Images per minibatch.
    """

    name = "omniglot"

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int = 14,
        ways: int = 5,
        channels: Sequence[int] = (8, 16),
        hidden: Sequence[int] = (64,),
        batch_size: int = 25,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Omniglot folder {self.root} does not exist; pass the shared data folder")
        self.images = _load_omniglot(self.root, image_size)
        if ways > self.images.shape[0]:
            raise ValueError(f"ways={ways} but only {self.images.shape[0]} characters were found under {root}")
        self.image_size, self.ways, self.channels = image_size, ways, tuple(channels)
        self.hidden, self.batch_size = tuple(hidden), batch_size

    def sample(self, generator: torch.Generator) -> Task:
        chars = torch.randperm(self.images.shape[0], generator=generator)[: self.ways]
        images = self.images[chars].unsqueeze(2)  # (ways, 20, 1, H, W)
        if self.channels:
            return ConvTask(1, self.channels, self.ways, _OmniglotSampler(images, self.batch_size, 15), name=self.name)
        flat = _FlatSampler(_OmniglotSampler(images, self.batch_size, 15))
        return MLPTask((self.image_size**2, *self.hidden, self.ways), "relu", False, flat, name=self.name)


@dataclass
class _FlatSampler:
    inner: _OmniglotSampler

    def __call__(self, generator: torch.Generator, split: str) -> Batch:
        x, y = self.inner(generator, split)
        return x.flatten(1), y
