"""The meta-gradient of a batch of tasks, as a pure function: the functional twin of ``MetaLearner.training_step``.

:func:`meta_gradient` runs a per-task objective (or a per-task outer direction) over the tasks of a batch, in
chunks of tasks whose graphs are freed before the next chunk is built, and returns the mean meta-gradient with the
per-task losses, non-finite flags and accuracies. It needs no Lightning: a plain PyTorch loop can call it and hand
the gradients to any optimizer (see the example). :class:`~lightning_meta.algorithms.MetaLearner` calls it in every
training step and adds what belongs to a trainer: DDP, logging, the skipped-step policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from lightning_meta.functional.losses import per_task_accuracy
from lightning_meta.functional.tasks import run_tasks, task_chunks

__all__ = ["MetaGradient", "chunk_meta_gradient", "meta_gradient"]

#: ``(support_x, support_y, query_x, query_y) -> (loss, query outputs)`` of one task (or, batched, of a chunk of
#: tasks: ``(losses (tasks,), outputs (tasks, queries, ...))``).
TaskLossFn = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
#: ``(support_x, support_y, query_x, query_y) -> (directions aligned with params, loss, query outputs)`` of one task
#: (batched: every direction, loss and output with a leading task dimension).
TaskDirectionFn = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Sequence[Tensor], Tensor, Tensor]]
#: ``run_chunk(fn, inputs) -> fn(*inputs)``: how one chunk runs (eagerly by default; e.g. a CUDA-graph replay).
ChunkRunner = Callable[[Callable[..., Any], tuple[Tensor, ...]], Any]


class MetaGradient(NamedTuple):
    """What :func:`meta_gradient` returns."""

    #: mean over the tasks of the meta-gradient, one tensor per parameter (zeros for parameters nothing reached)
    grads: list[Tensor]
    #: per-task query losses ``(tasks,)``, detached
    losses: Tensor
    #: per-task flags ``(tasks,)``: the task's loss, or the meta-gradient of its chunk, is not finite
    nonfinite: Tensor
    #: per-task query accuracy ``(tasks,)``, None for regression (float targets)
    scores: Tensor | None


def meta_gradient(
    params: Sequence[Tensor],
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    task_loss: TaskLossFn | None = None,
    task_direction: TaskDirectionFn | None = None,
    batched: bool = False,
    mode: Literal["loop", "vmap"] = "loop",
    task_chunk: int | None = None,
    loss_scale: float = 1.0,
    randomness: str = "different",
    run_chunk: ChunkRunner | None = None,
) -> MetaGradient:
    """The meta-gradient of a batch of tasks (leading dimension of every tensor) with respect to ``params``.

    Give exactly one of:

    * ``task_loss``: the per-task objective. Its mean over the tasks is differentiated with
      ``torch.autograd.grad`` chunk by chunk: the graphs of ``task_chunk`` tasks are alive at once, each chunk's
      gradient is added to the total before the next chunk is built, so memory is one chunk's and the result is
      the same for any chunking (up to rounding).
    * ``task_direction``: the outer update of a task given as directions aligned with ``params`` (Reptile's
      ``theta - theta'``, an implicit gradient); their mean over the tasks is returned as the meta-gradient, and
      nothing is differentiated.

    Args:
        params: the meta-parameters (``requires_grad=True`` for ``task_loss``).
        support_x, support_y, query_x, query_y: the batch, ``(tasks, ...)`` each.
        task_loss, task_direction: per-task functions (signatures above); with ``batched=True`` they take a chunk
            of tasks (leading dimension) and return per-task results, and ``mode`` is theirs to apply.
        mode: ``"loop"`` or ``"vmap"`` (:func:`~lightning_meta.functional.run_tasks`) for the per-task functions.
        task_chunk: tasks per chunk (None: all at once).
        loss_scale: the loss is multiplied by it before differentiation and the gradient divided by it after
            (fp16: keeps small gradients from underflowing; see :class:`InnerLossScaler`).
        randomness: vmap's ``randomness`` (dropout masks per task).
        run_chunk: ``run_chunk(fn, inputs)`` runs one chunk's computation ``fn(*inputs)`` (default: directly);
            a CUDA-graph replay (:class:`CudaGraphCache`) plugs in here. ``fn`` does no host synchronisation.

    Returns:
        :class:`MetaGradient` ``(grads, losses, nonfinite, scores)``. A non-finite meta-gradient in a chunk whose
        losses are finite flags every task of the chunk (they cannot be told apart).

    Example (a plain PyTorch loop, no Lightning):
        >>> from torch import nn
        >>> from lightning_meta.functional import adapt, functional_forward
        >>> net = nn.Linear(4, 2)
        >>> params = list(net.parameters())
        >>> def task_loss(sx, sy, qx, qy):
        ...     fast = adapt(net, dict(net.named_parameters()), sx, sy, lr=0.5)
        ...     out = functional_forward(net, fast, qx)
        ...     return nn.functional.cross_entropy(out, qy), out
        >>> sx, qx = torch.randn(3, 4, 4), torch.randn(3, 6, 4)
        >>> sy, qy = torch.tensor([[0, 1, 0, 1]] * 3), torch.tensor([[0, 1] * 3] * 3)
        >>> grads, losses, nonfinite, scores = meta_gradient(params, sx, sy, qx, qy, task_loss=task_loss, task_chunk=1)
        >>> [g.shape for g in grads], losses.shape, bool(nonfinite.any())
        ([torch.Size([2, 4]), torch.Size([2])], torch.Size([3]), False)
        >>> torch.optim.SGD(params, lr=0.1).zero_grad()
        >>> for p, g in zip(params, grads):
        ...     p.grad = g  # then optimizer.step()
    """
    if (task_loss is None) == (task_direction is None):
        raise ValueError("meta_gradient needs exactly one of task_loss= and task_direction=")
    if not loss_scale > 0:
        raise ValueError(f"loss_scale={loss_scale} must be > 0")
    params = list(params)
    tasks = support_x.shape[0]
    run = run_chunk if run_chunk is not None else (lambda fn, inputs: fn(*inputs))

    def one_chunk(*inputs: Tensor) -> tuple[list[Tensor], Tensor, Tensor, Tensor | None]:
        return chunk_meta_gradient(
            params, *inputs, task_loss=task_loss, task_direction=task_direction, batched=batched, mode=mode,
            loss_scale=loss_scale, randomness=randomness,
        )  # fmt: skip

    total = [torch.zeros_like(p) for p in params]
    losses, nonfinite, scores = [], [], []
    for sl in task_chunks(tasks, task_chunk):
        grads, chunk_losses, bad, chunk_scores = run(
            one_chunk, (support_x[sl], support_y[sl], query_x[sl], query_y[sl])
        )
        if total:
            torch._foreach_add_(total, list(grads), alpha=1.0 / tasks)
        losses.append(chunk_losses)
        nonfinite.append(bad)
        if chunk_scores is not None:
            scores.append(chunk_scores)
    return MetaGradient(total, torch.cat(losses), torch.cat(nonfinite), torch.cat(scores) if scores else None)


def chunk_meta_gradient(
    params: Sequence[Tensor],
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    task_loss: TaskLossFn | None = None,
    task_direction: TaskDirectionFn | None = None,
    batched: bool = False,
    mode: Literal["loop", "vmap"] = "loop",
    loss_scale: float = 1.0,
    randomness: str = "different",
) -> tuple[list[Tensor], Tensor, Tensor, Tensor | None]:
    """One chunk of :func:`meta_gradient`: ``(sum over its tasks of the meta-gradient, losses, non-finite flags,
    accuracies or None)``. Tensor work only (no host synchronisation), so that it can be recorded as a CUDA graph."""
    params = list(params)
    inputs = (support_x, support_y, query_x, query_y)
    if task_direction is not None:
        if batched:
            directions, losses, outputs = task_direction(*inputs)
        else:

            def flat(*task: Tensor) -> tuple[Tensor, ...]:  # a flat tuple runs in a loop or under vmap
                dirs, loss, out = task_direction(*task)
                return (loss.detach(), out.detach(), *(d.detach() for d in dirs))

            losses, outputs, *directions = run_tasks(flat, *inputs, mode=mode, randomness=randomness)
        if len(directions) != len(params):
            raise ValueError(f"task_direction returned {len(directions)} directions for {len(params)} params")
        grads = [d.detach().sum(0) for d in directions]
    else:
        if task_loss is None:
            raise ValueError("chunk_meta_gradient needs exactly one of task_loss= and task_direction=")
        if batched:
            losses, outputs = task_loss(*inputs)
        else:
            losses, outputs = run_tasks(task_loss, *inputs, mode=mode, randomness=randomness)
        grads = list(torch.autograd.grad(losses.sum() * loss_scale, params, allow_unused=True)) if params else []
        grads = [
            torch.zeros_like(p) if g is None else (g / loss_scale if loss_scale != 1.0 else g)
            for p, g in zip(params, grads)
        ]
    losses = losses.detach()
    finite = torch.stack([g.isfinite().all() for g in grads]).all() if grads else losses.new_ones((), dtype=torch.bool)
    bad = ~losses.isfinite()
    bad = bad | (~finite & ~bad.any())  # a non-finite gradient with finite losses: blame the whole chunk
    scores = None if support_y.is_floating_point() else per_task_accuracy(outputs.detach(), query_y)
    return grads, losses, bad, scores
