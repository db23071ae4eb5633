"""LearnedOptimizer callback: swaps the Trainer's optimizers for any LightningModule, with checkpoints and guards."""

from __future__ import annotations

import copy
import itertools
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_meta.callbacks import LearnedOptimizer
from lightning_meta.optim import (
    AdamRule,
    Celo2Rule,
    RuleOptimizer,
    UpdateRule,
    load_pretrained,
    rule_fingerprint,
    rule_hash,
)


def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
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
        # the lr-mode celo2 entry (the previous default) takes Adam-sized lrs: 0.03 gives loss x0.52, 0.3 rose
        callback = LearnedOptimizer("celo2", lr=0.03)
        default_hash = rule_hash(load_pretrained("default"))  # the same weights as "celo2"
    trainer = _trainer(tmp_path, [callback], max_steps=30)
    trainer.fit(model)
    assert isinstance(trainer.optimizers[0], RuleOptimizer) and rule_hash(trainer.optimizers[0].rule) == default_hash
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is trainer.optimizers[0]
    after = model.loss(model(probe)).item()
    assert after < 0.6 * before, (before, after)


def test_mixed_precision_clipping_accumulation_and_scheduler_match_the_modules_own_adam(tmp_path: Path) -> None:
    """With AdamRule the callback must reproduce the module's own Adam + StepLR run exactly."""
    settings = dict(
        max_steps=4,
        precision="bf16-mixed",
        gradient_clip_val=0.05,
        accumulate_grad_batches=2,
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


@pytest.mark.parametrize("step_size", ["lr", "dog", "prodigy"])  # dog, prodigy: x_0 and the estimates are saved too
def test_resume_from_a_mid_run_checkpoint_is_bit_identical(tmp_path: Path, step_size: str) -> None:
    # rule_schedule="on": the rule's horizon schedule runs beside the module's StepLR, so the horizon is checkpointed
    straight = Regression()
    _trainer(tmp_path, [LearnedOptimizer(Celo2Rule(step_size=step_size), rule_schedule="on")], max_epochs=2).fit(
        straight
    )
    first = Regression()
    trainer = _trainer(
        tmp_path,
        [LearnedOptimizer(Celo2Rule(step_size=step_size), rule_schedule="on"), _StopAfterFirstEpoch()],
        max_epochs=2,
    )
    trainer.fit(first)
    assert trainer.current_epoch == 1 and trainer.strategy.optimizers[0].horizon == 12  # 2 epochs of 6 batches
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    checkpoint = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    assert checkpoint["optimizer_states"][0]["rule"]["name"] == "celo2"
    assert any("LearnedOptimizer" in key for key in checkpoint["callbacks"])
    if step_size != "lr":
        assert all("initial" in state for state in checkpoint["optimizer_states"][0]["state"].values())
    resumed = Regression()
    _trainer(tmp_path, [LearnedOptimizer(Celo2Rule(step_size=step_size), rule_schedule="on")], max_epochs=2).fit(
        resumed, ckpt_path=tmp_path / "mid.ckpt"
    )
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    other = LearnedOptimizer(Celo2Rule(step_size=step_size, final_fraction=0.5), rule_schedule="on")  # another schedule
    with pytest.raises(ValueError, match="final_fraction 0.1 vs 0.5"):
        _trainer(tmp_path, [other], max_epochs=2).fit(Regression(), ckpt_path=tmp_path / "mid.ckpt")


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
    # max_steps=6 counts both optimizers' steps (3 batches): each plans its own 3 steps, not the Trainer's 6
    assert trainer.estimated_stepping_batches == 6 and [opt.step_count for opt in trainer.optimizers] == [3, 3]
    assert {horizon for _, horizon in rule.seen} == {3}
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
        tmp_path,
        [LearnedOptimizer(_LossScaledSGD()), _RankRecorder(tmp_path)],
        strategy="ddp_spawn",
        devices=2,
        max_steps=3,
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


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "ModelParallelStrategy"])
def test_sharding_strategies_are_refused_by_name(strategy: str) -> None:
    """FSDP hands the optimizer flat shards of each tensor (the rule would read a shard's RMS as the tensor's) and
    DeepSpeed steps its own optimizer: the callback refuses them at fit start, before touching any optimizer.
    (Lightning runs FSDP on CUDA only, so the callback is called with the strategy directly.)"""
    from types import SimpleNamespace

    import lightning.pytorch.strategies as strategies

    trainer = SimpleNamespace(strategy=getattr(strategies, strategy)())
    with pytest.raises(ValueError, match=f"does not support {strategy}.*strategy='ddp'"):
        LearnedOptimizer().on_fit_start(trainer, Regression())  # type: ignore[arg-type]


