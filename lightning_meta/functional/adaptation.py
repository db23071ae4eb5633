"""Inner-loop adaptation by gradient steps over a dict of fast weights.

The core of MAML (Finn, Abbeel, Levine, ICML 2017, arXiv:1703.03400), FOMAML, ANIL (Raghu et al.,
ICLR 2020, arXiv:1909.09157) and Meta-SGD (Li et al. 2017, arXiv:1707.09835): starting from
``theta'_0 = theta``, take ``steps`` steps ``theta'_{s+1} = theta'_s - lr * grad L_support(theta'_s)``
and return the new tensors. Nothing is copied or patched: the model runs through
:func:`torch.func.functional_call` on the returned dict.

Second order differentiates through the inner gradients (``create_graph=True``); first order treats
them as constants but the caller still evaluates the query loss at ``theta'_S``, so the outer gradient
is the query gradient at the adapted weights.

The same code runs per task (``torch.autograd.grad``) and vectorized over tasks inside
:func:`lightning_meta.functional.vmap_tasks` (``torch.func.grad``, because ``autograd.grad`` cannot see
through ``vmap``); :func:`vmap_tasks` switches the implementation with a context flag.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

if TYPE_CHECKING:
    from lightning_meta.optim.rules import UpdateRule

__all__ = [
    "LearningRate",
    "StepLearningRates",
    "adapt",
    "gradient_steps",
    "functional_forward",
    "inside_vmap",
    "is_inside_vmap",
]

#: A scalar rate, one rate per tensor name, or one (broadcastable) tensor of rates per tensor name.
LearningRate = float | Tensor | Mapping[str, float | Tensor]
#: A :data:`LearningRate` for every step, or one sequence (list/tuple) of them with one entry per inner step
#: (MAML++'s per-layer per-step rates: a sequence of dicts).
StepLearningRates = LearningRate | Sequence[LearningRate]

_IN_VMAP: contextvars.ContextVar[bool] = contextvars.ContextVar("lightning_meta_in_vmap", default=False)


@contextmanager
def inside_vmap() -> Iterator[None]:
    """Mark the enclosed code as running inside ``torch.func.vmap`` (inner gradients then use ``torch.func.grad``)."""
    token = _IN_VMAP.set(True)
    try:
        yield
    finally:
        _IN_VMAP.reset(token)


def is_inside_vmap() -> bool:
    """True inside :func:`inside_vmap` (lightning-meta's vmap-over-tasks path), False otherwise."""
    return _IN_VMAP.get()


def _check_grad_possible() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "gradient-based adaptation needs autograd, but inference mode is enabled; Lightning enables it in "
            "validate/test/predict by default: create the trainer with `Trainer(inference_mode=False)`"
        )


def _step_rates(lr: StepLearningRates, names: list[str], steps: int) -> list[dict[str, float | Tensor]]:
    """One ``{name: rate}`` per step from a rate for all steps or a sequence with one rate per step."""
    if isinstance(lr, (list, tuple)):
        if len(lr) != steps:
            raise ValueError(
                f"lr has {len(lr)} per-step rates but steps={steps}; give one rate per inner step or a single rate"
            )
        return [_rates(r, names) for r in lr]
    # the per-step form is a list or tuple (handled above); isinstance cannot exclude the rest of Sequence
    rates = _rates(cast(LearningRate, lr), names)
    return [rates] * steps


def _rates(lr: LearningRate, names: list[str]) -> dict[str, float | Tensor]:
    if isinstance(lr, Mapping):
        missing = [n for n in names if n not in lr]
        if missing:
            raise KeyError(f"lr has no rate for {missing}; give a rate for every adapted tensor or pass a scalar lr")
        return {n: lr[n] for n in names}
    if isinstance(lr, (int, float)) and not math.isfinite(float(lr)):
        raise ValueError(f"lr={lr} is not finite")
    return {n: lr for n in names}


