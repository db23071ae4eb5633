"""The ``lightning-meta`` CLI and every shipped config in ``examples/configs``.

Each config is parsed, checked against the published hyperparameters (docs/algorithms/; written here independently
of the configs) and run with ``fast_dev_run`` on tiny data written in the official layouts.
"""

from __future__ import annotations

import importlib
import inspect
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import RichProgressBar

from lightning_meta.cli import MetaLightningCLI, check_ways
from tests._tiny_data import (
    write_tiny_cifar100,
    write_tiny_leo_embeddings,
    write_tiny_mini_imagenet,
    write_tiny_omniglot,
)
from tests.conftest import SHARED_OMNIGLOT

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
ALL_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml"))

# docs/algorithms/maml.md: (ways, paper alpha with cbfinn's sum-style loss, train steps, eval steps, meta-batch).
# lightning-meta's inner loss is a mean, so a config's inner_lr must be ways * alpha (section 2.1).
MAML_REFERENCE = {
    "maml_omniglot_5w1s.yaml": (5, 0.4, 1, 3, 32),
    "fomaml_omniglot_5w1s.yaml": (5, 0.4, 1, 3, 32),
    "maml_omniglot_20w1s.yaml": (20, 0.1, 5, 5, 16),
    "maml_mini_imagenet_5w1s.yaml": (5, 0.01, 5, 10, 4),
    "fomaml_mini_imagenet_5w1s.yaml": (5, 0.01, 5, 10, 4),
    "maml_mini_imagenet_5w5s.yaml": (5, 0.01, 5, 10, 2),
}

# docs/algorithms/leo.md (deepmind/leo README): outer_lr, l2, orthogonality, dropout, kl, encoder_penalty.
LEO_REFERENCE = {
    "leo_mini_imagenet_5w1s.yaml": (2.739e-4, 3.62e-10, 0.188, 0.308, 0.756, 5.76e-6),
    "leo_mini_imagenet_5w5s.yaml": (4.102e-4, 8.54e-9, 1.52e-3, 0.300, 0.466, 2.66e-7),
    "leo_tiered_imagenet_5w1s.yaml": (8.659e-4, 4.15e-10, 5.45e-3, 0.475, 2.03e-3, 8.30e-5),
    "leo_tiered_imagenet_5w5s.yaml": (6.110e-4, 1.69e-10, 2.48e-2, 0.415, 1.623, 2.67e-5),
}
# Other sections: (model init_args, data init_args) entries a config must carry.
OTHER_REFERENCE = {
    "imaml_hf_omniglot_5w1s.yaml": (  # docs/algorithms/maml_pp_reptile_imaml.md: iMAML, Hessian-Free
        {"inner_solver": "hessian_free", "lam": 2.0, "newton_cg_steps": 5, "cg_steps": 5},
        {"ways": 5, "shots": 1},
    ),
    "anil_fc100_5w5s.yaml": (
        {"inner_lr": 0.1, "inner_steps": 5, "meta_lr": 1e-3},
        {"tasks_per_batch": 32, "shots": 5, "queries": 5},
    ),
    "caml_sinusoid.yaml": (
        {"inner_lr": 1.0, "inner_steps": 1, "meta_grad_clamp": 10.0},
        {"shots": 10, "tasks_per_batch": 25, "eval_grid": 100},
    ),
    "caml_mini_imagenet_5w1s.yaml": (
        {"inner_lr": 1.0, "inner_steps": 2, "eval_inner_steps": 2},
        {"tasks_per_batch": 16, "queries": 15},
    ),
    "protonet_omniglot_5w1s.yaml": ({}, {"ways": 60, "queries": 5, "eval_ways": 5, "test_episodes": 1000}),
    "protonet_mini_imagenet_5w1s.yaml": ({}, {"ways": 30, "queries": 15, "eval_ways": 5, "test_episodes": 600}),
    "protonet_mini_imagenet_5w5s.yaml": ({}, {"ways": 20, "queries": 15, "eval_ways": 5, "test_episodes": 600}),
    "metasgd_omniglot_5w1s.yaml": ({"inner_steps": 1}, {"queries": 15}),
    "metasgd_mini_imagenet_5w1s.yaml": ({"inner_steps": 1}, {"queries": 15}),
    "matching_networks_omniglot_5w1s.yaml": ({"fce": False}, {"ways": 5, "shots": 1}),
    "matching_networks_mini_imagenet_5w1s.yaml": ({"fce": True}, {"ways": 5, "shots": 1}),
    "proto_maml_omniglot_5w1s.yaml": ({"inner_lr": 0.01, "inner_steps": 5, "first_order": True}, {"ways": 5}),
    "proto_maml_mini_imagenet_5w1s.yaml": ({"inner_lr": 0.01, "inner_steps": 5, "first_order": True}, {"ways": 5}),
}


