"""OmniglotDataModule on the shared official small subsets and on tiny zips cut from them."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lightning_meta.datamodules.omniglot as omniglot
from lightning_meta.datamodules.omniglot import SPLITS_DIR, OmniglotDataModule, parse_split_file


def base(name: str) -> str:
    return name.rsplit("/rot", 1)[0]


def tiny_zip(src: Path, dst: Path, prefix: str, characters: list[str]) -> dict[str, bytes]:
    """Copy every drawing of ``characters`` ("Alphabet/characterNN") from ``src`` into ``dst``."""
    members = {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for n in zin.namelist():
            parts = n.split("/")
            if n.endswith(".png") and "/".join(parts[1:3]) in characters:
                data = zin.read(n)
                zout.writestr(f"{prefix}/{'/'.join(parts[1:])}", data)
                members["/".join(parts[1:])] = data
    return members


def small(root: Path, **kw) -> OmniglotDataModule:
    args = dict(ways=3, shots=1, queries=2, tasks_per_batch=2, train_episodes=4, val_episodes=2, test_episodes=2)
    args.update(kw)
    return OmniglotDataModule(str(root), **args)


@pytest.mark.slow
def test_shared_small_zips_auto_split(omniglot_dir: Path, monkeypatch: pytest.MonkeyPatch):
    # default cache_dir: the session cache from conftest (LIGHTNING_META_CACHE), shared with other tests
    dm = OmniglotDataModule(str(omniglot_dir), train_episodes=64)
    dm.setup()
    stores = {s: d.store for s, d in dm.datasets.items()}
    chars = {s: {base(c) for c in st.class_names} for s, st in stores.items()}
    assert sum(len(c) for c in chars.values()) == 242 == len(set.union(*chars.values()))  # Greek/Latin deduplicated
    assert sum(st.num_classes for st in stores.values()) == 968  # 4 rotations as classes
    assert (
        not (chars["train"] & chars["val"])
        and not (chars["train"] & chars["test"])
        and not (chars["val"] & chars["test"])
    )
    tr = stores["train"]
    assert tr.images.shape[1:] == (1, 28, 28) and tr.images.dtype == torch.uint8
    assert (tr.counts() == 20).all()
    assert tr.images.float().mean() / 255 < 0.25 and tr.images.max() == 255  # strokes are 1, background 0
    c = sorted(chars["train"])[0]
    r0, r90 = tr.select([f"{c}/rot000"]).images, tr.select([f"{c}/rot090"]).images
    assert torch.equal(r90, torch.rot90(r0, 1, dims=(-2, -1)))
    b = next(iter(dm.train_dataloader()))
    assert b.support_x.shape == (32, 5, 1, 28, 28) and b.query_x.shape == (32, 75, 1, 28, 28)
    assert sorted(b.query_y[0].tolist()) == sorted(list(range(5)) * 15)
    cache = Path(os.environ["LIGHTNING_META_CACHE"])
    assert len(list(cache.glob("omniglot-images_background_small*-28-*.pt"))) == 2  # one decoded store per zip

    def no_decode(*a, **k):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(omniglot, "_decode", no_decode)
    again = OmniglotDataModule(str(omniglot_dir), train_episodes=64)
    again.setup()
    assert again.datasets["val"].store.class_names == stores["val"].class_names
    assert torch.equal(next(iter(again.val_dataloader())).query_x, next(iter(dm.val_dataloader())).query_x)


def test_decoding_matches_an_independent_pil_reference(omniglot_dir: Path, tmp_path: Path):
    members = tiny_zip(
        omniglot_dir / "images_background_small1.zip",
        tmp_path / "images_background_small1.zip",
        "images_background_small1",
        ["Korean/character01", "Greek/character02"],
    )
    dm = small(tmp_path, image_size=105, rotations=False, split_fractions=(1, 1, 1))
    store, origin = dm.characters()
    assert store.class_names == ["Greek/character02", "Korean/character01"]
    assert set(origin.values()) == {"images_background_small1"}
    first = sorted(n for n in members if n.startswith("Greek/character02"))[0]
    ref = 255 - np.asarray(Image.open(io.BytesIO(members[first])).convert("L"), dtype=np.uint8)
    assert torch.equal(store.images[0, 0], torch.from_numpy(ref.copy()))


def test_zip_folder_and_torchvision_layouts_agree_and_duplicates_merge(omniglot_dir: Path, tmp_path: Path):
    chars1 = ["Greek/character01", "Greek/character02", "Korean/character01"]
    chars2 = ["Greek/character01", "Greek/character02", "Latin/character01"]
    z = tmp_path / "zips"
    z.mkdir()
    tiny_zip(
        omniglot_dir / "images_background_small1.zip",
        z / "images_background_small1.zip",
        "images_background_small1",
        chars1,
    )
    tiny_zip(
        omniglot_dir / "images_background_small2.zip",
        z / "images_background_small2.zip",
        "images_background_small2",
        chars2,
    )
    from_zip, origin = small(z).characters()
    assert from_zip.class_names == ["Greek/character01", "Greek/character02", "Korean/character01", "Latin/character01"]
    assert origin["Latin/character01"] == "images_background_small2"
    for layout in ("folder", "omniglot-py"):
        root = tmp_path / layout
        inner = root / "omniglot-py" if layout == "omniglot-py" else root
        for name in ("images_background_small1", "images_background_small2"):
            with zipfile.ZipFile(z / f"{name}.zip") as zf:
                zf.extractall(inner)
        other, _ = small(root).characters()
        assert other.class_names == from_zip.class_names and torch.equal(other.images, from_zip.images)


def test_custom_and_lake_splits_and_split_file_errors(omniglot_dir: Path, tmp_path: Path):
    src = omniglot_dir / "images_background_small1.zip"
    bg = [f"Korean/character{k:02d}" for k in range(1, 7)]
    ev = ["Balinese/character01", "Balinese/character02", "Balinese/character03"]
    tiny_zip(src, tmp_path / "images_background.zip", "images_background", bg)
    tiny_zip(src, tmp_path / "images_evaluation.zip", "images_evaluation", ev)
    lake = small(tmp_path, split="lake", split_fractions=(0.5, 0.5, 0.1))
    lake.setup()
    got = {s: sorted({base(c) for c in d.store.class_names}) for s, d in lake.datasets.items()}
    assert got["test"] == ev and sorted(got["train"] + got["val"]) == bg and len(got["val"]) == 3
    with pytest.raises(ValueError, match=r"Vinyals split resolved|not in the data"):
        small(tmp_path, split="vinyals").setup()
    with pytest.raises(ValueError, match="split='maml' .* has 9"):
        small(tmp_path, split="maml").setup()

    sd = tmp_path / "splits"
    sd.mkdir()
    (sd / "train.txt").write_text("# header\nKorean\n")
    (sd / "val.txt").write_text("Balinese/character01/rot000\nBalinese/character01/rot180\nBalinese/character02\n")
    (sd / "test.txt").write_text("Balinese/character03\n")
    dm = small(tmp_path, split="custom", split_dir=str(sd), eval_ways=1)
    dm.setup()
    assert dm.datasets["train"].store.num_classes == 24
    assert dm.datasets["val"].store.class_names == [
        "Balinese/character01/rot000",
        "Balinese/character02/rot000",
        "Balinese/character02/rot090",
        "Balinese/character01/rot180",
        "Balinese/character02/rot180",
        "Balinese/character02/rot270",
    ]
    v = dm.datasets["val"].store
    assert torch.equal(
        v.select(["Balinese/character01/rot180"]).images,
        torch.rot90(v.select(["Balinese/character01/rot000"]).images, 2, dims=(-2, -1)),
    )
    (sd / "test.txt").write_text("Balinese/character03\nTibetan\nKorean/character99\nULOG/character01\n")
    with pytest.raises(ValueError, match=r"names 3 alphabets/characters that are not in the data, e.g. \['Tibetan'"):
        small(tmp_path, split="custom", split_dir=str(sd)).setup()
    (sd / "test.txt").write_text("Balinese/character03/rot045\n")
    with pytest.raises(ValueError, match="rot045"):
        small(tmp_path, split="custom", split_dir=str(sd)).setup()


def test_missing_corrupt_and_malformed_data_are_explained(tmp_path: Path, omniglot_dir: Path):
    with pytest.raises(FileNotFoundError, match=r"no Omniglot data in .* Pass download=True"):
        small(tmp_path / "nothing").setup()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "images_background_small1.zip").write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(ValueError, match="not a readable zip .* corrupt or partial download"):
        small(tmp_path / "c").setup()
    (tmp_path / "m").mkdir()
    with zipfile.ZipFile(tmp_path / "m" / "images_background_small1.zip", "w") as zf:
        zf.writestr("loose.png", b"")
    with pytest.raises(ValueError, match="malformed at member loose.png"):
        small(tmp_path / "m").setup()
    with pytest.raises(ValueError, match="split='vinyals' needs images_background and images_evaluation"):
        small(omniglot_dir, split="vinyals").setup()
    with pytest.raises(ValueError, match="split='bogus'"):
        small(omniglot_dir, split="bogus")
    with pytest.raises(ValueError, match="split_dir"):
        small(omniglot_dir, split="custom")


def test_shipped_vinyals_lists_are_consistent():
    files = {s: parse_split_file(SPLITS_DIR / "omniglot_vinyals" / f"{s}.txt") for s in ("train", "val", "test")}
    whole = {s: {a for a, c, _ in v if c is None} for s, v in files.items()}
    assert whole["val"] == {"Hebrew", "Mkhedruli_(Georgian)", "Armenian", "Early_Aramaic", "Bengali"}
    assert len(whole["train"]) == 32 and len(whole["test"]) == 12
    assert (
        not (whole["train"] & whole["val"])
        and not (whole["train"] & whole["test"])
        and not (whole["val"] & whole["test"])
    )
    gurmukhi = {s: sorted(c for a, c, _ in v if a == "Gurmukhi") for s, v in files.items()}
    assert gurmukhi["test"] == [f"character{k}" for k in (42, 43, 44, 45)]
    assert gurmukhi["train"] == [f"character{k:02d}" for k in range(1, 42)] and gurmukhi["val"] == []
    assert len(whole["train"] | whole["val"] | whole["test"]) == 49  # + Gurmukhi, split by character = 50


def test_download_fetches_the_official_zips_with_md5(
    tmp_path: Path, omniglot_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    import torchvision.datasets.utils as tvu

    calls = []

    def fake_download(url, root, filename, md5):
        calls.append((url, filename, md5))
        names = {"images_background.zip": ["Korean/character01"], "images_evaluation.zip": ["Balinese/character01"]}
        tiny_zip(omniglot_dir / "images_background_small1.zip", Path(root) / filename, filename[:-4], names[filename])

    monkeypatch.setattr(tvu, "download_url", fake_download)
    dm = small(tmp_path, download=True)
    dm.prepare_data()
    assert calls == [
        (f"{omniglot.URL}/images_background.zip", "images_background.zip", "68d2efa1b9178cc56df9314c21c6e718"),
        (f"{omniglot.URL}/images_evaluation.zip", "images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811"),
    ]
    assert omniglot.URL == "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
    assert dm.characters()[0].class_names == ["Korean/character01", "Balinese/character01"]  # background first
