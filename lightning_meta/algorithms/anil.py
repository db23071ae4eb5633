"""ANIL: Almost No Inner Loop (Raghu, Raghu, Bengio, Vinyals, ICLR 2020, arXiv:1909.09157).

MAML's objective with only the final linear head adapted in the inner loop; the body is updated by
the outer loop alone, and the outer gradient still reaches it through the head adaptation (second
order in the head). Body features are computed once per task and set (support, query), or with
``batch_features=True`` once per batch for all tasks together; the ``S`` inner steps then run on the
head alone, which is what makes ANIL cheap.

Departures: none in the algorithm. Batch norm in the body is transductive as in MAML (features of
support and query are computed by separate forward passes, per task).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.functional.adaptation import adapt, functional_forward
from lightning_meta.functional.losses import default_inner_loss
from lightning_meta.functional.tasks import TaskMode
from lightning_meta.utils import check_no_running_stats

__all__ = ["ANIL"]


class ANIL(MetaLearner):
    """ANIL over a backbone with ``features`` (body) and ``head`` submodules (every :mod:`lightning_meta.nn` backbone).

    Args:
        backbone: network whose ``body``/``head`` submodules are named by ``body``/``head`` below.
            Batch norm must not track running statistics.
        inner_lr: inner rate of the head (mean-reduced loss).
        inner_steps: inner steps in training.
        eval_inner_steps: inner steps at evaluation (``None``: ``inner_steps``).
        first_order: treat the head's inner gradients as constants.
        meta_lr: Adam learning rate of the outer loop.
        task_mode: ``"auto"``, ``"loop"`` or ``"vmap"`` (see :class:`MetaLearner`).
        task_chunk: tasks per backward chunk (``"auto"``: 1 in loop mode, all under vmap).
        inner_loss_scale: fp16 inner loss scale (``None``: dynamic).
        cuda_graphs: replay training steps as CUDA graphs on a GPU (see :class:`MetaLearner`).
        max_consecutive_skipped_steps: stop after this many non-finite (skipped) steps in a row.
        task_memory_budget: memory that ``task_mode="auto"`` may give the tasks of a batch: bytes, a fraction in
            (0, 1] of the free memory, or ``None`` for the device's default (see :class:`MetaLearner`).
        body: attribute name of the feature extractor.
        head: attribute name of the adapted head.
        batch_features: compute the body features of all tasks' support (and query) sets in one forward
            pass per batch instead of one per task. Faster in a loop; identical results for bodies without
            batch norm (with transductive BN, statistics then span the whole batch: not MAML-equivalent).

    Example:
        >>> import torch
        >>> from lightning_meta.episode import Episode
        >>> from lightning_meta.nn import MLP
        >>> anil = ANIL(MLP(4, 3, hidden=(8,)), inner_lr=0.5, inner_steps=5)
        >>> x, y = torch.randn(2, 6, 4), torch.tensor([[0, 1, 2] * 2] * 2)
        >>> anil(Episode(x, y, x, y)).shape
        torch.Size([2, 6, 3])
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        meta_lr: float = 1e-3,
        task_mode: TaskMode = "auto",
        task_chunk: int | Literal["auto"] | None = "auto",
        inner_loss_scale: float | None = None,
        cuda_graphs: bool = False,
        max_consecutive_skipped_steps: int | None = 100,
        task_memory_budget: float | None = None,
        body: str = "features",
        head: str = "head",
        batch_features: bool = False,
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
        for attr in (body, head):
            if not isinstance(getattr(backbone, attr, None), nn.Module):
                raise ValueError(
                    f"ANIL needs the backbone's body and head as submodules; {type(backbone).__name__} has no "
                    f"submodule {attr!r}; pass body=/head= names, or use a lightning_meta.nn backbone (features/head)"
                )
        if inner_steps < 0 or (eval_inner_steps is not None and eval_inner_steps < 0):
            raise ValueError(f"inner_steps={inner_steps}, eval_inner_steps={eval_inner_steps} must be >= 0")
        check_no_running_stats(backbone, type(self).__name__)
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.first_order = first_order
        self.body_name, self.head_name = body, head
        self.batch_features = batch_features

    @property
    def body(self) -> nn.Module:
        """The feature extractor (outer loop only)."""
        return getattr(self.backbone, self.body_name)

    @property
    def head(self) -> nn.Module:
        """The adapted head."""
        return getattr(self.backbone, self.head_name)

    def forward_tasks(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Per-task body + head adaptation, or (``batch_features``) one body pass per batch, then per-task heads."""
        if not self.batch_features:
            return super().forward_tasks(support_x, support_y, query_x)
        tasks = support_x.shape[0]
        support = self.body(support_x.flatten(0, 1)).view(tasks, support_x.shape[1], -1)  # (tasks, shots*ways, dim)
        query = self.body(query_x.flatten(0, 1)).view(tasks, query_x.shape[1], -1)
        return self.run_tasks(self.adapt_head, self.predict_head, support, support_y, query)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> dict[str, Tensor]:
        """Fast head weights after the inner steps on the support features (computed once)."""
        return self.adapt_head(self.body(support_x), support_y)  # features: (ways * shots, feature_dim)

    def adapt_head(self, features: Tensor, support_y: Tensor) -> dict[str, Tensor]:
        """Fast head weights after the inner steps on precomputed support features."""
        fast: dict[str, Tensor] = dict(self.head.named_parameters())
        if not self.training:
            fast = {n: p.detach() for n, p in fast.items()}
            features = features.detach()
        return adapt(
            self.head,
            fast,
            features,
            support_y,
            steps=self.inner_steps if self.training else self.eval_inner_steps,
            lr=self.inner_lr,
            first_order=self.first_order or not self.training,
            loss_fn=default_inner_loss(support_y),
            loss_scale=self.inner_loss_scale,
        )

    def predict(self, state: dict[str, Tensor], query_x: Tensor) -> Tensor:
        """Adapted head on the query features."""
        return self.predict_head(state, self.body(query_x))

    def predict_head(self, state: dict[str, Tensor], features: Tensor) -> Tensor:
        """Adapted head on precomputed query features."""
        return functional_forward(self.head, state, features)  # (ways * queries, ways)

    def vmap_unsafe_reason(self) -> str | None:
        """None: only the head is differentiated twice, so fused batch norm in the body is vmap-safe."""
        return None
