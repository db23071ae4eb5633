"""Meta-train an update rule and write it as shipped pretrained weights (``<name>.pt`` + ``<name>.json``).

Usage::

    python -m lightning_meta.optim.meta.pretrain --rule celo2 --minutes 25 --out lightning_meta/optim/pretrained/

Runs :class:`~lightning_meta.optim.meta.module.RuleMetaTrainer` on the CPU with a fixed seed and thread
count, for ``--minutes`` of wall-clock and/or ``--cpu-minutes`` of this process's CPU time (the fair
measure on a shared machine), or exactly ``--steps`` meta-steps. A time-limited run records the
number of steps it reached and the ``--steps`` command that reproduces it bit for bit on the same machine
and library versions. The ``.json`` records the rule, its version and hash, the command, the machine, the
estimator, the task families and the meta-loss of the initial and the trained rule on fixed held-out
inner problems.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import lightning
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from typing_extensions import override

from lightning_meta.optim.meta.estimators import evaluate_rule
from lightning_meta.optim.meta.module import RuleMetaTrainer
from lightning_meta.optim.meta.tasks import get_family
from lightning_meta.optim.pretrained import save_pretrained
from lightning_meta.optim.rules import UpdateRule, get_rule, rule_hash
from lightning_meta.progress import rich_progress_bar

__all__ = ["evaluate_families", "main", "parse_args"]

EVAL_SEED = 12345
_METRICS = {
    "mean": "mean training loss over the run / initial loss",
    "mean_log": "mean over the run of log(training loss / initial loss)",
    "final": "final training loss / initial loss",
    "valid": "mean validation loss over the run / initial loss",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_meta.optim.meta.pretrain", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rule", default="celo2", help="registry name of the rule to meta-train")
    parser.add_argument("--name", default=None, help="entry name of the written files (default: the rule name)")
    parser.add_argument("--out", default="lightning_meta/optim/pretrained/", help="folder for <name>.pt/.json")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget of meta-training")
    parser.add_argument(
        "--cpu-minutes",
        type=float,
        default=None,
        help="CPU-time budget of this process (fair on a shared machine); may combine with --minutes",
    )
    parser.add_argument("--steps", type=int, default=None, help="exact number of meta-steps (reproducible)")
    parser.add_argument("--estimator", default="pes", choices=["pes", "es", "tbptt"])
    parser.add_argument("--families", default="mlp,teacher_student,conv,quadratic", help="comma-separated families")
    parser.add_argument("--num-tasks", type=int, default=4, help="inner problems per family per step")
    parser.add_argument("--truncation-length", type=int, default=10)
    parser.add_argument("--min-horizon", type=int, default=50)
    parser.add_argument("--max-horizon", type=int, default=200)
    parser.add_argument("--objective", default="mean", choices=["mean", "mean_log", "final", "valid"])
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--inner-lr", type=float, nargs="+", default=[1e-2], help="one lr, or a low high range")
    parser.add_argument("--meta-lr", type=float, default=3e-3)
    parser.add_argument(
        "--trainable",
        nargs="+",
        default=None,
        help="meta-train only these weights (names or prefixes, e.g. schedule); default: all",
    )
    parser.add_argument(
        "--anchor", type=float, default=0.0, help="L2 pull of the rule's weights towards their initialisation (0: none)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--eval-tasks", type=int, default=8, help="held-out inner problems per family for the report")
    parser.add_argument("--no-progress-bar", action="store_true", help="no progress bar (e.g. in logs)")
    args = parser.parse_args(argv)
    timed = args.minutes is not None or args.cpu_minutes is not None
    if timed == (args.steps is not None):
        parser.error("pass a time budget (--minutes and/or --cpu-minutes) or --steps (exact, reproducible), not both")
    if len(args.inner_lr) not in (1, 2):
        parser.error(f"--inner-lr takes one value or a low high pair, got {args.inner_lr}")
    return args


class _CPUBudget(Callback):
    """Stops training once this process has used ``minutes`` of CPU time; prints progress every ``every`` steps."""

    def __init__(self, minutes: float | None, every: int = 100) -> None:
        self.limit = None if minutes is None else minutes * 60
        self.every = every
        self.start = time.process_time()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        used = time.process_time() - self.start
        if trainer.global_step % self.every == 0:
            loss = trainer.callback_metrics.get("train/meta_loss")
            shown = "n/a" if loss is None else f"{float(loss):.4f}"  # not logged yet
            print(f"step {trainer.global_step}: meta_loss {shown}, cpu {used / 60:.1f} min", flush=True)
        if self.limit is not None and used >= self.limit:
            trainer.should_stop = True


def _machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()}; {threads} torch thread(s); "
        f"torch {torch.__version__}; lightning {lightning.__version__}"
    )


def evaluate_families(
    rule: UpdateRule,
    families: Sequence[str],
    *,
    horizon: int,
    inner_lr: float,
    num_tasks: int,
    seed: int = EVAL_SEED,
    objective: str = "mean",
) -> dict[str, float]:
    """The meta-objective (normalised training loss, ``objective`` as in meta-training) of ``rule`` over full runs
    of ``horizon`` updates, per family."""
    return {
        name: evaluate_rule(
            rule,
            get_family(name),
            num_tasks=num_tasks,
            horizon=horizon,
            inner_lr=inner_lr,
            seed=seed + i,
            objective=objective,
        )
        for i, name in enumerate(families)
    }


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed, verbose=False)
    families = [f for f in args.families.split(",") if f]
    inner_lr = args.inner_lr[0] if len(args.inner_lr) == 1 else tuple(args.inner_lr)
    eval_lr = args.inner_lr[0] if len(args.inner_lr) == 1 else float(torch.tensor(args.inner_lr).log().mean().exp())
    module = RuleMetaTrainer(
        args.rule,
        families=families,
        estimator=args.estimator,
        num_tasks=args.num_tasks,
        truncation_length=args.truncation_length,
        min_horizon=args.min_horizon,
        max_horizon=args.max_horizon,
        objective=args.objective,
        sigma=args.sigma,
        inner_lr=inner_lr,
        meta_lr=args.meta_lr,
        anchor=args.anchor,
        trainable=args.trainable,
        steps_per_epoch=1000,
        seed=args.seed,
    )
    eval_kwargs = dict(horizon=args.max_horizon, inner_lr=eval_lr, num_tasks=args.eval_tasks, objective=args.objective)
    initial = evaluate_families(get_rule(args.rule), families, **eval_kwargs)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps if args.steps is not None else -1,
        max_time=timedelta(minutes=args.minutes) if args.minutes is not None else None,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress_bar,
        deterministic=True,
        callbacks=[_CPUBudget(args.cpu_minutes), *rich_progress_bar(args.no_progress_bar)],
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(module)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    rule = module.rule.cpu().eval()
    final = evaluate_families(rule, families, **eval_kwargs)
    name = args.name or args.rule
    steps = trainer.global_step
    repro = [a for a in (argv if argv is not None else sys.argv[1:])]
    for flag in ("--minutes", "--cpu-minutes"):
        if flag in repro:
            i = repro.index(flag)
            del repro[i : i + 2]
    if "--steps" not in repro:
        repro += ["--steps", str(steps)]
    metadata = {
        "command": "python -m lightning_meta.optim.meta.pretrain "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "reproduce": "python -m lightning_meta.optim.meta.pretrain " + shlex.join(repro),
        "machine": _machine(args.threads),
        "minutes": round(seconds / 60, 2),
        "cpu_minutes": round(cpu_seconds / 60, 2),
        "meta_steps": steps,
        "estimator": args.estimator,
        "task_families": families,
        "meta_training": {k: v for k, v in vars(args).items() if k not in ("out", "name")},
        "eval": {
            "horizon": args.max_horizon,
            "inner_lr": eval_lr,
            "tasks_per_family": args.eval_tasks,
            "seed": EVAL_SEED,
            "metric": _METRICS[args.objective],
        },
        "initial_meta_loss": initial,
        "final_meta_loss": final,
        "skipped_estimates": module.skipped_estimates,
    }
    path = save_pretrained(rule, name, kwargs={}, directory=args.out, metadata=metadata)
    print(
        json.dumps(
            {"written": str(path), "hash": rule_hash(rule), "meta_steps": steps, "initial": initial, "final": final},
            indent=2,
        )
    )
    return path


if __name__ == "__main__":
    main()
