"""MetaLearner: evaluation under inference mode, logged metrics, the CI metric, task-mode selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_meta.algorithms import MAML, MeanCI95
from lightning_meta.episode import Episode
from lightning_meta.functional import mean_ci95
from lightning_meta.nn import MLP
from tests.algorithms._meta_helpers import blob_episode, loader, sine_episode, trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(self.log|val_dataloader|num_workers).*"
)  # Lightning's advice for real training runs


def maml(**kwargs) -> MAML:
    torch.manual_seed(0)
    kwargs.setdefault("task_mode", "loop")
    return MAML(MLP(4, 3, hidden=(8,)), inner_lr=0.5, inner_steps=1, eval_inner_steps=2, **kwargs)


def test_validation_under_inference_mode_names_the_fix() -> None:
    with pytest.raises(RuntimeError, match=r"Trainer\(inference_mode=False\)"):
        trainer(inference_mode=True).validate(
            maml(), loader([blob_episode(i) for i in range(4)], tasks=2), verbose=False
        )


def test_fit_logs_train_and_val_metrics() -> None:
    t = trainer(max_steps=2, limit_val_batches=1, val_check_interval=2)
    t.fit(
        maml(),
        loader([blob_episode(i) for i in range(8)], tasks=4),
        loader([blob_episode(i) for i in range(4)], tasks=4),
    )
    for key in ("train/loss", "train/acc", "train/nonfinite_tasks", "train/skipped_steps", "val/loss", "val/acc"):
        assert key in t.callback_metrics, key
    assert t.callback_metrics["train/skipped_steps"] == 0


def test_test_ci95_equals_independent_per_episode_computation() -> None:
    model = maml()
    episodes = [blob_episode(i) for i in range(12)]
    result = trainer().test(model, loader(episodes, tasks=4), verbose=False)[0]
    model.eval()
    accs = []
    for e in episodes:  # one episode at a time, as an independent per-episode evaluation
        logits = model(Episode.collate([e]))[0]
        accs.append((logits.argmax(-1) == e.query_y).float().mean().item())
    assert result["test/acc"] == pytest.approx(np.mean(accs), abs=1e-6)
    assert result["test/acc_ci95"] == pytest.approx(1.96 * np.std(accs) / np.sqrt(len(accs)), abs=1e-6)
    assert np.std(accs) > 0  # the check above is not vacuous


def test_regression_logs_mse_metrics() -> None:
    model = MAML(MLP(), inner_lr=0.01, task_mode="loop")
    result = trainer().test(model, loader([sine_episode(i) for i in range(6)], tasks=3), verbose=False)[0]
    assert set(result) == {"test/loss", "test/mse", "test/mse_ci95"}
    assert result["test/mse"] == pytest.approx(result["test/loss"], rel=1e-6)


def test_mean_ci95_and_metric_agree_with_numpy() -> None:
    v = torch.rand(50, generator=torch.Generator().manual_seed(0))
    mean, half = mean_ci95(v)
    assert mean == pytest.approx(v.mean().item()) and half == pytest.approx(1.96 * np.std(v.numpy()) / np.sqrt(50))
    assert mean_ci95(v, ddof=1)[1] == pytest.approx(1.96 * np.std(v.numpy(), ddof=1) / np.sqrt(50))
    m = MeanCI95()
    m.update(v[:20])
    m.update(v[20:])
    assert m.compute().item() == pytest.approx(half)


def test_auto_task_mode_measures_once_per_shape_and_matches_fixed_modes() -> None:
    model = maml(task_mode="auto")
    model.train()
    b = Episode.collate([blob_episode(i) for i in range(3)])
    model.training_step(b, 0)
    model.training_step(b, 1)
    assert len(model.task_mode_selector.choices) == 1  # measured once, then cached
    (choice,) = model.task_mode_selector.choices.values()
    assert choice in ("loop", "vmap")
    timings = next(iter(model.task_mode_selector.timings.values()))
    assert choice == min(timings, key=timings.get)  # the faster one by measurement
    model.training_step(Episode.collate([blob_episode(i) for i in range(5)]), 2)  # a new shape is measured anew
    assert len(model.task_mode_selector.choices) == 2
    model.eval()
    model(b)  # evaluation (no backward) is a separate key too
    assert len(model.task_mode_selector.choices) == 3


def test_auto_task_mode_times_only_a_slice_of_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_meta.algorithms.base as base
    import lightning_meta.algorithms.execution as execution

    seen: list[int] = []
    real = base.run_tasks

    def spy(fn, sx, *args, **kwargs):
        seen.append(sx.shape[0])
        return real(fn, sx, *args, **kwargs)

    monkeypatch.setattr(base, "run_tasks", spy)
    monkeypatch.setattr(execution, "run_tasks", spy)  # the trial runs there
    model = maml(task_mode="auto", task_chunk=None)
    model.task_mode_trial_tasks = 2
    model.train()
    model.training_step(Episode.collate([blob_episode(i) for i in range(5)]), 0)
    assert seen[-1] == 5  # the real step runs every task
    assert seen[:-1] and set(seen[:-1]) == {2}  # the trial runs only the slice


def test_constructor_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="task_mode='fast'"):
        maml(task_mode="fast")
    with pytest.raises(ValueError, match="task_chunk=0"):
        MAML(MLP(), task_chunk=0)
    with pytest.raises(TypeError, match="expects an Episode"):
        maml().training_step((torch.zeros(1),), 0)


def test_task_mode_selector_times_cpu_time_on_one_cpu_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process's load inflates wall time, not CPU time: a mode that waits (as if descheduled) but computes
    little must win on one CPU thread, and lose where the clock is wall time. The clocks are simulated, so the
    machine's own load cannot change the outcome."""
    import time

    from lightning_meta.functional.tasks import TaskModeSelector

    clocks = {"cpu": 0.0, "wall": 0.0}
    monkeypatch.setattr(time, "process_time", lambda: clocks["cpu"])
    monkeypatch.setattr(time, "perf_counter", lambda: clocks["wall"])

    def run(mode: str) -> None:
        if mode == "loop":  # 20 ms of work: CPU and wall time advance together
            clocks["cpu"] += 0.02
            clocks["wall"] += 0.02
        else:  # 60 ms of waiting, no work
            clocks["wall"] += 0.06

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        sel = TaskModeSelector(repeats=2, report=lambda msg: None)
        assert sel.clock(torch.device("cpu")) is time.process_time
        assert sel.select("k", run, torch.device("cpu")) == "vmap"
        torch.set_num_threads(2)
        assert sel.clock(torch.device("cpu")) is time.perf_counter
        assert TaskModeSelector(repeats=2, report=lambda msg: None).select("k", run, torch.device("cpu")) == "loop"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["loop", "vmap", "auto"])
