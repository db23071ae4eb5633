"""Blocks of SNAIL (Mishra, Rohaninejad, Chen, Abbeel, "A Simple Neural Attentive Meta-Learner", ICLR 2018,
arXiv:1707.03141): causal dilated convolutions (dense and TC blocks), causal attention, embedding nets.

All blocks map a sequence ``(batch, time, channels)`` to ``(batch, time, channels + added)`` and
take ``n_support``: the first ``n_support`` steps form an ordinary causal sequence, and every later
step (a query) sees those steps and itself but *not the other queries*, exactly as if it were the
last step of its own sequence ``support + [query]``. So all queries of a task are evaluated in one
pass; ``n_support=None`` is the plain causal sequence. Concretely: the conv at step ``t`` with
dilation ``d`` reads step ``t - d`` (support) or ``n_support - d`` (query, its position in its own
sequence is ``n_support``), zero before the start; attention masks future keys and other queries'
keys and normalises over keys (docs/algorithms/snail.md: one reimplementation normalised over queries).

Dilations of a TC block are 1, 2, 4, ... (``ceil(log2 T)`` dense blocks): with kernel 2 they reach
every offset up to ``T - 1``; the 2, 4, 8, ... of one reimplementation only reach even offsets
(docs/algorithms/snail.md).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.nn.conv4 import Conv4

__all__ = [
    "AttentionBlock",
    "CausalConv1d",
    "DenseBlock",
    "SNAILResNetEmbedding",
    "TCBlock",
    "causal_mask",
    "snail_omniglot_embedding",
]


def _source_index(time: int, offset: int, n_support: int | None, device: torch.device) -> Tensor:
    """Index of the step that step ``t`` reads at ``offset`` back (negative: before the start)."""
    t = torch.arange(time, device=device)
    if n_support is None or n_support >= time:
        return t - offset
    return torch.where(t < n_support, t, torch.full_like(t, n_support)) - offset


def causal_mask(time: int, n_support: int | None = None, device: torch.device | None = None) -> Tensor:
    """Bool ``(time, time)``, True where query step ``i`` may attend key step ``j``.

    Example:
        >>> causal_mask(4, n_support=2).int()
        tensor([[1, 0, 0, 0],
                [1, 1, 0, 0],
                [1, 1, 1, 0],
                [1, 1, 0, 1]], dtype=torch.int32)
    """
    i = torch.arange(time, device=device).unsqueeze(1)
    j = torch.arange(time, device=device).unsqueeze(0)
    allowed = j <= i
    if n_support is not None and n_support < time:
        allowed = allowed & ((j < n_support) | (j == i))
    return allowed


class CausalConv1d(nn.Module):
    """Kernel-2 causal convolution with dilation ``d``: ``out[t] = W0 x[t - d] + W1 x[t] + b`` (zero before the start).

    The weight has ``nn.Conv1d``'s layout ``(out, in, 2)``; with ``n_support=None`` the output equals
    ``conv1d`` on the sequence left-padded by ``d``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        dilation: offset of the earlier tap.
    """

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__()
        if dilation < 1:
            raise ValueError(f"dilation={dilation} must be >= 1")
        self.dilation = dilation
        conv = nn.Conv1d(in_channels, out_channels, kernel_size=2)
        self.weight, self.bias = conv.weight, cast(nn.Parameter, conv.bias)  # Conv1d(bias=True) has one

    def forward(self, x: Tensor, n_support: int | None = None) -> Tensor:
        """``(batch, time, in) -> (batch, time, out)``."""
        src = _source_index(x.shape[1], self.dilation, n_support, x.device)  # (time,)
        past = x[:, src.clamp_min(0)] * (src >= 0).to(x.dtype).view(1, -1, 1)  # (batch, time, in)
        w = self.weight.to(x.dtype)
        return F.linear(past, w[..., 0]) + F.linear(x, w[..., 1], self.bias.to(x.dtype))


class DenseBlock(nn.Module):
    """``concat(x, tanh(conv_f(x)) * sigmoid(conv_g(x)))`` with causal dilated convs of ``filters`` channels.

    Args:
        in_channels: input channels.
        dilation: dilation of both convs.
        filters: channels added.
    """

    def __init__(self, in_channels: int, dilation: int, filters: int) -> None:
        super().__init__()
        self.conv_f = CausalConv1d(in_channels, filters, dilation)
        self.conv_g = CausalConv1d(in_channels, filters, dilation)
        self.out_channels = in_channels + filters

    def forward(self, x: Tensor, n_support: int | None = None) -> Tensor:
        """``(batch, time, in) -> (batch, time, in + filters)``."""
        a = torch.tanh(self.conv_f(x, n_support)) * torch.sigmoid(self.conv_g(x, n_support))
        return torch.cat([x, a], dim=-1)


class TCBlock(nn.Module):
    """``ceil(log2 seq_len)`` dense blocks with dilations 1, 2, 4, ... (see the module docstring).

    Args:
        in_channels: input channels.
        seq_len: length ``T`` of one sequence (support + one query).
        filters: channels added by each dense block.
    """

    def __init__(self, in_channels: int, seq_len: int, filters: int) -> None:
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} must be >= 2")
        blocks = []
        channels = in_channels
        for i in range(math.ceil(math.log2(seq_len))):
            blocks.append(DenseBlock(channels, 2**i, filters))
            channels = blocks[-1].out_channels
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = channels

    def forward(self, x: Tensor, n_support: int | None = None) -> Tensor:
        """``(batch, time, in) -> (batch, time, out_channels)``."""
        for block in self.blocks:
            x = block(x, n_support)
        return x


class AttentionBlock(nn.Module):
    """Causal single-head attention; appends the read values: ``concat(x, softmax_keys(q k^T / sqrt(k)) v)``.

    Args:
        in_channels: input channels.
        key_size: query/key size.
        value_size: channels added.
    """

    def __init__(self, in_channels: int, key_size: int, value_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(in_channels, key_size)
        self.key = nn.Linear(in_channels, key_size)
        self.value = nn.Linear(in_channels, value_size)
        self.scale = 1.0 / math.sqrt(key_size)
        self.out_channels = in_channels + value_size

    def forward(self, x: Tensor, n_support: int | None = None) -> Tensor:
        """``(batch, time, in) -> (batch, time, in + value_size)``."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        logits = q @ k.transpose(1, 2)  # (batch, time, time): query i, key j
        logits = (logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits) * self.scale
        mask = causal_mask(x.shape[1], n_support, x.device)
        probs = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # over keys
        return torch.cat([x, (probs.to(v.dtype) @ v)], dim=-1)


