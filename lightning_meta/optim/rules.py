"""Update rules: the interface every learned (or hand-designed) optimizer implements, a registry, and Adam.

An :class:`UpdateRule` is an ``nn.Module`` whose weights are the meta-parameters. It maps one parameter
tensor, its gradient and its optimizer state to the new parameter and state, coordinate-wise with shared
weights, so one rule serves any model size. ``update`` is pure: it never writes into its inputs, it is
differentiable with respect to the rule's weights (truncated backprop through an unrolled inner loop) and it
runs under ``torch.no_grad`` for deployment (:class:`~lightning_meta.optim.RuleOptimizer`).

Batched problems: meta-training runs many independent inner problems at once by stacking them along
``batch_dims`` leading dimensions. Every per-tensor statistic (feature normalisation, update RMS) is taken per
problem, over the remaining dimensions, so a batched call equals a loop over problems.

Steps are counted from 1: ``step`` is the index of the update being computed (the first call gets ``step=1``),
as in ``torch.optim.Adam``'s bias correction.

Adam: Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, arXiv:1412.6980.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from typing import Any, ClassVar, TypeVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

__all__ = [
    "AdamRule",
    "State",
    "UpdateRule",
    "check_rule_record",
    "get_rule",
    "list_rules",
    "register_rule",
    "rule_fingerprint",
    "rule_hash",
    "rule_record",
    "zeros_state",
]

State = dict[str, Tensor]


class UpdateRule(nn.Module):
    """Base class of update rules; subclasses set the class attributes and implement the two methods.

    Attributes:
        name: registry name (``get_rule(name)``), recorded in optimizer checkpoints.
        version: bumped whenever the meaning of the weights or the state changes; recorded in checkpoints.
        needs_loss: ``update`` reads the current (scalar, rank-averaged) training loss.
        needs_horizon: ``update`` reads the planned total number of steps.
        uses_lr: the step is proportional to the ``lr`` argument (so LR schedulers act on it). Rules whose
            step size is entirely learned ignore ``lr``.
        relative_lr: the rule sets its own step size and reads ``lr`` as a dimensionless multiplier (1 = the rule's
            own step). :class:`~lightning_meta.optim.RuleOptimizer` then hands it each group's lr divided by the
            optimizer's reference lr (the largest initial lr of its groups), so LR schedulers and per-group ratios
            act on it while the lr's absolute size does not matter.
    """

    name: ClassVar[str]
    version: ClassVar[int]
    needs_loss: ClassVar[bool] = False
    # Not ClassVar: a rule may decide per instance (``Celo2Rule(horizon_schedule=False)`` needs no horizon).
    needs_horizon: bool = False
    uses_lr: ClassVar[bool] = True
    relative_lr: bool = False
    # The keyword arguments ``get_rule`` built the rule with (for ``save_pretrained``); set only by ``get_rule``.
    init_kwargs: dict[str, object]

    def lr_multiplier(self, step: int, horizon: int | None) -> float:
        """The factor by which the rule's own schedule scales ``lr`` at ``step`` (1.0 for rules without one).

        :class:`~lightning_meta.optim.RuleOptimizer` scales a group's decoupled weight decay by it, so decay anneals
        with the step as in AdamW under a schedule.
        """
        return 1.0

    def without_schedule(self) -> UpdateRule:
        """This rule with its own step schedule switched off (a copy sharing nothing), or ``self`` if it has none.

        Used when a user's LR scheduler already drives the learning rate, so two schedules do not stack.
        """
        return self

    def init_state(self, param: Tensor, *, batch_dims: int = 0) -> State:
        """Fresh optimizer state for ``param``: a dict of float32 tensors on ``param``'s device."""
        raise NotImplementedError

    def update(
        self,
        param: Tensor,
        grad: Tensor,
        state: State,
        *,
        lr: float | Tensor,
        step: int | Tensor,
        horizon: int | None = None,
        loss: Tensor | None = None,
        batch_dims: int = 0,
    ) -> tuple[Tensor, State]:
        """One update of ``param`` given its gradient; returns ``(new_param, new_state)`` and changes nothing.

        Args:
            param: the current parameter (float32; the optimizer upcasts low-precision parameters).
            grad: its gradient, same shape.
            state: the state from :meth:`init_state` or the previous ``update``.
            lr: learning rate (ignored by rules with ``uses_lr = False``).
            step: index of this update, counted from 1.
            horizon: planned total number of updates (required by rules with ``needs_horizon``).
            loss: current training loss, a scalar or one per problem (required by rules with ``needs_loss``).
            batch_dims: leading dims of ``param`` that index independent problems.
        """
        raise NotImplementedError

    def update_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[State],
        *,
        lr: float | Tensor,
        step: int,
        horizon: int | None = None,
        loss: Tensor | None = None,
    ) -> None:
        """Deployment update, in place: overwrites each ``params[i]`` and the entries of ``states[i]``.

        All tensors are at the same ``step`` and share ``lr``; there are no batch dims and no autograd.
        The default loops over :meth:`update`. A rule may override it with a faster equivalent (fused
        multi-tensor moments, preallocated buffers); :meth:`update` stays the definition of the math and a test
        checks that both agree. An override may put new tensors into ``states[i]``: callers read them back.
        """
        for param, grad, state in zip(params, grads, states):
            new_param, new_state = self.update(param, grad, state, lr=lr, step=step, horizon=horizon, loss=loss)
            param.copy_(new_param)
            state.update(new_state)

    def forward(self, *args: object, **kwargs: object) -> tuple[Tensor, State]:
        """Same as :meth:`update`, so ``torch.func.functional_call(rule, weights, args, kwargs)`` works."""
        return self.update(*args, **kwargs)  # type: ignore[arg-type]

    def config(self) -> dict[str, Any]:
        """The settings that, with the weights, determine the update: the constructor's arguments, as JSON values.

        The default reads each keyword of ``__init__`` from the attribute of the same name (every built-in rule
        keeps its arguments so; a setting changed after construction, e.g. by :meth:`without_schedule`, is read as
        it is now), else from ``init_kwargs`` when :func:`get_rule` recorded it. A rule that keeps an argument
        under another name, or has settings that are not constructor arguments, overrides this. Tuples become
        lists; values JSON cannot hold are written as their ``repr``.
        """
        return _as_json(self._settings())

    def replace(self, **changes: Any) -> UpdateRule:
        """A copy of this rule with some of its constructor's settings changed and the same weights, as
        :func:`dataclasses.replace` does for a dataclass: ``load_pretrained("default").replace(vector_min_rms=1.0)``.

        The constructor checks the new values, so a setting out of range fails here rather than at the first step.
        The copy shares no tensors with this rule, is on its device and in its dtype and train/eval mode, keeps
        :func:`rule_hash` (the weights) and has another :func:`rule_fingerprint` when a setting changed. Changing a
        setting that shapes the weights (an MLP's ``hidden_size``) is refused: start from :func:`get_rule` instead.

        Raises:
            TypeError: a name that is not a setting of this rule (the message lists its settings).
            ValueError: a value the constructor refuses, or a change of the weights' shapes.
        """
        settings = self._settings()
        unknown = sorted(set(changes) - set(settings))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no setting {unknown}; its settings are {sorted(settings)}")
        merged = {**settings, **changes}
        rule = type(self)(**merged)
        reference = next(self.parameters(), None)
        if reference is not None:  # on this rule's device and in its dtype (load_state_dict copies values only)
            rule = rule.to(device=reference.device, dtype=reference.dtype)
        try:
            rule.load_state_dict(self.state_dict())
        except RuntimeError as error:
            raise ValueError(
                f"replace({', '.join(f'{k}={v!r}' for k, v in changes.items())}) changes the shapes of the rule's "
                f"weights, so they cannot carry over; build a fresh rule with get_rule instead ({error})"
            ) from None
        rule.init_kwargs = merged
        return rule.train(self.training)

    def _settings(self) -> dict[str, Any]:
        """:meth:`config` before its conversion to JSON values: the constructor's arguments as this rule holds them."""
        recorded = getattr(self, "init_kwargs", {})
        values: dict[str, Any] = {}
        for name, parameter in inspect.signature(type(self).__init__).parameters.items():
            if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            if name in vars(self) or name in type(self).__dict__:
                value = getattr(self, name)
                if not callable(value):
                    values[name] = value
                    continue
            if name in recorded:
                values[name] = recorded[name]
        return values

    def extra_repr(self) -> str:
        return f"name={self.name!r}, version={self.version}"


