"""Celo2's deployment fast path (``update_``) against its functional definition (``update``); versions; horizon."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import lightning_meta.optim.celo2 as celo2_module
from lightning_meta.optim import Celo2Rule, RuleOptimizer, load_pretrained, save_pretrained
from lightning_meta.optim import pretrained as pretrained_module

# a matrix, a bias, a scalar, a conv kernel, one spanning several column blocks, an empty one
SHAPES = [(6, 5), (7,), (), (4, 3, 3, 3), (300, 2), (0, 3)]


def _trained_rule(hidden_size: int = 4, weight_decay: float = 0.0, magnitude: float = 0.0) -> Celo2Rule:
    """A rule away from its initialisation: every weight (MLP, skip, schedule) matters."""
    rule = Celo2Rule(hidden_size=hidden_size, weight_decay=weight_decay, magnitude_power=magnitude)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return rule.requires_grad_(False)


def _float64_states(rule: Celo2Rule, start: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.double() for k, v in rule.init_state(p).items()} for p in start]


def _assert_agree(fast, fast_states, functional, functional_states, start, state_tol=(1e-10, 1e-14)) -> None:  # noqa: ANN001
    """The fast path's moves from ``start`` and its states equal the functional update's to float64 rounding."""
    for i in range(len(start)):
        torch.testing.assert_close(fast[i] - start[i], functional[i] - start[i], rtol=1e-10, atol=1e-14)
        for key in functional_states[i]:
            rtol, atol = state_tol
            torch.testing.assert_close(fast_states[i][key], functional_states[i][key], rtol=rtol, atol=atol)


@pytest.mark.parametrize(("hidden_size", "weight_decay", "magnitude"), [(4, 0.0, 0.0), (8, 0.1, 0.0), (8, 0.1, 0.5)])
def test_fast_path_equals_the_functional_update_in_float64(
    monkeypatch: pytest.MonkeyPatch, hidden_size: int, weight_decay: float, magnitude: float
) -> None:
    """Five steps (warm-up, decay, past the horizon) on 1-D, 2-D and 4-D tensors, a non-contiguous one, and a
    tensor spanning several column blocks; float64 so the two computations agree to rounding (1e-10)."""
    monkeypatch.setattr(celo2_module, "_FAST_BLOCK", 128)  # several blocks and a ragged last one on small tensors
    rule = _trained_rule(hidden_size, weight_decay, magnitude).double()
    generator = torch.Generator().manual_seed(1)
    start = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
    start.append(torch.randn(5, 9, generator=generator, dtype=torch.float64).t())  # non-contiguous (9, 5)
    functional = [p.clone() for p in start]
    fast = [p.clone() for p in start]
    fast[-1] = start[-1].clone().t().contiguous().t()  # keep it non-contiguous
    states_f = _float64_states(rule, start)
    states_x = _float64_states(rule, start)
    for step in range(1, 6):
        grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) * 10.0**-step for p in start]
        grads[1] = torch.zeros_like(grads[1]) if step == 2 else grads[1]  # an exactly-zero gradient
        for i in range(len(start)):
            functional[i], states_f[i] = rule.update(
                functional[i], grads[i], states_f[i], lr=0.05, step=step, horizon=4
            )
        rule.update_(fast, grads, states_x, lr=0.05, step=step, horizon=4)
        _assert_agree(fast, states_x, functional, states_f, start, state_tol=(1e-12, 0.0))
    assert not fast[-1].is_contiguous()


def test_rule_optimizer_in_float32_matches_the_functional_update_per_tensor_and_step() -> None:
    """``RuleOptimizer`` (fast path, fp32) vs a loop of ``update`` calls, with a layer that skips a step
    (its own step count: the optimizer groups tensors by step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 1))
    rule = _trained_rule()
    opt = RuleOptimizer(model.parameters(), rule, lr=0.02, horizon=6)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    states = {name: rule.init_state(p) for name, p in params.items()}
    steps = dict.fromkeys(params, 0)
    for step in range(5):
        opt.zero_grad()
        x = torch.randn(3, 2, 6, 6)
        model(x).pow(2).mean().backward()
        if step == 2:
            model[4].weight.grad = None  # skipped by the optimizer this step
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            steps[name] += 1
            params[name], states[name] = rule.update(
                params[name], p.grad, states[name], lr=0.02, step=steps[name], horizon=6
            )
        opt.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), params[name], rtol=1e-5, atol=1e-6)
    assert int(opt.state[model[4].weight]["step"]) == 4 and int(opt.state[model[0].weight]["step"]) == 5


