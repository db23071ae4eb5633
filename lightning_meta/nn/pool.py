"""Max-pooling that keeps only 1-byte argmax positions for the backward pass, and Conv4's fused BN + max-pool.

PyTorch's ``max_pool2d`` saves its *input* for the backward pass as well as 8-byte argmax indices, so in
a ``conv -> BN -> max-pool`` block the full-resolution BN output stays alive until the backward pass
although routing the gradient needs only where each maximum was. :class:`LeanMaxPool2d` computes the
same function (a tournament of elementwise maxima over strided views for 2x2 windows, faster than
PyTorch's CPU max-pool), keeps the position of each maximum inside its window as one byte (the
first in row-major order on ties, as PyTorch), and routes the gradient with ``max_unpool2d``
(differentiable again, so second-order MAML works): one full-resolution activation less per block.
:func:`batch_norm_max_pool2d` (used by :class:`~lightning_meta.nn.Conv4`) also fuses the transductive
batch norm before it. Speed and memory figures: docs/bench/conv4.md (``benchmarks/bench_conv4_parts.py``).

Both are CPU ops unless asked otherwise (``any_device=True``, which ``Conv4(lean_ops=True)`` sets: on a GPU they
save memory but launch a dozen small kernels where PyTorch launches one; pair them with ``cuda_graphs=True``).
On other devices by default, inside lightning-meta's vmap path
(:func:`~lightning_meta.functional.inside_vmap`), for half-precision inputs, and under
``torch.use_deterministic_algorithms(True)`` (``Trainer(deterministic=True)``; PyTorch has no
deterministic ``max_unpool2d``) they are the plain ops. If you ``torch.func.vmap`` a backbone
yourself, do it inside :func:`~lightning_meta.functional.inside_vmap` (as for
:class:`~lightning_meta.nn.TaskBatchNorm`): the custom functions have no batching rule.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.functional.adaptation import is_inside_vmap

__all__ = ["LeanMaxPool2d", "batch_norm_max_pool2d", "fused_batch_norm_max_pool_applies"]


def _layout(t: Tensor) -> torch.memory_format:
    """The layout ATen's ``Tensor::suggest_memory_format()`` names for ``t`` (its channels-last stride test for
    4-D tensors, ties to NCHW as there): what the pooling helpers give their outputs, so channels-last input (what
    Conv4 runs on CPU) stays channels-last, and what ``max_unpool2d.out`` re-strides its output to."""
    if t.dim() != 4 or t.stride(1) == 0:
        return torch.contiguous_format
    low = 0
    for d in (1, 3, 2, 0):
        size, stride = t.shape[d], t.stride(d)
        if size == 0 or stride < low or (d == 0 and low == t.stride(1)):
            return torch.contiguous_format
        low = stride * size if size > 1 else stride
    return torch.channels_last


#: elements of full-resolution input per chunk of the leading dim in the pooling helpers: bounds their
#: temporaries (as an eighth of a 75-image 64x28x28 batch did) without splitting small tensors into many tiny ops
_CHUNK_ELEMENTS = 1 << 19


def _chunk_step(n: int, per_item: int) -> int:
    """Leading-dim items per chunk: about ``_CHUNK_ELEMENTS`` full-resolution elements, at least one item."""
    return max(1, min(n, _CHUNK_ELEMENTS // max(1, per_item)))


def _max_and_offsets(
    y: Tensor, kernel: int, scale: Tensor | None = None, shift: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Non-overlapping ``kernel x kernel`` max-pool (floor mode) of ``(..., H, W)`` input and, per pooled value,
    the position ``dh * kernel + dw`` of its maximum inside the window as one byte (the first in row-major order
    on ties, as PyTorch's max-pool). For ``kernel == 2`` a tournament of elementwise maxima over strided views,
    in chunks of the leading dim (PyTorch's CPU max-pool with indices is slower and writes 8-byte indices).

    With ``scale`` and ``shift`` (per-channel, dim 1 of ``(N, C, H, W)`` input) the pooled function is
    ``y * scale + shift``, computed chunk by chunk: the full-resolution affine output never exists as a whole.
    """
    if scale is not None:
        if shift is None:
            raise ValueError(
                "_max_and_offsets: scale was given without shift; pass both (y * scale + shift) or neither"
            )
        scale, shift = scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)
        if kernel != 2:
            y, scale = torch.addcmul(shift, y, scale), None
    rows, cols = (y.shape[-2] // kernel) * kernel, (y.shape[-1] // kernel) * kernel
    layout = _layout(y)  # outputs keep the input's memory layout, as ATen names it
    out = torch.empty(
        (*y.shape[:-2], rows // kernel, cols // kernel), dtype=y.dtype, device=y.device, memory_format=layout
    )
    offsets = torch.empty(out.shape, dtype=torch.uint8, device=out.device, memory_format=layout)
    if kernel == 2:
        step = _chunk_step(y.shape[0], y[0].numel())  # the temporaries below exist for one chunk at a time
        for n0 in range(0, y.shape[0], step):
            yy = y[n0 : n0 + step]
            if scale is not None and shift is not None:  # shift is set whenever scale is (checked above)
                yy = torch.addcmul(shift, yy, scale)
            v00, v01 = yy[..., 0:rows:2, 0:cols:2], yy[..., 0:rows:2, 1:cols:2]
            v10, v11 = yy[..., 1:rows:2, 0:cols:2], yy[..., 1:rows:2, 1:cols:2]
            top, right_top = torch.maximum(v00, v01), v01 > v00
            bottom, right_bottom = torch.maximum(v10, v11), v11 > v10
            lower = bottom > top
            torch.maximum(top, bottom, out=out[n0 : n0 + step])
            right = right_top ^ (lower & (right_bottom ^ right_top))  # right_bottom where lower, else right_top
            offsets[n0 : n0 + step].copy_(lower).mul_(2).add_(right)
        return out, offsets
    out.copy_(_window_max(y, kernel))
    offsets.zero_()
    for j in reversed(range(kernel * kernel)):
        dh, dw = divmod(j, kernel)
        offsets.masked_fill_(y[..., dh:rows:kernel, dw:cols:kernel] == out, j)
    return out, offsets


def _unpool(g: Tensor, offsets: Tensor, kernel: int, size: tuple[int, int]) -> Tensor:
    """``g`` scattered to the positions ``offsets`` name in a zero ``(..., *size)`` tensor (max-pool's backward).

    Differentiable (``F.max_unpool2d``) when grad mode is on (``create_graph=True``); otherwise written chunk
    by chunk of the leading dim, so the rebuilt 8-byte flat indices exist for one chunk at a time.
    """
    height, width = size
    base = (torch.arange(g.shape[-2], device=g.device) * (kernel * width)).view(-1, 1) + torch.arange(
        g.shape[-1], device=g.device
    ) * kernel

    def flat(o: Tensor) -> Tensor:  # (ho * k + dh) * W + wo * k + dw, with o = dh * k + dw
        return o.to(torch.int64).add_(o.div(kernel, rounding_mode="floor"), alpha=width - kernel).add_(base)

    if torch.is_grad_enabled():
        return F.max_unpool2d(g, flat(offsets), (kernel, kernel), (kernel, kernel), output_size=size)
    # max_unpool2d.out re-strides its output to the layout it suggests for g: allocate that layout up front
    full = torch.empty((*g.shape[:-2], height, width), dtype=g.dtype, device=g.device, memory_format=_layout(g))
    step = _chunk_step(g.shape[0], g[0].numel() * kernel * kernel)
    for n0 in range(0, g.shape[0], step):
        sl = slice(n0, n0 + step)
        torch.ops.aten.max_unpool2d.out(g[sl], flat(offsets[sl]), [height, width], out=full[sl])
    return full


class _IndexMaxPool2d(torch.autograd.Function):
    """Non-overlapping max-pool (kernel = stride, no padding) whose backward needs only 1-byte argmax positions."""

    @staticmethod
    def forward(x: Tensor, kernel: int) -> tuple[Tensor, Tensor]:
        return _max_and_offsets(x, kernel)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, int], output: tuple[Tensor, Tensor]) -> None:
        x, kernel = inputs
        ctx.save_for_backward(output[1])
        ctx.size, ctx.kernel = tuple(x.shape[-2:]), kernel
        ctx.mark_non_differentiable(output[1])
        # No zero-filled "gradient" of the positions in backward.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _grad_offsets: Tensor | None) -> tuple[Tensor | None, None]:
        (offsets,) = ctx.saved_tensors
        if grad_out is None:  # the pooled values did not reach the loss
            return None, None
        # Differentiable under create_graph=True (max_unpool2d), so second order is exact.
        return _unpool(grad_out, offsets, ctx.kernel, ctx.size), None


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

    kernel_size: int  # __init__ accepts a positive int only

    def __init__(self, kernel_size: int, any_device: bool = False) -> None:
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size={kernel_size!r}: use a positive int (stride = kernel, no padding)")
        super().__init__(kernel_size)
        #: also use the lean op off the CPU (a GPU: leaner, but a dozen kernels instead of one; see the module doc)
        self.any_device = any_device

    def forward(self, x: Tensor) -> Tensor:
        """Pool ``(batch, C, H, W)`` (or ``(C, H, W)``) input."""
        if (
            is_inside_vmap()
            or (x.device.type != "cpu" and not self.any_device)
            or x.dtype not in (torch.float32, torch.float64)
            or not torch.is_grad_enabled()
            # PyTorch flags max_unpool2d as nondeterministic (Trainer(deterministic=True) would raise)
            or torch.are_deterministic_algorithms_enabled()
        ):
            if not torch.is_grad_enabled() and x.dim() == 4 and x.device.type == "cpu" and not is_inside_vmap():
                return _window_max(x, self.kernel_size)  # same values, faster on CPU (no gradient: ties moot)
            return F.max_pool2d(x, self.kernel_size, self.kernel_size)
        return _IndexMaxPool2d.apply(x, self.kernel_size)[0]


