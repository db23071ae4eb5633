"""Tiny deterministic episodes and trainer settings shared by the algorithm tests."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_meta.episode import Episode
from lightning_meta.nn import MLP


def blob_episode(seed: int, ways: int = 3, shots: int = 2, queries: int = 2, dim: int = 4) -> Episode:
    """One classification task: Gaussian blobs around per-episode class means."""
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(ways, dim, generator=g)
    perm = torch.randperm(ways, generator=g)
    sy = torch.arange(ways).repeat_interleave(shots)
    qy = torch.arange(ways).repeat_interleave(queries)
    sx = means[sy] + 0.5 * torch.randn(ways * shots, dim, generator=g)
    qx = means[qy] + 0.5 * torch.randn(ways * queries, dim, generator=g)
    return Episode(sx, perm[sy], qx, perm[qy])


class EpisodeList(Dataset):
    def __init__(self, episodes: list[Episode]) -> None:
        self.episodes = episodes

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, i: int) -> Episode:
        return self.episodes[i]


def loader(episodes: list[Episode], tasks: int) -> DataLoader:
    return DataLoader(EpisodeList(episodes), batch_size=tasks, collate_fn=Episode.collate, shuffle=False)


def trainer(**kwargs) -> L.Trainer:
    opts = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
    )
    opts.update(kwargs)
    return L.Trainer(**opts)


def grads_of_training_step(module, batch: Episode) -> dict[str, Tensor]:
    """Gradient that the training step hands Lightning (through its surrogate loss)."""
    module.zero_grad()
    loss = module.training_step(batch, 0)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def sine_episode(seed: int, shots: int = 10, queries: int = 10) -> Episode:
    """One sinusoid regression task (MAML §5.1): amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5]."""
    g = torch.Generator().manual_seed(seed)
    amp = 0.1 + 4.9 * torch.rand((), generator=g)
    phase = torch.pi * torch.rand((), generator=g)
    x = 10 * torch.rand(shots + queries, 1, generator=g) - 5
    y = amp * torch.sin(x[:, 0] + phase)
    return Episode(x[:shots], y[:shots], x[shots:], y[shots:])


def two_layer() -> nn.Module:
    torch.manual_seed(0)
    return MLP(in_features=4, out_features=3, hidden=(6,)).double()


def batch(tasks: int = 4) -> Episode:
    e = Episode.collate([blob_episode(i) for i in range(tasks)])
    return Episode(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y)


def manual_ce_grads(w: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Closed-form gradient of the mean cross-entropy of a 1-hidden-layer ReLU net."""
    z = x @ w["features.0.weight"].T + w["features.0.bias"]
    h = z.clamp_min(0)
    logits = h @ w["head.weight"].T + w["head.bias"]
    dlogits = (logits.softmax(-1) - F.one_hot(y, logits.shape[-1]).to(logits)) / x.shape[0]
    dz = (dlogits @ w["head.weight"]) * (z > 0).to(z)
    return {
        "features.0.weight": dz.T @ x,
        "features.0.bias": dz.sum(0),
        "head.weight": dlogits.T @ h,
        "head.bias": dlogits.sum(0),
    }


def reference(model: nn.Module, b: Episode, lr: float, steps: int, first_order: bool, head_only: bool = False):
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    total = 0.0
    for t in range(b.tasks):
        w = dict(theta)
        for _ in range(steps):
            g = manual_ce_grads(w, b.support_x[t], b.support_y[t])
            w = {
                n: w[n]
                if head_only and not n.startswith("head")
                else w[n] - lr * (g[n].detach() if first_order else g[n])
                for n in w
            }
        logits = (
            torch.relu(b.query_x[t] @ w["features.0.weight"].T + w["features.0.bias"]) @ w["head.weight"].T
            + w["head.bias"]
        )
        total = total + F.cross_entropy(logits, b.query_y[t])
    return dict(zip(theta, torch.autograd.grad(total / b.tasks, list(theta.values()))))