def test_a_horizon_is_required_unless_the_schedule_is_off() -> None:
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    with pytest.raises(ValueError, match="needs the planned number of steps"):
        RuleOptimizer(model.parameters(), Celo2Rule(), lr=0.1).step()
    before = model.weight.detach().clone()
    RuleOptimizer(model.parameters(), Celo2Rule(horizon_schedule=False), lr=0.1).step()
    assert not torch.equal(before, model.weight)


def test_version_1_weights_and_optimizer_state_are_refused(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Version 2 changed what the weights mean (the schedule, eps inside the root): old files are refused, with
    the versions in the message, instead of silently loading into a different rule."""
    monkeypatch.setattr(pretrained_module, "_folder", lambda: tmp_path)
    save_pretrained(Celo2Rule(), "old", directory=tmp_path)
    meta = json.loads((tmp_path / "old.json").read_text())
    meta["version"] = 1
    (tmp_path / "old.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 1 but the installed Celo2Rule is version 2"):
        load_pretrained("old")
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    opt = RuleOptimizer(model.parameters(), Celo2Rule(), lr=0.1, horizon=5)
    opt.step()
    state = opt.state_dict()
    state["rule"] = {**state["rule"], "version": 1}
    with pytest.raises(ValueError, match="'celo2' version 1 .* applies 'celo2' version 2 .*version 1 vs 2"):
        RuleOptimizer(model.parameters(), Celo2Rule(), lr=0.1, horizon=5).load_state_dict(state)


@pytest.mark.parametrize("step_size", ["relative", "dog", "prodigy"])
def test_relative_step_fast_path_equals_the_functional_update_in_float64(
    monkeypatch: pytest.MonkeyPatch, step_size: str
) -> None:
    """step_size="relative" and "dog": per-tensor initial scales, hypergradient gains (clamped both ways), distance
    estimates (capped) and weight decay agree between ``update_`` and ``update`` over seven steps, states included."""
    monkeypatch.setattr(celo2_module, "_FAST_BLOCK", 128)
    rule = Celo2Rule(
        step_size=step_size, weight_decay=0.1, gain_rate=0.3, min_log_gain=-0.4, max_log_gain=0.5, max_growth=1.1
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    rule = rule.double().requires_grad_(False)
    start = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
    functional, fast = [p.clone() for p in start], [p.clone() for p in start]
    states_f = _float64_states(rule, start)
    states_x = [{k: v.clone() for k, v in s.items()} for s in states_f]
    for step in range(1, 8):
        grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in start]
        for i in range(len(start)):
            functional[i], states_f[i] = rule.update(functional[i], grads[i], states_f[i], lr=0.7, step=step, horizon=5)
        rule.update_(fast, grads, states_x, lr=0.7, step=step, horizon=5)
        _assert_agree(fast, states_x, functional, states_f, start)
    gains = [float(s["log_gain"].reshape(-1)[0]) for s in states_x if s["log_gain"].numel()]
    assert min(gains) < 0 < max(gains) and all(-0.4 <= g <= 0.5 for g in gains)
    if step_size == "dog":  # the estimate grew on some tensors and hit its cap on others
        growth = [float(s["distance"] / s["step_scale"]) for s in states_x if s["distance"].numel()]
        assert any(1.0 < g < 1.1 for g in growth) and max(growth) == pytest.approx(1.1, rel=1e-12)


def _decaying_rule_with_clamped_gains(step_size: str, magnitude: float) -> Celo2Rule:
    """At its initialisation, with weight decay, and gains that move fast enough to reach their bounds."""
    return Celo2Rule(
        step_size=step_size,
        weight_decay=0.1,
        gain_rate=0.3,
        min_log_gain=-0.4,
        max_log_gain=0.5,
        magnitude_power=magnitude,
    )


def _six_steps_agree_with_the_functional_update(
    rule: Celo2Rule, generator: torch.Generator
) -> list[dict[str, torch.Tensor]]:
    """``update_`` (the fast path as the rule is configured) on :data:`SHAPES` plus a non-contiguous matrix, in one
    call, agrees with ``update`` over six steps (warm-up, decay, past the horizon of 5) in float64; returns the fast
    path's states."""
    start = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
    start.append(torch.randn(5, 9, generator=generator, dtype=torch.float64).t())  # non-contiguous (9, 5)
    functional = [p.clone() for p in start]
    fast = [p.clone() for p in start]
    fast[-1] = start[-1].clone().t().contiguous().t()
    states_f = _float64_states(rule, start)
    states_x = [{k: v.clone() for k, v in s.items()} for s in states_f]
    for step in range(1, 7):
        grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) * 10.0**-step for p in start]
        for i in range(len(start)):
            functional[i], states_f[i] = rule.update(functional[i], grads[i], states_f[i], lr=0.7, step=step, horizon=5)
        rule.update_(fast, grads, states_x, lr=0.7, step=step, horizon=5)
        _assert_agree(fast, states_x, functional, states_f, start)
    assert not torch.equal(fast[0], start[0]) and not fast[-1].is_contiguous()
    return states_x