class _BatchNormMaxPool2d(torch.autograd.Function):
    """Transductive batch norm (batch statistics) then a non-overlapping max-pool, as one op.

    Forward: the statistics from PyTorch's batch-norm statistics kernel, then, chunk by chunk of the batch,
    the normalised values and their pooled maximum as an elementwise maximum of strided views (PyTorch's CPU
    max-pool is slower; the full-resolution normalised tensor is never allocated), and per pooled
    value the position of the maximum in its window as one byte (first in row-major order on ties, as
    PyTorch's max-pool); saved: the input, the statistics, the positions.
    Backward: the flat indices are rebuilt, the gradient is unpooled into a full-resolution buffer, the
    weight/bias gradients come from PyTorch's batch-norm backward kernel (reductions only) and the input
    gradient ``a * unpool(g) + b * x + c`` (per-channel ``a, b, c``) is written into the same buffer in
    place: at the first block's backward (the peak of a MAML step) two full-resolution tensors instead of
    the three that ``max_unpool2d`` followed by the batch-norm backward hold. Under ``create_graph=True``
    the same formula runs on differentiable ops with the statistics recomputed from the input, so
    second order is exact.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float, kernel: int) -> tuple[Tensor, ...]:
        # The statistics alone (PyTorch's batch-norm statistics kernel), then the normalisation chunk by chunk
        # inside the pooling: no full-resolution normalised tensor is allocated (fresh memory costs page faults).
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        invstd = (var + eps).rsqrt()
        scale = weight * invstd
        out, offsets = _max_and_offsets(x, kernel, scale, bias - mean * scale)
        return out, offsets, mean, invstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, ...]) -> None:
        x, weight, bias, eps, kernel = inputs
        _, offsets, mean, invstd = output
        ctx.save_for_backward(x, weight, offsets, mean, invstd)
        ctx.eps, ctx.kernel = eps, kernel
        ctx.mark_non_differentiable(offsets, mean, invstd)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, g: Tensor | None, *_unused: Tensor | None) -> tuple:
        if g is None:
            return None, None, None, None, None
        x, weight, offsets, mean, invstd = ctx.saved_tensors
        k, (height, width) = ctx.kernel, x.shape[-2:]
        full = _unpool(g, offsets, k, (height, width))
        shape = (1, -1, 1, 1)
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops, statistics as functions of x
            # (torch.var_mean is much slower than these reductions on channels-last CPU input)
            centred = x - x.mean((0, 2, 3), keepdim=True)
            invstd = torch.rsqrt(centred.square().mean((0, 2, 3)) + ctx.eps)
            xhat = centred * invstd.view(shape)
            sum_g, sum_g_xhat = full.sum((0, 2, 3)), (full * xhat).sum((0, 2, 3))
            n = x.numel() // x.shape[1]
            grad_x = (weight * invstd).view(shape) * (
                full - (sum_g / n).view(shape) - xhat * (sum_g_xhat / n).view(shape)
            )
            return grad_x, sum_g_xhat, sum_g, None, None
        _, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
            full, x, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True]
        )
        n = x.numel() // x.shape[1]
        a = weight * invstd
        b = -a * invstd * sum_g_xhat / n
        c = -a * sum_g / n - b * mean
        grad_x = full.mul_(a.view(shape)).addcmul_(x, b.view(shape)).add_(c.view(shape))  # in place
        return grad_x, sum_g_xhat, sum_g, None, None


def _window_max(y: Tensor, kernel: int) -> Tensor:
    """Non-overlapping ``kernel x kernel`` max-pool (floor mode) as an elementwise maximum of strided views.

    Same values as ``F.max_pool2d`` (NaN propagates) and faster on CPU for small kernels (docs/bench/conv4.md).
    """
    rows, cols = (y.shape[-2] // kernel) * kernel, (y.shape[-1] // kernel) * kernel
    out = torch.empty(
        (*y.shape[:-2], rows // kernel, cols // kernel), dtype=y.dtype, device=y.device, memory_format=_layout(y)
    )
    for dh in range(kernel):
        for dw in range(kernel):
            view = y[..., dh:rows:kernel, dw:cols:kernel]
            if dh == dw == 0:
                out.copy_(view)
            else:
                torch.maximum(out, view, out=out)
    return out


def fused_batch_norm_max_pool_applies(x: Tensor, any_device: bool = False) -> bool:
    """Whether :func:`batch_norm_max_pool2d` may run as one op on ``x`` (else run the two modules); off the CPU
    only with ``any_device``."""
    return not (
        is_inside_vmap()
        or (x.device.type != "cpu" and not any_device)
        or x.dim() != 4
        or x.dtype not in (torch.float32, torch.float64)
        or not torch.is_grad_enabled()
        or torch.are_deterministic_algorithms_enabled()
    )


def batch_norm_max_pool2d(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, kernel: int, any_device: bool = False
) -> Tensor:
    """``F.max_pool2d(F.batch_norm(x, training=True, ...), kernel)`` as one op with a leaner, faster backward.

    For ``(N, C, H, W)`` float32/64 CPU input with gradients enabled, outside lightning-meta's vmap path and
    without deterministic algorithms (:func:`fused_batch_norm_max_pool_applies`); :class:`~lightning_meta.nn.Conv4`
    checks that and otherwise runs its batch-norm and pooling modules one by one.

    Example:
        >>> x, w, b = torch.randn(4, 3, 6, 6, requires_grad=True), torch.rand(3), torch.randn(3)
        >>> ref = F.max_pool2d(F.batch_norm(x, None, None, w, b, training=True), 2)
        >>> torch.allclose(batch_norm_max_pool2d(x, w, b, 1e-5, 2), ref, atol=1e-6)
        True
    """
    if not fused_batch_norm_max_pool_applies(x, any_device):
        raise ValueError(
            "batch_norm_max_pool2d needs (N, C, H, W) float32/64 CPU input with gradients enabled, outside vmap and "
            "deterministic algorithms; check fused_batch_norm_max_pool_applies(x) and run the modules otherwise"
        )
    return _BatchNormMaxPool2d.apply(x, weight, bias, eps, kernel)[0]
