"""Celo2-style update rule: a normalised direction MLP, a horizon-aware step schedule, AdamW on 1-D tensors.

After Celo/Celo2 (Moudgil et al., "Learning Versatile Optimizers on a Compute Diet", 2025, arXiv:2501.12670, and
its follow-up): a direction-only MLP whose step is RMS-normalised per tensor and multiplied by the user's learning
rate, with AdamW on 1-D parameters (biases, norm scales). Like Celo and VeLO (Metz et al. 2022, arXiv:2211.09760)
the rule knows the fraction of training done, ``tau = step / horizon``, and sets a scalar step multiplier from it.

Departures:

* Newton–Schulz orthogonalisation is off by default (``orthogonalize=True`` turns it on for matrices).
* A linear skip path initialised to Adam's direction ``m / sqrt(v + eps²)`` makes the untrained rule a
  per-tensor RMS-normalised Adam (eps inside the root, as in RMSprop: one ``rsqrt`` in the fast path).
* The schedule is ``base(tau) * exp(c . phi(tau))``: ``base`` is a fixed linear warm-up then cosine decay to
  ``final_fraction``, ``phi(tau) = (1, tau, cos(pi tau), sin(pi tau))`` and ``c`` is learned (initialised to 0),
  so the untrained rule anneals like a tuned cosine schedule and meta-training reshapes it. Celo learns the
  schedule with an LSTM over more features; four coefficients are what a few CPU-minutes of PES can fit.

:meth:`Celo2Rule.update` defines the math (pure, batched over problems, differentiable);
:meth:`Celo2Rule.update_` is the deployment fast path of :class:`~lightning_meta.optim.RuleOptimizer`: in place,
multi-tensor moments, one preallocated feature buffer, the feature normalisation folded into the first layer.
While the MLP's output layer is zero and one skip weight is nonzero (the initialisation, and so far every shipped
rule) the direction is that one normalised feature, and the fast path computes only it, without matrix products.
:meth:`Celo2Rule.compile_fast_path` (opt-in) runs it on contiguous matrices as two ``torch.compile``-fused kernels.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from lightning_meta.optim.functional import (
    coordinate_mlp,
    feature_dims,
    flatten_features,
    mean_square,
    newton_schulz,
    rsqrt_at_zero_safe,
    sqrt_at_zero_safe,
)
from lightning_meta.optim.rules import State, UpdateRule, register_rule, zeros_state

__all__ = ["Celo2Rule"]

_FAST_BLOCK = 1 << 17  # columns per matrix product in the fast path (best of 2^13..2^17 on a 1-thread AVX2 CPU)
# "prodigy": Prodigy's sum is kept as s = c · s̃; s̃ is rescaled (c reset to 1) once c falls below this, so that
# s̃ ~ s / c stays far from float32 overflow (every ~33,000 steps at the default β₃ = sqrt(0.999))
_GRAD_SUM_RENORMALISE_BELOW = 2.0**-24


def _takes_cpu_branch(tensor: Tensor) -> bool:
    """Whether the fast paths take their CPU branches for ``tensor``: scalars read to the host (a sync elsewhere) and
    kernels chosen for CPU speed. The tests patch this to run the other devices' branches on CPU."""
    return tensor.is_cpu


def _moments_and_sums(g: Tensor, m: Tensor, v: Tensor, bc2: Tensor, beta1: float, beta2: float, eps2: float) -> Tensor:
    """Update ``m``, ``v`` of one flat tensor in place; return ``(g·m_prev, |g|², |m_prev|²)`` (the relative step's
    gain) and the sums of squares of the four features ``g, m, g·r, m·r`` with ``r = rsqrt(v / bc2 + eps²)``."""
    gm, mm_prev = (g * m).sum(), (m * m).sum()
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    r = torch.rsqrt(v / bc2 + eps2)
    gg, gr, mr = (g * g).sum(), g * r, m * r
    return torch.stack([gm, gg, mm_prev, gg, (m * m).sum(), (gr * gr).sum(), (mr * mr).sum()])


def _mlp_step(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    bc2: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    skip: Tensor,
    scale: Tensor,
    lr: Tensor,
    eps2: float,
    update_rms: float,
    weight_decay: float,
    magnitude: Tensor,
) -> None:
    """``p ← p·(1 - lr·wd) - lr·update_rms·magnitude·d / rms(d)`` for one flat tensor, ``d`` the MLP's direction on
    the normalised features (``scale``: the four normalisers), written element-wise so that a compiler fuses it."""
    r = torch.rsqrt(v / bc2 + eps2)
    f = (g * scale[0], m * scale[1], g * r * scale[2], m * r * scale[3])
    d = skip[0] * f[0] + skip[1] * f[1] + skip[2] * f[2] + skip[3] * f[3] + b2
    for j in range(w1.shape[0]):
        hidden = w1[j, 0] * f[0] + w1[j, 1] * f[1] + w1[j, 2] * f[2] + w1[j, 3] * f[3] + b1[j]
        d = d + w2[j] * torch.relu(hidden)
    coef = lr * update_rms * magnitude * torch.rsqrt((d * d).sum() / d.numel() + 1e-30)
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    p.sub_(coef * d)


def _adam_moments_and_sums(g: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float) -> Tensor:
    """Update ``m``, ``v`` of one flat tensor in place; return ``(g·m_prev, |g|², |m_prev|²)``: the gain's sums alone,
    for a step in Adam's form (see :meth:`Celo2Rule._adam_form`, whose size needs no sum of the feature's squares)."""
    gm, gg, mm_prev = (g * m).sum(), (g * g).sum(), (m * m).sum()
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    return torch.stack([gm, gg, mm_prev])


def _single_moments_and_sums(g: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float, c: Tensor) -> Tensor:
    """:func:`_adam_moments_and_sums` and ``|f|²``, with ``f = m · rsqrt(v + c)``, ``c = eps² · bc2``: the
    single-feature path's ``m / sqrt(v̂ + eps²)`` stored divided by ``sqrt(bc2)``, as
    :meth:`Celo2Rule._single_feature_update_` stores it."""
    sums = _adam_moments_and_sums(g, m, v, beta1, beta2)
    f = m * torch.rsqrt(v + c)
    return torch.cat([sums, (f * f).sum()[None]])


def _single_apply(p: Tensor, m: Tensor, v: Tensor, c: Tensor, decay: Tensor, alpha: Tensor) -> None:
    """``p ← p · decay − alpha · m · rsqrt(v + c)`` for one flat tensor (the single-feature step on ``m · r``)."""
    p.mul_(decay).sub_(alpha * (m * torch.rsqrt(v + c)))


def _prodigy_sums(g: Tensor, initial: Tensor, x: Tensor, grad_sum: Tensor, coef: Tensor) -> Tensor:
    """Prodigy's passes of one flat tensor: ``s̃ ← s̃ + coef · g`` in place; returns ``(⟨g, x₀⟩, ⟨g, x⟩, ‖s̃‖₁)``."""
    grad_sum.add_(g * coef)
    return torch.stack([(g * initial).sum(), (g * x).sum(), grad_sum.abs().sum()])


_COMPILED: dict[str, Callable[..., Any]] = {}


def _compiled(name: str) -> Callable[..., Any]:
    """The kernel ``name`` compiled once per process (shapes dynamic, so tensors of every size share it)."""
    if name not in _COMPILED:
        kernels: dict[str, Callable[..., Any]] = {
            "moments": _moments_and_sums,
            "mlp": _mlp_step,
            "single_moments": _single_moments_and_sums,
            "adam_moments": _adam_moments_and_sums,
            "single_apply": _single_apply,
            "prodigy": _prodigy_sums,
        }
        _COMPILED[name] = torch.compile(kernels[name], dynamic=True)
    return _COMPILED[name]


