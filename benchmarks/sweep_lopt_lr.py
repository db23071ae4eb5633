"""Score a shipped learned rule on one validation task at several learning-rate multipliers (the rule is meant to
need none: multiplier 1 is what a user gets).

The runs and scores are the validation protocol's (``bench_lopt_validation.py``: same instances, the mean training
loss over the last 10 % of steps, averaged over seeds) at the 1x and 10x horizons; multiplier 1 reproduces the
protocol's row for the rule. It shows which way, and how far, the rule's own step size is off on a task.

    python benchmarks/sweep_lopt_lr.py --task quadratic --multipliers 0.25 0.5 1 2 4 [--rule default]
        [--seed-base 7012] [--seeds 3] [--horizon 200]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lopt_quality import run_population, score  # noqa: E402
from bench_lopt_validation import SEED_BASE, validation_tasks  # noqa: E402

from lightning_meta.optim.pretrained import load_pretrained  # noqa: E402


def sweep(
    task_name: str,
    multipliers: tuple[float, ...],
    rule_name: str = "default",
    seed_base: int = SEED_BASE,
    seeds: int = 3,
    horizon: int = 200,
    horizon_multipliers: tuple[int, ...] = (1, 10),
) -> dict[str, list[float]]:
    """``{"1x": [score per lr multiplier], "10x": [...]}``; a run that is not finite scores ``inf``."""
    if not multipliers or any(not (m > 0 and math.isfinite(m)) for m in multipliers):
        raise ValueError(f"--multipliers {multipliers}: give one or more finite numbers > 0")
    rule = load_pretrained(rule_name)
    family = validation_tasks()[task_name]
    instances = tuple(range(seed_base, seed_base + seeds))
    results = {}
    for factor in horizon_multipliers:
        losses = run_population(family, rule, multipliers, instances, horizon * factor, "constant")
        results[f"{factor}x"] = score(losses).mean(1).tolist()
        print(
            f"{task_name}@{factor}x: "
            + "  ".join(f"x{m:g} {s:.5g}" for m, s in zip(multipliers, results[f"{factor}x"])),
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, choices=sorted(validation_tasks()))
    parser.add_argument("--multipliers", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--rule", default="default", help="a shipped pretrained rule")
    parser.add_argument("--seed-base", type=int, default=SEED_BASE)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--horizon", type=int, default=200, help="the 1x horizon (10x is also run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    return sweep(args.task, tuple(args.multipliers), args.rule, args.seed_base, args.seeds, args.horizon)


if __name__ == "__main__":
    main()
