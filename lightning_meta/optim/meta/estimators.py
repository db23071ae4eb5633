"""Meta-gradient estimators for learned optimizers: truncated BPTT, antithetic ES and PES.

* Truncated backpropagation through time: differentiate the meta-objective through ``truncation_length``
  unrolled inner steps (biased towards short horizons).
* Antithetic evolution strategies (Salimans et al. 2017, arXiv:1703.03864) over truncations:
  ``g = mean_i eps_i (L(theta + eps_i) - L(theta - eps_i)) / (2 sigma^2)``; no backprop through the unroll.
* Persistent evolution strategies, PES (Vicol, Metz, Sohl-Dickstein, ICML 2021, arXiv:2112.13835): the same
  antithetic pairs, but each particle's perturbations are accumulated since its inner problem started,
  which makes the estimate unbiased across truncations.

All three share one interface (learned_optimization's ``GradientEstimator``): an estimator owns a
population of inner problems drawn from a :class:`~lightning_meta.optim.meta.tasks.TaskFamily`, advances
them by one truncation per :meth:`GradientEstimator.estimate` call and returns a gradient for the rule's
weights. Inner problems restart with a fresh task and a log-uniform horizon when they reach their horizon.
Many problems run in one call: parameters are stacked along a leading dimension, task losses are vmapped
and the rule is applied with ``batch_dims=1`` (or vmapped over per-particle weights for ES/PES).

Departures from the papers: the population shares one step counter and horizon (problems restart
together); each problem's loss is divided by its initial loss and clipped at ``max_loss`` (non-finite
losses count as ``max_loss``) so tasks of different scale weigh alike and a diverging particle cannot
dominate the estimate.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from lightning_meta.optim.meta.tasks import Params, Task, TaskFamily, sample_batches, sample_tasks, stack_params
from lightning_meta.optim.rules import UpdateRule

__all__ = [
    "ES",
    "PES",
    "Estimate",
    "GradientEstimator",
    "InnerState",
    "TruncatedBPTT",
    "apply_rule",
    "evaluate_rule",
    "get_estimator",
    "inner_step",
]

OBJECTIVES = ("mean", "mean_log", "final", "valid")
_LOG_FLOOR = 1e-6  # normalised losses below this count as it in the "mean_log" objective


@dataclass
class Estimate:
    """What one truncation produced.

    Attributes:
        gradient: estimated gradient of the meta-objective for each rule weight (names as in ``named_parameters``).
        meta_loss: the truncation's meta-objective averaged over problems (and over both antithetic signs).
        inner_steps: inner updates done per problem in this truncation.
    """

    gradient: dict[str, Tensor]
    meta_loss: Tensor
    inner_steps: int


@dataclass
class InnerState:
    """A population of inner problems part-way through training (leading dim = problem)."""

    tasks: list[Task]
    params: Params
    opt_state: dict[str, dict[str, Tensor]]
    step: int
    horizon: int
    loss_scale: Tensor
    lr: float


class _UpdateCall(nn.Module):
    """Routes ``forward`` to ``rule.update`` so ``torch.func.functional_call`` can swap the rule's weights."""

    def __init__(self, rule: UpdateRule) -> None:
        super().__init__()
        self.rule = rule

    def forward(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        loss: Tensor,
        lr: float,
        step: int,
        horizon: int | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return self.rule.update(param, grad, state, lr=lr, step=step, horizon=horizon, loss=loss)


def apply_rule(
    rule: UpdateRule,
    params: Params,
    grads: Params,
    opt_state: dict[str, dict[str, Tensor]],
    *,
    lr: float,
    step: int,
    horizon: int | None,
    loss: Tensor,
    theta: dict[str, Tensor] | None = None,
) -> tuple[Params, dict[str, dict[str, Tensor]]]:
    """Applies ``rule`` to every tensor of a population of problems (leading dim of each tensor).

    Args:
        rule: the update rule.
        params: each tensor ``(problems, ...)``.
        grads: their gradients.
        opt_state: the rule's state per parameter name.
        lr: learning rate passed to the rule.
        step: index of this update, from 1.
        horizon: planned number of updates.
        loss: ``(problems,)`` current training losses.
        theta: per-problem rule weights, each ``(problems, *weight.shape)``; ``None`` uses the rule's own
            weights for every problem (one batched call with ``batch_dims=1``).
    """
    new_params, new_state = {}, {}
    if theta is None:
        for name, p in params.items():
            new_params[name], new_state[name] = rule.update(
                p, grads[name], opt_state[name], lr=lr, step=step, horizon=horizon, loss=loss, batch_dims=1
            )
        return new_params, new_state
    wrapper = _UpdateCall(rule)
    weights = {f"rule.{k}": v for k, v in theta.items()}

    def one(w: dict[str, Tensor], p: Tensor, g: Tensor, s: dict[str, Tensor], loss: Tensor):
        return functional_call(wrapper, w, (p, g, s, loss, lr, step, horizon))

    batched = vmap(one)
    for name, p in params.items():
        new_params[name], new_state[name] = batched(weights, p, grads[name], opt_state[name], loss)
    return new_params, new_state


def inner_step(task: Task, params: Params, batch: tuple[Tensor, ...], *, create_graph: bool) -> tuple[Tensor, Params]:
    """Per-problem losses ``(problems,)`` and gradients of a population sharing ``task``'s architecture."""
    if create_graph:
        losses = vmap(task.loss)(params, batch)
        grads = torch.autograd.grad(losses.sum(), list(params.values()), create_graph=True)
        return losses, dict(zip(params, grads))
    grads, losses = vmap(grad_and_value(task.loss))(params, batch)
    return losses, grads


def _log_uniform(generator: torch.Generator, low: float, high: float) -> float:
    if low == high:  # draw anyway, so the random stream does not depend on the range
        torch.rand((), generator=generator)
        return float(low)
    u = torch.rand((), generator=generator).item()
    return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))


