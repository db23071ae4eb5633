"""Subclassing MAML in your own Lightning project: your backbone, your optimizer schedule, your metric.

MAML (Finn, Abbeel, Levine, ICML 2017, arXiv:1703.03400) adapts every weight of whatever network you
give it. The backbone only has to map ``(examples, *x_shape) -> (examples, ways)`` and must not keep
running batch-norm statistics (every inner-loop forward would overwrite them); GroupNorm, as here, or
``BatchNorm2d(track_running_stats=False)`` both work. Everything else is ordinary Lightning.

    python examples/custom_backbone.py --root <folder with the Omniglot zips> --steps 500

Any Omniglot folder works (the two ``images_background_small*.zip`` subsets too: a seeded split is used).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything
from torch import Tensor, nn
from typing_extensions import override

from lightning_meta.algorithms import MAML
from lightning_meta.datamodules.omniglot import OmniglotDataModule

__all__ = ["GroupNormConvNet", "MyMAML", "main"]


class GroupNormConvNet(nn.Module):
    """A small convnet of your own: 3 x [conv 3x3 stride 2 -> GroupNorm -> ReLU], spatial mean, linear head."""

    def __init__(self, ways: int = 5, hidden: int = 32, in_channels: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(3):
            layers += [nn.Conv2d(channels, hidden, 3, stride=2, padding=1), nn.GroupNorm(4, hidden), nn.ReLU()]
            channels = hidden
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, ways)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(-2, -1)))  # (examples, ways)


class MyMAML(MAML):
    """MAML over :class:`GroupNormConvNet`, with a cosine meta-learning-rate schedule and a logged weight norm.

    Every argument is a plain value, so ``MyMAML.load_from_checkpoint(path)`` rebuilds it with no arguments.
    """

    def __init__(
        self,
        ways: int = 5,
        hidden: int = 32,
        *,
        inner_lr: float = 0.5,
        inner_steps: int = 1,
        eval_inner_steps: int = 3,
        meta_lr: float = 1e-3,
        max_steps: int = 1000,
    ) -> None:
        super().__init__(
            GroupNormConvNet(ways, hidden),
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps,
            meta_lr=meta_lr,
            task_mode="loop",
        )
        self.save_hyperparameters()  # this class's own arguments (MAML's ignore the backbone)
        self.max_steps = max_steps

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train/head_norm", self.backbone.head.weight.norm())
        return loss

    @override
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.meta_lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="Omniglot folder (official zips or extracted folders)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--tasks-per-batch", type=int, default=8)
    p.add_argument("--test-episodes", type=int, default=200)
    p.add_argument("--out-dir", type=Path, default=Path("runs/custom_backbone"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    seed_everything(args.seed, verbose=False)
    data = OmniglotDataModule(
        args.root,
        split="seeded",
        ways=5,
        shots=1,
        queries=5,
        tasks_per_batch=args.tasks_per_batch,
        train_episodes=args.tasks_per_batch * 50,
        val_episodes=40,
        test_episodes=args.test_episodes,
        seed=args.seed,
    )
    model = MyMAML(max_steps=args.steps)
    trainer = Trainer(
        max_steps=args.steps,
        inference_mode=False,  # MAML adapts with gradients in validation and test
        default_root_dir=args.out_dir,
        log_every_n_steps=10,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    print(
        f"5-way 1-shot test accuracy over {args.test_episodes} fixed episodes: "
        f"{100 * metrics['test/acc']:.2f} +/- {100 * metrics['test/acc_ci95']:.2f} %"
    )
    print(f"checkpoint: {trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path}")
    return metrics


if __name__ == "__main__":
    main()
