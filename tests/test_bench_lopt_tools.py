"""The learned-optimizer benchmark tools: ``bench_lopt_validation.py --planned-horizon-factor`` (the candidates and a
cosine Adam added for reference are told a wrong number of steps, the other baselines the real one),
``trace_lopt_state.py``, the step-size variants of ``bench_lopt_variants.py`` and ``tally_lopt_validation.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.bench_lopt_quality import GRID, run_population
from benchmarks.bench_lopt_validation import main, summarize, validation_tasks
from lightning_meta.optim import load_pretrained
from lightning_meta.optim.rules import get_rule


def test_a_run_told_a_shorter_horizon_starts_as_that_shorter_run_and_one_told_longer_differs() -> None:
    """Told 6 of 12 steps, the default's and cosine Adam's first 6 losses are those of a 6-step run (the schedule
    is the planned one); told 24, the 12-step run differs from the correctly planned one after its first step."""
    family = validation_tasks()["quadratic"]
    for rule, schedule, lrs in (
        (load_pretrained("default"), "constant", (1.0,)),
        (get_rule("adam"), "cosine", (0.03,)),
    ):
        short = run_population(family, rule, lrs, (7000,), 6, schedule)
        told_short = run_population(family, rule, lrs, (7000,), 12, schedule, planned_horizon=6)
        told_long = run_population(family, rule, lrs, (7000,), 12, schedule, planned_horizon=24)
        full = run_population(family, rule, lrs, (7000,), 12, schedule)
        assert torch.equal(told_short[:6], short)
        assert not torch.equal(told_long, full) and torch.equal(told_long[:1], full[:1])


def test_the_quick_protocol_records_the_factor_and_scores_against_the_misplanned_cosine(tmp_path) -> None:
    results = main(
        [
            "--quick",
            "--planned-horizon-factor",
            "0.5",
            "--candidate",
            "D=pretrained:default",
            "--multipliers",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert results["planned_horizon_factor"] == 0.5
    for row in results["tasks"].values():
        assert {"adam", "adam_cosine", "adam_cosine_planned", "D"} <= set(row)
    assert "1x_win_vs_adam_cosine_planned" in results["summary"]["D"]


def test_the_summary_counts_strict_wins_and_separately_the_cells_within_one_percent() -> None:
    """A score 0.5 % above cosine Adam's is a loss but within 1 %; 2 % above is neither; a numerically-zero score
    (below the floor) ties another one."""

    def row(candidate: float, cosine: float = 1.0, initial: float = 10.0) -> dict:
        scores = {"adam": 2.0 * cosine, "adam_cosine": cosine, "C": candidate}
        return {"_initial": initial} | {k: {"score": v, "diverged": False} for k, v in scores.items()}

    tasks = {
        "a@1x": row(0.9),
        "b@1x": row(1.005),
        "c@1x": row(1.02),
        "a@10x": row(1e-9, cosine=2e-9),  # both below 1e-6 of the initial loss: equal after the floor
    }
    entry = summarize({"tasks": tasks}, ["C"])["C"]
    assert entry["1x_win_vs_adam_cosine"] == pytest.approx(1 / 3)
    assert entry["10x_win_vs_adam_cosine"] == 1.0
    assert entry["wins"] == 3 + 1 + 2  # 1x: all three beat constant Adam (2x cosine's score), one cosine; 10x: both
    assert entry["within_1pct_of_adam_cosine"] == pytest.approx(3 / 4)


def test_previous_rows_of_a_cosine_misplanned_by_another_factor_are_rerun(tmp_path) -> None:
    """``--previous`` reuses the Adam baselines, but the misplanned cosine of a run with another
    ``--planned-horizon-factor`` is another optimizer: it is run again, and matches a run without ``--previous``."""
    common = ["--quick", "--multipliers", "1", "--tasks", "quadratic", "--candidate", "D=pretrained:default"]
    first = main([*common, "--planned-horizon-factor", "0.5", "--out", str(tmp_path / "a")])
    fresh = main([*common, "--planned-horizon-factor", "2"])
    reused = main(
        [*common, "--planned-horizon-factor", "2", "--previous", str(tmp_path / "a" / "lopt_validation.json")]
    )
    row_first, row_fresh, row_reused = (r["tasks"]["quadratic@1x"] for r in (first, fresh, reused))
    assert row_reused["adam_cosine_planned"] == row_fresh["adam_cosine_planned"] != row_first["adam_cosine_planned"]
    assert row_reused["adam_cosine"] == row_first["adam_cosine"]


def test_the_state_trace_reports_the_estimate_the_gain_and_adams_size_per_matrix() -> None:
    """``benchmarks/trace_lopt_state.py``: five reports of the matrices' Prodigy estimate (never below ``d₀``), gain
    (within the default's bounds), Adam's update RMS (in (0, 1]), Prodigy's ratio and the distance moved; a rule without the Prodigy
    state is refused by name."""
    from benchmarks.trace_lopt_state import trace

    rows = trace("teacher_student", 20)
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20]
    assert all(math.isfinite(r["exponent"]) for r in rows) and rows[-1]["exponent"] > 0  # the loss still falls
    for row in rows:
        matrices = {k: v for k, v in row.items() if isinstance(v, dict)}
        assert set(matrices) == {"w0", "w1"}
        for stats in matrices.values():
            assert stats["d/d0"] >= 1.0 and -4.6 <= stats["h"] <= 0.0 and 0.0 < stats["a"] <= 1.0 + 1e-6
            assert 0.0 < stats["moved/d"] < 100.0  # the weights have left x_0, by a few estimates
    with_biases = trace("teacher_student", 20, biases=True)
    assert {k for k, v in with_biases[-1].items() if isinstance(v, dict)} == {"w0", "b0", "w1", "b1"}
    assert with_biases[-1]["w0"] == rows[-1]["w0"]  # the same run, more tensors reported
    with pytest.raises(ValueError, match="--rule celo2-auto: the trace reads the Prodigy state"):
        trace("teacher_student", 5, "celo2-auto")
    # a variant: Mechanic around Adam has no Prodigy state but a learned scale, the same for every tensor, which
    # has grown from its start (1e-8) within 20 steps
    mechanic = trace("teacher_student", 20, variant="mechanic:1e-8:0.01:cosine:adam")
    for row in mechanic:
        stats = [v for v in row.values() if isinstance(v, dict)]
        assert [set(v) for v in stats] == [{"a", "s"}] * 2 and stats[0]["s"] == stats[1]["s"]
    assert mechanic[-1]["w0"]["s"] > 10 * mechanic[0]["w0"]["s"] > 1e-7
    # the trace runs a variant as the protocol does, its initial-state hook included (``global:`` has one)
    from benchmarks.bench_lopt_variants import load_variant
    from benchmarks.bench_lopt_variants import run_population as run_variant

    pooled = trace("teacher_student", 20, variant="global:" + _PRODIGY)
    losses = run_variant(
        validation_tasks()["teacher_student"], load_variant("global:" + _PRODIGY), (1.0,), (7000,), 20, "constant"
    )
    for row in pooled:
        t, tail = row["step"], max(1, row["step"] // 10)  # the trace's loss: the mean over the last tenth
        assert row["loss"] == pytest.approx(float(losses[t - tail : t].mean()), rel=1e-6)
    assert pooled[-1]["loss"] != pytest.approx(rows[-1]["loss"], rel=1e-3)  # and it is not the plain rule's run


def test_the_lr_sweep_at_multiplier_one_reproduces_the_protocols_row() -> None:
    """``benchmarks/sweep_lopt_lr.py``: its multiplier 1 is the validation protocol's score of the rule (same
    instances, runs and scoring); other multipliers give other scores; bad multipliers are refused."""
    from benchmarks.sweep_lopt_lr import sweep

    protocol = main(["--quick", "--tasks", "quadratic", "--candidate", "D=pretrained:default", "--multipliers", "1"])
    quick = protocol["horizon"], protocol["seeds"]
    swept = sweep(
        "quadratic", (0.5, 1.0), seed_base=quick[1][0], seeds=len(quick[1]), horizon=quick[0], horizon_multipliers=(1,)
    )
    assert swept["1x"][1] == pytest.approx(protocol["tasks"]["quadratic@1x"]["D"]["score"], rel=1e-6)
    assert swept["1x"][0] != swept["1x"][1]
    with pytest.raises(ValueError, match="finite numbers > 0"):
        sweep("quadratic", (0.0,))


def test_the_step_size_probe_reads_the_x1_run_and_its_fit_recovers_a_linear_law() -> None:
    """``benchmarks/probe_lopt_step_size.py``: each instance's x1 score is the lr sweep's at multiplier 1 (the same
    run), its five features come from that run (the estimate never below ``d₀``: ``log d/d0 >= 0``), the best
    multiplier prefers x1 among scores tied at the floor, and the least-squares fit recovers a linear law."""
    from benchmarks.probe_lopt_step_size import MULTIPLIERS, best_index, fit_predict, probe
    from benchmarks.sweep_lopt_lr import sweep

    scores, features = probe(validation_tasks()["quadratic"], 7000, 20)
    swept = sweep("quadratic", (1.0,), seed_base=7000, seeds=1, horizon=20, horizon_multipliers=(1,))
    assert scores[MULTIPLIERS.index(1.0)] == pytest.approx(swept["1x"][0], rel=1e-6)
    assert len(features) == 5 and features[0] >= 0.0 and features[4] < 0.0  # the loss fell over the first 2 steps
    assert best_index([3.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0]) == MULTIPLIERS.index(1.0)
    assert best_index([3.0, 0.5, 1.0, 1.0, 1.0, 2.0, 1.0]) == 1
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = 2 * x[:, 0] - x[:, 1] + 0.5
    test = torch.tensor([[1.0, 1.0, 5.0], [0.0, -2.0, 0.0]], dtype=torch.float64)
    assert fit_predict(x, y, test).tolist() == pytest.approx([1.5, 2.5], abs=1e-3)


_PRODIGY = "prodigy:0.1:0.1:0.05:0:final_fraction=0:warmup_fraction=0:magnitude_power=1:update_rms=0.6:prodigy_d0=0.1"


def test_the_step_size_variants_leave_the_rule_alone_where_they_should_not_act() -> None:
    """``benchmarks/bench_lopt_variants.py``: pooling one tensor, a factor of 1, a loss-driven multiplier whose up
    and down are 1, a loss-trend multiplier of rate 0, a tail that ends at 1 and a horizon scaling at its reference
    reproduce the plain rule's run bit for bit; a factor of 3 on the one matrix does not, nor a loss-trend rate above
    0, a tail to 0.1 (from its start on) or a horizon scaling away from its reference."""
    from benchmarks.bench_lopt_variants import load_variant
    from benchmarks.bench_lopt_variants import run_population as run_variant

    family = validation_tasks()["quadratic"]
    plain = run_population(family, load_variant(_PRODIGY), (1.0,), (7000,), 12, "constant")

    def run(variant: str) -> torch.Tensor:
        return run_variant(family, load_variant(variant + _PRODIGY), (1.0,), (7000,), 12, "constant")

    for spec in (
        "pooled:",
        "scale:all:1:",
        "scale:vectors:3:",
        "loss-driven:2:0.01:1:1:0.25:4:",
        "loss-trend:0:0.9:0.98:8:",
        "tail:0.5:1:",
        "horizon:0.3:12:",
    ):
        assert torch.equal(run(spec), plain)
    # each acting variant: (its spec, the leading losses it leaves as they were)
    for spec, same in (
        ("scale:matrices:3:", 1),
        ("loss-trend:0.5:0.5:0.9:8:", 2),
        ("tail:0.5:0.1:", 7),  # steps 1-6 are before the tail
        ("horizon:0.3:6:", 1),
    ):
        moved = run(spec)
        assert not torch.equal(moved, plain) and torch.equal(moved[:same], plain[:same])
    with pytest.raises(ValueError, match="0 < FLOOR <= 1"):
        load_variant("tail:0.5:0:" + _PRODIGY)
    with pytest.raises(ValueError, match="KIND must be one of"):
        load_variant("scale:rows:2:" + _PRODIGY)
    with pytest.raises(ValueError, match="pooling needs a rule with step_size='prodigy'"):
        load_variant("pooled:pretrained:celo2-auto")


def _run_recording_gains(spec: str, seen: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """A 30-step teacher–student run of the variant ``spec`` (two seeds), every tensor's log gain after each step
    appended to ``seen``; the losses."""
    from benchmarks.bench_lopt_variants import load_variant
    from benchmarks.bench_lopt_variants import run_population as run_variant

    rule = load_variant(spec)
    hook = rule._variant_hook() if hasattr(rule, "_variant_hook") else None

    def record(step, loss, params, state) -> None:
        if hook is not None:
            hook(step, loss, params, state)
        seen.append({k: s["log_gain"].clone() for k, s in state.items()})

    return run_variant(
        validation_tasks()["teacher_student"], rule, (1.0,), (7000, 7001), 30, "constant", on_step=record
    )


def test_a_leaky_gain_forgets_a_fraction_of_the_log_gain_after_every_step() -> None:
    """``leaky-gain:DECAY:``: DECAY 0 is the plain rule bit for bit; otherwise every tensor's log gain after a step
    is ``1 − DECAY`` times what the rule left, and the next step adds the rule's own hypergradient step to that."""
    from benchmarks.bench_lopt_variants import load_variant

    gains: dict[str, list[dict[str, torch.Tensor]]] = {}

    def run(spec: str) -> torch.Tensor:
        return _run_recording_gains(spec + _PRODIGY, gains.setdefault(spec, []))

    plain = run("")
    assert torch.equal(run("leaky-gain:0:"), plain)
    leaky = run("leaky-gain:0.1:")
    # the first step's gain is 0 (no momentum yet); the second's, the same in both runs, is forgotten by a tenth
    assert all(bool(g.eq(0).all()) for g in gains[""][0].values())
    second, plain_second = gains["leaky-gain:0.1:"][1], gains[""][1]
    assert any(bool(g.ne(0).any()) for g in plain_second.values())  # (the gain is at most 0: some stay 0)
    for k, g in plain_second.items():
        torch.testing.assert_close(second[k], 0.9 * g, rtol=1e-6, atol=0.0)
    assert torch.equal(leaky[:3], plain[:3]) and not torch.equal(leaky, plain)
    run("leaky-gain:1:")
    assert all(bool(g.eq(0).all()) for step in gains["leaky-gain:1:"] for g in step.values())
    with pytest.raises(ValueError, match="0 <= DECAY <= 1"):
        load_variant("leaky-gain:2:" + _PRODIGY)
    with pytest.raises(ValueError, match="hypergradient gain"):
        load_variant("leaky-gain:0.1:adam")