def test_auto_task_chunk_is_one_task_in_loop_mode_and_all_under_vmap(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning_meta.algorithms.base as base

    seen: list[tuple[int, str]] = []
    real = base.run_tasks

    def spy(fn, sx, *args, mode, **kwargs):
        seen.append((sx.shape[0], mode))
        return real(fn, sx, *args, mode=mode, **kwargs)

    monkeypatch.setattr(base, "run_tasks", spy)
    b = Episode.collate([blob_episode(i) for i in range(5)])
    grads = {}
    for chunk in ("auto", None):
        model = maml(task_mode=mode, task_chunk=chunk)
        assert model.task_chunk == chunk
        model.train()
        model.training_step(b, 0)  # the auto trial (if any) runs here
        seen.clear()
        loss = model.training_step(b, 1)
        grads[chunk] = torch.autograd.grad(loss, list(model.parameters()))
        if chunk == "auto":
            used = model.task_mode_selector.choices and next(iter(model.task_mode_selector.choices.values()))
            chosen = mode if mode != "auto" else used
            assert seen == ([(1, "loop")] * 5 if chosen == "loop" else [(5, "vmap")])
    for a, c in zip(grads["auto"], grads[None]):  # the same meta-gradient either way
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    assert MAML(MLP(4, 3, hidden=(8,))).task_chunk == "auto"  # the MAML family's default
    with pytest.raises(ValueError, match="task_chunk='big'"):
        maml(task_chunk="big")
