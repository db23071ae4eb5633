"""The shipped learned rule under users' LR schedulers, through ``Trainer.fit`` with the ``LearnedOptimizer`` callback.

A small convnet learns a fixed random labelling of random 16x16 images (10 classes, 512 images, batch 32) with the
module's own ``Adam(lr=1e-4)`` replaced by the callback's default rule, under: no scheduler, a ``OneCycleLR`` (peak
1e-2), a linear warm-up over 10 % of the steps then a cosine (a ``SequentialLR``), a ``CyclicLR`` from 1e-4 to 1e-2 (it starts the groups at ``base_lr``), and a ``LambdaLR`` whose factor rises
to 21 (an lr raised above the initial one). For each it prints the median over seeds of the mean training loss over
the last 10 % of steps, its ratio to the run without a scheduler, the largest ``lr / reference lr`` the optimizer met
(the rule reads at most 1) and how many warnings named the reference lr. Chance level is ln 10 = 2.30.

    python benchmarks/bench_lopt_schedulers.py [--steps 200] [--seeds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_meta.callbacks import LearnedOptimizer

SCHEDULERS = ("none", "one_cycle", "warmup_cosine", "cyclic", "rising_lambda")


class _Conv(pl.LightningModule):
    def __init__(self, scheduler: str, steps: int, seed: int) -> None:
        super().__init__()
        self.scheduler, self.steps = scheduler, steps
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(256, 10),
        )
        generator = torch.Generator().manual_seed(1000 + seed)
        x = torch.randn(512, 3, 16, 16, generator=generator)
        y = (x.flatten(1) @ torch.randn(3 * 16 * 16, 10, generator=generator)).argmax(1)
        self.data = TensorDataset(x, y)
        self.losses: list[float] = []
        self.multipliers: list[float] = []

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(float(loss.detach()))
        group = self.trainer.optimizers[0].param_groups[0]
        self.multipliers.append(group["lr"] / group["reference_lr"])
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(7))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-4)
        lr_scheduler = torch.optim.lr_scheduler
        if self.scheduler == "none":
            return opt
        if self.scheduler == "one_cycle":
            scheduler: Any = lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=self.steps)
        elif self.scheduler == "warmup_cosine":  # a composed scheduler: its children hold the optimizer
            warmup = lr_scheduler.LinearLR(opt, 0.1, 1.0, total_iters=self.steps // 10)
            cosine = lr_scheduler.CosineAnnealingLR(opt, self.steps - self.steps // 10)
            scheduler = lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[self.steps // 10])
        elif self.scheduler == "cyclic":
            scheduler = lr_scheduler.CyclicLR(opt, 1e-4, 1e-2, step_size_up=self.steps // 4, cycle_momentum=False)
        else:
            scheduler = lr_scheduler.LambdaLR(opt, lambda step: 1 + step / 10)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def run(scheduler: str, steps: int, seed: int) -> tuple[float, float, int]:
    """(mean loss over the last 10 % of steps, the largest lr / reference lr, warnings naming the reference lr)."""
    model = _Conv(scheduler, steps, seed)
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[LearnedOptimizer()],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    tail = model.losses[-max(1, steps // 10) :]
    named = sum("reference lr" in str(w.message) for w in caught)
    return sum(tail) / len(tail), max(model.multipliers), named


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    results = {name: [run(name, args.steps, seed) for seed in range(args.seeds)] for name in SCHEDULERS}
    baseline = statistics.median(loss for loss, _, _ in results["none"])
    print(f"{'scheduler':<14} {'final loss':>10} {'vs none':>8} {'max lr/ref':>10} {'warnings':>8}")
    for name, rows in results.items():
        loss = statistics.median(row[0] for row in rows)
        print(
            f"{name:<14} {loss:>10.4f} {loss / baseline:>8.3f} {max(row[1] for row in rows):>10.3g} "
            f"{sum(row[2] for row in rows):>8}"
        )


if __name__ == "__main__":
    main()