def test_a_ratcheted_gain_never_rises_from_its_start_fraction_on() -> None:
    """``ratchet-gain:START:``: from the fraction START of the planned horizon on, no tensor's log gain is ever above
    its previous step's; before it, the run is the plain rule's bit for bit (START 0.5 of a 30-step run: the first
    14 steps, τ = step / 30 < 0.5)."""
    from benchmarks.bench_lopt_variants import load_variant

    gains: dict[str, list[dict[str, torch.Tensor]]] = {}

    def run(spec: str) -> torch.Tensor:
        return _run_recording_gains(spec + _PRODIGY, gains.setdefault(spec, []))

    plain, half = run(""), run("ratchet-gain:0.5:")
    rises = [any(bool((now[k] > before[k]).any()) for k in now) for before, now in zip(gains[""], gains[""][1:])]
    assert any(rises[13:])  # the plain rule's gain does rise late in the run, so the ratchet has work to do
    for before, now in zip(gains["ratchet-gain:0.5:"][13:], gains["ratchet-gain:0.5:"][14:]):  # steps 14, 15, …
        assert all(bool((now[k] <= before[k]).all()) for k in now)
    assert torch.equal(half[:15], plain[:15]) and not torch.equal(half, plain)
    with pytest.raises(ValueError, match="0 <= START <= 1"):
        load_variant("ratchet-gain:2:" + _PRODIGY)
    with pytest.raises(ValueError, match="hypergradient gain"):
        load_variant("ratchet-gain:0:adam")