def test_a_horizon_rule_needs_a_finite_plan(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [LearnedOptimizer(_LossScaledSGD())], max_epochs=-1, max_steps=-1)
    with pytest.raises(ValueError, match="needs the number of steps but the Trainer plans inf"):
        trainer.fit(Regression())


class RegressionAdamW(Regression):
    """Regression with AdamW(weight_decay) and the StepLR of Regression."""

    def __init__(self, weight_decay: float) -> None:
        super().__init__(gamma=0.9)
        self.weight_decay = weight_decay

    def configure_optimizers(self):  # noqa: ANN201
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_param_group_weight_decay_is_applied_as_adamw(tmp_path: Path) -> None:
    """With AdamRule the callback reproduces the module's own AdamW + StepLR, decay included (it was dropped)."""
    finals = {}
    for weight_decay in (0.0, 0.5):
        reference = RegressionAdamW(weight_decay)
        _trainer(tmp_path, [], max_steps=12).fit(reference)
        model = RegressionAdamW(weight_decay)
        _trainer(tmp_path, [LearnedOptimizer(AdamRule())], max_steps=12).fit(model)
        for a, b in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        finals[weight_decay] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert finals[0.5].norm() < finals[0.0].norm()


class _ScheduleProbe(UpdateRule):
    """Records (step, horizon, lr) and moves nothing."""

    name = "test-schedule-probe"
    version = 1
    needs_horizon = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int, float]] = []

    def init_state(self, param: Tensor, *, batch_dims: int = 0) -> dict[str, Tensor]:
        return {}

    def update(self, param, grad, state, *, lr, step, horizon=None, loss=None, batch_dims=0):  # noqa: ANN001
        self.seen.append((int(step), horizon, float(lr)))
        return param.clone(), {}


class AlternatingGAN(TwoOptimizers):
    """Manual optimization, one optimizer per batch in turn (as a GAN's discriminator and generator)."""

    def training_step(self, batch: list[Tensor], batch_idx: int) -> None:
        x, y = batch
        opt = self.optimizers()[batch_idx % 2]
        opt.zero_grad()
        self.manual_backward(nn.functional.mse_loss(self.head(self.encoder(x)), y))
        opt.step()


def test_alternating_optimizers_each_plan_their_own_number_of_steps(tmp_path: Path) -> None:
    rule = _ScheduleProbe()
    trainer = _trainer(tmp_path, [LearnedOptimizer(rule)], max_epochs=4)  # 4 batches per epoch: 16 batches
    trainer.fit(AlternatingGAN())
    assert [opt.step_count for opt in trainer.optimizers] == [8, 8]
    assert trainer.estimated_stepping_batches == 16
    last = rule.seen[-4:]  # the last step of each optimizer (two tensors each): tau = step / horizon = 1
    assert [(step, horizon) for step, horizon, _ in last] == [(8, 8)] * 4
    # with the real rule: its schedule reaches its final fraction (0.1), not 0.55 half-way through a 16-step plan
    celo2 = Celo2Rule()
    callback = LearnedOptimizer(celo2)
    trainer = _trainer(tmp_path, [callback], max_epochs=4)
    trainer.fit(AlternatingGAN())
    assert [opt.horizon for opt in trainer.optimizers] == [8, 8]
    assert celo2.lr_multiplier(8, 8) == pytest.approx(0.1)


