"""Max-pooling that keeps only its indices for the backward pass.

PyTorch's ``max_pool2d`` saves its *input* for the backward pass as well as the argmax indices, so in a
``conv -> BN -> max-pool`` block the full-resolution BN output stays alive until the backward pass
although routing the gradient needs only the indices. :class:`LeanMaxPool2d` computes the same
function, routes the gradient with ``max_unpool2d`` over the saved indices (differentiable again, so
second-order MAML works) and frees the input: one full-resolution activation less per block (measured
in docs/bench/maml.md). Inside lightning-meta's vmap path (:func:`~lightning_meta.functional.inside_vmap`),
for half-precision inputs, and under ``torch.use_deterministic_algorithms(True)`` (``Trainer(deterministic=True)``;
PyTorch has no deterministic ``max_unpool2d``) it is plain ``F.max_pool2d``. If you ``torch.func.vmap`` a
backbone yourself, do it inside :func:`~lightning_meta.functional.inside_vmap` (as for
:class:`~lightning_meta.nn.TaskBatchNorm`): the index-only function has no batching rule. (A round trip
through channels-last layout, where PyTorch's CPU max-pool is vectorised over channels, was tried and
dropped: 25–48 ms against 31–36 ms for NCHW, no reliable gain, and two transient copies;
``benchmarks/bench_conv4_parts.py``.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.functional.adaptation import is_inside_vmap

__all__ = ["LeanMaxPool2d"]


class _IndexMaxPool2d(torch.autograd.Function):
    """Non-overlapping max-pool (kernel = stride, no padding) whose backward needs only the indices."""

    @staticmethod
    def forward(x: Tensor, kernel: int) -> tuple[Tensor, Tensor]:
        return F.max_pool2d(x, kernel, kernel, return_indices=True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, int], output: tuple[Tensor, Tensor]) -> None:
        x, kernel = inputs
        ctx.save_for_backward(output[1])
        ctx.size, ctx.kernel = tuple(x.shape[-2:]), kernel
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _grad_indices: Tensor | None) -> tuple[Tensor, None]:
        (indices,) = ctx.saved_tensors
        # Built from differentiable ops: under create_graph=True this backward is itself differentiated.
        return F.max_unpool2d(grad_out, indices, ctx.kernel, ctx.kernel, output_size=ctx.size), None


class LeanMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d(kernel_size)`` (stride = kernel, no padding, floor mode) that frees its input after forward.

    Same output and gradients (first and second order) as ``nn.MaxPool2d``; see the module docstring.

    Args:
        kernel_size: pooling window and stride (an int).

    Example:
        >>> x = torch.randn(2, 3, 7, 7)
        >>> torch.equal(LeanMaxPool2d(2)(x), nn.MaxPool2d(2)(x))
        True
    """

    def __init__(self, kernel_size: int) -> None:
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size={kernel_size!r}: use a positive int (stride = kernel, no padding)")
        super().__init__(kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        """Pool ``(batch, C, H, W)`` (or ``(C, H, W)``) input."""
        if (
            is_inside_vmap()
            or x.dtype not in (torch.float32, torch.float64)
            or not torch.is_grad_enabled()
            # PyTorch flags max_unpool2d as nondeterministic (Trainer(deterministic=True) would raise)
            or torch.are_deterministic_algorithms_enabled()
        ):
            return F.max_pool2d(x, self.kernel_size, self.kernel_size)
        return _IndexMaxPool2d.apply(x, self.kernel_size)[0]
