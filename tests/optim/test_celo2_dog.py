"""Celo2Rule(step_size="dog"): the distance-over-gradients step against hand computations and a closed form."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_meta.optim import Celo2Rule


def _rms(x: torch.Tensor) -> float:
    return math.sqrt(float((x * x).mean()))


def _reference(
    x0: torch.Tensor, grads: list[torch.Tensor], *, horizon: int, r_eps: float, kappa: float
) -> tuple[list[torch.Tensor], list[float]]:
    """DoG's step length ``r̄_t |g_t| / sqrt(Σ |g_i|²)`` along Adam's direction, written out step by step: the
    RMS-normalised ``m̂ / sqrt(v̂ + eps²)`` for a matrix, AdamW's ``m̂ / (sqrt(v̂) + eps)`` for a vector; schedule
    ``s = (1 + cos(pi t / T)) / 2`` and the hypergradient gain ``h ← h + κ cos(g_t, m_{t-1})``. Returns the
    iterates and the distance estimates (``r_ε`` is given: the rule's state holds it in float32)."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    x, m, v = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0)
    r_bar, g_sum, h = r_eps, 0.0, 0.0
    iterates, distances = [], []
    for t, g in enumerate(grads, start=1):
        g_norm, m_norm = math.sqrt(float((g * g).sum())), math.sqrt(float((m * m).sum()))
        h += kappa * (float((g * m).sum()) / (g_norm * m_norm) if m_norm > 0 else 0.0)
        r_bar = max(r_bar, _rms(x - x0))
        g_sum += g_norm**2
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        length = 0.5 * (1 + math.cos(math.pi * t / horizon)) * math.exp(h) * r_bar * g_norm / math.sqrt(g_sum)
        if x.ndim > 1:
            f = m / torch.sqrt(v / bc2 + eps**2)
            x = x - length * f / _rms(f)
        else:
            x = x - length * (m / bc1) / (torch.sqrt(v / bc2) + eps)
        iterates.append(x)
        distances.append(r_bar)
    return iterates, distances


def test_three_dog_steps_equal_a_hand_computation_in_float64() -> None:
    """A 2x3 matrix and a zero-initialised bias (its ``r_ε`` from the ``min_rms`` floor), three steps of
    gradients that keep their direction: ``update`` (functional) and ``update_`` (in place, the optimizer's path)
    both match the reference to 1e-12, and the matrix's distance estimate has grown past ``r_ε`` by step 3."""
    rule = Celo2Rule(
        step_size="dog", relative_step=0.2, min_rms=0.1, gain_rate=0.1, warmup_fraction=0.0, final_fraction=0.0
    ).double()
    rule.requires_grad_(False)
    weight = torch.tensor([[0.5, -0.3, 0.2], [0.1, 0.0, -0.4]], dtype=torch.float64)
    bias = torch.zeros(3, dtype=torch.float64)
    grads = {
        "weight": [
            torch.tensor([[0.3, -0.2, 0.1], [0.05, 0.4, -0.1]], dtype=torch.float64),
            torch.tensor([[0.5, -0.1, 0.3], [0.1, 0.6, -0.2]], dtype=torch.float64),
            torch.tensor([[0.2, -0.3, 0.2], [0.0, 0.5, 0.1]], dtype=torch.float64),
        ],
        "bias": [torch.tensor(g, dtype=torch.float64) for g in ([0.2, -0.1, 0.3], [0.1, -0.3, 0.2], [0.4, 0.1, 0.2])],
    }
    horizon = 6
    for name, x0 in (("weight", weight), ("bias", bias)):
        state = {k: v.double() for k, v in rule.init_state(x0).items()}
        r_eps = float(state["step_scale"])
        assert r_eps == pytest.approx(0.2 * max(_rms(x0), 0.1), rel=1e-7)  # float32 state
        expected, distances = _reference(x0, grads[name], horizon=horizon, r_eps=r_eps, kappa=0.1)
        functional, fast = x0.clone(), [x0.clone()]
        fast_state = [{k: v.clone() for k, v in state.items()}]
        for t, g in enumerate(grads[name], start=1):
            functional, state = rule.update(functional, g, state, lr=1.0, step=t, horizon=horizon)
            rule.update_(fast, [g], fast_state, lr=1.0, step=t, horizon=horizon)
            torch.testing.assert_close(functional, expected[t - 1], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(fast[0], expected[t - 1], rtol=1e-12, atol=1e-15)
            assert float(state["distance"]) == pytest.approx(distances[t - 1], rel=1e-12)
            assert float(fast_state[0]["distance"]) == pytest.approx(distances[t - 1], rel=1e-12)
        torch.testing.assert_close(state["initial"], x0, rtol=0, atol=0)  # x_0 is kept, not moved
        assert distances[0] == distances[1] == pytest.approx(r_eps, rel=1e-12)  # the first steps move ≤ r_ε
        assert distances[2] > 1.05 * r_eps  # two aligned steps: the estimate grows


def test_the_estimate_grows_a_too_small_step_on_a_quadratic_along_the_closed_form_line() -> None:
    """``f(x) = |x - x*|² / 2`` with every entry of ``x* - x_0`` equal to ±1 (RMS 1) and ``r_ε`` = 1e-3 of it.
    Every entry's gradient then has the same size, Adam's direction is ``sign(m_t) (x* - x_0)``, so the iterates
    stay on the line ``x_0 + a_t (x* - x_0)`` (checked) and ``a_t`` follows the scalar recursion ``a_{t+1} = a_t +
    sign(m_t) r̄_t |1 - a_t| / sqrt(Σ_{i≤t} (1 - a_i)²)``, ``r̄_t = min(max(r_ε, |a_i|, i≤t), 300 r_ε)``, ``m_t``
    the momentum of ``1 - a_t`` (no schedule, no gain). The step grows from ``r_ε`` by more than 40x; the relative
    rule with the same first step and its shrink-only gain never takes a larger one and stays near ``x_0``."""
    generator = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (4, 4), generator=generator, dtype=torch.float64) * 2 - 1
    x0 = 0.1 * (torch.randint(0, 2, (4, 4), generator=generator, dtype=torch.float64) * 2 - 1)  # RMS 0.1
    target = x0 + signs
    kwargs = {"relative_step": 0.01, "min_rms": 0.01, "horizon_schedule": False, "gain_rate": 0.0}
    dog = Celo2Rule(step_size="dog", max_growth=300.0, **kwargs).double().requires_grad_(False)
    # relative mode's matrix step is update_rms · relative_step · rms(x_0): the same first step as DoG's r_ε
    relative = Celo2Rule(
        step_size="relative", **{**kwargs, "relative_step": 0.01 / 0.2, "gain_rate": 0.05, "max_log_gain": 0.0}
    )
    relative = relative.double().requires_grad_(False)
    r_eps, steps = float(dog.init_state(x0)["step_scale"]), 30  # 0.01 · rms(x_0), held in float32
    assert r_eps == pytest.approx(1e-3, rel=1e-7)
    a, r_bar, grad_sum, momentum = 0.0, r_eps, 0.0, 0.0
    closed_form = []
    for _ in range(steps):
        r_bar, grad_sum = min(max(r_bar, abs(a)), 300.0 * r_eps), grad_sum + (1 - a) ** 2
        momentum = 0.9 * momentum + 0.1 * (1 - a)  # Adam's direction is sign(m) · (x* - x_0)
        a = a + math.copysign(r_bar * abs(1 - a) / math.sqrt(grad_sum), momentum)
        closed_form.append(a)
    lengths: dict[str, list[float]] = {"dog": [], "relative": []}
    for name, rule in (("dog", dog), ("relative", relative)):
        x = [x0.clone()]
        state = [{k: v.double() for k, v in rule.init_state(x0).items()}]
        for t in range(1, steps + 1):
            before = x[0].clone()
            rule.update_(x, [x[0] - target], state, lr=1.0, step=t)
            lengths[name].append(_rms(x[0] - before))
            if name == "dog":
                moved = x[0] - x0
                torch.testing.assert_close(moved, closed_form[t - 1] * signs, rtol=1e-9, atol=1e-12)
    assert lengths["dog"][0] == pytest.approx(r_eps, rel=1e-9)
    assert lengths["relative"][0] == pytest.approx(r_eps, rel=1e-7)  # its c₀ in float32 too
    assert max(lengths["dog"]) > 40 * r_eps and closed_form[-1] > 0.5  # 46x; x_30 is 60 % of the way
    first = lengths["relative"][0]
    assert max(lengths["relative"]) <= first * (1 + 1e-12) and _rms(x[0] - x0) <= steps * first * (1 + 1e-12)


def test_dog_state_has_the_initial_tensor_and_the_estimates() -> None:
    """Per tensor: a float32 copy of ``x_0`` (bf16 parameters too), ``r̄ = r_ε``, an empty gradient history."""
    rule = Celo2Rule(step_size="dog", relative_step=0.05, min_rms=0.1)
    param = torch.tensor([[0.3, -0.4], [0.0, 0.5]], dtype=torch.bfloat16)
    state = rule.init_state(param)
    assert set(state) == {"exp_avg", "exp_avg_sq", "step_scale", "log_gain", "initial", "distance", "grad_sq_sum"}
    assert state["initial"].dtype == torch.float32 and torch.equal(state["initial"], param.float())
    assert state["initial"].data_ptr() != param.data_ptr()
    expected = 0.05 * max(_rms(param.float()), 0.1)
    assert float(state["distance"]) == pytest.approx(expected, rel=1e-6) and float(state["grad_sq_sum"]) == 0.0
    assert rule.relative_lr and "initial" not in Celo2Rule(step_size="relative").init_state(param)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step_size": "dogg"}, "step_size='dogg' must be 'lr', 'relative', 'dog' or 'prodigy'"),
        ({"step_size": "dog", "max_growth": 0.5}, "max_growth=0.5 finite and >= 1"),
        ({"step_size": "dog", "max_growth": math.inf}, "max_growth=inf finite and >= 1"),
        ({"step_size": "dog", "relative_step": math.nan}, "relative_step=nan"),
        ({"step_size": "dog", "min_rms": 0.0}, "min_rms=0.0 > 0"),
    ],
)
def test_bad_dog_arguments_are_refused_by_name(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        Celo2Rule(**kwargs)
