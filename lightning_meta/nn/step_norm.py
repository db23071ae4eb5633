"""Batch norm with one set of affine parameters and/or running statistics per inner step (MAML++'s BNWB and BNRS).

Antoniou, Edwards, Storkey, "How to train your MAML", ICLR 2019 (arXiv:1810.09502): the network is run at inner
step ``s`` with the scale/offset (and running statistics) of row ``s``. The learner selects the row with
:func:`set_norm_step` before every forward of that step (support forward and the query forward after it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.functional.adaptation import is_inside_vmap

__all__ = ["StepBatchNorm", "convert_to_step_batchnorm", "set_norm_step"]


class StepBatchNorm(nn.Module):
    """Batch norm whose scale/offset and running statistics are indexed by the current inner step ``step``.

    Args:
        num_features: channels (dim 1 of the input).
        steps: rows (inner steps) of per-step tensors.
        per_step_affine: ``weight``/``bias`` have shape ``(steps, C)`` (one per step) instead of ``(C,)``.
        per_step_stats: keep running mean/variance ``(steps, C)`` per step, updated in training (momentum
            ``momentum``) and used at evaluation; without it every batch is normalised with its own statistics
            (transductive), in training and at evaluation.
        eps: added to the variance.
        momentum: running-statistics momentum.

    Example:
        >>> bn = StepBatchNorm(3, steps=2)
        >>> bn.weight.shape, bn.running_mean.shape
        (torch.Size([2, 3]), torch.Size([2, 3]))
        >>> bn.step = 1
        >>> bn(torch.randn(4, 3, 5, 5)).shape
        torch.Size([4, 3, 5, 5])
    """

    running_mean: Tensor  # buffers (steps, num_features), registered when per_step_stats
    running_var: Tensor

    def __init__(
        self,
        num_features: int,
        steps: int,
        *,
        per_step_affine: bool = True,
        per_step_stats: bool = True,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        self.num_features, self.steps, self.eps, self.momentum = num_features, steps, eps, momentum
        self.per_step_affine, self.per_step_stats = per_step_affine, per_step_stats
        shape = (steps, num_features) if per_step_affine else (num_features,)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        if per_step_stats:
            self.register_buffer("running_mean", torch.zeros(steps, num_features))
            self.register_buffer("running_var", torch.ones(steps, num_features))
        #: the inner step whose row the next forward uses (set by :func:`set_norm_step`)
        self.step = 0

    def forward(self, x: Tensor) -> Tensor:
        if not 0 <= self.step < self.steps:
            raise IndexError(
                f"StepBatchNorm has {self.steps} per-step rows but inner step {self.step} was requested; build the "
                "learner with at least as many steps as it adapts for (inner_steps and eval_inner_steps)"
            )
        weight = self.weight[self.step] if self.per_step_affine else self.weight
        bias = self.bias[self.step] if self.per_step_affine else self.bias
        if self.per_step_stats:
            mean, var = self.running_mean[self.step], self.running_var[self.step]
            # in training the views are updated in place (the rows of the buffers); at evaluation they are used
            return F.batch_norm(x, mean, var, weight, bias, self.training, self.momentum, self.eps)
        if not is_inside_vmap() and x.dtype in (torch.float32, torch.float64):
            return F.batch_norm(x, None, None, weight, bias, training=True, momentum=0.0, eps=self.eps)
        # primitive ops: correct second-order gradients under vmap, fp32 statistics for half inputs
        dims = [0, *range(2, x.dim())]
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = (xf - xf.mean(dims, keepdim=True)) * torch.rsqrt(xf.var(dims, keepdim=True, unbiased=False) + self.eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (y * weight.view(shape) + bias.view(shape)).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, steps={self.steps}, per_step_affine={self.per_step_affine}, "
            f"per_step_stats={self.per_step_stats}, eps={self.eps}, momentum={self.momentum}"
        )


def convert_to_step_batchnorm(
    module: nn.Module, steps: int, *, per_step_affine: bool = True, per_step_stats: bool = True
) -> nn.Module:
    """Replace (in place) every affine ``BatchNorm*d`` without running statistics (``TaskBatchNorm`` included) in
    ``module`` by a :class:`StepBatchNorm` whose rows all start from its scale/offset. Returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not child.track_running_stats:
            if not child.affine:
                raise ValueError(f"batch norm '{name}' has no affine parameters; StepBatchNorm needs them")
            new = StepBatchNorm(
                child.num_features, steps, per_step_affine=per_step_affine, per_step_stats=per_step_stats,
                eps=child.eps, momentum=0.1 if child.momentum is None else child.momentum,
            )  # fmt: skip
            new.to(device=child.weight.device, dtype=child.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(child.weight.expand_as(new.weight))
                new.bias.copy_(child.bias.expand_as(new.bias))
            setattr(module, name, new)
        else:
            convert_to_step_batchnorm(child, steps, per_step_affine=per_step_affine, per_step_stats=per_step_stats)
    return module


def set_norm_step(module: nn.Module, step: int) -> None:
    """Make every :class:`StepBatchNorm` inside ``module`` use the rows of inner step ``step``."""
    for m in module.modules():
        if isinstance(m, StepBatchNorm):
            m.step = step