class GradientEstimator(ABC):
    """Owns a population of inner problems and estimates the meta-gradient one truncation at a time.

    Args:
        family: the task family inner problems are drawn from.
        num_tasks: distinct inner problems per truncation (ES/PES run each twice, once per sign).
        truncation_length: inner updates per :meth:`estimate` call.
        min_horizon: shortest inner training run (updates); horizons are log-uniform.
        max_horizon: longest inner training run.
        objective: ``"mean"`` training loss over the unroll, ``"mean_log"``: mean of its log (floored at
            1e-6), so a tenfold loss reduction late in training counts as much as one early on (what a
            schedule that anneals is for), ``"final"`` training loss after the last update of each inner run, or
            ``"valid"``: mean loss on fresh validation batches after each update.
        inner_lr: the ``lr`` passed to the rule, or a ``(low, high)`` range from which each population
            draws one log-uniformly when it restarts (augmentation for rules whose step scales with ``lr``).
        normalize_loss: divide each problem's losses by its first loss.
        max_loss: losses (after normalisation) are clipped to this value; non-finite ones count as it.
        seed: seeds the tasks, initialisations, batches, horizons and perturbations.
    """

    def __init__(
        self,
        family: TaskFamily,
        *,
        num_tasks: int = 8,
        truncation_length: int = 20,
        min_horizon: int = 50,
        max_horizon: int = 200,
        objective: str = "mean",
        inner_lr: float | tuple[float, float] = 1e-3,
        normalize_loss: bool = True,
        max_loss: float = 10.0,
        seed: int = 0,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")
        if num_tasks < 1 or truncation_length < 1:
            raise ValueError(f"num_tasks={num_tasks} and truncation_length={truncation_length} must be >= 1")
        if not 1 <= min_horizon <= max_horizon:
            raise ValueError(f"horizons [{min_horizon}, {max_horizon}] must satisfy 1 <= min_horizon <= max_horizon")
        self.family, self.num_tasks, self.truncation_length = family, num_tasks, truncation_length
        self.min_horizon, self.max_horizon, self.objective = min_horizon, max_horizon, objective
        lr_range = (inner_lr, inner_lr) if isinstance(inner_lr, (int, float)) else tuple(inner_lr)
        if len(lr_range) != 2 or not 0 < lr_range[0] <= lr_range[1]:
            raise ValueError(f"inner_lr={inner_lr} must be a positive float or a (low, high) range with low <= high")
        self.inner_lr, self.lr_range = inner_lr, lr_range
        self.normalize_loss, self.max_loss = normalize_loss, max_loss
        self.generator = torch.Generator().manual_seed(seed)
        self.state: InnerState | None = None
        self._task_generator_state: Tensor | None = None  # the generator's state before the tasks were drawn

    copies: int = 1  # how many particles run each distinct task

    @abstractmethod
    def estimate(self, rule: UpdateRule) -> Estimate:
        """Advances every inner problem by one truncation and returns the meta-gradient estimate."""

    def _restart_if_done(self, rule: UpdateRule, device: torch.device) -> bool:
        if self.state is not None and self.state.step < self.state.horizon:
            return False
        self._task_generator_state = self.generator.get_state()
        tasks = sample_tasks(self.family, self.generator, self.num_tasks)  # one architecture for all
        params = stack_params([t.init(self.generator) for t in tasks])
        params = {k: torch.cat([v] * self.copies).to(device) for k, v in params.items()}
        opt_state = {k: rule.init_state(v, batch_dims=1) for k, v in params.items()}
        horizon = round(_log_uniform(self.generator, self.min_horizon, self.max_horizon))
        lr = _log_uniform(self.generator, *self.lr_range)
        self.state = InnerState(
            tasks * self.copies,
            params,
            opt_state,
            0,
            horizon,
            torch.ones(self.num_tasks * self.copies, device=device),
            lr,
        )
        return True

    def state_dict(self) -> dict[str, Any]:
        """Everything that determines the next estimates, as tensors and numbers (``torch.load(weights_only=True)``
        reads it): the random generator, and the running inner problems (parameters, the rule's state, step,
        horizon, loss scale and lr; the tasks as the generator state they were drawn from, so they are drawn
        again on load rather than pickled)."""
        out: dict[str, Any] = {"generator": self.generator.get_state(), "num_tasks": self.num_tasks, "inner": None}
        if self.state is not None:
            s = self.state
            out["inner"] = {
                "task_generator": self._task_generator_state,
                "params": dict(s.params),
                "opt_state": {k: dict(v) for k, v in s.opt_state.items()},
                "step": s.step,
                "horizon": s.horizon,
                "loss_scale": s.loss_scale,
                "lr": s.lr,
            }
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; the estimator must have the family and settings it was saved with."""
        if state["num_tasks"] != self.num_tasks:
            raise ValueError(
                f"the saved estimator ran num_tasks={state['num_tasks']} problems, this one {self.num_tasks}; "
                "resume with the settings it was saved with"
            )
        self.generator.set_state(state["generator"])
        inner = state["inner"]
        if inner is None:
            self.state, self._task_generator_state = None, None
            return
        self._task_generator_state = inner["task_generator"]
        replay = torch.Generator()
        replay.set_state(inner["task_generator"])
        tasks = sample_tasks(self.family, replay, self.num_tasks)
        self.state = InnerState(
            tasks * self.copies,
            dict(inner["params"]),
            {k: dict(v) for k, v in inner["opt_state"].items()},
            int(inner["step"]),
            int(inner["horizon"]),
            inner["loss_scale"],
            float(inner["lr"]),
        )

    def _current(self) -> InnerState:
        """The running inner problems (``_restart_if_done``, called at the start of every estimate, sets them)."""
        if self.state is None:
            raise RuntimeError(f"{type(self).__name__} has no inner problems yet; call _restart_if_done first")
        return self.state

    def _batch(self, split: str, device: torch.device) -> tuple[Tensor, ...]:
        batch = sample_batches(self._current().tasks[: self.num_tasks], self.generator, split)
        return tuple(torch.cat([b] * self.copies).to(device) for b in batch)

    def _clip(self, losses: Tensor) -> Tensor:
        scaled = losses / self._current().loss_scale
        scaled = torch.nan_to_num(scaled, nan=self.max_loss, posinf=self.max_loss, neginf=self.max_loss)
        return scaled.clamp(max=self.max_loss)

    def _unroll(self, rule: UpdateRule, theta: dict[str, Tensor] | None, *, create_graph: bool) -> tuple[Tensor, int]:
        """Runs one truncation; returns the per-problem meta-objective ``(problems,)`` and the steps done."""
        state = self._current()
        device = _state_device(state)
        task = state.tasks[0]
        params = state.params
        if create_graph:
            params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        opt_state = {k: {n: s.detach() for n, s in v.items()} for k, v in state.opt_state.items()}
        steps = min(self.truncation_length, state.horizon - state.step)
        total = torch.zeros(len(state.tasks), device=device)
        for _ in range(steps):
            losses, grads = inner_step(task, params, self._batch("train", device), create_graph=create_graph)
            if state.step == 0 and self.normalize_loss:
                state.loss_scale = losses.detach().abs().clamp(min=1e-8)
            if not create_graph:
                grads = {k: torch.nan_to_num(g) for k, g in grads.items()}
            state.step += 1
            params, opt_state = apply_rule(
                rule,
                params,
                grads,
                opt_state,
                lr=state.lr,
                step=state.step,
                horizon=state.horizon,
                loss=losses.detach(),
                theta=theta,
            )
            if self.objective == "mean":
                total = total + self._clip(losses) / self.truncation_length
            elif self.objective == "mean_log":
                total = total + torch.log(self._clip(losses).clamp(min=_LOG_FLOOR)) / self.truncation_length
            elif self.objective == "valid":
                valid = vmap(task.loss)(params, self._batch("valid", device))
                total = total + self._clip(valid) / self.truncation_length
            elif state.step == state.horizon:  # "final"
                total = total + self._clip(vmap(task.loss)(params, self._batch("train", device)))
        state.params = {k: v.detach() for k, v in params.items()}
        state.opt_state = {k: {n: s.detach() for n, s in v.items()} for k, v in opt_state.items()}
        return total, steps


def _state_device(state: InnerState) -> torch.device:
    return next(iter(state.params.values())).device


def _rule_device(rule: UpdateRule) -> torch.device:
    for t in rule.parameters():
        return t.device
    return torch.device("cpu")


class TruncatedBPTT(GradientEstimator):
    """Truncated backpropagation through ``truncation_length`` unrolled inner updates."""

    def estimate(self, rule: UpdateRule) -> Estimate:
        self._restart_if_done(rule, _rule_device(rule))
        names = [n for n, p in rule.named_parameters() if p.requires_grad]
        with torch.enable_grad():
            objective, steps = self._unroll(rule, None, create_graph=True)
            meta_loss = objective.mean()
            weights = [p for n, p in rule.named_parameters() if p.requires_grad]
            grads: Sequence[Tensor | None]
            if meta_loss.requires_grad:  # False for a "final" objective in a truncation before the end
                grads = torch.autograd.grad(meta_loss, weights, allow_unused=True)
            else:
                grads = [None] * len(weights)
        gradient = {n: torch.zeros_like(w) if g is None else g for n, w, g in zip(names, weights, grads)}
        return Estimate(gradient, meta_loss.detach(), steps)


class ES(GradientEstimator):
    """Antithetic evolution strategies over one truncation (each truncation's noise is used alone).

    Args:
        family: see :class:`GradientEstimator` (and the remaining shared arguments).
        sigma: standard deviation of the Gaussian perturbation of every rule weight.
        **kwargs: the shared arguments of :class:`GradientEstimator`.
    """

    copies = 2
    accumulate = False

    def __init__(self, family: TaskFamily, *, sigma: float = 0.01, **kwargs) -> None:
        super().__init__(family, **kwargs)
        if sigma <= 0:
            raise ValueError(f"sigma={sigma} must be positive")
        self.sigma = sigma
        self.accumulated: dict[str, Tensor] | None = None

    def estimate(self, rule: UpdateRule) -> Estimate:
        device = _rule_device(rule)
        weights = {n: p.detach() for n, p in rule.named_parameters() if p.requires_grad}
        if self._restart_if_done(rule, device) or self.accumulated is None:
            self.accumulated = {n: torch.zeros(self.num_tasks, *w.shape, device=device) for n, w in weights.items()}
        eps = {
            n: self.sigma * torch.randn(self.num_tasks, *w.shape, generator=self.generator).to(device)
            for n, w in weights.items()
        }
        theta = {n: torch.cat([w + eps[n], w - eps[n]]) for n, w in weights.items()}
        with torch.no_grad():
            objective, steps = self._unroll(rule, theta, create_graph=False)
        diff = objective[: self.num_tasks] - objective[self.num_tasks :]  # (num_tasks,)
        gradient = {}
        for n, e in eps.items():
            self.accumulated[n] = self.accumulated[n] + e if self.accumulate else e
            direction = self.accumulated[n]
            gradient[n] = (direction * diff.view(-1, *[1] * (direction.ndim - 1))).mean(0) / (2 * self.sigma**2)
        return Estimate(gradient, objective.mean(), steps)

    def state_dict(self) -> dict[str, Any]:
        """The shared state plus the perturbations accumulated since the inner problems started (PES)."""
        return super().state_dict() | {"accumulated": self.accumulated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.accumulated = state["accumulated"]


class PES(ES):
    """Persistent evolution strategies: ES whose perturbations accumulate over an inner problem's truncations.

    With one truncation per inner problem PES equals :class:`ES` exactly.
    """

    accumulate = True


_ESTIMATORS = {"tbptt": TruncatedBPTT, "es": ES, "pes": PES}


def get_estimator(name: str, family: TaskFamily, **kwargs) -> GradientEstimator:
    """Builds an estimator by name: ``"tbptt"``, ``"es"`` or ``"pes"``."""
    if name not in _ESTIMATORS:
        raise ValueError(f"estimator {name!r} is unknown; choose one of {sorted(_ESTIMATORS)}")
    if name == "tbptt":
        kwargs.pop("sigma", None)
    return _ESTIMATORS[name](family, **kwargs)


def evaluate_rule(
    rule: UpdateRule,
    family: TaskFamily,
    *,
    num_tasks: int = 8,
    horizon: int = 200,
    inner_lr: float = 1e-3,
    seed: int = 0,
    objective: str = "mean",
) -> float:
    """Meta-objective of ``rule`` over full inner runs of ``horizon`` updates on fixed (seeded) tasks.

    Returns:
        The mean over tasks of the normalised, clipped objective (lower is better).
    """
    est = TruncatedBPTT(
        family,
        num_tasks=num_tasks,
        truncation_length=horizon,
        min_horizon=horizon,
        max_horizon=horizon,
        objective=objective,
        inner_lr=inner_lr,
        seed=seed,
    )
    est._restart_if_done(rule, _rule_device(rule))
    with torch.no_grad():
        objective_value, _ = est._unroll(rule, None, create_graph=False)
    return float(objective_value.mean())