@pytest.fixture(scope="module")
def tiny_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny-data")
    return {
        "omniglot": write_tiny_omniglot(base / "omniglot"),
        # what a user has offline: the two official small background subsets (tiny synthetic files without them)
        "omniglot_subsets": SHARED_OMNIGLOT
        if (SHARED_OMNIGLOT / "images_background_small1.zip").exists()
        else write_tiny_omniglot(base / "omniglot_subsets"),
        "mini": write_tiny_mini_imagenet(base / "mini"),
        "cifar": write_tiny_cifar100(base / "cifar"),
        "leo": write_tiny_leo_embeddings(base / "leo"),
    }


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / name).read_text())


def data_overrides(config: dict[str, Any], roots: dict[str, Path], *, as_shipped: bool = False) -> list[str]:
    """Point a config's datamodule at tiny data and shrink its episodes (1 task, 2 queries, 2 eval episodes).

    ``as_shipped``: Omniglot configs keep their own split (and fall back as configured) on the small official
    subsets, as a user's first run would."""
    data = config.get("data", {})
    cls = data.get("class_path", "").rsplit(".", 1)[-1]
    small = [
        "--data.init_args.val_episodes=2",
        "--data.init_args.test_episodes=2",
        "--data.init_args.tasks_per_batch=1",
        "--data.init_args.queries=2",
        "--data.init_args.eval_queries=1",
    ]
    if cls == "OmniglotDataModule" and as_shipped:
        return [f"--data.init_args.root={roots['omniglot_subsets']}", "--data.init_args.download=false", *small]
    if cls == "OmniglotDataModule":
        return [
            f"--data.init_args.root={roots['omniglot']}",
            "--data.init_args.split=seeded",
            "--data.init_args.download=false",
            *small,
        ]
    if cls == "MiniImageNetDataModule":
        return [f"--data.init_args.root={roots['mini']}", "--data.init_args.strict=false", *small]
    if cls in ("CIFARFSDataModule", "FC100DataModule"):
        return [
            f"--data.init_args.root={roots['cifar']}",
            "--data.init_args.strict=false",
            "--data.init_args.download=false",
            *small,
        ]
    if cls == "LEOEmbeddingDataModule":
        return [f"--data.init_args.root={roots['leo']}", *small]
    if cls == "SinusoidDataModule":
        return small
    return []


def model_overrides(config: dict[str, Any]) -> list[str]:
    """Run tasks in a plain loop (``task_mode="auto"`` times loop and vmap on the first batch, which costs more
    than the whole ``fast_dev_run``) and shrink 84x84 images to 32x32."""
    path = config.get("model", {}).get("class_path", "")
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name) if module else None
    out = []
    if cls is not None and "task_mode" in inspect.signature(cls.__init__).parameters:
        out.append("--model.init_args.task_mode=loop")
    backbone = config["model"].get("init_args", {}).get("backbone", {})
    if "image_size" in backbone.get("init_args", {}) and "image_size" in config.get("data", {}).get("init_args", {}):
        # 84x84 -> 32x32 images (the datamodule resizes): a 7x cheaper run of the same code
        out += ["--model.init_args.backbone.init_args.image_size=32", "--data.init_args.image_size=32"]
    embedding = config["model"].get("init_args", {}).get("embedding", {})
    if embedding.get("class_path", "").endswith("SNAILResNetEmbedding"):  # pools globally: any image size
        out.append("--data.init_args.image_size=32")
    return out


