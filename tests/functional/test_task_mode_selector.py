"""`task_mode="auto"`: the fastest mode whose memory fits a budget, measured once, logged once, saved and reused."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from lightning_meta.algorithms import MAML
from lightning_meta.episode import Episode
from lightning_meta.functional.tasks import MemoryOverBudget, TaskModeSelector
from lightning_meta.nn import MLP

MiB = 2**20
CPU = torch.device("cpu")


def fake_times(monkeypatch: pytest.MonkeyPatch, loop: float, vmap: float) -> None:
    """The trial's clock says `loop` and `vmap` seconds per run (the run itself still happens)."""

    def timed(run, mode, n, device, clock):
        run(mode, n)
        return {"loop": loop, "vmap": vmap}[mode] * n

    monkeypatch.setattr(TaskModeSelector, "_timed", staticmethod(timed))


def fake_memory(monkeypatch: pytest.MonkeyPatch, per_task: dict[str, float], seen: list) -> None:
    """`peak_memory` reports `per_task[mode]` bytes times the tasks the run keeps alive (the loop: one, unless
    `call["loop_all"]`), and honours the limit."""

    def peak(fn, device, limit):
        seen_call["dry"] = True  # learn which run this is without running it
        fn()
        seen_call["dry"] = False
        mode, n = seen_call["mode"], seen_call["n"]
        value = per_task[mode] * (1 if mode == "loop" and not seen_call.get("loop_all") else n)
        seen.append((mode, n, limit))
        if value > limit:
            raise MemoryOverBudget("fake")  # abandoned before it ran
        fn()
        return value

    seen_call: dict = {}
    monkeypatch.setattr(TaskModeSelector, "peak_memory", staticmethod(peak))
    return seen_call


def make_run(seen_call: dict, log: list):
    def run(mode: str, n: int) -> None:
        seen_call.update(mode=mode, n=n)
        if not seen_call.get("dry"):
            log.append((mode, n))

    return run


