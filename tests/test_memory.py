"""glibc keeps freed memory for reuse after `keep_freed_memory()`: re-allocating a large tensor no longer page-faults."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import lightning_meta.memory as memory

glibc = pytest.mark.skipif(memory._glibc() is None, reason="glibc only")

_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    import lightning_meta.memory as memory
    applied = memory.keep_freed_memory() if sys.argv[1] == "keep" else False
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    counts = []
    for r in range(6):  # a task's step: many large activations, all freed after its backward; sizes vary
        f0 = faults()
        ts = [torch.ones((8 + r) << 18) for _ in range(8)]  # 8 tensors of 8 + r MiB, touched
        del ts
        counts.append(faults() - f0)
    print(applied, max(counts[2:]))
    """
)


def _probe(mode: str, **env: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, **env},
    )
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@glibc
def test_keep_freed_memory_stops_page_faults_on_reallocation() -> None:
    applied, faults_kept = _probe("keep")
    _, faults_default = _probe("default")
    assert applied
    # default glibc: each round's blocks are above its adaptive mmap threshold, so they are fresh mmap pages (4 KiB
    # each: 64-104 MiB per round); kept: the freed heap is reused, only the rounds' growth is new
    assert faults_default > 15000
    assert faults_kept < 5000


def test_switched_off_by_the_environment(monkeypatch) -> None:
    monkeypatch.setattr(memory, "_applied", None)
    monkeypatch.setenv("LIGHTNING_META_KEEP_FREED_MEMORY", "0")
    assert memory.keep_freed_memory() is False
    assert memory._applied is False  # decided once per process


def test_auto_mode_trial_hands_its_peak_back(monkeypatch) -> None:
    """`task_mode="auto"` times vmap once on a CPU; the memory of that trial (kept by `keep_freed_memory`) is
    handed back right after it, once, not at every step."""
    import torch

    import lightning_meta.functional.tasks as tasks
    from lightning_meta.algorithms import MAML
    from lightning_meta.episode import Episode
    from lightning_meta.nn import MLP

    calls = []
    monkeypatch.setattr(tasks, "release_freed_memory", lambda: calls.append(1) or True)
    model = MAML(MLP(4, 3, hidden=(8,)), task_mode="auto")
    model.train()
    ep = Episode(torch.randn(2, 6, 4), torch.arange(3).repeat(2, 2), torch.randn(2, 9, 4), torch.arange(3).repeat(2, 3))
    for _ in range(3):
        model.training_step(ep, 0).backward()
    assert len(calls) == 1
    assert memory.release_freed_memory() is (memory._glibc() is not None)


def test_first_cpu_step_applies_the_setting_once_and_says_so(monkeypatch, caplog) -> None:
    """On by default, but never silent: the first CPU step applies it and logs it once per process; construction
    alone does nothing."""
    import logging

    import torch

    from lightning_meta.algorithms import MAML
    from lightning_meta.episode import Episode
    from lightning_meta.nn import MLP

    calls = []
    monkeypatch.setattr(memory, "_applied", None)
    monkeypatch.setattr(memory, "_mallopt", lambda: calls.append(1) or True)
    monkeypatch.delenv("LIGHTNING_META_KEEP_FREED_MEMORY", raising=False)
    with caplog.at_level(logging.INFO, logger="lightning_meta.memory"):
        model = MAML(MLP(4, 3, hidden=(8,)), task_mode="loop")
        assert calls == []  # constructing a LightningModule changes nothing
        ep = Episode(
            torch.randn(2, 6, 4), torch.arange(3).repeat(2, 2), torch.randn(2, 9, 4), torch.arange(3).repeat(2, 3)
        )
        for _ in range(2):
            model.training_step(ep, 0)
    assert calls == [1]
    logged = [r for r in caplog.records if r.name == "lightning_meta.memory"]
    assert len(logged) == 1 and "LIGHTNING_META_KEEP_FREED_MEMORY=0" in logged[0].getMessage()