def run_cli(args: list[str], run: bool = True) -> MetaLightningCLI:
    return MetaLightningCLI(args=args, run=run)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_trains_two_steps_and_tests(name: str, tiny_roots: dict[str, Path], tmp_path: Path) -> None:
    """Each shipped config as a user's first run: its own callbacks, logger and split, stopped by ``max_steps``
    before its first validation (Omniglot configs on the small official subsets)."""
    config = load(name)
    cli = run_cli(
        [
            "--config",
            str(CONFIGS / name),
            *data_overrides(config, tiny_roots, as_shipped=True),
            *model_overrides(config),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2",
            "--trainer.enable_progress_bar=false",
        ],
        run=False,
    )
    # the config's own hyperparameters reached the instantiated model unchanged
    for key, value in config["model"].get("init_args", {}).items():
        attr = getattr(cli.model, key, None)
        if not isinstance(value, (dict, list)) and isinstance(attr, (bool, int, float, str)):
            assert attr == value, key
    before = {k: v.detach().clone() for k, v in cli.model.named_parameters()}
    cli.before_fit()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    after = dict(cli.model.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before), "one optimizer step changed no weight"
    cli.before_test()
    (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    score = next((k for k in ("test/acc", "test/mse", "test/loss") if k in metrics), None)
    if score is not None:
        assert math.isfinite(metrics[score])
    if score == "test/acc":
        assert 0.0 <= metrics[score] <= 1.0


@pytest.mark.parametrize("name", sorted(MAML_REFERENCE))
def test_maml_configs_match_the_reference(name: str) -> None:
    ways, alpha, steps, eval_steps, tasks = MAML_REFERENCE[name]
    config = load(name)
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["inner_lr"] == pytest.approx(ways * alpha)
    assert (model["inner_steps"], model["eval_inner_steps"]) == (steps, eval_steps)
    assert model["first_order"] == name.startswith("fomaml")
    assert model["meta_lr"] == 1e-3
    assert data["tasks_per_batch"] == tasks and data["ways"] == ways
    assert model["backbone"]["init_args"]["out_features"] == ways
    assert config["trainer"]["max_steps"] == 60000
    assert config["trainer"]["inference_mode"] is False
    if "mini_imagenet" in name:  # cbfinn clips miniImageNet meta-gradients to [-10, 10] by value
        assert config["trainer"]["gradient_clip_val"] == 10
        assert config["trainer"]["gradient_clip_algorithm"] == "value"


@pytest.mark.parametrize("name", sorted(LEO_REFERENCE))
def test_leo_configs_match_the_release(name: str) -> None:
    lr, l2, orth, dropout, kl, enc = LEO_REFERENCE[name]
    config = load(name)
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    got = (
        model["meta_lr"],
        model["l2_penalty"],
        model["orthogonality_penalty"],
        model["dropout"],
        model["kl_weight"],
        model["encoder_penalty"],
    )
    assert got == pytest.approx((lr, l2, orth, dropout, kl, enc), rel=1e-9)
    assert (data["tasks_per_batch"], data["queries"], config["trainer"]["max_steps"]) == (12, 15, 100_000)
    assert data["shots"] == int(name.removesuffix("s.yaml")[-1])


@pytest.mark.parametrize("name", sorted(OTHER_REFERENCE))
def test_other_configs_match_the_reference(name: str) -> None:
    model_expected, data_expected = OTHER_REFERENCE[name]
    config = load(name)
    for key, value in model_expected.items():
        assert config["model"]["init_args"][key] == value, key
    for key, value in data_expected.items():
        assert config["data"]["init_args"][key] == value, key


def test_defaults_inference_mode_off_and_rich_progress_bar(tmp_path: Path) -> None:
    args = [
        "--config",
        str(CONFIGS / "maml_sinusoid.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks=[]",
    ]
    cli = run_cli(args, run=False)
    assert cli.trainer.test_loop.inference_mode is False and cli.trainer.validate_loop.inference_mode is False
    assert isinstance(cli.trainer.progress_bar_callback, RichProgressBar)
    cli = run_cli([*args, "--trainer.enable_progress_bar=false"], run=False)
    assert cli.trainer.progress_bar_callback is None
    cli = run_cli([*args, "--trainer.inference_mode=true"], run=False)
    assert cli.trainer.test_loop.inference_mode is True


def test_short_class_names_resolve(tmp_path: Path) -> None:
    cli = run_cli(
        [
            "--model=MAML",
            "--model.backbone=lightning_meta.nn.MLP",
            "--model.inner_lr=0.01",
            "--data=SinusoidDataModule",
            "--data.shots=5",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert type(cli.model).__name__ == "MAML" and cli.model.inner_lr == 0.01
    assert type(cli.datamodule).__name__ == "SinusoidDataModule" and cli.datamodule.shots == 5
    cli = run_cli(
        [
            "--model=CAML",
            "--model.backbone=ContextMLP",
            "--data=SinusoidDataModule",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )  # classes outside the package __init__s
    assert type(cli.model).__name__ == "CAML" and type(cli.model.backbone).__name__ == "ContextMLP"


def test_ways_mismatch_is_reported_before_training(tiny_roots: dict[str, Path], tmp_path: Path) -> None:
    config = load("maml_omniglot_5w1s.yaml")
    args = [
        "fit",
        "--config",
        str(CONFIGS / "maml_omniglot_5w1s.yaml"),
        *data_overrides(config, tiny_roots),
        *model_overrides(config),
        "--data.init_args.ways=7",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.fast_dev_run=true",
    ]
    with pytest.raises(ValueError, match=r"out_features=5 .* 7-way .*out_features"):
        run_cli(args)
    from lightning_meta.algorithms import MAML
    from lightning_meta.nn import Conv4

    model = MAML(Conv4(5))
    check_ways(model, SimpleNamespace(ways=5, eval_ways=5))  # agreeing sizes pass
    check_ways(model, SimpleNamespace(ways=1, eval_ways=1))  # regression data is not checked
    with pytest.raises(ValueError, match="20-way"):
        check_ways(model, SimpleNamespace(ways=5, eval_ways=20))


def test_checkpoint_reloads_without_the_config(tmp_path: Path) -> None:
    """A CLI-trained MAML checkpoint holds the nested backbone config, so ``load_from_checkpoint`` needs nothing."""
    from lightning_meta.algorithms import MAML

    cli = run_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "maml_sinusoid.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--data.init_args.tasks_per_batch=2",
            "--model.init_args.task_mode=loop",
            "--data.init_args.val_episodes=2",
            "--trainer.enable_progress_bar=false",
        ]
    )
    ckpt = Path(cli.trainer.checkpoint_callback.last_model_path)
    assert ckpt.is_file()
    model = MAML.load_from_checkpoint(ckpt, map_location="cpu")
    assert model.eval_inner_steps == 10 and type(model.backbone).__name__ == "MLP"
    for k, v in cli.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert saved["model"]["init_args"]["inner_lr"] == 0.01


def test_console_script_entry_point_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import entry_points

    from lightning_meta import cli

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "lightning-meta"]
    assert ep.load() is cli.main
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--data" in out and "--trainer.inference_mode" in out
