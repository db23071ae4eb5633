"""Evaluation after ``fit`` under ``ddp_spawn`` in the same process reports the same value as a fresh process.

``ddp_spawn`` pickles the module to its workers through shared memory: the metric state tensors of the main
process become the workers' tensors, and a worker's in-place update during fit's validation lands in the main
process's copy. A later ``trainer.validate()`` then started from that polluted state unless the metric states are
reset at the start of every evaluation epoch.
"""

from __future__ import annotations

import pytest
import torch

from lightning_meta.algorithms import MAML
from lightning_meta.nn import MLP
from tests.algorithms._meta_helpers import blob_episode, loader, trainer

pytestmark = pytest.mark.filterwarnings("ignore:.*(self.log|num_workers|val_dataloader|sync_dist).*")


@pytest.mark.slow
@pytest.mark.ddp
def test_validate_and_test_after_ddp_spawn_fit_equal_a_fresh_single_process_evaluation() -> None:
    train = [blob_episode(i) for i in range(8)]
    val = [blob_episode(100 + i) for i in range(8)]

    def run():
        torch.manual_seed(0)
        model = MAML(MLP(4, 3, hidden=(8,)), inner_lr=0.5, task_mode="loop")
        t = trainer(max_steps=2, strategy="ddp_spawn", devices=2, limit_val_batches=2, val_check_interval=2)
        t.fit(model, loader(train, tasks=2), loader(val, tasks=2))
        return (
            model,
            t.validate(model, loader(val, tasks=2), verbose=False)[0],
            t.test(model, loader(val, tasks=2), verbose=False)[0],
        )

    model, after_fit_val, after_fit_test = run()
    fresh = MAML(MLP(4, 3, hidden=(8,)), inner_lr=0.5, task_mode="loop")
    fresh.load_state_dict(model.state_dict())
    expect_val = trainer().validate(fresh, loader(val, tasks=2), verbose=False)[0]
    expect_test = trainer().test(fresh, loader(val, tasks=2), verbose=False)[0]
    for key in ("val/loss", "val/acc"):
        assert after_fit_val[key] == pytest.approx(expect_val[key], rel=1e-5), key
    for key in ("test/loss", "test/acc"):
        assert after_fit_test[key] == pytest.approx(expect_test[key], rel=1e-5), key
