"""Update rules: batched == per-problem, purity, differentiability, closed forms, registry, pretrained files."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_meta.optim import (
    AdamRule,
    Celo2Rule,
    LSTMRule,
    MLPRule,
    UpdateRule,
    get_rule,
    list_rules,
    load_pretrained,
    lstm_preprocess,
    newton_schulz,
    register_rule,
    rule_fingerprint,
    rule_hash,
    rule_record,
    save_pretrained,
)
from lightning_meta.optim import pretrained as pretrained_module

RULES = ["adam", "lstm", "mlp", "celo2"]
SHAPES = [(6, 5), (7,), (), (3, 2, 3, 3)]


def _rule(name: str) -> UpdateRule:
    torch.manual_seed(0)
    rule = get_rule(name)
    if isinstance(rule, Celo2Rule):  # move off the Adam-like initialisation so the MLP path is exercised
        with torch.no_grad():
            for p in rule.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return rule


@pytest.mark.parametrize("name", RULES)
def test_batched_problems_match_a_loop_over_problems(name: str) -> None:
    rule = _rule(name)
    problems = 3
    for shape in SHAPES:
        params = torch.randn(problems, *shape)
        states = rule.init_state(params, batch_dims=1)
        singles = [(params[i], rule.init_state(params[i])) for i in range(problems)]
        for step in range(1, 4):
            grads = torch.randn(problems, *shape) * torch.tensor([1e-3, 1.0, 30.0]).reshape(-1, *[1] * len(shape))
            params, states = rule.update(params, grads, states, lr=0.05, step=step, horizon=10, batch_dims=1)
            singles = [rule.update(p, grads[i], s, lr=0.05, step=step, horizon=10) for i, (p, s) in enumerate(singles)]
        for i, (p, s) in enumerate(singles):
            torch.testing.assert_close(params[i], p, rtol=1e-5, atol=1e-6)
            for key in s:
                torch.testing.assert_close(states[key][i], s[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "celo2"])
def test_per_problem_step_counts(name: str) -> None:
    """Problems started at different times may carry their own step count (a tensor over the batch dims)."""
    rule = _rule(name)
    params, grads = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    states = rule.init_state(params, batch_dims=1)
    batched, _ = rule.update(params, grads, states, lr=0.1, step=torch.tensor([1.0, 7.0]), horizon=10, batch_dims=1)
    for i, step in enumerate((1, 7)):
        single, _ = rule.update(params[i], grads[i], rule.init_state(params[i]), lr=0.1, step=step, horizon=10)
        torch.testing.assert_close(batched[i], single)


@pytest.mark.parametrize("name", RULES)
def test_update_is_pure_and_state_is_float32(name: str) -> None:
    rule = _rule(name)
    param, grad = torch.randn(4, 3), torch.randn(4, 3)
    state = rule.init_state(param)
    assert all(v.dtype == torch.float32 for v in state.values())
    copies = (param.clone(), grad.clone(), {k: v.clone() for k, v in state.items()})
    new_param, new_state = rule.update(param, grad, state, lr=0.1, step=1, horizon=10)
    assert torch.equal(param, copies[0]) and torch.equal(grad, copies[1])
    assert all(torch.equal(state[k], copies[2][k]) for k in state)
    assert not torch.equal(new_param, param)
    assert set(new_state) == set(state)


@pytest.mark.parametrize("name", ["lstm", "mlp", "celo2"])
def test_unrolled_updates_are_differentiable_in_the_rule_weights(name: str) -> None:
    """Gradient of a 2-step unrolled quadratic loss w.r.t. the rule's weights equals finite differences."""
    rule = _rule(name).double()
    target = torch.randn(5, 4, dtype=torch.float64)
    names = [n for n, _ in rule.named_parameters()]

    def meta_loss(*weights: torch.Tensor) -> torch.Tensor:
        param = torch.zeros(5, 4, dtype=torch.float64)
        state = {k: v.double() for k, v in rule.init_state(param).items()}
        for step in (1, 2):
            grad = param - target
            param, state = functional_call(
                rule, dict(zip(names, weights)), (param, grad, state), {"lr": 0.3, "step": step, "horizon": 4}
            )
        return ((param - target) ** 2).sum()

    weights = tuple(p.detach().clone().requires_grad_(True) for p in rule.parameters())
    grads = torch.autograd.grad(meta_loss(*weights), weights)
    assert any(g.abs().sum() > 0 for g in grads)
    torch.manual_seed(1)
    for _ in range(2):  # directional derivatives against central finite differences
        direction = [torch.randn_like(w) for w in weights]
        eps = 1e-6
        plus = meta_loss(*(w.detach() + eps * d for w, d in zip(weights, direction)))
        minus = meta_loss(*(w.detach() - eps * d for w, d in zip(weights, direction)))
        numeric = (plus - minus) / (2 * eps)
        analytic = sum((g * d).sum() for g, d in zip(grads, direction))
        torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-7)