class _Probe(pl.Callback):
    """Records the update RMS of the first matrix of the module's net, per step."""

    def __init__(self) -> None:
        self.rms: list[float] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.before = pl_module.net[0].weight.detach().clone()
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.rms.append(float((pl_module.net[0].weight.detach() - self.before).pow(2).mean().sqrt()))


@pytest.mark.parametrize("scheduler", [True, False])
@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_two_schedules_do_not_stack_unless_asked(tmp_path: Path, scheduler: bool, mode: str) -> None:
    """Celo2 (lr mode) moves a matrix by exactly lr * update_rms * m(step) in RMS: m is the rule's schedule when
    it is on (auto: only without a user scheduler) and 1 when off, while the user's StepLR sets lr."""
    model = Regression(gamma=0.7 if scheduler else 1.0)
    if not scheduler:
        model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=model.lr)  # type: ignore[method-assign]
    rule, probe = Celo2Rule(), _Probe()
    _trainer(tmp_path, [LearnedOptimizer(rule, rule_schedule=mode), probe], max_steps=6).fit(model)
    own = mode == "on" or (mode == "auto" and not scheduler)
    for step, (rms, lr) in enumerate(zip(probe.rms, probe.lrs), start=1):
        multiplier = rule.lr_multiplier(step, 6) if own else 1.0
        assert rms == pytest.approx(lr * rule.update_rms * multiplier, rel=1e-4)
    assert (probe.lrs[-1] < probe.lrs[0]) == scheduler


def test_fallback_uses_a_safe_lr_not_the_one_that_blew_up(tmp_path: Path) -> None:
    class Snapshots(pl.Callback):
        def __init__(self) -> None:
            self.params: list[Tensor] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self.params.append(torch.cat([p.detach().flatten() for p in pl_module.parameters()]))

    model = Regression(lr=30.0, gamma=1.0)
    callback = LearnedOptimizer(_Ascent(), fallback="adamw", fallback_threshold=3.0, fallback_lr=1e-3)
    snapshots = Snapshots()
    trainer = _trainer(tmp_path, [callback, snapshots], max_epochs=3)
    with pytest.warns(UserWarning, match=r"switching to AdamW .*learning rates \[\[0.001\]\]"):
        trainer.fit(model)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == [pytest.approx(1e-3)]
    # every AdamW step moves each weight by about lr (at most lr * (1 - beta1) / sqrt(1 - beta2) = 3.2 lr), not 30
    after = snapshots.params[callback.fallback_step :]
    assert len(after) > 10
    assert max(float((b - a).abs().max()) for a, b in itertools.pairwise(after)) <= 3.2e-3


class _RelativeProbe(_ScheduleProbe):
    """A relative-lr probe: records the lr multiplier the optimizer hands over."""

    name = "test-relative-probe"
    relative_lr = True


def _cyclic(model: Regression, base_lr: float, max_lr: float):  # noqa: ANN202
    def configure():  # noqa: ANN202
        opt = torch.optim.Adam(model.parameters(), lr=base_lr)
        scheduler = torch.optim.lr_scheduler.CyclicLR(opt, base_lr, max_lr, step_size_up=4, cycle_momentum=False)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    model.configure_optimizers = configure  # type: ignore[method-assign]
    return model


