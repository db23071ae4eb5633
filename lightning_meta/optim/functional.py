"""Pure tensor helpers shared by the update rules: per-tensor statistics, gradient preprocessing, time features.

Every helper takes ``batch_dims``: the number of leading dimensions that index independent inner problems
(meta-training batches many problems into one tensor). Statistics are taken per problem, over the remaining
dimensions, so a batched call equals a loop over problems.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "coordinate_mlp",
    "feature_dims",
    "flatten_features",
    "lstm_preprocess",
    "mean_square",
    "newton_schulz",
    "per_problem_bias",
    "rsqrt_at_zero_safe",
    "sqrt_at_zero_safe",
    "tensor_normalize",
    "time_features",
]


def feature_dims(x: Tensor, batch_dims: int) -> tuple[int, ...]:
    """The dimensions of ``x`` that belong to one problem's tensor (all but the leading ``batch_dims``).

    Raises:
        ValueError: if ``batch_dims`` is negative or exceeds ``x.ndim``.
    """
    if not 0 <= batch_dims <= x.ndim:
        raise ValueError(
            f"batch_dims={batch_dims} but the tensor has {x.ndim} dims {tuple(x.shape)}; "
            f"pass 0 <= batch_dims <= {x.ndim}"
        )
    return tuple(range(batch_dims, x.ndim))


def mean_square(x: Tensor, batch_dims: int = 0) -> Tensor:
    """Mean of ``x**2`` over each problem's tensor, kept broadcastable to ``x``: shape ``x.shape[:batch_dims] + (1,...)``.

    A problem whose tensor is a scalar (no dims left) gets its own square.
    """
    dims = feature_dims(x, batch_dims)
    if not dims:
        return x * x
    count = math.prod(x.shape[d] for d in dims)
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True).square() / max(count, 1)


def sqrt_at_zero_safe(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose derivative is 0, not NaN, where ``x`` is 0.

    There the true derivative is infinite, and the chain rule's ``0 * inf`` (``x = |g|²`` of a gradient that is exactly
    zero) would make every meta-gradient NaN. Values are those of ``torch.sqrt``.
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1.0)), 0.0)


def rsqrt_at_zero_safe(x: Tensor, eps: float) -> Tensor:
    """``rsqrt(x + eps)`` for ``x >= 0`` whose derivative is 0, not NaN, where ``x`` is 0.

    A floor as small as 1e-30 keeps the value finite but not the derivative: ``-(x + eps) ** -1.5 / 2`` overflows
    float32 there, and ``0 * inf`` is NaN (a momentum that is still zero, a gradient that is exactly zero). Values
    are those of ``torch.rsqrt(x + eps)``.
    """
    positive = x > 0
    return torch.where(positive, torch.rsqrt(torch.where(positive, x, 1.0) + eps), torch.rsqrt(x.detach() + eps))


def tensor_normalize(x: Tensor, batch_dims: int = 0, eps: float = 1e-5) -> Tensor:
    """``x * rsqrt(eps + mean(x**2))`` with the mean taken over each problem's tensor (Metz et al. 2020)."""
    return x * torch.rsqrt(eps + mean_square(x, batch_dims))


def lstm_preprocess(grad: Tensor, k: float = 5.0) -> tuple[Tensor, Tensor]:
    """Log/sign gradient preprocessing of Andrychowicz et al. 2016 (Appendix A), element-wise.

    Returns:
        ``(clamp(log|g| / k, min=-1), clamp(g * e**k, -1, 1))``: for ``|g| >= e**-k`` this is
        ``(log|g|/k, sign g)``, for smaller gradients ``(-1, e**k g)``.
    """
    magnitude = torch.clamp(torch.log(grad.abs() + 1e-30) / k, min=-1.0)
    sign = torch.clamp(grad * math.exp(k), -1.0, 1.0)
    return magnitude, sign