def test_lstm_preprocessing_closed_form() -> None:
    g = torch.tensor([0.5, -2.0, 1e-4, -1e-3, 0.0])
    magnitude, sign = lstm_preprocess(g, k=5.0)
    expected_mag = torch.tensor([math.log(0.5) / 5, math.log(2.0) / 5, -1.0, -1.0, -1.0])
    expected_sign = torch.tensor([1.0, -1.0, 1e-4 * math.exp(5), -1e-3 * math.exp(5), 0.0])
    torch.testing.assert_close(magnitude, expected_mag)
    torch.testing.assert_close(sign, expected_sign)


def test_lstm_rule_equals_a_two_layer_nn_lstm_over_the_gradient_sequence() -> None:
    rule = _rule("lstm")
    reference = nn.LSTM(2, 20, num_layers=2)
    with torch.no_grad():
        for layer, cell in enumerate((rule.cell1, rule.cell2)):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(reference, f"{kind}_l{layer}").copy_(getattr(cell, kind))
    grads = torch.randn(4, 3, 2)  # (steps, *param shape)
    param = torch.randn(3, 2)
    state, p = rule.init_state(param), param
    for step in range(4):
        p, state = rule.update(p, grads[step], state, lr=1.0, step=step + 1)
    inputs = torch.stack(lstm_preprocess(grads.reshape(4, 6)), dim=-1)  # (steps, coords, 2)
    with torch.no_grad():
        outputs, _ = reference(inputs)  # (steps, coords, 20)
        steps = rule.head(outputs).squeeze(-1) * 0.1  # (steps, coords)
    torch.testing.assert_close(p, param - steps.sum(0).reshape(3, 2), rtol=1e-5, atol=1e-6)


def test_mlp_rule_step_formula_and_gradient_scale_invariance() -> None:
    rule = MLPRule()
    param, grad = torch.randn(8, 4), torch.randn(8, 4)
    with torch.no_grad():  # direction 1, magnitude 500 everywhere: step = exp(0.5) * 1e-3
        rule.output.weight.zero_()
        rule.output.bias.copy_(torch.tensor([1.0, 500.0]))
    new, _ = rule.update(param, grad, rule.init_state(param), lr=1.0, step=1)
    torch.testing.assert_close(param - new, torch.full_like(param, math.exp(0.5) * 1e-3))
    rule = _rule("mlp")
    small, _ = rule.update(param, grad, rule.init_state(param), lr=1.0, step=3)
    large, _ = rule.update(param, 1e3 * grad, rule.init_state(param), lr=1.0, step=3)
    torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-6)
    assert (param - small).abs().max() < 0.05  # tiny steps at initialisation


def test_celo2_initialisation_is_rms_normalised_adam_and_update_rms_holds() -> None:
    rule = Celo2Rule(update_rms=0.2, horizon_schedule=False)
    param, state = torch.randn(6, 5), None
    state = rule.init_state(param)
    m, v = torch.zeros(6, 5), torch.zeros(6, 5)
    p = param
    for step in (1, 2, 3):
        grad = torch.randn(6, 5)
        p_prev = p
        p, state = rule.update(p, grad, state, lr=0.01, step=step)
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad**2
        adam = (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)) + 1e-16).sqrt()
        expected = p_prev - 0.01 * 0.2 * adam / adam.pow(2).mean().sqrt()
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-7)
    rule = _rule("celo2")  # any weights: the step RMS over the tensor is lr * s(step / horizon) * update_rms
    new, _ = rule.update(param, torch.randn(6, 5), rule.init_state(param), lr=0.01, step=3, horizon=10)
    expected_rms = 0.01 * 0.2 * rule.step_multiplier(3, 10)
    torch.testing.assert_close((param - new).pow(2).mean().sqrt(), expected_rms)


