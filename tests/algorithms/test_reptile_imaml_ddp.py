"""DDP (2 gloo processes on CPU) for the learners whose outer update is a direction, not a loss: Reptile's
theta - theta' and iMAML's implicit gradient reduce across ranks exactly like one process over the same tasks.
Same layout as test_ddp.py: each rank gets a known half of every meta-batch, the outer optimizer is SGD."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_meta.algorithms import IMAML, Reptile
from lightning_meta.episode import Episode
from lightning_meta.nn import MLP
from tests.algorithms._meta_helpers import EpisodeList, loader, trainer
from tests.algorithms.test_ddp import TOL, StridedSampler, episodes

pytestmark = pytest.mark.filterwarnings("ignore:.*(self.log|num_workers|val_dataloader|sync_dist).*")


class SGDIMAML(IMAML):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def run(cls, ddp: bool, **kwargs) -> dict[str, torch.Tensor]:
    def fit():
        torch.manual_seed(0)
        model = cls(MLP(4, 3, hidden=(8,)), task_mode="loop", **kwargs)
        if ddp:
            t = trainer(max_steps=2, strategy="ddp_spawn", devices=2, use_distributed_sampler=False)
            data = episodes()
            t.fit(
                model,
                DataLoader(
                    EpisodeList(data), batch_size=2, sampler=StridedSampler(len(data)), collate_fn=Episode.collate
                ),
            )
        else:
            trainer(max_steps=2).fit(model, loader(episodes(), tasks=4))
        return model

    model = fit()
    return {n: v.detach().clone() for n, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (
            Reptile,
            {"inner_steps": 3, "inner_batch_size": None, "inner_lr": 0.05, "meta_step_size": 0.8, "meta_iterations": 4},
        ),
        (SGDIMAML, {"inner_steps": 3, "inner_lr": 0.2, "lam": 2.0, "cg_steps": 3}),
    ],
    ids=["reptile", "imaml"],
)
def test_ddp_direction_learners_equal_single_process(cls, kwargs) -> None:
    torch.manual_seed(0)
    initial = cls(MLP(4, 3, hidden=(8,)), task_mode="loop", **kwargs).state_dict()
    single = run(cls, ddp=False, **kwargs)
    ddp = run(cls, ddp=True, **kwargs)
    for n in single:
        torch.testing.assert_close(ddp[n], single[n], **TOL)
    assert not torch.allclose(single["backbone.head.weight"], initial["backbone.head.weight"])  # it did move
