"""LearnedOptimizer callback: swaps the Trainer's optimizers for any LightningModule, with checkpoints and guards."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_meta.callbacks import LearnedOptimizer
from lightning_meta.optim import AdamRule, Celo2Rule, RuleOptimizer, UpdateRule, load_pretrained, rule_hash




def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0,
    )
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


class Regression(pl.LightningModule):
    """A small MLP regression with Adam and a step-wise StepLR, trained on a fixed dataset (no shuffling)."""

    def __init__(self, lr: float = 0.01, gamma: float = 0.7) -> None:
        super().__init__()
        self.lr, self.gamma = lr, gamma
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(48, 4, generator=generator)
        self.y = self.x @ torch.randn(4, 1, generator=generator)
        self.losses: list[float] = []

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)

    def configure_optimizers(self):  # noqa: ANN201
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _LossScaledSGD(UpdateRule):
    """Test rule reading the loss and the horizon: ``p - lr * loss * g``; records its inputs."""

    name = "test-loss-scaled-sgd"
    version = 1
    needs_loss = True
    needs_horizon = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, int]] = []

    def init_state(self, param: Tensor, *, batch_dims: int = 0) -> dict[str, Tensor]:
        return {}

    def update(self, param, grad, state, *, lr, step, horizon=None, loss=None, batch_dims=0):  # noqa: ANN001
        self.seen.append((float(loss), horizon))
        return param - lr * loss * grad, {}


class _Ascent(UpdateRule):
    """Test rule that climbs the loss, to trigger the fallback guard."""

    name = "test-ascent"
    version = 1

    def init_state(self, param: Tensor, *, batch_dims: int = 0) -> dict[str, Tensor]:
        return {}

    def update(self, param, grad, state, *, lr, step, horizon=None, loss=None, batch_dims=0):  # noqa: ANN001
        return param + 20 * lr * grad, {}


def test_boring_model_trains_by_adding_only_the_callback(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BoringModel()  # Lightning's own demo: SGD(lr=0.1) + StepLR, untouched
    probe = torch.randn(256, 32)  # fresh data: the expected loss, minimised by weight 0 and bias 1
    before = model.loss(model(probe)).item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no pretrained weights ship" until they do
        # the module's SGD lr (0.1) is SGD-sized; the shipped rule takes Adam-sized ones (0.03: loss x0.52; 0.3 rose)
        callback = LearnedOptimizer(lr=0.03)
        default_hash = rule_hash(load_pretrained("default"))
    trainer = _trainer(tmp_path, [callback], max_steps=30)
    trainer.fit(model)
    assert isinstance(trainer.optimizers[0], RuleOptimizer) and rule_hash(trainer.optimizers[0].rule) == default_hash
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is trainer.optimizers[0]
    after = model.loss(model(probe)).item()
    assert after < 0.6 * before, (before, after)


def test_mixed_precision_clipping_accumulation_and_scheduler_match_the_modules_own_adam(tmp_path: Path) -> None:
    """With AdamRule the callback must reproduce the module's own Adam + StepLR run exactly."""
    settings = dict(
        max_steps=4, precision="bf16-mixed", gradient_clip_val=0.05, accumulate_grad_batches=2,
    )
    reference = Regression()
    _trainer(tmp_path, [], **settings).fit(reference)
    model = Regression()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*optimizer.step\\(\\).*")  # the scheduler-order warnings
        trainer = _trainer(tmp_path, [LearnedOptimizer(AdamRule())], **settings)
        trainer.fit(model)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, RuleOptimizer)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.7**4)  # the scheduler stepped it 4 times
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(a, b) for a, b in zip(Regression().parameters(), model.parameters()))


