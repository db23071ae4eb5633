"""Celo2Rule(step_size="prodigy"): the Prodigy distance estimate against hand computations and its convex bound."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import lightning_meta.optim.celo2 as celo2_module
from lightning_meta.callbacks import LearnedOptimizer
from lightning_meta.optim import Celo2Rule, RuleOptimizer, load_pretrained, rule_record


def _rms(x: torch.Tensor) -> float:
    return math.sqrt(float((x * x).mean()))


def _reference(
    x0: torch.Tensor,
    grads: list[torch.Tensor],
    *,
    horizon: int,
    d0: float,
    kappa: float,
    beta3: float,
    cap: float,
    update_rms: float,
) -> tuple[list[torch.Tensor], list[dict[str, float | torch.Tensor]]]:
    """Prodigy's estimate written out step by step (Mishchenko & Defazio 2023, Adam form, per tensor): with ``γ_k =
    s(k/T) exp(h_k)`` (schedule ``s = (1 + cos(pi k / T)) / 2``, gain ``h ← h + κ cos(g_k, m_{k-1})``) and ``λ_k =
    γ_k d_k² / d₀``: ``r_k = β₃ r_{k-1} + λ_k <g_k, x_0 − x_k>``, ``s_k = β₃ s_{k-1} + λ_k g_k``, ``d_{k+1} =
    min(max(d_k, r_k / |s_k|_1), cap)``; the step moves ``γ_k d_k · update_rms`` (RMS) along the RMS-normalised
    ``m̂ / sqrt(v̂ + eps²)`` for a matrix, ``γ_k d_k · m̂ / (sqrt(v̂) + eps)`` for a vector (Prodigy-Adam's step with
    ``d`` as its learning rate). Returns the iterates and, per step,
    ``r``, ``s`` and the new ``d`` (``d₀`` is given: the rule's state holds it in float32)."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    x, m, v = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0)
    d, r, s, h = d0, 0.0, torch.zeros_like(x0), 0.0
    iterates, states = [], []
    for k, g in enumerate(grads, start=1):
        g_norm, m_norm = math.sqrt(float((g * g).sum())), math.sqrt(float((m * m).sum()))
        h += kappa * (float((g * m).sum()) / (g_norm * m_norm) if m_norm > 0 else 0.0)
        gamma = 0.5 * (1 + math.cos(math.pi * k / horizon)) * math.exp(h)
        weight = gamma * d * d / d0
        r = beta3 * r + weight * float((g * (x0 - x)).sum())
        s = beta3 * s + weight * g
        d_next = min(max(d, r / float(s.abs().sum())), cap)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        bc1, bc2 = 1 - beta1**k, 1 - beta2**k
        if x.ndim > 1:
            f = m / torch.sqrt(v / bc2 + eps**2)
            x = x - gamma * d * update_rms * f / _rms(f)
        else:
            x = x - gamma * d * (m / bc1) / (torch.sqrt(v / bc2) + eps)
        d = d_next
        iterates.append(x)
        states.append({"numerator": r, "grad_sum": s.clone(), "estimate": d})
    return iterates, states


def test_three_prodigy_steps_equal_a_hand_computation_in_float64() -> None:
    """A 2x3 matrix and a zero-initialised bias (its ``d₀`` from the ``min_rms`` floor), three steps of gradients
    that keep their direction and grow: ``update`` (functional) and ``update_`` (in place, the optimizer's path)
    match the reference to 1e-12 (iterates, ``r``, ``s``, ``d``), and the estimate has grown past ``d₀`` by step 3
    on both tensors; ``x_0`` is kept."""
    rule = Celo2Rule(
        step_size="prodigy",
        prodigy_d0=0.05,
        prodigy_beta3=0.9,
        min_rms=0.1,
        update_rms=2.0,
        gain_rate=0.1,
        warmup_fraction=0.0,
        final_fraction=0.0,
    ).double()
    rule.requires_grad_(False)
    weight = torch.tensor([[0.5, -0.3, 0.2], [0.1, 0.0, -0.4]], dtype=torch.float64)
    bias = torch.zeros(3, dtype=torch.float64)
    grads = {
        "weight": [
            torch.tensor([[0.3, -0.2, 0.1], [0.05, 0.4, -0.1]], dtype=torch.float64),
            torch.tensor([[0.5, -0.1, 0.3], [0.1, 0.6, -0.2]], dtype=torch.float64),
            torch.tensor([[1.2, -0.9, 0.6], [0.3, 1.5, -0.3]], dtype=torch.float64),
        ],
        "bias": [torch.tensor(g, dtype=torch.float64) for g in ([0.2, -0.1, 0.3], [0.1, -0.3, 0.2], [0.8, -0.6, 0.9])],
    }
    horizon = 6
    for name, x0 in (("weight", weight), ("bias", bias)):
        state = {k: v.double() for k, v in rule.init_state(x0).items()}
        d0 = float(state["step_scale"])
        assert d0 == pytest.approx(0.05 * max(_rms(x0), 0.1), rel=1e-7)  # float32 state
        expected, references = _reference(
            x0, grads[name], horizon=horizon, d0=d0, kappa=0.1, beta3=0.9, cap=d0 * math.inf, update_rms=2.0
        )
        functional, fast = x0.clone(), [x0.clone()]
        fast_state = [{k: v.clone() for k, v in state.items()}]
        for k, g in enumerate(grads[name], start=1):
            functional, state = rule.update(functional, g, state, lr=1.0, step=k, horizon=horizon)
            rule.update_(fast, [g], fast_state, lr=1.0, step=k, horizon=horizon)
            torch.testing.assert_close(functional, expected[k - 1], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(fast[0], expected[k - 1], rtol=1e-12, atol=1e-15)
            for values in (state, fast_state[0]):
                assert float(values["estimate"]) == pytest.approx(references[k - 1]["estimate"], rel=1e-12)
                assert float(values["numerator"]) == pytest.approx(references[k - 1]["numerator"], rel=1e-12)
                s = values["grad_sum_scale"] * values["grad_sum"]  # s is kept as c · s̃
                torch.testing.assert_close(s, references[k - 1]["grad_sum"], rtol=1e-12, atol=0)
        torch.testing.assert_close(state["initial"], x0, rtol=0, atol=0)  # x_0 is kept, not moved
        estimates = [float(ref["estimate"]) for ref in references]
        assert references[0]["numerator"] == 0.0 and estimates[0] == d0  # x_1 = x_0: nothing correlates yet
        assert estimates[2] > 1.2 * d0, estimates  # the gradients keep correlating with the distance travelled


@pytest.mark.parametrize("shape", [(16,), (4, 4)], ids=["vector", "matrix"])
def test_on_a_convex_quadratic_the_estimate_grows_from_d0_and_stays_below_the_distance(shape: tuple[int, ...]) -> None:
    """``f(x) = Σ a_j (x_j − x*_j)² / 2`` with curvatures ``a_j`` from 0.1 to 10 (convex). Convexity gives
    ``<g_i, x_i − x*> ≥ 0``, so ``r_k = Σ w_i <g_i, x_0 − x_i> ≤ <s_k, x_0 − x*> ≤ |s_k|_1 |x_0 − x*|_∞`` (checked at
    every step from the state) and ``d`` never exceeds ``D = |x_0 − x*|_∞`` (Prodigy's ``d ≤ D``). With the paper's
    ``d₀`` = 1e-6 (times the tensor's RMS) the estimate grows by more than 1e5 to within a factor 10 of ``D``, never
    decreasing, and the loss falls by 1e-3; the vector takes the AdamW direction, the matrix the normalised one."""
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(shape, generator=generator, dtype=torch.float64)
    target = x0 + 2 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1
    curvature = 10.0 ** (2 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1)
    bound = float((x0 - target).abs().max())
    rule = Celo2Rule(step_size="prodigy", final_fraction=0.0, warmup_fraction=0.0, gain_rate=0.05, max_log_gain=0.0)
    rule = rule.double().requires_grad_(False)
    x, steps = [x0.clone()], 300
    state = [{k: v.double() for k, v in rule.init_state(x0).items()}]
    d0 = float(state[0]["step_scale"])
    assert d0 == pytest.approx(1e-6 * _rms(x0), rel=1e-7)
    estimates = []
    for k in range(1, steps + 1):
        rule.update_(x, [curvature * (x[0] - target)], state, lr=1.0, step=k, horizon=steps)
        estimates.append(float(state[0]["estimate"]))
        l1 = float(state[0]["grad_sum"].abs().sum())
        assert float(state[0]["numerator"]) <= l1 * bound * (1 + 1e-12) + 1e-300
    assert all(b >= a for a, b in zip(estimates, estimates[1:]))
    assert max(estimates) <= bound and estimates[-1] > 1e5 * d0 and estimates[-1] > bound / 10, (estimates[-1], bound)
    loss0 = float((curvature * (x0 - target) ** 2).sum()) / 2
    assert float((curvature * (x[0] - target) ** 2).sum()) / 2 < 1e-3 * loss0


def test_the_fast_path_equals_the_functional_update_with_growth_and_cap_in_float64(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fifteen steps of ``update_`` and ``update`` on a quadratic (1-D, 2-D, 4-D, several column blocks, a scalar,
    an empty tensor), weight decay and clamped gains: iterates and states agree (1e-10); the estimates grew on
    every nonempty tensor and the cap (``prodigy_max_d`` = 0.1 of the RMS, 100 ``d₀``) stopped some."""
    monkeypatch.setattr(celo2_module, "_FAST_BLOCK", 128)
    rule = Celo2Rule(
        step_size="prodigy",
        prodigy_d0=1e-3,
        prodigy_max_d=0.1,
        weight_decay=0.1,
        gain_rate=0.3,
        min_log_gain=-0.4,
        max_log_gain=0.5,
    ).double()
    rule.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (7,), (), (4, 3, 3, 3), (300, 2), (0, 3)]
    start = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    targets = [p + 3 * torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in start]
    functional, fast = [p.clone() for p in start], [p.clone() for p in start]
    states_f = [{k: v.double() for k, v in rule.init_state(p).items()} for p in start]
    states_x = [{k: v.clone() for k, v in s.items()} for s in states_f]
    for step in range(1, 16):
        grads = [p - t for p, t in zip(fast, targets)]
        for i in range(len(start)):
            functional[i], states_f[i] = rule.update(
                functional[i], grads[i], states_f[i], lr=0.7, step=step, horizon=30
            )
        rule.update_(fast, grads, states_x, lr=0.7, step=step, horizon=30)
        for i in range(len(start)):
            torch.testing.assert_close(fast[i] - start[i], functional[i] - start[i], rtol=1e-10, atol=1e-14)
            for key in states_f[i]:
                torch.testing.assert_close(states_x[i][key], states_f[i][key], rtol=1e-10, atol=1e-14)
    growth = [float(s["estimate"] / s["step_scale"]) for s, p in zip(states_x, start) if p.numel()]
    assert all(g > 1.02 for g in growth) and max(growth) == pytest.approx(100.0, rel=1e-6), growth
    assert min(growth) < 100.0 * (1 - 1e-6)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for _ in steps:  # one fixed batch: gradients that keep correlating, so the estimates grow quickly
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        (model(x) - x[:, :1]).pow(2).mean().backward()
        opt.step()


def test_resume_through_rule_optimizer_is_bit_identical_with_a_grown_estimate() -> None:
    """30 steps straight vs 15, a ``weights_only`` checkpoint, 15 more: bit-identical parameters; the checkpoint
    holds ``x_0``, ``s``, ``r`` and estimates that had grown past ``d₀`` (10x on some tensors), so the resumed run
    depends on them."""
    straight, resumed = _model(), _model()
    rule = Celo2Rule(step_size="prodigy", final_fraction=0.0, warmup_fraction=0.0, gain_rate=0.05, max_log_gain=0.0)
    opt = RuleOptimizer(straight.parameters(), rule, horizon=100)
    _train(straight, opt, range(15))
    buffer = io.BytesIO()
    torch.save({"model": straight.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(straight, opt, range(15, 30))
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    saved = list(checkpoint["opt"]["state"].values())
    assert all({"initial", "grad_sum", "numerator", "estimate"} <= set(state) for state in saved)
    assert all(float(state["estimate"]) >= float(state["step_scale"]) for state in saved)
    assert max(float(state["estimate"] / state["step_scale"]) for state in saved) > 10
    resumed.load_state_dict(checkpoint["model"])
    opt2 = RuleOptimizer(resumed.parameters(), copy.deepcopy(rule), horizon=100)
    opt2.load_state_dict(checkpoint["opt"])
    _train(resumed, opt2, range(15, 30))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(straight.parameters()), next(_model().parameters()))


def test_a_record_from_before_the_prodigy_settings_existed_loads_when_they_are_at_their_defaults() -> None:
    """A checkpoint's rule record without ``prodigy_d0``, ``prodigy_beta3``, ``prodigy_max_d`` (written before they
    existed) loads with a warning into a rule that has them at their defaults, and is refused, naming the setting,
    when one is not."""
    rule = Celo2Rule(step_size="relative")
    state = LearnedOptimizer(rule).state_dict()
    added = ("prodigy_beta3", "prodigy_d0", "prodigy_max_d")
    assert set(added) <= set(state["rule"]["config"])
    older = {**state["rule"], "config": {k: v for k, v in state["rule"]["config"].items() if k not in added}}
    older["hash"] = "0" * 16  # its fingerprint covered fewer settings
    expected = r"before the setting\(s\) of prodigy_beta3=None, prodigy_d0=1e-06, prodigy_max_d=inf existed"
    with pytest.warns(UserWarning, match=expected):
        LearnedOptimizer(copy.deepcopy(rule)).load_state_dict({**state, "rule": older})
    with pytest.raises(ValueError, match=r"prodigy_d0 '<unset>' vs 0\.001"):
        LearnedOptimizer(Celo2Rule(step_size="relative", prodigy_d0=1e-3)).load_state_dict({**state, "rule": older})


def test_prodigy_state_has_the_initial_tensor_and_the_estimates() -> None:
    """Per tensor: a float32 copy of ``x_0`` (bf16 parameters too), ``s = c · s̃ = 0`` (``s̃`` float32 of the tensor's
    shape, ``c = 1``), ``d = d₀ = prodigy_d0 · max(rms(x_0), min_rms)``, ``r = 0``."""
    rule = Celo2Rule(step_size="prodigy", prodigy_d0=1e-4, min_rms=0.1)
    param = torch.tensor([[0.3, -0.4], [0.0, 0.5]], dtype=torch.bfloat16)
    state = rule.init_state(param)
    assert set(state) == {
        "exp_avg",
        "exp_avg_sq",
        "step_scale",
        "log_gain",
        "initial",
        "estimate",
        "numerator",
        "grad_sum",
        "grad_sum_scale",
    }
    assert state["initial"].dtype == torch.float32 and torch.equal(state["initial"], param.float())
    assert state["initial"].data_ptr() != param.data_ptr()
    assert state["grad_sum"].dtype == torch.float32 and state["grad_sum"].shape == param.shape
    assert not state["grad_sum"].any() and float(state["numerator"]) == 0.0
    assert float(state["grad_sum_scale"]) == 1.0 and state["grad_sum_scale"].dtype == torch.float32
    expected = 1e-4 * max(_rms(param.float()), 0.1)
    assert float(state["estimate"]) == float(state["step_scale"]) == pytest.approx(expected, rel=1e-6)
    assert rule.relative_lr and rule._beta3() == pytest.approx(math.sqrt(0.999), rel=1e-15)


def test_vector_min_rms_floors_the_1d_tensors_alone_and_sets_a_zero_bias_first_step() -> None:
    """``vector_min_rms`` replaces ``min_rms`` for 1-D tensors only (also one per problem of a batch): a zero bias
    starts at ``d₀ = prodigy_d0 · vector_min_rms``, a bias above the floor and the matrices keep theirs; the bias's
    first step under ``RuleOptimizer`` is AdamW's ``lr · d₀ · s(1/T) · sign(g)`` (``m̂ / sqrt(v̂) = sign(g)``)."""
    floors = {"min_rms": 0.1, "prodigy_d0": 0.1}
    plain = Celo2Rule(step_size="prodigy", **floors)
    rule = Celo2Rule(step_size="prodigy", vector_min_rms=1.0, **floors)
    zero_bias, big_bias, small_matrix = torch.zeros(3), torch.full((3,), 2.0), torch.full((2, 2), 0.01)
    for param, expected, expected_plain in (
        (zero_bias, 0.1, 0.01),  # 0.1 · max(0, 1) and 0.1 · max(0, 0.1)
        (big_bias, 0.2, 0.2),  # its RMS (2) is above both floors
        (small_matrix, 0.01, 0.01),  # matrices keep min_rms
    ):
        assert float(rule.init_state(param)["estimate"]) == pytest.approx(expected, rel=1e-6)
        assert float(plain.init_state(param)["estimate"]) == pytest.approx(expected_plain, rel=1e-6)
    batched = rule.init_state(torch.stack([zero_bias, big_bias]), batch_dims=1)["estimate"].flatten()
    assert batched.tolist() == pytest.approx([0.1, 0.2], rel=1e-6)

    bias = nn.Parameter(torch.zeros(3))
    optimizer = RuleOptimizer([bias], rule, lr=1.0, horizon=50)
    bias.grad = torch.tensor([0.5, -2.0, 3e-3])
    optimizer.step()
    step = 0.1 * float(rule.step_multiplier(torch.tensor(1.0), 50))
    assert bias.detach().tolist() == pytest.approx([-step, step, -step], rel=1e-4)


def test_vector_min_rms_set_on_the_shipped_default_is_applied_and_recorded() -> None:
    """The guide's recipe, ``load_pretrained("default").replace(vector_min_rms=1.0)``:
    the same weights, a zero bias starts at ``prodigy_d0 · 1``, the rule's record (checked on resume) holds the
    setting, and a checkpoint of the unchanged default is refused by it, naming the setting."""
    default = load_pretrained("default")
    rule = default.replace(vector_min_rms=1.0)
    assert rule_record(rule)["weights_hash"] == rule_record(default)["weights_hash"]
    assert float(rule.init_state(torch.zeros(4))["estimate"]) == pytest.approx(rule.prodigy_d0, rel=1e-6)
    assert float(default.init_state(torch.zeros(4))["estimate"]) == pytest.approx(rule.prodigy_d0 * rule.min_rms)
    assert rule_record(rule)["config"]["vector_min_rms"] == 1.0
    with pytest.raises(ValueError, match=r"vector_min_rms None vs 1\.0"):
        LearnedOptimizer(rule).load_state_dict(LearnedOptimizer(default).state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step_size": "prodigi"}, "step_size='prodigi' must be 'lr', 'relative', 'dog' or 'prodigy'"),
        ({"step_size": "prodigy", "prodigy_d0": 0.0}, "prodigy_d0=0.0 must be finite and > 0"),
        ({"step_size": "prodigy", "prodigy_d0": math.inf}, "prodigy_d0=inf must be finite and > 0"),
        ({"step_size": "prodigy", "prodigy_beta3": 0.0}, r"prodigy_beta3=0.0 None or in \(0, 1\]"),
        ({"step_size": "prodigy", "prodigy_beta3": 1.5}, r"prodigy_beta3=1.5 None or in \(0, 1\]"),
        ({"step_size": "prodigy", "prodigy_d0": 0.1, "prodigy_max_d": 0.01}, "prodigy_max_d=0.01 >= prodigy_d0"),
        ({"step_size": "prodigy", "prodigy_max_d": math.nan}, "prodigy_max_d=nan >= prodigy_d0"),
        ({"step_size": "prodigy", "vector_min_rms": 0.0}, r"vector_min_rms=0.0 must be None \(min_rms\) or finite"),
        ({"step_size": "prodigy", "vector_min_rms": math.inf}, "vector_min_rms=inf must be None"),
        ({"step_size": "prodigy", "vector_min_rms": math.nan}, "vector_min_rms=nan must be None"),
    ],
)
def test_bad_prodigy_arguments_are_refused_by_name(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Celo2Rule(**kwargs)


def test_bf16_parameters_keep_the_estimate_state_in_float32() -> None:
    """A bf16 model under ``RuleOptimizer`` (float32 working copies): after one step the state is float32, ``x_0`` is
    the bf16 initial value and ``s = λ_1 g = d₀ g`` (no schedule, ``h_1 = 0``) to float32 precision."""
    torch.manual_seed(0)
    model = nn.Linear(7, 5).to(torch.bfloat16)
    start = [p.detach().clone() for p in model.parameters()]
    opt = RuleOptimizer(model.parameters(), Celo2Rule(step_size="prodigy", prodigy_d0=1e-2, horizon_schedule=False))
    model(torch.randn(3, 7).to(torch.bfloat16)).float().pow(2).mean().backward()
    grads = [p.grad.float() for p in model.parameters()]
    opt.step()
    for p0, g, state in zip(start, grads, opt.state.values()):
        assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
        assert torch.equal(state["initial"], p0.float())
        s = state["grad_sum_scale"] * state["grad_sum"]  # s = c · s̃
        torch.testing.assert_close(s, state["step_scale"] * g, rtol=1e-6, atol=0)
    assert not all(torch.equal(p0, p) for p0, p in zip(start, model.parameters()))


def test_celo2_prodigy_starts_where_celo2_auto_does_and_then_grows() -> None:
    """``celo2-prodigy`` (the default before ``celo2-prodigy-adam``): ``celo2-auto``'s weights and settings with the Prodigy step from ``d₀`` = the
    relative mode's first step, so its first step equals ``celo2-auto``'s; on a quadratic far from its minimum the estimate grows
    and it gets to the minimum where celo2-auto's fixed scale has hardly moved in the same 200 steps."""
    from lightning_meta.optim import load_pretrained, rule_hash

    prodigy, auto = load_pretrained("celo2-prodigy"), load_pretrained("celo2-auto")
    assert prodigy.step_size == "prodigy" and prodigy.prodigy_d0 == auto.relative_step
    assert auto.step_size == "relative"
    same_weights = Celo2Rule(**{**prodigy.config(), "step_size": "relative"})
    same_weights.load_state_dict(prodigy.state_dict())
    assert rule_hash(same_weights) == rule_hash(auto)

    torch.manual_seed(0)
    start = torch.randn(16, 16) * 0.1
    target = torch.full((16, 16), 3.0)  # far away relative to the weights' scale
    paths = {}
    for name, rule in (("prodigy", prodigy), ("auto", auto)):
        w = nn.Parameter(start.clone())
        opt = RuleOptimizer([w], rule, horizon=200)
        trace = []
        for _ in range(200):
            opt.zero_grad()
            (0.5 * (w - target).pow(2).sum()).backward()
            opt.step()
            trace.append(w.detach().clone())
        paths[name] = trace
        if name == "prodigy":
            estimates = list(opt.state.values())
    torch.testing.assert_close(paths["prodigy"][0], paths["auto"][0], rtol=1e-6, atol=1e-7)
    far = {n: float((p[-1] - target).norm()) for n, p in paths.items()}
    (state,) = estimates
    assert float(state["estimate"].max()) > 10 * float(state["step_scale"])  # grown from d₀ (about 150x here)
    assert far["prodigy"] < 0.05 * far["auto"]  # celo2-auto's step cannot grow past its first one


def test_the_lazily_scaled_sum_matches_the_reference_through_renormalisations_in_float64() -> None:
    """``s`` is kept as ``c · s̃`` (``c ← β₃ c``, ``s̃ ← s̃ + (λ / c) g``, and ``s̃ ← c s̃``, ``c ← 1`` once ``c`` falls
    below 2⁻²⁴). With ``β₃ = 0.5`` that happens at steps 25 and 50 of 60: ``update`` (functional) and ``update_``
    (in place) both match the hand computation, which keeps ``s`` itself, to 1e-12 at every step (iterates, ``r``,
    ``s = c · s̃``, ``d``), on a matrix and a vector, and agree with each other to 1e-12."""
    rule = Celo2Rule(
        step_size="prodigy",
        prodigy_d0=0.05,
        prodigy_beta3=0.5,
        prodigy_max_d=0.5,
        min_rms=0.1,
        update_rms=2.0,
        gain_rate=0.05,  # |h| ≤ 3 in 60 steps: never clamped (the reference does not clamp)
        warmup_fraction=0.0,
        final_fraction=0.0,
    ).double()
    rule.requires_grad_(False)
    generator = torch.Generator().manual_seed(3)
    horizon, steps = 80, 60
    for shape in ((5, 4), (6,)):
        x0 = torch.randn(shape, generator=generator, dtype=torch.float64)
        drift = torch.randn(shape, generator=generator, dtype=torch.float64)  # gradients that keep a direction
        grads = [drift + 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(steps)]
        state = {k: v.double() for k, v in rule.init_state(x0).items()}
        d0 = float(state["step_scale"])
        expected, references = _reference(
            x0, grads, horizon=horizon, d0=d0, kappa=0.05, beta3=0.5, cap=d0 * 10, update_rms=2.0
        )
        functional, fast = x0.clone(), [x0.clone()]
        fast_state = [{k: v.clone() for k, v in state.items()}]
        renormalised = []
        for k, g in enumerate(grads, start=1):
            functional, state = rule.update(functional, g, state, lr=1.0, step=k, horizon=horizon)
            rule.update_(fast, [g], fast_state, lr=1.0, step=k, horizon=horizon)
            torch.testing.assert_close(functional, expected[k - 1], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(fast[0], expected[k - 1], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(fast[0], functional, rtol=1e-12, atol=1e-15)
            for values in (state, fast_state[0]):
                assert float(values["estimate"]) == pytest.approx(references[k - 1]["estimate"], rel=1e-12)
                assert float(values["numerator"]) == pytest.approx(references[k - 1]["numerator"], rel=1e-12)
                s = values["grad_sum_scale"] * values["grad_sum"]
                torch.testing.assert_close(s, references[k - 1]["grad_sum"], rtol=1e-12, atol=1e-300)
            assert float(state["grad_sum_scale"]) == float(fast_state[0]["grad_sum_scale"])
            if float(state["grad_sum_scale"]) == 1.0:
                renormalised.append(k)
        assert renormalised == [25, 50]  # c = 0.5**k: 2**-24 at step 24 is not below the bound, 2**-25 is
        assert references[-1]["estimate"] > 1.5 * d0  # the estimate grew, so the sum's scale mattered


def test_a_state_that_holds_s_itself_continues_as_the_lazily_scaled_one_does() -> None:
    """A state written before ``grad_sum_scale`` existed holds ``s`` in ``grad_sum`` and no scale: it is read as
    ``c = 1``. Ten steps from it equal ten steps from the same state in the new layout (float64, 1e-12), by
    ``update`` and by ``update_``, which adds the scale to the state it is given; through ``RuleOptimizer`` such an
    optimizer state loads and continues as the saved one does (float32, to rounding) and gains ``grad_sum_scale``."""
    rule = Celo2Rule(step_size="prodigy", prodigy_d0=0.05, warmup_fraction=0.0, final_fraction=0.0).double()
    rule.requires_grad_(False)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=generator, dtype=torch.float64) + 1.0 for _ in range(20)]
    state = {k: v.double() for k, v in rule.init_state(x).items()}
    for k in range(1, 11):
        x, state = rule.update(x, grads[k - 1], state, lr=1.0, step=k, horizon=40)
    assert float(state["grad_sum_scale"]) != 1.0
    older = {k: v for k, v in state.items() if k != "grad_sum_scale"}
    older["grad_sum"] = state["grad_sum_scale"] * state["grad_sum"]
    runs = {}
    for name, start in (("new", state), ("older", older)):
        functional, states = x.clone(), dict(start)
        fast, fast_states = [x.clone()], [dict((k, v.clone()) for k, v in start.items())]
        for k in range(11, 21):
            functional, states = rule.update(functional, grads[k - 1], states, lr=1.0, step=k, horizon=40)
            rule.update_(fast, [grads[k - 1]], fast_states, lr=1.0, step=k, horizon=40)
        assert "grad_sum_scale" in fast_states[0]
        runs[name] = (functional, fast[0], states["grad_sum_scale"] * states["grad_sum"])
    for new, older_run in zip(runs["new"], runs["older"]):
        torch.testing.assert_close(older_run, new, rtol=1e-12, atol=1e-15)

    model = _model()
    opt = RuleOptimizer(model.parameters(), Celo2Rule(step_size="prodigy", gain_rate=0.05), horizon=100)
    _train(model, opt, range(10))
    saved = copy.deepcopy(opt.state_dict())
    for entry in saved["state"].values():  # the layout before the scale
        entry["grad_sum"] = entry.pop("grad_sum_scale") * entry["grad_sum"]
    resumed = copy.deepcopy(model)
    opt2 = RuleOptimizer(resumed.parameters(), Celo2Rule(step_size="prodigy", gain_rate=0.05), horizon=100)
    opt2.load_state_dict(saved)
    _train(model, opt, range(10, 20))
    _train(resumed, opt2, range(10, 20))
    for a, b in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert all("grad_sum_scale" in state for state in opt2.state.values())


def test_a_batch_of_problems_renormalises_and_updates_each_as_alone_in_float64() -> None:
    """``update`` with ``batch_dims=1`` (meta-training's batched form) on two problems, 30 steps with ``β₃ = 0.5``
    (each problem's sum rescaled at step 25, by the per-problem ``torch.where``): every problem's iterate, ``d``,
    ``r``, ``c`` and ``s̃`` equal those of the same problem updated alone (1e-12), and both estimates grew."""
    rule = Celo2Rule(step_size="prodigy", prodigy_d0=0.05, prodigy_beta3=0.5, prodigy_max_d=0.5).double()
    rule.requires_grad_(False)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    drift = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    batched = {k: v.double() for k, v in rule.init_state(x, batch_dims=1).items()}
    alone = [{k: v.double() for k, v in rule.init_state(x[b]).items()} for b in range(2)]
    xs = [x[b].clone() for b in range(2)]
    for k in range(1, 31):
        g = drift + 0.3 * torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
        x, batched = rule.update(x, g, batched, lr=1.0, step=k, horizon=40, batch_dims=1)
        for b in range(2):
            xs[b], alone[b] = rule.update(xs[b], g[b], alone[b], lr=1.0, step=k, horizon=40)
    assert float(batched["grad_sum_scale"][0]) == 0.5**5  # rescaled at step 25, five steps ago
    for b in range(2):
        torch.testing.assert_close(x[b], xs[b], rtol=1e-12, atol=1e-15)
        for key in ("estimate", "numerator", "grad_sum_scale", "grad_sum"):
            torch.testing.assert_close(
                batched[key][b], alone[b][key].reshape(batched[key][b].shape), rtol=1e-12, atol=0
            )
    assert all(float(s["estimate"]) > float(s["step_scale"]) for s in alone)