def test_the_gated_gain_holds_the_log_gain_while_the_loss_falls_faster_than_the_threshold_exponent() -> None:
    """``gated-gain:ALPHA:``: ``local_exponent`` reads ``α`` off a loss ``∝ t^−α`` (and 0 off a flat one); fed such
    losses, the gate holds each problem's log gain at its previous value from step 8 on where the exponent exceeds
    ALPHA, and lets it fall elsewhere; a threshold no loss reaches is the plain rule bit for bit."""
    from benchmarks.bench_lopt_variants import _holding, _still_falling, load_variant, local_exponent
    from benchmarks.bench_lopt_variants import run_population as run_variant

    steps = 64
    log_losses = torch.stack([-0.8 * torch.log(torch.arange(1.0, steps + 1)), torch.zeros(steps)], 1).double()
    sums = [torch.zeros(2, dtype=torch.float64), *log_losses.cumsum(0)]
    for t, tolerance in ((8, 0.1), (32, 0.03), (64, 0.015)):  # coarse over the few steps of an early window
        exponent = local_exponent(sums, t)
        assert abs(exponent[0].item() - 0.8) < tolerance and exponent[1].item() == 0.0
    gate = _holding(_still_falling(0.5))
    state = {"w": {"log_gain": torch.zeros(2, 1, 1)}}
    held = []
    for t in range(1, steps + 1):
        state["w"]["log_gain"] = state["w"]["log_gain"] - 0.01  # the rule lowers every gain a little each step
        gate(t, log_losses[t - 1].exp(), {}, state)
        held.append(state["w"]["log_gain"].flatten().clone())
    gains = torch.stack(held)
    assert torch.allclose(gains[:, 1], -0.01 * torch.arange(1.0, steps + 1).double().float(), atol=1e-6)
    assert torch.allclose(gains[7:, 0], gains[6, 0].expand(steps - 7)) and gains[6, 0] < gains[5, 0]

    family = validation_tasks()["teacher_student"]
    plain = run_population(family, load_variant(_PRODIGY), (1.0,), (7000,), 30, "constant")
    assert torch.equal(
        run_variant(family, load_variant("gated-gain:1e9:" + _PRODIGY), (1.0,), (7000,), 30, "constant"), plain
    )
    opened = run_variant(family, load_variant("gated-gain:-1e9:" + _PRODIGY), (1.0,), (7000,), 30, "constant")
    assert torch.equal(opened[:9], plain[:9]) and not torch.equal(opened, plain)
    with pytest.raises(ValueError, match="hypergradient gain"):
        load_variant("gated-gain:0.3:adam")


def test_the_away_gated_gain_holds_the_log_gain_while_the_pooled_prodigy_ratio_exceeds_the_threshold() -> None:
    """``away-gain:THRESHOLD:``: a threshold the pooled ratio never exceeds is the plain rule bit for bit; one it
    always exceeds holds every log gain at its start, 0, after every step (the step itself still takes its own
    hypergradient step's gain), so the run departs from the plain rule's once the gain would have fallen."""
    from benchmarks.bench_lopt_variants import load_variant
    from benchmarks.bench_lopt_variants import run_population as run_variant

    family = validation_tasks()["teacher_student"]
    plain = run_population(family, load_variant(_PRODIGY), (1.0,), (7000, 7001), 30, "constant")
    never = run_variant(family, load_variant("away-gain:1e9:" + _PRODIGY), (1.0,), (7000, 7001), 30, "constant")
    assert torch.equal(never, plain)
    rule = load_variant("away-gain:-1e9:" + _PRODIGY)
    hook, gains = rule._variant_hook(), []

    def record(step, loss, params, state) -> None:
        hook(step, loss, params, state)
        gains.extend(s["log_gain"] for s in state.values())

    always = run_variant(family, rule, (1.0,), (7000, 7001), 30, "constant", on_step=record)
    assert all(bool(g.eq(0).all()) for g in gains)
    assert torch.equal(always[:3], plain[:3]) and not torch.equal(always, plain)
    with pytest.raises(ValueError, match="step_size='prodigy'"):
        load_variant("away-gain:0:pretrained:celo2-auto")