def test_a_cyclic_lr_is_followed_relative_to_its_peak(tmp_path: Path) -> None:
    """A CyclicLR starts the groups at base_lr: the reference lr of a relative rule is its max_lr, so the rule
    sees the cycle's shape from 0.01 to 1 (before, multipliers up to 100 stalled a convnet at chance level)."""
    rule, probe = _RelativeProbe(), _Probe()
    model = _cyclic(Regression(), base_lr=1e-4, max_lr=1e-2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*reference lr")
        _trainer(tmp_path, [LearnedOptimizer(rule), probe], max_steps=12).fit(model)
    assert [group["reference_lr"] for group in model.trainer.optimizers[0].param_groups] == [1e-2]
    seen = [lr for _, _, lr in rule.seen[::4]]  # four tensors per step
    assert seen == pytest.approx([lr / 1e-2 for lr in probe.lrs], rel=1e-6)
    assert max(seen) == pytest.approx(1.0) and min(seen) == pytest.approx(0.01)


def test_the_fallback_bounds_a_cyclic_lrs_peak_too(tmp_path: Path) -> None:
    model = _cyclic(Regression(), base_lr=1.0, max_lr=30.0)
    callback = LearnedOptimizer(_Ascent(), fallback="adamw", fallback_threshold=3.0, fallback_lr=1e-3)
    with pytest.warns(UserWarning, match="switching to AdamW"):
        _trainer(tmp_path, [callback], max_epochs=3).fit(model)
    scheduler = model.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(model.trainer.optimizers[0], torch.optim.AdamW)
    assert scheduler.max_lrs == [pytest.approx(1e-3)] and scheduler.base_lrs == [pytest.approx(1e-3 / 30)]
    assert max(group["lr"] for group in model.trainer.optimizers[0].param_groups) <= 1e-3 * (1 + 1e-9)


def _composed(model: Regression, kind: str, lr: float):  # noqa: ANN202
    def configure():  # noqa: ANN202
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        warmup = torch.optim.lr_scheduler.LinearLR(opt, 0.1, 1.0, total_iters=4)
        if kind == "sequential":
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 12)
            scheduler: Any = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[4])
        else:
            scheduler = torch.optim.lr_scheduler.ChainedScheduler(
                [warmup, torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)]
            )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    model.configure_optimizers = configure  # type: ignore[method-assign]
    return model


@pytest.mark.parametrize("kind", ["sequential", "chained"])
def test_a_composed_scheduler_drives_the_replacement_as_it_drove_the_original(tmp_path: Path, kind: str) -> None:
    """A SequentialLR (warm-up then cosine) or ChainedScheduler steps child schedulers that hold the optimizer
    themselves: they are re-pointed too (before, the replacement's lr stayed at the warm-up's first value)."""
    plain, replaced = _Probe(), _Probe()
    _trainer(tmp_path, [plain], max_steps=16).fit(_composed(Regression(), kind, 0.01))
    _trainer(tmp_path, [LearnedOptimizer(Celo2Rule()), replaced], max_steps=16).fit(_composed(Regression(), kind, 0.01))
    assert replaced.lrs == pytest.approx(plain.lrs, rel=1e-12)
    assert max(plain.lrs) > 5 * plain.lrs[0]  # the warm-up did raise it