def gradient_steps(
    objective: Callable[[dict[str, Tensor]], Tensor],
    fast: Mapping[str, Tensor],
    *,
    steps: int = 1,
    lr: StepLearningRates = 0.4,
    first_order: bool = False,
    loss_scale: float = 1.0,
    rule: UpdateRule | None = None,
    trace: list[Tensor] | None = None,
) -> dict[str, Tensor]:
    """Take ``steps`` gradient steps on ``objective`` from the tensors ``fast``.

    Args:
        objective: maps a dict of the current tensors (same keys as ``fast``) to a scalar loss.
        fast: the tensors to adapt, e.g. ``dict(model.named_parameters())``; they are not modified.
        steps: number of inner steps ``S``; 0 returns ``fast`` unchanged.
        lr: inner rate ``alpha``: a scalar, a dict ``name -> float`` (per tensor) or ``name -> Tensor``
            broadcastable to the tensor (per element, Meta-SGD); or a list/tuple of ``steps`` such rates, one
            per step (MAML++'s per-layer per-step rates: a list of dicts). Tensor rates may require grad
            (learned rates get an outer gradient).
        first_order: treat inner gradients as constants (FOMAML); no second-order graph is built.
        loss_scale: multiply the inner loss by this before differentiating and divide the gradients by it,
            so that fp16 autocast gradients do not underflow. Fast weights keep the dtype of ``fast`` (fp32).
        rule: an :class:`~lightning_meta.optim.UpdateRule` as the inner optimizer instead of plain gradient
            descent: step ``s`` (counted from 1) sets each tensor to
            ``rule.update(tensor, grad, state, lr=rate, step=s, horizon=steps, loss=support loss)``, with its
            state from ``rule.init_state`` at the first step (computed in float32, or float64 for float64
            tensors). ``update`` is pure and differentiable, so a
            rule's weights (an ``nn.Module`` inside the learner) are meta-learned by the outer loop.
        trace: a list to which the (detached) objective value at the start of every step is appended, e.g. to
            watch the support loss during adaptation (a loss that rises means the inner rate is too large).

    Returns:
        ``{name: fast[name] - lr * sum of inner gradients}`` (or the rule's updates), differentiable w.r.t.
        ``fast`` (through the inner gradients too unless ``first_order``).

    Example:
        >>> w = torch.tensor([1.0], requires_grad=True)
        >>> out = gradient_steps(lambda f: (f["w"] ** 2).sum(), {"w": w}, steps=1, lr=0.25)
        >>> out["w"]  # 1 - 0.25 * 2
        tensor([0.5000], grad_fn=<SubBackward0>)
    """
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0")
    if not loss_scale > 0:
        raise ValueError(f"loss_scale={loss_scale} must be > 0")
    _check_grad_possible()
    names = list(fast)
    step_rates = _step_rates(lr, names, steps)
    fast = dict(fast)
    in_vmap = _IN_VMAP.get()
    states: dict[str, dict[str, Tensor]] = {}
    with torch.enable_grad():
        for step, rates in enumerate(step_rates, start=1):
            if in_vmap:
                grads, loss = _func_grads(objective, fast, names, first_order, loss_scale)
            else:
                grads, loss = _autograd_grads(objective, fast, names, first_order, loss_scale)
            if trace is not None:
                trace.append(loss.detach())
            if rule is None:
                fast = {n: fast[n] - rates[n] * g for n, g in zip(names, grads)}
                continue
            new_fast = {}
            for n, g in zip(names, grads):
                # rules compute in float32 (half-precision tensors are upcast) or in float64 for float64 tensors
                param = fast[n].float() if fast[n].dtype in (torch.float16, torch.bfloat16) else fast[n]
                if n not in states:
                    states[n] = {k: v.to(param.dtype) for k, v in rule.init_state(param).items()}
                new, states[n] = rule.update(
                    param, g.to(param.dtype), states[n], lr=rates[n], step=step, horizon=steps,
                    loss=loss.detach() if rule.needs_loss else None,
                )  # fmt: skip
                new_fast[n] = new.to(fast[n].dtype)
            fast = new_fast
    return fast


def _autograd_grads(
    objective: Callable[[dict[str, Tensor]], Tensor],
    fast: dict[str, Tensor],
    names: list[str],
    first_order: bool,
    loss_scale: float,
) -> tuple[list[Tensor], Tensor]:
    if first_order:
        # Differentiate at detached copies: the inner forward/backward then builds no outer graph at all.
        inputs = {n: fast[n].detach().requires_grad_() for n in names}
    else:
        inputs = {n: t if t.requires_grad else t.detach().requires_grad_() for n, t in fast.items()}
    loss = objective(inputs)
    _check_scalar(loss)
    raw = torch.autograd.grad(
        loss * loss_scale, [inputs[n] for n in names], create_graph=not first_order, allow_unused=True
    )
    grads = [
        torch.zeros_like(inputs[n]) if g is None else (g / loss_scale if loss_scale != 1.0 else g)
        for n, g in zip(names, raw)
    ]
    return grads, loss