@pytest.mark.slow
@pytest.mark.parametrize(
    ("step_size", "magnitude"),
    [
        ("lr", 0.0),
        ("relative", 0.0),
        ("dog", 0.0),
        ("prodigy", 0.0),
        ("prodigy", 0.5),
    ],
)
def test_compiled_fast_path_equals_the_functional_update_in_float64(step_size: str, magnitude: float) -> None:
    """``compile_fast_path()``: the fused kernels on contiguous matrices (the eager path on the rest) agree with
    ``update`` over six steps (warm-up, decay, past the horizon), with weight decay and clamped gains, states
    included; a non-contiguous matrix and 1-D tensors go through the eager path in the same call."""
    rule = _decaying_rule_with_clamped_gains(step_size, magnitude)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    rule = rule.double().requires_grad_(False).compile_fast_path()
    states = _six_steps_agree_with_the_functional_update(rule, generator)
    if step_size != "lr":
        gains = [float(s["log_gain"].reshape(-1)[0]) for s in states if s["log_gain"].numel()]
        assert min(gains) < 0 < max(gains)


def test_the_default_takes_full_steps_from_the_start_and_anneals_to_zero() -> None:
    """``celo2-auto``: no warm-up (the first step is the cosine's value at 1/T) and a cosine decay to 0 at T."""
    rule = load_pretrained("default")
    assert rule.relative_lr and rule.horizon_schedule
    horizon = 200
    expected = [0.5 * (1 + math.cos(math.pi * t / horizon)) for t in (1, 100, 200)]
    got = [rule.lr_multiplier(t, horizon) for t in (1, 100, 200)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert got[0] > 0.99 and got[2] == 0.0


@pytest.mark.parametrize(
    ("skip", "step_size", "single", "magnitude"),
    [
        ((0.0, 0.0, 0.0, 1.0), "relative", True, 0.0),  # the initialisation, in the shipped default's mode
        ((0.0, 0.0, 0.0, 1.0), "lr", True, 0.0),
        ((-0.7, 0.0, 0.0, 0.0), "relative", True, 0.0),  # g: its |g|² comes from the gain
        ((0.0, 1.3, 0.0, 0.0), "lr", True, 0.0),
        ((0.0, 0.0, 0.4, 0.0), "relative", True, 0.0),
        ((0.0, 0.0, 0.0, 1.0), "dog", True, 0.0),
        ((0.0, 0.0, 0.0, 1.0), "prodigy", True, 0.0),
        ((0.0, 0.5, 0.0, 1.0), "lr", False, 0.0),  # two features: the MLP path
        ((0.0, 0.5, 0.0, 1.0), "dog", False, 0.0),
        ((0.0, 0.5, 0.0, 1.0), "prodigy", False, 0.0),
        ((0.0, 0.0, 0.0, 1.0), "prodigy", True, 1.0),  # the default: the RMS cancel, Adam's step (one addcmul_)
        ((0.0, 0.0, 0.0, -0.7), "prodigy", True, 1.0),  # ... against the feature
        ((0.0, 0.0, 0.0, 1.0), "prodigy", True, 0.5),  # Adam's magnitude from the feature's own sum of squares
        ((0.0, 0.0, 0.4, 0.0), "lr", True, 0.5),  # from one more pass
        ((0.0, 0.5, 0.0, 1.0), "prodigy", False, 1.0),
    ],
)
def test_a_zero_output_layer_takes_the_single_feature_path_with_the_same_math(
    monkeypatch: pytest.MonkeyPatch, skip: tuple[float, ...], step_size: str, single: bool, magnitude: float
) -> None:
    """With the MLP's output layer zero (the initialisation) and one skip weight, ``update_`` computes that one
    feature without matrix products; it agrees with ``update`` (float64, 1e-10) over five steps, with weight decay,
    a non-contiguous matrix, 1-D tensors and an exactly-zero gradient."""
    monkeypatch.setattr(celo2_module, "_FAST_BLOCK", 128)
    rule = Celo2Rule(step_size=step_size, weight_decay=0.1, gain_rate=0.3, magnitude_power=magnitude)
    rule = rule.double().requires_grad_(False)
    with torch.no_grad():
        rule.skip.copy_(torch.tensor(skip))
    assert rule.output.weight.abs().sum() == 0 and rule.input.weight.abs().sum() > 0  # the hidden layer is live
    assert (rule._single_feature() is not None) == single
    taken = {"matrix": 0, "single": 0}
    for name in taken:
        method = getattr(rule, f"_{name}_update_" if name == "matrix" else "_single_feature_update_")

        def counted(*args, _method=method, _name=name, **kwargs):  # noqa: ANN002, ANN003, ANN202
            taken[_name] += 1
            return _method(*args, **kwargs)

        monkeypatch.setattr(rule, method.__name__, counted)
    generator = torch.Generator().manual_seed(2)
    start = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
    start.append(torch.randn(5, 9, generator=generator, dtype=torch.float64).t())
    functional = [p.clone() for p in start]
    fast = [p.clone() for p in start]
    fast[-1] = start[-1].clone().t().contiguous().t()
    states_f = _float64_states(rule, start)
    states_x = _float64_states(rule, start)
    for step in range(1, 6):
        grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) * 10.0**-step for p in start]
        grads[0] = torch.zeros_like(grads[0]) if step == 3 else grads[0]  # a matrix with an exactly-zero gradient
        for i in range(len(start)):
            functional[i], states_f[i] = rule.update(
                functional[i], grads[i], states_f[i], lr=0.05, step=step, horizon=4
            )
        rule.update_(fast, grads, states_x, lr=0.05, step=step, horizon=4)
        _assert_agree(fast, states_x, functional, states_f, start)
    matrices = sum(len(shape) > 1 for shape in SHAPES) + 1
    assert taken == ({"matrix": 0, "single": 5 * matrices} if single else {"matrix": 5 * matrices, "single": 0})
    assert not fast[-1].is_contiguous()