def test_cosine_adam_as_a_candidate_is_the_tuned_cosine_baseline_and_a_scale_around_it_moves_one_kind() -> None:
    """``cosine:adam`` steps as the protocol's cosine Adam baseline, bit for bit, at several lrs; the biases' step
    times 0.1 around it leaves the matrices' first step as it was and shrinks the biases' by exactly that factor."""
    from benchmarks.bench_lopt_variants import load_variant
    from benchmarks.bench_lopt_variants import run_population as run_variant

    family = validation_tasks()["teacher_student"]
    lrs, seeds = (0.01, 0.1), (7000, 7001)
    baseline = run_population(family, get_rule("adam"), lrs, seeds, 30, "cosine")
    assert not load_variant("cosine:adam").relative_lr  # so the protocol tunes its lr, as the baseline's
    assert torch.equal(run_variant(family, load_variant("cosine:adam"), lrs, seeds, 30, "constant"), baseline)

    first: dict[str, dict[str, torch.Tensor]] = {}
    for spec in ("cosine:adam", "scale:vectors:0.1:cosine:adam"):
        start: dict[str, torch.Tensor] = {}

        def keep(params: dict, state: dict, start: dict = start) -> None:
            start.update({k: v.clone() for k, v in params.items()})

        def record(
            step: int, loss: torch.Tensor, params: dict, state: dict, spec: str = spec, start: dict = start
        ) -> None:
            if step == 1:
                first[spec] = {k: params[k] - start[k] for k in params}

        record.on_start = keep  # type: ignore[attr-defined]
        run_variant(family, load_variant(spec), (0.1,), (7000,), 2, "constant", on_step=record)
    plain, scaled = first["cosine:adam"], first["scale:vectors:0.1:cosine:adam"]
    for name in plain:
        factor = 0.1 if plain[name].ndim == 2 else 1.0  # (problems, n): a bias; (problems, n, m): a matrix
        torch.testing.assert_close(scaled[name], factor * plain[name])
        assert plain[name].abs().max() > 0


def test_the_skip_variant_steps_a_matrix_along_one_feature_and_orthogonalised_along_its_polar_factor() -> None:
    """``skip:FEATURE:SPEC``: ``skip:3`` is the default's direction (bit for bit); ``skip:1`` steps along the
    momentum, whose first value is ``(1 − β₁) g``, so the first step is ``g`` rescaled to the step's RMS; with
    ``orthogonalize=true`` the step's singular values are all about equal (Newton–Schulz's polar factor of ``g``)
    while ``g``'s spread by more than ten times."""
    from benchmarks.bench_lopt_variants import load_variant

    generator = torch.Generator().manual_seed(0)
    param = torch.randn(6, 9, generator=generator) * 0.3
    # a gradient with singular values 1 ... 1/30
    u, _, vh = torch.linalg.svd(torch.randn(6, 9, generator=generator), full_matrices=False)
    grad = u @ torch.diag(torch.logspace(0, -math.log10(30), 6)) @ vh

    def first_step(spec: str) -> torch.Tensor:
        rule = load_variant(spec)
        new, _ = rule.update(param, grad, rule.init_state(param), lr=1.0, step=1, horizon=10)
        return param - new

    plain = first_step(_PRODIGY)
    assert torch.equal(first_step("skip:3:" + _PRODIGY), plain)
    momentum = first_step("skip:1:" + _PRODIGY)
    rms = plain.pow(2).mean().sqrt()  # the same step size, whatever the direction
    torch.testing.assert_close(momentum, grad * (rms / grad.pow(2).mean().sqrt()))
    muon = torch.linalg.svdvals(first_step("skip:1:" + _PRODIGY + ":orthogonalize=true"))
    torch.testing.assert_close(muon.pow(2).mean().sqrt() * math.sqrt(6 / 54), rms, rtol=1e-5, atol=0)
    assert muon.max() / muon.min() < 1.6 and torch.linalg.svdvals(grad).max() / torch.linalg.svdvals(grad).min() > 10
    with pytest.raises(ValueError, match="FEATURE 0"):
        load_variant("skip:4:" + _PRODIGY)


def test_a_pooled_estimate_is_one_number_per_model_in_units_of_each_tensors_scale() -> None:
    """After every step of ``pooled:``, ``d / σ`` is the same for every tensor of a problem and never falls; the
    estimates differ from the per-tensor rule's."""
    from benchmarks.bench_lopt_quality import run_population as plain_run
    from benchmarks.bench_lopt_variants import load_variant

    family = validation_tasks()["mlp"]
    rule = load_variant("pooled:" + _PRODIGY)
    hook, seen = rule._variant_hook(), []

    def on_step(step, loss, params, state) -> None:
        hook(step, loss, params, state)
        seen.append({k: (s["estimate"] / (s["step_scale"] / rule.prodigy_d0)).reshape(-1) for k, s in state.items()})

    plain_run(family, rule, (1.0,), (7000, 7001), 60, "constant", on_step=on_step)
    for units in seen:
        assert len(units) >= 4 and all(torch.allclose(u, units["w0"], rtol=1e-6) for u in units.values())
    assert all((b["w0"] >= a["w0"]).all() for a, b in zip(seen, seen[1:])) and (seen[-1]["w0"] > 0.1).any()
    per_tensor, alone = load_variant(_PRODIGY), []
    plain_run(family, per_tensor, (1.0,), (7000, 7001), 60, "constant", on_step=lambda *a: alone.append(a[3]["b1"]))
    assert not torch.allclose(
        alone[-1]["estimate"].reshape(-1) / (alone[-1]["step_scale"].reshape(-1) / 0.1), seen[-1]["b1"]
    )


def test_a_variant_wrapped_around_a_pooled_one_keeps_the_pooling() -> None:
    """Both per-step hooks run: a loss-driven multiplier that never acts (up = down = 1) around ``pooled:`` gives the
    pooled run, which differs from the per-tensor one."""
    from benchmarks.bench_lopt_variants import load_variant
    from benchmarks.bench_lopt_variants import run_population as run_variant

    family = validation_tasks()["mlp"]
    pooled = run_variant(family, load_variant("pooled:" + _PRODIGY), (1.0,), (7000,), 60, "constant")
    wrapped = "loss-driven:2:0.01:1:1:0.25:4:pooled:" + _PRODIGY
    assert torch.equal(run_variant(family, load_variant(wrapped), (1.0,), (7000,), 60, "constant"), pooled)
    assert not torch.equal(run_variant(family, load_variant(_PRODIGY), (1.0,), (7000,), 60, "constant"), pooled)