def _func_grads(
    objective: Callable[[dict[str, Tensor]], Tensor],
    fast: dict[str, Tensor],
    names: list[str],
    first_order: bool,
    loss_scale: float,
) -> tuple[list[Tensor], Tensor]:
    def scaled(inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        loss = objective(inputs)
        _check_scalar(loss)
        return loss * loss_scale, loss

    inputs = {n: fast[n].detach() if first_order else fast[n] for n in names}
    grads, loss = torch.func.grad(scaled, has_aux=True)(inputs)
    out = [grads[n] / loss_scale if loss_scale != 1.0 else grads[n] for n in names]
    # First order: the gradient can still depend on tensors the objective closes over (ANIL's body features,
    # CAML's weights) at the outer autograd level; cut that dependence too.
    return ([g.detach() for g in out] if first_order else out), loss


def _check_scalar(loss: Tensor) -> None:
    if loss.dim() != 0:
        raise ValueError(f"the inner objective must return a scalar loss, got shape {tuple(loss.shape)}")


def functional_forward(
    model: nn.Module, fast: Mapping[str, Tensor], x: Tensor, buffers: Mapping[str, Tensor] | None = None
) -> Tensor:
    """Run ``model`` on ``x`` with the tensors of ``fast`` in place of its own (others are the module's own)."""
    tensors = dict(fast) if buffers is None else {**buffers, **fast}
    return functional_call(model, tensors, (x,), strict=False)


def adapt(
    model: nn.Module,
    params: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    *,
    steps: int = 1,
    lr: StepLearningRates = 0.4,
    first_order: bool = False,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    loss_scale: float = 1.0,
    buffers: Mapping[str, Tensor] | None = None,
    rule: UpdateRule | None = None,
    trace: list[Tensor] | None = None,
) -> dict[str, Tensor]:
    """Adapt the tensors ``params`` of ``model`` to one task's support set.

    ``params`` names a subset of the model's parameters (all of them for MAML, the head's for ANIL);
    the others keep the module's own values and are used as they are. The inner loss is
    ``loss_fn(model(support_x), support_y)`` with the module run through ``functional_call``.

    Args:
        model: the network; never modified.
        params: the tensors to adapt, keyed by their names in ``model.named_parameters()``.
        support_x: support inputs of one task ``(examples, *x_shape)``.
        support_y: support targets ``(examples,)`` (or whatever ``loss_fn`` takes).
        steps: inner steps.
        lr: inner rate: scalar, per tensor or per element, or one of those per step (see :func:`gradient_steps`).
        first_order: FOMAML (no second-order graph).
        loss_fn: inner loss, mean-reduced (cross-entropy by default). With a mean over all support examples, ``lr``
            is ``ways`` times the rate of the original MAML code, which divides the summed loss by the shots only.
        loss_scale: inner loss scale for fp16 autocast (see :func:`gradient_steps`).
        buffers: optional buffer overrides passed to ``functional_call``.
        rule: an :class:`~lightning_meta.optim.UpdateRule` as the inner optimizer (see :func:`gradient_steps`).
        trace: a list that receives the support loss at the start of every step (see :func:`gradient_steps`).

    Returns:
        The adapted tensors, to run with :func:`functional_forward`.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> x, y = torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 0, 1])
        >>> fast = adapt(net, dict(net.named_parameters()), x, y, steps=2, lr=0.5)
        >>> sorted(fast), functional_forward(net, fast, x).shape
        (['bias', 'weight'], torch.Size([6, 2]))
    """
    known = dict(model.named_parameters())
    unknown = [n for n in params if n not in known]
    if unknown:
        raise KeyError(f"{unknown} are not parameters of {type(model).__name__}; known names: {sorted(known)[:8]}...")

    def objective(fast: dict[str, Tensor]) -> Tensor:
        return loss_fn(functional_forward(model, fast, support_x, buffers), support_y)

    return gradient_steps(
        objective, params, steps=steps, lr=lr, first_order=first_order, loss_scale=loss_scale, rule=rule, trace=trace
    )
