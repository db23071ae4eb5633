"""Attach the learned-optimizer callback to a model you already have, and compare its loss curve with Adam's.

The model below is an ordinary LightningModule with its own ``configure_optimizers`` (Adam). Adding
``LearnedOptimizer()`` to the Trainer's callbacks replaces that optimizer at fit start by a
``RuleOptimizer`` applying lightning-meta's shipped default rule; nothing in the module changes. The
script trains the same model from the same initialisation twice (Adam, then the learned rule), on the
same batches, and writes both training-loss curves to a PNG.

    python examples/learned_optimizer.py --steps 300 --out learned_vs_adam.png

The shipped default sets its own step size (relative to each tensor's size, see
``lightning_meta/optim/pretrained/*.json``), so the module's lr needs no retuning; do not expect it to beat a
learning-rate-tuned Adam on every problem (``docs/bench/learned_optimizer_quality.md`` has the measured
figures; docs/guide/learned_optimizers.md explains the rules).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_meta.callbacks import LearnedOptimizer

__all__ = ["LossHistory", "TinyClassifier", "blobs", "main"]


class TinyClassifier(LightningModule):
    """An MLP classifier trained with Adam: the "existing model" the callback is attached to."""

    def __init__(self, in_features: int = 32, classes: int = 10, hidden: int = 64, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class LossHistory(Callback):
    """Records the training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


def blobs(n: int = 4096, in_features: int = 32, classes: int = 10, seed: int = 0) -> TensorDataset:
    """A Gaussian-mixture classification set (one random centre per class, unit noise)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, in_features, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(centres[y] + torch.randn(n, in_features, generator=g), y)


def train(model: LightningModule, data: TensorDataset, steps: int, callbacks: list[Callback], seed: int) -> list[float]:
    history = LossHistory()
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = Trainer(
        max_steps=steps,
        callbacks=[*callbacks, history],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, loader)
    return history.losses


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rule", default="default", help="a shipped pretrained rule name")
    p.add_argument("--lr", type=float, default=None, help="the rule's learning rate (default: the module's)")
    p.add_argument("--out", type=Path, default=Path("learned_vs_adam.png"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    seed_everything(args.seed, verbose=False)
    data = blobs(seed=args.seed)
    model = TinyClassifier()
    curves = {
        "Adam (the module's own optimizer)": train(copy.deepcopy(model), data, args.steps, [], args.seed),
        f"LearnedOptimizer(rule={args.rule!r})": train(
            copy.deepcopy(model), data, args.steps, [LearnedOptimizer(args.rule, lr=args.lr)], args.seed
        ),
    }
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, losses in curves.items():
        ax.plot(losses, label=label, lw=1.2)
        tail = losses[-20:]
        print(f"{label}: mean training loss over the last {len(tail)} steps = {sum(tail) / len(tail):.4g}")
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="Same model, same batches")
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"figure: {args.out.resolve()}")
    return curves


if __name__ == "__main__":
    main()
