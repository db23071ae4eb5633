"""RuleOptimizer: Adam parity, closure, checkpoints, foreign state, fp32 state, schedulers, GradScaler, loss/horizon."""

from __future__ import annotations

import copy
import functools
import io
import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import lightning_meta.optim as optim_pkg
from lightning_meta.optim import (
    AdamRule,
    Celo2Rule,
    MLPRule,
    RuleOptimizer,
    UpdateRule,
    get_rule,
    rule_fingerprint,
    rule_hash,
)


class _LossHorizonSGD(UpdateRule):
    """Test rule: ``p - lr * loss * (1 - (step - 1) / horizon) * g``; records what it was given."""

    name = "test-loss-horizon-sgd"
    version = 1
    needs_loss = True
    needs_horizon = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, int, int]] = []

    def init_state(self, param: Tensor, *, batch_dims: int = 0) -> dict[str, Tensor]:
        return {}

    def update(self, param, grad, state, *, lr, step, horizon=None, loss=None, batch_dims=0):  # noqa: ANN001
        self.seen.append((float(loss), int(step), int(horizon)))
        return param - lr * loss * (1 - (step - 1) / horizon) * grad, {}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 1))


def _loss(model: nn.Module, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 2, 6, 6, generator=generator)
    return (model(x) - 1).pow(2).mean()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for seed in steps:
        opt.zero_grad()
        _loss(model, seed).backward()
        opt.step()


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(("weight_decay", "decoupled"), [(0.0, False), (0.1, False), (0.1, True)])
def test_adam_rule_matches_torch_adam_step_for_step(foreach: bool, weight_decay: float, decoupled: bool) -> None:
    reference, model = _model(), _model()
    scalar_ref, scalar = nn.Parameter(torch.tensor(0.5)), nn.Parameter(torch.tensor(0.5))
    torch_adam = torch.optim.Adam(
        [*reference.parameters(), scalar_ref],
        lr=0.01,
        betas=(0.8, 0.99),
        eps=1e-6,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled,
        foreach=foreach,
    )
    rule = AdamRule(betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay, decoupled_weight_decay=decoupled)
    learned = RuleOptimizer([*model.parameters(), scalar], rule, lr=0.01)
    for seed in range(6):
        for m, s, opt in ((reference, scalar_ref, torch_adam), (model, scalar, learned)):
            opt.zero_grad()
            (_loss(m, seed) + s**2).backward()
            opt.step()
        for a, b in zip([*reference.parameters(), scalar_ref], [*model.parameters(), scalar]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_closure_is_called_exactly_once_and_its_loss_returned() -> None:
    model = _model()
    opt = RuleOptimizer(model.parameters(), Celo2Rule(), lr=0.01, horizon=10)
    calls: list[Tensor] = []

    def closure() -> Tensor:
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = _loss(model, 0)
        loss.backward()
        calls.append(loss)
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    returned = opt.step(closure)
    assert len(calls) == 1 and returned is calls[0]
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(  # the default update_ loop, Celo2's fast path, and its distance-over-gradients state
    "rule",
    [
        MLPRule,
        Celo2Rule,
        functools.partial(Celo2Rule, step_size="dog"),
        functools.partial(Celo2Rule, step_size="prodigy"),
    ],
    ids=["mlp", "celo2", "celo2-dog", "celo2-prodigy"],
)
def test_checkpoint_loads_with_weights_only_and_continues_exactly(rule: Callable[[], UpdateRule]) -> None:
    straight, resumed = _model(), _model()
    opt = RuleOptimizer(straight.parameters(), rule(), lr=0.01, horizon=8)
    _train(straight, opt, range(3))
    buffer = io.BytesIO()
    torch.save({"model": straight.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(straight, opt, range(3, 6))
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = RuleOptimizer(resumed.parameters(), copy.deepcopy(opt.rule), lr=0.01, horizon=8)
    opt2.load_state_dict(checkpoint["opt"])
    _train(resumed, opt2, range(3, 6))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    if getattr(opt.rule, "step_size", None) == "dog":  # x_0 and the grown distance estimate came from the checkpoint
        saved = checkpoint["opt"]["state"].values()
        assert all({"initial", "distance", "grad_sq_sum"} <= set(state) for state in saved)
        assert any(float(state["distance"]) > float(state["step_scale"]) for state in saved)
    if getattr(opt.rule, "step_size", None) == "prodigy":  # x_0, s and r came from the checkpoint
        saved = checkpoint["opt"]["state"].values()
        assert all({"initial", "grad_sum", "numerator", "estimate"} <= set(state) for state in saved)
        assert any(float(state["numerator"]) != 0.0 for state in saved)


def test_foreign_state_is_refused() -> None:
    model = _model()
    adam = torch.optim.Adam(model.parameters())
    _train(model, adam, range(1))
    opt = RuleOptimizer(model.parameters(), Celo2Rule(), horizon=10)
    with pytest.raises(ValueError, match="not written by a RuleOptimizer.*exp_avg"):
        opt.load_state_dict(adam.state_dict())
    other = RuleOptimizer(model.parameters(), MLPRule())
    _train(model, other, range(1))
    with pytest.raises(ValueError, match="written for rule .*'mlp'.*applies .*'celo2'"):
        opt.load_state_dict(other.state_dict())
    retrained = Celo2Rule()
    with torch.no_grad():
        retrained.skip[1] = 0.5
    with pytest.raises(ValueError, match="same rule and weights"):
        opt.load_state_dict(RuleOptimizer(model.parameters(), retrained, horizon=10).state_dict())


def test_state_of_the_same_weights_configured_differently_is_refused() -> None:
    model = _model()
    opt = RuleOptimizer(model.parameters(), Celo2Rule(), horizon=10)
    _train(model, opt, range(1))
    state = opt.state_dict()
    assert state["rule"]["config"]["step_size"] == "lr" and state["rule"]["weights_hash"] == rule_hash(opt.rule)
    RuleOptimizer(model.parameters(), Celo2Rule(), horizon=10).load_state_dict(state)  # the same rule loads
    relative = RuleOptimizer(model.parameters(), Celo2Rule(step_size="relative"), horizon=10)
    with pytest.raises(ValueError, match="step_size 'lr' vs 'relative'") as error:
        relative.load_state_dict(state)
    assert state["rule"]["hash"] in str(error.value) and rule_fingerprint(relative.rule) in str(error.value)
    legacy = {**state, "rule": {"name": "celo2", "version": opt.rule.version, "hash": rule_hash(opt.rule)}}
    with pytest.warns(UserWarning, match="weights hash only"):  # written before configurations were recorded
        RuleOptimizer(model.parameters(), Celo2Rule(), horizon=10).load_state_dict(legacy)


def test_bfloat16_parameters_keep_float32_state_through_checkpoints() -> None:
    model = _model().to(torch.bfloat16)
    opt = RuleOptimizer(model.parameters(), Celo2Rule(), lr=0.01, horizon=10)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 2, 6, 6).bfloat16()).float().pow(2).mean().backward()
        opt.step()
    states = list(opt.state.values())
    assert all(v.dtype == torch.float32 for s in states for k, v in s.items() if k != "step")
    fresh = RuleOptimizer(model.parameters(), Celo2Rule(), lr=0.01, horizon=10)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for p in model.parameters():
        for key, value in opt.state[p].items():
            assert fresh.state[p][key].dtype == value.dtype and torch.equal(fresh.state[p][key], value), key


def test_lr_scheduler_repointed_to_a_new_optimizer_acts_without_warnings() -> None:
    model = _model()
    first = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(first, step_size=1, gamma=0.5)
    second = RuleOptimizer(first.param_groups, AdamRule())  # what the callback does
    scheduler.optimizer = second
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(3):
            _train(model, second, range(seed, seed + 1))
            scheduler.step()
    assert second.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_grad_scaler_steps_with_unscaled_gradients_and_skips_non_finite() -> None:
    reference, model = _model(), _model()
    ref_opt = RuleOptimizer(reference.parameters(), AdamRule(), lr=0.01)
    opt = RuleOptimizer(model.parameters(), AdamRule(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for seed in range(3):
        ref_opt.zero_grad()
        _loss(reference, seed).backward()
        ref_opt.step()
        opt.zero_grad()
        scaler.scale(_loss(model, seed)).backward()
        scaler.step(opt)
        scaler.update()
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(a, b)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(_loss(model, 0) * float("inf")).backward()
    scaler.step(opt)  # skipped: the gradients are not finite
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_loss_and_horizon_reach_rules_that_read_them() -> None:
    model = nn.Linear(3, 1, bias=False)
    rule = _LossHorizonSGD()
    opt = RuleOptimizer(model.parameters(), rule, lr=0.1, horizon=4)
    x = torch.ones(2, 3)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    weight = model.weight.detach().clone()
    loss = closure()
    expected = weight - 0.1 * loss.detach() * 1.0 * model.weight.grad
    opt.step(closure)
    torch.testing.assert_close(model.weight.detach(), expected)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.record_loss(torch.tensor(0.25))
    opt.record_loss(torch.tensor(0.5))  # accumulated micro-batches: the sum is the mean loss
    opt.step()
    assert rule.seen == [(pytest.approx(float(loss.detach())), 1, 4), (0.75, 2, 4)]
    with pytest.raises(ValueError, match="reads the training loss but step\\(\\) got none"):
        opt.step()
    with pytest.raises(ValueError, match="needs the planned number of steps"):
        RuleOptimizer(model.parameters(), rule).step(closure)


def test_constructor_errors_and_public_names() -> None:
    with pytest.raises(ValueError, match="unknown update rule 'nope'"):
        RuleOptimizer(nn.Linear(1, 1).parameters(), "nope")
    with pytest.raises(TypeError, match="is not an UpdateRule"):
        RuleOptimizer(nn.Linear(1, 1).parameters(), nn.Linear(1, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr=-1"):
        RuleOptimizer(nn.Linear(1, 1).parameters(), "adam", lr=-1)
    for name in optim_pkg.__all__:
        assert getattr(optim_pkg, name) is not None
    assert isinstance(get_rule("default"), Celo2Rule)


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_group_weight_decay_is_decoupled_as_adamw(weight_decay: float) -> None:
    """Per-group weight_decay with AdamRule (which has no decay of its own) is torch.optim.AdamW step for step."""
    model, reference = _model(), _model()
    groups = [
        {"params": list(model[0].parameters()), "weight_decay": weight_decay},
        {"params": list(model[2:].parameters()), "lr": 0.003, "weight_decay": 2 * weight_decay},
    ]
    ref_groups = [
        {"params": list(reference[0].parameters()), "weight_decay": weight_decay},
        {"params": list(reference[2:].parameters()), "lr": 0.003, "weight_decay": 2 * weight_decay},
    ]
    _train(model, RuleOptimizer(groups, AdamRule(), lr=0.01), range(4))
    _train(reference, torch.optim.AdamW(ref_groups, lr=0.01), range(4))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_weight_decay_follows_the_rules_own_schedule() -> None:
    """Celo2 (lr mode) moves p by a p-independent step, so decay shows as p0 * (1 - lr * s(step) * wd) exactly."""
    rule = Celo2Rule()
    start = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    moved = {}
    for wd in (0.0, 0.3):
        param = nn.Parameter(start.clone())
        param.grad = grad.clone()
        RuleOptimizer([{"params": [param], "weight_decay": wd}], rule, lr=0.05, horizon=10).step()
        moved[wd] = param.detach()
    s1 = rule.lr_multiplier(1, 10)
    assert 0.9 < s1 < 1  # cosine decay at tau = 0.1: the decay is 1.4 % of p, far above float32 rounding
    torch.testing.assert_close(moved[0.3], start * (1 - 0.05 * s1 * 0.3) + (moved[0.0] - start), rtol=1e-6, atol=1e-7)


def test_names_resolve_like_the_callback_and_a_missing_horizon_fails_at_construction() -> None:
    from lightning_meta.optim import load_pretrained, rule_hash

    params = list(nn.Linear(3, 2).parameters())
    opt = RuleOptimizer(params, "celo2-pes", horizon=10)
    assert rule_hash(opt.rule) == rule_hash(load_pretrained("celo2-pes"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rule_hash(RuleOptimizer(params, "default", horizon=5).rule) == rule_hash(load_pretrained("default"))
    with pytest.raises(ValueError, match="needs the planned number of steps"):
        RuleOptimizer(params, "celo2-pes")  # no step() needed to find out
    assert isinstance(RuleOptimizer(params, "adam").rule, AdamRule)


def test_relative_rule_ignores_the_lrs_size_but_follows_ratios() -> None:
    """A relative-lr rule gets lr / reference lr: the same steps at lr 3e-4 and 0.1, and each matrix's step has
    RMS ``ratio * relative_step * max(rms(p), min_rms) * update_rms * s(1)`` (ratio 0.1 for the group at lr / 10)."""
    rule = Celo2Rule(step_size="relative", relative_step=0.05).double()
    steps = []
    for lr in (3e-4, 0.1):
        model = _model().double()
        start = [p.detach().clone() for p in model.parameters()]
        opt = RuleOptimizer(
            [{"params": list(model[0].parameters())}, {"params": list(model[2:].parameters()), "lr": lr / 10}],
            rule,
            lr=lr,
            horizon=8,
        )
        assert [g["reference_lr"] for g in opt.param_groups] == [lr, lr]
        x = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        (model(x) - 1).pow(2).mean().backward()
        opt.step()
        steps.append([p.detach() - q for p, q in zip(model.parameters(), start)])
    for a, b in zip(*steps):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    start = [p.detach() for p in _model().double().parameters()]
    scale = rule.update_rms * rule.lr_multiplier(1, 8) * 0.05
    for index, ratio in ((0, 1.0), (2, 0.1), (4, 0.1)):  # conv kernel, the two Linear weights
        rms = start[index].pow(2).mean().sqrt().item()
        step_rms = steps[0][index].pow(2).mean().sqrt().item()
        assert step_rms == pytest.approx(ratio * scale * max(rms, rule.min_rms), rel=1e-3)  # float32 p_new - p_old


def test_an_lr_above_the_reference_is_capped_for_relative_rules_with_one_warning() -> None:
    """A relative-lr rule reads lr / reference lr as a multiplier of at most 1: raised 8x (as a CyclicLR or a
    LambdaLR above 1 would), it takes exactly the steps of multiplier 1 and warns once; a group's own
    ``reference_lr`` (the schedule's peak) is honoured; an absolute-lr rule follows the raised lr."""
    x = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(
        rule: UpdateRule, lr: float, raised: float | Tensor, reference: float | None = None, steps: int = 2
    ) -> tuple:
        model = _model().double()
        start = [p.detach().clone() for p in model.parameters()]
        group: dict = {"params": list(model.parameters())}
        if reference is not None:
            group["reference_lr"] = reference
        opt = RuleOptimizer([group], rule, lr=lr, horizon=8)
        opt.param_groups[0]["lr"] = raised
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                opt.zero_grad()
                (model(x) - 1).pow(2).mean().backward()
                opt.step()
        moved = [p.detach() - q for p, q in zip(model.parameters(), start)]
        return moved, [str(w.message) for w in caught if "reference lr" in str(w.message)]

    rule = Celo2Rule(step_size="relative", relative_step=0.05).double()
    at_one, none = run(rule, 0.01, 0.01)
    capped, warned = run(rule, 0.01, 0.08)
    assert not none and len(warned) == 1 and "8x its reference lr 0.01" in warned[0]
    for a, b in zip(capped, at_one):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    capped, _ = run(rule, 0.01, torch.tensor(0.08, dtype=torch.float64))  # a tensor lr is capped on device
    for a, b in zip(capped, at_one):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    half, none = run(rule, 0.01, 0.04, reference=0.08, steps=1)  # multiplier 0.5: the first step is half as long
    assert not none
    one_step, _ = run(rule, 0.01, 0.01, steps=1)
    torch.testing.assert_close(half[0], 0.5 * one_step[0], rtol=1e-5, atol=1e-9)
    adam_one, _ = run(AdamRule().double(), 0.01, 0.01, steps=1)
    adam_raised, none = run(AdamRule().double(), 0.01, 0.08, steps=1)  # Adam's first step is lr * sign(g)
    assert not none
    torch.testing.assert_close(adam_raised[0], 8 * adam_one[0], rtol=1e-6, atol=1e-9)


def _first_steps(
    opt_groups: Callable[[nn.Module], list[dict]], load: dict | None = None, **kwargs: object
) -> list[Tensor]:
    """Each parameter's move in one step of the shipped default (a fixed batch) with the given groups, after
    loading the optimizer state ``load`` when given."""
    model = _model()
    start = [p.detach().clone() for p in model.parameters()]
    opt = RuleOptimizer(opt_groups(model), _default(), horizon=8, **kwargs)  # type: ignore[arg-type]
    if load is not None:
        opt.load_state_dict(load)
    x = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    (model(x) - 1).pow(2).mean().backward()
    opt.step()
    return [p.detach() - q for p, q in zip(model.parameters(), start)]


def _default() -> UpdateRule:
    return optim_pkg.load_pretrained("default")


def test_step_scale_multiplies_the_step_a_relative_rule_sets_itself_per_group() -> None:
    """``step_scale`` multiplies every tensor's first step of the shipped default (matrices and biases: the step is
    linear in the lr multiplier and the Prodigy ratio is scale-free), after the cap of an lr above the reference; a
    group's own ``"step_scale"`` overrides the optimizer's; a group state without the key (an older checkpoint's)
    steps as 1."""

    def every(model: nn.Module) -> list[dict]:
        return [{"params": list(model.parameters())}]

    def split(model: nn.Module) -> list[dict]:
        return [{"params": list(model[0].parameters()), "step_scale": 0.5}, {"params": list(model[2:].parameters())}]

    def referenced(model: nn.Module) -> list[dict]:
        return [{"params": list(model.parameters()), "reference_lr": 0.125}]

    base = _first_steps(every)
    for moved, expected in zip(_first_steps(every, step_scale=2.5), base):
        torch.testing.assert_close(moved, 2.5 * expected, rtol=1e-5, atol=1e-9)
    first = len(list(_model()[0].parameters()))
    for i, (moved, expected) in enumerate(zip(_first_steps(split, step_scale=3.0), base)):
        torch.testing.assert_close(moved, (0.5 if i < first else 3.0) * expected, rtol=1e-5, atol=1e-9)
    with pytest.warns(UserWarning, match="8x its reference lr"):  # capped at 1, then scaled
        raised = _first_steps(referenced, step_scale=2.0)
    for moved, expected in zip(raised, base):
        torch.testing.assert_close(moved, 2.0 * expected, rtol=1e-5, atol=1e-9)
    state = RuleOptimizer(_model().parameters(), _default(), horizon=8, step_scale=4.0).state_dict()
    assert state["param_groups"][0]["step_scale"] == 4.0
    del state["param_groups"][0]["step_scale"]  # as the groups of a checkpoint from before step_scale
    # the saved groups replace the new ones (as for any torch optimizer): 4.0 is not used, the missing key steps as 1
    for moved, expected in zip(_first_steps(every, load=state, step_scale=4.0), base):
        torch.testing.assert_close(moved, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan, "2"])
def test_a_step_scale_that_is_not_a_finite_positive_number_is_refused(scale: object) -> None:
    with pytest.raises(ValueError, match="step_scale="):
        RuleOptimizer(_model().parameters(), "default", horizon=8, step_scale=scale)  # type: ignore[arg-type]
    opt = RuleOptimizer(list(_model()[0].parameters()), "default", horizon=8)
    with pytest.raises(ValueError, match="step_scale="):
        opt.add_param_group({"params": list(_model()[2].parameters()), "step_scale": scale})
    assert len(opt.param_groups) == 1  # refused before it was added


def test_a_step_scale_on_a_rule_in_lr_mode_is_refused_naming_the_lr() -> None:
    """A rule in lr mode takes the lr as its step: a step_scale would be a second lr, so it is refused."""
    with pytest.raises(ValueError, match="takes the lr as its step: scale the lr instead"):
        RuleOptimizer(_model().parameters(), "adam", lr=1e-3, step_scale=2.0)
    RuleOptimizer(_model().parameters(), "adam", lr=1e-3, step_scale=1.0)  # the neutral value is fine


def test_a_loaded_rule_told_to_orthogonalise_steps_each_matrix_along_a_polar_factor() -> None:
    """The guide's opt-in: ``load_pretrained("default").replace(orthogonalize=True)`` makes ``RuleOptimizer`` step a weight
    matrix as the rule's functional update does with it, a step whose singular values are about equal (the plain
    default's spread with the gradient's), and leaves the bias's AdamW step as it was."""
    from lightning_meta.optim import load_pretrained

    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    u, _, vh = torch.linalg.svd(torch.randn(4, 16), full_matrices=False)
    grads = {"weight": u @ torch.diag(torch.tensor([1.0, 0.3, 0.1, 0.03])) @ vh, "bias": torch.randn(4)}
    steps = {}
    for orthogonal in (False, True):
        model = copy.deepcopy(layer)
        rule = load_pretrained("default").replace(orthogonalize=orthogonal)
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
        RuleOptimizer(model.parameters(), rule, horizon=10).step()
        steps[orthogonal] = {name: getattr(layer, name).detach() - p.detach() for name, p in model.named_parameters()}
        if orthogonal:
            w = layer.weight.detach()
            new, _ = rule.update(w, grads["weight"], rule.init_state(w), lr=1.0, step=1, horizon=10)
            torch.testing.assert_close(steps[True]["weight"], w - new)
    orthogonal_sv = torch.linalg.svdvals(steps[True]["weight"])
    plain_sv = torch.linalg.svdvals(steps[False]["weight"])
    assert orthogonal_sv.max() / orthogonal_sv.min() < 2 < plain_sv.max() / plain_sv.min()
    torch.testing.assert_close(steps[True]["bias"], steps[False]["bias"])