def time_features(
    step: int | Tensor,
    timescales: tuple[float, ...],
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``tanh(step / timescale - 1)`` for each timescale: a step-count embedding in ``[-1, 1)``.

    Returns:
        A vector of ``len(timescales)`` entries (or ``step.shape + (len(timescales),)`` for a tensor step).
    """
    scales = torch.tensor(timescales, dtype=dtype, device=device)
    t = torch.as_tensor(step, dtype=dtype, device=device)
    return torch.tanh(t.unsqueeze(-1) / scales - 1.0)


def newton_schulz(x: Tensor, steps: int = 5, batch_dims: int = 0) -> Tensor:
    """Approximately orthogonalise the trailing matrix of ``x`` (quintic Newton–Schulz iteration, as in Muon).

    Tensors with more than two dims per problem are treated as ``(out, in*...)`` matrices.
    """
    shape = x.shape
    m = x.reshape(*shape[: batch_dims + 1], -1)
    transpose = m.shape[-2] > m.shape[-1]
    if transpose:
        m = m.transpose(-2, -1)
    m = m / (m.flatten(-2).norm(dim=-1)[..., None, None] + 1e-7)
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        gram = m @ m.transpose(-2, -1)
        m = a * m + (b * gram + c * gram @ gram) @ m
    if transpose:
        m = m.transpose(-2, -1)
    return m.reshape(shape)


def flatten_features(feats: Tensor, batch_dims: int) -> tuple[Tensor, Tensor]:
    """Flatten ``(*B, F, *rest)`` features to ``(b, F, n)`` (``b = prod(B)``, at least 1) and return their
    per-problem normalisers ``(b, F)``: ``rsqrt(1e-5 + mean over the tensor of x**2)`` (Metz et al. 2020).

    The normalisers are returned rather than applied so that a caller can fold them into the first layer's weights
    (:func:`coordinate_mlp`) instead of writing a normalised copy of the features.
    """
    x = feats.reshape(-1, feats.shape[batch_dims], math.prod(feats.shape[batch_dims + 1 :]))
    scale = torch.rsqrt(1e-5 + torch.linalg.vector_norm(x, dim=-1).square() / max(x.shape[-1], 1))
    return x, scale


_BLOCK = 1 << 14  # columns per block in coordinate_mlp: keeps the (H, block) hidden activations in cache


def coordinate_mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, skip: Tensor | None = None) -> Tensor:
    """``b2 + skip @ x + w2 @ relu(w1 @ x + b1)`` for every column of ``x`` (b, F, n), in column blocks: a
    coordinate-wise MLP with one hidden layer applied to every parameter coordinate of ``b`` problems at once.

    Shapes: ``w1`` (b, H, F), ``b1`` (b or 1, H, 1), ``w2`` (b or 1, O, H), ``b2`` (1, O, 1), ``skip`` (b, O, F).
    Returns (b, O, n). Blocking keeps the hidden activations in cache on CPUs (about 2x faster at n = 1e6).
    """
    w2 = w2.expand(x.shape[0], -1, -1)
    outs = []
    for start in range(0, x.shape[-1], _BLOCK):
        block = x[..., start : start + _BLOCK]
        hidden = torch.baddbmm(b1, w1, block).relu_()
        base = b2 if skip is None else torch.baddbmm(b2, skip, block)
        outs.append(torch.baddbmm(base, w2, hidden))
    return torch.cat(outs, dim=-1) if len(outs) != 1 else outs[0]


def per_problem_bias(bias: Tensor, problems: int) -> Tensor:
    """A hidden-layer bias for :func:`coordinate_mlp`: ``(H,)`` (shared) or ``(*B, H)`` (one per problem, e.g. from
    per-problem step counts) to ``(1 or b, H, 1)``, expanded over ``problems``."""
    return bias.reshape(-1 if bias.ndim > 1 else 1, bias.shape[-1], 1).expand(problems, -1, -1)