_RULES: dict[str, type[UpdateRule]] = {}
DEFAULT_RULE = "celo2"
R = TypeVar("R", bound=type[UpdateRule])


def register_rule(cls: R) -> R:
    """Class decorator adding an :class:`UpdateRule` subclass to the registry under ``cls.name``."""
    if not issubclass(cls, UpdateRule):
        raise TypeError(f"{cls!r} is not an UpdateRule subclass; derive from lightning_meta.optim.UpdateRule")
    if cls.name in _RULES and _RULES[cls.name] is not cls:
        raise ValueError(f"an update rule named {cls.name!r} is already registered ({_RULES[cls.name]!r}); rename it")
    _RULES[cls.name] = cls
    return cls


def _ensure_builtin_rules() -> None:
    import lightning_meta.optim.celo2  # noqa: F401  (registers celo2)
    import lightning_meta.optim.learned_rules  # noqa: F401  (registers lstm, mlp)


def list_rules() -> list[str]:
    """Names accepted by :func:`get_rule` (besides ``"default"``)."""
    _ensure_builtin_rules()
    return sorted(_RULES)


def get_rule(name: str, **kwargs: object) -> UpdateRule:
    """Build a registered rule with its documented initialisation; ``"default"`` means ``"celo2"``.

    Pretrained weights are loaded by :func:`lightning_meta.optim.load_pretrained`, not here.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    _ensure_builtin_rules()
    key = DEFAULT_RULE if name == "default" else name
    if key not in _RULES:
        raise ValueError(f"unknown update rule {name!r}; choose one of {['default', *sorted(_RULES)]}")
    rule = _RULES[key](**kwargs)
    rule.init_kwargs = dict(kwargs)  # recorded for save_pretrained
    return rule


def rule_hash(rule: nn.Module) -> str:
    """SHA-256 over the rule's ``state_dict`` (names, dtypes, shapes and bytes, in sorted name order): the weights.

    This is the ``sha256`` of shipped pretrained weights. It does not see the rule's class or settings; checkpoints
    record :func:`rule_fingerprint`, which does.
    """
    digest = hashlib.sha256()
    state = rule.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rule_fingerprint(rule: UpdateRule) -> str:
    """SHA-256 over everything that determines the rule's update: its class, registry name and version, its
    :meth:`~UpdateRule.config` (step-size mode, schedule, clamps, ...) and its weights (:func:`rule_hash`).

    Two rules with the same fingerprint compute the same update; a differently configured rule with the same weights
    has another fingerprint.
    """
    identity = {
        "class": type(rule).__qualname__,
        "name": rule.name,
        "version": rule.version,
        "config": rule.config(),
        "weights": rule_hash(rule),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def rule_record(rule: UpdateRule) -> dict[str, Any]:
    """What checkpoints record about the rule that wrote them (plain values, loadable with ``weights_only=True``).

    Keys: ``name``, ``version``, ``class``, ``config`` (:meth:`~UpdateRule.config`), ``hash``
    (:func:`rule_fingerprint`) and ``weights_hash`` (:func:`rule_hash`). :func:`check_rule_record` compares one
    with a rule.
    """
    return {
        "name": rule.name,
        "version": rule.version,
        "class": type(rule).__qualname__,
        "config": rule.config(),
        "hash": rule_fingerprint(rule),
        "weights_hash": rule_hash(rule),
    }


def _describe(record: dict[str, Any]) -> str:
    return f"{record.get('name')!r} version {record.get('version')} (rule hash {record.get('hash')})"


def check_rule_record(saved: dict[str, Any], rule: UpdateRule, *, saved_as: str, applied_by: str, fix: str) -> None:
    """Refuse ``saved`` (a :func:`rule_record` from a checkpoint) unless it describes a rule computing ``rule``'s
    update.

    Records written before the configuration was recorded (``name``, ``version`` and a weights-only ``hash``) are
    accepted with a warning when name, version and weights agree: their configuration cannot be checked.

    Args:
        saved: the checkpoint's record.
        rule: the rule that would continue from the checkpoint.
        saved_as: how the message introduces the saved rule, e.g. ``"this checkpoint was trained with"``.
        applied_by: who applies ``rule``, e.g. ``"the LearnedOptimizer"``.
        fix: what to do instead, appended to the message.

    Raises:
        ValueError: naming both hashes, the settings that differ (or the class, version, weights) and ``fix``.
    """
    mine = rule_record(rule)
    if "weights_hash" not in saved:  # the weights-only record of earlier versions
        legacy = {"name": mine["name"], "version": mine["version"], "hash": mine["weights_hash"]}
        if {key: saved.get(key) for key in legacy} != legacy:
            raise ValueError(
                f"{saved_as} rule {saved.get('name')!r} version {saved.get('version')} with weights hash "
                f"{saved.get('hash')} but {applied_by} applies {mine['name']!r} version {mine['version']} with weights hash "
                f"{mine['weights_hash']}; {fix}"
            )
        rank_zero_warn(
            f"{saved_as} rule {mine['name']!r} version {mine['version']}, recorded by an older lightning-meta with its "
            f"weights hash only ({saved.get('hash')}, which matches): its configuration cannot be checked. Resuming "
            f"with {type(rule).__name__}({mine['config']}); make sure that is how the run was started"
        )
        return
    if all(saved.get(key) == mine[key] for key in ("hash", "name", "version", "class")):
        return
    saved_config = saved.get("config") or {}
    added = _settings_added_at_default(saved_config, rule, mine["config"])
    if added and all(saved.get(key) == mine[key] for key in ("name", "version", "class", "weights_hash")):
        now = ", ".join(f"{key}={mine['config'][key]!r}" for key in sorted(added))
        rank_zero_warn(
            f"{saved_as} rule {mine['name']!r} version {mine['version']}, recorded before the setting(s) of {now} "
            "existed; they are at their defaults here, which computes the update the checkpoint was trained with"
        )
        return
    differences = [
        f"{label} {saved.get(key)!r} vs {mine[key]!r}"
        for key, label in (("class", "class"), ("name", "name"), ("version", "version"))
        if saved.get(key) != mine[key]
    ]
    differences += [
        f"{key} {saved_config.get(key, '<unset>')!r} vs {mine['config'].get(key, '<unset>')!r}"
        for key in sorted(set(saved_config) | set(mine["config"]))
        if saved_config.get(key, "<unset>") != mine["config"].get(key, "<unset>")
    ]
    if saved.get("weights_hash") != mine["weights_hash"]:
        differences.append(f"weights hash {saved.get('weights_hash')} vs {mine['weights_hash']}")
    raise ValueError(
        f"{saved_as} rule {_describe(saved)} but {applied_by} applies {_describe(mine)}; what differs (saved vs "
        f"here): {', '.join(differences) or 'unknown'}. {fix}"
    )


def _as_json(value: Any) -> Any:
    """``value`` as :meth:`UpdateRule.config` records it: JSON values, tuples as lists, the rest as ``repr``."""
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def _settings_added_at_default(saved_config: dict[str, Any], rule: UpdateRule, config: dict[str, Any]) -> set[str]:
    """The settings of ``config`` that ``saved_config`` lacks, when every other setting agrees and each of those is at
    its constructor default (a checkpoint from before the setting existed); empty otherwise."""
    if not saved_config or any(config.get(key, "<unset>") != value for key, value in saved_config.items()):
        return set()
    added = set(config) - set(saved_config)
    parameters = inspect.signature(type(rule).__init__).parameters
    for key in added:
        default = parameters[key].default if key in parameters else inspect.Parameter.empty
        if default is inspect.Parameter.empty:
            return set()
        if _as_json(default) != config[key]:
            return set()
    return added


def zeros_state(shape: torch.Size | tuple[int, ...], like: Tensor) -> Tensor:
    """An fp32 zero state tensor of ``shape`` on ``like``'s device (rule state stays fp32 for bf16 params)."""
    return torch.zeros(shape, dtype=torch.float32, device=like.device)


