"""CPU checks of the CUDA-graph plumbing (the replays themselves are tested on a GPU: tests/algorithms/test_cuda_graphs.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_meta.algorithms import MAML
from lightning_meta.episode import Episode
from lightning_meta.functional import CudaGraphCache
from lightning_meta.nn import Conv4

warnings.filterwarnings("ignore", message=".*self.log.*")


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
    return Episode(torch.rand(2, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(2, 1),
                   torch.rand(2, 10, 1, 28, 28, generator=g), torch.arange(5).repeat(2, 2))


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
        return m._graph_key(tensors, [p for p in m.parameters() if p.requires_grad], 1.0)

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
