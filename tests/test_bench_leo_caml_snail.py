"""``benchmarks/bench_leo_caml_snail.py`` under the step-budget protocol (training runs as subprocesses, as users
run it): the budget is a number of optimizer steps, the record says whether it was reached and on which machine and commit,
without absolute paths, and the old CPU-minute flags are refused with the fix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_leo_caml_snail import PRETRAIN_STEPS, STEPS, parse_args
from tests._tiny_data import write_tiny_omniglot

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_leo_caml_snail.py"


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LIGHTNING_META_CACHE": str(cwd / "cache")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_leo_trains_its_step_budgets_and_records_them(tmp_path: Path) -> None:
    # 2 alphabets x 10 characters: the seeded 70/10/20 split leaves 4 test characters (16 classes with rotations)
    write_tiny_omniglot(tmp_path / "omniglot", alphabets=2, characters=10, drawings=16)
    args = ("omniglot", "--algo", "leo", "--steps", "3", "--pretrain-steps", "2", "--tasks", "2")
    proc = _run(tmp_path, *args, "--test-episodes", "4", "--data-dir", "omniglot", "--out-dir", "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (tmp_path / "out" / "omniglot_leo.json").read_text()
    rec = json.loads(text)
    assert rec["complete"] is True and rec["steps_budget"] == rec["optimizer_steps"] == 3
    assert rec["tasks_seen"] == 3 * 2 and rec["episodes"] == 4 and 0.0 <= rec["test_acc"] <= 1.0
    assert rec["pretrain"]["steps"] == 2 and rec["pretrain"]["cpu_seconds"] > 0
    assert rec["train_cpu_seconds"] > 0 and rec["train_seconds"] > 0
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", rec["commit"]) and rec["cpu_model"]
    assert rec["cpu_threads"] == os.cpu_count() and rec["torch_threads"] == 1
    # data_dir as given; no path of this machine anywhere in the record (e.g. the output folder)
    assert rec["config"]["data_dir"] == "omniglot" and "out_dir" not in rec["config"]
    assert str(tmp_path) not in text and '"/' not in text
    assert rec["command"].startswith("python benchmarks/bench_leo_caml_snail.py omniglot --algo leo")
    assert "--steps 3" in rec["command"] and "--pretrain-steps 2" in rec["command"] and "--tasks 2" in rec["command"]


def test_a_run_stopped_by_the_wall_cap_is_marked_incomplete(tmp_path: Path) -> None:
    cap = ("--steps", "1000000", "--max-wall-minutes", "0.02", "--test-episodes", "2", "--out-dir", "out")
    proc = _run(tmp_path, "sinusoid", *cap)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = json.loads((tmp_path / "out" / "sinusoid_caml_vs_maml.json").read_text())
    assert rec["complete"] is False and rec["steps_budget"] == 1_000_000
    for name in ("caml", "maml"):
        run = rec["runs"][name]
        assert run["complete"] is False and 0 < run["optimizer_steps"] < 1_000_000
        assert rec[f"{name}_1step"]["train_steps"] == run["optimizer_steps"]
    assert "INCOMPLETE (caml)" in proc.stdout and "INCOMPLETE (maml)" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["omniglot", "--algo", "caml", "--minutes", "10"], "--steps 250"),
        (["omniglot", "--algo", "leo", "--minutes", "6"], "--steps 3000"),
        (["sinusoid", "--minutes", "4"], "--steps 14000"),
        (["omniglot", "--algo", "leo", "--pretrain-minutes", "3"], "--pretrain-steps N; default 600"),
        (["omniglot", "--algo", "snail", "--steps", "0"], "--steps 0: give a positive number"),
        (["omniglot", "--algo", "caml", "--pretrain-steps", "5"], "--pretrain-steps is an option of --algo leo"),
    ],
)
def test_cpu_minute_budgets_and_bad_budgets_are_refused_with_the_fix(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_default_budgets_are_steps(tmp_path: Path) -> None:
    (tmp_path / "images_background").mkdir()
    args = parse_args(["omniglot", "--algo", "leo", "--data-dir", str(tmp_path)])
    assert (args.steps, args.pretrain_steps, args.tasks) == (STEPS["leo"], PRETRAIN_STEPS, 16)
    assert parse_args(["sinusoid"]).steps == STEPS["sinusoid"] == 14_000
