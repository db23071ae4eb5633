"""Offline quickstart: MAML on sinusoid regression, with a plot in the style of the MAML paper's figure 2.

Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017,
arXiv:1703.03400, section 5.1: tasks ``y = A sin(x - phi)``, an MLP 1-40-40-1 meta-trained with one
inner step of rate 0.01 on K=10 points, meta-batch 25, Adam 1e-3. Nothing is downloaded.

Run it with ``python -m lightning_meta.quickstart``. The default (3000 meta-steps) takes 1-3 minutes
on 2 CPU cores (one thread; 126-153 s of meta-training, 152-187 s in all, measured on a heavily shared
2-core machine); the paper trains for 70,000 steps, so the fits are rougher than its figure (10-shot MSE
about 0.33 after 10 steps).
It prints the 10-shot test MSE before adaptation (the meta-learned initialisation alone) and after
``--eval-steps`` inner steps, each over the same fixed test tasks with a 95% confidence interval, and
writes a PNG with, for a few test tasks, the true curve, the K support points, and the network's
prediction before adaptation, after one step and after ``--eval-steps`` steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_meta.algorithms import MAML
from lightning_meta.datamodules.sinusoid import SinusoidDataModule, SinusoidDataset
from lightning_meta.nn import MLP
from lightning_meta.progress import rich_progress_bar

__all__ = ["QuickstartResult", "main", "parse_args", "plot_fits", "run"]


@dataclass
class QuickstartResult:
    """What a quickstart run measured, with the trained model and its data."""

    model: MAML
    data: SinusoidDataModule
    train_seconds: float
    mse_before: float
    mse_before_ci95: float
    mse_after: float
    mse_after_ci95: float
    figure: Path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The quickstart's flags (``--help`` lists them)."""
    p = argparse.ArgumentParser(
        prog="python -m lightning_meta.quickstart",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=3000, help="meta-training steps (paper: 70000)")
    p.add_argument("--tasks-per-batch", type=int, default=25, help="tasks per meta-batch (paper: 25)")
    p.add_argument("--shots", type=int, default=10, help="support points per task, K")
    p.add_argument("--inner-lr", type=float, default=0.01, help="inner learning rate alpha")
    p.add_argument("--eval-steps", type=int, default=10, help="inner steps at test time")
    p.add_argument("--test-tasks", type=int, default=600, help="fixed test tasks for the MSE")
    p.add_argument("--plot-tasks", type=int, default=3, help="test tasks drawn in the figure")
    p.add_argument("--out", type=Path, default=Path("maml_sinusoid.png"), help="where the PNG goes")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of every task")
    p.add_argument("--no-progress-bar", action="store_true", help="hide the progress bar")
    p.add_argument("--no-plot", action="store_true", help="skip the figure (no matplotlib needed)")
    args = p.parse_args(argv)
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        p.error("the figure needs matplotlib: pip install 'lightning-meta[cli]' (or pass --no-plot)")
    for name in ("steps", "tasks_per_batch", "shots", "test_tasks", "plot_tasks"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.eval_steps < 1:
        p.error(f"--eval-steps={args.eval_steps} must be >= 1")
    return args


def _test_mse(trainer: Trainer, model: MAML, data: SinusoidDataModule, steps: int) -> tuple[float, float]:
    """Mean 10-shot query MSE over the fixed test tasks after ``steps`` inner steps, and its 95% CI half-width."""
    model.eval_inner_steps = steps
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    return metrics["test/mse"], metrics["test/mse_ci95"]


def run(args: argparse.Namespace) -> QuickstartResult:
    """Meta-train, evaluate and plot; returns the measured figures (also printed)."""
    seed_everything(args.seed, verbose=False)
    data = SinusoidDataModule(
        shots=args.shots,
        queries=args.shots,
        tasks_per_batch=args.tasks_per_batch,
        train_episodes=args.tasks_per_batch * min(args.steps, 100),
        val_episodes=1,
        test_episodes=args.test_tasks,
        seed=args.seed,
    )
    model = MAML(
        MLP(1, 1, (40, 40)), inner_lr=args.inner_lr, inner_steps=1, eval_inner_steps=args.eval_steps, task_mode="vmap"
    )  # vmap over tasks: ~8x faster than a loop for this tiny MLP on CPU
    trainer = Trainer(
        max_steps=args.steps,
        limit_val_batches=0,
        inference_mode=False,  # evaluation adapts with gradients
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress_bar,
        callbacks=rich_progress_bar(args.no_progress_bar),
        accelerator="cpu",
        devices=1,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_s = time.perf_counter() - start
    before, before_ci = _test_mse(trainer, model, data, 0)
    after, after_ci = _test_mse(trainer, model, data, args.eval_steps)
    model.eval_inner_steps = args.eval_steps
    if not args.no_plot:
        data.setup("test")
        plot_fits(model, data, args.out, tasks=args.plot_tasks, steps=args.eval_steps)
    k, n = args.shots, args.test_tasks
    print(f"meta-training: {args.steps} steps x {args.tasks_per_batch} tasks in {train_s:.0f} s")
    print(f"{k}-shot test MSE over {n} fixed tasks ({k} query points each), mean +/- 95% CI:")
    print(f"  before adaptation (meta-learned init): {before:.3f} +/- {before_ci:.3f}")
    print(f"  after {args.eval_steps} inner steps:            {after:.3f} +/- {after_ci:.3f}")
    if not args.no_plot:
        print(f"figure: {args.out.resolve()}")
    return QuickstartResult(model, data, train_s, before, before_ci, after, after_ci, Path(args.out))


@torch.no_grad()
def plot_fits(model: MAML, data: SinusoidDataModule, out: Path, *, tasks: int = 3, steps: int = 10) -> Path:
    """Draw, for the first ``tasks`` test tasks, the truth, the support points and the fits after 0, 1, ``steps`` steps.

    Args:
        model: a meta-trained MAML with a 1-in, 1-out backbone.
        data: its datamodule, set up for ``"test"``.
        out: the PNG path (parent folders are created).
        tasks: how many test tasks to draw, side by side.
        steps: inner steps of the last fit.

    Returns:
        ``out``.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    dataset = cast(SinusoidDataset, data.datasets["test"])  # what SinusoidDataModule builds for every split
    model.eval()
    x = torch.linspace(-5.0, 5.0, 200).unsqueeze(1)  # (200, 1)
    tasks = min(tasks, len(dataset))
    fig, axes = plt.subplots(1, tasks, figsize=(max(4.2 * tasks, 8.0), 3.8), squeeze=False, sharey=True)
    for i, ax in enumerate(axes[0]):
        episode = dataset[i]
        amplitude, phase = dataset.task_params(i)
        ax.plot(x[:, 0], amplitude * torch.sin(x[:, 0] - phase), color="black", lw=2, label="ground truth")
        for n, style in (
            (0, dict(color="tab:green", ls=":", label="pre-update")),
            (1, dict(color="tab:blue", ls="--", label="1 grad step")),
            (steps, dict(color="tab:red", ls="-", label=f"{steps} grad steps")),
        ):
            model.eval_inner_steps = n
            with torch.enable_grad():
                state = model.adapt(episode.support_x, episode.support_y)
            y = model.predict(state, x)  # (200, 1)
            ax.plot(x[:, 0], y[:, 0], lw=1.8, **style)
        ax.scatter(
            episode.support_x[:, 0],
            episode.support_y,
            marker="^",
            color="tab:purple",
            zorder=3,
            label=f"{len(episode.support_y)} points used for the gradient",
        )
        ax.set_title(f"test task {i}: A={amplitude:.2f}, phase={phase:.2f}")
        ax.set_xlabel("x")
    axes[0][0].set_ylabel("y")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8, frameon=False)
    model.eval_inner_steps = steps
    fig.suptitle("MAML, sinusoid regression (Finn et al. 2017, fig. 2 style)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> QuickstartResult:
    """Entry point of ``python -m lightning_meta.quickstart``."""
    torch.set_num_threads(1)  # a 1-40-40-1 MLP: more threads only add synchronisation
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
