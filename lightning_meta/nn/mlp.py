"""The fully connected regressor of MAML's sinusoid experiment (Finn et al. 2017, arXiv:1703.03400 §5.1): 1-40-40-1."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """``Linear -> ReLU`` hidden layers (``features``) followed by a linear ``head``. No batch norm.

    Args:
        in_features: input size.
        out_features: head size.
        hidden: hidden layer sizes.

    Example:
        >>> import torch
        >>> MLP()(torch.randn(10, 1)).shape
        torch.Size([10, 1])
    """

    def __init__(self, in_features: int = 1, out_features: int = 1, hidden: Sequence[int] = (40, 40)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.out_dim = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, in_features) -> (batch, out_features)``."""
        return self.head(self.features(x))