class _StopAfterFirstEpoch(pl.Callback):
    """Interrupts a run at the end of its first epoch (the plan, and so the rule's horizon, stays the full run)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True


def test_resume_from_a_mid_run_checkpoint_is_bit_identical(tmp_path: Path) -> None:
    straight = Regression()
    _trainer(tmp_path, [LearnedOptimizer(Celo2Rule())], max_epochs=2).fit(straight)
    first = Regression()
    trainer = _trainer(tmp_path, [LearnedOptimizer(Celo2Rule()), _StopAfterFirstEpoch()], max_epochs=2)
    trainer.fit(first)
    assert trainer.current_epoch == 1 and trainer.strategy.optimizers[0].horizon == 12  # 2 epochs of 6 batches
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    checkpoint = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    assert checkpoint["optimizer_states"][0]["rule"]["name"] == "celo2"
    assert any("LearnedOptimizer" in key for key in checkpoint["callbacks"])
    resumed = Regression()
    _trainer(tmp_path, [LearnedOptimizer(Celo2Rule())], max_epochs=2).fit(resumed, ckpt_path=tmp_path / "mid.ckpt")
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with one optimizer per sub-network (SGD and Adam)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.encoder, self.head = nn.Linear(4, 4), nn.Linear(4, 1)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> None:
        x, y = batch
        opt_encoder, opt_head = self.optimizers()
        loss = nn.functional.mse_loss(self.head(self.encoder(x)), y)
        opt_encoder.zero_grad()
        opt_head.zero_grad()
        self.manual_backward(loss)
        opt_encoder.step()
        opt_head.step()

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(32, 4, generator=generator)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.encoder.parameters(), lr=0.1), torch.optim.Adam(self.head.parameters(), lr=0.01)


def test_manual_optimization_with_two_optimizers_replaces_both_and_passes_loss_and_horizon(tmp_path: Path) -> None:
    model = TwoOptimizers()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    rule = _LossScaledSGD()
    trainer = _trainer(tmp_path, [LearnedOptimizer(rule)], max_steps=6)
    trainer.fit(model)
    assert all(isinstance(opt, RuleOptimizer) for opt in trainer.optimizers) and len(trainer.optimizers) == 2
    assert [g["lr"] for opt in trainer.optimizers for g in opt.param_groups] == [0.1, 0.01]
    assert all(not torch.equal(initial[n], p) for n, p in model.named_parameters())
    assert {horizon for _, horizon in rule.seen} == {trainer.estimated_stepping_batches}
    assert all(loss > 0 for loss, _ in rule.seen)


def test_fallback_to_adamw_when_the_loss_blows_up_and_it_survives_resume(tmp_path: Path) -> None:
    model = Regression(gamma=1.0)
    callback = LearnedOptimizer(_Ascent(), fallback="adamw", fallback_threshold=3.0)
    trainer = _trainer(tmp_path, [callback], max_epochs=2)
    with pytest.warns(UserWarning, match="switching to AdamW"):
        trainer.fit(model)
    assert callback.fell_back and isinstance(trainer.optimizers[0], torch.optim.AdamW)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is trainer.optimizers[0]
    step = callback.fallback_step
    assert model.losses[step] > 3.0 * model.losses[0]
    assert min(model.losses[step + 1 :]) < model.losses[step]  # AdamW brings it back down
    trainer.save_checkpoint(tmp_path / "fallback.ckpt")
    resumed_callback = LearnedOptimizer(_Ascent(), fallback="adamw", fallback_threshold=3.0)
    resumed = _trainer(tmp_path, [resumed_callback], max_epochs=3)
    resumed.fit(Regression(gamma=1.0), ckpt_path=tmp_path / "fallback.ckpt")
    assert resumed_callback.fallback_step == step and isinstance(resumed.optimizers[0], torch.optim.AdamW)
    assert resumed.optimizers[0].state  # AdamW state restored and stepping


class _RankRecorder(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save([p.detach().clone() for p in pl_module.parameters()], self.folder / f"rank{trainer.global_rank}.pt")


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_ranks_stay_identical_with_a_loss_reading_rule(tmp_path: Path) -> None:
    """Per-rank losses differ; the rule reads the all-reduced loss, so parameters stay bit-identical."""
    _trainer(
        tmp_path, [LearnedOptimizer(_LossScaledSGD()), _RankRecorder(tmp_path)],
        strategy="ddp_spawn", devices=2, max_steps=3,
    ).fit(Regression())
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1))
    assert not all(torch.equal(a, b) for a, b in zip(rank0, Regression().parameters()))


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="fallback='sgd'"):
        LearnedOptimizer(AdamRule(), fallback="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fallback_threshold=0.5"):
        LearnedOptimizer(AdamRule(), fallback="adamw", fallback_threshold=0.5)
    with pytest.raises(FileNotFoundError, match="no pretrained rule 'nope'"):
        LearnedOptimizer("nope")
    import lightning_meta.callbacks as callbacks_pkg

    assert all(getattr(callbacks_pkg, name) is not None for name in callbacks_pkg.__all__)


def test_a_horizon_rule_needs_a_finite_plan(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [LearnedOptimizer(_LossScaledSGD())], max_epochs=-1, max_steps=-1)
    with pytest.raises(ValueError, match="needs the number of steps but the Trainer plans inf"):
        trainer.fit(Regression())
