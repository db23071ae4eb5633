"""The README's Python snippets run as written (with sizes shrunk and the data path filled in)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_install_and_test_commands_ci_runs():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]"' in text and 'pip install -e ".[dev]"' in ci
    assert "python -m pytest --run-slow" in text and "python -m pytest --run-slow" in ci


@pytest.mark.slow
def test_readme_training_snippet_runs(omniglot_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (snippet,) = [b for b in _python_blocks() if "OmniglotDataModule" in b]
    shrunk = (
        snippet.replace('"path/to/omniglot"', repr(str(omniglot_dir)))
        .replace("tasks_per_batch=32)", "tasks_per_batch=2, train_episodes=4, val_episodes=2, test_episodes=4)")
        .replace(
            "max_steps=60_000,", "max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,"
        )
    )
    assert shrunk != snippet
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(shrunk, "README.md", "exec"), scope)
    metrics = scope["trainer"].callback_metrics
    assert "test/acc" in metrics and "test/acc_ci95" in metrics
    assert 0.0 <= float(metrics["test/acc"]) <= 1.0


def test_readme_learned_optimizer_snippet_runs():
    (snippet,) = [b for b in _python_blocks() if "LearnedOptimizer" in b]
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert any(type(c).__name__ == "LearnedOptimizer" for c in scope["trainer"].callbacks)
