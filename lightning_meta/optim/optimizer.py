"""``RuleOptimizer``: a ``torch.optim.Optimizer`` that applies an :class:`~lightning_meta.optim.UpdateRule`.

Named for what it does (applies a rule); the Trainer callback that swaps it in is
:class:`lightning_meta.callbacks.LearnedOptimizer`.

It is an ordinary optimizer: one learning rate per param group (LR schedulers act on it), state in
``self.state[p]`` (float32 tensors even for low-precision parameters, so checkpoints load with
``torch.load(weights_only=True)``), a closure called exactly once, gradient clipping and ``GradScaler`` applied
by the caller before ``step()``. ``state_dict()`` records the rule (name, version, settings and a hash over its
class, settings and weights: :func:`~lightning_meta.optim.rule_record`), and ``load_state_dict`` refuses state
written by another optimizer or another rule.

A group's ``weight_decay`` is applied as decoupled weight decay (AdamW semantics, Loshchilov & Hutter,
arXiv:1711.05101): before the rule's update, ``p ← p · (1 − lr · m · weight_decay)`` with the group's lr and ``m``
the rule's own schedule factor (:meth:`~lightning_meta.optim.UpdateRule.lr_multiplier`). Groups carried over from
``torch.optim.Adam`` (L2-coupled decay) get the decoupled form too.

Rules with ``relative_lr`` (the shipped default) set their own step size: they receive each group's lr divided by
the optimizer's reference lr (the largest initial lr of its groups, recorded at construction), so an LR scheduler's
shape and the ratios between groups act on the step while the lr's absolute size does not matter. That multiplier is
at most 1: the rule's own step size is the largest it takes. An lr raised above the reference (a ``CyclicLR`` that
starts at its ``base_lr``, a ``LambdaLR`` with factors above 1, a hand-set lr) is capped there, with a warning, since
far larger steps can stall or diverge the run; give the groups a ``reference_lr`` (the schedule's peak) to follow
such a schedule's shape instead. (The ``LearnedOptimizer`` callback does this for ``CyclicLR``.) To take larger or
smaller steps than the rule's own, set ``step_scale`` (a constructor argument, or a group's ``"step_scale"`` key): the
multiplier, after the cap, is multiplied by it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lightning_meta.optim.pretrained import available_pretrained, load_pretrained
from lightning_meta.optim.rules import UpdateRule, check_rule_record, get_rule, rule_record

__all__ = ["RuleOptimizer"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


def initial_peak_lr(param_groups: Iterable[dict[str, Any]]) -> float:
    """The largest lr the groups start a schedule from: each group's ``max_lr`` (a ``OneCycleLR``'s peak), else its
    ``initial_lr`` (set by any LR scheduler), else its ``lr``; 0 without groups. Relative-lr rules read a group's lr
    against it."""
    return float(max((g.get("max_lr", g.get("initial_lr", g["lr"])) for g in param_groups), default=0.0))


def check_step_scale(scale: Any, rule: UpdateRule) -> None:
    """Refuse a ``step_scale`` that is not a finite number > 0, or that is not 1 for a rule in lr mode (which takes
    the lr as its step, so a step scale would be a second lr)."""
    if not (isinstance(scale, (int, float)) and 0 < scale < math.inf):
        raise ValueError(f"step_scale={scale!r} must be a finite number > 0")
    if scale != 1 and not rule.relative_lr:
        raise ValueError(
            f"step_scale={scale} scales the step of rules that set it themselves; rule {rule.name!r} takes the lr "
            "as its step: scale the lr instead"
        )


class RuleOptimizer(Optimizer):
    """Apply an update rule to every parameter with a gradient.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer. Extra group keys
            (e.g. ``betas`` carried over from a replaced Adam) are kept but unused.
        rule: the rule, or a name: a shipped pretrained rule (``"default"``, ``"celo2-pes"``, ... as
            :func:`~lightning_meta.optim.load_pretrained`, the same names the ``LearnedOptimizer`` callback takes),
            else a registry name for :func:`~lightning_meta.optim.get_rule` (untrained weights). Its weights are
            not trained here.
        lr: default learning rate of the groups (rules with ``uses_lr = False`` ignore it). ``None``: 1.0 for
            rules with ``relative_lr`` (whose step does not depend on the lr's size), else 1e-3.
        horizon: planned number of steps, required (at construction) by rules with ``needs_horizon``.
        reduce_loss: average the loss over distributed ranks before a ``needs_loss`` rule reads it.
        step_scale: with a ``relative_lr`` rule, a factor on the step the rule sets itself (the default group value;
            a group's own ``"step_scale"`` key overrides it): the escape hatch where the rule's step is too small or
            too large for a problem (a group's weight decay is not scaled: it stays AdamW's at the group's lr).
            Rules in lr mode take the lr as their step: scale the lr instead.

    Example:
        >>> from torch import nn
        >>> from lightning_meta.optim import RuleOptimizer
        >>> model = nn.Linear(3, 1)
        >>> opt = RuleOptimizer(model.parameters(), "adam", lr=0.1)  # or "default" with horizon=total_steps
        >>> model(torch.ones(2, 3)).sum().backward()
        >>> opt.step()
        >>> opt.state_dict()["rule"]["name"]
        'adam'
    """

    def __init__(
        self,
        params: ParamsT,
        rule: UpdateRule | str = "default",
        *,
        lr: float | None = None,
        horizon: int | None = None,
        reduce_loss: bool = True,
        step_scale: float = 1.0,
    ) -> None:
        if isinstance(rule, str):
            rule = load_pretrained(rule) if rule == "default" or rule in available_pretrained() else get_rule(rule)
        if not isinstance(rule, UpdateRule):
            raise TypeError(f"rule={rule!r} is not an UpdateRule; pass one (or a name from list_rules())")
        if lr is None:
            lr = 1.0 if rule.relative_lr else 1e-3
        if lr < 0:
            raise ValueError(f"lr={lr} must be >= 0")
        if horizon is not None and horizon < 1:
            raise ValueError(f"horizon={horizon} must be >= 1 (or None)")
        if rule.needs_horizon and horizon is None:
            raise ValueError(
                f"rule {rule.name!r} needs the planned number of steps; pass RuleOptimizer(horizon=...) "
                "or use the LearnedOptimizer callback, which sets it from the Trainer"
            )
        self.rule = rule  # add_param_group (called by the base class) checks the groups against it
        super().__init__(params, {"lr": lr, "weight_decay": 0.0, "step_scale": step_scale})
        # The reference lr of relative-lr rules: the largest initial lr (a OneCycleLR's max_lr) over the groups.
        reference = initial_peak_lr(self.param_groups)
        for group in self.param_groups:
            group.setdefault("reference_lr", reference)
        rule.requires_grad_(False)
        self.horizon = horizon
        self.reduce_loss = reduce_loss
        self._rule_record = rule_record(rule)
        self._pending_loss: Tensor | None = None
        self._warned_above_reference = False
        self.step_count = 0  # calls of step(); checkpointed (the callback plans per-optimizer horizons from it)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; refuses a negative ``weight_decay`` and a ``step_scale``
        that is not finite and > 0, or that a rule in lr mode would ignore, before the group is added."""
        weight_decay = param_group.get("weight_decay", self.defaults["weight_decay"])
        if weight_decay < 0:
            raise ValueError(f"a param group has weight_decay={weight_decay}; it must be >= 0")
        check_step_scale(param_group.get("step_scale", self.defaults["step_scale"]), self.rule)
        super().add_param_group(param_group)

    def record_loss(self, loss: Tensor) -> None:
        """Add ``loss`` (detached) to the loss the next :meth:`step` hands to a ``needs_loss`` rule.

        Under gradient accumulation record each micro-batch's (already divided) loss; the sum is the mean.
        A closure's loss is used when nothing was recorded.
        """
        loss = loss.detach().float()
        self._pending_loss = loss if self._pending_loss is None else self._pending_loss + loss

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient; call ``closure`` (once) first when given.

        Returns:
            The closure's return value, or ``None``.
        """
        self._opt_called = True  # what an LR scheduler's step wrapper would record (see below)
        self.step_count += 1
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rule_loss = self._rule_loss(loss) if self.rule.needs_loss else None
        if self.rule.needs_horizon and self.horizon is None:
            raise ValueError(
                f"rule {self.rule.name!r} needs the planned number of steps; pass RuleOptimizer(horizon=...) "
                "or use the LearnedOptimizer callback, which sets it from the Trainer"
            )
        for group in self.param_groups:
            lr = group["lr"]
            if self.rule.relative_lr:  # groups added later by add_param_group get their own initial lr
                reference = group.setdefault("reference_lr", group.get("initial_lr", group["lr"]))
                lr = lr / reference if reference > 0 else 0.0 * lr
                if isinstance(lr, Tensor):
                    lr = lr.clamp(max=1.0)
                elif lr > 1.0:
                    self._warn_above_reference(group, lr)
                    lr = 1.0
                lr = lr * group.get("step_scale", 1.0)  # older checkpoints' groups have no step_scale
            by_step: dict[int, list[Tensor]] = {}  # tensors at the same step go to the rule together
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("RuleOptimizer does not support sparse gradients; use dense embeddings")
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state.update(self.rule.init_state(param))
                state["step"] += 1
                by_step.setdefault(int(state["step"].item()), []).append(param)
            for step, params in by_step.items():
                if group.get("weight_decay"):
                    decay = group["lr"] * self.rule.lr_multiplier(step, self.horizon) * group["weight_decay"]
                    torch._foreach_mul_(params, 1.0 - decay)
                self._update(params, lr, step, rule_loss)
        return loss

    # LR schedulers wrap `optimizer.step` at construction and warn when the step they find is not wrapped. The
    # callback re-points existing schedulers at a new optimizer, so mark this step as already tracked; `step`
    # itself sets `_opt_called`, which is all the wrapper does.
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]

    def _warn_above_reference(self, group: dict[str, Any], multiplier: float) -> None:
        """Warn (once per optimizer) that a relative-lr rule's multiplier was capped at 1."""
        if self._warned_above_reference:
            return
        self._warned_above_reference = True
        warnings.warn(
            f"a param group's lr {group['lr']:.3g} is {multiplier:.3g}x its reference lr {group['reference_lr']:.3g} "
            f"(the largest initial lr of the optimizer's groups). Rule {self.rule.name!r} sets its own step size and "
            "reads the lr as a multiplier of at most 1, so it uses 1: larger steps can stall or diverge training. To "
            "follow a schedule that rises above its initial lr, set each group's 'reference_lr' to the schedule's "
            "peak lr.",
            UserWarning,
            stacklevel=2,
        )

    def _update(self, params: list[Tensor], lr: float | Tensor, step: int, loss: Tensor | None) -> None:
        """One in-place ``rule.update_`` over ``params`` (float32 working copies of low-precision ones)."""
        works = [p if p.dtype == torch.float32 else p.float() for p in params]
        grads = []
        for p in params:
            grad = p.grad
            assert grad is not None  # step() hands over only parameters that have a gradient
            grads.append(grad if grad.dtype == torch.float32 else grad.float())
        states = [{key: value for key, value in self.state[p].items() if key != "step"} for p in params]
        self.rule.update_(works, grads, states, lr=lr, step=step, horizon=self.horizon, loss=loss)
        for param, work, rule_state in zip(params, works, states):
            if work is not param:
                param.copy_(work)
            state = self.state[param]
            for key, value in rule_state.items():
                state[key] = value if value.dtype == torch.float32 else value.float()

    def _rule_loss(self, closure_loss: Any) -> Tensor:
        loss, self._pending_loss = self._pending_loss, None
        if loss is None and isinstance(closure_loss, Tensor):
            loss = closure_loss.detach().float()
        if loss is None:
            raise ValueError(
                f"rule {self.rule.name!r} reads the training loss but step() got none; pass a closure that "
                "returns the loss, call optimizer.record_loss(loss) before step(), or use the LearnedOptimizer callback"
            )
        if self.reduce_loss and dist.is_available() and dist.is_initialized():
            loss = loss.clone()
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The usual optimizer state plus ``"rule"``: :func:`~lightning_meta.optim.rule_record` of the rule."""
        state = super().state_dict()
        state["rule"] = dict(self._rule_record)
        state["step_count"] = self.step_count
        state["horizon"] = self.horizon
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state written by a ``RuleOptimizer`` with the same rule (class, version, settings, weights).

        State of an older lightning-meta, which recorded the weights' hash only, loads with a warning when the
        weights match.

        Raises:
            ValueError: the state came from another optimizer (e.g. ``torch.optim.Adam``) or another rule (the
                same weights configured differently included).
        """
        saved = state_dict.get("rule")
        if not isinstance(saved, dict):
            keys = sorted({key for s in state_dict.get("state", {}).values() for key in s})
            raise ValueError(
                f"this optimizer state was not written by a RuleOptimizer (no 'rule' entry; state keys {keys}); "
                "load it into the optimizer that wrote it, or start the RuleOptimizer from fresh state"
            )
        check_rule_record(
            saved,
            self.rule,
            saved_as="this optimizer state was written for",
            applied_by="this optimizer",
            fix="Build the RuleOptimizer with the same rule and weights (e.g. the same load_pretrained name) and "
            "the same constructor arguments.",
        )
        super().load_state_dict(state_dict)
        self.step_count = int(state_dict.get("step_count", self.step_count))
        self.horizon = state_dict.get("horizon", self.horizon)
        # Optimizer.load_state_dict casts floating state to each parameter's dtype; keep the saved float32.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key != "step" and isinstance(value, Tensor) and value.is_floating_point():
                    self.state[param][key] = value.to(device=param.device, dtype=torch.float32)
