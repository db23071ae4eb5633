"""ImageFolderDataModule on a tiny tree written here: decoding, splits, cache reuse and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import write_jpeg, write_png

import lightning_meta.datamodules.image_folder as image_folder
from lightning_meta.datamodules.image_folder import ImageFolderDataModule

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.*")

CLASSES = [f"class_{k}" for k in range(8)]


def make_tree(root: Path, per_class: int = 5) -> Path:
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            img = torch.full((3, 10, 12), 20 * k + 2 * j, dtype=torch.uint8)
            img[0] = 200  # red channel constant, green/blue encode class and index
            if j % 2:
                write_png(img, str(root / name / f"{j}.png"))
            else:
                write_jpeg(img, str(root / name / f"{j}.jpg"), quality=100)
    (root / "README.txt").write_text("not a class")
    return root


def small(root: Path, **kw) -> ImageFolderDataModule:
    args = dict(
        image_size=6, ways=2, shots=1, queries=2, tasks_per_batch=2, train_episodes=4, val_episodes=2, test_episodes=2
    )
    args.update(kw)
    return ImageFolderDataModule(str(root), **args)


def test_seeded_split_decodes_resizes_and_keeps_classes_apart(tmp_path: Path):
    dm = small(make_tree(tmp_path / "data"), split_fractions=(0.5, 0.25, 0.25))
    dm.setup()
    stores = {s: d.store for s, d in dm.datasets.items()}
    names = [set(s.class_names) for s in stores.values()]
    assert set.union(*names) == set(CLASSES) and sum(map(len, names)) == 8
    assert [len(n) for n in names] == [4, 2, 2]
    assert stores["train"].images.shape[1:] == (3, 6, 6) and stores["train"].images.dtype == torch.uint8
    b = next(iter(dm.train_dataloader()))
    assert b.support_x.shape == (2, 2, 3, 6, 6) and b.query_x.shape == (2, 4, 3, 6, 6)
    # the green channel holds 20 * class + 2 * index (jpeg at quality 100 is within a few levels)
    x = torch.cat([b.support_x, b.query_x], 1)
    y = torch.cat([b.support_y, b.query_y], 1)
    cls = ((x[:, :, 1].mean((-1, -2)) * 255) / 20).floor()
    for t in range(2):
        for lab in (0, 1):
            assert len(set(cls[t][y[t] == lab].tolist())) == 1
    assert torch.allclose(x[:, :, 0], torch.full_like(x[:, :, 0], 200 / 255), atol=3 / 255)
    again = small(tmp_path / "data", split_fractions=(0.5, 0.25, 0.25))
    again.setup()
    assert again.datasets["train"].store.class_names == stores["train"].class_names


def test_explicit_lists_grayscale_transform_and_cache_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = make_tree(tmp_path / "data")
    lists = dict(train_classes=CLASSES[:4], val_classes=CLASSES[4:6], test_classes=CLASSES[6:])
    flip = lambda img: img.flip(-1)  # noqa: E731
    dm = small(root, channels=1, cache_dir=str(tmp_path / "cache"), eval_transform=flip, **lists)
    dm.setup()
    assert dm.datasets["val"].store.class_names == CLASSES[4:6]
    assert dm.datasets["train"].store.images.shape[1] == 1 and dm.datasets["val"].transform is flip
    assert len(list((tmp_path / "cache").glob("imagefolder-*.pt"))) == 1
    assert sorted(p.name for p in root.iterdir()) == sorted(CLASSES + ["README.txt"])  # nothing written there

    def no_decode(*a, **k):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(image_folder, "decode_image_folder", no_decode)
    small(root, channels=1, cache_dir=str(tmp_path / "cache"), **lists).setup()


def test_bad_folders_and_lists_are_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist; it should hold one subfolder per class"):
        small(tmp_path / "missing").setup()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no class subfolders"):
        small(tmp_path / "flat").setup()
    root = make_tree(tmp_path / "data")
    with pytest.raises(ValueError, match="together"):
        small(root, train_classes=CLASSES[:4])
    with pytest.raises(ValueError, match=r"2 listed classes have no folder .*'nope'"):
        small(
            root, train_classes=CLASSES[:4] + ["nope", "nope2"], val_classes=CLASSES[4:6], test_classes=CLASSES[6:]
        ).setup()
    with pytest.warns(UserWarning, match="1 class folders .* are in no split"):
        small(root, train_classes=CLASSES[:4], val_classes=CLASSES[4:6], test_classes=CLASSES[6:7], eval_ways=1).setup()
    with pytest.raises(ValueError, match=r"shots \+ queries = 1 \+ 9 = 10 but class .* has only 5"):
        small(root, queries=9).setup()
    with pytest.raises(ValueError, match="channels=2"):
        small(root, channels=2)
    (root / "class_0" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="cannot decode image .*broken.png"):
        small(root).setup()
    (root / "empty_class").mkdir()
    (root / "class_0" / "broken.png").unlink()
    with pytest.raises(ValueError, match="empty_class has no images"):
        small(root).setup()
