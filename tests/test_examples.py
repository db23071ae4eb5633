"""The example scripts in ``examples/``, each run at reduced size."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from PIL import Image

from lightning_meta.cli import MetaLightningCLI
from tests._tiny_data import write_tiny_omniglot

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"lm_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses/pickling look classes up by module
    spec.loader.exec_module(module)
    return module


def test_custom_backbone_subclass_trains_tests_and_reloads(tmp_path: Path) -> None:
    example = load_example("custom_backbone")
    root = write_tiny_omniglot(tmp_path / "omniglot", alphabets=3, characters=5)
    metrics = example.main(
        [
            "--root",
            str(root),
            "--steps",
            "3",
            "--tasks-per-batch",
            "2",
            "--test-episodes",
            "4",
            "--out-dir",
            str(tmp_path / "run"),
        ]
    )
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["test/acc_ci95"] >= 0.0
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    reloaded = example.MyMAML.load_from_checkpoint(ckpt)  # no arguments: the subclass saved its own
    assert reloaded.max_steps == 3 and isinstance(reloaded.backbone, example.GroupNormConvNet)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    (sched,) = saved["lr_schedulers"]
    assert sched["_last_lr"][0] < 1e-3  # the cosine schedule of the subclass ran, per step
    assert sched["last_epoch"] == 3


def test_evaluate_checkpoint_is_seeded_and_matches_lightning_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = load_example("evaluate_checkpoint")
    config = EXAMPLES / "configs" / "maml_sinusoid.yaml"
    small = [
        "--data.init_args.tasks_per_batch=2",
        "--model.init_args.task_mode=loop",
        "--model.init_args.eval_inner_steps=2",
    ]
    cli = MetaLightningCLI(
        [
            "fit",
            "--config",
            str(config),
            *small,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
        ]
    )
    ckpt, saved_config = cli.trainer.checkpoint_callback.last_model_path, Path(cli.trainer.log_dir) / "config.yaml"
    assert yaml.safe_load(saved_config.read_text())["model"]["init_args"]["eval_inner_steps"] == 2

    argv = ["--config", str(saved_config), "--ckpt", ckpt, "--episodes", "6"]
    monkeypatch.setattr(sys, "argv", ["evaluate_checkpoint.py", *argv, "--seed", "3"])  # as run from a shell
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = example.main()
    assert not [w for w in caught if "args parameter" in str(w.message)]  # LightningCLI's "args and sys.argv"
    assert sys.argv[1:] == [*argv, "--seed", "3"]  # restored
    again = example.main([*argv, "--seed", "3"])
    other = example.main([*argv, "--seed", "4"])
    assert first == again and first["episodes"] == 6
    assert other["mean"] != first["mean"]

    # the same episodes through Lightning's own test loop give the same mean and interval
    cli.datamodule.test_episodes, cli.datamodule.seed, cli.datamodule.datasets = 6, 3, {}
    (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, verbose=False)
    assert metrics["test/mse"] == pytest.approx(first["mean"], rel=1e-5)
    assert metrics["test/mse_ci95"] == pytest.approx(first["ci95"], rel=0.1)
    assert first["ci95_t"] > first["ci95"]  # Student's t with 5 degrees of freedom is wider than 1.96


def test_learned_optimizer_example_plots_both_curves(tmp_path: Path) -> None:
    example = load_example("learned_optimizer")
    out = tmp_path / "lo.png"
    curves = example.main(["--steps", "12", "--out", str(out)])
    adam, learned = curves.values()
    assert len(adam) == len(learned) == 12
    assert adam[0] == pytest.approx(learned[0])  # same initial weights, same first batch
    assert adam[1:] != learned[1:]  # a different optimizer took over from the first step
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 300
