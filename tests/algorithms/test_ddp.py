"""DDP (2 gloo processes on CPU): meta-gradients reduce exactly like one process over the same tasks.

Each rank gets a known half of every meta-batch: :class:`StridedSampler` gives rank ``r`` episodes
``r, r+2, r+4, ...`` (Lightning's own DistributedSampler is switched off: it shuffles), so with 2 tasks
per rank, step ``k`` covers episodes ``4k..4k+3`` on the two ranks together, which is the batch of 4 that
the single-process run sees.
The outer optimizer is SGD (Adam's first step is nearly sign-like and would hide a wrongly scaled
gradient). This is the CPU twin of a GPU/NCCL run.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from lightning_meta.algorithms import MAML, MetaSGD
from lightning_meta.episode import Episode
from lightning_meta.nn import MLP
from tests.algorithms._meta_helpers import EpisodeList, blob_episode, loader, trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(self.log|num_workers|val_dataloader|sync_dist).*"
)  # Lightning's advice for real training runs

TOL = dict(rtol=1e-5, atol=1e-6)  # float32 all-reduce vs one process: summation order only


class SGDMAML(MAML):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class SGDMetaSGD(MetaSGD):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class StridedSampler(Sampler[int]):
    """Episodes ``rank, rank + world, ...`` of the process group it runs in (all of them without one)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        world = dist.get_world_size() if dist.is_initialized() else 1
        return self.n // world


def episodes(nan_at: int | None = None) -> list[Episode]:
    out = [blob_episode(i) for i in range(8)]
    if nan_at is not None:
        e = out[nan_at]
        sx = e.support_x.clone()
        sx[0, 0] = float("nan")
        out[nan_at] = Episode(sx, e.support_y, e.query_x, e.query_y)
    return out


def run(cls, ddp: bool, nan_at: int | None = None, **kwargs) -> dict[str, torch.Tensor]:
    def fit():
        torch.manual_seed(0)
        model = cls(MLP(4, 3, hidden=(8,)), inner_steps=2, task_mode="loop", **kwargs)
        if ddp:
            t = trainer(max_steps=2, strategy="ddp_spawn", devices=2, use_distributed_sampler=False)
            data = episodes(nan_at)
            t.fit(
                model,
                DataLoader(
                    EpisodeList(data), batch_size=2, sampler=StridedSampler(len(data)), collate_fn=Episode.collate
                ),
            )
        else:
            t = trainer(max_steps=2)
            t.fit(model, loader(episodes(nan_at), tasks=4))
        return model

    model = fit()
    return {n: v.detach().clone() for n, v in model.state_dict().items()}


@pytest.mark.ddp
def test_ddp_second_order_maml_equals_single_process() -> None:
    single = run(SGDMAML, ddp=False, inner_lr=0.5)
    ddp = run(SGDMAML, ddp=True, inner_lr=0.5)
    for n in single:
        torch.testing.assert_close(ddp[n], single[n], **TOL)


@pytest.mark.ddp
def test_ddp_meta_sgd_equals_single_process_and_skips_a_nonfinite_step_on_every_rank() -> None:
    # Episode 5 (rank 1's half of step 2) has a NaN support input: both ranks must skip step 2.
    single = run(SGDMetaSGD, ddp=False, nan_at=5, inner_lr_init=0.3)
    ddp = run(SGDMetaSGD, ddp=True, nan_at=5, inner_lr_init=0.3)
    assert single["skipped_steps"] == 1 and ddp["skipped_steps"] == 1
    for n in single:
        assert torch.isfinite(ddp[n].float()).all(), n
        torch.testing.assert_close(ddp[n], single[n], **TOL)
    clean = run(SGDMetaSGD, ddp=False, inner_lr_init=0.3)
    assert not torch.equal(clean["backbone.head.weight"], single["backbone.head.weight"])  # step 2 did matter
