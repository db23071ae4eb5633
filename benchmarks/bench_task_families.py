"""Cost of one inner step of each meta-training task family, relative to ``gru_lm`` measured in the same run.

An inner step is what an estimator does per update before the rule runs: draw one minibatch per task of the population
and compute the vmapped loss and gradient (``torch.func.vmap(grad_and_value(task.loss))``). Each family is timed round
by round, interleaved with the others (so background load hits all alike); a fresh population is drawn every
``--steps-per-population`` steps, so families that draw their sizes (``mlp_varied``) are timed over many sizes.
Prints the median milliseconds per step and the ratio to ``gru_lm``. Usage::

    nice -n 10 python benchmarks/bench_task_families.py --threads 1 --steps 50 --tasks 1
    nice -n 10 python benchmarks/bench_task_families.py --threads 1 --steps 50 --tasks 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch.func import grad_and_value, vmap

from lightning_meta.optim.meta.tasks import get_family, sample_batches, sample_tasks, stack_params

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "gru_lm": ("gru_lm", {}),  # the baseline
    "mlp": ("mlp", {}),
    "mlp_varied": ("mlp", {"widths": (16, 128), "depths": (1, 4), "batch_sizes": (16, 256)}),
    "teacher_student_varied": ("teacher_student", {"widths": (16, 128), "depths": (1, 4), "batch_sizes": (16, 256)}),
    "transformer_lm": ("transformer_lm", {}),
    "transformer_lm_2x4": ("transformer_lm", {"layers": 2, "heads": 4}),
}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per family (after 5 warm-up steps)")
    parser.add_argument("--tasks", type=int, default=1, help="tasks per vmapped population")
    parser.add_argument("--steps-per-population", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    families = {name: get_family(family, **kwargs) for name, (family, kwargs) in FAMILIES.items()}
    populations: dict[str, Any] = {}
    times: dict[str, list[float]] = {name: [] for name in families}
    for step in range(5 + args.steps):
        for name, family in families.items():
            if step % args.steps_per_population == 0:
                tasks = sample_tasks(family, gen, args.tasks)
                params = stack_params([t.init(gen) for t in tasks])
                populations[name] = (tasks, params, vmap(grad_and_value(tasks[0].loss)))
            tasks, params, step_fn = populations[name]
            start = time.perf_counter()
            step_fn(params, sample_batches(tasks, gen))
            if step >= 5:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"threads {args.threads}, {args.tasks} task(s) per population, median of {args.steps} steps")
    print("| family | settings | ms / inner step | ratio to gru_lm |")
    print("| --- | --- | --- | --- |")
    for name, ms in medians.items():
        settings = ", ".join(f"{k}={v}" for k, v in FAMILIES[name][1].items()) or "defaults"
        print(f"| {name} | {settings} | {ms:.2f} | {ms / medians['gru_lm']:.2f} |")
    return medians


if __name__ == "__main__":
    main()
