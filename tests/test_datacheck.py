"""``lightning-meta data check ROOT`` on folders in the official layouts, complete and broken."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from lightning_meta.cli import main
from lightning_meta.datacheck import check_folder

OMNIGLOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "omniglot"


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_reports_found_layouts_and_what_is_missing(tmp_path: Path, capsys):
    from lightning_meta.datamodules.cdfsl import EUROSAT_CLASSES

    for c, n in EUROSAT_CLASSES.items():  # complete EuroSAT listing (empty files: nothing is decoded)
        for i in range(n):
            touch(tmp_path / "eurosat" / "2750" / c / f"{c}_{i}.jpg")
    isic = tmp_path / "isic"
    touch(isic / "ISIC2018_Task3_Training_Input" / "ISIC_0000000.jpg")
    (isic / "ISIC2018_Task3_Training_GroundTruth").mkdir(parents=True)
    with open(isic / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"])
        w.writerow(["ISIC_0000000", 1, 0, 0, 0, 0, 0, 0])
        w.writerow(["ISIC_0000001", 0, 1, 0, 0, 0, 0, 0])
    album = tmp_path / "BCT_Micro"
    (album / "images").mkdir(parents=True)
    (album / "info.json").write_text('{"image_column_name": "FILE_NAME", "category_column_name": "CATEGORY"}')
    (album / "labels.csv").write_text("FILE_NAME,CATEGORY\na.png,x\nb.png,y\n")
    touch(album / "images" / "a.png")
    touch(tmp_path / "mini" / "mini-imagenet-cache-train.pkl")
    found = {f.dataset: f for f in check_folder(tmp_path)}
    assert set(found) == {"EuroSAT", "ISIC 2018 Task 3", "Meta-Album", "miniImageNet (pickles)"}
    assert found["EuroSAT"].ok and found["EuroSAT"].summary == "27000 images"
    assert any("1 of 2 listed images are missing" in p for p in found["ISIC 2018 Task 3"].problems)
    assert any("1 of 2 images listed in labels.csv are missing" in p for p in found["Meta-Album"].problems)
    assert sorted(p.split(";")[0] for p in found["miniImageNet (pickles)"].problems) == [
        "mini-imagenet-cache-test.pkl missing", "mini-imagenet-cache-val.pkl missing"]
    with pytest.raises(SystemExit) as exit_:
        main(["data", "check", str(tmp_path)])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "OK  EuroSAT" in out and "BAD Meta-Album" in out and "challenge.isic-archive.com" not in out
    shutil.rmtree(tmp_path / "eurosat" / "2750" / "Forest")
    eurosat = {f.dataset: f for f in check_folder(tmp_path / "eurosat")}["EuroSAT"]
    assert "2750/Forest/ has 0 images, the release has 3000" in eurosat.problems[0]
    with pytest.raises(SystemExit) as exit_:
        main(["data", "check", str(tmp_path / "mini" / "..")])
    assert exit_.value.code == 1


@pytest.mark.skipif(not (OMNIGLOT / "images_background_small1.zip").exists(), reason="no Omniglot subsets")
def test_omniglot_subsets_pass(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "check", str(OMNIGLOT)])
    assert exit_.value.code == 0
    assert "OK  Omniglot" in capsys.readouterr().out


def test_empty_folder_and_usage(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "check", str(tmp_path)])
    assert exit_.value.code == 1 and "no known dataset layout" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["data"])
    assert exit_.value.code == 2