def test_resume_under_a_composed_scheduler_is_bit_identical(tmp_path: Path) -> None:
    """The children restored from a checkpoint keep driving the replacement: the resumed run's lrs and weights are
    the uninterrupted run's (the warm-up ends and the cosine starts in the first epoch, and goes on after it)."""
    straight, straight_lrs = _composed(Regression(), "sequential", 0.01), _Probe()
    _trainer(tmp_path, [LearnedOptimizer(Celo2Rule()), straight_lrs], max_epochs=2).fit(straight)
    first = _composed(Regression(), "sequential", 0.01)
    trainer = _trainer(tmp_path, [LearnedOptimizer(Celo2Rule()), _StopAfterFirstEpoch()], max_epochs=2)
    trainer.fit(first)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed, resumed_lrs = _composed(Regression(), "sequential", 0.01), _Probe()
    _trainer(tmp_path, [LearnedOptimizer(Celo2Rule()), resumed_lrs], max_epochs=2).fit(
        resumed, ckpt_path=tmp_path / "mid.ckpt"
    )
    assert resumed_lrs.lrs == straight_lrs.lrs[6:] and len(set(resumed_lrs.lrs)) == 6
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_the_fallback_scales_a_composed_schedulers_children(tmp_path: Path) -> None:
    model = _composed(Regression(), "sequential", 30.0)
    callback = LearnedOptimizer(_Ascent(), fallback="adamw", fallback_threshold=3.0, fallback_lr=1e-3)
    probe = _Probe()
    with pytest.warns(UserWarning, match="switching to AdamW"):
        _trainer(tmp_path, [callback, probe], max_steps=16).fit(model)
    scheduler = model.trainer.lr_scheduler_configs[0].scheduler
    assert [child.base_lrs for child in scheduler._schedulers] == [[pytest.approx(1e-3)]] * 2
    assert max(probe.lrs[callback.fallback_step + 1 :]) <= 1e-3 * (1 + 1e-9)
    # a child also listed on its own is scaled once, not twice
    model = Regression(lr=30.0)
    warmup: list = []

    def configure():  # noqa: ANN202
        opt = torch.optim.Adam(model.parameters(), lr=30.0)
        warmup.append(torch.optim.lr_scheduler.LinearLR(opt, 0.5, 1.0, total_iters=100))
        return [opt], [torch.optim.lr_scheduler.SequentialLR(opt, warmup, milestones=[]), warmup[0]]

    model.configure_optimizers = configure  # type: ignore[method-assign]
    callback = LearnedOptimizer(_Ascent(), fallback="adamw", fallback_threshold=3.0, fallback_lr=1e-3)
    with pytest.warns(UserWarning, match="switching to AdamW"):
        _trainer(tmp_path, [callback], max_steps=16).fit(model)
    assert warmup[0].base_lrs == [pytest.approx(1e-3)]


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_a_scheduler_that_starts_after_fit_start_is_named_when_schedules_stack(tmp_path: Path, mode: str) -> None:
    """StochasticWeightAveraging sets up its SWALR when its epochs begin, after "auto" kept the rule's schedule on
    (no scheduler at fit start): the two then stack, and the callback says so once; with "off" nothing stacks."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    model = Regression()
    model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=0.01)  # type: ignore[method-assign]
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [LearnedOptimizer(Celo2Rule(), rule_schedule=mode), swa], max_epochs=4).fit(model)
    named = [str(w.message) for w in caught if "after fit start" in str(w.message)]
    assert len(named) == (1 if mode == "auto" else 0)
    assert all(message.startswith("SWALR started driving") for message in named)


def test_the_fallback_scales_a_one_cycles_floor_too(tmp_path: Path) -> None:
    """A OneCycleLR anneals to its groups' ``min_lr`` (max_lr / 25 / 1e4 = 1.2e-3 here): the fallback scales it with
    the other rates, so the last steps stay below ``fallback_lr`` too."""
    model = Regression(lr=300.0)

    def configure():  # noqa: ANN202
        opt = torch.optim.Adam(model.parameters(), lr=300.0)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=300.0, total_steps=16)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    model.configure_optimizers = configure  # type: ignore[method-assign]
    callback = LearnedOptimizer(_Ascent(), fallback="adamw", fallback_threshold=3.0, fallback_lr=1e-3)
    probe = _Probe()
    with pytest.warns(UserWarning, match="switching to AdamW"):
        _trainer(tmp_path, [callback, probe], max_steps=16).fit(model)
    assert callback.fallback_step is not None and callback.fallback_step < 8
    after = probe.lrs[callback.fallback_step + 1 :]
    assert max(after) <= 1e-3 * (1 + 1e-9) and after[-1] < 1e-7  # annealed to the scaled floor, not 1.2e-3


def test_a_checkpoint_of_another_rule_is_refused_by_the_callback() -> None:
    trained = Celo2Rule()
    with torch.no_grad():
        trained.skip[0] = 0.25
    state = LearnedOptimizer(trained).state_dict()
    with pytest.raises(ValueError, match="trained with rule .* but the LearnedOptimizer applies"):
        LearnedOptimizer(Celo2Rule()).load_state_dict(state)
    LearnedOptimizer(copy.deepcopy(trained)).load_state_dict(state)  # the same weights load


def test_the_same_weights_configured_differently_are_refused_by_the_callback() -> None:
    saved_rule = Celo2Rule(step_size="relative", max_log_gain=0.0)
    state = LearnedOptimizer(saved_rule).state_dict()
    LearnedOptimizer(Celo2Rule(step_size="relative", max_log_gain=0.0)).load_state_dict(state)  # same rule: resumes
    for other in (Celo2Rule(step_size="relative"), Celo2Rule(), saved_rule.without_schedule()):
        assert rule_hash(other) == rule_hash(saved_rule)  # identical weights, another update
        mine = rule_fingerprint(other)
        with pytest.raises(ValueError, match="trained with rule .* but the LearnedOptimizer applies") as error:
            LearnedOptimizer(other).load_state_dict(state)
        message = str(error.value)
        assert state["rule"]["hash"] in message and mine in message and mine != state["rule"]["hash"]
        assert "same class, constructor arguments and weights" in message
    with pytest.raises(ValueError, match=r"max_log_gain 0\.0 vs 4\.6"):  # names the setting that differs
        LearnedOptimizer(Celo2Rule(step_size="relative")).load_state_dict(state)
    with pytest.raises(ValueError, match="step_size 'relative' vs 'lr'"):
        LearnedOptimizer(Celo2Rule(max_log_gain=0.0)).load_state_dict(state)


def test_a_weights_only_rule_hash_of_older_checkpoints_loads_with_a_warning() -> None:
    rule = Celo2Rule(step_size="relative")
    state = LearnedOptimizer(rule).state_dict()
    state["rule"] = {"name": "celo2", "version": rule.version, "hash": rule_hash(rule)}  # as written before
    callback = LearnedOptimizer(copy.deepcopy(rule))
    with pytest.warns(UserWarning, match="weights hash only .* configuration cannot be checked"):
        callback.load_state_dict({**state, "initial_loss": 2.5})
    assert callback.initial_loss == 2.5
    retrained = copy.deepcopy(rule)
    with torch.no_grad():
        retrained.skip[0] = 0.5
    with pytest.raises(ValueError, match=f"weights hash {rule_hash(rule)} but the LearnedOptimizer applies"):
        LearnedOptimizer(retrained).load_state_dict(state)


def test_a_record_from_before_a_setting_existed_loads_when_it_is_at_its_default() -> None:
    rule = Celo2Rule(step_size="relative")
    state = LearnedOptimizer(rule).state_dict()
    older = {**state["rule"], "config": {k: v for k, v in state["rule"]["config"].items() if k != "max_growth"}}
    older["hash"] = "0" * 16  # its fingerprint covered fewer settings
    with pytest.warns(UserWarning, match=r"before the setting\(s\) of max_growth=100\.0 existed"):
        LearnedOptimizer(copy.deepcopy(rule)).load_state_dict({**state, "rule": older})
    # not at its default here: a different update, refused and named
    with pytest.raises(ValueError, match=r"max_growth '<unset>' vs 50\.0"):
        LearnedOptimizer(Celo2Rule(step_size="relative", max_growth=50.0)).load_state_dict({**state, "rule": older})
    # another saved setting differs as well: refused
    changed = {**older, "config": {**older["config"], "max_log_gain": 0.0}}
    with pytest.raises(ValueError, match=r"max_log_gain 0\.0 vs 4\.6"):
        LearnedOptimizer(copy.deepcopy(rule)).load_state_dict({**state, "rule": changed})


def test_the_default_rule_works_at_whatever_lr_the_module_has(tmp_path: Path) -> None:
    """No lr passed: the default sets its own step size, so SGD's 0.1 and an absurd 30 give the same run.

    The target (weight 0, bias 1) lies far from the initialisation relative to the parameters' size, where steps
    relative to that size are slow: x0.61 in 60 steps under the rule's own schedule (the lr-mode rule at a
    hand-picked lr: x0.52 in 30)."""
    weights = []
    for lr in (0.1, 30.0):
        torch.manual_seed(0)
        model = BoringModel()
        model.configure_optimizers = lambda m=model, lr=lr: torch.optim.SGD(m.parameters(), lr=lr)  # type: ignore[method-assign]
        probe = torch.randn(256, 32)
        before = model.loss(model(probe)).item()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = _trainer(tmp_path, [LearnedOptimizer()], max_steps=60)
            trainer.fit(model)
        assert trainer.optimizers[0].rule.relative_lr
        assert model.loss(model(probe)).item() < 0.7 * before
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


class _Frozen(UpdateRule):
    """Test rule that never moves: training stalls at the first loss."""

    name = "test-frozen"
    version = 1

    def init_state(self, param: Tensor, *, batch_dims: int = 0) -> dict[str, Tensor]:
        return {}

    def update(self, param, grad, state, *, lr, step, horizon=None, loss=None, batch_dims=0):  # noqa: ANN001
        return param.clone(), {}


class FullBatchRegression(Regression):
    """Regression on one full batch per epoch: the loss changes only when the parameters do."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=48)


