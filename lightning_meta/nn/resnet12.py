"""ResNet-12 of MetaOptNet (Lee, Maji, Ravichandran, Soatto, CVPR 2019, arXiv:1904.03758 §4.1), with DropBlock
(Ghiasi, Lin, Le, NeurIPS 2018, arXiv:1810.12890).

``R64-MP-DB-R160-MP-DB-R320-MP-DB-R640-MP-DB``: four residual blocks of three ``3x3 conv -> BN ->
LeakyReLU(0.1)`` (the last activation after the residual add, a ``1x1 conv + BN`` shortcut), each followed
by 2x2 max-pooling and DropBlock; no global pooling (16000-d on 84x84), or a spatial mean (640-d).

Departures: DropBlock is off by default (``dropblock_keep_prob=1``) and uses a constant keep probability
(MetaOptNet anneals it); batch norm is transductive by default (:class:`~lightning_meta.nn.TaskBatchNorm`,
the MAML family's convention); pass ``track_running_stats=True`` for the metric-learning setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.nn.norm import TaskBatchNorm

__all__ = ["DropBlock", "ResNet12"]


class DropBlock(nn.Module):
    """Drop contiguous ``block_size x block_size`` regions of feature maps in training (identity in eval).

    Args:
        keep_prob: probability of keeping a unit (1 disables the layer).
        block_size: side of the dropped squares (1 is channel-wise dropout of single units).

    Example:
        >>> db = DropBlock(0.9, 3).eval()
        >>> x = torch.randn(2, 4, 8, 8)
        >>> torch.equal(db(x), x)
        True
    """

    def __init__(self, keep_prob: float = 0.9, block_size: int = 1) -> None:
        super().__init__()
        if not 0 < keep_prob <= 1:
            raise ValueError(f"keep_prob={keep_prob} must be in (0, 1]")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        self.keep_prob, self.block_size = keep_prob, block_size

    def forward(self, x: Tensor) -> Tensor:
        """``x`` with dropped blocks, rescaled so that the expected activation is unchanged."""
        if not self.training or self.keep_prob == 1.0:
            return x
        h, w = x.shape[-2:]
        b = min(self.block_size, h, w)
        gamma = (1 - self.keep_prob) / b**2 * (h * w) / ((h - b + 1) * (w - b + 1))
        seeds = torch.bernoulli(
            torch.full((*x.shape[:-2], h - b + 1, w - b + 1), gamma, device=x.device, dtype=x.dtype)
        )
        pad = b // 2, b - 1 - b // 2
        seeds = F.pad(seeds, (pad[0], pad[1], pad[0], pad[1]))  # (..., h, w): seeds only where a block fits
        blocks = F.max_pool2d(seeds, kernel_size=b, stride=1, padding=b // 2)[..., :h, :w]
        mask = 1 - blocks
        return x * mask * (mask.numel() / mask.sum().clamp_min(1.0))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, norm: type[nn.Module], slope: float, keep: float, block: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), norm(cout)
        self.conv3, self.bn3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), norm(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), norm(cout))
        self.act = nn.LeakyReLU(slope)
        self.pool = nn.MaxPool2d(2)
        self.drop = DropBlock(keep, block)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.drop(self.pool(self.act(out + self.shortcut(x))))


class ResNet12(nn.Module):
    """ResNet-12 with ``features`` (the four blocks + pooling/flatten) and a linear ``head``.

    Args:
        out_features: head size (ways); ``None`` for an embedding (``head`` is ``nn.Identity``).
        in_channels: image channels.
        channels: filters of the four blocks.
        pooling: ``"flatten"`` (MetaOptNet, needs ``image_size``) or ``"mean"`` (spatial mean).
        image_size: input side for ``pooling="flatten"``.
        dropblock_keep_prob: DropBlock keep probability (1 = off; MetaOptNet uses 0.9).
        dropblock_sizes: DropBlock block size per stage (MetaOptNet: 1, 1, 5, 5; CIFAR: 1, 1, 2, 2).
        negative_slope: LeakyReLU slope.
        track_running_stats: ``False`` -> transductive :class:`TaskBatchNorm` (MAML family, vmappable);
            ``True`` -> ``nn.BatchNorm2d`` with running statistics (ProtoNet/MetaOptNet setting).

    Example:
        >>> net = ResNet12(5, channels=(4, 8, 8, 8), pooling="mean")
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        out_features: int | None = None,
        *,
        in_channels: int = 3,
        channels: Sequence[int] = (64, 160, 320, 640),
        pooling: Literal["flatten", "mean"] = "flatten",
        image_size: int | None = 84,
        dropblock_keep_prob: float = 1.0,
        dropblock_sizes: Sequence[int] = (1, 1, 5, 5),
        negative_slope: float = 0.1,
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) != 4 or len(dropblock_sizes) != 4:
            raise ValueError(f"channels={tuple(channels)} and dropblock_sizes={tuple(dropblock_sizes)} need 4 entries")
        norm = nn.BatchNorm2d if track_running_stats else TaskBatchNorm
        blocks: list[nn.Module] = []
        cin = in_channels
        for cout, size in zip(channels, dropblock_sizes):
            blocks.append(_Block(cin, cout, norm, negative_slope, dropblock_keep_prob, size))
            cin = cout
        if pooling == "mean":
            blocks.append(nn.AdaptiveAvgPool2d(1))
            blocks.append(nn.Flatten())
            self.out_dim = cin
        elif pooling == "flatten":
            if image_size is None:
                raise ValueError("pooling='flatten' needs image_size (e.g. 84) to size the head")
            side = image_size
            for _ in range(4):
                side //= 2
            if side < 1:
                raise ValueError(f"image_size={image_size} is too small for four 2x2 poolings")
            blocks.append(nn.Flatten())
            self.out_dim = cin * side * side
        else:
            raise ValueError(f"pooling={pooling!r}; use 'flatten' or 'mean'")
        self.features = nn.Sequential(*blocks)
        self.head: nn.Module = nn.Identity() if out_features is None else nn.Linear(self.out_dim, out_features)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=negative_slope)

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, C, H, W) -> (batch, out_features)`` (or ``(batch, out_dim)`` without a head)."""
        return self.head(self.features(x))
