"""The validation protocol (``bench_lopt_validation.py``) with step-size variants that the package does not ship.

Each variant wraps a candidate spec of ``bench_lopt_validation.py`` (``SPEC``: e.g. ``pretrained:default`` or a
``prodigy:...`` spec) and changes one thing, so that an idea can be scored by the protocol before it is built into
the rule's fast paths:

``pooled:SPEC`` / ``pooled-matrices:SPEC``
    Prodigy's distance estimate shared by all tensors of a model (all, or the matrices only; the other tensors keep
    their own), as in Prodigy itself, in units of each tensor's scale ``σ = d₀ / prodigy_d0``: after every step
    ``d_i = σ_i · D`` with ``D = max(D, Σ_i (r_i / σ_i) / Σ_i ‖s_i‖₁)`` per problem (the per-tensor ``r`` and ``s``
    are kept as the rule computes them; a tensor of scale ``σ`` is a unit-scale tensor in ``x / σ``).
``global:SPEC``
    one step size for the whole model, in absolute units, as Adam's lr and Prodigy's own estimate are: every tensor
    (matrices, biases) starts from ``prodigy_d0 · σ``, ``σ`` the RMS over all the matrices' entries at
    initialisation (floored at ``min_rms``), instead of from ``prodigy_d0`` times its own RMS, and after every step
    all take ``D = max(D, Σ_i r_i / Σ_i ‖s_i‖₁)`` over the model's tensors.
``scale:KIND:FACTOR:SPEC``
    the learning rate times ``FACTOR`` on one kind of tensor: ``all``, ``matrices``, ``vectors`` (1-D), ``output``
    (matrices with one output column, the last layer of a scalar regression) or ``hidden`` (the other matrices). A
    diagnostic: which tensors' step a task wants larger.
``uncorrected:SPEC``
    Adam's moments without bias correction (Prodigy-Adam's default), so the first steps are larger: ``m / sqrt(v)``
    is ``(1 − β₁ᵗ) / sqrt(1 − β₂ᵗ)`` times the corrected ratio (3.2× at step 1, 6.5× at 10, 2.3× at 200). The rule's
    schedule is applied here and the rule is called at a step so large that its corrections are 1.
``tail:START:FLOOR:SPEC``
    a harder anneal at the end: from the fraction ``START`` of the planned horizon on, the learning rate is also
    multiplied by ``FLOOR ** ((τ − START) / (1 − START))``, down to ``FLOOR`` at the horizon.
``horizon:ALPHA:REFERENCE:SPEC``
    a step that scales with the planned number of steps ``T``: the learning rate times ``(T / REFERENCE) ** −ALPHA``.
``loss-driven:WINDOW:DELTA:UP:DOWN:LOW:HIGH:SPEC``
    a "bold driver" multiplier on every tensor's estimate: after each ``WINDOW`` steps the mean training loss is
    compared with the previous window's; a fall by more than ``DELTA`` (relative) multiplies the estimate by ``UP``,
    a rise by ``DOWN``; the product stays in ``[LOW, HIGH]``.
``loss-trend:KAPPA:FAST:SLOW:HIGH:SPEC``
    a multiplier on every tensor's estimate that grows while the loss falls: exponential averages of the log loss
    with decays ``FAST`` and ``SLOW``; every step it is multiplied by ``exp(KAPPA · max(0, slow − fast))``, up to
    ``HIGH``.
``schedule-free:BETA:INNER_BETA1:POWER:SPEC``
    Schedule-Free (Defazio et al. 2024, arXiv:2405.15682) around the rule: the rule steps a sequence ``z`` at a
    constant learning rate (its own schedule off, its momentum ``β₁`` set to ``INNER_BETA1``; ``-`` keeps it),
    ``x`` is the average of the ``z``'s weighted by ``t ** POWER`` times each step's squared learning rate (the lr
    times the estimate and gain the rule's step used; ``POWER`` 0 is the paper's weighting, a larger one forgets the
    early iterates faster), and the gradient (and the loss the protocol scores) is taken at
    ``y = (1 − BETA) z + BETA x``. The averaging, not a planned decay, is what brings the noise down at the end.
``schedule-free-cosine:BETA:INNER_BETA1:POWER:SPEC``
    the same with the rule's own schedule kept: its cosine decay of the lr as well as the average (whose weights
    leave the decay out, or the last iterates would hardly count).
``skip:FEATURE:SPEC``
    the direction of a matrix is one other normalised feature of celo2's four: ``0`` the gradient ``g``, ``1`` the
    momentum ``m``, ``2`` ``g · r`` or ``3`` ``m · r`` (the default's), ``r = 1 / sqrt(v̂ + eps²)``. With
    ``orthogonalize=true`` in ``SPEC``, ``skip:1:`` orthogonalises the momentum, as Muon (Jordan et al. 2024) does,
    and the default's ``3`` orthogonalises Adam's direction.
``cosine:SPEC``
    the learning rate times the cosine ``0.5 · (1 + cos(π τ))``, ``τ = (step − 1) / horizon``, the baselines' schedule
    exactly (``bench_lopt_quality.run_population``'s ``"cosine"``). With the base candidate ``adam`` (Adam, whose lr
    the protocol tunes on the baselines' grid), ``cosine:adam`` is the tuned cosine Adam baseline itself, and a
    variant around it, e.g. ``scale:vectors:0.1:cosine:adam``, is that baseline with one change: a diagnostic of
    which of the rule's departures from Adam a task pays for.
``magnitude:EXTRA:RAMP:SPEC``
    a matrix's step also times ``a ** EXTRA`` (``RAMP`` 0), or ``a ** (EXTRA · τ)`` (``RAMP`` 1: from nothing at the
    start to all of it at the planned horizon), ``a`` the RMS of Adam's update ``m̂ / sqrt(v̂ + eps²)`` after this
    step's moments, which the rule's ``magnitude_power`` already follows: a harder anneal where the gradients are
    mostly noise, and none where they agree.
``leaky-gain:DECAY:SPEC``
    the hypergradient gain forgets: after every step each tensor's log gain ``h`` is multiplied by ``1 − DECAY``, so
    it follows the recent agreement of consecutive gradients (``h ≈ κ c / DECAY`` under a steady cosine ``c``)
    instead of summing it over the whole run, and the step grows back once the oscillation that shrank it stops.
``gated-gain:ALPHA:SPEC``
    the hypergradient gain may not fall while the loss still falls like a power law of the step: at step ``t`` (from
    8 on) the local exponent ``(mean log loss over steps [t/4, t/2) − over [t/2, t)) / log 2`` is read per problem,
    and where it exceeds ``ALPHA`` every tensor's log gain keeps the larger of its new and its previous value. A
    loss that keeps falling (a realisable regression) keeps its step; one at its noise floor (a classifier with
    label noise, a noisy quadratic) anneals by the gain as before.
``away-gain:THRESHOLD:SPEC``
    the hypergradient gain may not fall while the gradients still point away from the initial weights: where
    Prodigy's ratio pooled over the model's tensors, ``Σ_i r_i / Σ_i ‖s_i‖₁``, exceeds ``THRESHOLD`` (per problem;
    ``r`` and ``s`` as the rule keeps them, positive while the weights still travel from ``x₀``), every tensor's log
    gain keeps the larger of its new and its previous value. A task whose solution lies far from the initialisation
    keeps its step; one whose gradients pull back towards it anneals by the gain as before.
``ratchet-gain:START:SPEC``
    from the fraction ``START`` of the planned horizon on, the hypergradient gain may fall but not rise: after every
    step each tensor's log gain keeps the smaller of its new and its previous value. Tried because on the noisy
    quadratic the gain climbs back late in a run, where the steps are small and consecutive gradients agree again.
``mechanic:S_INIT:WEIGHT_DECAY:SPEC``
    Mechanic (Cutkosky, Defazio and Mehta 2023, arXiv:2306.00144) around the rule: one learned scale ``s`` per
    problem for the whole model, ``x = x₀ + s · Δ`` with ``Δ`` the sum of the rule's own steps (taken at ``x``, at
    lr multiplier 1: for ``cosine:adam`` that is Adam at a peak lr of 1, as Mechanic's authors run it). ``s`` is the
    sum of six coin-betting scales with decays ``1 − 10^−i``, ``i = 1 … 6``, betting on ``h = −⟨g + λ s ‖g‖ x / ‖x‖,
    Δ⟩`` (``λ`` = ``WEIGHT_DECAY``, their default 0.01; ``h`` clipped to the running maximum of ``|h|``), each
    starting at ``S_INIT / 6``. The protocol runs it untuned, as it runs the rule: the scale is what it learns.

Usage (the candidates' rows are added to a record of the same seeds with ``--previous``)::

    P=prodigy:0.1:0.1:0.05:0:final_fraction=0:warmup_fraction=0:magnitude_power=1:update_rms=0.6:prodigy_beta3=0.99
    python benchmarks/bench_lopt_variants.py --threads 1 --seed-base 7012 --candidate G=pooled:$P:prodigy_d0=0.1 \\
        --previous docs/bench/learned_optimizer_validation_d0_7012.json --out /tmp/variants
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lopt_validation as validation  # noqa: E402
from bench_lopt_quality import cosine_factor  # noqa: E402

from lightning_meta.optim.rules import UpdateRule, get_rule  # noqa: E402

__all__ = ["load_variant", "local_exponent", "run_population"]

_plain_run_population = validation.run_population
_plain_load_candidate = validation.load_candidate
_KINDS = ("all", "matrices", "vectors", "output", "hidden")
OnStep = Callable[[int, Tensor, dict[str, Tensor], dict[str, dict[str, Tensor]]], None]
Factor = Callable[[Tensor, Tensor, dict[str, Tensor], dict[str, Any]], Any]  # (param, grad, state, other kwargs)


def _per_problem(x: Tensor, like: Tensor) -> Tensor:
    """``x`` of shape ``(problems,)`` shaped to broadcast over ``like`` ``(problems, ...)``."""
    return x.reshape((-1,) + (1,) * (like.ndim - 1)).to(like.dtype)


def _rescale_estimates(state: dict[str, dict[str, Tensor]], ratio: Tensor) -> None:
    """Every tensor's step-size estimate times ``ratio`` ``(problems,)``."""
    for s in state.values():
        s["estimate"] = s["estimate"] * _per_problem(ratio, s["estimate"])


