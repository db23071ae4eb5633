"""CAML: Fast Context Adaptation via Meta-Learning (Zintgraf, Shiarlis, Kurin, Hofmann, Whiteson,
arXiv:1810.03642 v1, "CAML"; later versions and ICML 2019: CAVIA).

Per task, a context vector ``phi`` (an *input* of the network, not one of its parameters) starts at
zero and is adapted by ``S`` gradient steps on the support loss,
``phi <- phi - inner_lr * grad_phi L_support(phi, theta)``; the outer loop trains every network
parameter ``theta`` (the FiLM generator included) with Adam on the query loss at ``phi_S``. Second
order is cheap because ``phi`` is small; ``first_order=True`` treats the inner gradients as constants.

``phi`` never exists outside a task: it is created as zeros inside :meth:`CAML.adapt`, so it is not
a parameter, not a buffer, not in the ``state_dict`` and never seen by the outer optimizer.

As the CAVIA code (docs/algorithms/caml.md), the meta-gradient is clamped elementwise to
``[-meta_grad_clamp, meta_grad_clamp]`` (10) before the optimizer step; a Trainer
``gradient_clip_val`` replaces that default. Networks: :class:`~lightning_meta.nn.film.ContextMLP`
(regression, context concatenated to the input) and :class:`~lightning_meta.nn.film.ContextConv4`
(classification, FiLM after conv block 3).

Departures: the inner loss is the mean loss (as CAVIA); CAVIA's StepLR (x0.9 every 5000 steps) is not
built in (add a scheduler by subclassing ``configure_optimizers``); evaluation adapts first order.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.functional.adaptation import gradient_steps
from lightning_meta.functional.losses import default_inner_loss
from lightning_meta.functional.tasks import TaskMode
from lightning_meta.utils import check_no_running_stats

__all__ = ["CAML"]


class CAML(MetaLearner):
    """CAML/CAVIA over a context network ``backbone(x, context)`` with a ``context_dim`` attribute.

    Args:
        backbone: e.g. :class:`~lightning_meta.nn.film.ContextMLP` or :class:`~lightning_meta.nn.film.ContextConv4`.
        inner_lr: inner rate of the context (CAVIA: 1.0).
        inner_steps: inner steps in training (CAVIA: 1 regression, 2 classification).
        eval_inner_steps: inner steps at validation/test (``None``: ``inner_steps``).
        first_order: inner gradients as constants.
        meta_grad_clamp: elementwise clamp of the meta-gradient (``None``: no clamp).
        meta_lr: Adam learning rate of the outer loop.
        task_mode: ``"auto"``, ``"loop"`` or ``"vmap"`` (see :class:`MetaLearner`).
        task_chunk: tasks per backward chunk (``"auto"``: 1 in loop mode, all under vmap).
        inner_loss_scale: fp16 inner loss scale (``None``: dynamic).
        cuda_graphs: replay training steps as CUDA graphs on a GPU (see :class:`MetaLearner`).
        max_consecutive_skipped_steps: stop after this many non-finite (skipped) steps in a row.
        task_memory_budget: memory that ``task_mode="auto"`` may give the tasks of a batch: bytes, a fraction in
            (0, 1] of the free memory, or ``None`` for the device's default (see :class:`MetaLearner`).

    Example:
        >>> from lightning_meta.episode import Episode
        >>> from lightning_meta.nn.film import ContextMLP
        >>> caml = CAML(ContextMLP(), inner_lr=1.0)
        >>> x = torch.randn(3, 10, 1)
        >>> caml(Episode(x, x[..., 0], x, x[..., 0])).shape  # (tasks, queries, 1)
        torch.Size([3, 10, 1])
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        inner_lr: float = 1.0,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        meta_grad_clamp: float | None = 10.0,
        meta_lr: float = 1e-3,
        task_mode: TaskMode = "auto",
        task_chunk: int | Literal["auto"] | None = "auto",
        inner_loss_scale: float | None = None,
        cuda_graphs: bool = False,
        max_consecutive_skipped_steps: int | None = 100,
        task_memory_budget: float | None = None,
    ) -> None:
        super().__init__(
            meta_lr=meta_lr,
            task_mode=task_mode,
            task_chunk=task_chunk,
            inner_loss_scale=inner_loss_scale,
            cuda_graphs=cuda_graphs,
            max_consecutive_skipped_steps=max_consecutive_skipped_steps,
            task_memory_budget=task_memory_budget,
        )
        context_dim = getattr(backbone, "context_dim", None)
        if not isinstance(context_dim, int) or context_dim < 1:
            raise ValueError(
                f"CAML needs a context network with an integer context_dim >= 1, got {type(backbone).__name__} with "
                f"context_dim={context_dim!r}; use lightning_meta.nn.film.ContextMLP or ContextConv4"
            )
        if inner_steps < 0 or (eval_inner_steps is not None and eval_inner_steps < 0):
            raise ValueError(f"inner_steps={inner_steps}, eval_inner_steps={eval_inner_steps} must be >= 0")
        if meta_grad_clamp is not None and not meta_grad_clamp > 0:
            raise ValueError(f"meta_grad_clamp={meta_grad_clamp} must be > 0 (or None for no clamp)")
        check_no_running_stats(backbone, type(self).__name__)
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.context_dim = context_dim
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.first_order = first_order
        self.meta_grad_clamp = meta_grad_clamp

    def initial_context(self, reference: Tensor) -> Tensor:
        """The context every task starts from: zeros ``(context_dim,)`` in the parameters' dtype, on ``reference``'s device."""
        dtype = next(self.backbone.parameters()).dtype
        return torch.zeros(self.context_dim, device=reference.device, dtype=dtype)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> dict[str, Tensor]:
        """``{"context": phi_S}`` after ``inner_steps`` (training) or ``eval_inner_steps`` steps from zero."""
        loss_fn = default_inner_loss(support_y)

        def objective(fast: dict[str, Tensor]) -> Tensor:
            return loss_fn(self.backbone(support_x, fast["context"]), support_y)

        return gradient_steps(
            objective,
            {"context": self.initial_context(support_x)},
            steps=self.inner_steps if self.training else self.eval_inner_steps,
            lr=self.inner_lr,
            first_order=self.first_order or not self.training,
            loss_scale=self.inner_loss_scale,
        )

    def predict(self, state: dict[str, Tensor], query_x: Tensor) -> Tensor:
        """Query outputs with the adapted context."""
        return self.backbone(query_x, state["context"])  # (ways * queries, ways) or (queries, 1)

    @override
    def configure_gradient_clipping(
        self, optimizer: Optimizer, gradient_clip_val: Any = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clamp the meta-gradient to ``[-meta_grad_clamp, meta_grad_clamp]`` unless the Trainer clips."""
        if gradient_clip_val is None and self.meta_grad_clamp is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.meta_grad_clamp, gradient_clip_algorithm="value")
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