def snail_omniglot_embedding(in_channels: int = 1, image_size: int = 28, hidden: int = 64) -> Conv4:
    """SNAIL's Omniglot embedding: Conv4-64 (conv, BN with running statistics, ReLU, 2x2 max-pool) -> 64-d on 28x28."""
    return Conv4(
        None,
        in_channels=in_channels,
        hidden=hidden,
        downsample="maxpool",
        pooling="flatten",
        image_size=image_size,
        track_running_stats=True,
    )


class _ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [
                nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
            ]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(F.leaky_relu(self.body(x) + self.shortcut(x), 0.1))


class SNAILResNetEmbedding(nn.Module):
    """SNAIL's miniImageNet embedding: residual blocks (64, 96, 128, 256 channels; each 3 x [3x3 conv, BN,
    LeakyReLU(0.1)] + 1x1 shortcut, 2x2 max-pool), 1x1 conv to 2048, global average pool, 1x1 conv to 384.

    The 1x1 convs after pooling are linear maps. BN keeps running statistics (non-transductive).
    The reimplementation's ``Dropout(p=0.9)`` (docs/algorithms/snail.md) is left out.

    Args:
        in_channels: image channels.
        channels: channels of the residual blocks.
        hidden: width of the first 1x1 conv.
        out_dim: embedding size.

    Example:
        >>> SNAILResNetEmbedding(channels=(4, 4, 4, 4), hidden=8, out_dim=6)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 6])
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: tuple[int, ...] = (64, 96, 128, 256),
        hidden: int = 2048,
        out_dim: int = 384,
    ) -> None:
        super().__init__()
        blocks = []
        c = in_channels
        for width in channels:
            blocks.append(_ResidualBlock(c, width))
            c = width
        self.blocks = nn.Sequential(*blocks)
        self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU())
        self.project = nn.Linear(hidden, out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, C, H, W) -> (batch, out_dim)``."""
        h = self.expand(self.blocks(x)).mean(dim=(-2, -1))  # (batch, hidden)
        return self.project(h)
