"""``Celo2Rule(magnitude="adam")``: a matrix's normalised step times the RMS of Adam's update."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_meta.optim import Celo2Rule


def test_at_the_initialisation_a_matrix_takes_exactly_adams_step_in_float64() -> None:
    """The initial direction is ``m / sqrt(v̂ + eps²)`` alone, so with Adam's magnitude the step is Adam's own,
    ``lr · update_rms · m̂ / sqrt(v̂ + eps²)``, computed here by hand over four steps; the normalised rule's differs."""
    lr, beta1, beta2, eps = 0.05, 0.9, 0.999, 1e-8
    adam = Celo2Rule(horizon_schedule=False, magnitude="adam").double().requires_grad_(False)
    normalized = Celo2Rule(horizon_schedule=False).double().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    p, q, expected = start.clone(), start.clone(), start.clone()
    state_p = {k: v.double() for k, v in adam.init_state(p).items()}
    state_q = {k: v.double() for k, v in normalized.init_state(q).items()}
    m = torch.zeros_like(start)
    v = torch.zeros_like(start)
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


@pytest.mark.parametrize("magnitude", ["normalized", "adam"])
def test_on_pure_noise_adams_magnitude_shrinks_the_step_to_its_noise_level(magnitude: str) -> None:
    """Gradients that are independent noise from step to step: Adam's update has RMS ``sqrt((1 − β₁) / (1 + β₁))``
    (0.229 at β₁ = 0.9) once the moments have forgotten their start; the normalised step keeps RMS ``lr ·
    update_rms``. Consistent gradients (a fixed direction) give both the full step."""
    lr = 0.01
    rule = Celo2Rule(horizon_schedule=False, magnitude=magnitude).double().requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    for noisy, expected in ((True, math.sqrt(0.1 / 1.9) if magnitude == "adam" else 1.0), (False, 1.0)):
        p = torch.zeros(50, 40, dtype=torch.float64)
        state = {k: v.double() for k, v in rule.init_state(p).items()}
        fixed = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        for step in range(1, 401):
            grad = torch.randn(p.shape, generator=generator, dtype=torch.float64) if noisy else fixed
            before = p
            p, state = rule.update(p, grad, state, lr=lr, step=step)
        step_rms = float((p - before).pow(2).mean().sqrt()) / (lr * rule.update_rms)
        assert step_rms == pytest.approx(expected, rel=0.05)


def test_an_unknown_magnitude_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="magnitude='sign' must be 'normalized' or 'adam'"):
        Celo2Rule(magnitude="sign")  # type: ignore[arg-type]