def test_a_global_estimate_starts_every_tensor_from_the_models_weight_scale_and_pools_prodigys_ratio() -> None:
    """``global:``: before the first step every tensor's ``d₀`` and estimate are ``prodigy_d0`` times the RMS over all
    the matrices' entries (by hand); after each step every tensor holds ``max(D, Σ r / Σ ‖s‖₁)`` over the model,
    recomputed here from the states; wrapped in another variant (``loss-driven`` that never acts) the run is the same."""
    from benchmarks.bench_lopt_variants import load_variant
    from benchmarks.bench_lopt_variants import run_population as run_variant

    family = validation_tasks()["conv"]  # where the estimate grows
    rule = load_variant("global:" + _PRODIGY)
    hook, starts, steps = rule._variant_hook(), [], []

    def on_start(params, state) -> None:
        hook.on_start(params, state)
        matrices = [p for p in params.values() if p.ndim >= 3]  # (problems, ...) kernels and matrices
        sigma = torch.sqrt(sum((p**2).flatten(1).sum(1) for p in matrices) / sum(p[0].numel() for p in matrices))
        starts.append((sigma, {k: (s["step_scale"].reshape(-1), s["estimate"].reshape(-1)) for k, s in state.items()}))

    def on_step(step, loss, params, state) -> None:
        before = next(iter(state.values()))["estimate"].reshape(-1).double().clone()
        numerator = sum(s["numerator"].reshape(-1).double() for s in state.values())
        l1 = sum(
            s["grad_sum"].abs().flatten(1).sum(1).double() * s["grad_sum_scale"].reshape(-1).double()
            for s in state.values()
        )
        hook(step, loss, params, state)
        steps.append((before, numerator / l1, {k: s["estimate"].reshape(-1).double() for k, s in state.items()}))

    losses = run_population(family, rule, (1.0,), (7000, 7001), 60, "constant", on_step=on_step, on_start=on_start)
    ((sigma, initial),) = starts
    assert len(initial) >= 4 and all(  # matrices and biases, all from the same scale
        torch.allclose(d0, 0.1 * sigma, rtol=1e-5) and torch.equal(d0, d) for d0, d in initial.values()
    )
    previous = 0.1 * sigma.double()
    for _, ratio, estimates in steps:
        expected = torch.maximum(previous, ratio)
        assert all(torch.allclose(e, expected, rtol=1e-6) for e in estimates.values())
        previous = expected
    assert (previous > 0.1 * sigma.double() * 1.01).any()  # the estimate grew on at least one problem
    wrapped = run_variant(
        family, load_variant("loss-driven:2:0.01:1:1:0.25:4:global:" + _PRODIGY), (1.0,), (7000, 7001), 60, "constant"
    )
    assert torch.equal(wrapped, losses)  # the run above, with the hooks called by hand
    plain = run_variant(family, load_variant(_PRODIGY), (1.0,), (7000, 7001), 60, "constant")
    assert not torch.allclose(plain, losses)


def test_uncorrected_moments_make_the_first_step_sqrt_1000_over_10_times_larger() -> None:
    """Without bias correction the first ``m / sqrt(v)`` is ``0.1 g / sqrt(0.001 g²)``: 3.162× the corrected one,
    so the first displacement of ``uncorrected:`` is 3.162× the plain rule's (closed form, Adam's betas)."""
    from benchmarks.bench_lopt_variants import load_variant

    family = validation_tasks()["quadratic"]
    moves = []
    for spec in (_PRODIGY, "uncorrected:" + _PRODIGY):
        rule, start, first = load_variant(spec), {}, {}

        def on_step(step, loss, params, state, start=start, first=first) -> None:
            if step == 1:
                first.update(params)
                start.update({k: s["initial"] for k, s in state.items()})

        run_population(family, rule, (1.0,), (7000,), 1, "constant", on_step=on_step)
        moves.append(first["x"] - start["x"])
    assert torch.allclose(moves[1], moves[0] * (0.1 / 0.001**0.5), rtol=1e-4)


def _mechanic_reference(grad, x1: list[float], base_lr: float, steps: int, s_init: float, wd: float) -> list[float]:
    """Mechanic's Algorithm 1 (arXiv:2306.00144, with optax's clipping of ``h``) for one problem, in Python floats:
    plain gradient descent at ``base_lr`` as the base; returns the weights after ``steps`` steps."""
    betas = [1.0 - 0.1**i for i in range(1, 7)]
    s, r, m, v = [s_init / 6] * 6, [0.0] * 6, [0.0] * 6, [0.0] * 6
    x, delta = list(x1), [0.0] * len(x1)
    for _ in range(steps):
        g = grad(x)
        g_norm, x_norm = math.sqrt(sum(gi * gi for gi in g)), math.sqrt(sum(xi * xi for xi in x))
        total = sum(s)
        h = -sum((gi + wd * total * g_norm / (x_norm + 1e-8) * xi) * di for gi, xi, di in zip(g, x, delta))
        for i, beta in enumerate(betas):
            clipped = min(max(h, -m[i]), m[i])
            m[i] = max(beta * m[i], abs(h) + 1e-8)
            v[i] = beta * beta * v[i] + h * h
            r[i] = max(0.0, beta * r[i] + clipped * s[i])
            s[i] = (s_init / 6 * m[i] + r[i]) / (math.sqrt(v[i]) + 1e-8)
        delta = [di - base_lr * gi for di, gi in zip(delta, g)]
        x = [x1i + sum(s) * di for x1i, di in zip(x1, delta)]
    return x


