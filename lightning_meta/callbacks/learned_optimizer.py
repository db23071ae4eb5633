"""``LearnedOptimizer``: train any LightningModule with a learned update rule instead of its own optimizer(s)."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import CyclicLR
from typing_extensions import override

from lightning_meta.optim import RuleOptimizer, UpdateRule, check_rule_record, load_pretrained, rule_record
from lightning_meta.optim.optimizer import check_step_scale, initial_peak_lr

__all__ = ["LearnedOptimizer"]

# Strategies that shard parameters or wrap the optimizer in their own engine (the swap cannot reach it).
_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)

# Group keys that select an optimizer's implementation, not a hyperparameter; never carried to a replacement.
_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable", "maximize")


def _scheduler_tree(scheduler: Any) -> list[Any]:
    """``scheduler`` and the schedulers it steps: a ``SequentialLR``'s or ``ChainedScheduler``'s children hold the
    optimizer themselves (torch keeps them in ``_schedulers``, its only handle on them)."""
    tree = [scheduler]
    for child in getattr(scheduler, "_schedulers", ()):
        tree.extend(_scheduler_tree(child))
    return tree


class LearnedOptimizer(Callback):
    """Replace every optimizer of the module with a :class:`~lightning_meta.optim.RuleOptimizer` at fit start.

    The replacement takes over the old optimizers' param groups (and their learning rates, which LR schedulers
    keep driving); the module is not changed. Works with automatic and manual optimization (each optimizer is
    replaced), DDP, mixed precision, gradient clipping and accumulation; strategies that shard parameters or wrap the
    optimizer (FSDP, DeepSpeed, ``ModelParallelStrategy``) are refused. The swap happens in ``on_fit_start``:
    the optimizers exist and the model is wrapped, and checkpointed optimizer state is restored afterwards,
    into the new optimizer, so a resumed run continues exactly.

    Rules that need a horizon (the shipped default does: its step follows a warm-up and cosine decay over the
    run) get the number of optimizer steps the Trainer plans, so set ``max_steps`` or ``max_epochs`` to the length
    you actually train (Lightning's default is 1000 epochs). Under manual optimization each optimizer gets its own
    number of steps: after each batch its horizon is set from how often it has stepped per batch so far (a GAN's
    two alternating optimizers each plan half the batches).

    Learning rates: the shipped default sets its own step size relative to each tensor's RMS and reads the lr only
    as a multiplier relative to the largest initial lr of the optimizer's groups, so it works with whatever lr the
    module configured (Adam's, SGD's, none) and per-group ratios and LR schedulers still act on it. ``step_scale``
    multiplies the step such a rule sets itself, for problems where it is too cautious or too bold.

    Schedules: a rule with its own warm-up + cosine schedule (the shipped default) does not stack it on a user's LR
    scheduler. With ``rule_schedule="auto"`` an optimizer that an LR scheduler drives follows that scheduler alone
    (the rule's schedule is off), and one without a scheduler gets the rule's schedule over the horizon.

    Weight decay: each param group's ``weight_decay`` is applied as decoupled (AdamW) decay by the replacement.

    Args:
        rule: the update rule, or the name of a shipped pretrained rule
            (:func:`~lightning_meta.optim.load_pretrained`); default: the shipped default.
        lr: learning rate of every group; ``None`` keeps each group's own (as configured for the old optimizer).
            Rules that set their own step size (``relative_lr``, the shipped default) read only ratios of lrs
            (schedulers, per-group ratios), so for them a single value here changes nothing.
        fallback: ``"adamw"`` switches to AdamW for the rest of training when the (rank-averaged) training
            loss becomes non-finite or exceeds ``fallback_threshold`` times the first loss. ``None``: no guard.
        fallback_threshold: loss ratio (to the first loss) that triggers the fallback.
        stall_fraction: with a fallback, also fall back when training stalls: once, after this fraction of the
            planned steps (and at least two windows), if the mean training loss over the last window (5 % of the
            plan, at least 10 steps) is not ``stall_tolerance`` (relative) below the mean over the first window.
            ``None``: no stall check.
        stall_tolerance: the relative drop of the windowed mean loss that counts as progress.
        fallback_weight_decay: weight decay of the fallback AdamW for groups that do not carry their own
            ``weight_decay`` (groups keep the keys of the optimizer they came from; unused keys are ignored).
        fallback_lr: the fallback AdamW does not inherit the lr that blew up: each optimizer's learning rates
            (and its LR scheduler's base rates) are scaled so the largest is at most this (never raised).
        rule_schedule: ``"auto"``: the rule's own schedule is off for optimizers an LR scheduler drives, on for
            the others; ``"on"``: always (the two schedules multiply); ``"off"``: never (the lr alone, constant
            unless a scheduler changes it).
        step_scale: a factor on the step of a rule that sets its own step size (``relative_lr``, the shipped
            default), for every group that does not carry its own ``"step_scale"`` key (see
            :class:`~lightning_meta.optim.RuleOptimizer`); 1 is the rule as validated. Rules in lr mode refuse
            anything else: scale their lr.

    Example::

        trainer = Trainer(callbacks=[LearnedOptimizer()])  # the module's configure_optimizers is overridden
        trainer.fit(model)
    """

    def __init__(
        self,
        rule: UpdateRule | str = "default",
        *,
        lr: float | None = None,
        fallback: Literal["adamw"] | None = None,
        fallback_threshold: float = 10.0,
        stall_fraction: float | None = 0.1,
        stall_tolerance: float = 0.01,
        fallback_weight_decay: float = 0.01,
        fallback_lr: float = 1e-3,
        rule_schedule: Literal["auto", "on", "off"] = "auto",
        step_scale: float = 1.0,
    ) -> None:
        if not isinstance(rule, (UpdateRule, str)):
            raise TypeError(f"rule={rule!r} must be an UpdateRule or the name of a pretrained rule")
        if lr is not None and lr < 0:
            raise ValueError(f"lr={lr} must be >= 0 (or None to keep the module's learning rates)")
        if fallback not in (None, "adamw"):
            raise ValueError(f"fallback={fallback!r}; use 'adamw' or None")
        if not fallback_threshold > 1.0:
            raise ValueError(f"fallback_threshold={fallback_threshold} must be > 1 (a multiple of the first loss)")
        if stall_fraction is not None and not 0 < stall_fraction < 1:
            raise ValueError(f"stall_fraction={stall_fraction} must be in (0, 1) or None")
        if not 0 <= stall_tolerance < 1:
            raise ValueError(f"stall_tolerance={stall_tolerance} must be in [0, 1)")
        if not fallback_lr > 0:
            raise ValueError(f"fallback_lr={fallback_lr} must be > 0")
        if rule_schedule not in ("auto", "on", "off"):
            raise ValueError(f"rule_schedule={rule_schedule!r}; use 'auto', 'on' or 'off'")
        self.rule = load_pretrained(rule) if isinstance(rule, str) else rule
        check_step_scale(step_scale, self.rule)
        self.step_scale = float(step_scale)
        self.lr = lr
        self.fallback = fallback
        self.fallback_threshold = float(fallback_threshold)
        self.fallback_weight_decay = float(fallback_weight_decay)
        self.fallback_lr = float(fallback_lr)
        self.stall_fraction = stall_fraction
        self.stall_tolerance = float(stall_tolerance)
        self._planned = math.inf  # the Trainer's planned optimizer steps (the stall check needs a finite plan)
        self._first: list[float] = []  # the first and the last losses, for the stall check
        self._recent: list[float] = []
        self._stall_checked = False
        self._own_schedule: set[int] = set()  # ids of replacements whose rule kept its own schedule under "auto"
        self._warned_late_scheduler = False
        self.rule_schedule = rule_schedule
        self._batches = 0  # training batches seen (manual optimization plans per-optimizer horizons from it)
        self._limits = (math.inf, math.inf)  # planned batches (epochs x batches per epoch) and max_steps
        self.initial_loss: float | None = None
        self.fallback_step: int | None = None  # global step at which the fallback happened
        self._last_loss: Tensor | None = None

    @property
    def fell_back(self) -> bool:
        """Whether the guard switched training to AdamW."""
        return self.fallback_step is not None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(trainer.strategy, _SHARDED):
            raise ValueError(
                f"LearnedOptimizer does not support {type(trainer.strategy).__name__}: it shards the parameters or "
                "steps an optimizer of its own, while the shipped rule reads whole tensors (per-tensor RMS and "
                "distance estimates) and the swap replaces the Trainer's optimizers; it is built and tested for a "
                "single device and DDP. Use a single device or strategy='ddp'"
            )
        if not trainer.strategy.optimizers:
            raise RuntimeError(
                "LearnedOptimizer found no optimizer to replace; return one from configure_optimizers "
                "(any optimizer: its param groups and learning rates are taken over)"
            )
        self.rule.to(pl_module.device)
        if self.fallback is not None and self.stall_fraction is not None:
            self._planned = float(trainer.estimated_stepping_batches)
        horizon = None
        if self.rule.needs_horizon:
            planned = trainer.estimated_stepping_batches
            if not math.isfinite(planned):
                raise ValueError(
                    f"rule {self.rule.name!r} needs the number of steps but the Trainer plans {planned}; "
                    "set max_steps or max_epochs"
                )
            horizon = int(planned)
            epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else math.inf
            batches = float(trainer.num_training_batches) * epochs if epochs != math.inf else math.inf
            self._limits = (batches, float(trainer.max_steps) if trainer.max_steps != -1 else math.inf)
            if not pl_module.automatic_optimization:  # until measured: every optimizer steps once per batch
                horizon = int(min(batches, self._limits[1] / len(trainer.strategy.optimizers)))
        if self.fell_back:  # resumed after a fallback: keep training with AdamW (its state is restored next)
            self._replace(trainer, self._adamw, safe_lr=self.fallback_lr)
            return
        scheduled = {id(config.scheduler.optimizer) for config in trainer.lr_scheduler_configs}
        unscheduled = self.rule.without_schedule()  # ``self.rule`` itself when it has no schedule of its own

        def build(old: Optimizer, groups: list[dict[str, Any]]) -> RuleOptimizer:
            own = self.rule_schedule == "on" or (self.rule_schedule == "auto" and id(old) not in scheduled)
            rule = self.rule if own else unscheduled
            new = RuleOptimizer(
                groups, rule, horizon=horizon if rule.needs_horizon else None, step_scale=self.step_scale
            )
            if self.rule_schedule == "auto" and own and unscheduled is not self.rule:
                self._own_schedule.add(id(new))  # "auto" kept the rule's schedule: no scheduler drove it at fit start
            return new

        self._replace(trainer, build)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._own_schedule or self._warned_late_scheduler:
            return
        late = [c.scheduler for c in trainer.lr_scheduler_configs if id(c.scheduler.optimizer) in self._own_schedule]
        if late:  # e.g. StochasticWeightAveraging's SWALR, set up when its epochs begin
            self._warned_late_scheduler = True
            rank_zero_warn(
                f"{type(late[0]).__name__} started driving an optimizer after fit start, where rule_schedule='auto' "
                "left the rule's own schedule on: both act from now on (the rule's anneals the steps to 0 by the "
                "planned end). Pass LearnedOptimizer(rule_schedule='off') to follow the scheduler alone, e.g. with "
                "StochasticWeightAveraging."
            )

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        loss = loss.detach().float()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # 16-mixed hands the scaled loss to this hook
            loss = loss / scaler.get_scale()
        self._last_loss = loss
        if self.rule.needs_loss:
            for optimizer in trainer.strategy.optimizers:
                if isinstance(optimizer, RuleOptimizer):
                    optimizer.record_loss(loss)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1
        if not pl_module.automatic_optimization:
            self._plan_manual_horizons(trainer)
        if self.fallback is None or self.fell_back or self._last_loss is None:
            return
        loss = float(trainer.strategy.reduce(self._last_loss.clone(), reduce_op="mean"))
        self._last_loss = None
        if self.initial_loss is None and math.isfinite(loss):
            self.initial_loss = loss
            return
        limit = self.fallback_threshold * abs(self.initial_loss) if self.initial_loss is not None else math.inf
        if math.isfinite(loss) and loss <= limit:
            stalled = self._stalled(trainer, loss)
            if stalled is not None:
                self._fall_back(trainer, pl_module, stalled)
            return
        if not all(torch.isfinite(p).all() for p in pl_module.parameters()):
            raise RuntimeError(
                f"training loss {loss} and the parameters are non-finite at step {trainer.global_step}, too late "
                "to fall back to AdamW; lower the learning rate or fallback_threshold"
            )
        self._fall_back(
            trainer,
            pl_module,
            f"training loss {loss:.4g} at step {trainer.global_step} is non-finite or above "
            f"{self.fallback_threshold} x the first loss {self.initial_loss}",
        )

    def _stalled(self, trainer: pl.Trainer, loss: float) -> str | None:
        """Why training counts as stalled (checked once, after ``stall_fraction`` of the plan), or None."""
        if self.stall_fraction is None or self._stall_checked or not math.isfinite(self._planned):
            return None
        window = max(10, round(0.05 * self._planned))
        if len(self._first) < window:
            self._first.append(loss)
        self._recent = [*self._recent, loss][-window:]
        if trainer.global_step < max(self.stall_fraction * self._planned, 2 * window):
            return None
        self._stall_checked = True
        first, last = sum(self._first) / len(self._first), sum(self._recent) / len(self._recent)
        if last < first - self.stall_tolerance * abs(first):
            return None
        return (
            f"training stalled: the mean loss of the last {len(self._recent)} steps, {last:.4g}, is not "
            f"{self.stall_tolerance:.0%} below that of the first {len(self._first)}, {first:.4g}, after "
            f"{trainer.global_step} of {int(self._planned)} planned steps"
        )

    def _fall_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        self.fallback_step = trainer.global_step
        self._replace(trainer, self._adamw, safe_lr=self.fallback_lr)
        self._own_schedule.clear()  # AdamW has no schedule of its own to stack
        lrs = [[float(f"{g['lr']:.3g}") for g in opt.param_groups] for opt in trainer.strategy.optimizers]
        rank_zero_warn(
            f"LearnedOptimizer: {reason}; switching to AdamW for the rest of training with learning rates {lrs} "
            f"(at most fallback_lr={self.fallback_lr}) and weight decay {self.fallback_weight_decay} where a group "
            "sets none"
        )
        pl_module.log("learned_optimizer/fallback_step", float(self.fallback_step), rank_zero_only=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "rule": rule_record(self.rule),
            "initial_loss": self.initial_loss,
            "fallback_step": self.fallback_step,
            "batches": self._batches,
            "first_losses": list(self._first),
            "recent_losses": list(self._recent),
            "stall_checked": self._stall_checked,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the guard's state; refuse a checkpoint written with another rule.

        The rule's hash (:func:`~lightning_meta.optim.rule_fingerprint`) covers its class, settings and weights, so
        the same weights configured differently (another step-size mode, schedule or clamp) are refused too. A
        checkpoint of an older lightning-meta, which recorded the weights' hash only, loads with a warning when the
        weights match.
        """
        saved = state_dict.get("rule")
        if saved is not None:
            check_rule_record(
                saved,
                self.rule,
                saved_as="this checkpoint was trained with",
                applied_by="the LearnedOptimizer",
                fix="Resume with the same rule: the same pretrained name, or the same class, constructor arguments "
                "and weights.",
            )
        self.initial_loss = state_dict["initial_loss"]
        self.fallback_step = state_dict["fallback_step"]
        self._batches = int(state_dict.get("batches", 0))
        self._first = list(state_dict.get("first_losses", []))
        self._recent = list(state_dict.get("recent_losses", []))
        self._stall_checked = bool(state_dict.get("stall_checked", False))

    def _plan_manual_horizons(self, trainer: pl.Trainer) -> None:
        """Each rule optimizer's horizon from its steps per batch so far and the Trainer's limits.

        ``max_steps`` counts the steps of all optimizers together (Lightning's ``global_step`` under manual
        optimization), ``max_epochs`` counts batches; training stops at whichever comes first.
        """
        optimizers = [opt for opt in trainer.strategy.optimizers if isinstance(opt, RuleOptimizer)]
        total = sum(opt.step_count for opt in optimizers) / self._batches
        batch_limit, step_limit = self._limits
        if total == 0 or not math.isfinite(min(batch_limit, step_limit / total)):
            return
        batches = min(batch_limit, step_limit / total)
        for opt in optimizers:
            if opt.rule.needs_horizon and opt.step_count:
                opt.horizon = max(opt.step_count, math.ceil(opt.step_count / self._batches * batches - 1e-6))

    def _adamw(self, old: Optimizer, groups: list[dict[str, Any]]) -> Optimizer:
        return AdamW(groups, weight_decay=self.fallback_weight_decay)

    def _replace(self, trainer: pl.Trainer, build: Any, safe_lr: float | None = None) -> None:
        """Build a replacement for each optimizer from its param groups; re-point the LR schedulers.

        With ``safe_lr`` each optimizer's learning rates (and its schedulers' base rates) are scaled by one factor
        so that the largest is at most ``safe_lr``.
        """
        replacements = []
        for old in trainer.strategy.optimizers:
            groups = []
            for group in old.param_groups:
                new_group = {key: value for key, value in group.items() if key not in _IMPLEMENTATION_KEYS}
                if self.lr is not None and not isinstance(old, RuleOptimizer):
                    new_group["lr"] = self.lr
                    new_group["initial_lr"] = self.lr
                groups.append(new_group)
            tree = {  # by id: a scheduler reached twice is re-pointed and scaled once
                id(scheduler): scheduler
                for config in trainer.lr_scheduler_configs
                if config.scheduler.optimizer is old
                for scheduler in _scheduler_tree(config.scheduler)
            }
            schedulers = list(tree.values())
            # A CyclicLR starts its groups at base_lr and keeps its peaks to itself; they are the reference lr of a
            # relative-lr rule (which caps lr / reference at 1) and bound the fallback's safe rates.
            cyclic_peaks = [
                lr for scheduler in schedulers if isinstance(scheduler, CyclicLR) for lr in scheduler.max_lrs
            ]
            peak = max([initial_peak_lr(groups), *cyclic_peaks])
            if cyclic_peaks:
                for group in groups:
                    group.setdefault("reference_lr", peak)
            scale = 1.0
            if safe_lr is not None:
                scale = min(1.0, safe_lr / peak) if peak > 0 else 1.0
                for group in groups:
                    for key in ("lr", "initial_lr", "max_lr", "min_lr"):  # min_lr: a OneCycleLR's floor
                        if key in group:
                            group[key] *= scale
            new = build(old, groups)
            for scheduler in schedulers:
                scheduler.optimizer = new
                if self.lr is not None and not isinstance(old, RuleOptimizer) and hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs = [group["lr"] for group in groups]
                elif scale != 1.0 and hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs = [lr * scale for lr in scheduler.base_lrs]
                if scale != 1.0 and isinstance(scheduler, CyclicLR):
                    scheduler.max_lrs = [lr * scale for lr in scheduler.max_lrs]
            replacements.append(new)
        trainer.strategy.optimizers = replacements
