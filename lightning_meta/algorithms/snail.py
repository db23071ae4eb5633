"""SNAIL: A Simple Neural Attentive Meta-Learner (Mishra, Rohaninejad, Chen, Abbeel, ICLR 2018, arXiv:1707.03141).

A task is a sequence: the support examples (shuffled by the episode sampler), each step
``concat(embedding(x), one_hot(y))``, followed by a query whose label vector is all zeros; a stack of
causal attention and temporal-convolution blocks reads it and the output at the query step is the
query's logits. Nothing is adapted by gradients: the network itself is the learner.

Stack (both reimplementations, docs/algorithms/snail.md): Att(64, 32) -> TC(T, 128) -> Att(256, 128) -> TC(T, 128)
-> Att(512, 256) -> Linear -> ways, with ``T = ways * shots + 1``.

Departures:

* every query of a task is scored in one pass: the sequence is ``support + all queries`` and the
  blocks (:mod:`lightning_meta.nn.snail_blocks`) let each query see the support and itself, not the
  other queries, which is exactly the per-query sequence of the paper (tested), at the cost of one;
* the loss is the mean cross-entropy over all query steps (one query per sequence in the paper);
* TC dilations are 1, 2, 4, ... (see :mod:`lightning_meta.nn.snail_blocks`);
* the embedding's batch norm keeps running statistics (train: statistics of all images of the batch
  of tasks, as both reimplementations; evaluation: running statistics, so not transductive).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.nn.snail_blocks import AttentionBlock, TCBlock

__all__ = ["SNAIL"]


class SNAIL(MetaLearner):
    """SNAIL few-shot classifier over an embedding network.

    Args:
        embedding: image -> feature vector network with an ``out_dim`` attribute (e.g.
            :func:`~lightning_meta.nn.snail_blocks.snail_omniglot_embedding`,
            :class:`~lightning_meta.nn.snail_blocks.SNAILResNetEmbedding`).
        ways: classes per episode (size of the one-hot label and of the output).
        shots: support examples per class (sizes the TC blocks: ``T = ways * shots + 1``).
        key_sizes: key sizes of the three attention blocks.
        value_sizes: value sizes of the three attention blocks.
        tc_filters: filters of each dense block in the two TC blocks.
        meta_lr: Adam learning rate.
        task_chunk: tasks per backward chunk (``None``: all at once).
        max_consecutive_skipped_steps: stop after this many non-finite (skipped) steps in a row.

    Example:
        >>> from lightning_meta.episode import Episode
        >>> emb = nn.Sequential(nn.Flatten(), nn.Linear(4, 6)); emb.out_dim = 6
        >>> snail = SNAIL(emb, ways=2, shots=1, key_sizes=(4, 4, 4), value_sizes=(4, 4, 4), tc_filters=4)
        >>> ep = Episode(torch.randn(3, 2, 4), torch.tensor([[1, 0]] * 3), torch.randn(3, 6, 4), torch.zeros(3, 6, dtype=torch.long))
        >>> snail(ep).shape  # (tasks, queries, ways)
        torch.Size([3, 6, 2])
    """

    needs_grad_at_eval = False

    def __init__(
        self,
        embedding: nn.Module,
        *,
        ways: int = 5,
        shots: int = 1,
        key_sizes: tuple[int, int, int] = (64, 256, 512),
        value_sizes: tuple[int, int, int] = (32, 128, 256),
        tc_filters: int = 128,
        meta_lr: float = 1e-4,
        task_chunk: int | None = None,
        max_consecutive_skipped_steps: int | None = 100,
    ) -> None:
        super().__init__(
            meta_lr=meta_lr,
            task_mode="loop",
            task_chunk=task_chunk,
            max_consecutive_skipped_steps=max_consecutive_skipped_steps,
        )
        emb_dim = getattr(embedding, "out_dim", None)
        if not isinstance(emb_dim, int):
            raise ValueError(
                f"SNAIL needs an embedding with an integer out_dim, got {type(embedding).__name__}; set embedding.out_dim"
            )
        if ways < 2 or shots < 1:
            raise ValueError(f"ways={ways} must be >= 2 and shots={shots} >= 1")
        if len(key_sizes) != 3 or len(value_sizes) != 3:
            raise ValueError(
                f"key_sizes={key_sizes} and value_sizes={value_sizes} need 3 entries (one per attention block)"
            )
        self.save_hyperparameters(ignore=["embedding"])
        self.embedding = embedding
        self.ways, self.shots = ways, shots
        seq_len = ways * shots + 1
        c = emb_dim + ways
        self.att1 = AttentionBlock(c, key_sizes[0], value_sizes[0])
        self.tc1 = TCBlock(self.att1.out_channels, seq_len, tc_filters)
        self.att2 = AttentionBlock(self.tc1.out_channels, key_sizes[1], value_sizes[1])
        self.tc2 = TCBlock(self.att2.out_channels, seq_len, tc_filters)
        self.att3 = AttentionBlock(self.tc2.out_channels, key_sizes[2], value_sizes[2])
        self.out = nn.Linear(self.att3.out_channels, ways)

    def sequence_logits(self, seq: Tensor, n_support: int | None = None) -> Tensor:
        """Logits ``(batch, time, ways)`` of a sequence ``(batch, time, emb_dim + ways)`` (see ``nn.snail_blocks``)."""
        h = seq
        for block in (self.att1, self.tc1, self.att2, self.tc2, self.att3):
            h = block(h, n_support)
        return self.out(h)

    def forward_tasks(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Query logits ``(tasks, queries, ways)``: one pass over ``support + queries`` per task."""
        tasks, n_s, n_q = support_x.shape[0], support_x.shape[1], query_x.shape[1]
        if n_s + 1 > 2 ** len(self.tc1.blocks):
            raise ValueError(
                f"episodes have {n_s} support examples but this SNAIL was built for ways * shots = "
                f"{self.ways * self.shots}; its TC blocks reach back {2 ** len(self.tc1.blocks) - 1} steps; "
                "build it with the episodes' ways and shots"
            )
        images = torch.cat([support_x, query_x], dim=1).flatten(0, 1)  # (tasks * (n_s + n_q), *x_shape)
        emb = self.embedding(images).view(tasks, n_s + n_q, -1)  # (tasks, time, emb_dim)
        labels = F.one_hot(support_y, self.ways).to(emb.dtype)  # (tasks, n_s, ways)
        labels = torch.cat([labels, labels.new_zeros(tasks, n_q, self.ways)], dim=1)  # queries: zero label
        logits = self.sequence_logits(torch.cat([emb, labels], dim=-1), n_support=n_s)
        return logits[:, n_s:]  # (tasks, queries, ways)
