"""Per-task losses, accuracy and the 95% confidence interval of few-shot evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_meta.episode import PAD_LABEL

__all__ = [
    "default_inner_loss",
    "flat_mse_loss",
    "masked_task_mean",
    "mean_ci95",
    "per_task_accuracy",
    "per_task_cross_entropy",
    "per_task_mse",
]


def per_task_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of each task over its real examples (targets ``-1``, padding, are ignored).

    Args:
        logits: ``(tasks, examples, classes)``.
        targets: ``(tasks, examples)`` class indices.

    Returns:
        ``(tasks,)``, computed in fp32 for half-precision logits.

    Example:
        >>> per_task_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
        tensor([1.3863, 1.3863])
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (tasks, examples, classes) and targets (tasks, examples), got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    tasks, examples, classes = logits.shape
    ce = F.cross_entropy(
        _upcast(logits).reshape(-1, classes), targets.reshape(-1), reduction="none", ignore_index=PAD_LABEL
    )
    return masked_task_mean(ce.view(tasks, examples), targets >= 0)


def per_task_mse(predictions: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error of each task; ``predictions`` may carry a trailing singleton dim.

    Example:
        >>> per_task_mse(torch.zeros(2, 3, 1), torch.tensor([[1.0, 1, 1], [0, 0, 3]]))
        tensor([1., 3.])
    """
    if predictions.dim() == targets.dim() + 1 and predictions.shape[-1] == 1:
        predictions = predictions.squeeze(-1)
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} do not match targets {tuple(targets.shape)}")
    err = (_upcast(predictions) - _upcast(targets)) ** 2
    return err.reshape(err.shape[0], -1).mean(1)


def flat_mse_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error of one task's outputs against its targets, ``outputs`` reshaped to the targets'
    shape (a ``(queries, 1)`` regression head against ``(queries,)`` targets).

    Example:
        >>> flat_mse_loss(torch.zeros(3, 1), torch.tensor([1.0, 1.0, 4.0]))
        tensor(6.)
    """
    return F.mse_loss(outputs.reshape(targets.shape), targets.to(outputs.dtype))


def default_inner_loss(targets: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """The inner loss of the gradient-based learners for these targets: :func:`flat_mse_loss` for float
    (regression) targets, ``F.cross_entropy`` for class labels."""
    return flat_mse_loss if targets.is_floating_point() else F.cross_entropy


def per_task_accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Fraction of correctly classified real examples of each task, ``(tasks,)`` (targets ``-1`` are padding).

    Example:
        >>> per_task_accuracy(torch.tensor([[[1.0, 0], [0, 1]]]), torch.tensor([[0, 0]]))
        tensor([0.5000])
    """
    correct = (logits.argmax(-1) == targets).float().reshape(targets.shape[0], -1)
    if targets.is_floating_point():
        return correct.mean(1)
    return masked_task_mean(correct, (targets >= 0).reshape(targets.shape[0], -1))


def masked_task_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of each task's ``values (tasks, examples)`` over the examples where ``mask`` is True.

    A task without real examples gives NaN (its loss is undefined), not a silent 0.

    Example:
        >>> masked_task_mean(torch.tensor([[1.0, 3.0, 9.0]]), torch.tensor([[True, True, False]]))
        tensor([2.])
    """
    m = mask.to(values.dtype)
    return (values * m).sum(1) / m.sum(1)


def mean_ci95(values: Sequence[float] | Tensor, ddof: int = 0) -> tuple[float, float]:
    """Mean and half-width ``1.96 * std / sqrt(n)`` of the normal 95% interval over episodes.

    ``ddof=0`` (population std, ``np.std``'s default) matches cbfinn/maml's ``main.py``; pass ``ddof=1``
    for the sample std. Use one value per test episode (not per batch).

    Example:
        >>> mean_ci95([0.5, 1.0])  # std = 0.25, n = 2
        (0.75, 0.3464823227814083)
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = v.numel()
    if n <= ddof:
        raise ValueError(f"need more than ddof={ddof} values for a confidence interval, got {n}")
    mean = v.mean().item()
    std = math.sqrt(((v - mean) ** 2).sum().item() / (n - ddof))
    return mean, 1.96 * std / math.sqrt(n)


def _upcast(t: Tensor) -> Tensor:
    """fp16/bf16 -> fp32 for loss arithmetic; other dtypes (fp32, fp64) unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