def test_mechanic_learns_one_scale_per_problem_as_the_papers_algorithm_does() -> None:
    """``mechanic:S_INIT:WEIGHT_DECAY:``: its hook, fed a base that steps plain gradient descent on a quadratic per
    problem (two problems, weights split over two tensors), moves the weights as the scalar reference of the paper's
    algorithm does; from a base step 1000 times too small it grows the scale by orders of magnitude. Around a rule it
    runs untuned (lr multiplier 1) and the first step stays at the initial weights."""
    from benchmarks.bench_lopt_variants import _mechanizing, load_variant
    from benchmarks.bench_lopt_variants import run_population as run_variant

    curvature = torch.tensor([[1.0, 4.0, 0.5], [2.0, 0.3, 1.0]], dtype=torch.float64)  # one row per problem
    target = torch.tensor([[1.0, -2.0, 0.5], [0.2, 3.0, -1.0]], dtype=torch.float64)
    start = torch.tensor([[0.5, 0.5, -0.5], [1.0, 1.0, 1.0]], dtype=torch.float64)
    # (not longer: once the scale reaches the stiff direction's edge of stability the runs turn chaotic, and
    # rounding grows until the two implementations part)
    for base_lr, s_init, wd, steps in ((0.1, 1e-3, 0.0, 40), (0.1, 1e-3, 0.01, 40), (1e-4, 1e-8, 0.0, 100)):
        hook = _mechanizing(s_init, wd)
        params = {"a": start[:, :2].clone(), "b": start[:, 2:].clone()}
        state: dict[str, dict[str, torch.Tensor]] = {"a": {}, "b": {}}
        for step in range(1, steps + 1):
            x = torch.cat([params["a"], params["b"]], 1)
            g = curvature * (x - target)
            for k, part in (("a", g[:, :2]), ("b", g[:, 2:])):
                state[k] = {"mech_g": part, "mech_u": -base_lr * part}
            hook(step, (0.5 * curvature * (x - target) ** 2).sum(1), params, state)
        assert [set(state[k]) for k in ("a", "b")] == [{"mech_scale"}] * 2  # it took what the update left
        got = torch.cat([params["a"], params["b"]], 1)
        for p in range(2):

            def grad(x: list[float], p: int = p) -> list[float]:
                return [c * (xi - t) for c, xi, t in zip(curvature[p].tolist(), x, target[p].tolist())]

            expected = _mechanic_reference(grad, start[p].tolist(), base_lr, steps, s_init, wd)
            torch.testing.assert_close(got[p], torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-10)
        if base_lr == 1e-4:  # the base alone keeps at least (1 − 4e-4)^200 > 0.9 of each problem's loss
            loss = (0.5 * curvature * (got - target) ** 2).sum(1)
            assert bool((loss < 0.5 * (0.5 * curvature * (start - target) ** 2).sum(1)).all())

    family = validation_tasks()["teacher_student"]
    rule = load_variant("mechanic:1e-8:0.01:cosine:adam")
    assert rule.relative_lr  # the protocol runs it at lr multiplier 1, untuned
    first: dict[str, torch.Tensor] = {}
    task = family.sample(torch.Generator().manual_seed(1000 + 7000))  # run_population's seeding
    initial = task.init(torch.Generator().manual_seed(2000 + 7000))

    def on_step(step, loss, params, state) -> None:
        rule._hook(step, loss, params, state)
        if step == 1:
            first.update({k: v.clone() for k, v in params.items()})

    rule._hook = rule._variant_hook()
    losses = run_variant(family, rule, (1.0,), (7000,), 40, "constant", on_step=on_step)
    for k, v in initial.items():  # after one step the scale is S_INIT: 1e-8 of Adam's first step at lr 1
        assert torch.allclose(first[k][0], v, atol=1e-7)
    assert bool(torch.isfinite(losses).all())
    with pytest.raises(ValueError, match="S_INIT > 0"):
        load_variant("mechanic:0:0.01:adam")


def test_schedule_free_steps_z_at_a_constant_lr_and_scores_the_interpolation_of_z_and_its_weighted_average() -> None:
    """``schedule-free:BETA:INNER_BETA1:POWER:``: with ``BETA`` 0 the run is the plain rule's without its schedule,
    bit for bit (``schedule-free-cosine:``'s with it); otherwise, unrolled by hand from the recorded ``z``'s and step
    sizes, ``x`` is the average of the ``z``'s weighted by ``t ** POWER (lr d_t e^{h_t})²`` and the parameters are
    ``(1 − BETA) z + BETA x``."""
    from benchmarks.bench_lopt_variants import load_variant
    from benchmarks.bench_lopt_variants import run_population as run_variant

    family = validation_tasks()["mlp"]
    unscheduled = load_variant(_PRODIGY)
    unscheduled.horizon_schedule = False
    plain = run_population(family, unscheduled, (1.0,), (7000,), 12, "constant")
    assert torch.equal(
        run_variant(family, load_variant("schedule-free:0:-:0:" + _PRODIGY), (1.0,), (7000,), 12, "constant"), plain
    )
    scheduled = run_population(family, load_variant(_PRODIGY), (1.0,), (7000,), 12, "constant")
    assert not torch.equal(scheduled, plain)
    kept = run_variant(family, load_variant("schedule-free-cosine:0:-:0:" + _PRODIGY), (1.0,), (7000,), 12, "constant")
    assert torch.equal(kept, scheduled)

    beta, power, lr = 0.8, 2.0, 0.5
    rule = load_variant(f"schedule-free:{beta}:0:{power:g}:" + _PRODIGY)
    assert rule.betas[0] == 0.0 and not rule.horizon_schedule
    zs: dict[str, list] = {}
    weights: dict[str, list] = {}
    used: dict[str, tuple] = {}  # the estimate and gain the next step uses
    final: dict[str, tuple] = {}

    def on_step(step, loss, params, state) -> None:
        for k, s in state.items():
            d, gain = used.get(k, (s["step_scale"], torch.zeros(())))  # step 1 uses d₀ and gain 0
            weights.setdefault(k, []).append(step**power * (lr * d * torch.exp(gain)) ** 2)
            zs.setdefault(k, []).append(s["sf_z"].clone())
            used[k] = (s["estimate"], s["log_gain"])
            final[k] = (params[k].clone(), s["sf_x"].clone())

    run_population(family, rule, (lr,), (7000,), 6, "constant", on_step=on_step)
    for k, (param, x) in final.items():
        w, z = torch.stack(weights[k]), torch.stack(zs[k])
        assert torch.allclose(x, (w * z).sum(0) / w.sum(0), rtol=1e-5, atol=1e-7)
        assert torch.allclose(param, (1 - beta) * z[-1] + beta * x, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="0 <= BETA, INNER_BETA1 < 1"):
        load_variant("schedule-free:1:0:0:" + _PRODIGY)


def _record(path, seed: int, scores: dict[str, tuple[float, float]], name: str = "D"):
    """A validation record with ``{cell: (candidate's score, cosine Adam's)}``."""
    tasks = {
        cell: {"_initial": 1.0, "adam_cosine": {"score": adam, "lr": 0.01, "diverged": 0}, name: {"score": mine}}
        for cell, (mine, adam) in scores.items()
    }
    path.write_text(json.dumps({"seeds": [seed, seed + 1, seed + 2], "tasks": tasks}))
    return path


def test_the_tally_counts_strict_wins_and_cells_within_one_percent_per_set_and_per_cell(tmp_path) -> None:
    from benchmarks.tally_lopt_validation import main as tally_main
    from benchmarks.tally_lopt_validation import tally

    a = _record(tmp_path / "a.json", 9000, {"x@1x": (0.5, 1.0), "x@10x": (1.005, 1.0), "y@1x": (2.0, 1.0)})
    b = _record(tmp_path / "b.json", 9003, {"x@1x": (1.0, 1.0), "x@10x": (0.9, 1.0), "y@1x": (1.02, 1.0)}, "Q")
    result = tally([(a, "D"), (b, "Q")])
    assert [(s["seed"], s["wins"], s["within"]) for s in result["sets"]] == [(9000, 1, 2), (9003, 1, 2)]
    assert result["total"] == {"cells": 6, "wins": 2, "within": 4}
    assert result["cells"]["x@1x"] == {"sets": 2, "wins": 1, "within": 2}  # a tie is within, not a win
    assert result["cells"]["y@1x"] == {"sets": 2, "wins": 0, "within": 0}
    assert tally_main([str(a), f"{b}:Q"])["total"] == result["total"]
    with pytest.raises(ValueError, match="no candidate 'D'"):
        tally([(b, "D")])