@pytest.mark.slow
@pytest.mark.parametrize(("step_size", "magnitude"), [("lr", 0.0), ("prodigy", 1.0)])
def test_compiled_single_feature_path_equals_the_functional_update_in_float64(
    monkeypatch: pytest.MonkeyPatch, step_size: str, magnitude: float
) -> None:
    """A direction that is ``m / sqrt(v̂ + eps²)`` alone (the initialisation; the shipped default's settings with
    ``"prodigy"`` and ``magnitude_power=1``): ``compile_fast_path()`` runs its own kernels on contiguous matrices
    (the moments with the sums, without the feature's at ``magnitude_power=1``; Prodigy's passes; the step), and they
    agree with ``update`` over six steps, with weight decay and clamped gains; a non-contiguous matrix and 1-D tensors
    take the eager path in the same call."""
    used: set[str] = set()
    compiled = celo2_module._compiled

    def spy(name: str) -> object:
        used.add(name)
        return compiled(name)

    monkeypatch.setattr(celo2_module, "_compiled", spy)
    rule = _decaying_rule_with_clamped_gains(step_size, magnitude)
    rule = rule.double().requires_grad_(False).compile_fast_path()
    assert rule._single_feature() == (3, 1.0)
    _six_steps_agree_with_the_functional_update(rule, torch.Generator().manual_seed(2))
    moments = "adam_moments" if magnitude == 1 else "single_moments"  # Adam's form needs no sum of the feature
    assert used == {moments, "single_apply"} | ({"prodigy"} if step_size == "prodigy" else set())


