"""The accuracy protocol's scripts, run as users run them (subprocesses): step budgets, refused incomplete runs,
machine records without absolute paths, seeds aggregated into one row."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _bench_record(seed: int, mean: float, ci: float, **extra) -> dict:
    cfg = {
        "algo": "maml",
        "steps": 12000,
        "max_wall_minutes": None,
        "threads": 1,
        "seed": seed,
        "data_dir": "/somewhere/on/this/machine/omniglot",
        "name": f"maml-s{seed}",
        "ways": 5,
        "shots": 1,
        "eval_queries": 15,
        "eval_inner_steps": 3,
        "first_order": False,
        "zero_init": True,
        "cosine_to": 0.05,
    }
    rec = {
        "algo": "maml",
        "config": cfg,
        "complete": True,
        "steps_budget": 12000,
        "optimizer_steps": 12000,
        "train_seconds": 4000.0 + seed,
        "train_cpu_seconds": 1800.0 + seed,
        "torch_threads": 1,
        "commit": "abc1234def",
        "cpu_model": "Some CPU 9000",
        "cpu_threads": 2,
        "scored_split": "test",
        "tasks_seen": 96000,
        "test_episodes": 600,
        "test_acc_mean": mean,
        "test_acc_ci95": ci,
        "date": "2026-12-06 02:00 UTC",
        "env": {"MALLOC_TRIM_THRESHOLD_": "1", "MALLOC_MMAP_THRESHOLD_": "2"},
    }
    rec.update(extra)
    return rec


def test_build_results_collects_complete_runs_only_and_aggregates_seeds(tmp_path: Path) -> None:
    bench, results, out = tmp_path / "bench", tmp_path / "results", tmp_path / "RESULTS.md"
    runs = {
        "maml-s0": _bench_record(0, 0.960, 0.004),
        "maml-s1": _bench_record(1, 0.966, 0.005),
        "maml-s2": _bench_record(2, 0.972, 0.003),
        "maml-capped": _bench_record(3, 0.90, 0.01, complete=False, optimizer_steps=1065),
        "maml-old": {k: v for k, v in _bench_record(4, 0.95, 0.01).items() if k not in ("complete", "steps_budget")},
        "maml-pilot": _bench_record(5, 0.95, 0.01, scored_split="val"),
    }
    for name, rec in runs.items():
        (bench / name).mkdir(parents=True)
        (bench / name / "result.json").write_text(json.dumps(rec))
    proc = _run(
        "build_results.py", "--collect", "--bench-dir", str(bench), "--results-dir", str(results), "--out", str(out)
    )
    assert sorted(p.name for p in results.glob("*.json")) == ["maml-s0.json", "maml-s1.json", "maml-s2.json"]
    assert "maml-capped/result.json: INCOMPLETE: 1065 of 12000" in proc.stdout
    assert "maml-old/result.json: a CPU-minute-budget record" in proc.stdout
    rec = json.loads((results / "maml-s1.json").read_text())
    assert {
        k: rec[k]
        for k in ("commit", "cpu_model", "cpu_threads", "steps", "cpu_seconds", "wall_seconds", "complete", "seed")
    } == {
        "commit": "abc1234def",
        "cpu_model": "Some CPU 9000",
        "cpu_threads": 2,
        "steps": 12000,
        "cpu_seconds": 1801.0,
        "wall_seconds": 4001.0,
        "complete": True,
        "seed": 1,
    }
    text = (results / "maml-s1.json").read_text()
    assert '"/' not in text  # no absolute path of the machine
    assert rec["config"]["data_dir"] == os.path.relpath("/somewhere/on/this/machine/omniglot", REPO)
    assert "--steps 12000" in rec["command"] and "--seed 1" in rec["command"] and "--cosine-to 0.05" in rec["command"]
    assert "--seed" not in rec["group"] and "--name" not in rec["group"]

    md = out.read_text()
    omniglot = md[md.index("## Omniglot") : md.index("## miniImageNet")]
    means = [0.960, 0.966, 0.972]
    sd = math.sqrt(sum((m - 0.966) ** 2 for m in means) / 2)  # 0.006: sample standard deviation across seeds
    assert (
        f"**96.60** (sd {100 * sd:.2f} across 3 seeds; runs: 96.00 ± 0.40 (seed 0), 96.60 ± 0.50 (seed 1), "
        "97.20 ± 0.30 (seed 2))" in omniglot
    )
    assert omniglot.count("| MAML | 5w1s |") == 1  # one row for the three seeds
    assert "12,000 optimizer steps (96,000 tasks); 30 CPU-min, 67 wall-min" in omniglot
    assert "Some CPU 9000, 2 threads (1 used); abc1234" in omniglot
    assert "History" not in md  # no history folder given


def test_build_results_refuses_incomplete_or_unrecorded_figures(tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "RESULTS.md"
    (results / "history").mkdir(parents=True)
    base = {
        "dataset": "omniglot",
        "setting": "5w1s",
        "algorithm": "ProtoNet",
        "metric": "acc",
        "mean": 0.9695,
        "ci95": 0.0034,
        "episodes": 600,
        "command": "python benchmarks/bench_accuracy.py --algo protonet",
    }
    # the old protocol's figures are accepted as history only, in their own section
    (results / "history" / "old.json").write_text(json.dumps({**base, "budget": "7 CPU-min, 1,065 optimizer steps"}))
    proc = _run("build_results.py", "--results-dir", str(results), "--out", str(out))
    md = out.read_text()
    assert "## History: CPU-minute budgets (superseded)" in md
    assert "| Omniglot | ProtoNet | 5w1s | 96.95 ± 0.34 | 600 | 7 CPU-min, 1,065 optimizer steps |" in md
    assert "No lightning-meta run recorded yet" in md[md.index("## Omniglot") : md.index("## miniImageNet")]
    # ... but not as a current figure
    (results / "old.json").write_text(json.dumps(base))
    proc = _run("build_results.py", "--results-dir", str(results), "--out", str(out), check=False)
    assert proc.returncode != 0 and "old.json lacks ['complete', 'steps'" in proc.stderr
    current = {
        **base,
        "steps": 1065,
        "cpu_seconds": 400.0,
        "wall_seconds": 900.0,
        "commit": "abc",
        "cpu_model": "x",
        "cpu_threads": 2,
        "complete": False,
    }
    (results / "old.json").write_text(json.dumps(current))
    proc = _run("build_results.py", "--results-dir", str(results), "--out", str(out), check=False)
    assert proc.returncode != 0 and "records an incomplete run (1065 steps)" in proc.stderr
    (results / "old.json").write_text(json.dumps({**current, "complete": True, "config": {"data_dir": "/home/u/d"}}))
    proc = _run("build_results.py", "--results-dir", str(results), "--out", str(out), check=False)
    assert proc.returncode != 0 and "absolute path" in proc.stderr


@pytest.mark.slow
def test_bench_accuracy_trains_its_step_budget_and_marks_a_capped_run(tmp_path: Path) -> None:
    common = ("--algo", "maml-sinusoid", "--test-episodes", "5", "--out-dir", str(tmp_path))
    _run("bench_accuracy.py", *common, "--steps", "30", "--name", "full")
    rec = json.loads((tmp_path / "full" / "result.json").read_text())
    assert rec["complete"] is True and rec["optimizer_steps"] == rec["steps_budget"] == 30
    assert rec["tasks_seen"] == 30 * 25 and rec["config"]["steps"] == 30 and "data_dir" not in rec["config"]
    assert rec["train_cpu_seconds"] > 0 and rec["train_seconds"] > 0 and rec["cpu_threads"] == os.cpu_count()
    assert rec["cpu_model"] and len(rec["commit"].split("+")[0]) == 40
    # a wall-clock cap that ends training early leaves an incomplete record, which build_results skips
    _run("bench_accuracy.py", *common, "--steps", "1000000", "--max-wall-minutes", "0.05", "--name", "capped")
    capped = json.loads((tmp_path / "capped" / "result.json").read_text())
    assert capped["complete"] is False and 0 < capped["optimizer_steps"] < 1_000_000
    proc = _run(
        "build_results.py",
        "--collect",
        "--min-episodes",
        "1",
        "--bench-dir",
        str(tmp_path),
        "--results-dir",
        str(tmp_path / "results"),
        "--out",
        str(tmp_path / "R.md"),
    )
    assert [p.name for p in (tmp_path / "results").glob("*.json")] == ["full.json"] and "INCOMPLETE" in proc.stdout
    # the old CPU-minute flag is refused with the fix
    proc = _run("bench_accuracy.py", *common, "--minutes", "30", check=False)
    assert proc.returncode == 2 and "--steps" in proc.stderr


def test_bench_accuracy_runs_maml_pp_with_its_schedules_over_the_steps(tmp_path: Path) -> None:
    data = REPO.parent / "shared" / "data" / "omniglot"
    if not (data / "images_background_small1.zip").exists():
        pytest.skip("needs ../shared/data/omniglot")
    common = ("--test-episodes", "3", "--out-dir", str(tmp_path), "--task-mode", "loop")
    args = ("--steps", "4", "--pp-epochs", "2", "--first-order-epochs", "1", "--no-bn-stats", "--name", "pp")
    _run("bench_accuracy.py", "--algo", "maml_pp", *common, *args)
    rec = json.loads((tmp_path / "pp" / "result.json").read_text())
    assert rec["complete"] is True and rec["optimizer_steps"] == 4
    cfg = rec["config"]
    assert (cfg["inner_steps"], cfg["inner_lr"], cfg["meta_lr"]) == (5, 0.1, 1e-3)  # the paper's settings
    assert (cfg["pp_epochs"], cfg["first_order_epochs"], cfg["msl_epochs"], cfg["bn_stats"]) == (2, 1, 10, False)
    _run(
        "build_results.py",
        "--collect",
        "--min-episodes",
        "1",
        "--bench-dir",
        str(tmp_path),
        "--results-dir",
        str(tmp_path / "results"),
        "--out",
        str(tmp_path / "R.md"),
    )
    fig = json.loads((tmp_path / "results" / "pp.json").read_text())
    assert fig["algorithm"] == "MAML++" and "--pp-epochs 2 --first-order-epochs 1" in fig["command"]
    assert "--no-bn-stats" in fig["command"] and "transductive BN" in fig["protocol"]
    assert "MAML++ | 5w1s" in (tmp_path / "R.md").read_text()
    # MAML++'s options belong to it alone; its own cosine replaces --cosine-to
    for algo, extra in (("maml", ("--pp-epochs", "3")), ("maml_pp", ("--cosine-to", "0.1"))):
        proc = _run("bench_accuracy.py", "--algo", algo, *common, *extra, check=False)
        assert proc.returncode == 2 and extra[0] in proc.stderr


@pytest.mark.parametrize("algo", ["reptile", "imaml", "matching", "proto_maml"])
def test_bench_accuracy_builds_and_records_each_omniglot_learner(tmp_path: Path, algo: str) -> None:
    data = REPO.parent / "shared" / "data" / "omniglot"
    if not (data / "images_background_small1.zip").exists():
        pytest.skip("needs ../shared/data/omniglot")
    args = ("--algo", algo, "--steps", "2", "--test-episodes", "2", "--eval-split", "val", "--out-dir", str(tmp_path))
    _run("bench_accuracy.py", *args, "--name", algo, "--eval-inner-steps", "2", "--task-mode", "loop")
    rec = json.loads((tmp_path / algo / "result.json").read_text())
    assert rec["complete"] is True and rec["optimizer_steps"] == 2 and rec["scored_split"] == "val"
    assert 0.0 <= rec["val_acc_mean"] <= 1.0 and rec["test_episodes"] == 2
    per_step = {"reptile": 5, "imaml": 8, "matching": 1, "proto_maml": 1}[algo]  # tasks per optimizer step
    assert rec["tasks_seen"] == 2 * per_step
    if algo == "reptile":  # its paper trains on 10-shot episodes and tests 1-shot
        assert rec["config"]["train_shots"] == 10 and rec["config"]["shots"] == 1


def test_every_published_source_key_is_explained() -> None:
    sys.path.insert(0, str(REPO))
    import re

    from benchmarks.build_results import PUBLISHED, SOURCES, render

    used = {
        k.removesuffix(" 2°") for v in PUBLISHED.values() for m in re.findall(r"\[([^\]]+)\]", v) for k in m.split(", ")
    }
    assert used <= set(SOURCES), f"keys without a source: {sorted(used - set(SOURCES))}"
    text = render([])
    assert all(f"- [{k}]: " in text for k in SOURCES)


def _translations(image, shift: int):
    """Every translation of ``image`` (H, W) by at most ``shift`` pixels, the uncovered border filled with 0."""
    import torch.nn.functional as F

    padded = F.pad(image, (shift, shift, shift, shift))
    h, w = image.shape
    return [padded[i : i + h, j : j + w] for i in range(2 * shift + 1) for j in range(2 * shift + 1)]


def test_bench_accuracy_train_shift_translates_training_images_only(tmp_path: Path, monkeypatch) -> None:
    import torch

    from benchmarks.bench_accuracy import _build, parse_args

    data = REPO.parent / "shared" / "data" / "omniglot"
    if not (data / "images_background_small1.zip").exists():
        pytest.skip("needs ../shared/data/omniglot")
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "cache"))
    common = ["--algo", "maml_pp", "--tasks-per-batch", "2", "--test-episodes", "4", "--eval-split", "val"]
    batches = {}
    for shift in (None, 2):
        args = parse_args(common + ([] if shift is None else ["--train-shift", str(shift)]))
        dm, _ = _build(args)
        dm.setup("fit")
        torch.manual_seed(0)
        batches[shift] = (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader())))
    (plain, plain_val), (shifted, shifted_val) = batches[None], batches[2]
    assert torch.equal(plain_val.support_x, shifted_val.support_x)  # evaluation images untouched
    assert torch.equal(plain.support_y, shifted.support_y)  # same episodes, same labels
    images = list(zip(plain.support_x.flatten(0, 1)[:, 0], shifted.support_x.flatten(0, 1)[:, 0], strict=True))
    moved = 0
    for original, out in images:  # each shifted image is one of the original's translations by <= 2 pixels
        assert any(torch.equal(out, t) for t in _translations(original, 2))
        moved += not torch.equal(out, original)
    assert moved >= len(images) // 2
    with pytest.raises(SystemExit):
        parse_args(common + ["--train-shift", "0"])


def test_bench_accuracy_train_characters_keeps_a_prefix_of_the_training_split(tmp_path: Path, monkeypatch) -> None:
    from benchmarks.bench_accuracy import _build, parse_args

    data = REPO.parent / "shared" / "data" / "omniglot"
    if not (data / "images_background_small1.zip").exists():
        pytest.skip("needs ../shared/data/omniglot")
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "cache"))
    plans = {}
    for extra in ([], ["--train-characters", "20"]):
        dm, _ = _build(parse_args(["--algo", "maml_pp", *extra]))
        store, origin = dm.characters()
        plans[len(extra)] = dm.split_characters(store.class_names, origin)
    full, cut = plans[0], plans[2]
    assert len(full["train"]) > 20 and cut["train"] == full["train"][:20]
    assert cut["val"] == full["val"] and cut["test"] == full["test"]
    with pytest.raises(SystemExit):  # refused on the command line
        parse_args(["--algo", "maml_pp", "--train-characters", "4"])
    dm, _ = _build(parse_args(["--algo", "maml_pp", "--train-characters", "100000"]))
    store, origin = dm.characters()
    with pytest.raises(ValueError, match=f"--train-characters 100000: the training split has {len(full['train'])}"):
        dm.split_characters(store.class_names, origin)


def test_bench_accuracy_refuses_solver_options_that_the_solver_would_ignore(capsys) -> None:
    """iMAML's Hessian-free solver has no inner learning rate, and gradient descent takes no Newton options: both are
    refused on the command line, naming the fix, instead of being silently unused."""
    from benchmarks.bench_accuracy import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--algo", "imaml", "--inner-solver", "hessian_free", "--inner-lr", "0.1"])
    assert "has no inner learning rate; drop --inner-lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--algo", "imaml", "--newton-steps", "2"])
    assert "are options of --inner-solver hessian_free" in capsys.readouterr().err
    args = parse_args(["--algo", "imaml", "--inner-solver", "hessian_free", "--newton-steps", "2"])
    assert args.newton_steps == 2
    assert parse_args(["--algo", "imaml", "--inner-lr", "0.1"]).inner_lr == 0.1