def test_celo2_schedule_closed_form_warmup_cosine_and_learned_coefficients() -> None:
    rule = Celo2Rule(warmup_fraction=0.05, final_fraction=0.1)
    horizon = 100
    for step in (1, 3, 5, 20, 50, 80, 100, 250):  # 250 > horizon: stays at the final value
        tau = min(step / horizon, 1.0)
        base = min(1.0, tau / 0.05) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * tau)))
        assert rule.step_multiplier(step, horizon).item() == pytest.approx(base, rel=1e-6)
    with torch.no_grad():
        rule.schedule.copy_(torch.tensor([0.3, -0.5, 0.2, 0.7]))
    tau = 0.4
    base = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * tau))
    learned = math.exp(0.3 - 0.5 * tau + 0.2 * math.cos(math.pi * tau) + 0.7 * math.sin(math.pi * tau))
    assert rule.step_multiplier(40, horizon).item() == pytest.approx(base * learned, rel=1e-6)
    steps = torch.tensor([[3.0], [40.0]])  # per-problem step counts broadcast
    torch.testing.assert_close(rule.step_multiplier(steps, horizon)[1, 0], rule.step_multiplier(40, horizon))
    with pytest.raises(ValueError, match="needs the planned number of steps"):
        rule.step_multiplier(1, None)
    assert Celo2Rule().needs_horizon and not Celo2Rule(horizon_schedule=False).needs_horizon
    with pytest.raises(ValueError, match="warmup_fraction=1.5"):
        Celo2Rule(warmup_fraction=1.5)


def test_celo2_takes_adamw_steps_on_vectors_with_the_scheduled_lr() -> None:
    rule = _rule("celo2")
    bias = nn.Parameter(torch.randn(7))
    reference = torch.optim.Adam([bias], lr=0.01)
    horizon = 6
    p, state = bias.detach().clone(), rule.init_state(bias)
    for step in (1, 2, 3):
        grad = torch.randn(7)
        bias.grad = grad.clone()
        reference.param_groups[0]["lr"] = 0.01 * rule.step_multiplier(step, horizon).item()
        reference.step()
        p, state = rule.update(p, grad, state, lr=0.01, step=step, horizon=horizon)
        torch.testing.assert_close(p, bias.detach())


def test_newton_schulz_equalises_singular_values_and_celo2_applies_it() -> None:
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(16, 4))
    v, _ = torch.linalg.qr(torch.randn(4, 4))
    matrix = (u * torch.tensor([10.0, 1.0, 0.1, 0.03])) @ v.t()  # (16, 4), condition number 333
    for x in (matrix, matrix.t(), torch.stack([matrix, 2 * matrix])):
        singular = torch.linalg.svdvals(newton_schulz(x, batch_dims=x.ndim - 2))
        assert singular.min() > 0.55 and singular.max() < 1.25, singular
    param, grad = torch.zeros(4, 16), torch.randn(4, 16)
    plain = Celo2Rule(update_rms=1.0, horizon_schedule=False)
    ortho = Celo2Rule(update_rms=1.0, orthogonalize=True, horizon_schedule=False)
    direction = param - plain.update(param, grad, plain.init_state(param), lr=1.0, step=1)[0]
    expected = newton_schulz(direction)
    expected = expected / expected.pow(2).mean().sqrt()
    got = param - ortho.update(param, grad, ortho.init_state(param), lr=1.0, step=1)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_registry_and_hash() -> None:
    assert set(RULES) <= set(list_rules())
    assert isinstance(get_rule("default"), Celo2Rule)
    assert isinstance(get_rule("adam", betas=(0.8, 0.9)), AdamRule)
    assert isinstance(get_rule("lstm"), LSTMRule)
    with pytest.raises(ValueError, match="unknown update rule 'sgd'"):
        get_rule("sgd")
    with pytest.raises(ValueError, match="already registered"):

        @register_rule
        class Clash(AdamRule):
            name = "adam"

    assert rule_hash(Celo2Rule()) == rule_hash(Celo2Rule())  # deterministic initialisation
    rule = Celo2Rule()
    before = rule_hash(rule)
    with torch.no_grad():
        rule.skip[0] += 1e-6
    assert rule_hash(rule) != before


