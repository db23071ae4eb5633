"""Meta-gradient estimators against closed forms, finite differences and each other."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lightning_meta.optim.meta.estimators import ES, PES, TruncatedBPTT, apply_rule, get_estimator
from lightning_meta.optim.meta.tasks import QuadraticTask, TeacherStudentTaskFamily, get_family
from lightning_meta.optim.rules import get_rule
from tests.optim.meta_test_rules import LinearRule, ScalarSGDRule, TanhMomentumRule


@dataclass
class _FixedQuadraticTask(QuadraticTask):
    start: torch.Tensor | None = None

    def init(self, generator):
        return {"x": self.start.clone()}


class _FixedQuadraticFamily:
    """Always the same noiseless quadratic and starting point, so meta-losses have closed forms."""

    name = "fixed_quadratic"

    def __init__(self) -> None:
        self.h = torch.tensor([[0.5, 1.0, 2.0], [3.0, 1.5, 0.8]])
        self.c = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -0.5]])
        self.x0 = torch.tensor([[0.0, 1.0, -1.0], [1.0, 0.0, 0.5]])

    def sample(self, generator):
        return _FixedQuadraticTask(self.h, self.c, 0.0, start=self.x0)


def _loss(h, c, x):
    return 0.5 * (h * (x - c) ** 2).mean()


def _exact(n_tasks: int, **kwargs) -> dict:
    return dict(num_tasks=n_tasks, normalize_loss=False, max_loss=1e9, **kwargs)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_es_matches_the_gradient_of_a_quadratic_meta_loss():
    # One update of p - t0 g - t1 p: the final loss is quadratic in theta, so the Gaussian-smoothed
    # objective has the same gradient as the objective itself.
    fam = _FixedQuadraticFamily()
    theta = torch.tensor([0.3, 0.05], requires_grad=True)
    n = fam.h.numel()
    x1 = fam.x0 - theta[0] * fam.h * (fam.x0 - fam.c) / n - theta[1] * fam.x0
    (true,) = torch.autograd.grad(_loss(fam.h, fam.c, x1), theta)
    est = ES(fam, **_exact(4000, truncation_length=1, min_horizon=1, max_horizon=1, objective="final"), sigma=0.1)
    g = est.estimate(LinearRule((0.3, 0.05))).gradient["theta"]
    assert _rel_err(g, true) < 0.06
    assert torch.nn.functional.cosine_similarity(g, true, dim=0) > 0.998


def test_pes_is_unbiased_across_truncations_and_es_is_not():
    # Three updates in three truncations of length 1; the objective is the sum of the pre-update losses.
    # With independent noise eps_t per truncation: E[(x_t - c)^2] = (x0 - c)^2 prod_s ((1 - theta k)^2 + sigma^2 k^2).
    fam, sigma = _FixedQuadraticFamily(), 0.05
    k = fam.h / fam.h.numel()
    theta = torch.tensor(2.0, requires_grad=True)
    a = (1 - theta * k) ** 2 + sigma**2 * k**2
    smoothed = sum(0.5 * (fam.h * (fam.x0 - fam.c) ** 2 * a**t).mean() for t in range(3))
    (true,) = torch.autograd.grad(smoothed, theta)
    sums = {}
    for cls in (PES, ES):
        est = cls(
            fam,
            **_exact(5000, truncation_length=1, min_horizon=3, max_horizon=3, objective="mean"),
            sigma=sigma,
            seed=1,
        )
        rule = ScalarSGDRule(2.0)
        sums[cls] = sum(est.estimate(rule).gradient["theta"] for _ in range(3))
    assert abs(float(sums[PES] / true) - 1) < 0.06
    assert abs(float(sums[ES] / true)) < 0.2  # truncated ES ignores the effect of earlier truncations


def test_pes_equals_es_when_each_inner_problem_is_one_truncation():
    rule = get_rule("celo2")
    kw = dict(num_tasks=3, truncation_length=4, min_horizon=4, max_horizon=4, sigma=0.05, seed=7, inner_lr=0.02)
    pes, es = PES(get_family("mlp"), **kw), ES(get_family("mlp"), **kw)
    for _ in range(2):  # the second call starts new inner problems: PES's accumulators restart too
        gp, ge = pes.estimate(rule).gradient, es.estimate(rule).gradient
        assert gp.keys() == ge.keys()
        for name in gp:
            torch.testing.assert_close(gp[name], ge[name], rtol=0, atol=0)
        assert any(g.abs().sum() > 0 for g in gp.values())


@pytest.mark.parametrize("objective", ["mean", "mean_log", "valid", "final"])
def test_tbptt_gradient_equals_finite_differences(objective):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        family = TeacherStudentTaskFamily(in_features=3, teacher_hidden=(4,), hidden=(5,), batch_size=6)
        kw = dict(num_tasks=2, truncation_length=3, min_horizon=3, max_horizon=3, objective=objective, seed=3)
        rule = TanhMomentumRule().double()
        est = TruncatedBPTT(family, **kw).estimate(rule)
        direction = {
            n: torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
            for n, p in rule.named_parameters()
        }
        analytic = sum((est.gradient[n] * d).sum() for n, d in direction.items())

        def meta_loss(scale: float) -> float:
            shifted = TanhMomentumRule().double()
            with torch.no_grad():
                for n, p in shifted.named_parameters():
                    p.copy_(dict(rule.named_parameters())[n] + scale * direction[n])
            return float(TruncatedBPTT(family, **kw).estimate(shifted).meta_loss)

        step = 1e-5
        numeric = (meta_loss(step) - meta_loss(-step)) / (2 * step)
        assert abs(float(analytic)) > 1e-4
        assert float(analytic) == pytest.approx(numeric, rel=1e-6)
    finally:
        torch.set_default_dtype(old)


def test_tbptt_through_the_celo2_rule_matches_finite_differences():
    torch.manual_seed(0)
    rule = get_rule("celo2")
    torch.nn.init.normal_(rule.output.weight, std=0.5)  # away from the zero init, so every weight matters
    family = TeacherStudentTaskFamily(in_features=4, teacher_hidden=(4,), hidden=(6,), batch_size=8)
    kw = dict(num_tasks=2, truncation_length=4, min_horizon=4, max_horizon=4, seed=2, inner_lr=0.05)
    est = TruncatedBPTT(family, **kw).estimate(rule)
    direction = {n: torch.randn(p.shape) for n, p in rule.named_parameters()}
    analytic = float(sum((est.gradient[n] * d).sum() for n, d in direction.items()))
    values = []
    for scale in (2e-3, -2e-3):
        with torch.no_grad():
            for n, p in rule.named_parameters():
                p.add_(scale * direction[n])
        values.append(float(TruncatedBPTT(family, **kw).estimate(rule).meta_loss))
        with torch.no_grad():
            for n, p in rule.named_parameters():
                p.sub_(scale * direction[n])
    assert analytic == pytest.approx((values[0] - values[1]) / 4e-3, rel=2e-2)


def test_vmapped_per_particle_weights_equal_a_loop_over_problems():
    rule = get_rule("celo2")
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 5, 4, generator=gen), "b": torch.randn(3, 4, generator=gen)}
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    state = {k: rule.init_state(v, batch_dims=1) for k, v in params.items()}
    theta = {n: p.detach() + 0.3 * torch.randn(3, *p.shape, generator=gen) for n, p in rule.named_parameters()}
    loss = torch.ones(3)
    new, _ = apply_rule(rule, params, grads, state, lr=0.1, step=1, horizon=10, loss=loss, theta=theta)
    for i in range(3):
        single = get_rule("celo2")
        single.load_state_dict({n: t[i] for n, t in theta.items()})
        for k in params:
            ref, _ = single.update(
                params[k][i], grads[k][i], {n: s[i] for n, s in state[k].items()}, lr=0.1, step=1, horizon=10
            )
            torch.testing.assert_close(new[k][i], ref)


def test_estimators_reject_bad_arguments():
    fam = get_family("quadratic")
    with pytest.raises(ValueError, match="objective='best'"):
        PES(fam, objective="best")
    with pytest.raises(ValueError, match="sigma=0"):
        ES(fam, sigma=0)
    with pytest.raises(ValueError, match="min_horizon"):
        TruncatedBPTT(fam, min_horizon=10, max_horizon=5)
    with pytest.raises(ValueError, match="inner_lr"):
        TruncatedBPTT(fam, inner_lr=(1e-2, 1e-3))
    with pytest.raises(ValueError, match="'adam_es'"):
        get_estimator("adam_es", fam)