def test_the_tally_of_a_best_of_candidate_picks_per_cell_or_one_per_task_with_hindsight(tmp_path) -> None:
    from benchmarks.tally_lopt_validation import tally

    # cosine Adam scores 1.0 everywhere; A wins x@1x, B wins x@10x; on y, A wins 1x by a little, B 10x by a lot
    scores = {"x@1x": (0.5, 2.0), "x@10x": (2.0, 0.5), "y@1x": (0.99, 1.5), "y@10x": (1.2, 0.6)}
    tasks = {
        cell: {"_initial": 1.0, "adam_cosine": {"score": 1.0}, "A": {"score": a}, "B": {"score": b}}
        for cell, (a, b) in scores.items()
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"seeds": [9000, 9001, 9002], "tasks": tasks}))
    per_cell = tally([(path, "A+B")])
    assert per_cell["total"]["wins"] == 4
    assert {cell: next(iter(p)) for cell, p in per_cell["picked"].items()} == {
        "x@1x": "A",
        "x@10x": "B",
        "y@1x": "A",
        "y@10x": "B",
    }
    per_task = tally([(path, "A+B")], per="task")  # x: a tie of the mean log ratios goes to A; y: B
    assert {cell: next(iter(p)) for cell, p in per_task["picked"].items()} == {
        "x@1x": "A",
        "x@10x": "A",
        "y@1x": "B",
        "y@10x": "B",
    }
    assert per_task["total"]["wins"] == 2  # x@1x (A) and y@10x (B)
    assert tally([(path, "A")])["total"]["wins"] == 2
    floored = {"z@1x": {"_initial": 1.0, "adam_cosine": {"score": 1e-10}, "A": {"score": 1e-9}, "B": {"score": 1e-12}}}
    (tmp_path / "f.json").write_text(json.dumps({"seeds": [9000], "tasks": floored}))
    assert tally([(tmp_path / "f.json", "A+B")])["picked"] == {"z@1x": {"B": 1}}  # equal floored ratios: the lower
    with pytest.raises(ValueError, match="no candidate 'C'"):
        tally([(path, "A+C")])
    with pytest.raises(ValueError, match="'cell' or 'task'"):
        tally([(path, "A+B")], per="seed")


def test_the_quality_pages_current_tally_is_the_recorded_one() -> None:
    """The bottom line of the quality page's current section quotes what the records in ``docs/bench`` add up to."""
    from benchmarks.tally_lopt_validation import fresh_default_records, tally

    total = tally(fresh_default_records())["total"]
    page = (Path(__file__).resolve().parents[1] / "docs" / "bench" / "learned_optimizer_quality.md").read_text()
    current = page.split("\n## Previous", 1)[0]
    assert f"**{total['wins']} of {total['cells']} ({round(100 * total['wins'] / total['cells'])} %)**" in current
    assert f"**{total['within']} of {total['cells']} ({round(100 * total['within'] / total['cells'])} %)**" in current
    grid = tally(fresh_default_records(grid_only=True))["total"]  # the figure before the search past the grid
    assert f"it was {grid['wins']} ({round(100 * grid['wins'] / grid['cells'])} %)" in current


def test_the_magnitude_variant_scales_a_matrix_step_by_adams_update_rms_to_the_extra_power() -> None:
    """``magnitude:EXTRA:RAMP:``: a matrix's displacement is the plain rule's times ``a ** EXTRA`` (times ``τ`` with
    ``RAMP`` 1), ``a`` the RMS of ``m̂ / sqrt(v̂ + eps²)`` computed here by hand; a 1-D tensor's is the plain one; EXTRA 0
    is the plain rule's run bit for bit."""
    from benchmarks.bench_lopt_variants import load_variant
    from benchmarks.bench_lopt_variants import run_population as run_variant

    family = validation_tasks()["quadratic"]
    plain_run = run_population(family, load_variant(_PRODIGY), (1.0,), (7000,), 12, "constant")
    for spec in ("magnitude:0:0:", "magnitude:0:1:"):
        assert torch.equal(
            run_variant(family, load_variant(spec + _PRODIGY), (1.0,), (7000,), 12, "constant"), plain_run
        )

    generator = torch.Generator().manual_seed(0)
    matrix, vector = torch.randn(6, 5, generator=generator), torch.randn(5, generator=generator)
    plain = load_variant(_PRODIGY)
    for ramp, tau in ((0, 1.0), (1, 0.25)):
        variant = load_variant(f"magnitude:1.5:{ramp}:" + _PRODIGY)
        for param in (matrix, vector):
            state = plain.init_state(param)
            _, state = plain.update(
                param, torch.randn(param.shape, generator=generator), state, lr=1.0, step=1, horizon=8
            )
            grad = torch.randn(param.shape, generator=generator)
            moved_plain = plain.update(param, grad, dict(state), lr=1.0, step=2, horizon=8)[0] - param
            moved = variant.update(param, grad, dict(state), lr=1.0, step=2, horizon=8)[0] - param
            if param.ndim == 1:
                assert torch.equal(moved, moved_plain)
                continue
            beta1, beta2 = plain.betas
            m = beta1 * state["exp_avg"] + (1 - beta1) * grad
            v = beta2 * state["exp_avg_sq"] + (1 - beta2) * grad**2
            a = ((m / (1 - beta1**2)) / torch.sqrt(v / (1 - beta2**2) + plain.eps**2)).pow(2).mean().sqrt()
            assert 0.2 < float(a) < 0.99  # a factor that shows
            # (the displacements are differences of O(1) weights in float32: ~1e-5 relative)
            assert torch.allclose(moved, moved_plain * a ** (1.5 * tau), rtol=2e-4, atol=1e-8)
    with pytest.raises(ValueError, match="RAMP 0 or 1"):
        load_variant("magnitude:1:2:" + _PRODIGY)