def test_compile_fast_path_compiles_nothing_for_a_single_feature_other_than_m_over_sqrt_v(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A direction that is one feature other than ``m / sqrt(v̂ + eps²)`` has no compiled kernels:
    ``compile_fast_path()`` keeps it on the eager single-feature path (no compile, same result as without it)."""

    def refuse(name: str) -> None:
        raise AssertionError(f"compiled {name}")

    monkeypatch.setattr(celo2_module, "_compiled", refuse)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 2))
        rule = Celo2Rule(step_size="relative")
        with torch.no_grad():
            rule.skip.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))  # the momentum m alone
        rule = rule.compile_fast_path(compiled)
        opt = RuleOptimizer(model.parameters(), rule, horizon=10)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(3, 5)).pow(2).sum().backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize(
    ("kwargs", "skip"),
    [
        ({}, None),  # the MLP path with a trained rule's weights
        # the default's form; a small d₀ so that the estimate grows from Prodigy's ratio (which reads the 1-norm)
        ({"step_size": "prodigy", "prodigy_d0": 1e-4, "magnitude_power": 1.0}, (0.0, 0.0, 0.0, 1.0)),
        ({"step_size": "lr", "magnitude_power": 0.5}, (0.0, 0.0, 0.0, 1.0)),  # one feature, but the matrix path
    ],
    ids=["mlp", "prodigy-single", "lr-single-feature-rule"],
)
def test_the_other_devices_branches_equal_the_functional_update_in_float64(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict, skip: tuple[float, ...] | None
) -> None:
    """The fast paths' non-CPU branches (no host reads: device-side step scales, the fused 1-norm of Prodigy's sum,
    the matrix path for a one-feature rule outside the relative modes) run here on CPU and agree with ``update``
    (float64, 1e-10) over five steps, with an exactly-zero gradient; and with the CPU branches."""
    monkeypatch.setattr(celo2_module, "_FAST_BLOCK", 128)
    if skip is None:
        rule = _trained_rule(8, 0.1, 0.5).double()
    else:
        rule = Celo2Rule(weight_decay=0.1, gain_rate=0.3, **kwargs).double().requires_grad_(False)
        with torch.no_grad():
            rule.skip.copy_(torch.tensor(skip))
    generator = torch.Generator().manual_seed(3)
    start = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
    runs = {"functional": [p.clone() for p in start], "device": [p.clone() for p in start]}
    runs["cpu"] = [p.clone() for p in start]
    states = {name: _float64_states(rule, start) for name in runs}
    branches = []
    lr = 1.0 if rule.prodigy else 0.05  # Prodigy's learning rate is a multiplier of its estimate
    for step in range(1, 6):
        # 0.5 |x|² plus noise: the distance estimate sees progress and grows
        grads = [p + 0.1 * torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in runs["functional"]]
        grads[0] = torch.zeros_like(grads[0]) if step == 3 else grads[0]
        for i in range(len(start)):
            runs["functional"][i], states["functional"][i] = rule.update(
                runs["functional"][i], grads[i], states["functional"][i], lr=lr, step=step, horizon=4
            )
        for name in ("device", "cpu"):

            def branch(tensor: torch.Tensor, _cpu: bool = name == "cpu") -> bool:
                branches.append(_cpu)
                return _cpu

            monkeypatch.setattr(celo2_module, "_takes_cpu_branch", branch)
            rule.update_(runs[name], grads, states[name], lr=lr, step=step, horizon=4)
        for name in ("device", "cpu"):
            _assert_agree(runs[name], states[name], runs["functional"], states["functional"], start)
    assert False in branches and True in branches
    if rule.prodigy:
        assert any(s["estimate"].item() > s["step_scale"].item() for s in states["device"])
