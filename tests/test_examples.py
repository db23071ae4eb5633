"""The example scripts in ``examples/``, each run at reduced size."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from PIL import Image

from tests._tiny_data import write_tiny_omniglot
from lightning_meta.cli import MetaLightningCLI

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
    metrics = example.main(["--root", str(root), "--steps", "3", "--tasks-per-batch", "2", "--test-episodes", "4",
                            "--out-dir", str(tmp_path / "run")])
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["test/acc_ci95"] >= 0.0
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    reloaded = example.MyMAML.load_from_checkpoint(ckpt)  # no arguments: the subclass saved its own
    assert reloaded.max_steps == 3 and isinstance(reloaded.backbone, example.GroupNormConvNet)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    (sched,) = saved["lr_schedulers"]
    assert sched["_last_lr"][0] < 1e-3  # the cosine schedule of the subclass ran, per step
    assert sched["last_epoch"] == 3


def test_evaluate_checkpoint_is_seeded_and_matches_lightning_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = load_example("evaluate_checkpoint")
    config = EXAMPLES / "configs" / "maml_sinusoid.yaml"
    small = ["--data.init_args.tasks_per_batch=2", "--model.init_args.task_mode=loop",
             "--model.init_args.eval_inner_steps=2"]
    cli = MetaLightningCLI(["fit", "--config", str(config), *small, f"--trainer.default_root_dir={tmp_path}",
                            "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                            "--trainer.enable_progress_bar=false"])
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


def test_build_results_tables_from_result_files(tmp_path: Path) -> None:
    from benchmarks import build_results as br  # a module of the benchmarks package, not a file path

    results = tmp_path / "results"
    results.mkdir()
    base = {"setting": "5w1s", "metric": "acc", "episodes": 600, "command": "python x.py --a 1",
            "config": "examples/configs/maml_omniglot_5w1s.yaml", "protocol": "p", "budget": "b"}
    (results / "a.json").write_text(json.dumps({**base, "dataset": "omniglot", "algorithm": "MAML",
                                                "mean": 0.9512, "ci95": 0.0061}))
    (results / "b.json").write_text(json.dumps({**base, "dataset": "sinusoid", "algorithm": "MAML", "metric": "mse",
                                                "setting": "10-shot", "mean": 0.2051, "ci95": 0.0276}))
    text = br.build(results, tmp_path / "RESULTS.md").read_text()
    omniglot = text[text.index("## Omniglot"):text.index("## miniImageNet")]
    assert "| MAML | 5w1s | **95.12 ± 0.61** | 600 | b | 98.7 ± 0.4 [F17] | p |" in omniglot
    assert "`python x.py --a 1`" in omniglot and "`examples/configs/maml_omniglot_5w1s.yaml`" in omniglot
    assert "**0.205 ± 0.028**" in text[text.index("## Sinusoid"):]
    assert "No lightning-meta run recorded yet. Published: " in text[text.index("## FC100"):]
    (results / "bad.json").write_text(json.dumps({"dataset": "omniglot"}))
    with pytest.raises(ValueError, match="bad.json lacks"):
        br.load_results(results)


def test_build_results_collects_bench_records(tmp_path: Path) -> None:
    """bench_accuracy records become schema files; the env, the zeroing trick and skipped pilots are visible."""
    from benchmarks import build_results as br  # a module of the benchmarks package, not a file path

    bench = tmp_path / ".bench" / "accuracy"
    cfg = {"algo": "maml", "minutes": 30.0, "data_dir": "/x", "ways": 5, "shots": 1, "eval_queries": 15,
           "eval_inner_steps": 3, "first_order": False, "zero_init": True}
    rec = {"algo": "maml", "config": cfg, "test_episodes": 600, "test_acc_mean": 0.9595, "test_acc_ci95": 0.0054,
           "optimizer_steps": 4739, "train_cpu_seconds": 1800.0, "tasks_seen": 37912,
           "env": {"MALLOC_TRIM_THRESHOLD_": "1", "MALLOC_MMAP_THRESHOLD_": "2"}}
    for name, extra in [("run", {}), ("pilot", {"scored_split": "val"}), ("smoke", {"test_episodes": 10})]:
        (bench / name).mkdir(parents=True)
        (bench / name / "result.json").write_text(json.dumps({**rec, **extra}))
    written = br.collect_bench_accuracy(bench, tmp_path / "results")
    assert [p.name for p in written] == ["run.json"]  # the validation pilot and the smoke run are not results
    out = json.loads(written[0].read_text())
    assert out["command"].startswith("MALLOC_MMAP_THRESHOLD_=2 MALLOC_TRIM_THRESHOLD_=1 python benchmarks/bench_accuracy.py")
    assert "--zero-init" in out["command"] and "--data-dir" not in out["command"]
    assert "zeroing trick" in out["protocol"] and out["algorithm"] == "MAML"
    assert out["budget"] == "30 CPU-min, 4,739 optimizer steps (37,912 tasks)"
    cfg["zero_init"] = False
    (bench / "run" / "result.json").write_text(json.dumps({**rec, "config": cfg}))
    assert "zeroing trick" not in json.loads(br.collect_bench_accuracy(bench, tmp_path / "results")[0].read_text())["protocol"]
