"""MAML++: How to train your MAML (Antoniou, Edwards, Storkey, ICLR 2019, arXiv:1810.09502).

MAML (:class:`~lightning_meta.algorithms.MAML`) with the paper's fixes, each a switch:

* **MSL**, multi-step loss (``multi_step_loss``): the outer loss is ``sum_s w_s * L_query(theta'_s)`` over the
  query losses after every inner step ``s = 1..S``, with importance weights that start uniform and are annealed
  towards the last step over ``multi_step_loss_epochs`` epochs (:func:`per_step_loss_weights`, the schedule of
  the authors' code); after that only the last step's loss counts (plain MAML's objective).
* **LSLR**, per-layer per-step learned inner rates (``learnable_inner_rates``): one rate per adapted tensor and
  inner step, initialised to ``inner_lr``, in ``self.inner_lrs`` (trained by the outer optimizer).
* **BNWB / BNRS**, per-step batch-norm weights and biases (``per_step_bn_weights``) and per-step running statistics
  (``per_step_bn_stats``): every batch norm of the backbone becomes a
  :class:`~lightning_meta.nn.StepBatchNorm` whose row ``s`` is used at inner step ``s`` (the support forward of
  step ``s`` and the query forward after it).
* **DA**, derivative-order annealing (``first_order_epochs``): first-order meta-gradients for the first epochs,
  second order afterwards.
* **CA**, cosine annealing of the meta learning rate (``cosine_annealing``): from ``meta_lr`` to ``min_meta_lr``
  over ``total_epochs`` epochs, stepped once per epoch.

An *epoch* is ``iterations_per_epoch`` optimizer steps (500 in the paper), counted from ``global_step``, whatever
the datamodule's epoch length. Defaults are the paper's/authors' code: 5 inner steps, inner rate 0.1 (mean
cross-entropy, as here), MSL over 10 epochs, first order for 50 epochs, Adam 1e-3 annealed to 1e-5 over 150
epochs, batch-norm parameters meta-learned but not adapted in the inner loop.

With every switch off this is exactly MAML with the same ``inner_lr``, ``inner_steps`` and ``adapt_norm``.

Departures from the paper:

* per-step running statistics are *used* at evaluation (non-transductive batch norm, the paper's description);
  the authors' code collects them but still normalises with batch statistics;
* per-step batch-norm parameters are never adapted in the inner loop (as the authors' code by default);
* the multi-step loss is logged as ``train/loss`` while it is active (the annealed weighted sum).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from lightning_meta.algorithms.maml import MAML
from lightning_meta.functional.adaptation import StepLearningRates, adapt, functional_forward
from lightning_meta.functional.losses import default_inner_loss
from lightning_meta.functional.tasks import TaskMode
from lightning_meta.nn.step_norm import (
    StepBatchNorm,
    convert_to_step_batchnorm,
    set_norm_step,
)

__all__ = ["MAMLPlusPlus", "per_step_loss_weights"]


def per_step_loss_weights(steps: int, epoch: int, multi_step_loss_epochs: int) -> list[float]:
    """MSL importance of the query loss after each of ``steps`` inner steps at ``epoch``.

    Uniform ``1/S`` at epoch 0; every non-final weight then decays by ``1/(S * multi_step_loss_epochs)`` per epoch
    down to ``0.03/S``, and the final weight grows by what they lose, up to ``1 - (S-1) * 0.03/S``. The weights
    always sum to 1.

    Example:
        >>> [round(w, 3) for w in per_step_loss_weights(5, epoch=5, multi_step_loss_epochs=10)]
        [0.1, 0.1, 0.1, 0.1, 0.6]
    """
    if steps < 1 or multi_step_loss_epochs < 1:
        raise ValueError(f"steps={steps} and multi_step_loss_epochs={multi_step_loss_epochs} must be >= 1")
    weights = [1.0 / steps] * steps
    decay = 1.0 / steps / multi_step_loss_epochs
    floor = 0.03 / steps
    for i in range(steps - 1):
        weights[i] = max(weights[i] - epoch * decay, floor)
    weights[-1] = min(weights[-1] + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return weights


def _key(name: str) -> str:
    return name.replace(".", "__")


class MAMLPlusPlus(MAML):
    """MAML++ over any backbone (see the module docstring for the five switches).

    Args:
        backbone: the network; its batch norms must not track running statistics (they become per-step batch
            norms when ``per_step_bn_weights`` or ``per_step_bn_stats`` is on).
        inner_lr: inner rate (the initial value of every learned rate with ``learnable_inner_rates``).
        inner_steps: inner steps in training.
        eval_inner_steps: inner steps at evaluation (``None``: ``inner_steps``). Per-step tensors get
            ``max(inner_steps, eval_inner_steps)`` rows.
        adapt_norm: also adapt (non per-step) normalisation parameters in the inner loop.
        multi_step_loss: MSL.
        multi_step_loss_epochs: epochs over which the MSL weights are annealed; MSL is off afterwards. (the authors'
            ``multi_step_loss_num_epochs``)
        learnable_inner_rates: LSLR.
        per_step_bn_weights: BNWB.
        per_step_bn_stats: BNRS.
        first_order: always first order (FOMAML-style); overrides ``first_order_epochs``.
        zero_init: adapted parameters that start every inner loop at zero, e.g. ``("head.weight",)`` (the zeroing
            trick of :class:`~lightning_meta.algorithms.MAML`; not in the paper, off by default).
        first_order_epochs: DA: first-order meta-gradients for this many epochs (0: second order from the start;
            the authors' ``first_order_to_second_order_epoch``).
        cosine_annealing: CA.
        total_epochs: epochs of the cosine schedule (its ``T_max``).
        min_meta_lr: the cosine schedule's final learning rate (``eta_min``).
        iterations_per_epoch: optimizer steps per epoch of every schedule above.
        meta_lr: Adam learning rate of the outer loop (start of the cosine schedule).
        task_mode: ``"auto"``, ``"loop"`` or ``"vmap"`` (per-step running statistics need the loop in training).
        task_chunk: tasks per backward chunk (``"auto"``: 1 in loop mode, all under vmap).
        inner_loss_scale: fp16 inner loss scale (``None``: dynamic).
        cuda_graphs: replay training steps as CUDA graphs on a GPU (see :class:`MetaLearner`).
        max_consecutive_skipped_steps: stop after this many non-finite (skipped) steps in a row.
        task_memory_budget: memory that ``task_mode="auto"`` may give the tasks of a batch: bytes, a fraction in
            (0, 1] of the free memory, or ``None`` for the device's default (see :class:`MetaLearner`).

    Example:
        >>> from lightning_meta.nn import Conv4
        >>> model = MAMLPlusPlus(Conv4(5, hidden=8), inner_steps=2)
        >>> sorted(model.inner_lrs)[:1], model.inner_lrs["features__0__weight"].shape
        (['features__0__bias'], torch.Size([2]))
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        adapt_norm: bool = False,
        multi_step_loss: bool = True,
        multi_step_loss_epochs: int = 10,
        learnable_inner_rates: bool = True,
        per_step_bn_weights: bool = True,
        per_step_bn_stats: bool = True,
        first_order: bool = False,
        zero_init: Sequence[str] = (),
        first_order_epochs: int = 50,
        cosine_annealing: bool = True,
        total_epochs: int = 150,
        min_meta_lr: float = 1e-5,
        iterations_per_epoch: int = 500,
        meta_lr: float = 1e-3,
        task_mode: TaskMode = "auto",
        task_chunk: int | Literal["auto"] | None = "auto",
        inner_loss_scale: float | None = None,
        cuda_graphs: bool = False,
        max_consecutive_skipped_steps: int | None = 100,
        task_memory_budget: float | None = None,
    ) -> None:
        if multi_step_loss and multi_step_loss_epochs < 1:
            raise ValueError(f"multi_step_loss_epochs={multi_step_loss_epochs} must be >= 1 (or multi_step_loss=False)")
        if first_order_epochs < 0 or total_epochs < 1 or iterations_per_epoch < 1:
            raise ValueError(
                f"first_order_epochs={first_order_epochs} must be >= 0, total_epochs={total_epochs} and "
                f"iterations_per_epoch={iterations_per_epoch} >= 1"
            )
        if not 0 <= min_meta_lr <= meta_lr:
            raise ValueError(f"min_meta_lr={min_meta_lr} must lie in [0, meta_lr={meta_lr}]")
        if inner_steps < 0 or (eval_inner_steps is not None and eval_inner_steps < 0):
            raise ValueError(f"inner_steps={inner_steps} and eval_inner_steps={eval_inner_steps} must be >= 0")
        rows = max(inner_steps, inner_steps if eval_inner_steps is None else eval_inner_steps, 1)
        if per_step_bn_weights or per_step_bn_stats:
            convert_to_step_batchnorm(
                backbone, rows, per_step_affine=per_step_bn_weights, per_step_stats=per_step_bn_stats
            )
        super().__init__(
            backbone,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps,
            first_order=first_order,
            adapt_norm=adapt_norm,
            zero_init=zero_init,
            meta_lr=meta_lr,
            task_mode=task_mode,
            task_chunk=task_chunk,
            inner_loss_scale=inner_loss_scale,
            cuda_graphs=cuda_graphs,
            max_consecutive_skipped_steps=max_consecutive_skipped_steps,
            task_memory_budget=task_memory_budget,
        )
        step_norm = {
            f"{mn}.{pn}" if mn else pn
            for mn, m in backbone.named_modules()
            if isinstance(m, StepBatchNorm)
            for pn, _ in m.named_parameters(recurse=False)
        }
        self.adapt_names = [n for n in self.adapt_names if n not in step_norm]
        self.rows = rows
        self.multi_step_loss = multi_step_loss
        self.multi_step_loss_epochs = multi_step_loss_epochs
        self.learnable_inner_rates = learnable_inner_rates
        self.per_step_bn_stats = per_step_bn_stats
        self.first_order_epochs = first_order_epochs
        self.cosine_annealing = cosine_annealing
        self.total_epochs = total_epochs
        self.min_meta_lr = min_meta_lr
        self.iterations_per_epoch = iterations_per_epoch
        #: the schedule epoch (``global_step // iterations_per_epoch``), set at the start of every training batch
        self.schedule_epoch = 0
        if learnable_inner_rates:
            params = dict(backbone.named_parameters())
            self.inner_lrs = nn.ParameterDict(
                {
                    _key(n): nn.Parameter(torch.full((rows,), float(inner_lr), dtype=params[n].dtype))
                    for n in self.adapt_names
                }
            )

    # ------------------------------------------------------------------ schedules
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.schedule_epoch = self.global_step // self.iterations_per_epoch

    def step_loss_weights(self) -> list[float] | None:
        """The MSL weights of the current training step, or None when only the final query loss counts."""
        if not (self.training and self.multi_step_loss and self.schedule_epoch < self.multi_step_loss_epochs):
            return None
        if self.inner_steps < 1:
            return None
        return per_step_loss_weights(self.inner_steps, self.schedule_epoch, self.multi_step_loss_epochs)

    def uses_first_order(self) -> bool:
        """First order now: FOMAML, evaluation, or within the first ``first_order_epochs`` epochs (DA)."""
        return self.first_order or not self.training or self.schedule_epoch < self.first_order_epochs

    def step_rates(self, step: int) -> StepLearningRates:
        """The inner rate(s) of inner step ``step`` (learned per tensor with LSLR, detached at evaluation)."""
        if not self.learnable_inner_rates:
            return self.inner_lr
        if step >= self.rows:
            raise IndexError(
                f"{type(self).__name__} learned rates for {self.rows} inner steps, step {step + 1} was requested; "
                "build it with eval_inner_steps covering the steps you adapt for"
            )
        rates = {n: self.inner_lrs[_key(n)][step] for n in self.adapt_names}
        return rates if self.training else {n: r.detach() for n, r in rates.items()}

    # ------------------------------------------------------------------ one task
    def inner_loop(
        self, support_x: Tensor, support_y: Tensor, steps: int, query_x: Tensor | None = None,
        trace: list[Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], list[Tensor]]:  # fmt: skip
        """``steps`` inner steps, each with its own rates and batch-norm row; returns the fast weights and, given
        ``query_x``, the query outputs after every step."""
        fast = self.initial_fast_weights()
        first_order = self.uses_first_order()
        loss_fn = default_inner_loss(support_y)
        outputs = []
        for s in range(steps):
            set_norm_step(self.backbone, s)
            fast = adapt(
                self.backbone, fast, support_x, support_y, steps=1, lr=self.step_rates(s), first_order=first_order,
                loss_fn=loss_fn, loss_scale=self.inner_loss_scale, trace=trace,
            )  # fmt: skip
            if query_x is not None:
                outputs.append(functional_forward(self.backbone, fast, query_x))
        return fast, outputs

    def adapt(self, support_x: Tensor, support_y: Tensor, *, trace: list[Tensor] | None = None) -> dict[str, Tensor]:
        """Fast weights after ``inner_steps`` (training) or ``eval_inner_steps`` steps."""
        steps = self.inner_steps if self.training else self.eval_inner_steps
        return self.inner_loop(support_x, support_y, steps, trace=trace)[0]

    def predict(self, state: dict[str, Tensor], query_x: Tensor) -> Tensor:
        """Query outputs with the fast weights, through the batch-norm row of the last inner step."""
        steps = self.inner_steps if self.training else self.eval_inner_steps
        set_norm_step(self.backbone, max(steps - 1, 0))
        return functional_forward(self.backbone, state, query_x)

    def task_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """MSL while it is active (training, first ``multi_step_loss_epochs`` epochs), else the final query loss."""
        weights = self.step_loss_weights()
        if weights is None:
            outputs = self.task_outputs(support_x, support_y, query_x)
            return self.query_loss(outputs, query_y), outputs
        _, step_outputs = self.inner_loop(support_x, support_y, self.inner_steps, query_x=query_x)
        loss = sum(w * self.query_loss(o, query_y) for w, o in zip(weights, step_outputs))
        return cast(Tensor, loss), step_outputs[-1]  # a Tensor: one weighted loss per inner step, at least one

    def vmap_unsafe_reason(self) -> str | None:
        if self.training and self.per_step_bn_stats:
            return "per-step running statistics are updated in place in training, which vmap cannot batch"
        return super().vmap_unsafe_reason()

    # ------------------------------------------------------------------ outer loop
    def configure_optimizers(self) -> Any:
        """Adam over every meta-parameter (weights, learned rates, per-step batch norm), with CA if enabled."""
        optimizer = super().configure_optimizers()
        if not self.cosine_annealing:
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=self.total_epochs, eta_min=self.min_meta_lr
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": self.iterations_per_epoch},
        }
