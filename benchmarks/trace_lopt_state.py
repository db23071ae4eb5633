"""Trace the default learned rule's per-tensor step-size state on one validation task (one seed, untuned).

Prints, at five points of the run, the mean training loss over the last 10 % of steps so far, the loss's local
power-law exponent (``bench_lopt_variants.local_exponent``: about ``α`` for a loss ``∝ t^−α``, 0 at a floor) and, per weight
tensor: ``d/d0`` (the Prodigy estimate over its start), ``h`` (the hypergradient log gain), ``a`` (the RMS of
Adam's update ``m̂ / sqrt(v̂ + eps²)``, which ``magnitude_power`` follows), ``r/|s|`` (Prodigy's ratio that
``d`` must exceed to grow; negative when the gradient points back towards the initial weights) and ``moved/d`` (the
RMS distance of the weights from their initial values over ``d``: what a distance-over-gradients estimate would read).

    python benchmarks/trace_lopt_state.py --task teacher_student --steps 200 [--rule celo2-prodigy] [--seed 7000]
        [--biases] [--variant SPEC]

``--variant`` traces a candidate of ``bench_lopt_variants.py`` instead (e.g. ``mechanic:1:0.01:pretrained:default``),
with the Prodigy columns where it keeps that state and ``s``, Mechanic's learned scale, where it has one.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lopt_validation import validation_tasks  # noqa: E402
from bench_lopt_variants import _add_hook, load_variant, local_exponent  # noqa: E402
from bench_lopt_variants import run_population as run_variant  # noqa: E402

from lightning_meta.optim.pretrained import load_pretrained  # noqa: E402


def matrix_statistics(state: dict[str, Tensor], step: int, rule: Any) -> dict[str, float]:
    """One tensor's step-size state after ``step`` steps of a Prodigy-mode rule (one problem's slice): a weight
    matrix's, or with ``--biases`` a 1-D tensor's too."""
    beta1, beta2 = rule.betas
    m_hat = state["exp_avg"] / (1 - beta1**step)
    v_hat = state["exp_avg_sq"] / (1 - beta2**step)
    stats = {"a": float((m_hat / torch.sqrt(v_hat + rule.eps**2)).pow(2).mean().sqrt())}
    if "estimate" in state:
        l1 = float(state["grad_sum"].abs().sum() * state["grad_sum_scale"])
        stats = {
            "d/d0": float(state["estimate"] / state["step_scale"]),
            "h": float(state["log_gain"]),
            **stats,
            "r/|s|": float(state["numerator"]) / l1 if l1 else 0.0,
        }
    if "mech_scale" in state:
        stats["s"] = float(state["mech_scale"])
    return stats


def trace(
    task_name: str,
    steps: int,
    rule_name: str = "default",
    seed: int = 7000,
    *,
    biases: bool = False,
    variant: str | None = None,
) -> list[dict]:
    """One ``bench_lopt_quality.run_population`` run (seed ``seed``, lr multiplier 1); the rows printed (the 1-D
    tensors too with ``biases``: their Prodigy state, though they take AdamW's step). With ``variant``, that
    candidate of ``bench_lopt_variants.py`` instead of the shipped rule ``rule_name``."""
    if variant is not None:
        rule = load_variant(variant)
    else:
        rule = load_pretrained(rule_name)
        if getattr(rule, "step_size", None) != "prodigy":
            raise ValueError(
                f"--rule {rule_name}: the trace reads the Prodigy state; pick a rule with step_size='prodigy'"
            )
    losses: list[float] = []
    rows: list[dict] = []

    def report(t: int, loss: Tensor, params: dict[str, Tensor], state: dict[str, dict[str, Tensor]]) -> None:
        losses.append(float(loss.mean()))
        if t % max(1, steps // 5):
            return
        row: dict = {"step": t, "loss": sum(losses[-max(1, t // 10) :]) / max(1, t // 10)}
        if t >= 4:
            row["exponent"] = local_exponent([0.0, *itertools.accumulate(math.log(max(x, 1e-30)) for x in losses)], t)
        for k, st in state.items():
            if params[k].ndim < 3 and not biases:  # (one problem's) biases: AdamW's step, not the matrices'
                continue
            one = {key: value[0] for key, value in st.items()}
            row[k] = matrix_statistics(one, t, rule)
            if "estimate" in one:  # how far the weights have gone from x_0 (RMS), per unit of the estimate: DoG's
                # distance over Prodigy's
                row[k]["moved/d"] = float((params[k][0] - one["initial"]).pow(2).mean().sqrt() / one["estimate"])
        rows.append(row)
        print(
            f"step {t}: loss {row['loss']:.4g}, exponent {row.get('exponent', math.nan):.3g} | "
            + " | ".join(
                f"{k}: " + " ".join(f"{n}={v:.3g}" for n, v in s.items()) for k, s in row.items() if isinstance(s, dict)
            ),
            flush=True,
        )

    _add_hook(rule, lambda: report)  # after the variant's own hook, if any (its initial-state hook kept)
    run_variant(validation_tasks()[task_name], rule, (1.0,), (seed,), steps, "constant")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="teacher_student", choices=sorted(validation_tasks()))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rule", default="default", help="a shipped pretrained rule with step_size='prodigy'")
    parser.add_argument("--seed", type=int, default=7000)
    parser.add_argument("--biases", action="store_true", help="also the 1-D tensors (biases)")
    parser.add_argument("--variant", help="a candidate of bench_lopt_variants.py to trace instead of --rule")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    return trace(args.task, args.steps, args.rule, args.seed, biases=args.biases, variant=args.variant)


if __name__ == "__main__":
    main()
