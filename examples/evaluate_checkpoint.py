"""Evaluate a checkpoint on fixed, seeded test episodes and report the mean with a 95% confidence interval.

Test episodes are a pure function of ``(seed, "test", index)``: every run, machine and worker count
sees the same ones, so two checkpoints evaluated with the same ``--seed`` and ``--episodes`` are
compared on identical tasks. The interval is the usual ``1.96 * std / sqrt(n)`` over per-episode
accuracies (the protocol of the papers, see docs/guide/evaluation.md), and also Student's t when scipy is installed (CAVIA's choice).

    python examples/evaluate_checkpoint.py --config lightning_logs/version_0/config.yaml \\
        --ckpt lightning_logs/version_0/checkpoints/last.ckpt --episodes 600 --seed 0

``--config`` is the config the ``lightning-meta`` command saved next to the run's logs (or any config
in ``examples/configs``); extra ``--data.init_args.*`` / ``--model.init_args.*`` overrides follow it.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from lightning_meta.cli import MetaLightningCLI

__all__ = ["episode_scores", "main", "mean_ci95"]


@torch.no_grad()
def episode_scores(model: torch.nn.Module, loader: torch.utils.data.DataLoader) -> torch.Tensor:
    """Per-episode query accuracy (classification) or MSE (regression), in loader order, ``(episodes,)``."""
    model.eval()
    scores = []
    for episode in loader:
        outputs = model(episode)  # (tasks, queries, ways) or (tasks, queries[, 1]); adapts under enable_grad
        if episode.is_regression:
            scores.append(((outputs.reshape(episode.query_y.shape) - episode.query_y) ** 2).mean(-1))
        else:
            scores.append((outputs.argmax(-1) == episode.query_y).float().mean(-1))
    return torch.cat(scores)


def mean_ci95(scores: torch.Tensor) -> tuple[float, float, float | None]:
    """Mean, the normal 95% half-width ``1.96 * std / sqrt(n)``, and Student's t half-width (None without scipy)."""
    n = len(scores)
    mean, std = float(scores.mean()), float(scores.std(unbiased=True)) if n > 1 else 0.0
    half = 1.96 * std / math.sqrt(n)
    try:
        from scipy import stats
    except ImportError:
        return mean, half, None
    return mean, half, float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else 0.0


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path, help="the run's config.yaml (or an example config)")
    p.add_argument("--ckpt", required=True, type=Path, help="checkpoint to evaluate")
    p.add_argument("--episodes", type=int, default=600, help="fixed test episodes")
    p.add_argument("--seed", type=int, default=0, help="episode seed (the same seed gives the same episodes)")
    args, overrides = p.parse_known_args(argv)

    # A config saved by `lightning-meta fit` also holds the subcommand's own keys; only model/data/trainer matter.
    config = yaml.safe_load(args.config.read_text())
    for key in ("ckpt_path", "weights_only"):
        config.pop(key, None)
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "config.yaml"
        clean.write_text(yaml.safe_dump(config))
        # LightningCLI warns when it is given `args` while sys.argv holds arguments too (this script's own):
        # they are parsed above, so the CLI sees only the program name.
        argv, sys.argv = sys.argv, sys.argv[:1]
        try:
            cli = MetaLightningCLI(
                args=[
                    "--config",
                    str(clean),
                    *overrides,
                    f"--data.init_args.test_episodes={args.episodes}",
                    f"--data.init_args.seed={args.seed}",
                    "--trainer.logger=false",
                    "--trainer.enable_progress_bar=false",
                ],
                run=False,
            )
        finally:
            sys.argv = argv
    model, data = cli.model, cli.datamodule
    state = torch.load(args.ckpt, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    data.setup("test")
    scores = episode_scores(model, data.test_dataloader())
    mean, half, t_half = mean_ci95(scores)
    name = "MSE" if data.datasets["test"][0].is_regression else "accuracy"
    scale, unit = (1.0, "") if name == "MSE" else (100.0, " %")
    print(
        f"{type(model).__name__} on {len(scores)} fixed test episodes (seed {args.seed}): {name} "
        f"{scale * mean:.2f} +/- {scale * half:.2f}{unit} (95% CI, normal)"
        + (f", +/- {scale * t_half:.2f} (Student t)" if t_half is not None else "")
    )
    return {
        "mean": mean,
        "ci95": half,
        "ci95_t": t_half if t_half is not None else float("nan"),
        "episodes": float(len(scores)),
    }


if __name__ == "__main__":
    main()
