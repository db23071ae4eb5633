"""Meta-SGD: Learning to Learn Quickly for Few-Shot Learning (Li, Zhou, Chen, Li, 2017, arXiv:1707.09835).

``theta' = theta - alpha * grad L_support(theta)`` with ``alpha`` a learned tensor of the same shape as
``theta`` (per element), meta-learned with ``theta`` by the outer optimizer; entries may turn negative.

Initialisation: ``alpha`` starts at a constant (``inner_lr_init``, as learn2learn) by default; the paper
draws it at random (range unverified, docs/algorithms/meta_sgd.md), which ``inner_lr_init_range=(low, high)`` does,
uniformly per element. Departure: several inner steps are allowed (the paper uses one).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_meta.algorithms.maml import MAML
from lightning_meta.functional.tasks import TaskMode

__all__ = ["MetaSGD"]


def _key(name: str) -> str:
    return name.replace(".", "__")


class MetaSGD(MAML):
    """Meta-SGD: MAML with learned per-element inner rates.

    The rates live in ``self.inner_lrs``, a ``ParameterDict`` mirroring the adapted entries of
    ``backbone.named_parameters()`` (dots become ``"__"``), so the default outer optimizer (and any
    LightningCLI optimizer over ``self.parameters()``) trains them.

    Args:
        backbone: the network (batch norm without running statistics).
        inner_lr_init: initial value of every rate (when ``inner_lr_init_range`` is ``None``).
        inner_lr_init_range: ``(low, high)``: draw every rate uniformly from ``[low, high)`` instead (the
            paper's random initialisation; e.g. ``(0.005, 0.1)``), from the global torch RNG.
        inner_steps: inner steps in training.
        eval_inner_steps: inner steps at evaluation (``None``: ``inner_steps``).
        first_order: treat inner gradients as constants (the rates then still get gradients).
        adapt_norm: also adapt (and learn rates for) normalisation parameters.
        meta_lr: Adam learning rate of the outer loop (weights and rates).
        task_mode: ``"auto"``, ``"loop"`` or ``"vmap"``.
        task_chunk: tasks per backward chunk (``"auto"``: 1 in loop mode, all under vmap).
        inner_loss_scale: fp16 inner loss scale (``None``: dynamic).
        cuda_graphs: replay training steps as CUDA graphs on a GPU (see :class:`MetaLearner`).
        max_consecutive_skipped_steps: stop after this many non-finite (skipped) steps in a row.
        task_memory_budget: memory that ``task_mode="auto"`` may give the tasks of a batch: bytes, a fraction in
            (0, 1] of the free memory, or ``None`` for the device's default (see :class:`MetaLearner`).

    Example:
        >>> from lightning_meta.nn import MLP
        >>> m = MetaSGD(MLP(), inner_lr_init=0.01)
        >>> sorted(m.inner_lrs)[:2], m.inner_lrs["head__bias"]
        (['features__0__bias', 'features__0__weight'], Parameter containing:
        tensor([0.0100], requires_grad=True))
    """

    _hparams_ignore = ("inner_lr",)  # MAML's argument, set from inner_lr_init

    def __init__(
        self,
        backbone: nn.Module,
        *,
        inner_lr_init: float = 0.01,
        inner_lr_init_range: tuple[float, float] | None = None,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        adapt_norm: bool = True,
        meta_lr: float = 1e-3,
        task_mode: TaskMode = "auto",
        task_chunk: int | Literal["auto"] | None = "auto",
        inner_loss_scale: float | None = None,
        cuda_graphs: bool = False,
        max_consecutive_skipped_steps: int | None = 100,
        task_memory_budget: float | None = None,
    ) -> None:
        super().__init__(
            backbone,
            inner_lr=inner_lr_init,
            inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps,
            first_order=first_order,
            adapt_norm=adapt_norm,
            meta_lr=meta_lr,
            task_mode=task_mode,
            task_chunk=task_chunk,
            inner_loss_scale=inner_loss_scale,
            cuda_graphs=cuda_graphs,
            max_consecutive_skipped_steps=max_consecutive_skipped_steps,
            task_memory_budget=task_memory_budget,
        )
        if inner_lr_init_range is not None:
            low, high = (float(v) for v in inner_lr_init_range)
            if not low < high:
                raise ValueError(f"inner_lr_init_range={inner_lr_init_range}: needs low < high, e.g. (0.005, 0.1)")
        params = dict(backbone.named_parameters())
        rates = {}
        for n in self.adapt_names:
            rate = torch.empty_like(params[n], requires_grad=False)
            if inner_lr_init_range is None:
                rate.fill_(inner_lr_init)
            else:
                rate.uniform_(low, high)
            rates[_key(n)] = nn.Parameter(rate)
        self.inner_lrs = nn.ParameterDict(rates)

    def inner_rates(self) -> dict[str, Tensor]:
        """Per-element rates keyed by parameter name (detached at evaluation)."""
        rates = {n: self.inner_lrs[_key(n)] for n in self.adapt_names}
        return rates if self.training else {n: r.detach() for n, r in rates.items()}
