"""Rough edges of a first run, each as a new user met it: partial Omniglot, training on every class, no network,
the progress bar of a step-limited run, the quickstart's help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
from lightning.pytorch import Trainer

from lightning_meta.algorithms import ProtoNet
from lightning_meta.datamodules import CIFARFSDataModule, OmniglotDataModule
from lightning_meta.datamodules.omniglot import seeded_split
from lightning_meta.nn import Conv4
from lightning_meta.progress import MetaRichProgressBar
from tests._tiny_data import write_tiny_omniglot

SMALL = dict(ways=3, shots=1, queries=1, tasks_per_batch=2, train_episodes=4, val_episodes=2, test_episodes=2)


@pytest.fixture(scope="module")
def omniglot_part(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only images_background (as the small subsets are): not enough for the published splits."""
    return write_tiny_omniglot(tmp_path_factory.mktemp("omniglot"), alphabets=3, characters=6, drawings=4)


def _chars(store_names: list[str]) -> set[str]:
    return {n.rsplit("/rot", 1)[0] for n in store_names}


def test_published_split_falls_back_to_a_seeded_one_on_partial_data(omniglot_part: Path) -> None:
    dm = OmniglotDataModule(str(omniglot_part), split="maml", fallback_split="seeded", split_seed=5, **SMALL)
    stores = dm.build_stores()
    chars = sorted(
        _chars(stores["train"].class_names) | _chars(stores["val"].class_names) | _chars(stores["test"].class_names)
    )
    assert len(chars) == 18
    expected = seeded_split(chars, (0.7, 0.1, 0.2), 5)  # exactly split="seeded" with the same seed
    for split, names in zip(("train", "val", "test"), expected):
        assert _chars(stores[split].class_names) == set(names)
        assert stores[split].num_classes == 4 * len(names)  # rotations as classes, as configured


def test_published_split_without_fallback_names_the_fix(omniglot_part: Path) -> None:
    dm = OmniglotDataModule(str(omniglot_part), split="vinyals", **SMALL)
    with pytest.raises(
        ValueError,
        match=r"split='vinyals' needs images_background and images_evaluation.*"
        r"fallback_split='seeded'",
    ):
        dm.setup("fit")
    with pytest.raises(ValueError, match="fallback_split='random'; use None"):
        OmniglotDataModule(str(omniglot_part), fallback_split="random")


def _split_dir(tmp_path: Path, train: str, val: str = "", test: str = "") -> Path:
    folder = tmp_path / "split"
    folder.mkdir()
    for name, text in (("train", train), ("val", val), ("test", test)):
        (folder / f"{name}.txt").write_text(text)
    return folder


def test_training_on_every_class_turns_validation_off(omniglot_part: Path, tmp_path: Path) -> None:
    folder = _split_dir(tmp_path, "Alphabet_0\nAlphabet_1\nAlphabet_2\n")
    dm = OmniglotDataModule(str(omniglot_part), split="custom", split_dir=str(folder), **SMALL)
    model = ProtoNet(Conv4(None, hidden=4, image_size=28, downsample="maxpool", pooling="flatten"))
    trainer = Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, dm)
    assert trainer.global_step == 4  # two epochs of 2 batches
    assert dm.datasets["train"].store.num_classes == 4 * 18 and set(dm.datasets) == {"train"}
    assert trainer.num_val_batches == [0]
    with pytest.raises(ValueError, match="the test split has no classes, so there are no test episodes"):
        trainer.test(model, dm)


def test_an_empty_train_split_is_refused(omniglot_part: Path, tmp_path: Path) -> None:
    folder = _split_dir(tmp_path, "", val="Alphabet_0\n", test="Alphabet_1\n")
    dm = OmniglotDataModule(str(omniglot_part), split="custom", split_dir=str(folder), **SMALL)
    with pytest.raises(ValueError, match="the train split of OmniglotDataModule has no classes"):
        dm.setup("fit")


def _offline(*args, **kwargs):
    raise URLError("[Errno -3] Temporary failure in name resolution")


def test_omniglot_download_without_network_says_what_to_fetch_and_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "download_url", _offline)
    dm = OmniglotDataModule(str(tmp_path / "omniglot"), download=True)
    with pytest.raises(RuntimeError) as err:
        dm.prepare_data()
    text = str(err.value)
    assert "URLError" in text and str((tmp_path / "omniglot").resolve()) in text
    for name in ("images_background.zip", "images_evaluation.zip"):
        assert f"https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{name}" in text
    assert isinstance(err.value.__cause__, URLError)


def test_cifar_download_without_network_says_what_to_fetch_and_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", _offline)
    dm = CIFARFSDataModule(str(tmp_path / "cifar"), download=True)
    with pytest.raises(
        RuntimeError,
        match=r"https://www\.cs\.toronto\.edu/~kriz/cifar-100-python\.tar\.gz .*"
        r"cifar-100-python\.tar\.gz in .*cifar/",
    ):
        dm.prepare_data()


# fit() turns a max_steps-only run's max_epochs=None into -1 ("no epoch limit"), which the stock bar printed as "/-2"
@pytest.mark.parametrize(
    ("limits", "label"), [({"max_steps": 5, "max_epochs": -1}, "Epoch 29"), ({"max_epochs": 3}, "Epoch 29/2")]
)
def test_progress_bar_label_of_step_and_epoch_limited_runs(limits: dict, label: str) -> None:
    bar = MetaRichProgressBar()
    trainer = Trainer(callbacks=[bar], logger=False, enable_checkpointing=False, **limits)
    bar.setup(trainer, ProtoNet(Conv4(None, hidden=4)), stage="fit")  # where Lightning hands the bar its trainer
    assert bar._get_train_description(29).rstrip() == label


def test_quickstart_help_shows_the_defaults() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lightning_meta.quickstart", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    assert "(default: 3000)" in out and "(default: maml_sinusoid.png)" in out