def _prodigy_terms(s: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """A tensor's Prodigy ``r`` and ``‖s‖₁``, one float64 number per problem."""
    dims = tuple(range(1, s["grad_sum"].ndim))
    l1 = s["grad_sum"].abs().sum(dims).double() * s["grad_sum_scale"].reshape(-1).double()
    return s["numerator"].reshape(-1).double(), l1


def _grown(previous: Tensor, numerator: Tensor, l1: Tensor) -> Tensor:
    """Prodigy's ``max(D, r / ‖s‖₁)`` over pooled sums (``D`` kept where the ratio is not finite)."""
    ratio = numerator / l1.clamp_min(1e-30)
    return torch.where(torch.isfinite(ratio), torch.maximum(previous, ratio), previous)


def _pooling(rule: Any, matrices_only: bool) -> OnStep:
    held: dict[str, Tensor] = {}

    def pool(step: int, loss: Tensor, params: dict[str, Tensor], state: dict[str, dict[str, Tensor]]) -> None:
        names = [k for k, p in params.items() if not matrices_only or p.ndim - 1 >= 2]
        sigmas = {k: state[k]["step_scale"] / rule.prodigy_d0 for k in names}  # each tensor's scale
        numerator = l1 = torch.zeros(loss.shape[0], dtype=torch.float64)
        for k in names:
            r, s_l1 = _prodigy_terms(state[k])
            numerator, l1 = numerator + r / sigmas[k].reshape(-1).double(), l1 + s_l1
        estimate = _grown(held.get("D", torch.full_like(numerator, rule.prodigy_d0)), numerator, l1)
        held["D"] = estimate
        for k in names:
            state[k]["estimate"] = sigmas[k] * _per_problem(estimate, state[k]["estimate"])

    return pool


def _globalising(rule: Any) -> OnStep:
    held: dict[str, Tensor] = {}

    def start(params: dict[str, Tensor], state: dict[str, dict[str, Tensor]]) -> None:
        matrices = [p for p in params.values() if p.ndim - 1 >= 2]
        total = sum(p.detach().double().pow(2).flatten(1).sum(1) for p in matrices)
        count = sum(p[0].numel() for p in matrices)
        sigma = (total / count).sqrt().clamp_min(rule.min_rms)  # (problems,): the model's weight scale
        held["D"] = rule.prodigy_d0 * sigma
        for s in state.values():
            s["step_scale"] = _per_problem(held["D"], s["step_scale"])
            s["estimate"] = s["step_scale"].clone()

    def pool(step: int, loss: Tensor, params: dict[str, Tensor], state: dict[str, dict[str, Tensor]]) -> None:
        numerator = l1 = torch.zeros(loss.shape[0], dtype=torch.float64)
        for s in state.values():
            r, s_l1 = _prodigy_terms(s)
            numerator, l1 = numerator + r, l1 + s_l1
        held["D"] = _grown(held["D"], numerator, l1)
        for s in state.values():
            s["estimate"] = _per_problem(held["D"], s["estimate"])

    pool.on_start = start  # type: ignore[attr-defined]
    return pool


def _driving(window: int, delta: float, up: float, down: float, low: float, high: float) -> OnStep:
    held: dict[str, Any] = {"sum": 0.0, "n": 0, "previous": None, "product": None}

    def drive(step: int, loss: Tensor, params: dict[str, Tensor], state: dict[str, dict[str, Tensor]]) -> None:
        held["sum"], held["n"] = held["sum"] + loss.double(), held["n"] + 1
        if held["n"] < window:
            return
        mean = held["sum"] / held["n"]
        held["sum"], held["n"] = 0.0, 0
        previous, held["previous"] = held["previous"], mean
        if previous is None:
            return
        product = held["product"] if held["product"] is not None else torch.ones_like(mean)
        ratio = mean / previous
        factor = torch.where(ratio < 1 - delta, up, torch.where(ratio > 1, down, 1.0))
        factor = torch.where(torch.isfinite(ratio), factor, down)
        new = (product * factor).clamp(low, high)
        held["product"] = new
        _rescale_estimates(state, new / product)

    return drive


def _trending(kappa: float, fast: float, slow: float, high: float) -> OnStep:
    held: dict[str, Any] = {}

    def trend(step: int, loss: Tensor, params: dict[str, Tensor], state: dict[str, dict[str, Tensor]]) -> None:
        log_loss = torch.log(loss.double().clamp_min(1e-30))
        if "fast" not in held:
            held["fast"], held["slow"], held["product"] = log_loss, log_loss.clone(), torch.ones_like(log_loss)
            return
        held["fast"] = fast * held["fast"] + (1 - fast) * log_loss
        held["slow"] = slow * held["slow"] + (1 - slow) * log_loss
        falling = (held["slow"] - held["fast"]).clamp_min(0.0)
        falling = torch.where(torch.isfinite(falling), falling, 0.0)
        new = (held["product"] * torch.exp(kappa * falling)).clamp(max=high)
        _rescale_estimates(state, new / held["product"])
        held["product"] = new

    return trend


def _leaking(decay: float) -> OnStep:
    def leak(step: int, loss: Tensor, params: dict[str, Tensor], state: dict[str, dict[str, Tensor]]) -> None:
        for s in state.values():
            s["log_gain"] = s["log_gain"] * (1.0 - decay)

    return leak


def local_exponent(sums: list, step: int) -> Any:
    """The loss's local power-law exponent at ``step`` (from 4 on): ``(mean log loss over steps [t/4, t/2) − over
    [t/2, t)) / log 2``, from ``sums[i]``, the sum of the first ``i`` log losses (a float or one per problem). A loss
    ``∝ t^−α`` reads about ``α``; one at its floor, about 0."""
    quarter, half = step // 4, step // 2
    early = (sums[half] - sums[quarter]) / (half - quarter)
    late = (sums[step] - sums[half]) / (step - half)
    return (early - late) / math.log(2)


Condition = Callable[[int, Tensor, dict[str, dict[str, Tensor]]], Tensor | None]  # (step, loss, state) -> (problems,)


def _holding(condition: Condition, keep: Callable[[Tensor, Tensor], Tensor] = torch.maximum) -> OnStep:
    """A hook that holds every tensor's log gain where ``condition(step, loss, state)`` is true (per problem; None:
    nowhere): it keeps ``keep`` (by default the larger) of the gain the rule left and the one before this step."""
    held: dict[str, Any] = {"gains": None}

    def hold(step: int, loss: Tensor, params: dict[str, Tensor], state: dict[str, dict[str, Tensor]]) -> None:
        where, previous = condition(step, loss, state), held["gains"]
        if where is not None and previous is not None:
            for k, s in state.items():
                mask = where.reshape((-1,) + (1,) * (s["log_gain"].ndim - 1))
                s["log_gain"] = torch.where(mask, keep(s["log_gain"], previous[k]), s["log_gain"])
        held["gains"] = {k: s["log_gain"].clone() for k, s in state.items()}

    return hold


def _still_falling(alpha: float) -> Condition:
    """From step 8 on, where the loss's local power-law exponent exceeds ``alpha``."""
    sums: list = [0.0]  # cumulative sums of the log losses

    def falling(step: int, loss: Tensor, state: dict[str, dict[str, Tensor]]) -> Tensor | None:
        sums.append(sums[-1] + torch.log(loss.double().clamp_min(1e-30)))
        return local_exponent(sums, step) > alpha if step >= 8 else None

    return falling


def _travelling_away(threshold: float) -> Condition:
    """Where Prodigy's ratio pooled over the model's tensors exceeds ``threshold``."""

    def away(step: int, loss: Tensor, state: dict[str, dict[str, Tensor]]) -> Tensor | None:
        numerator = l1 = torch.zeros(loss.shape[0], dtype=torch.float64)
        for s in state.values():
            r, s_l1 = _prodigy_terms(s)
            numerator, l1 = numerator + r, l1 + s_l1
        return numerator / l1.clamp_min(1e-30) > threshold

    return away


def _past(rule: Any, start: float) -> Condition:
    """Every problem, from the fraction ``start`` of the planned horizon on (``rule._tau``, set by
    ``_recording_tau``'s update)."""

    def past(step: int, loss: Tensor, state: dict[str, dict[str, Tensor]]) -> Tensor | None:
        return torch.ones(loss.shape[0], dtype=torch.bool) if rule._tau >= start else None

    return past


def _recording_tau(rule: Any) -> None:
    """Wraps ``rule.update``: keeps the fraction of the planned horizon done at this step as ``rule._tau``."""
    plain = rule.update

    def update(param: Tensor, grad: Tensor, state: dict[str, Tensor], *, lr: Any, **kwargs: Any) -> Any:
        rule._tau = _tau(kwargs)
        return plain(param, grad, state, lr=lr, **kwargs)

    rule.update = update


def _scale_lr(rule: UpdateRule, factor: Factor) -> None:
    """Wraps ``rule.update``: the lr times ``factor(param, grad, state, the other keyword arguments)``."""
    plain = rule.update

    def update(param: Tensor, grad: Tensor, state: dict[str, Tensor], *, lr: Any, **kwargs: Any) -> Any:
        return plain(param, grad, state, lr=lr * factor(param, grad, state, kwargs), **kwargs)

    rule.update = update  # type: ignore[method-assign]


def _tau(kwargs: dict[str, Any]) -> float:
    """The fraction of the planned horizon done at this step (at most 1)."""
    return min(float(kwargs["step"]) / float(kwargs["horizon"]), 1.0)


def _kind_factor(kind: str, factor: float) -> Factor:
    def of(param: Tensor, grad: Tensor, state: dict[str, Tensor], kwargs: dict[str, Any]) -> float:
        shape = param.shape[kwargs.get("batch_dims", 0) :]
        matrix = len(shape) >= 2
        output = matrix and shape[-1] == 1
        hit = {
            "all": True,
            "matrices": matrix,
            "vectors": not matrix,
            "output": output,
            "hidden": matrix and not output,
        }
        return factor if hit[kind] else 1.0

    return of


def _cosine_factor(param: Tensor, grad: Tensor, state: dict[str, Tensor], kwargs: dict[str, Any]) -> float:
    """The baselines' cosine (``run_population`` takes it before the step; here ``step`` counts from 1)."""
    return cosine_factor(int(kwargs["step"]) - 1, int(kwargs["horizon"]))


def _tail_factor(start: float, floor: float) -> Factor:
    def of(param: Tensor, grad: Tensor, state: dict[str, Tensor], kwargs: dict[str, Any]) -> float:
        return floor ** max(0.0, (_tau(kwargs) - start) / (1.0 - start))

    return of


def _add_hook(rule: Any, factory: Callable[[], OnStep]) -> None:
    """Gives ``rule`` a per-step hook; a variant wrapped around another keeps the inner one's and runs after it."""
    inner = getattr(rule, "_variant_hook", None)
    if inner is None:
        rule._variant_hook = factory
        return

    def both() -> OnStep:
        first, second = inner(), factory()

        def on_step(*args: Any) -> None:
            first(*args)
            second(*args)

        starts = [f.on_start for f in (first, second) if hasattr(f, "on_start")]  # type: ignore[attr-defined]

        def on_start(*args: Any) -> None:
            for start in starts:
                start(*args)

        if starts:
            on_step.on_start = on_start  # type: ignore[attr-defined]
        return on_step

    rule._variant_hook = both


def _uncorrected_update(rule: Any) -> None:
    plain, schedule = rule.update, rule.horizon_schedule
    rule.horizon_schedule = False  # applied here, at the real step

    def update(param: Tensor, grad: Tensor, state: dict[str, Tensor], *, lr: Any, step: Any, **kwargs: Any) -> Any:
        if schedule:
            lr = lr * rule.step_multiplier(step, kwargs.get("horizon"))
        return plain(param, grad, state, lr=lr, step=2**40, **kwargs)  # β**step underflows: corrections are 1

    rule.update = update


_FREE = ("sf_z", "sf_x", "sf_weight")


def _schedule_free_update(rule: Any, beta: float, power: float, *, keep_schedule: bool) -> None:
    plain = rule.update
    rule.horizon_schedule = rule.horizon_schedule and keep_schedule  # by default the average replaces the decay

    def update(param: Tensor, grad: Tensor, state: dict[str, Tensor], *, lr: Any, **kwargs: Any) -> Any:
        inner = {k: v for k, v in state.items() if k not in _FREE}
        z, x = state.get("sf_z", param), state.get("sf_x", param)
        # the step size the rule's step uses (Prodigy's d and the gain; the schedule's factor left out)
        effective = lr * inner.get("estimate", 1.0) * torch.exp(inner.get("log_gain", torch.zeros(())))
        weight = (
            torch.as_tensor(effective, dtype=param.dtype) ** 2
            * torch.as_tensor(kwargs["step"], dtype=param.dtype) ** power
        )
        total = state.get("sf_weight", torch.zeros_like(weight)) + weight
        new_z, new_state = plain(z, grad, inner, lr=lr, **kwargs)
        c = torch.where(total > 0, weight / torch.where(total > 0, total, 1.0), 1.0)
        new_x = x + c * (new_z - x)
        new_state |= {"sf_z": new_z, "sf_x": new_x, "sf_weight": total}
        return new_z + beta * (new_x - new_z), new_state

    rule.update = update


_MECHANIC_BETAS = tuple(1.0 - 0.1**i for i in range(1, 7))
_MECHANIC_EPS = 1e-8


def _base_step_only(rule: Any) -> None:
    """Wraps ``rule.update``: the weights are left as they are, the rule's step ``u`` and the gradient are kept in
    the state (``mech_u``, ``mech_g``) for ``_mechanizing``'s hook, which moves the weights."""
    plain = rule.update

    def update(param: Tensor, grad: Tensor, state: dict[str, Tensor], *, lr: Any, **kwargs: Any) -> Any:
        inner = {k: v for k, v in state.items() if not k.startswith("mech_")}
        new, new_state = plain(param, grad, inner, lr=lr, **kwargs)
        return param, new_state | {"mech_u": new - param, "mech_g": grad}

    rule.update = update  # type: ignore[method-assign]


def _mechanizing(s_init: float, weight_decay: float) -> OnStep:
    """Mechanic's scale per problem (dim 0 of every tensor), one for the whole model; see the module's docstring.
    ``Δ`` is kept, not recomputed as ``(x − x₀) / s``: while ``s`` is still tiny, float32 loses it there."""
    x0: dict[str, Tensor] = {}
    delta: dict[str, Tensor] = {}
    bet: dict[str, Tensor] = {}  # s, r, m, v: (problems, len(_MECHANIC_BETAS)); and the betas

    def per_problem(x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1).sum(1)

    def mechanize(step: int, loss: Tensor, params: dict[str, Tensor], state: dict[str, dict[str, Tensor]]) -> None:
        if not x0:  # the first step left the weights at x₀ (``_base_step_only``)
            x0.update({k: p.clone() for k, p in params.items()})
            delta.update({k: torch.zeros_like(p) for k, p in params.items()})
            first = next(iter(params.values()))
            bet["betas"] = torch.tensor(_MECHANIC_BETAS, dtype=torch.float64).to(first.dtype)
            bet["s"] = first.new_full((first.shape[0], len(_MECHANIC_BETAS)), s_init / len(_MECHANIC_BETAS))
            bet.update({k: torch.zeros_like(bet["s"]) for k in ("r", "m", "v")})
        grads = {k: state[k].pop("mech_g") for k in params}
        s_sum = bet["s"].sum(1)  # (problems,)
        grad_norm = torch.stack([per_problem(g**2) for g in grads.values()]).sum(0).sqrt()
        param_norm = torch.stack([per_problem(p**2) for p in params.values()]).sum(0).sqrt()
        decay = weight_decay * s_sum * grad_norm / (param_norm + _MECHANIC_EPS)
        h = torch.zeros_like(s_sum)
        for k, p in params.items():
            h = h - per_problem((grads[k] + _per_problem(decay, p) * p) * delta[k])  # −⟨g, Δ⟩: > 0 while Δ descends
        h, m, betas = h[:, None], bet["m"], bet["betas"]
        clipped = torch.maximum(torch.minimum(h, m), -m)
        bet["m"] = torch.maximum(betas * m, h.abs() + _MECHANIC_EPS)
        bet["v"] = betas**2 * bet["v"] + h**2
        bet["r"] = (betas * bet["r"] + clipped * bet["s"]).clamp_min(0.0)
        bet["s"] = (s_init / len(_MECHANIC_BETAS) * bet["m"] + bet["r"]) / (bet["v"].sqrt() + _MECHANIC_EPS)
        new_sum = bet["s"].sum(1)
        for k, p in params.items():
            delta[k] = delta[k] + state[k].pop("mech_u")
            params[k] = x0[k] + _per_problem(new_sum, p) * delta[k]
            state[k]["mech_scale"] = _per_problem(new_sum, p)  # for a trace (the rule's own step leaves it out)

    return mechanize


def _magnitude_factor(rule: Any, extra: float, ramp: bool) -> Factor:
    beta1, beta2 = rule.betas

    def of(param: Tensor, grad: Tensor, state: dict[str, Tensor], kwargs: dict[str, Any]) -> Any:
        batch_dims, step = kwargs.get("batch_dims", 0), float(kwargs["step"])
        if param.ndim - batch_dims < 2:  # 1-D tensors take AdamW's step, which has no such factor
            return 1.0
        m = torch.lerp(state["exp_avg"], grad, 1 - beta1)  # the moments the rule's step is about to use
        v = state["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad
        ratio = m * torch.rsqrt(v / (1 - beta2**step) + rule.eps**2) / (1 - beta1**step)
        a = ratio.pow(2).mean(tuple(range(batch_dims, param.ndim)), keepdim=True).sqrt()
        return a ** (extra * _tau(kwargs) if ramp else extra)

    return of


def _with_gain(spec: str, inner: str) -> Any:
    """The candidate ``inner`` of a variant ``spec`` that acts on the hypergradient gain, which it must have."""
    rule = load_variant(inner)
    if not getattr(rule, "relative_lr", False):
        raise ValueError(f"{spec!r}: this variant needs a rule with a hypergradient gain (relative_lr)")
    return rule


def load_variant(spec: str) -> UpdateRule:
    """A candidate of the protocol, or one of the variants above wrapped around one."""
    kind, _, rest = spec.partition(":")
    if kind in ("pooled", "pooled-matrices"):
        rule = load_variant(rest)
        if not getattr(rule, "prodigy", False):
            raise ValueError(f"{spec!r}: pooling needs a rule with step_size='prodigy'")
        matrices_only = kind == "pooled-matrices"
        _add_hook(rule, lambda: _pooling(rule, matrices_only))
        return rule
    if kind == "global":
        rule = load_variant(rest)
        if not getattr(rule, "prodigy", False):
            raise ValueError(f"{spec!r}: a global estimate needs a rule with step_size='prodigy'")
        _add_hook(rule, lambda: _globalising(rule))
        return rule
    if kind == "scale":
        which, factor, inner = rest.split(":", 2)
        if which not in _KINDS:
            raise ValueError(f"{spec!r}: KIND must be one of {_KINDS}")
        rule = load_variant(inner)
        _scale_lr(rule, _kind_factor(which, float(factor)))
        return rule
    if kind == "tail":
        start, floor, inner = rest.split(":", 2)
        if not (0.0 <= float(start) < 1.0 and 0.0 < float(floor) <= 1.0):
            raise ValueError(f"{spec!r}: use tail:START:FLOOR:SPEC with 0 <= START < 1 and 0 < FLOOR <= 1")
        rule = load_variant(inner)
        _scale_lr(rule, _tail_factor(float(start), float(floor)))
        return rule
    if kind == "horizon":
        alpha, reference, inner = rest.split(":", 2)
        if not float(reference) > 0:
            raise ValueError(f"{spec!r}: use horizon:ALPHA:REFERENCE:SPEC with REFERENCE > 0 steps")
        rule = load_variant(inner)
        ref, power = float(reference), float(alpha)
        _scale_lr(rule, lambda param, grad, state, kwargs: (float(kwargs["horizon"]) / ref) ** -power)
        return rule
    if kind == "uncorrected":
        rule = load_variant(rest)
        _uncorrected_update(rule)
        return rule
    if kind == "loss-driven":
        *fields, inner = rest.split(":", 6)
        if len(fields) != 6:
            raise ValueError(f"{spec!r}: use loss-driven:WINDOW:DELTA:UP:DOWN:LOW:HIGH:SPEC")
        rule = load_variant(inner)
        window, (delta, up, down, low, high) = int(fields[0]), map(float, fields[1:6])
        _add_hook(rule, lambda: _driving(window, delta, up, down, low, high))
        return rule
    if kind == "loss-trend":
        *fields, inner = rest.split(":", 4)
        if len(fields) != 4:
            raise ValueError(f"{spec!r}: use loss-trend:KAPPA:FAST:SLOW:HIGH:SPEC")
        rule = load_variant(inner)
        kappa, fast, slow, high = map(float, fields)
        _add_hook(rule, lambda: _trending(kappa, fast, slow, high))
        return rule
    if kind in ("schedule-free", "schedule-free-cosine"):
        beta, inner_beta1, power, inner = rest.split(":", 3)
        if not 0.0 <= float(beta) < 1.0 or (inner_beta1 != "-" and not 0.0 <= float(inner_beta1) < 1.0):
            raise ValueError(f"{spec!r}: use {kind}:BETA:INNER_BETA1:POWER:SPEC with 0 <= BETA, INNER_BETA1 < 1")
        rule = load_variant(inner)
        if inner_beta1 != "-":
            rule.betas = (float(inner_beta1), rule.betas[1])
        _schedule_free_update(rule, float(beta), float(power), keep_schedule=kind == "schedule-free-cosine")
        return rule
    if kind == "skip":
        index, inner = rest.split(":", 1)
        if index not in ("0", "1", "2", "3"):
            raise ValueError(f"{spec!r}: use skip:FEATURE:SPEC with FEATURE 0 (g), 1 (m), 2 (g·r) or 3 (m·r)")
        rule = load_variant(inner)
        with torch.no_grad():
            rule.skip.copy_(torch.nn.functional.one_hot(torch.tensor(int(index)), 4).to(rule.skip))
        return rule
    if kind == "cosine":
        rule = load_variant(rest)
        _scale_lr(rule, _cosine_factor)
        return rule
    if kind in ("leaky-gain", "ratchet-gain"):
        value, inner = rest.split(":", 1)
        name = "DECAY" if kind == "leaky-gain" else "START"
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{spec!r}: use {kind}:{name}:SPEC with 0 <= {name} <= 1")
        rule = _with_gain(spec, inner)
        if kind == "leaky-gain":
            _add_hook(rule, lambda: _leaking(float(value)))
        else:
            _recording_tau(rule)
            _add_hook(rule, lambda: _holding(_past(rule, float(value)), keep=torch.minimum))
        return rule
    if kind in ("gated-gain", "away-gain"):
        value, inner = rest.split(":", 1)
        rule = _with_gain(spec, inner)
        condition = _still_falling if kind == "gated-gain" else _travelling_away
        if kind == "away-gain" and not getattr(rule, "prodigy", False):
            raise ValueError(f"{spec!r}: an away-gated gain needs a rule with step_size='prodigy'")
        _add_hook(rule, lambda: _holding(condition(float(value))))
        return rule
    if kind == "mechanic":
        s_init, weight_decay, inner = rest.split(":", 2)
        if not (float(s_init) > 0 and float(weight_decay) >= 0):
            raise ValueError(f"{spec!r}: use mechanic:S_INIT:WEIGHT_DECAY:SPEC with S_INIT > 0, WEIGHT_DECAY >= 0")
        rule = load_variant(inner)
        _base_step_only(rule)
        rule.relative_lr = True  # the scale is learned: run untuned, at lr multiplier 1
        _add_hook(rule, lambda: _mechanizing(float(s_init), float(weight_decay)))
        return rule
    if spec == "adam":
        return get_rule("adam")
    if kind == "magnitude":
        extra, ramp, inner = rest.split(":", 2)
        if ramp not in ("0", "1"):
            raise ValueError(f"{spec!r}: use magnitude:EXTRA:RAMP:SPEC with RAMP 0 or 1")
        rule = load_variant(inner)
        _scale_lr(rule, _magnitude_factor(rule, float(extra), ramp == "1"))
        return rule
    return _plain_load_candidate(spec)


def run_population(family: Any, rule: UpdateRule, *args: Any, on_step: OnStep | None = None, **kwargs: Any) -> Tensor:
    """``bench_lopt_quality.run_population`` with a variant's per-step hook (a fresh one for every run)."""
    if on_step is None and hasattr(rule, "_variant_hook"):
        on_step = rule._variant_hook()
    if getattr(on_step, "on_start", None) is not None:
        kwargs.setdefault("on_start", on_step.on_start)  # type: ignore[union-attr]
    return _plain_run_population(family, rule, *args, on_step=on_step, **kwargs)


if __name__ == "__main__":
    validation.run_population = run_population
    validation.load_candidate = load_variant
    validation.main()
