"""``Celo2Rule(magnitude_power=)``: a matrix's normalised step times a power of the RMS of Adam's update."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_meta.optim import Celo2Rule


def _double_state(rule: Celo2Rule, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in rule.init_state(p).items()}


def test_at_power_1_the_initial_rule_takes_exactly_adams_step_in_float64() -> None:
    """The initial direction is ``m / sqrt(v̂ + eps²)`` alone, so at ``magnitude_power=1`` the step is Adam's own,
    ``lr · update_rms · m̂ / sqrt(v̂ + eps²)``, computed here by hand over four steps; at 0 (Celo2's) it is not."""
    lr, beta1, beta2, eps = 0.05, 0.9, 0.999, 1e-8
    adam = Celo2Rule(horizon_schedule=False, magnitude_power=1.0).double().requires_grad_(False)
    normalized = Celo2Rule(horizon_schedule=False).double().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    p, q, expected = start.clone(), start.clone(), start.clone()
    state_p, state_q = _double_state(adam, p), _double_state(normalized, q)
    m, v = torch.zeros_like(start), torch.zeros_like(start)
    for step in range(1, 5):
        grad = torch.randn(start.shape, generator=generator, dtype=torch.float64)
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
        expected = expected - lr * adam.update_rms * m_hat / torch.sqrt(v_hat + eps**2)
        p, state_p = adam.update(p, grad, state_p, lr=lr, step=step)
        q, state_q = normalized.update(q, grad, state_q, lr=lr, step=step)
        torch.testing.assert_close(p, expected, rtol=1e-12, atol=1e-14)
    assert (q - expected).abs().max() > 1e-3


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_on_pure_noise_the_step_shrinks_by_adams_noise_level_to_the_power(power: float) -> None:
    """Gradients that are independent noise from step to step: Adam's update has RMS ``a = sqrt((1 − β₁) / (1 +
    β₁))`` (0.229 at β₁ = 0.9) once the moments have forgotten their start, so the step's RMS is ``lr · update_rms ·
    a ** power``. A fixed gradient gives ``a = 1``: the full step at every power."""
    lr = 0.01
    rule = Celo2Rule(horizon_schedule=False, magnitude_power=power).double().requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    for noisy, expected in ((True, math.sqrt(0.1 / 1.9) ** power), (False, 1.0)):
        p = torch.zeros(50, 40, dtype=torch.float64)
        state = _double_state(rule, p)
        fixed = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        for step in range(1, 401):
            grad = torch.randn(p.shape, generator=generator, dtype=torch.float64) if noisy else fixed
            before = p
            p, state = rule.update(p, grad, state, lr=lr, step=step)
        step_rms = float((p - before).pow(2).mean().sqrt()) / (lr * rule.update_rms)
        assert step_rms == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("power", [-0.5, 1.5, math.nan])
def test_a_magnitude_power_outside_0_1_is_refused_by_name(power: float) -> None:
    with pytest.raises(ValueError, match=r"magnitude_power=.* must be in \[0, 1\]"):
        Celo2Rule(magnitude_power=power)


def test_the_default_is_celo2_prodigy_with_adams_magnitude_and_anneals_better_on_noise() -> None:
    """The default, ``celo2-prodigy-adam``: ``celo2-prodigy``'s weights and settings but for ``magnitude_power=1``,
    ``update_rms=0.6`` and ``prodigy_beta3=0.99``. Its first step is 3x ``celo2-prodigy``'s (Adam's update has RMS 1
    at step 1); on a quadratic whose gradients carry noise it ends nearer the minimum, because its step shrinks where
    the gradient is mostly noise."""
    from lightning_meta.optim import RuleOptimizer, load_pretrained, rule_hash

    default, prodigy = load_pretrained("default"), load_pretrained("celo2-prodigy")
    assert rule_hash(default) == rule_hash(load_pretrained("celo2-prodigy-adam")) == rule_hash(prodigy)
    changed = {k: v for k, v in default.config().items() if prodigy.config()[k] != v}
    assert changed == {"magnitude_power": 1.0, "update_rms": 0.6, "prodigy_beta3": 0.99}

    generator = torch.Generator().manual_seed(0)
    start = torch.randn(32, 32, generator=generator) * 0.1
    target = torch.randn(32, 32, generator=generator) * 0.1
    horizon, first, final = 400, {}, {}
    for name, rule in (("default", default), ("prodigy", prodigy)):
        noise = torch.Generator().manual_seed(1)
        w = torch.nn.Parameter(start.clone())
        opt = RuleOptimizer([w], rule, horizon=horizon)
        for step in range(horizon):
            opt.zero_grad()
            w.grad = (w.detach() - target) + 0.3 * torch.randn(w.shape, generator=noise)
            opt.step()
            if step == 0:
                first[name] = float((w.detach() - start).pow(2).mean().sqrt())
        final[name] = float((w.detach() - target).pow(2).mean())
    assert first["default"] == pytest.approx(3 * first["prodigy"], rel=1e-4)
    assert final["default"] < 0.93 * final["prodigy"]  # 0.87-0.89 over four seeds
