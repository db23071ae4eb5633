"""Tiny datasets written in the official on-disk layouts, for running the example configs in tests.

Sizes are the smallest that satisfy every shipped config once its episode counts are lowered:
20-way evaluation on Omniglot with rotations (so at least 5 validation characters) and ProtoNets'
30-way miniImageNet training.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["write_tiny_cifar100", "write_tiny_leo_embeddings", "write_tiny_mini_imagenet", "write_tiny_omniglot"]


def write_tiny_omniglot(root: Path, *, alphabets: int = 5, characters: int = 10, drawings: int = 20) -> Path:
    """``root/images_background/Alphabet_a/characterNN/NN.png`` (28x28 grayscale, black strokes on white)."""
    rng = np.random.default_rng(0)
    for a in range(alphabets):
        for c in range(characters):
            folder = root / "images_background" / f"Alphabet_{a}" / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            base = rng.random((28, 28)) < 0.15  # the "character": a fixed random stroke mask
            for d in range(drawings):
                noise = rng.random((28, 28)) < 0.03
                strokes = base ^ noise
                Image.fromarray(np.where(strokes, 0, 255).astype(np.uint8)).save(folder / f"{c:02d}_{d:02d}.png")
    return root


def write_tiny_mini_imagenet(root: Path, classes: dict[str, int] | None = None, per_class: int = 20) -> Path:
    """Ren et al.'s ``mini-imagenet-cache-{split}.pkl`` (``image_data`` uint8 [n, 84, 84, 3], ``class_dict``)."""
    classes = classes or {"train": 30, "val": 5, "test": 5}
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s, (split, n) in enumerate(classes.items()):
        colors = rng.integers(0, 256, size=(n, 1, 1, 1, 3), dtype=np.uint8)
        noise = rng.integers(0, 40, size=(n, per_class, 84, 84, 3), dtype=np.uint8)
        data = (colors + noise).reshape(n * per_class, 84, 84, 3)
        class_dict = {f"n{s}{c:07d}": list(range(c * per_class, (c + 1) * per_class)) for c in range(n)}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as fh:
            pickle.dump({"image_data": data, "class_dict": class_dict}, fh)
    return root


# CIFAR-100's superclasses and their fine classes (Krizhevsky 2009).
SUPERCLASSES = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}


def write_tiny_cifar100(root: Path, per_class: tuple[int, int] = (12, 8)) -> Path:
    """torchvision's ``root/cifar-100-python/{train,test,meta}`` with all 100 classes (32x32 RGB, few images)."""
    coarse = sorted(SUPERCLASSES)
    fine = sorted(f for fs in SUPERCLASSES.values() for f in fs)
    coarse_of = {f: coarse.index(c) for c, fs in SUPERCLASSES.items() for f in fs}
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colors = rng.integers(0, 200, size=(100, 1), dtype=np.uint8)
    for part, n in zip(("train", "test"), per_class):
        labels = np.repeat(np.arange(100), n)
        data = colors[labels] + rng.integers(0, 50, size=(len(labels), 3072), dtype=np.uint8)
        with open(folder / part, "wb") as fh:
            pickle.dump(
                {
                    "fine_labels": labels.tolist(),
                    "coarse_labels": [coarse_of[fine[k]] for k in labels],
                    "data": data,
                    "filenames": [f"img_{i}.png" for i in range(len(labels))],
                },
                fh,
            )
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": fine, "coarse_label_names": coarse}, fh)
    return root


def write_tiny_leo_embeddings(root: Path, classes: int = 5, per_class: int = 20, dim: int = 640) -> Path:
    """The LEO release layout: ``{split}_embeddings.pkl`` with ``embeddings`` (n, dim), ``labels`` and ``keys``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s, split in enumerate(("train", "val", "test")):
        centers = rng.normal(size=(classes, 1, dim)).astype(np.float32)
        emb = (centers + 0.3 * rng.normal(size=(classes, per_class, dim))).reshape(-1, dim).astype(np.float32)
        labels = np.repeat(np.arange(classes), per_class)
        keys = [f"{i}-n{s}{c:07d}-n{s}{c:07d}_{i}.JPEG".encode() for i, c in enumerate(labels)]
        with open(root / f"{split}_embeddings.pkl", "wb") as fh:
            pickle.dump({"embeddings": emb, "labels": labels, "keys": keys}, fh)
    return root
