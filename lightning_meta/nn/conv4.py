"""Conv4 backbones of MAML (Finn et al., ICML 2017, arXiv:1703.03400) and Prototypical Networks
(Snell et al., NeurIPS 2017, arXiv:1703.05175); see docs/guide/backbones.md.

Every backbone in :mod:`lightning_meta.nn` is ``head(features(x))`` with two submodules named
``features`` and ``head`` so that ANIL can adapt the head alone; ``head`` is ``nn.Identity`` when the
backbone is an embedding (ProtoNets).

Departures: batch norm has a learned scale and offset (cbfinn's TF batch norm has no scale), and
weights are Xavier-uniform with zero biases throughout (cbfinn draws the Omniglot output layer from
N(0, 1)).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_meta.functional.adaptation import is_inside_vmap
from lightning_meta.nn.norm import TaskBatchNorm
from lightning_meta.nn.pool import LeanMaxPool2d, batch_norm_max_pool2d, fused_batch_norm_max_pool_applies

__all__ = ["Conv4", "conv4_maml_mini_imagenet", "conv4_maml_omniglot", "conv4_protonet"]


class Conv4(nn.Module):
    """Four ``3x3 conv -> BN -> ReLU`` blocks, downsampled by stride 2 or by 2x2 max-pooling, then a linear head.

    With max-pooling the block runs as ``conv -> BN -> max-pool -> ReLU``: the same function as the papers'
    ``conv -> BN -> ReLU -> max-pool`` (ReLU is monotone, so it commutes with the max), with a quarter of
    the ReLU work; the parameter names (``features.0``, ``features.1``, ``features.4``, ...) are unchanged.
    The pool is :class:`~lightning_meta.nn.LeanMaxPool2d`, which keeps only its indices for the backward pass,
    and ``forward`` runs each ``TaskBatchNorm -> LeanMaxPool2d`` pair as one op
    (:func:`~lightning_meta.nn.pool.batch_norm_max_pool2d`) whose backward needs one full-resolution
    buffer less (same function and gradients, second order included; ``self.features(x)`` alone runs
    the modules one by one).

    Batch norm: with ``track_running_stats=False`` (the default, the MAML family) it is
    :class:`~lightning_meta.nn.TaskBatchNorm`, which always normalises with the statistics of the batch
    it is given, in training and evaluation alike, so evaluation is transductive (docs/guide/backbones.md)
    and the module can be vmapped over tasks, second order included. Pass ``True`` for ProtoNet-style
    ``nn.BatchNorm2d`` with running statistics (non-transductive; not vmappable).

    Args:
        out_features: size of the linear head (the number of ways); ``None`` for no head (an embedding).
        in_channels: image channels.
        hidden: filters per conv layer.
        downsample: ``"stride"`` (MAML Omniglot: stride-2 convs, no pooling) or ``"maxpool"``
            (stride-1 convs, each followed by a 2x2 max-pool with floor rounding).
        pooling: ``"mean"`` (spatial mean -> ``hidden`` features) or ``"flatten"``
            (``hidden * side**2`` features; needs ``image_size``).
        image_size: input side, needed only for ``pooling="flatten"``.
        track_running_stats: see above.
        channels_last: run the convolutions on channels-last (NHWC) activations. ``None`` (default): on CPU,
            where PyTorch's oneDNN convolutions and batch norm are faster in that layout (docs/bench/conv4.md),
            and not inside lightning-meta's vmap path. Outputs and parameters are the same either way (the
            input is only re-strided); ``False`` keeps PyTorch's default NCHW layout.
        lean_ops: run the max-pool blocks as :class:`~lightning_meta.nn.LeanMaxPool2d` and the fused batch norm +
            max-pool (less memory per block; same function and gradients). ``None`` (default): on CPU only, where
            they are also faster; ``True``: on every device (on a GPU they save memory but launch more kernels:
            pair them with ``cuda_graphs=True`` in the meta-learner); ``False``: PyTorch's ops everywhere.

    Example:
        >>> net = Conv4(5)
        >>> net(torch.randn(3, 1, 28, 28)).shape
        torch.Size([3, 5])
    """

    def __init__(
        self,
        out_features: int | None = 5,
        *,
        in_channels: int = 1,
        hidden: int = 64,
        downsample: Literal["stride", "maxpool"] = "stride",
        pooling: Literal["mean", "flatten"] = "mean",
        image_size: int | None = None,
        track_running_stats: bool = False,
        channels_last: bool | None = None,
        lean_ops: bool | None = None,
    ) -> None:
        super().__init__()
        if lean_ops not in (None, True, False):
            raise ValueError(f"lean_ops={lean_ops!r}; use None (automatic: on CPU), True or False")
        if downsample not in ("stride", "maxpool"):
            raise ValueError(f"downsample={downsample!r}; use 'stride' or 'maxpool'")
        if pooling not in ("mean", "flatten"):
            raise ValueError(f"pooling={pooling!r}; use 'mean' or 'flatten'")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            stride = 2 if downsample == "stride" else 1
            layers += [
                nn.Conv2d(channels, hidden, 3, stride=stride, padding=1),
                nn.BatchNorm2d(hidden) if track_running_stats else TaskBatchNorm(hidden),
            ]
            # max(relu(a), relu(b)) == relu(max(a, b)) exactly, so pooling before the ReLU computes the same
            # function as conv -> BN -> ReLU -> pool while the ReLU (and its backward) touch a quarter of the values.
            pool = nn.MaxPool2d(2) if lean_ops is False else LeanMaxPool2d(2, any_device=bool(lean_ops))
            layers += [pool, nn.ReLU()] if downsample == "maxpool" else [nn.ReLU()]
            channels = hidden
        if pooling == "mean":
            layers.append(_SpatialMean())
            self.out_dim = hidden
        else:
            if image_size is None:
                raise ValueError("pooling='flatten' needs image_size (the input side, e.g. 84) to size the head")
            side = image_size
            for _ in range(4):
                side = (side + 1) // 2 if downsample == "stride" else side // 2
            if side < 1:
                raise ValueError(f"image_size={image_size} is too small for four downsamplings")
            layers.append(nn.Flatten())
            self.out_dim = hidden * side * side
        if channels_last not in (None, True, False):
            raise ValueError(f"channels_last={channels_last!r}; use None (automatic: on CPU), True or False")
        self.channels_last = channels_last
        self.lean_ops = lean_ops
        self.features = nn.Sequential(*layers)
        self.head: nn.Module = nn.Identity() if out_features is None else nn.Linear(self.out_dim, out_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform conv/linear weights, zero biases, unit BN scale."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, C, H, W) -> (batch, out_features)`` (or ``(batch, out_dim)`` without a head)."""
        if (
            x.dim() == 4
            and not is_inside_vmap()
            and (self.channels_last or (self.channels_last is None and x.device.type == "cpu"))
        ):
            # `.to` re-strides even a 1-channel input, which `.contiguous(memory_format=...)` would return as it is
            # (contiguous in both layouts by PyTorch's test); the convolution picks its layout from the strides.
            x = x.to(memory_format=torch.channels_last)
        layers = list(self.features)
        i = 0
        while i < len(layers):
            layer = layers[i]
            pool = layers[i + 1] if i + 1 < len(layers) else None
            if (
                type(layer) is TaskBatchNorm
                and layer.affine
                and type(pool) is LeanMaxPool2d  # (nn.MaxPool2d with lean_ops=False)
                # checked on the layer's own input: under autocast the convolution before it returns half precision
                and fused_batch_norm_max_pool_applies(x, any_device=pool.any_device)
            ):
                x = batch_norm_max_pool2d(x, layer.weight, layer.bias, layer.eps, pool.kernel_size, True)
                i += 2
            else:
                x = layer(x)
                i += 1
        return self.head(x)


class _SpatialMean(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1))


def conv4_maml_omniglot(ways: int = 5, in_channels: int = 1) -> Conv4:
    """MAML's Omniglot net: 64 filters, stride 2, spatial mean (28 -> 2x2 -> 64-d), transductive BN."""
    return Conv4(ways, in_channels=in_channels, hidden=64, downsample="stride", pooling="mean")


def conv4_maml_mini_imagenet(ways: int = 5, in_channels: int = 3, image_size: int = 84) -> Conv4:
    """MAML's miniImageNet net: 32 filters, max-pool, flatten (84 -> 5x5x32 = 800-d), transductive BN."""
    return Conv4(
        ways, in_channels=in_channels, hidden=32, downsample="maxpool", pooling="flatten", image_size=image_size
    )


def conv4_protonet(in_channels: int = 1, image_size: int = 28, hidden: int = 64) -> Conv4:
    """ProtoNets' Conv4-64 embedding (64-d on 28x28, 1600-d on 84x84), BN with running statistics, no head."""
    return Conv4(
        None,
        in_channels=in_channels,
        hidden=hidden,
        downsample="maxpool",
        pooling="flatten",
        image_size=image_size,
        track_running_stats=True,
    )