@register_rule
class AdamRule(UpdateRule):
    """Adam (or AdamW with ``decoupled_weight_decay=True``) as an update rule; it has no weights.

    Applied by :class:`~lightning_meta.optim.RuleOptimizer` it matches ``torch.optim.Adam`` step for step
    (same operations in the same order). Useful as a baseline and as the hand-designed reference in
    meta-training.

    Args:
        betas: decay rates of the first and second moment estimates.
        eps: added to the bias-corrected RMS in the denominator.
        weight_decay: L2 penalty added to the gradient, or with ``decoupled_weight_decay`` a decay of the
            parameter by ``lr * weight_decay`` per step.
        decoupled_weight_decay: AdamW-style decay (Loshchilov & Hutter, arXiv:1711.05101).
    """

    name = "adam"
    version = 1

    def __init__(
        self,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
    ) -> None:
        super().__init__()
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas={betas} must lie in [0, 1)")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"eps={eps} and weight_decay={weight_decay} must be >= 0")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.decoupled_weight_decay = bool(decoupled_weight_decay)

    def init_state(self, param: Tensor, *, batch_dims: int = 0) -> State:
        return {"exp_avg": zeros_state(param.shape, param), "exp_avg_sq": zeros_state(param.shape, param)}

    def update(
        self,
        param: Tensor,
        grad: Tensor,
        state: State,
        *,
        lr: float | Tensor,
        step: int | Tensor,
        horizon: int | None = None,
        loss: Tensor | None = None,
        batch_dims: int = 0,
    ) -> tuple[Tensor, State]:
        beta1, beta2 = self.betas
        if self.weight_decay:
            if self.decoupled_weight_decay:
                param = param * (1 - lr * self.weight_decay)
            else:
                grad = grad.add(param, alpha=self.weight_decay)
        exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
        exp_avg_sq = torch.addcmul(state["exp_avg_sq"] * beta2, grad, grad, value=1 - beta2)
        if isinstance(lr, Tensor) or isinstance(step, Tensor):
            step_t = torch.as_tensor(step, dtype=torch.float32, device=param.device)
            bias_correction1 = 1 - beta1**step_t
            denom = exp_avg_sq.sqrt() / (1 - beta2**step_t).sqrt() + self.eps
            new_param = param - (lr / bias_correction1) * exp_avg / denom
        else:
            scalar_correction1 = 1 - beta1**step
            bias_correction2_sqrt = math.sqrt(1 - beta2**step)
            denom = exp_avg_sq.sqrt().div(bias_correction2_sqrt).add(self.eps)  # out of place: differentiable
            new_param = torch.addcdiv(param, exp_avg, denom, value=-lr / scalar_correction1)
        return new_param, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    def extra_repr(self) -> str:
        return (
            f"betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay}, "
            f"decoupled_weight_decay={self.decoupled_weight_decay}"
        )
