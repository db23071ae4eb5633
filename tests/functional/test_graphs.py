"""CPU checks of the CUDA-graph plumbing (the replays themselves are tested on a GPU: tests/algorithms/test_cuda_graphs.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lightning_meta.algorithms import MAML
from lightning_meta.episode import Episode
from lightning_meta.functional import CudaGraphCache, TaskModeSelector, module_graph_state
from lightning_meta.nn import Conv4

pytestmark = pytest.mark.filterwarnings("ignore:.*self.log.*")  # Lightning's advice for real training runs


def test_cache_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="warmup"):
        CudaGraphCache(warmup=0)
    with pytest.raises(ValueError, match="max_graphs"):
        CudaGraphCache(max_graphs=0)
    with pytest.raises(ValueError, match="CUDA tensors"):
        CudaGraphCache().run("k", lambda t: t + 1, (torch.ones(2),))
    with pytest.raises(ValueError, match="cuda_graphs"):
        MAML(Conv4(5, hidden=4), cuda_graphs="yes")


def small_maml(graphs: bool) -> MAML:
    torch.manual_seed(0)
    net = Conv4(5, hidden=4, downsample="maxpool", pooling="flatten", image_size=28)
    return MAML(net, inner_steps=1, task_mode="loop", cuda_graphs=graphs)


def episode(seed: int) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        torch.rand(2, 5, 1, 28, 28, generator=g),
        torch.arange(5).repeat(2, 1),
        torch.rand(2, 10, 1, 28, 28, generator=g),
        torch.arange(5).repeat(2, 2),
    )


def test_on_cpu_cuda_graphs_run_the_eager_step() -> None:
    models = small_maml(False), small_maml(True)
    for m in models:
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for s in range(2):
            loss = m.training_step(episode(s), 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert len(models[1]._graph_cache) == 0 and models[1]._graph_cache.replays == 0
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def test_graph_key_follows_every_setting_a_recorded_step_bakes_in() -> None:
    """Stable from step to step (else every step would record a new graph), changed by a new rate, a new number
    of inner steps, another batch shape, eval mode, a frozen parameter or re-allocated weights."""
    m = small_maml(True)
    m.train()
    opt = torch.optim.Adam(m.parameters())
    ep = episode(0)

    def key(e: Episode = ep) -> tuple:
        tensors = (e.support_x, e.support_y, e.query_x, e.query_y)
        state = module_graph_state(m, 1.0)
        return TaskModeSelector.key(type(m).__name__, tensors=tensors), state

    first = key()
    for _ in range(2):
        loss = m.training_step(ep, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert key() == first
    m.inner_lr = 0.3
    assert key() != first
    m.inner_lr = 0.4
    m.inner_steps = 2
    assert key() != first
    m.inner_steps = 1
    assert key() == first
    assert key(Episode(ep.support_x[:1], ep.support_y[:1], ep.query_x[:1], ep.query_y[:1])) != first
    m.eval()
    assert key() != first
    m.train()
    m.backbone.head.bias.requires_grad_(False)
    assert key() != first
    m.backbone.head.bias.requires_grad_(True)
    assert key() == first
    m.double()
    assert key() != first


class _CudaLike(torch.Tensor):  # a CPU tensor that says it is on CUDA (the cache only checks the device type)
    @property
    def device(self):
        return torch.device("cuda")

    def record_stream(self, stream) -> None:
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """``torch.cuda`` stand-ins for the cache's stream and recording calls; each test sets ``torch.cuda.graph``."""

    class FakeStream:
        device = torch.device("cuda")

        def __init__(self, *a, **k) -> None:
            pass

        def wait_stream(self, other) -> None:
            pass

    class FakeGraph:
        def replay(self) -> None:  # the recorded outputs stay as recorded: enough for the cache's bookkeeping
            pass

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "Stream", FakeStream)
    monkeypatch.setattr(cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cuda, "CUDAGraph", FakeGraph)
    return monkeypatch


def test_cache_retries_a_failed_recording_then_gives_up(fake_cuda) -> None:
    """The recording logic without a GPU: a recording that always fails; every call still returns ``fn``'s
    result (eagerly), the key is recorded again once after fresh warm-ups, then runs eagerly."""

    class FailingGraph:
        def __enter__(self):
            raise RuntimeError("operation failed due to a previous error during capture")

        def __exit__(self, *exc) -> bool:
            return False

    fake_cuda.setattr(torch.cuda, "graph", lambda *a, **k: FailingGraph())
    cache = CudaGraphCache(warmup=2, attempts=2)
    x = torch.arange(3.0).as_subclass(_CudaLike)
    outs = [cache.run("k", lambda t: t * 2, (x,)) for _ in range(8)]
    assert all(torch.equal(o.as_subclass(torch.Tensor), torch.tensor([0.0, 2, 4])) for o in outs)
    # calls: warm-up, warm-up, failed recording (1), warm-up, warm-up, failed recording (2), then eager for good
    assert cache.failed_recordings == 2 and cache.recordings == 0 and cache.replays == 0
    assert "k" in cache._eager_only


@pytest.mark.skipif(
    not hasattr(torch.autograd.graph, "set_override_stale_capture_stream"),
    reason="this PyTorch has no stale-stream override",
)
@pytest.mark.parametrize("fails", [False, True])
@pytest.mark.parametrize("before", [False, True])
def test_recording_lets_autograd_replace_stale_streams_and_sets_the_switch_back(fake_cuda, before, fails) -> None:
    """pytorch/pytorch#180090: an autograd node holding a stream from before the recording invalidates it unless
    PyTorch's (process-wide) override is on; it is on while recording, and back as it was afterwards."""
    override = torch._C._override_stale_capture_stream
    during = []

    class RecordingGraph:
        def __enter__(self):
            during.append(override())
            if fails:
                raise RuntimeError("operation failed due to a previous error during capture")

        def __exit__(self, *exc) -> bool:
            return False

    fake_cuda.setattr(torch.cuda, "graph", lambda *a, **k: RecordingGraph())
    torch.autograd.graph.set_override_stale_capture_stream(before)
    try:
        cache = CudaGraphCache(warmup=1, attempts=1)
        x = torch.arange(3.0).as_subclass(_CudaLike)
        for _ in range(3):  # warm-up, recording (+ replay), replay
            assert torch.equal(
                cache.run("k", lambda t: t * 2, (x,)).as_subclass(torch.Tensor), torch.tensor([0.0, 2, 4])
            )
            assert override() is before  # never left on outside a recording
        assert during == [True]
        assert (cache.recordings, cache.failed_recordings, cache.replays) == ((0, 1, 0) if fails else (1, 0, 2))
    finally:
        torch.autograd.graph.set_override_stale_capture_stream(False)


def test_graph_key_is_stable_across_the_steps_of_a_trainer_fit() -> None:
    """Nothing Lightning or the learner changes from step to step (loggers, metrics, the task-mode trial, hooks) may
    enter the key: on a GPU every step would record a new graph."""
    import lightning as L
    from torch.utils.data import DataLoader

    keys: list[tuple] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            keys.append(module_graph_state(module, 1.0))

    model = small_maml(True)
    model.task_mode = "auto"
    data = DataLoader([episode(s).task(0) for s in range(8)], batch_size=2, collate_fn=Episode.collate)
    L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Record()]).fit(model, data)  # fmt: skip
    assert len(keys) == 4 and all(k == keys[0] for k in keys)
    model.inner_lr = 0.123  # and it does follow a setting
    assert module_graph_state(model, 1.0) != keys[0]
