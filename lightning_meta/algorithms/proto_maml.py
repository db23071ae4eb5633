"""Proto-MAML (Triantafillou, Zhu, Dumoulin, Lamblin, Evci, Xu, Goroshin, Gelada, Swersky, Manzagol, Larochelle,
"Meta-Dataset", ICLR 2020, arXiv:1903.03096, §3).

MAML over an embedding network whose linear classifier is not meta-learned but built per task from the
Prototypical Networks prototypes ``c_k`` (mean support embedding of class ``k``): ``W_k = 2 c_k``,
``b_k = -||c_k||^2``. Its logits ``2 c_k.e - ||c_k||^2 = -||e - c_k||^2 + ||e||^2`` differ from ProtoNets'
squared-Euclidean logits by a per-example constant, so before any inner step Proto-MAML predicts exactly what
ProtoNets predicts. Then ``inner_steps`` gradient steps on the support cross-entropy fine-tune the head and the
body (MAML); the query loss at the fine-tuned weights is the outer loss. The head initialisation is a function of
the body's weights, and the outer gradient flows through it into the body (also in first order: only the inner
gradients are constants there).

Defaults follow the paper's Proto-MAML configuration (the Meta-Dataset code's ``maml_init_with_proto_config.gin``):
first order, ``inner_lr=0.01`` on the mean cross-entropy (the code's loss is a mean too, so no rescaling),
5 inner steps in training and none extra at evaluation, batch-norm scales and offsets not adapted.

Departures from the paper:

* batch norm is transductive (each forward pass normalises with its own batch statistics, as the MAML family
  here), where the paper's code normalises the query set with the support set's statistics;
* the outer optimizer is plain Adam (``meta_lr``); the paper tuned the learning rate, its decay and a weight
  decay per setting (set them with LightningCLI's ``optimizer``/``lr_scheduler`` or ``configure_optimizers``);
* the inner gradients are partial derivatives with respect to the head and the body as separate tensors at every
  step; the paper's code takes its first step's body gradient through the prototype head as well (TensorFlow's
  ``tf.gradients`` follows every path from the body's weights), a difference confined to that one step;
* ``adapt_body=False`` (head only, as ANIL) and ``first_order=False`` (second order) are options, not in the paper.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.algorithms.maml import adaptable_parameters
from lightning_meta.functional import TaskMode, functional_forward, gradient_steps, is_inside_vmap

__all__ = ["ProtoMAML", "prototype_head"]

#: Keys of the per-task head in the fast-weight dicts (kept apart from the backbone's parameter names).
HEAD_WEIGHT, HEAD_BIAS = "proto_head.weight", "proto_head.bias"


def prototype_head(support: Tensor, support_y: Tensor, ways: int) -> tuple[Tensor, Tensor]:
    """The Proto-MAML head of one task: ``W_k = 2 c_k``, ``b_k = -||c_k||^2`` from the class prototypes ``c_k``.

    Works under ``torch.func.vmap`` (no data-dependent shapes).

    Args:
        support: ``(support, dim)`` support embeddings.
        support_y: ``(support,)`` labels in ``0..ways-1``.
        ways: number of classes.

    Returns:
        ``weight (ways, dim)`` and ``bias (ways,)``, differentiable with respect to ``support``.

    Example:
        >>> w, b = prototype_head(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0, 1]), 2)
        >>> w, b
        (tensor([[4., 0.],
                [0., 4.]]), tensor([-4., -4.]))
    """
    onehot = (support_y.unsqueeze(-1) == torch.arange(ways, device=support_y.device)).to(support.dtype)
    counts = onehot.sum(0).clamp_min(1).unsqueeze(-1)  # (ways, 1)
    prototypes = onehot.T @ support / counts  # (ways, dim)
    return 2 * prototypes, -(prototypes**2).sum(-1)


class ProtoMAML(MetaLearner):
    """Proto-MAML over an embedding backbone.

    Args:
        backbone: embedding ``(examples, *x_shape) -> (examples, dim)``, e.g. ``lightning_meta.nn.Conv4(None)``.
            Batch norm inside it must not track running statistics (transductive, as in MAML).
        inner_lr: inner rate on the mean support cross-entropy.
        inner_steps: inner steps in training.
        eval_inner_steps: inner steps at validation/test (``None``: ``inner_steps``, as the paper).
        first_order: first-order MAML (the paper); ``False`` differentiates through the inner gradients.
        adapt_body: fine-tune the backbone in the inner loop too (the paper); ``False`` adapts the head only.
        adapt_norm: also adapt the backbone's normalisation scales and offsets (off in the paper).
        meta_lr: Adam learning rate of the outer loop.
        task_mode: ``"auto"``, ``"loop"`` or ``"vmap"`` (see :class:`MetaLearner`).
        task_chunk: tasks per backward chunk (``None``: all at once; ``"auto"``: 1 in loop mode, all under vmap).
        inner_loss_scale: fp16 inner loss scale (``None``: dynamic).
        cuda_graphs: replay training steps as CUDA graphs on a GPU (see :class:`MetaLearner`).
        max_consecutive_skipped_steps: stop after this many non-finite (skipped) steps in a row.
        task_memory_budget: memory that ``task_mode="auto"`` may give the tasks of a batch: bytes, a fraction in
            (0, 1] of the free memory, or ``None`` for the device's default (see :class:`MetaLearner`).

    Example:
        >>> from lightning_meta.episode import Episode
        >>> net = ProtoMAML(nn.Linear(4, 8), inner_steps=2, task_mode="loop")
        >>> x, y = torch.randn(2, 6, 4), torch.tensor([[0, 1, 2] * 2] * 2)
        >>> net(Episode(x, y, x, y)).shape  # (tasks, queries, ways)
        torch.Size([2, 6, 3])
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        first_order: bool = True,
        adapt_body: bool = True,
        adapt_norm: bool = False,
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
        if inner_steps < 0:
            raise ValueError(f"inner_steps={inner_steps} must be >= 0")
        if eval_inner_steps is not None and eval_inner_steps < 0:
            raise ValueError(f"eval_inner_steps={eval_inner_steps} must be >= 0 (or None for inner_steps)")
        for name, m in backbone.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                raise ValueError(
                    f"ProtoMAML: batch norm '{name}' tracks running statistics, which every inner-loop forward would "
                    "overwrite (and which cannot be vmapped); build it with track_running_stats=False, e.g. "
                    "lightning_meta.nn.Conv4(None, ...)"
                )
        clash = [n for n, _ in backbone.named_parameters() if n in (HEAD_WEIGHT, HEAD_BIAS)]
        if clash:
            raise ValueError(
                f"the backbone has parameters named {clash}, which ProtoMAML uses for its head; rename them"
            )
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.first_order = first_order
        self.adapt_body = adapt_body
        self.adapt_names = adaptable_parameters(backbone, adapt_norm) if adapt_body else []

    def forward_tasks(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Per-task ``predict(adapt(...))`` with the number of ways read once for the batch (outside vmap)."""
        if support_y.is_floating_point():
            raise ValueError("ProtoMAML is a classifier; got float (regression) targets")
        ways = int(support_y.max()) + 1
        return self.run_tasks(functools.partial(self.adapt, ways=ways), self.predict, support_x, support_y, query_x)

    def embed(self, body: dict[str, Tensor], x: Tensor) -> Tensor:
        """Backbone embeddings ``(examples, dim)`` with the (adapted) body tensors ``body``."""
        return functional_forward(self.backbone, body, x).flatten(1)

    def initial_head(self, support_x: Tensor, support_y: Tensor, ways: int | None = None) -> tuple[Tensor, Tensor]:
        """The prototype head ``(W, b)`` of one task from the backbone's own weights (before any inner step).

        ``ways=None`` reads the number of classes from ``support_y``. Inside vmap, where that cannot be done, the
        head gets one row per support example instead, and the rows of labels absent from the support set get
        the lowest float as bias: their logits are then the lowest float, so they take no probability and no
        gradient, and the loss, the predictions and the gradients equal those of the exact head.
        """
        support = self.backbone(support_x).flatten(1)
        if ways is not None or not is_inside_vmap():
            return prototype_head(support, support_y, int(support_y.max()) + 1 if ways is None else ways)
        rows = support_y.shape[0]
        weight, bias = prototype_head(support, support_y, rows)
        present = (support_y.unsqueeze(-1) == torch.arange(rows, device=support_y.device)).any(0)
        return weight, bias.masked_fill(~present, torch.finfo(bias.dtype).min)

    def adapt(self, support_x: Tensor, support_y: Tensor, ways: int | None = None) -> dict[str, Tensor]:
        """Fast weights of one task (adapted body tensors and the head) after the inner steps.

        ``ways`` sizes the head; ``None`` reads it from ``support_y`` (see :meth:`initial_head` for vmap).
        """
        weight, bias = self.initial_head(support_x, support_y, ways)
        params = dict(self.backbone.named_parameters())
        # The head is a function of the body's weights. The inner gradient with respect to the body must be the
        # partial derivative (head and body are separate fast weights), not the total one through the head: the
        # inner loop differentiates with respect to a view of each body tensor, which the head was not built from.
        fast = {**{n: params[n].view_as(params[n]) for n in self.adapt_names}, HEAD_WEIGHT: weight, HEAD_BIAS: bias}
        if not self.training:
            fast = {n: t.detach() for n, t in fast.items()}

        def support_loss(f: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(self.logits(f, support_x), support_y)

        return gradient_steps(
            support_loss,
            fast,
            steps=self.inner_steps if self.training else self.eval_inner_steps,
            lr=self.inner_lr,
            first_order=self.first_order or not self.training,
            loss_scale=self.inner_loss_scale,
        )

    def logits(self, fast: dict[str, Tensor], x: Tensor) -> Tensor:
        """``(examples, ways)`` logits of the head in ``fast`` on the embeddings of ``x``."""
        body = {n: t for n, t in fast.items() if n not in (HEAD_WEIGHT, HEAD_BIAS)}
        return F.linear(self.embed(body, x), fast[HEAD_WEIGHT], fast[HEAD_BIAS])

    def predict(self, state: dict[str, Tensor], query_x: Tensor) -> Tensor:
        """Query logits with the fast weights ``state``."""
        return self.logits(state, query_x)  # (ways * queries, ways)