def test_the_fingerprint_covers_class_settings_and_weights() -> None:
    base = Celo2Rule(step_size="relative")
    assert base.config()["step_size"] == "relative" and base.config()["betas"] == [0.9, 0.999]
    assert set(base.config()) == set(inspect.signature(Celo2Rule).parameters)  # every constructor argument
    assert rule_fingerprint(base) == rule_fingerprint(Celo2Rule(step_size="relative"))
    variants = [
        Celo2Rule(),
        Celo2Rule(step_size="relative", horizon_schedule=False),
        base.without_schedule(),
        Celo2Rule(step_size="relative", min_log_gain=-1.0),
        Celo2Rule(step_size="relative", betas=(0.9, 0.99)),
        Celo2Rule(step_size="dog"),
        Celo2Rule(step_size="relative", max_growth=10.0),
        Celo2Rule(step_size="prodigy"),
        Celo2Rule(step_size="relative", prodigy_d0=1e-3),
        Celo2Rule(step_size="relative", prodigy_beta3=0.99),
        Celo2Rule(step_size="relative", prodigy_max_d=1.0),
    ]
    for other in variants:  # the same weights, another update
        assert rule_hash(other) == rule_hash(base) and rule_fingerprint(other) != rule_fingerprint(base)
    retrained = Celo2Rule(step_size="relative")
    with torch.no_grad():
        retrained.schedule[0] = 0.1
    assert rule_fingerprint(retrained) != rule_fingerprint(base)

    class Renamed(AdamRule):  # another class with the same (empty) weights and settings
        pass

    assert rule_hash(Renamed()) == rule_hash(AdamRule()) and rule_fingerprint(Renamed()) != rule_fingerprint(AdamRule())
    assert AdamRule(eps=1e-6).config() == {
        "betas": [0.9, 0.999],
        "eps": 1e-6,
        "weight_decay": 0.0,
        "decoupled_weight_decay": False,
    }
    record = rule_record(base)
    assert record["hash"] == rule_fingerprint(base) and record["weights_hash"] == rule_hash(base)


def test_replace_copies_the_weights_under_new_settings_and_the_copy_steps_as_a_rule_built_so() -> None:
    """``rule.replace(**changes)``: the shipped default with ``vector_min_rms=1`` steps a zero bias exactly as a rule
    constructed with that setting and the same weights does (10x the default's first step), leaves the original
    alone, and refuses unknown names, out-of-range values and changes of the weights' shapes."""
    default = load_pretrained("default").compile_fast_path()
    with torch.no_grad():  # non-initial weights, so the test sees them carried over
        default.schedule.copy_(torch.tensor([0.1, -0.2, 0.05, 0.0]))
    floored = default.replace(vector_min_rms=1.0)
    built = Celo2Rule(**{**default.config(), "vector_min_rms": 1.0})
    built.load_state_dict(default.state_dict())
    assert floored.vector_min_rms == 1.0 and default.vector_min_rms is None
    assert rule_hash(floored) == rule_hash(default) and rule_fingerprint(floored) == rule_fingerprint(built)
    assert rule_fingerprint(floored) != rule_fingerprint(default)
    assert floored.compiled_fast_path and not floored.training  # eval mode and the opt-in fast path kept
    assert floored.schedule.data_ptr() != default.schedule.data_ptr()  # shares no tensors

    bias, grad = torch.zeros(5), torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    steps = {}
    for name, rule in (("default", default), ("floored", floored), ("built", built)):
        state = rule.init_state(bias)
        steps[name], _ = rule.update(bias, grad, state, lr=1.0, step=1, horizon=100)
    torch.testing.assert_close(steps["floored"], steps["built"], rtol=0, atol=0)
    torch.testing.assert_close(steps["floored"], 10 * steps["default"])

    with pytest.raises(TypeError, match=r"has no setting \['vector_floor'\]; its settings are"):
        default.replace(vector_floor=1.0)
    with pytest.raises(ValueError, match="vector_min_rms"):
        default.replace(vector_min_rms=-1.0)
    with pytest.raises(ValueError, match="changes the shapes of the rule's weights"):
        default.replace(hidden_size=8)
    adam = AdamRule().replace(eps=1e-6)
    assert adam.config()["eps"] == 1e-6 and adam.training
    lstm = get_rule("lstm")
    assert rule_hash(lstm.replace()) == rule_hash(lstm)
    wide = default.double().replace(orthogonalize=True)  # the dtype (and device) carry over with the weights
    assert wide.orthogonalize and all(p.dtype == torch.float64 for p in wide.parameters())


def test_load_pretrained_default_and_roundtrip(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrained_module, "_folder", lambda: tmp_path)
    with pytest.warns(UserWarning, match="no pretrained weights ship for 'default'"):
        rule = load_pretrained()
    assert isinstance(rule, Celo2Rule) and rule_hash(rule) == rule_hash(Celo2Rule())
    with pytest.raises(FileNotFoundError, match="no pretrained rule 'nope'"):
        load_pretrained("nope")
    trained = _rule("mlp")
    trained.init_kwargs = {"hidden_size": 8}
    save_pretrained(trained, "mlp-test", directory=tmp_path, metadata={"horizon": 100})
    (tmp_path / "default.json").write_text('{"alias": "mlp-test"}')
    loaded = load_pretrained()
    assert isinstance(loaded, MLPRule) and rule_hash(loaded) == rule_hash(trained)
    (tmp_path / "mlp-test.pt").write_bytes(b"")
    torch.save({k: v + 1 for k, v in trained.state_dict().items()}, tmp_path / "mlp-test.pt")
    with pytest.raises(ValueError, match="differs from the recorded"):
        load_pretrained("mlp-test")


