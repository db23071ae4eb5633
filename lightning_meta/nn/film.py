"""Context-conditioned networks of CAML/CAVIA (Zintgraf et al., arXiv:1810.03642): FiLM and context inputs.

A context network is called as ``net(x, context)`` with one context vector ``(context_dim,)`` per
task, shared by every example of the batch; it exposes ``context_dim``. FiLM (Perez et al., AAAI 2018,
arXiv:1709.07871) maps the context to a per-channel scale and offset, ``h <- gamma * h + beta``.

Following the CAVIA code (docs/algorithms/caml.md), ``gamma`` is the raw first half of a linear map of the
context, *not* ``1 + delta``: with the context at zero, ``gamma`` is the generator's bias (close to
zero at initialisation), so the FiLM layer starts nearly closed and the generator learns to open it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_meta.nn.norm import TaskBatchNorm

__all__ = ["ContextConv4", "ContextMLP", "FiLM"]


class FiLM(nn.Module):
    """Feature-wise affine modulation ``gamma * h + beta`` from a meta-learned ``Linear(context_dim -> 2 * channels)``.

    Args:
        context_dim: size of the context vector.
        channels: channels of the modulated features (dim 1 of ``h``).

    Example:
        >>> film = FiLM(3, 4)
        >>> film(torch.ones(2, 4, 5, 5), torch.zeros(3)).shape
        torch.Size([2, 4, 5, 5])
    """

    def __init__(self, context_dim: int, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.generator = nn.Linear(context_dim, 2 * channels)

    def forward(self, h: Tensor, context: Tensor) -> Tensor:
        """Modulate ``h (batch, channels, ...)`` with ``context (context_dim,)``."""
        gamma, beta = self.generator(context).to(h.dtype).split(self.channels, dim=-1)  # (channels,) each
        shape = [1, self.channels] + [1] * (h.dim() - 2)
        return gamma.view(shape) * h + beta.view(shape)


class ContextMLP(nn.Module):
    """CAVIA's regressor: the context concatenated to the input, then ``Linear -> ReLU`` layers and a linear head.

    The default is the sinusoid network (1 + 5)-40-40-1.

    Args:
        in_features: input size (without the context).
        out_features: output size.
        context_dim: size of the context vector.
        hidden: hidden layer sizes.

    Example:
        >>> ContextMLP()(torch.randn(10, 1), torch.zeros(5)).shape
        torch.Size([10, 1])
    """

    def __init__(
        self, in_features: int = 1, out_features: int = 1, *, context_dim: int = 5, hidden: Sequence[int] = (40, 40)
    ) -> None:
        super().__init__()
        self.context_dim = context_dim
        layers: list[nn.Module] = []
        width = in_features + context_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """``(batch, in_features)``, ``(context_dim,)`` -> ``(batch, out_features)``."""
        ctx = context.to(x.dtype).expand(x.shape[0], -1)  # (batch, context_dim)
        return self.head(self.features(torch.cat([x, ctx], dim=-1)))


class ContextConv4(nn.Module):
    """CAVIA's classifier: 4 x [3x3 conv (pad 1) -> BN -> 2x2 max-pool -> (FiLM) -> ReLU], flatten, linear.

    Batch norm is :class:`~lightning_meta.nn.TaskBatchNorm` (batch statistics always, as CAVIA's
    ``track_running_stats=False``). FiLM sits between max-pool and ReLU of the blocks in ``film_layers``
    (CAVIA: only the third block, index 2). Kaiming-uniform conv/linear weights (PyTorch's default, as CAVIA).

    Args:
        out_features: ways.
        context_dim: size of the context vector (CAVIA: 100).
        in_channels: image channels.
        hidden: filters per conv (CAVIA: 32, 128 or 512).
        image_size: input side (sizes the head: 84 -> 5 x 5 x hidden, 28 -> 1 x 1 x hidden).
        film_layers: indices of the blocks followed by FiLM.

    Example:
        >>> net = ContextConv4(5, context_dim=8, hidden=4, image_size=28)
        >>> net(torch.randn(3, 1, 28, 28), torch.zeros(8)).shape
        torch.Size([3, 5])
    """

    def __init__(
        self,
        out_features: int = 5,
        *,
        context_dim: int = 100,
        in_channels: int = 1,
        hidden: int = 32,
        image_size: int = 28,
        film_layers: Sequence[int] = (2,),
    ) -> None:
        super().__init__()
        bad = [i for i in film_layers if not 0 <= i < 4]
        if bad:
            raise ValueError(f"film_layers={tuple(film_layers)} has indices {bad} outside the 4 blocks 0..3")
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for four 2x2 max-pools (need >= 16)")
        self.context_dim = context_dim
        self.film_layers = tuple(film_layers)
        self.convs = nn.ModuleList(nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1) for i in range(4))
        self.norms = nn.ModuleList(TaskBatchNorm(hidden) for _ in range(4))
        self.films = nn.ModuleDict({str(i): FiLM(context_dim, hidden) for i in self.film_layers})
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(hidden * side * side, out_features)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """``(batch, C, H, W)``, ``(context_dim,)`` -> logits ``(batch, out_features)``."""
        h = x
        for i in range(4):
            h = self.pool(self.norms[i](self.convs[i](h)))
            if str(i) in self.films:
                h = self.films[str(i)](h, context)
            h = torch.relu(h)
        return self.head(h.flatten(1))
