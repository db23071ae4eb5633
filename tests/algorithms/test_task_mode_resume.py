"""Resume is exact even where `task_mode="auto"` would choose differently in the resumed process."""

from __future__ import annotations

import pytest
import torch

from lightning_meta.algorithms import MAML
from lightning_meta.functional.tasks import TaskModeSelector
from lightning_meta.nn import MLP
from tests.algorithms._meta_helpers import blob_episode, loader, trainer


def prefer(monkeypatch: pytest.MonkeyPatch, winner: str) -> None:
    """The trial's clock makes `winner` the faster mode (memory is not limiting: MLP tasks are tiny)."""

    def timed(run, mode, n, device, clock):
        run(mode, n)
        return 1.0 if mode == winner else 2.0

    monkeypatch.setattr(TaskModeSelector, "_timed", staticmethod(timed))


def model() -> MAML:
    torch.manual_seed(0)
    return MAML(MLP(4, 3, hidden=(32, 32)), inner_lr=0.5, inner_steps=2, meta_lr=0.05)


def data():
    return loader([blob_episode(i) for i in range(12)], tasks=6)  # 2 steps per epoch


def weights(m: MAML) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_resumed_run_reuses_the_saved_decision_and_matches_an_uninterrupted_run(tmp_path, monkeypatch) -> None:
    prefer(monkeypatch, "vmap")
    straight = model()
    trainer(max_epochs=3, limit_val_batches=0).fit(straight, data())
    assert set(straight.task_mode_selector.choices.values()) == {"vmap"}

    first = model()
    t = trainer(max_epochs=1, limit_val_batches=0)
    t.fit(first, data())
    t.save_checkpoint(tmp_path / "epoch1.ckpt")
    ckpt = torch.load(tmp_path / "epoch1.ckpt", weights_only=True)  # the decision is stored as plain values
    (saved,) = ckpt["lightning_meta_task_mode"]["decisions"].values()
    assert saved["mode"] == "vmap"

    prefer(monkeypatch, "loop")  # this process would now time the loop as the faster
    resumed = model()
    trainer(max_epochs=3, limit_val_batches=0).fit(resumed, data(), ckpt_path=tmp_path / "epoch1.ckpt")
    assert set(resumed.task_mode_selector.choices.values()) == {"vmap"}
    for name, value in weights(straight).items():
        assert torch.equal(value, weights(resumed)[name]), name  # bit-identical

    # Control: without the saved decision the resumed process picks the loop, and the weights differ (so the equality
    # above is not a property of this model: loop and vmap round differently).
    del ckpt["lightning_meta_task_mode"]
    torch.save(ckpt, tmp_path / "no-decision.ckpt")
    retimed = model()
    trainer(max_epochs=3, limit_val_batches=0).fit(retimed, data(), ckpt_path=tmp_path / "no-decision.ckpt")
    assert set(retimed.task_mode_selector.choices.values()) == {"loop"}
    assert any(not torch.equal(v, weights(retimed)[k]) for k, v in weights(straight).items())
