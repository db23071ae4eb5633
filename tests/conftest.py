"""Shared test configuration: markers, the shared Omniglot data, one intra-op thread per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = (REPO.parent / "shared" / "data" / "omniglot").resolve()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    """The folder holding the two official small background zips (read-only, shared)."""
    if not (SHARED_OMNIGLOT / "images_background_small1.zip").exists():
        pytest.skip(f"shared Omniglot data not found at {SHARED_OMNIGLOT}")
    return SHARED_OMNIGLOT


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test's dataset cache out of the user's home directory."""
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path_factory.getbasetemp() / "lm-cache"))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread per test (the CI machine has few cores; results must not depend on the count).

    Set per test and restored afterwards instead of at import time, so importing a test module changes nothing.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restore_torch_global_state() -> Iterator[None]:
    """Undo global switches a test may leave behind (``Trainer(deterministic=True)`` turns on deterministic
    algorithms for the whole process, which changes which kernels later tests and doctests may use)."""
    deterministic, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    grad = torch.is_grad_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_grad_enabled(grad)