@register_rule
class Celo2Rule(UpdateRule):
    """Direction-only MLP, RMS-normalised per tensor, scaled by the lr and a learned schedule; AdamW on 1-D tensors.

    For tensors with two or more dims per problem: features ``g``, ``m``, ``g / sqrt(v̂ + eps²)`` and
    ``m / sqrt(v̂ + eps²)``, each normalised by its RMS over the tensor, feed ``d = skip·f + MLP(f)``;
    ``d`` is optionally orthogonalised, rescaled to RMS ``update_rms`` over the tensor, and
    ``p ← p·(1 - η·weight_decay) - η·d`` with ``η = lr · s(step / horizon)``, ``s`` the schedule (see the module
    docstring).
    Tensors with at most one dim per problem take an AdamW step of size ``η`` with the same ``m``, ``v``. At
    initialisation (skip on the last feature, MLP output zero, schedule coefficients zero) the rule is a per-tensor
    RMS-normalised Adam under warm-up + cosine decay. State: two floats per parameter, as Adam.

    Args:
        hidden_size: width of the MLP's hidden layer.
        betas: decay rates of the momentum ``m`` and the second moment ``v``.
        eps: added to ``sqrt(v̂)`` in the AdamW step of 1-D tensors; ``eps²`` is added to ``v̂`` inside the root of
            the features.
        update_rms: RMS of the step over each tensor, in units of ``η``.
        weight_decay: decoupled weight decay of the tensors with two or more dims.
        orthogonalize: orthogonalise the direction of matrices by Newton–Schulz (as Celo2 and Muon).
        ns_steps: Newton–Schulz iterations.
        horizon_schedule: scale the step by the schedule ``s``, which needs the planned number of steps
            (``needs_horizon``). ``False``: ``s = 1`` and no horizon is needed (the rule of version 1).
        warmup_fraction: the base schedule rises linearly over this fraction of the horizon.
        final_fraction: the base schedule decays (cosine) to this fraction at the horizon.
        step_size: ``"lr"``: ``η = lr · s``, the step is proportional to the learning rate (meta-training and
            the rule of versions 1-2). ``"relative"``: the rule sets its own step size per tensor,
            ``η = lr · s · c₀ · exp(h)``: ``c₀ = relative_step · max(rms(p₀), min_rms)`` is the tensor's initial
            RMS times a fraction (a first guess that scales with the initialisation, as LARS/LAMB's trust ratio),
            and the gain ``h`` (from 0, clamped to ``[min_log_gain, max_log_gain]``) is adapted online by a hypergradient step,
            ``h ← h + gain_rate · cos(g_t, m_{t-1})`` (Baydin et al., "Online Learning Rate Adaptation with
            Hypergradient Descent", arXiv:1703.04782, multiplicative and normalised per tensor): the step grows
            while consecutive gradients agree and shrinks when they oppose (oscillation, a step too large to
            make progress). ``lr`` is then a dimensionless multiplier (``relative_lr``: ``RuleOptimizer`` hands it
            each group's lr over the optimizer's reference lr, so it is 1 unless an LR scheduler or per-group
            ratios change it). State: two more scalars per tensor (``step_scale`` = ``c₀`` and ``log_gain``).
            ``"dog"``: the step grows with the distance travelled, a distance-over-gradients estimate (DoG, Ivgi,
            Hinder & Carmon 2023, arXiv:2302.12022, per tensor as their L-DoG). DoG's SGD step moves
            ``r̄_t · ‖g_t‖ / sqrt(Σ_{i≤t} ‖g_i‖²)`` with ``r̄_t = max(r_ε, max_{i≤t} ‖x_i − x_0‖)``; here that
            length, in RMS units, is taken along the rule's normalised direction: ``η = lr · s · exp(h) · r̄_t ·
            ‖g_t‖ / (u · sqrt(Σ_{i≤t} ‖g_i‖²))``, ``r̄_t = min(max(r_ε, max_{i≤t} rms(x_i − x_0)), max_growth ·
            r_ε)``, ``r_ε = c₀`` as above and ``u`` the RMS of the unit direction (``update_rms`` for matrices, 1
            for the AdamW direction of 1-D tensors, whose first step is ``sign(g)``), so each step's RMS is DoG's
            length times ``s · exp(h)``. The first step moves ``r_ε``; while the steps keep moving away from
            ``x_0`` the distance, hence the step, grows, so a first guess that is too small corrects itself
            upward; the step shrinks as the gradients shrink against their history (``1 / sqrt(t)`` at a constant
            gradient norm). The gain ``h`` acts as in ``"relative"`` (with ``max_log_gain=0`` it only shrinks).
            State: a copy of the initial tensor (``initial``, one more float per parameter) and four scalars per
            tensor (``step_scale`` = ``r_ε``, ``distance`` = ``r̄``, ``grad_sq_sum`` = ``Σ ‖g_i‖²`` and
            ``log_gain``).
            ``"prodigy"``: the step is a distance estimate that grows from a tiny ``d₀`` (Prodigy, Mishchenko &
            Defazio 2023, arXiv:2306.06101, after D-Adaptation, Defazio & Mishchenko 2023, arXiv:2301.07733; its
            Adam form). With ``γ_k = lr · s · exp(h_k)`` and the weight ``λ_k = γ_k d_k² / d₀``, per tensor:
            ``r_k = β₃ r_{k-1} + λ_k ⟨g_k, x_0 − x_k⟩``, ``s_k = β₃ s_{k-1} + λ_k g_k`` (a vector), ``d_{k+1} =
            min(max(d_k, r_k / ‖s_k‖₁), prodigy_max_d · max(rms(x_0), min_rms))`` and ``η = γ_k d_k``: ``d`` takes
            the place of the relative mode's ``c₀`` and of Prodigy-Adam's learning rate (a matrix's step has RMS
            ``η · update_rms``, a 1-D tensor takes AdamW's step of size ``η``); the schedule and gain act as there.
            Prodigy's weight is ``γ_k d_k²`` and its EMAs carry a factor ``1 − β₃``; the constant factors ``1 / d₀``
            and ``1 − β₃`` cancel in ``r / ‖s‖₁`` and keep both sums far from float32 underflow while ``d`` is
            tiny (as the reference implementation does). For a convex loss ``⟨g_i, x_i − x*⟩ ≥ 0``, so ``r_k ≤
            ⟨s_k, x_0 − x*⟩ ≤ ‖s_k‖₁ ‖x_0 − x*‖_∞``: the estimate never exceeds ``max(d₀, ‖x_0 − x*‖_∞)``, the
            largest distance left to travel per entry, the scale of a sign-like (Adam) step. While the steps keep
            correlating with the gradients ``d`` grows geometrically from ``d₀``; unlike DoG's, the step does not
            decay as ``1 / sqrt(t)`` (``d`` never shrinks; the schedule anneals it). The estimate is per tensor,
            where Prodigy sums ``r`` and ``‖s‖₁`` over all parameters for one global ``d``: the rule's step sizes
            are per tensor in every mode (``c₀`` from each tensor's RMS, the gain from each tensor's gradients),
            its functional :meth:`update` sees one tensor at a time (batched over problems, for meta-training), and
            layers of different scales get different distances, as DoG's layer-wise L-DoG does. ``d₀`` is
            ``prodigy_d0`` times the tensor's initial RMS (floored at ``min_rms``), not an absolute 1e-6: the
            estimate then starts at the same place relative to every tensor's scale, as ``c₀`` and ``r_ε`` do.
            State: a copy of the initial tensor (``initial``) and ``s``, two more floats per parameter (2× Adam's
            state), and five scalars per tensor (``step_scale`` = ``d₀``, ``estimate`` = ``d``, ``numerator`` =
            ``r``, ``log_gain`` and ``grad_sum_scale``). ``s`` is kept as ``grad_sum_scale · grad_sum``, a scalar
            ``c`` times a vector ``s̃``: its decay is then a scalar product, ``c ← β₃ c``, and its update one pass
            over memory, ``s̃ ← s̃ + (λ_k / c) g_k``; ``s̃`` is multiplied by ``c`` and ``c`` reset to 1 when ``c``
            falls below 2⁻²⁴, far from float32's range. A state without ``grad_sum_scale`` (written before it
            existed) holds ``s`` itself and loads as ``c = 1``.
        magnitude_power: how a matrix's step size follows the gradients' signal-to-noise ratio. The direction is
            rescaled to RMS ``update_rms`` times the step size ``η`` (Celo2's normalised step, the same whatever the
            noise) and then multiplied by ``a ** magnitude_power``, with ``a`` the RMS of Adam's update
            ``m̂ / sqrt(v̂ + eps²)`` over the tensor: about 1 while the gradients agree from step to step, falling
            towards ``sqrt((1 − β₁) / (1 + β₁))`` (0.23 at β₁ = 0.9) when they are mostly noise. 0 (the default):
            Celo2's step. 1: the step shrinks near a noisy minimum as Adam's does; at the initialisation (the
            direction is ``m / sqrt(v̂ + eps²)`` alone) a matrix then takes exactly Adam's step, ``η · update_rms ·
            m̂ / sqrt(v̂ + eps²)``. 1-D tensors take AdamW's step whatever the value.
        relative_step: with ``step_size="relative"``, the initial step per unit of initial RMS (× ``update_rms``);
            with ``"dog"``, ``r_ε`` per unit of initial RMS (the RMS of the first step).
        min_rms: with ``step_size="relative"``, ``"dog"`` or ``"prodigy"``, the RMS assumed for tensors smaller
            than it (zero-initialised biases and matrices still move).
        vector_min_rms: ``min_rms`` for the 1-D tensors (biases, norm scales) alone, wherever ``min_rms`` sets a
            tensor's scale (the initial step, ``prodigy_max_d``'s bound); None: ``min_rms``. A bias is an offset of
            order 1 rather than a weight of order ``1 / sqrt(fan_in)``: with 1, a zero-initialised bias starts from
            the step of a norm scale initialised to ones.
        gain_rate: with ``step_size="relative"``, ``"dog"`` or ``"prodigy"``, the hypergradient rate ``κ`` of the
            log step gain.
        min_log_gain: with ``step_size="relative"``, ``"dog"`` or ``"prodigy"``, the lower bound of ``h``.
        max_log_gain: with ``step_size="relative"``, ``"dog"`` or ``"prodigy"``, the upper bound of ``h`` (0: the
            gain can only shrink the step, escaping oscillation, never grow it past the initial guess).
        max_growth: with ``step_size="dog"``, the bound of the distance estimate ``r̄`` in units of ``r_ε`` (a
            tensor whose gradients never turn, e.g. a logit scale on separable data, would otherwise grow its step
            without limit).
        prodigy_d0: with ``step_size="prodigy"``, the initial estimate ``d₀`` per unit of the tensor's initial RMS
            (floored at ``min_rms``); Prodigy's default 1e-6.
        prodigy_beta3: with ``step_size="prodigy"``, the decay ``β₃`` of ``r`` and ``s``; None: ``sqrt(β₂)``,
            Prodigy's default (1: plain sums, as its gradient-descent form and D-Adaptation).
        prodigy_max_d: with ``step_size="prodigy"``, the bound of ``d`` per unit of the tensor's initial RMS
            (floored at ``min_rms``); Prodigy has none (``inf``, the default). A bound in units of the tensor's
            scale rather than of ``d₀`` (as ``max_growth`` is of ``r_ε``), since ``d₀`` is meant to be far too small.
    """

    name = "celo2"
    version = 2  # 2: horizon-aware schedule (the `schedule` weights); version-1 weights are refused on load
    needs_horizon = True

    def __init__(
        self,
        *,
        hidden_size: int = 4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        update_rms: float = 0.2,
        weight_decay: float = 0.0,
        orthogonalize: bool = False,
        ns_steps: int = 5,
        horizon_schedule: bool = True,
        warmup_fraction: float = 0.02,
        final_fraction: float = 0.1,
        step_size: Literal["lr", "relative", "dog", "prodigy"] = "lr",
        relative_step: float = 0.1,
        min_rms: float = 0.01,
        gain_rate: float = 0.02,
        min_log_gain: float = -4.6,
        max_log_gain: float = 4.6,
        max_growth: float = 100.0,
        prodigy_d0: float = 1e-6,
        prodigy_beta3: float | None = None,
        prodigy_max_d: float = math.inf,
        magnitude_power: float = 0.0,
        vector_min_rms: float | None = None,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or not all(0.0 <= b < 1.0 for b in betas) or update_rms <= 0 or weight_decay < 0:
            raise ValueError(
                f"hidden_size={hidden_size} must be >= 1, betas={betas} in [0, 1), update_rms={update_rms} > 0 "
                f"and weight_decay={weight_decay} >= 0"
            )
        if not (0.0 <= warmup_fraction < 1.0 and 0.0 <= final_fraction <= 1.0):
            raise ValueError(
                f"warmup_fraction={warmup_fraction} must be in [0, 1) and final_fraction={final_fraction} in [0, 1]"
            )
        if (
            step_size not in ("lr", "relative", "dog", "prodigy")
            or not relative_step > 0
            or not min_rms > 0
            or not gain_rate >= 0
            or not min_log_gain <= 0 <= max_log_gain
            or not 1.0 <= max_growth < math.inf
        ):
            raise ValueError(
                f"step_size={step_size!r} must be 'lr', 'relative', 'dog' or 'prodigy', relative_step="
                f"{relative_step} and min_rms={min_rms} > 0, gain_rate={gain_rate} >= 0, min_log_gain={min_log_gain} <= 0 <= "
                f"max_log_gain={max_log_gain} and max_growth={max_growth} finite and >= 1"
            )
        if (
            not 0 < prodigy_d0 < math.inf
            or not (prodigy_beta3 is None or 0 < prodigy_beta3 <= 1)
            or not prodigy_max_d >= prodigy_d0
        ):
            raise ValueError(
                f"prodigy_d0={prodigy_d0} must be finite and > 0, prodigy_beta3={prodigy_beta3} None or in (0, 1] "
                f"and prodigy_max_d={prodigy_max_d} >= prodigy_d0"
            )
        if not (vector_min_rms is None or 0 < vector_min_rms < math.inf):
            raise ValueError(f"vector_min_rms={vector_min_rms} must be None (min_rms) or finite and > 0")
        if not 0.0 <= magnitude_power <= 1.0:
            raise ValueError(f"magnitude_power={magnitude_power} must be in [0, 1] (0: Celo2's step, 1: Adam's size)")
        self.magnitude_power = float(magnitude_power)
        self.prodigy_d0 = float(prodigy_d0)
        self.prodigy_beta3 = None if prodigy_beta3 is None else float(prodigy_beta3)
        self.prodigy_max_d = float(prodigy_max_d)
        self.vector_min_rms = None if vector_min_rms is None else float(vector_min_rms)
        self.gain_rate = float(gain_rate)
        self.min_log_gain = float(min_log_gain)
        self.max_log_gain = float(max_log_gain)
        self.max_growth = float(max_growth)
        self.step_size = step_size
        self.relative_lr = step_size in ("relative", "dog", "prodigy")
        self.dog = step_size == "dog"
        self.prodigy = step_size == "prodigy"
        self.relative_step = float(relative_step)
        self.min_rms = float(min_rms)
        self.hidden_size = hidden_size
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.update_rms = float(update_rms)
        self.weight_decay = float(weight_decay)
        self.orthogonalize = bool(orthogonalize)
        self.ns_steps = ns_steps
        self.horizon_schedule = bool(horizon_schedule)
        self.needs_horizon = self.horizon_schedule  # per instance: a rule without the schedule needs no horizon
        self.warmup_fraction = float(warmup_fraction)
        self.final_fraction = float(final_fraction)
        self.skip = nn.Parameter(torch.tensor([0.0, 0.0, 0.0, 1.0]))
        with torch.random.fork_rng(devices=[]):  # a deterministic initialisation (and hash) for the default rule
            torch.manual_seed(0)
            self.input = nn.Linear(4, hidden_size)
        self.output = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self.schedule = nn.Parameter(torch.zeros(4))  # coefficients of (1, tau, cos(pi tau), sin(pi tau))
        self._scratch: dict[tuple[torch.device, torch.dtype], dict[str, Tensor]] = {}
        self._single_scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self.compiled_fast_path = False

    def init_state(self, param: Tensor, *, batch_dims: int = 0) -> State:
        state = {"exp_avg": zeros_state(param.shape, param), "exp_avg_sq": zeros_state(param.shape, param)}
        if self.relative_lr:  # per-tensor scalars (kept broadcastable to the tensor, one per problem)
            rms = torch.sqrt(mean_square(param.detach().float(), batch_dims))
            scale = self.prodigy_d0 if self.prodigy else self.relative_step
            floor = self.min_rms
            if self.vector_min_rms is not None and param.ndim - batch_dims <= 1:
                floor = self.vector_min_rms
            state["step_scale"] = scale * rms.clamp(min=floor)
            state["log_gain"] = torch.zeros_like(state["step_scale"])
            if self.dog or self.prodigy:  # x_0, fp32 for bf16 parameters (as the moments)
                dtype = torch.promote_types(param.dtype, torch.float32)
                state["initial"] = param.detach().to(dtype, copy=True)
            if self.dog:  # the running distance estimate r̄ (from r_ε = step_scale)
                state["distance"] = state["step_scale"].clone()
                state["grad_sq_sum"] = torch.zeros_like(state["step_scale"])
            if self.prodigy:  # the estimate d (from d₀ = step_scale), r and s = grad_sum_scale · grad_sum
                state["estimate"] = state["step_scale"].clone()
                state["numerator"] = torch.zeros_like(state["step_scale"])
                state["grad_sum"] = zeros_state(param.shape, param)
                state["grad_sum_scale"] = torch.ones_like(state["step_scale"])
        return state

    def step_multiplier(self, step: int | Tensor, horizon: int | None) -> Tensor:
        """The schedule ``s(tau)``, ``tau = min(step / horizon, 1)``; same shape as ``step`` (differentiable).

        Raises:
            ValueError: the rule has a schedule but ``horizon`` is None.
        """
        if horizon is None:
            raise self._missing_horizon()
        c = self.schedule
        tau = (torch.as_tensor(step, dtype=torch.float64, device=c.device) / float(horizon)).clamp(max=1.0).to(c.dtype)
        warmup = (tau / self.warmup_fraction).clamp(max=1.0) if self.warmup_fraction > 0 else torch.ones_like(tau)
        cos, sin = torch.cos(math.pi * tau), torch.sin(math.pi * tau)
        base = warmup * (self.final_fraction + (1.0 - self.final_fraction) * 0.5 * (1.0 + cos))
        return base * torch.exp(c[0] + c[1] * tau + c[2] * cos + c[3] * sin)

    def _beta3(self) -> float:
        """Prodigy's decay ``β₃`` of ``r`` and ``s`` (``sqrt(β₂)`` unless ``prodigy_beta3`` is set)."""
        return math.sqrt(self.betas[1]) if self.prodigy_beta3 is None else self.prodigy_beta3

    def _next_estimate(self, estimate: Tensor, numerator: Tensor, l1: Tensor, d0: Tensor) -> Tensor:
        """Prodigy's ``d_{k+1} = min(max(d_k, r_k / ‖s_k‖₁), cap)`` (no growth while ``‖s_k‖₁`` is 0), the cap being
        ``prodigy_max_d`` per unit of the tensor's scale (``d0 / prodigy_d0``)."""
        ratio = torch.where(l1 > 0, numerator / torch.where(l1 > 0, l1, torch.ones_like(l1)), 0.0)
        return torch.minimum(torch.maximum(estimate, ratio), d0 * (self.prodigy_max_d / self.prodigy_d0))

    def _missing_horizon(self) -> ValueError:
        return ValueError(
            f"{type(self).__name__} with horizon_schedule=True needs the planned number of steps; pass "
            "horizon= (RuleOptimizer(horizon=...), or the LearnedOptimizer callback sets it from the Trainer), "
            "or build the rule with horizon_schedule=False"
        )

    def lr_multiplier(self, step: int, horizon: int | None) -> float:
        """The schedule ``s(step / horizon)`` as a float (1.0 with ``horizon_schedule=False``)."""
        return self._scalar_multiplier(step, horizon) if self.horizon_schedule else 1.0

    def compile_fast_path(self, enabled: bool = True) -> Celo2Rule:
        """Run :meth:`update_` on contiguous matrices as ``torch.compile``-fused kernels (opt-in; returns self).

        Eager PyTorch makes one pass over memory per operation (about 40 per element and step for this rule's MLP
        path); the compiled kernels make about 4, so the step costs about as much as Adam's on CPU. While the
        direction is ``m / sqrt(v̂ + eps²)`` alone (see :meth:`update_`: the initialisation and the shipped rules)
        three kernels per matrix take its place: the moments with the sums the step needs, the ``"prodigy"``
        estimate's passes, and the step (about 14 passes instead of the eager single-feature path's 33). The first
        step compiles (seconds to a minute on a small CPU, cached on disk by PyTorch afterwards) and needs a C++
        compiler (Triton on GPU). Same math as the eager path (``tests/optim/test_celo2_fast.py`` compares both with
        :meth:`update`); other tensors (1-D, non-contiguous) keep the eager path, and a direction that is another
        single feature runs the eager single-feature path. Not saved with the rule: call it after loading.
        """
        self.compiled_fast_path = bool(enabled)
        return self

    def replace(self, **changes: Any) -> Celo2Rule:
        """:meth:`UpdateRule.replace`; the copy also keeps :meth:`compile_fast_path`'s setting."""
        rule = cast(Celo2Rule, super().replace(**changes))
        rule.compiled_fast_path = self.compiled_fast_path
        return rule

    def without_schedule(self) -> Celo2Rule:
        """A copy with ``horizon_schedule=False`` (same weights and :func:`~lightning_meta.optim.rule_hash`; another
        :func:`~lightning_meta.optim.rule_fingerprint`): the lr alone sets the step's size."""
        rule = copy.deepcopy(self)
        rule.horizon_schedule = rule.needs_horizon = False
        rule._scratch, rule._single_scratch = {}, {}
        return rule

    def _scheduled_lr(self, lr: float | Tensor, step: int, horizon: int | None) -> float:
        """The fast paths' learning rate at ``step``: ``lr`` times the schedule (with ``horizon_schedule``), a float."""
        return float(lr) * (self._scalar_multiplier(step, horizon) if self.horizon_schedule else 1.0)

    def _scalar_multiplier(self, step: int, horizon: int | None) -> float:
        """:meth:`step_multiplier` for one integer step, in Python floats (the fast path: no tiny tensor ops)."""
        if horizon is None:
            raise self._missing_horizon()
        c0, c1, c2, c3 = self.schedule.tolist()
        tau = min(step / float(horizon), 1.0)
        warmup = min(tau / self.warmup_fraction, 1.0) if self.warmup_fraction > 0 else 1.0
        cos, sin = math.cos(math.pi * tau), math.sin(math.pi * tau)
        base = warmup * (self.final_fraction + (1.0 - self.final_fraction) * 0.5 * (1.0 + cos))
        return base * math.exp(c0 + c1 * tau + c2 * cos + c3 * sin)

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
        if self.relative_lr:  # the hypergradient gain, from the cosine of g_t and m_{t-1} over the tensor
            dims = feature_dims(param, batch_dims)
            m_prev = state["exp_avg"]

            def total(x: Tensor) -> Tensor:
                return x.sum(dims, keepdim=True) if dims else x

            cos = total(grad * m_prev) * rsqrt_at_zero_safe(total(grad * grad) * total(m_prev * m_prev), 1e-30)
            log_gain = (state["log_gain"] + self.gain_rate * cos).clamp(self.min_log_gain, self.max_log_gain)
        exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
        exp_avg_sq = torch.addcmul(state["exp_avg_sq"] * beta2, grad, grad, value=1 - beta2)
        new_state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        if self.relative_lr:
            new_state |= {"step_scale": state["step_scale"], "log_gain": log_gain}
        if self.dog:  # r̄_t = min(max(r̄_{t-1}, rms(x_t - x_0)), max_growth · r_ε), from the iterate before the step
            moved = sqrt_at_zero_safe(mean_square(param - state["initial"], batch_dims)).to(state["distance"].dtype)
            distance = torch.minimum(torch.maximum(state["distance"], moved), self.max_growth * state["step_scale"])
            dims = feature_dims(param, batch_dims)
            grad_sq = (grad * grad).sum(dims, keepdim=True) if dims else grad * grad
            grad_sq_sum = state["grad_sq_sum"] + grad_sq.to(state["grad_sq_sum"].dtype)
            new_state |= {"initial": state["initial"], "distance": distance, "grad_sq_sum": grad_sq_sum}
        if isinstance(step, Tensor):  # one step count per problem: broadcast over each problem's tensor
            step = step.reshape((*step.shape, *([1] * (param.ndim - step.ndim))))
            step64 = step.to(torch.float64)  # 1 - 0.999**t loses ~5 digits in float32 at t = 1
            bias_correction1: float | Tensor = (1 - beta1**step64).to(param.dtype)
            bias_correction2: float | Tensor = (1 - beta2**step64).to(param.dtype)
        else:
            bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
        if self.horizon_schedule:
            lr = lr * self.step_multiplier(step, horizon)
        if self.prodigy:  # λ_k = γ_k d_k² / d₀ with γ_k = lr · s · exp(h_k); r, s and d_{k+1} from x_k, g_k
            estimate, d0 = state["estimate"], state["step_scale"]
            beta3 = self._beta3()
            weight = lr * torch.exp(log_gain) * estimate * (estimate / d0)
            dims = feature_dims(param, batch_dims)
            correlation = grad * (state["initial"] - param)
            dot = (correlation.sum(dims, keepdim=True) if dims else correlation).to(estimate.dtype)
            numerator = beta3 * state["numerator"] + weight * dot
            # s = c · s̃: s ← β₃ s + λ g as c ← β₃ c, s̃ ← s̃ + (λ / c) g, and s̃ ← c s̃, c ← 1 once c is small
            scale = beta3 * state.get("grad_sum_scale", torch.ones_like(d0))  # no scale: s̃ = s, an older state
            dtype = state["grad_sum"].dtype
            grad_sum = state["grad_sum"] + (weight / scale).to(dtype) * grad.to(dtype)
            renormalise = scale < _GRAD_SUM_RENORMALISE_BELOW
            grad_sum = torch.where(renormalise, grad_sum * scale.to(dtype), grad_sum)
            scale = torch.where(renormalise, torch.ones_like(scale), scale)
            l1 = (grad_sum.abs().sum(dims, keepdim=True) if dims else grad_sum.abs()).to(estimate.dtype) * scale
            new_state |= {
                "initial": state["initial"],
                "estimate": self._next_estimate(estimate, numerator, l1, d0),
                "numerator": numerator,
                "grad_sum": grad_sum,
                "grad_sum_scale": scale,
            }
        if param.numel() == 0:  # nothing to update (and no per-tensor statistics to take)
            return param.clone(), new_state
        if self.prodigy:  # η = γ_k d_k (d_k: the estimate before this step's), as c₀ in the relative mode
            lr = lr * estimate * torch.exp(log_gain)
        elif self.dog:  # each step's RMS: DoG's r̄_t · |g_t| / sqrt(Σ |g_i|²)
            unit = 1.0 if param.ndim - batch_dims <= 1 else self.update_rms
            ratio = sqrt_at_zero_safe(grad_sq / (grad_sq_sum + 1e-30))
            lr = lr * (distance * ratio / unit) * torch.exp(log_gain)
        elif self.relative_lr:
            lr = lr * state["step_scale"] * torch.exp(log_gain)
        if param.ndim - batch_dims <= 1:  # AdamW for biases, norm scales, scalars
            # 1e-30 inside the sqrt keeps its derivative finite where a gradient is exactly zero (a dead unit):
            # d sqrt(v)/dv is infinite at 0, and 0 * inf made TBPTT meta-gradients NaN. Values are unchanged in
            # fp32 unless v < ~1e-23, far below eps**2.
            denom = torch.sqrt(exp_avg_sq / bias_correction2 + 1e-30) + self.eps
            return param - (lr / bias_correction1) * exp_avg / denom, new_state
        # eps inside the root for the features (one rsqrt in the fast path; finite derivative at v = 0)
        inv_rms = torch.rsqrt(exp_avg_sq / bias_correction2 + self.eps**2)
        feats = torch.stack([grad, exp_avg, grad * inv_rms, exp_avg * inv_rms], dim=batch_dims)  # (*B, 4, *rest)
        x, scale = flatten_features(feats, batch_dims)  # (b, 4, n), (b, 4)
        direction = coordinate_mlp(
            x,
            self.input.weight * scale.unsqueeze(-2),  # (b, H, 4): the normalisation folded into the weights
            self.input.bias.reshape(1, -1, 1),
            self.output.weight.unsqueeze(0),
            self.output.bias.reshape(1, 1, 1),
            skip=(self.skip * scale).unsqueeze(-2),  # (b, 1, 4)
        ).reshape(param.shape)
        if self.orthogonalize:
            direction = newton_schulz(direction, self.ns_steps, batch_dims)
        # the *_at_zero_safe roots: the same values as the fast paths', finite derivatives for meta-training
        coef = (lr * self.update_rms) * rsqrt_at_zero_safe(mean_square(direction, batch_dims), 1e-30)
        if self.magnitude_power:  # × rms(m̂ / sqrt(v̂ + eps²)) ** power, the size of Adam's update
            mean_square_mr = mean_square(exp_avg * inv_rms, batch_dims)
            coef = coef * self._adam_magnitude(mean_square_mr, bias_correction1, sqrt=sqrt_at_zero_safe)
        if self.weight_decay:
            param = param * (1 - lr * self.weight_decay)
        return torch.addcmul(param, direction, coef, value=-1), new_state

    @torch.no_grad()
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
        """In-place :meth:`update` of many tensors: the deployment fast path (agrees with :meth:`update`).

        Moments of all tensors in three multi-tensor (``torch._foreach_*``) calls, AdamW for all 1-D tensors in
        four more; per matrix, either the one feature the direction consists of (see :meth:`_single_feature`), or
        the four features go into one reused ``(4, n)`` buffer,
        the per-tensor normalisation and bias corrections become scalars folded into the first layer's weights,
        the MLP runs as matrix products over column blocks, and the parameter is updated in place.
        """
        same_dtype = all(
            g.dtype == p.dtype == s["exp_avg"].dtype == s["exp_avg_sq"].dtype == s.get("initial", p).dtype
            and s.get("grad_sum", p).dtype == p.dtype
            for p, g, s in zip(params, grads, states)
        )
        if self.orthogonalize or not same_dtype or any(p.device != params[0].device for p in params):
            super().update_(params, grads, states, lr=lr, step=step, horizon=horizon, loss=loss)
            return
        # The relative mode syncs with the host anyway; on CPU a sync costs nothing. Elsewhere: no extra sync.
        single = self._single_feature() if params and (_takes_cpu_branch(params[0]) or self.relative_lr) else None
        # gains and steps are per tensor: the subsets are independent. A single-feature direction fuses when it is
        # m / sqrt(v̂ + eps²) (the initialisation's and the shipped rules'); another feature runs eagerly.
        if self.compiled_fast_path and (single is None or single[0] == 3):
            fused = [
                i
                for i, p in enumerate(params)
                if p.ndim > 1
                and p.numel() > 0
                and all(t.is_contiguous() for t in (p, grads[i], states[i]["exp_avg"], states[i]["exp_avg_sq"]))
            ]
            if fused:
                subsets = ([params[i] for i in fused], [grads[i] for i in fused], [states[i] for i in fused])
                if single is None:
                    self._compiled_update_(*subsets, lr=lr, step=step, horizon=horizon)
                else:
                    self._compiled_single_update_(*subsets, lr=lr, step=step, horizon=horizon, weight=single[1])
                rest = sorted(set(range(len(params))) - set(fused))
                params, grads, states = [params[i] for i in rest], [grads[i] for i in rest], [states[i] for i in rest]
                if not params:
                    return
        lr = self._scheduled_lr(lr, step, horizon)
        beta1, beta2 = self.betas
        bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        if self.relative_lr:  # per-tensor lrs and gains (one host sync for all tensors)
            dots = torch.stack([torch.dot(g.reshape(-1), m.reshape(-1)) for g, m in zip(grads, exp_avgs)])
            grad_norms = torch.stack(torch._foreach_norm(grads))
            norms = grad_norms * torch.stack(torch._foreach_norm(exp_avgs))
            grad_sq = grad_norms.square()
            lrs = self._advance_gains_(params, grads, states, dots, norms * norms, grad_sq, lr).mul_(lr).tolist()
            grad_squares: list[Tensor | None] = list(grad_sq.unbind())  # |g|², reused by the features
        else:
            lrs = [lr] * len(params)
            grad_squares = [None] * len(params)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        vectors = [i for i, p in enumerate(params) if p.ndim <= 1]
        if vectors:  # AdamW: p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
            denom = torch._foreach_sqrt([exp_avg_sqs[i] for i in vectors])
            torch._foreach_div_(denom, math.sqrt(bias_correction2))
            torch._foreach_add_(denom, self.eps)
            if self.relative_lr:
                torch._foreach_addcdiv_(
                    [params[i] for i in vectors],
                    [exp_avgs[i] for i in vectors],
                    denom,
                    [-lrs[i] / bias_correction1 for i in vectors],
                )
            else:
                torch._foreach_addcdiv_(
                    [params[i] for i in vectors], [exp_avgs[i] for i in vectors], denom, value=-lr / bias_correction1
                )
        matrices = [i for i, p in enumerate(params) if p.ndim > 1]
        if not matrices:
            return
        like = params[matrices[0]]
        sq = math.sqrt(bias_correction2)
        # stored row * unit = feature (the g·r, m·r rows carry 1 / sqrt(bc2))
        unit = torch.tensor([1.0, 1.0, sq, sq], dtype=like.dtype, device=like.device)
        # (H + 1, 4) over (g, m, g·r, m·r) and (H + 1, 1): the hidden layer, then the skip path with the output bias
        weights = torch.cat([self.input.weight, self.skip[None]]).to(like.dtype)
        biases = torch.cat([self.input.bias, self.output.bias])[:, None].to(like.dtype)
        w2 = self.output.weight.to(like.dtype)  # (1, H)
        for i in matrices:
            common = (params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], lrs[i], bias_correction2)
            if single is not None:
                self._single_feature_update_(*common, *single, grad_squares[i], bc1=bias_correction1)
            else:
                self._matrix_update_(*common, unit, weights, biases, w2, grad_squares[i], bc1=bias_correction1)

    def _advance_gains_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[State],
        dots: Tensor,
        norms_sq: Tensor,
        grad_sq: Tensor,
        lr: float,
        *,
        compiled: bool = False,
    ) -> Tensor:
        """One hypergradient step of every tensor's log gain, written back into ``states``: ``h ← clamp(h + κ · dot /
        sqrt(norms_sq))`` with ``dot = <g, m>``, ``norms_sq = |g|²|m|²`` and ``grad_sq = |g|²``. Returns the
        per-tensor step scales ``c₀ · exp(h)`` (``"dog"``: see :meth:`_advance_distances_`; ``"prodigy"``: see
        :meth:`_advance_estimates_`, which takes ``lr``, the scheduled learning rate) ``(tensors,)``, before the
        learning rate."""
        gains = torch.stack([s["log_gain"].reshape(()) for s in states])
        gains = gains.add_(self.gain_rate * dots * torch.rsqrt(norms_sq + 1e-30))
        gains = gains.clamp_(self.min_log_gain, self.max_log_gain)
        torch._foreach_copy_(
            [s["log_gain"] for s in states], [gain.reshape(s["log_gain"].shape) for gain, s in zip(gains, states)]
        )
        if self.dog:
            return self._advance_distances_(params, states, grad_sq) * gains.exp()
        if self.prodigy:
            return self._advance_estimates_(params, grads, states, gains.exp(), lr, compiled=compiled)
        scales = torch.stack([s["step_scale"].reshape(()) for s in states])
        return scales * gains.exp()

    def _advance_distances_(self, params: list[Tensor], states: list[State], grad_sq: Tensor) -> Tensor:
        """``"dog"``: every tensor's distance estimate ``r̄ ← min(max(r̄, rms(x_t − x_0)), max_growth · r_ε)`` and
        gradient history ``G ← G + |g_t|²``, written back into ``states``; returns ``r̄ · |g_t| / (u · sqrt(G))``
        ``(tensors,)`` (``u``: ``update_rms`` for matrices, 1 for 1-D tensors). Two multi-tensor passes: the
        differences from ``x_0`` and their norms."""
        moved = torch.stack(torch._foreach_norm(torch._foreach_sub(params, [s["initial"] for s in states])))
        previous = torch.stack([s["distance"].reshape(()) for s in states])
        counts = torch.tensor([max(p.numel(), 1) for p in params], dtype=moved.dtype, device=moved.device)
        caps = torch.stack([s["step_scale"].reshape(()) for s in states]) * self.max_growth
        distances = torch.minimum(torch.maximum(previous, (moved / counts.sqrt()).to(previous.dtype)), caps)
        grad_sq = grad_sq.to(previous.dtype)
        sums = torch.stack([s["grad_sq_sum"].reshape(()) for s in states]) + grad_sq
        for key, values in (("distance", distances), ("grad_sq_sum", sums)):
            torch._foreach_copy_([s[key] for s in states], [v.reshape(s[key].shape) for v, s in zip(values, states)])
        units = torch.tensor(
            [1.0 if p.ndim <= 1 else self.update_rms for p in params], dtype=distances.dtype, device=distances.device
        )
        return distances * torch.sqrt(grad_sq / (sums + 1e-30)) / units

    def _advance_estimates_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[State],
        gains: Tensor,
        lr: float,
        *,
        compiled: bool = False,
    ) -> Tensor:
        """``"prodigy"``: with ``λ = lr · exp(h) · d² / d₀`` (``gains`` = ``exp(h)``) every tensor's ``r ← β₃ r + λ
        ⟨g, x_0 − x⟩``, ``s ← β₃ s + λ g`` (as ``c ← β₃ c``, ``s̃ ← s̃ + (λ / c) g``, see the class docstring) and
        ``d ← min(max(d, r / ‖s‖₁), cap)``, written back into ``states``; returns ``exp(h) · d`` with the estimate
        before this step's ``(tensors,)``. Passes over memory (:meth:`_prodigy_passes_`, one tensor after the other):
        the dots of ``g`` with ``x_0`` and with ``x``, ``s̃``'s update (one in-place ``add_``) and its 1-norm. The
        per-tensor scalars are read to the host once and their arithmetic (that of :meth:`update`, in the same
        order) is done in Python floats: a few dozen tiny tensor operations per step cost more than the passes over
        small tensors."""
        for s in states:  # a state from before the lazy scale holds s itself
            if "grad_sum_scale" not in s:
                s["grad_sum_scale"] = torch.ones_like(s["step_scale"])
        keys = ("estimate", "step_scale", "numerator", "grad_sum_scale")
        scalars = torch.stack([s[key].reshape(()) for s in states for key in keys]).view(len(states), len(keys))
        rows = torch.cat([gains.to(scalars.dtype)[:, None], scalars], 1).tolist()  # one host sync
        beta3, cap = self._beta3(), self.prodigy_max_d / self.prodigy_d0
        sums, weights = [], []
        for (gain, estimate, d0, _, scale), grad, param, state in zip(rows, grads, params, states):
            weight = lr * gain * estimate * (estimate / d0)
            coef = weight / (beta3 * scale)
            if abs(coef) > torch.finfo(grad.dtype).max:  # as the tensor's float: inf, not an overflow error
                coef = math.copysign(math.inf, coef)
            sums += self._prodigy_passes_(
                grad, param, state["initial"], state["grad_sum"], coef, beta3 * scale, compiled=compiled
            )
            weights.append(weight)
        values = torch.stack(sums).view(len(states), 3).tolist()  # ⟨g, x_0⟩, ⟨g, x⟩, ‖s̃‖₁ (a second sync)
        updates = []
        for (_, estimate, d0, numerator, scale), weight, (dot0, dot, l1) in zip(rows, weights, values):
            numerator = beta3 * numerator + weight * (dot0 - dot)
            scale = beta3 * scale
            if scale < _GRAD_SUM_RENORMALISE_BELOW:
                scale = 1.0
            l1 = l1 * scale
            ratio = numerator / l1 if l1 > 0 else 0.0  # _next_estimate in floats (NaN propagates, as there)
            updates += [math.nan if math.isnan(ratio) else min(max(estimate, ratio), d0 * cap), numerator, scale]
        # through a float64 host tensor: a value beyond the state's range becomes inf, as in tensor math (and no
        # float64 on the device, which some backends lack)
        new = torch.tensor(updates, dtype=torch.float64).to(scalars.dtype).to(scalars.device).unbind()
        torch._foreach_copy_([s[key] for s in states for key in ("estimate", "numerator", "grad_sum_scale")], new)
        steps = torch.tensor([gain * estimate for gain, estimate, *_ in rows], dtype=torch.float64)
        return steps.to(gains.dtype).to(gains.device)

    def _prodigy_passes_(
        self,
        grad: Tensor,
        param: Tensor,
        initial: Tensor,
        grad_sum: Tensor,
        coef: float,
        scale: float,
        *,
        compiled: bool = False,
    ) -> list[Tensor]:
        """One tensor's passes over memory in :meth:`_advance_estimates_`: ``s̃ ← s̃ + coef · g`` in place (then
        ``s̃ ← scale · s̃`` when ``scale`` is below the renormalisation bound); returns ``[⟨g, x_0⟩, ⟨g, x⟩, ‖s̃‖₁]``
        (``⟨g, x_0 − x⟩`` without a full-size temporary ``x_0 − x``). On CPU the 1-norm is ``|s̃|`` written into a
        reused buffer, then summed: there the 1-norm kernel of ``torch.linalg.vector_norm`` is several times slower
        than these two passes; elsewhere that kernel is one fused pass. ``compiled`` (the compiled paths' matrices):
        one compiled kernel instead, unless ``s̃`` is renormalised this step or a tensor is not contiguous."""
        if (
            compiled
            and scale >= _GRAD_SUM_RENORMALISE_BELOW
            and all(t.is_contiguous() for t in (grad, param, initial, grad_sum))
        ):
            coefficient = torch.tensor(coef, dtype=grad_sum.dtype, device=grad_sum.device)
            sums = _compiled("prodigy")(grad.view(-1), initial.view(-1), param.view(-1), grad_sum.view(-1), coefficient)
            return list(sums.unbind())
        g = grad.reshape(-1)
        dots = [torch.dot(g, initial.reshape(-1)), torch.dot(g, param.reshape(-1))]
        grad_sum.add_(grad, alpha=coef)
        if scale < _GRAD_SUM_RENORMALISE_BELOW:
            grad_sum.mul_(scale)
        if not _takes_cpu_branch(grad_sum):
            return [*dots, torch.linalg.vector_norm(grad_sum, 1)]
        magnitudes = self._feature_buffer(grad_sum.numel(), grad_sum).view(grad_sum.shape)
        return [*dots, torch.abs(grad_sum, out=magnitudes).sum()]

    def _compiled_moments_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[State],
        moments: Callable[[Tensor, Tensor, Tensor], Tensor],
        *,
        lr: float | Tensor,
        step: int,
        horizon: int | None,
    ) -> tuple[Tensor, Tensor]:
        """The compiled paths' first kernel on every matrix: ``moments(g, m, v)`` (flat; it updates ``m``, ``v`` in
        place and returns sums that start with ``g·m_prev``, ``|g|²``, ``|m_prev|²``) stacked ``(tensors, sums)``,
        and each tensor's scheduled lr ``(tensors,)``, times its gain (and step-size estimate) in the relative modes,
        as in the eager path."""
        lr = self._scheduled_lr(lr, step, horizon)
        stats = torch.stack(
            [moments(g.view(-1), s["exp_avg"].view(-1), s["exp_avg_sq"].view(-1)) for g, s in zip(grads, states)]
        )
        if not self.relative_lr:
            return stats, torch.full((len(params),), lr, dtype=stats.dtype, device=stats.device)
        dots, gg, mm = stats[:, 0], stats[:, 1], stats[:, 2]
        return stats, self._advance_gains_(params, grads, states, dots, gg * mm, gg, lr, compiled=True).mul_(lr)

    def _compiled_update_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[State],
        *,
        lr: float | Tensor,
        step: int,
        horizon: int | None,
    ) -> None:
        """:meth:`update_` of contiguous matrices by the compiled kernels (see :meth:`compile_fast_path`)."""
        beta1, beta2 = self.betas
        like = params[0]
        eps2 = self.eps**2
        bc2 = torch.tensor(1 - beta2**step, dtype=like.dtype, device=like.device)
        kernel, mlp = _compiled("moments"), _compiled("mlp")
        stats, lrs = self._compiled_moments_(  # stats (tensors, 7)
            params,
            grads,
            states,
            lambda g, m, v: kernel(g, m, v, bc2, beta1, beta2, eps2),
            lr=lr,
            step=step,
            horizon=horizon,
        )
        lrs = lrs.to(like.dtype)
        counts = torch.tensor([p.numel() for p in params], dtype=like.dtype, device=like.device)
        norms = torch.rsqrt(stats[:, 3:] / counts[:, None] + 1e-5)  # (tensors, 4): the feature normalisers
        if self.magnitude_power:  # rms(m̂ · r) ** power, the size of Adam's update
            magnitudes = self._adam_magnitude(stats[:, 6] / counts, 1 - beta1**step)
        else:
            magnitudes = torch.ones_like(counts)
        w1, b1 = self.input.weight.to(like.dtype), self.input.bias.to(like.dtype)
        w2, b2 = self.output.weight[0].to(like.dtype), self.output.bias[0].to(like.dtype)
        skip = self.skip.to(like.dtype)
        for k, (p, g, s) in enumerate(zip(params, grads, states)):
            mlp(
                p.view(-1),
                g.view(-1),
                s["exp_avg"].view(-1),
                s["exp_avg_sq"].view(-1),
                bc2,
                w1,
                b1,
                w2,
                b2,
                skip,
                norms[k],
                lrs[k],
                eps2,
                self.update_rms,
                self.weight_decay,
                magnitudes[k],
            )

    def _adam_magnitude(
        self, mean_square_mr: Any, bias_correction1: float | Tensor, sqrt: Callable[[Any], Any] = torch.sqrt
    ) -> Any:
        """``rms(m̂ / sqrt(v̂ + eps²)) ** magnitude_power`` from the mean of ``(m / sqrt(v̂ + eps²))²`` over the tensor
        (every update path has that sum at hand in its own form; the differentiable one passes a ``sqrt`` whose
        derivative at 0 is 0 and discards the power's infinite one there)."""
        return (sqrt(mean_square_mr) / bias_correction1) ** self.magnitude_power

    def _single_feature(self) -> tuple[int, float] | None:
        """``(k, w)`` when the direction is ``w`` times the normalised feature ``k`` alone, else None.

        That is the case when the MLP's output layer is zero (weights and bias: the hidden layer cannot contribute)
        and the skip path has exactly one nonzero weight, as at the initialisation (the shipped default): the step
        is then the RMS-normalised ``m / sqrt(v̂ + eps²)``, and :meth:`_single_feature_update_` computes only that
        feature, with no matrix products. The same math as the MLP path, which computes ``0 ·`` the other terms.
        """
        values = torch.cat([self.skip, self.output.weight.reshape(-1), self.output.bias]).tolist()
        skip, output = values[:4], values[4:]
        nonzero = [k for k, w in enumerate(skip) if w != 0.0]
        if any(w != 0.0 for w in output) or len(nonzero) != 1:
            return None
        return nonzero[0], skip[nonzero[0]]

    def _single_feature_update_(
        self,
        param: Tensor,
        grad: Tensor,
        m: Tensor,
        v: Tensor,
        lr: float,
        bc2: float,
        feature: int,
        weight: float,
        grad_square: Tensor | None = None,
        *,
        bc1: float = 1.0,
    ) -> None:
        """The in-place update of one matrix whose direction is ``weight`` times feature ``feature`` (0: ``g``,
        1: ``m``, 2: ``g·r``, 3: ``m·r``, ``r = 1 / sqrt(v̂ + eps²)``) normalised by its RMS: see
        :meth:`_single_feature`. ``d = weight · scale · f`` with ``scale = rsqrt(mean(f²) + 1e-5)``, and
        ``p ← p·(1 - lr·wd) - lr·update_rms · d / sqrt(mean(d²) + 1e-30)`` (× rms(m̂·r) ** ``magnitude_power``),
        as in :meth:`_matrix_update_`.

        With feature 3 and ``magnitude_power=1`` (the shipped default) the two RMS cancel: the step is Adam's with
        eps inside the root, ``lr · update_rms · sign(weight) · m̂ / sqrt(v̂ + eps²)``, taken as one ``addcmul_`` of
        ``m`` and ``rsqrt(v + eps²·bc2)``, without the feature or its sum of squares (three passes over memory fewer;
        equal to the general form up to rounding, except where ``mean(d²)`` is within ~1e-30 of zero: steps below
        ~1e-15 · lr)."""
        n = param.numel()
        if n == 0:
            return
        work = param if param.is_contiguous() else param.contiguous()
        g, m = grad.reshape(-1), m.reshape(-1)
        adam_form = feature == 3 and self._adam_form(weight) and not isinstance(lr, Tensor)
        if adam_form:  # r = rsqrt(v + eps²·bc2) alone: the step is a closed-form multiple of m · r
            r = self._feature_buffer(n, param)
            torch.add(v.reshape(-1), self.eps**2 * bc2, out=r).rsqrt_()
        else:
            source = g if feature in (0, 2) else m
            if feature < 2:  # g or m itself
                f, unit = source, 1.0
                square = grad_square if feature == 0 and grad_square is not None else torch.dot(f, f)
            else:  # stored as f / sqrt(bc2): (g or m) · rsqrt(v + eps²·bc2), as the MLP path's feature rows
                f, unit = self._feature_buffer(n, param), math.sqrt(bc2)
                torch.add(v.reshape(-1), self.eps**2 * bc2, out=f).rsqrt_().mul_(source)
                square = torch.dot(f, f)
            mr_square = square  # × rms(m̂ · r) ** power: m · r is unit · f for feature 3, else one more pass
            if self.magnitude_power and feature != 3:
                mr = m * torch.rsqrt(v.reshape(-1) + self.eps**2 * bc2)
                mr_square = torch.dot(mr, mr)
            alpha = self._single_feature_step(square, mr_square, n, lr, unit, bc2, bc1, weight)
        flat = work.view(-1)
        if self.weight_decay:
            flat.mul_(1 - lr * self.weight_decay)
        if adam_form:
            flat.addcmul_(m, r, value=-self._adam_form_alpha(lr, bc1, bc2, weight))
        elif _takes_cpu_branch(flat):
            flat.add_(f, alpha=-float(alpha))
        else:  # no host sync
            flat.addcmul_(f, alpha, value=-1.0)
        if work is not param:
            param.copy_(work)

    def _adam_form(self, weight: float) -> bool:
        """Whether a direction of ``weight`` times ``m / sqrt(v̂ + eps²)`` (normalised) takes Adam's form: at
        ``magnitude_power=1`` the normalisation and Adam's update size cancel, so the step is a closed-form multiple
        of ``m · rsqrt(v + eps² bc2)`` (:meth:`_adam_form_alpha`) and needs no sum of the feature's squares."""
        return self.magnitude_power == 1 and weight != 0.0

    def _adam_form_alpha(self, lr: float, bc1: float, bc2: float, weight: float) -> float:
        """The factor of ``m · rsqrt(v + eps² bc2)`` in Adam's form: ``lr · update_rms · sign(weight) · m̂ / sqrt(v̂ +
        eps²)`` is that times ``lr · update_rms · sqrt(bc2) / bc1``, signed as ``weight``."""
        return math.copysign(lr * self.update_rms * math.sqrt(bc2) / bc1, weight)

    def _single_feature_step(
        self,
        square: Any,
        mr_square: Any,
        n: int,
        lr: Any,
        unit: float,
        bc2: float,
        bc1: float,
        weight: float,
    ) -> Any:
        """The factor ``α`` of a single-feature step ``p ← p − α f``, from the stored feature's sum of squares
        ``square`` (the feature is ``unit · f``) and that of ``m / sqrt(v + eps² bc2)`` (``mr_square``, for
        ``magnitude_power``): ``α = lr · update_rms · magnitude · w / rms(w f)`` with ``w = weight · scale``, ``scale``
        the feature's normaliser (as the MLP path's). Tensors in, a tensor out; Python floats in, a float out."""
        floats = not isinstance(square, Tensor)
        rsqrt: Callable[[Any], Any] = (lambda x: 1.0 / math.sqrt(x)) if floats else torch.rsqrt
        scale = rsqrt(square * (unit * unit / n) + 1e-5) * unit
        w = scale * weight  # d = w · f
        step = lr * self.update_rms
        if self.magnitude_power:
            step = step * self._adam_magnitude(mr_square * (bc2 / n), bc1, math.sqrt if floats else torch.sqrt)
        coef = w * rsqrt(w * w * square / n + 1e-30)  # d / rms(d) = coef · f
        return step * coef

    def _compiled_single_update_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[State],
        *,
        lr: float | Tensor,
        step: int,
        horizon: int | None,
        weight: float,
    ) -> None:
        """:meth:`update_` of contiguous matrices whose direction is ``weight · m / sqrt(v̂ + eps²)`` alone, by compiled
        kernels (see :meth:`compile_fast_path`): the moments with the gain's and the feature's sums in one pass,
        Prodigy's passes in one more (``"prodigy"``), and the step in a third. The first kernel is a leaner twin
        of the MLP path's (four sums, not seven; three, without the feature, in Adam's form: ``magnitude_power=1``,
        where the step's size is a closed form, as in :meth:`_single_feature_update_`)."""
        beta1, beta2 = self.betas
        bc1, bc2 = 1 - beta1**step, 1 - beta2**step
        like = params[0]
        c = torch.tensor(self.eps**2 * bc2, dtype=like.dtype, device=like.device)
        adam_form = self._adam_form(weight)
        kernel, extra = (_compiled("adam_moments"), ()) if adam_form else (_compiled("single_moments"), (c,))
        apply = _compiled("single_apply")
        stats, step_lrs = self._compiled_moments_(  # stats (tensors, 3 or 4)
            params,
            grads,
            states,
            lambda g, m, v: kernel(g, m, v, beta1, beta2, *extra),
            lr=lr,
            step=step,
            horizon=horizon,
        )
        # the per-matrix scalars in Python floats (the relative modes read them to the host anyway): dozens of
        # tiny tensor operations per matrix cost more than the kernels on small matrices
        lrs = step_lrs.tolist()
        if adam_form:
            alphas = [self._adam_form_alpha(lr_k, bc1, bc2, weight) for lr_k in lrs]
        else:
            unit = math.sqrt(bc2)
            alphas = [
                self._single_feature_step(square, square, p.numel(), lr_k, unit, bc2, bc1, weight)
                for p, square, lr_k in zip(params, stats[:, 3].tolist(), lrs)
            ]
        scalars = [x for lr_k, alpha in zip(lrs, alphas) for x in (1 - lr_k * self.weight_decay, alpha)]
        factors = torch.tensor(scalars, dtype=like.dtype, device=like.device).view(-1, 2)
        for (decay, alpha), p, s in zip(factors, params, states):
            apply(p.view(-1), s["exp_avg"].view(-1), s["exp_avg_sq"].view(-1), c, decay, alpha)

    def _matrix_update_(
        self,
        param: Tensor,
        grad: Tensor,
        m: Tensor,
        v: Tensor,
        lr: float,
        bc2: float,
        unit: Tensor,
        weights: Tensor,
        biases: Tensor,
        w2: Tensor,
        grad_square: Tensor | None = None,
        *,
        bc1: float = 1.0,
    ) -> None:
        """The in-place update of one matrix; ``grad_square`` is ``|g|²`` when the caller has it already (the relative
        step's gain takes it), so the features' sums skip one pass over the gradient."""
        n, hidden_size = param.numel(), self.hidden_size
        if n == 0:
            return
        work = param if param.is_contiguous() else param.contiguous()
        g, m = grad.reshape(-1), m.reshape(-1)
        buf = self._buffers_for(n, param)
        # One (4, n) feature matrix: g, m (copied) and g·r, m·r with r = rsqrt(v + eps²·bc2), i.e. the features'
        # g / sqrt(v̂ + eps²) divided by sqrt(bc2): a per-row constant, folded into `scale` below. The matrix
        # products read column blocks of it in place (no per-block copies: 3-12 % faster than copying each block
        # into a contiguous buffer, on a 1-thread AVX2 CPU).
        x = buf["x"][:, :n]  # (4, n)
        x[0].copy_(g)
        x[1].copy_(m)
        gr, mr = x[2], x[3]
        torch.add(v.reshape(-1), self.eps**2 * bc2, out=gr).rsqrt_()
        torch.mul(m, gr, out=mr)
        gr.mul_(g)
        gg = torch.dot(g, g) if grad_square is None else grad_square
        sums = torch.stack([gg, torch.dot(m, m), torch.dot(gr, gr), torch.dot(mr, mr)])
        step: float | Tensor = lr * self.update_rms
        if self.magnitude_power:  # × rms(m̂ · r) ** power; the stored row is m · r / sqrt(bc2)
            step = step * self._adam_magnitude(sums[3] * (bc2 / n), bc1)
        scale = torch.rsqrt(sums.mul_(unit).mul_(unit).div_(n).add_(1e-5)).mul_(unit)  # the feature normalisation
        w1 = weights * scale  # the normalisation folded into the weights, (H + 1, 4)
        d = buf["d"][:n]
        z = buf["z"]  # (H + 1, block) in cache
        full = (z, z[:hidden_size], z[hidden_size:])  # views reused by every full block
        square_sums = []
        for start in range(0, n, _FAST_BLOCK):
            stop = min(n, start + _FAST_BLOCK)
            if stop - start == z.shape[1]:
                zb, hidden, skip = full
            else:  # the last, shorter block
                zb = z[:, : stop - start]
                hidden, skip = zb[:hidden_size], zb[hidden_size:]
            torch.addmm(biases, w1, x[:, start:stop], out=zb)
            hidden.relu_()
            segment = d[start:stop]
            torch.addmm(skip, w2, hidden, out=segment.view(1, -1))  # skip + output bias + w2 @ relu(hidden)
            square_sums.append(torch.dot(segment, segment))
        square_sum = torch.stack(square_sums).sum()
        flat = work.view(-1)
        if self.weight_decay:
            flat.mul_(1 - lr * self.weight_decay)
        if _takes_cpu_branch(flat):  # a Python scalar: no more tiny tensor ops
            flat.add_(d, alpha=-float(step) / math.sqrt(float(square_sum) / n + 1e-30))
        else:  # no host sync
            flat.addcmul_(d, step * torch.rsqrt(square_sum / n + 1e-30), value=-1.0)
        if work is not param:
            param.copy_(work)

    def _feature_buffer(self, n: int, like: Tensor) -> Tensor:
        """One row of ``n`` elements for :meth:`_single_feature_update_`'s feature (and ``"prodigy"``'s ``|s̃|``),
        reused like :meth:`_buffers_for`."""
        key = (like.device, like.dtype)
        row = self._single_scratch.get(key)
        if row is None or row.shape[0] < n:
            row = self._single_scratch[key] = torch.empty(n, dtype=like.dtype, device=like.device)
        return row[:n]

    def _buffers_for(self, n: int, like: Tensor) -> dict[str, Tensor]:
        """Scratch reused across tensors and steps (grown to the largest tensor seen), per device and dtype."""
        key = (like.device, like.dtype)
        buf = self._scratch.get(key)
        if buf is None or buf["d"].shape[0] < n:
            block = min(n, _FAST_BLOCK)
            buf = {
                "x": torch.empty(4, n, dtype=like.dtype, device=like.device),
                "d": torch.empty(n, dtype=like.dtype, device=like.device),
                "z": torch.empty(self.hidden_size + 1, block, dtype=like.dtype, device=like.device),
            }
            self._scratch[key] = buf
        return buf

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, version={self.version}, horizon_schedule={self.horizon_schedule}, "
            f"step_size={self.step_size!r}"
        )