def test_a_stall_is_detected_and_escaped_by_the_fallback(tmp_path: Path) -> None:
    """No progress (windowed mean loss not 1 % lower) after 10 % of the plan, here two 10-step windows: AdamW
    takes over; a rule that makes progress is left alone."""
    model = FullBatchRegression(gamma=1.0)
    callback = LearnedOptimizer(_Frozen(), fallback="adamw", fallback_lr=0.01)  # the module's own lr: kept
    with pytest.warns(UserWarning, match=r"training stalled: .* after 20 of 100 planned steps; switching to AdamW"):
        _trainer(tmp_path, [callback], max_epochs=100).fit(model)
    assert callback.fallback_step == 20 and len(set(model.losses[:21])) == 1
    assert model.losses[-1] < 0.5 * model.losses[0]
    progressing = LearnedOptimizer(AdamRule(), fallback="adamw")
    _trainer(tmp_path, [progressing], max_epochs=100).fit(FullBatchRegression(gamma=1.0))
    assert not progressing.fell_back


class _SingleStep(pl.Callback):
    """Stops after the first optimizer step and keeps the parameters before and after it."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.moved = [p.detach() - q for p, q in zip(pl_module.parameters(), self.before)]
        trainer.should_stop = True


def test_step_scale_reaches_every_replaced_group_and_scales_the_first_step(tmp_path: Path) -> None:
    """``LearnedOptimizer(step_scale=3)`` gives the replacement's groups step_scale 3 and the default rule's first
    step is 3x that of step_scale 1 (a group's own key, carried over from the module's optimizer, wins); bad values
    and a rule in lr mode are refused by name at construction."""
    moves = []
    for scale in (1.0, 3.0):
        probe = _SingleStep()
        trainer = _trainer(tmp_path, [LearnedOptimizer(step_scale=scale), probe], max_epochs=1)
        trainer.fit(Regression())
        assert [g["step_scale"] for g in trainer.optimizers[0].param_groups] == [scale]
        moves.append(probe.moved)
    for base, scaled in zip(*moves):
        torch.testing.assert_close(scaled, 3.0 * base, rtol=1e-5, atol=1e-9)

    class OwnScale(Regression):
        def configure_optimizers(self):  # noqa: ANN202
            return torch.optim.AdamW([{"params": self.parameters(), "step_scale": 0.5}], lr=self.lr)

    trainer = _trainer(tmp_path, [LearnedOptimizer(step_scale=3.0)], max_steps=1)
    trainer.fit(OwnScale())
    assert trainer.optimizers[0].param_groups[0]["step_scale"] == 0.5
    with pytest.raises(ValueError, match="step_scale=0"):
        LearnedOptimizer(step_scale=0)
    with pytest.raises(ValueError, match="takes the lr as its step: scale the lr instead"):
        LearnedOptimizer(AdamRule(), step_scale=2.0)
