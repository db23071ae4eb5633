"""Prototypical Networks for Few-shot Learning (Snell, Swersky, Zemel, NeurIPS 2017, arXiv:1703.05175).

Prototype ``c_k`` = mean support embedding of class ``k``; logits = ``-||f(x) - c_k||^2`` (squared
Euclidean); cross-entropy on the query set. Nothing is adapted per task, so evaluation needs no
gradients and runs under inference mode.

Batch norm uses running statistics (``model.eval()`` at test: non-transductive), unlike the MAML
family (docs/algorithms/protonet.md). Support and query embeddings of all tasks of a batch are computed in
one forward pass (in training, BN batch statistics therefore span the whole meta-batch, as
prototypical-networks does for its single episode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner

__all__ = ["ProtoNet", "prototype_logits"]


def prototype_logits(support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
    """Negative squared Euclidean distances of queries to class prototypes.

    Args:
        support: ``(tasks, support, dim)`` embeddings.
        support_y: ``(tasks, support)`` labels in ``0..ways-1``.
        query: ``(tasks, queries, dim)`` embeddings.
        ways: number of classes.

    Returns:
        ``(tasks, queries, ways)`` logits.

    Example:
        >>> s = torch.tensor([[[0.0], [2.0], [10.0]]])
        >>> prototype_logits(s, torch.tensor([[0, 0, 1]]), torch.tensor([[[1.0]]]), 2)
        tensor([[[ -0., -81.]]])
    """
    onehot = F.one_hot(support_y, ways).to(support.dtype)  # (tasks, support, ways)
    counts = onehot.sum(1).clamp_min(1).unsqueeze(-1)  # (tasks, ways, 1)
    protos = onehot.transpose(1, 2) @ support / counts  # (tasks, ways, dim)
    sq = (query**2).sum(-1, keepdim=True) - 2 * query @ protos.transpose(1, 2) + (protos**2).sum(-1).unsqueeze(1)
    return -sq.clamp_min(0)


class ProtoNet(MetaLearner):
    """Prototypical Networks over an embedding network.

    Args:
        backbone: embedding ``(examples, *x_shape) -> (examples, dim)``, e.g.
            :func:`lightning_meta.nn.conv4_protonet` (BN with running statistics is fine here).
        meta_lr: Adam learning rate.
        task_chunk: tasks per backward chunk (``None``: all at once).
        max_consecutive_skipped_steps: stop after this many non-finite (skipped) steps in a row.

    Example:
        >>> from lightning_meta.episode import Episode
        >>> net = ProtoNet(nn.Flatten())
        >>> x = torch.tensor([[[0.0], [4.0], [0.5]]])
        >>> net(Episode(x[:, :2], torch.tensor([[0, 1]]), x[:, 2:], torch.tensor([[0]])))
        tensor([[[ -0.2500, -12.2500]]])
    """

    needs_grad_at_eval = False

    def __init__(
        self,
        backbone: nn.Module,
        *,
        meta_lr: float = 1e-3,
        task_chunk: int | None = None,
        max_consecutive_skipped_steps: int | None = 100,
    ) -> None:
        super().__init__(
            meta_lr=meta_lr,
            task_mode="loop",
            task_chunk=task_chunk,
            max_consecutive_skipped_steps=max_consecutive_skipped_steps,
        )
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone

    def embed(self, x: Tensor) -> Tensor:
        """Embeddings ``(examples, dim)`` of inputs ``(examples, *x_shape)`` (fp32 under half precision).

        Subclasses change the feature space here (SimpleShot centres and normalises).
        """
        emb = self.backbone(x).flatten(1)
        if emb.dtype in (torch.float16, torch.bfloat16):
            emb = emb.float()  # the distance expansion of prototype_logits cancels badly in half precision
        return emb

    def forward_tasks(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Prototype logits of every task, embedding all tasks' support and query sets in one pass."""
        if support_y.is_floating_point():
            raise ValueError("ProtoNet is a classifier; got float (regression) targets")
        tasks, n_support = support_y.shape
        n_query = query_x.shape[1]
        x = torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)])
        emb = self.embed(x)  # (tasks * (support + queries), dim)
        support = emb[: tasks * n_support].view(tasks, n_support, -1)
        query = emb[tasks * n_support :].view(tasks, n_query, -1)
        ways = int(support_y.max()) + 1
        return prototype_logits(support, support_y, query, ways)  # (tasks, queries, ways)