def test_live_memory_peak_is_the_tensors_bytes_and_the_limit_stops_the_run() -> None:
    def two_then_one() -> None:
        a = torch.ones(MiB // 4)  # 1 MiB of float32
        b = torch.ones(MiB // 2)  # 2 MiB
        del a
        c = torch.ones(MiB // 4)  # 1 MiB: live 3 MiB, below the 3 MiB peak of a + b
        del b, c

    assert TaskModeSelector.peak_memory(two_then_one, CPU, float("inf")) == 3 * MiB
    steps = []

    def grows() -> None:
        kept = []
        for i in range(10):
            kept.append(torch.ones(MiB // 4))
            steps.append(i)

    with pytest.raises(MemoryOverBudget):
        TaskModeSelector.peak_memory(grows, CPU, 2.5 * MiB)
    assert steps == [0, 1]  # abandoned at the third MiB, not run to the end


def test_live_memory_counts_the_graph_of_a_backward() -> None:
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(512, 256)

    def step() -> None:
        h = (x @ w).relu()  # (512, 256) float32 = 0.5 MiB, kept for the backward
        torch.autograd.grad(h.square().sum(), w)

    peak = TaskModeSelector.peak_memory(step, CPU, float("inf"))
    assert peak >= 0.5 * MiB + 0.25 * MiB  # at least the activation and the gradient
    assert peak < 4 * MiB


@pytest.mark.parametrize(
    ("budget_mib", "chunkable", "expected"),
    [
        (10_000, True, ("vmap", None)),  # everything fits: vmap of all 8 tasks
        (10_000, False, ("vmap", None)),
        (450, True, ("vmap", 4)),  # 100 MiB per vmapped task: chunks of 4
        (450, False, ("loop", None)),  # the caller cannot chunk: the whole batch does not fit
        (150, True, ("loop", None)),  # not even 2 tasks: the vmap run is abandoned at the budget
        (15, True, ("loop", None)),  # below vmap's projection from the loop (2 x 10 MiB): vmap is never run
    ],
)
def test_budget_decides_between_vmap_chunks_and_the_loop(monkeypatch, budget_mib, chunkable, expected) -> None:
    fake_times(monkeypatch, loop=1.0, vmap=0.5)  # vmap is the faster, if it fits
    limits: list = []
    call = fake_memory(monkeypatch, {"loop": 10 * MiB, "vmap": 100 * MiB}, limits)
    runs: list = []
    sel = TaskModeSelector(report=lambda msg: None, memory_budget=budget_mib * MiB)
    mode = sel.select("k", make_run(call, runs), CPU, tasks=8, trial_tasks=8, loop_chunk=1, chunkable=chunkable)
    assert (mode, sel.chunk("k")) == expected
    assert all(limit <= budget_mib * MiB for mode_, _, limit in limits if mode_ == "vmap")  # every vmap run guarded
    vmap_sizes = {n for m, n in runs if m == "vmap"}
    assert all(100 * n <= budget_mib for n in vmap_sizes)  # no vmap run above the budget
    if budget_mib == 15:
        assert vmap_sizes == set()
    if expected == ("vmap", 4):
        assert vmap_sizes == {2, 4}  # measured on 2, timed on the chunk's size
        assert sel.decisions["k"]["vmap_mib"] == 100 and sel.decisions["k"]["loop_mib"] == 10


def test_cpu_default_budget_is_the_loops_own_memory(monkeypatch) -> None:
    """Default on a CPU: auto never uses more than the loop: vmap of 2 tasks (>= 2 loop tasks) is not even run."""
    fake_times(monkeypatch, loop=1.0, vmap=0.5)
    call = fake_memory(monkeypatch, {"loop": 100 * MiB, "vmap": 100 * MiB}, [])
    runs: list = []
    sel = TaskModeSelector(report=lambda msg: None)
    assert sel.select("one-at-a-time", make_run(call, runs), CPU, tasks=32, loop_chunk=1) == "loop"
    assert [m for m, _ in runs] == ["loop"]  # the loop's memory run only: no timing needed
    assert sel.decisions["one-at-a-time"]["budget_mib"] == 100
    # a loop that keeps all 32 tasks' graphs (task_chunk=None) leaves room for vmap chunks of that size
    runs.clear()
    call["loop_all"] = True
    assert sel.select("all-kept", make_run(call, runs), CPU, tasks=32, loop_chunk=None, chunkable=True) == "vmap"
    assert sel.chunk("all-kept") is None and sel.decisions["all-kept"]["budget_mib"] == 3200


def test_budget_argument_errors_and_fractions() -> None:
    with pytest.raises(ValueError, match="memory_budget=-1"):
        TaskModeSelector(memory_budget=-1)
    with pytest.raises(ValueError, match="memory_budget='1GB'"):
        TaskModeSelector(memory_budget="1GB")  # type: ignore[arg-type]
    half = TaskModeSelector(memory_budget=0.5).budget(CPU)
    assert 0 < half < TaskModeSelector(memory_budget=1.0).budget(CPU)
    assert TaskModeSelector(memory_budget=3 * MiB).budget(CPU) == 3 * MiB


def test_decision_is_saved_and_reused_without_measuring(monkeypatch) -> None:
    fake_times(monkeypatch, loop=1.0, vmap=0.5)
    call = fake_memory(monkeypatch, {"loop": MiB, "vmap": 2 * MiB}, [])
    key = TaskModeSelector.key("MAML", True, tensors=(torch.zeros(8, 3),))
    sel = TaskModeSelector(report=lambda msg: None, memory_budget=10 * MiB)
    assert sel.select(key, make_run(call, []), CPU, tasks=8, loop_chunk=1, chunkable=True) == "vmap"
    assert sel.chunk(key) == 5
    buf = io.BytesIO()
    torch.save(sel.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain values: loads under the safe unpickler

    fake_times(monkeypatch, loop=0.5, vmap=1.0)  # this process would now choose the loop

    def must_not_run(mode: str, n: int) -> None:
        raise AssertionError("a loaded decision must not be measured again")

    resumed = TaskModeSelector(report=lambda msg: None)
    resumed.load_state_dict(state)
    same_key = TaskModeSelector.key("MAML", True, tensors=(torch.zeros(8, 3),))  # rebuilt, as in a new process
    assert resumed.select(same_key, must_not_run, CPU, tasks=8, chunkable=True) == "vmap"
    assert resumed.chunk(same_key) == 5
    assert resumed.state_dict() == state  # saved again by the next checkpoint
    other = TaskModeSelector.key("MAML", True, tensors=(torch.zeros(4, 3),))
    assert resumed.select(other, make_run(call, []), CPU, tasks=4, loop_chunk=1) == "loop"  # a new shape is measured
    with pytest.raises(ValueError, match="not a TaskModeSelector state"):
        resumed.load_state_dict({"decisions": {"k": {"mode": "fast"}}})


def episode(tasks: int) -> Episode:
    g = torch.Generator().manual_seed(tasks)
    return Episode(
        torch.randn(tasks, 6, 4, generator=g),
        torch.arange(3).repeat(tasks, 2),
        torch.randn(tasks, 9, 4, generator=g),
        torch.arange(3).repeat(tasks, 3),
    )


def test_decision_logged_once_per_shape_with_memory_figures(caplog) -> None:
    model = MAML(MLP(4, 3, hidden=(8,)), task_mode="auto")
    model.train()
    with caplog.at_level(logging.INFO, logger="lightning_meta.functional.tasks"):
        for _ in range(3):
            model.training_step(episode(4), 0)
        model.training_step(episode(5), 0)
        model.training_step(episode(4), 0)
    records = [r for r in caplog.records if r.name == "lightning_meta.functional.tasks"]
    assert len(records) == 2  # one per batch shape
    assert all("task_mode auto:" in r.getMessage() and "MiB" in r.getMessage() for r in records)
    assert "(4, 6, 4)" in records[0].getMessage() and "(5, 6, 4)" in records[1].getMessage()


def test_chunked_vmap_in_training_gives_the_loops_meta_gradient(monkeypatch) -> None:
    """A budget that fits 2-3 of 5 vmapped tasks: the step runs vmap in chunks, with the loop's meta-gradient."""
    import lightning_meta.algorithms.base as base

    fake_times(monkeypatch, loop=1.0, vmap=0.5)
    seen: list = []
    real = base.run_tasks

    def spy(fn, sx, *args, mode, **kwargs):
        seen.append((sx.shape[0], mode))
        return real(fn, sx, *args, mode=mode, **kwargs)

    torch.manual_seed(0)
    net = MLP(4, 3, hidden=(64,))
    probe = MAML(net, task_mode="vmap").train()
    per_task = (
        TaskModeSelector.peak_memory(
            lambda: torch.autograd.grad(probe.training_step(episode(2), 0), list(probe.parameters())), CPU, float("inf")
        )
        / 2
    )
    grads = {}
    for mode in ("loop", "auto"):
        torch.manual_seed(0)
        model = MAML(MLP(4, 3, hidden=(64,)), task_mode=mode).train()
        model.task_mode_selector.memory_budget = 3 * per_task  # room for 2 or 3 vmapped tasks, not 5
        model.training_step(episode(5), 0)  # the trial
        monkeypatch.setattr(base, "run_tasks", spy)
        seen.clear()
        loss = model.training_step(episode(5), 1)
        monkeypatch.setattr(base, "run_tasks", real)
        grads[mode] = torch.autograd.grad(loss, list(model.parameters()))
        if mode == "auto":
            (decision,) = model.task_mode_selector.decisions.values()
            assert decision["mode"] == "vmap" and 2 <= decision["chunk"] < 5, decision
            c = decision["chunk"]
            assert seen == [(min(c, 5 - i), "vmap") for i in range(0, 5, c)]
    for a, b in zip(grads["loop"], grads["auto"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- episode shapes that keep changing


def variable_stream(steps: int) -> list[Episode]:
    """Unpadded Meta-Dataset episodes, one task per batch (flattened 2x2 images): nearly every shape is new."""
    from lightning_meta.datamodules import ClassStore, VariableEpisodeDataset, VariableEpisodes

    labels = torch.cat([torch.full((4 + c,), c) for c in range(30)])
    images = torch.randint(0, 256, (len(labels), 1, 2, 2), generator=torch.Generator().manual_seed(0))
    data = VariableEpisodeDataset(
        ClassStore.from_labeled(images.to(torch.uint8), labels),
        VariableEpisodes(min_ways=2, max_ways=8, max_query=3),
        length=steps,
        seed=0,
        split="train",
    )
    batches = []
    for i in range(steps):
        e = data[i]
        batches.append(Episode.collate([Episode(e.support_x.flatten(1), e.support_y, e.query_x.flatten(1), e.query_y)]))
    return batches


def count_trials(monkeypatch: pytest.MonkeyPatch) -> list:
    """The keys' shapes of every trial (`_measure`) that runs."""
    real, trials = TaskModeSelector._measure, []

    def measure(self, run, device, tasks, *args):
        trials.append(tasks)
        return real(self, run, device, tasks, *args)

    monkeypatch.setattr(TaskModeSelector, "_measure", measure)
    return trials


@pytest.mark.parametrize("winner", ["loop", "vmap"])
def test_maml_on_ever_changing_episode_shapes_runs_a_bounded_number_of_trials(monkeypatch, caplog, winner) -> None:
    fake_times(monkeypatch, loop=1.0 if winner == "loop" else 2.0, vmap=1.0 if winner == "vmap" else 2.0)
    trials = count_trials(monkeypatch)
    stream = variable_stream(60)
    shapes = {(tuple(b.support_x.shape), tuple(b.query_x.shape)) for b in stream}
    assert len(shapes) > 40  # a new shape nearly every step
    torch.manual_seed(0)
    model = MAML(MLP(4, 8, hidden=(16,)), inner_steps=1).train()
    with caplog.at_level(logging.INFO, logger="lightning_meta.functional.tasks"):
        for i, b in enumerate(stream):
            model.training_step(b, i)
    selector = model.task_mode_selector
    assert 1 <= len(trials) <= 8, len(trials)  # at most 8 trials (the default max_trials), not one per shape
    assert selector.max_trials == 8
    assert selector.trials() == len(trials)
    assert len(selector.decisions) == len(shapes)  # every shape has its decision (for chunk() and checkpoints)
    assert set(selector.choices.values()) == {winner}  # the trials' choice carries over to every shape
    stopped = [r.getMessage() for r in caplog.records if "no further trials" in r.getMessage()]
    assert len(stopped) == 1 and f"task_mode='{winner}' pins it" in stopped[0], stopped
    trialled = [r for r in caplog.records if r.getMessage().startswith("task_mode auto: ") and "MiB" in r.getMessage()]
    assert len(trialled) == len(trials)  # the trials are reported, the decisions without one only at DEBUG


def test_shapes_of_one_size_bucket_share_a_trial_and_vmap_memory_is_scaled(monkeypatch) -> None:
    """Keys whose example counts round up to the same powers of two reuse a trial: the loop as is, vmap only where its
    memory per task, scaled by the growth of the examples, still fits (in chunks where the caller can run them)."""
    fake_times(monkeypatch, loop=1.0, vmap=0.5)
    call = fake_memory(monkeypatch, {"loop": 10 * MiB, "vmap": 100 * MiB}, [])
    trials = count_trials(monkeypatch)

    def key(support: int, query: int, tasks: int = 4) -> tuple:
        return TaskModeSelector.key(
            "MAML",
            True,
            tensors=(torch.zeros(tasks, support, 3), torch.zeros(tasks, support), torch.zeros(tasks, query, 3)),
        )

    sel = TaskModeSelector(report=lambda msg: None, memory_budget=450 * MiB, max_trials=None)
    select = lambda k, chunkable=True: sel.select(  # noqa: E731
        k, make_run(call, []), CPU, tasks=4, loop_chunk=1, chunkable=chunkable
    )
    assert select(key(40, 10)) == "vmap" and sel.chunk(key(40, 10)) is None and len(trials) == 1  # 4 x 100 MiB fit
    assert select(key(33, 9)) == "vmap" and sel.chunk(key(33, 9)) is None and len(trials) == 1  # fewer examples
    assert select(key(64, 16)) == "vmap" and len(trials) == 1  # the same bucket, 1.6x the examples: 160 MiB a task
    assert sel.chunk(key(64, 16)) == 2  # 450 // 160
    assert select(key(64, 16, tasks=4), chunkable=False) == "vmap"  # cached for this key
    assert select(key(60, 16), chunkable=False) == "vmap" and len(trials) == 2  # no chunks: 4 x 150 MiB do not fit
    assert select(key(65, 16)) == "vmap" and len(trials) == 3  # another bucket: a trial
    for k, decision in sel.decisions.items():
        assert decision["trial"] == (k in (key(40, 10), key(60, 16), key(65, 16)))

    loop_sel = TaskModeSelector(report=lambda msg: None, memory_budget=15 * MiB, max_trials=None)  # vmap never fits
    for support in (33, 40, 50, 64):
        assert loop_sel.select(key(support, 9), make_run(call, []), CPU, tasks=4, loop_chunk=1) == "loop"
    assert len(trials) == 4  # one trial for the whole bucket
    with pytest.raises(ValueError, match="max_trials=0"):
        TaskModeSelector(max_trials=0)


def test_shape_decisions_resume_from_a_checkpoint_and_old_states_still_load(monkeypatch, tmp_path) -> None:
    """A resumed selector reuses every saved decision and derives new shapes from the saved trials, without a trial;
    a state saved before shape buckets (decisions without their fields) loads and serves its own keys."""
    fake_times(monkeypatch, loop=2.0, vmap=1.0)
    trials = count_trials(monkeypatch)
    stream = variable_stream(50)
    torch.manual_seed(0)
    first = MAML(MLP(4, 8, hidden=(16,)), inner_steps=1).train()
    for i, b in enumerate(stream[:30]):
        first.training_step(b, i)
    torch.save(first.task_mode_selector.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # plain values
    n_trials = len(trials)
    assert n_trials == first.task_mode_selector.trials() <= 8
    for i, b in enumerate(stream[30:]):  # the uninterrupted run goes on
        first.training_step(b, 30 + i)
    assert len(trials) == n_trials  # the cap was reached in the first 30 steps

    fake_times(monkeypatch, loop=1.0, vmap=2.0)  # a new process would time the loop as the faster
    torch.manual_seed(0)
    resumed = MAML(MLP(4, 8, hidden=(16,)), inner_steps=1).train()
    resumed.task_mode_selector.load_state_dict(state)
    assert resumed.task_mode_selector.trials() == n_trials
    for i, b in enumerate(stream[30:]):
        resumed.training_step(b, 30 + i)
    assert len(trials) == n_trials  # nothing re-measured: saved keys reused, new shapes derived from the saved trials
    resumed_choices = resumed.task_mode_selector.choices
    assert len(resumed_choices) == len({(b.support_x.shape, b.query_x.shape) for b in stream[30:]})
    assert resumed_choices == {k: first.task_mode_selector.choices[k] for k in resumed_choices}
    assert resumed.task_mode_selector.state_dict() == first.task_mode_selector.state_dict()

    old = {"decisions": {k: {f: v for f, v in d.items() if f not in ("trial", "bucket", "family", "examples")}
                         for k, d in state["decisions"].items()}}  # fmt: skip
    legacy = MAML(MLP(4, 8, hidden=(16,)), inner_steps=1).train()
    legacy.task_mode_selector.load_state_dict(old)
    assert legacy.task_mode_selector.trials() == 0
    legacy.training_step(stream[0], 0)  # a saved key: its decision, no trial
    assert len(trials) == n_trials and legacy.task_mode_selector.choices
    assert set(legacy.task_mode_selector.choices.values()) == {"vmap"}
