"""Can the default rule's own early state tell how far its step size is off? A feasibility probe for a learned
per-tensor step-size head (not a quality benchmark: no baselines, no validation instances).

For ``--instances`` tasks of each meta-training family (seeds from ``--seed-base``, away from the validation
protocol's 7000.. and from meta-training's draws), the shipped default runs at lr multipliers 2^-3 .. 2^3 for
``--steps`` steps, as ``sweep_lopt_lr.py`` does (the rule needs no lr: multiplier 1 is what a user gets). The target is
the best multiplier's log2 (the lowest mean loss over the last 10 % of steps). The features come from the x1 run
alone, at 10 % of the run, as a head inside the rule could read them: averaged over weight matrices, the Prodigy
estimate's growth ``log(d/d0)``, the hypergradient log gain ``h``, ``log`` of Adam's update RMS ``a``, Prodigy's
ratio over the estimate ``sign(q) log(1 + |q|)`` with ``q = (r / |s|_1) / d``, and the run's ``log`` loss ratio
(mean of the last 5 steps over the first loss).

Prints, per family, the best multipliers and what they cost to miss (the x1 score over the best), then a
leave-one-family-out least-squares fit of the target on the features: for each held-out family, the mean absolute
error in log2 units of the fit, of always predicting x1 (0) and of predicting the other families' mean target, and
the median score ratio (to the best) of the multiplier the fit picks (rounded to the grid) against x1's.

    python benchmarks/probe_lopt_step_size.py [--instances 12] [--steps 200] [--seed-base 500]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lopt_quality import run_population, score  # noqa: E402
from trace_lopt_state import matrix_statistics  # noqa: E402

from lightning_meta.optim.meta.tasks import TaskFamily, get_family  # noqa: E402
from lightning_meta.optim.pretrained import load_pretrained  # noqa: E402

MULTIPLIERS = tuple(2.0**k for k in range(-3, 4))
FLOOR = 1e-6  # bench_lopt_validation.FLOOR
FEATURES = ("log d/d0", "h", "log a", "slog q", "log loss ratio")


def families() -> dict[str, TaskFamily]:
    """The meta-training families as meta-training run M6 drew them (MLPs of width 16-128 and depth 1-4)."""
    return {
        "mlp": get_family("mlp", widths=(16, 128), depths=(1, 4)),
        "teacher_student": get_family("teacher_student"),
        "conv": get_family("conv"),
        "quadratic": get_family("quadratic"),
        "gru_lm": get_family("gru_lm"),
        "transformer_lm": get_family("transformer_lm"),
    }


def probe(family: TaskFamily, seed: int, steps: int) -> tuple[list[float], list[float]]:
    """(scores per multiplier, features of the x1 run at 10 % of ``steps``) for one instance."""
    rule = load_pretrained("default")
    at = max(2, steps // 10)
    x1 = MULTIPLIERS.index(1.0)
    losses: list[float] = []
    features: list[float] = []

    def read(t: int, loss: Tensor, params: dict[str, Tensor], state: dict[str, dict[str, Tensor]]) -> None:
        losses.append(float(loss[x1]))
        if t != at:
            return
        rows = []
        for k, st in state.items():
            if params[k].ndim < 3:  # biases take AdamW's step: no estimate of their own
                continue
            stats = matrix_statistics({key: value[x1] for key, value in st.items()}, t, rule)
            q = stats["r/|s|"] / float(st["estimate"][x1])  # Prodigy's ratio over the estimate
            rows.append(
                [
                    math.log(stats["d/d0"]),
                    stats["h"],
                    math.log(max(stats["a"], 1e-12)),
                    math.copysign(math.log1p(abs(q)), q),
                ]
            )
        features.extend(statistics.fmean(column) for column in zip(*rows))
        features.append(math.log(statistics.fmean(losses[-5:]) / losses[0]))

    run = run_population(family, rule, MULTIPLIERS, (seed,), steps, "constant", on_step=read)
    floor = FLOOR * float(run[0, x1, 0])  # as the validation protocol: a memorised task's loss reaches 0
    return score(run)[:, 0].clamp_min(floor).tolist(), features


def best_index(scores: list[float]) -> int:
    """The multiplier with the lowest score; among equal scores (at the floor) the one nearest x1."""
    low = min(scores)
    return min((i for i, s in enumerate(scores) if s == low), key=lambda i: abs(math.log2(MULTIPLIERS[i])))


def fit_predict(train_x: Tensor, train_y: Tensor, test_x: Tensor) -> Tensor:
    """Least squares on standardised features with an intercept (a small ridge keeps it defined)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-8)
    design = torch.cat([torch.ones(len(train_x), 1), (train_x - mean) / std], 1)
    ridge = 1e-3 * torch.eye(design.shape[1])
    coef = torch.linalg.solve(design.T @ design + ridge, design.T @ train_y)
    return torch.cat([torch.ones(len(test_x), 1), (test_x - mean) / std], 1) @ coef


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=12)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed-base", type=int, default=500)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data: dict[str, list[tuple[list[float], list[float]]]] = {}
    for name, family in families().items():
        data[name] = [probe(family, args.seed_base + i, args.steps) for i in range(args.instances)]
        best = [best_index(s) for s, _ in data[name]]
        x1 = MULTIPLIERS.index(1.0)
        miss = [s[x1] / s[b] for (s, _), b in zip(data[name], best)]
        print(
            f"{name}: best multipliers {sorted(MULTIPLIERS[b] for b in best)}; x1 over best: median "
            f"{statistics.median(miss):.3f}, max {max(miss):.3f}",
            flush=True,
        )
    names = list(data)
    xs = {n: torch.tensor([f for _, f in data[n]], dtype=torch.float64) for n in names}
    ys = {
        n: torch.tensor([math.log2(MULTIPLIERS[best_index(s)]) for s, _ in data[n]], dtype=torch.float64) for n in names
    }
    print(f"\nleave-one-family-out (target: log2 best multiplier; features {', '.join(FEATURES)})")
    print(f"{'held out':<16} {'fit MAE':>8} {'x1 MAE':>8} {'mean MAE':>9} {'fit pick/best':>14} {'x1/best':>8}")
    report = {}
    for held in names:
        train_x = torch.cat([xs[n] for n in names if n != held])
        train_y = torch.cat([ys[n] for n in names if n != held])
        pred = fit_predict(train_x, train_y, xs[held])
        picks = pred.round().clamp(-3, 3).long() + 3
        ratios = [s[int(p)] / min(s) for (s, _), p in zip(data[held], picks)]
        x1_ratios = [s[3] / min(s) for s, _ in data[held]]
        row = {
            "fit_mae": float((pred - ys[held]).abs().mean()),
            "x1_mae": float(ys[held].abs().mean()),
            "mean_mae": float((train_y.mean() - ys[held]).abs().mean()),
            "fit_pick_over_best": statistics.median(ratios),
            "x1_over_best": statistics.median(x1_ratios),
        }
        report[held] = row
        print(
            f"{held:<16} {row['fit_mae']:>8.2f} {row['x1_mae']:>8.2f} {row['mean_mae']:>9.2f} "
            f"{row['fit_pick_over_best']:>14.3f} {row['x1_over_best']:>8.3f}"
        )
    pred_all = fit_predict(torch.cat(list(xs.values())), torch.cat(list(ys.values())), torch.cat(list(xs.values())))
    residual = (pred_all - torch.cat(list(ys.values()))).abs().mean()
    print(f"\nall families, in-sample fit MAE {float(residual):.2f} (log2 units)")
    return report


if __name__ == "__main__":
    main()