def test_the_lr_search_goes_past_the_grid_while_the_best_lr_is_at_its_end(monkeypatch) -> None:
    """A baseline whose loss still falls at the grid's last lr is searched on, one half-decade lr at a time, until
    one is worse or the ladder ends; a best lr inside the grid runs nothing more; a known row runs only what it
    lacks."""
    import benchmarks.bench_lopt_validation as validation

    calls: list[tuple[float, ...]] = []

    def fake(target: float):
        def run_population(family, rule, lrs, seeds, steps, schedule, planned_horizon=None):
            calls.append(tuple(lrs))
            score = torch.tensor([(math.log10(lr) - math.log10(target)) ** 2 + 1.0 for lr in lrs])
            return torch.cat([torch.full((1, len(lrs)), 50.0), score[None].expand(9, -1)])[..., None].repeat(1, 1, 2)

        return run_population

    def search(target: float, wanted=validation.GRID, known=None, extend=True) -> dict:
        calls.clear()
        monkeypatch.setattr(validation, "run_population", fake(target))
        row, _ = validation.tune_lr(None, None, (1, 2), 10, "cosine", 10, wanted, known, extend=extend)
        return row

    assert search(1.0)["lr"] == 1.0 and calls == [validation.GRID, (0.3,), (1.0,), (3.0,)]
    assert search(1.0, extend=False) == {"lr": 0.1, "score": pytest.approx(2.0), "per_seed": [2.0, 2.0], "diverged": 0}
    assert search(3e-6)["lr"] == 3e-6 and calls[1:] == [(3e-5,), (1e-5,), (3e-6,), (1e-6,)]
    assert search(1e3)["lr"] == 10.0 and calls[-1] == (10.0,)  # the ladder's end
    inside = search(0.01)
    assert inside["lr"] == 0.01 and calls == [validation.GRID] and inside["searched"] == list(validation.GRID)
    # a row of the grid-only protocol (best 0.1 of the grid) around a new 1x lr of 0.3: only 0.3 and 1.0 are run
    known = {"lr": 0.1, "score": 2.0, "diverged": 0, "searched": list(validation.GRID)}
    row = search(0.3, wanted=validation.wanted_lrs(10, 0.3, validation.LADDER), known=known)
    assert row["lr"] == 0.3 and calls == [(0.3, 1.0)] and row["searched"] == sorted({*validation.GRID, 0.3, 1.0})
    assert search(0.3, wanted=(0.1,), known=known | {"score": 0.5})["lr"] == 0.1 and calls == [(0.3,)]


def test_extending_a_grid_only_records_baselines_matches_a_fresh_run_of_the_extended_search(tmp_path) -> None:
    """On the noisy quadratic at 20 steps cosine Adam's best grid lr is the grid's last; ``--previous`` of the
    grid-only record with no candidate runs only the lrs past it and gets the fresh extended run's rows."""
    common = ["--quick", "--tasks", "quadratic"]
    grid_only = main([*common, "--grid-only", "--candidate", "D=pretrained:default", "--out", str(tmp_path / "g")])
    fresh = main([*common, "--candidate", "D=pretrained:default"])
    extended = main([*common, "--previous", str(tmp_path / "g" / "lopt_validation.json")])
    assert not grid_only["grid_extended"] and extended["grid_extended"]
    row_grid, row_fresh, row_extended = (r["tasks"]["quadratic@1x"] for r in (grid_only, fresh, extended))
    assert row_grid["adam_cosine"]["lr"] == max(GRID) and "searched" not in row_grid["adam_cosine"]
    assert row_fresh["adam_cosine"]["lr"] > max(GRID)
    assert row_fresh["adam_cosine"]["score"] < row_grid["adam_cosine"]["score"]
    for cell in fresh["tasks"]:
        for name in ("adam", "adam_cosine"):
            got, want = extended["tasks"][cell][name], fresh["tasks"][cell][name]
            assert (got["lr"], got["score"], got["diverged"]) == (want["lr"], want["score"], want["diverged"])
        assert extended["tasks"][cell]["D"] == grid_only["tasks"][cell]["D"] == fresh["tasks"][cell]["D"]
    with pytest.raises(SystemExit):
        main(["--quick"])  # no candidate and no record to extend


def test_the_held_out_benchmark_searches_past_the_grid_and_carries_a_grid_only_records_search_on(tmp_path) -> None:
    """``bench_lopt_quality.py`` tunes its baselines and the rule's initialisation with the validation protocol's
    search: on the held-out teacher-student task at 20 steps the initialisation's best 1x lr is the grid's last and
    cosine Adam's best 10x lr the highest of its three, so both are searched past them; ``--previous`` of a
    grid-only record runs only what it lacks and gets the fresh run's rows, and keeps a curve for every optimizer."""
    from benchmarks.bench_lopt_quality import LADDER
    from benchmarks.bench_lopt_quality import main as quality

    common = ["--quick", "--rule", "default", "--tasks", "teacher_student_wide_gelu", "--no-wall-clock"]
    grid_only = quality([*common, "--grid-only", "--out", str(tmp_path / "g")])
    fresh = quality([*common, "--out", str(tmp_path / "f")])
    extended = quality(
        [*common, "--previous", str(tmp_path / "g" / "learned_optimizer_quality_quick.json"), "--out", str(tmp_path)]
    )
    assert not grid_only["grid_extended"] and fresh["grid_extended"] and extended["grid_extended"]
    one, ten = (fresh["tasks"][f"teacher_student_wide_gelu@{m}x"] for m in (1, 10))
    assert one["learned_init"]["lr"] == max(GRID) and max(one["learned_init"]["searched"]) > max(GRID)
    wanted_10x = set(LADDER[LADDER.index(one["adam_cosine"]["lr"]) - 1 :][:3])
    assert ten["adam_cosine"]["lr"] == max(wanted_10x) and max(ten["adam_cosine"]["searched"]) > max(wanted_10x)
    for cell, row in fresh["tasks"].items():
        for name in ("adam", "adam_cosine", "learned_init"):
            got, want = extended["tasks"][cell][name], row[name]
            assert got == want, (cell, name)
            assert "searched" not in grid_only["tasks"][cell][name]
        assert extended["tasks"][cell]["learned"] == row["learned"] == grid_only["tasks"][cell]["learned"]
    assert set(extended["curves"]["teacher_student_wide_gelu"]) == {"adam", "adam_cosine", "learned", "learned_init"}
    with pytest.raises(ValueError, match="drop --grid-only"):
        quality(
            [
                *common,
                "--grid-only",
                "--previous",
                str(tmp_path / "f" / "learned_optimizer_quality_quick.json"),
                "--out",
                str(tmp_path),
            ]
        )


def test_the_default_tally_reads_a_sets_extended_record_where_there_is_one(tmp_path, monkeypatch) -> None:
    import benchmarks.tally_lopt_validation as tally_module

    monkeypatch.setattr(tally_module, "BENCH", tmp_path)
    monkeypatch.setattr(tally_module, "EDGES", tmp_path / "edges")
    monkeypatch.setattr(tally_module, "FRESH_DEFAULT", ())
    (tmp_path / "edges").mkdir()
    grid = {
        seed: _record(tmp_path / f"learned_optimizer_validation_default_{seed}.json", seed, {"x@1x": (0.5, 1.0)})
        for seed in (7000, 9003, 9006)
    }
    extended = _record(tmp_path / "edges" / "9003.json", 9003, {"x@1x": (0.5, 0.4)})
    later = _record(tmp_path / "learned_optimizer_validation_default_9009.json", 9009, {"x@1x": (0.5, 1.0)})
    later.write_text(json.dumps(json.loads(later.read_text()) | {"grid_extended": True}))  # scored after the change
    assert tally_module.fresh_default_records(grid_only=True) == [(grid[9003], "D"), (grid[9006], "D")]
    assert tally_module.fresh_default_records() == [(extended, "D"), (grid[9006], "D"), (later, "D")]
    assert tally_module.main([])["total"]["wins"] == 2
    assert tally_module.main(["--grid-only"])["total"]["wins"] == 2