def test_celo2_meta_gradient_is_finite_when_a_gradient_is_exactly_zero():
    """A dead unit (gradient exactly 0) must not turn the TBPTT meta-gradient into NaN (d sqrt(v)/dv at v=0)."""
    import torch as _torch

    from lightning_meta.optim import get_rule

    rule = get_rule("celo2")
    mask = _torch.ones(4, 3)
    mask[0] = 0.0  # a dead row: the loss 0.5 * sum(mask * p**2) gives it an exact zero gradient
    param = _torch.randn(4, 3)
    state = rule.init_state(param)
    for step in (1, 2, 3):  # the gradient depends on the rule's weights through the updated parameters
        param, state = rule.update(param, mask * param, state, lr=1e-2, step=step, horizon=10)
    (0.5 * (mask * param**2).sum()).backward()
    grads = [p.grad for p in rule.parameters() if p.grad is not None]
    assert grads and all(_torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"step_size": "relative"},
        {"step_size": "dog"},
        {"step_size": "prodigy", "prodigy_d0": 0.1},
        {"step_size": "prodigy", "prodigy_d0": 0.1, "magnitude_power": 0.5},
        {"step_size": "prodigy", "prodigy_d0": 0.1, "magnitude_power": 1.0},
        {"magnitude_power": 0.5},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
@pytest.mark.parametrize("zero_step", [None, 1, 2])
def test_celo2_derivatives_are_finite_through_zero_statistics(kwargs, zero_step):
    """Every step-size mode's first step (zero momentum, x = x_0) and a whole tensor's gradient that is exactly zero
    (a matrix and a bias) keep the derivatives of an unroll finite, with respect to the rule's weights and to the
    initial parameters: the per-tensor roots there have an infinite derivative, and 0 * inf is NaN."""
    from lightning_meta.optim.celo2 import Celo2Rule

    rule = Celo2Rule(**kwargs)
    torch.manual_seed(0)
    weight, bias = torch.randn(8, 6, requires_grad=True), torch.randn(6, requires_grad=True)
    states = [rule.init_state(weight.detach()), rule.init_state(bias.detach())]
    params = [weight, bias]
    for step in (1, 2, 3):  # gradients that depend on the parameters, as in a TBPTT unroll
        grads = [2 * params[0] * torch.randn(8, 6), 2 * params[1]]
        if step == zero_step:
            grads = [torch.zeros_like(g) for g in grads]
        updated = [rule.update(p, g, s, lr=1e-2, step=step, horizon=10) for p, g, s in zip(params, grads, states)]
        params, states = [u[0] for u in updated], [u[1] for u in updated]
    loss = sum(p.square().sum() for p in params)
    inputs = [weight, bias, *(p for p in rule.parameters() if p.requires_grad)]
    derivatives = torch.autograd.grad(loss, inputs, allow_unused=True)
    assert derivatives[0] is not None and derivatives[2] is not None
    assert all(torch.isfinite(d).all() for d in derivatives if d is not None)


def test_zero_safe_roots_keep_torch_values_and_give_zero_derivative_at_zero():
    from lightning_meta.optim.functional import rsqrt_at_zero_safe, sqrt_at_zero_safe

    x = torch.tensor([0.0, 1e-30, 1e-12, 2.0], requires_grad=True)
    assert torch.equal(sqrt_at_zero_safe(x), torch.sqrt(x.detach()))
    assert torch.equal(rsqrt_at_zero_safe(x, 1e-30), torch.rsqrt(x.detach() + 1e-30))
    two = torch.tensor(2.0)
    for root, expected in (
        (sqrt_at_zero_safe, 0.5 * two**-0.5),
        (lambda v: rsqrt_at_zero_safe(v, 1e-30), -0.5 * two**-1.5),
    ):
        (derivative,) = torch.autograd.grad(root(x).sum(), x)
        assert derivative[0] == 0  # torch's own: inf (sqrt) and -inf (rsqrt at 1e-30 in float32)
        assert torch.isclose(derivative[3], expected)
