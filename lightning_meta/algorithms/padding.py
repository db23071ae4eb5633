"""Running a learner on padded batches of variable-way, variable-shot episodes.

A padded batch (:meth:`Episode.collate <lightning_meta.episode.Episode.collate>`) is run one task at
a time on that task's real rows only, so padding never reaches a network (batch-norm statistics,
prototypes and inner-loop losses see exactly the unpadded task), and the outputs are padded back:

* query rows that were padding get zero outputs (the losses ignore them: their label is ``-1``);
* classes a task does not have get ``-inf`` logits. A task's classes are its labels ``0..ways-1``;
  a learner whose head is sized for the most ways of any episode (MAML with ``ways=max_ways``)
  returns more logits than the task has classes, and those are masked, so neither the loss nor the
  accuracy can pick an absent class. Learners whose outputs are as wide as the task's ways
  (ProtoNet) are widened to the batch's widest task with ``-inf``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_meta.episode import Episode

__all__ = ["mask_absent_classes", "run_unpadded"]


def mask_absent_classes(logits: Tensor, ways: int, width: int) -> Tensor:
    """``logits (examples, k)`` with classes ``>= ways`` set to ``-inf`` and widened to ``width`` columns.

    Raises:
        ValueError: when ``k < ways`` (the head has fewer outputs than the task has classes).

    Example:
        >>> mask_absent_classes(torch.zeros(1, 3), 2, 4)
        tensor([[0., 0., -inf, -inf]])
    """
    k = logits.shape[-1]
    if k < ways:
        raise ValueError(
            f"the learner returned {k} logits for a {ways}-way task; size its head for the most ways of any "
            f"episode (e.g. ways=VariableEpisodes.max_ways)"
        )
    if k < width:
        logits = torch.cat([logits, logits.new_full((*logits.shape[:-1], width - k), float("-inf"))], -1)
    if ways < logits.shape[-1]:
        absent = torch.arange(logits.shape[-1], device=logits.device) >= ways
        logits = logits.masked_fill(absent, float("-inf"))
    return logits


def run_unpadded(forward_tasks: Callable[[Tensor, Tensor, Tensor], Tensor], episode: Episode) -> Tensor:
    """Outputs ``(tasks, queries, classes)`` of a padded batch, computed task by task without padding.

    Args:
        forward_tasks: a learner's batched ``(support_x, support_y, query_x) -> (tasks, queries, classes)``;
            it is called with one task at a time.
        episode: a batched classification episode whose padding rows have label ``-1``.

    Example:
        >>> def nearest(sx, sy, qx):  # 1-D nearest neighbour as logits
        ...     return -(qx - sx.transpose(1, 2)).abs()
        >>> e = Episode.collate([Episode(torch.tensor([[0.0], [5.0]]), torch.tensor([0, 1]), torch.tensor([[4.0]]), torch.tensor([1])),
        ...                      Episode(torch.tensor([[0.0]]), torch.tensor([0]), torch.tensor([[1.0], [2.0]]), torch.tensor([0, 0]))])
        >>> run_unpadded(nearest, e)
        tensor([[[-4., -1.],
                 [ 0.,  0.]],
        <BLANKLINE>
                [[-1., -inf],
                 [-2., -inf]]])
    """
    if episode.is_regression:
        raise ValueError("padding applies to classification episodes only; regression episodes share shapes")
    s_mask, q_mask = episode.support_mask, episode.query_mask
    outs, ways = [], []
    for t in range(episode.tasks):
        sy = episode.support_y[t][s_mask[t]]
        if sy.numel() == 0:
            raise ValueError(f"task {t} of the batch has no support examples (all padding)")
        out = forward_tasks(episode.support_x[t][s_mask[t]][None], sy[None], episode.query_x[t][q_mask[t]][None])[0]
        outs.append(out)
        ways.append(int(sy.max()) + 1)
    width = max(max(o.shape[-1] for o in outs), max(ways))
    n_query = q_mask.shape[1]  # q_mask is shaped like query_y
    result = []
    for t, (out, w) in enumerate(zip(outs, ways)):
        out = mask_absent_classes(out, w, width)
        full = out.new_zeros(n_query, width)
        result.append(full.index_put((q_mask[t].nonzero().squeeze(1),), out))
    return torch.stack(result)
