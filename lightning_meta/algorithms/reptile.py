"""Reptile: On First-Order Meta-Learning Algorithms (Nichol, Achiam, Schulman, 2018, arXiv:1803.02999).

Inner loop per task: ``inner_steps`` steps of Adam (``betas=(0, 0.999)``, the paper's choice) or plain gradient
descent on mini-batches of ``inner_batch_size`` support examples, from ``theta`` to ``theta'``. Outer loop, the
batched version of the paper: ``theta <- theta + epsilon * mean_tasks(theta' - theta)``. Here each task's outer
*direction* is ``theta - theta'`` (:meth:`~lightning_meta.algorithms.MetaLearner.task_meta_gradient`), the base
averages it over the tasks of the batch (and over DDP ranks), and the default outer optimizer is SGD with learning
rate ``epsilon = meta_step_size``, which makes ``optimizer.step()`` exactly the update above. ``epsilon`` is
annealed linearly from ``meta_step_size`` to ``meta_step_size_final`` over ``meta_iterations`` optimizer steps
(the paper anneals it to 0 over training).

Evaluation adapts from ``theta`` with ``eval_inner_steps`` steps of ``eval_inner_batch_size`` examples and
predicts the queries either all together (``transductive=True``: batch norm uses the statistics of the query
batch) or one at a time, each in a batch with the support set (``transductive=False``: the paper's
non-transductive protocol, where no query sees another query).

Defaults are the paper's Omniglot settings (its Table 3 / code): Adam inner rate 0.001, 5 inner steps of 10
examples in training (training episodes with 10 shots per class), 50 steps of 5 examples at evaluation, 5 tasks
per meta-batch, epsilon 1 -> 0 over 100k meta-iterations.

Departures from the paper:

* the inner Adam state starts fresh for every task; the authors' code keeps one TensorFlow Adam optimizer, whose
  second-moment estimate carries over from task to task (with ``beta1 = 0`` there is no momentum to carry);
* mini-batches cycle through random permutations of the support set drawn per task (the paper's code samples
  mini-batches the same way, without replacement within a pass); ``inner_batch_size=None`` uses the whole support
  set at every step (deterministic);
* the query loss logged as ``train/loss`` is measured after adaptation; it is not part of the update.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.functional.adaptation import functional_forward, gradient_steps
from lightning_meta.functional.losses import default_inner_loss
from lightning_meta.functional.tasks import TaskMode
from lightning_meta.optim.rules import AdamRule, UpdateRule
from lightning_meta.utils import check_no_running_stats

__all__ = ["Reptile"]


class Reptile(MetaLearner):
    """Reptile (batched) over any backbone; the outer update is ``theta += epsilon * mean(theta' - theta)``.

    Args:
        backbone: the network ``(examples, *x_shape) -> (examples, ways)`` (or regression outputs). Batch norm must
            not track running statistics (it normalises every batch with its own statistics).
        inner_lr: inner learning rate (Adam's ``lr``, or the gradient-descent rate with ``inner_optimizer="sgd"``).
        inner_steps: inner steps in training.
        inner_batch_size: support examples per inner step in training (``None``: the whole support set).
        eval_inner_steps: inner steps at evaluation.
        eval_inner_batch_size: support examples per inner step at evaluation (``None``: all).
        inner_optimizer: ``"adam"`` (the paper) or ``"sgd"`` (plain gradient descent).
        inner_betas: Adam's betas in the inner loop (the paper: ``(0, 0.999)``).
        inner_rule: any :class:`~lightning_meta.optim.UpdateRule` instead (``inner_lr`` is its ``lr``); its weights
            are not meta-learned (Reptile's update moves only the backbone).
        meta_step_size: the outer step size epsilon at the start of training (the SGD learning rate).
        meta_step_size_final: epsilon after ``meta_iterations`` optimizer steps (linear in between, then constant).
        meta_iterations: optimizer steps over which epsilon is annealed.
        transductive: predict all queries of a task together (batch-norm statistics over the query batch), or each
            query in a batch with the support set only.
        task_mode: ``"auto"``, ``"loop"`` or ``"vmap"`` (see :class:`MetaLearner`).
        task_chunk: tasks per chunk (``"auto"``: 1 in loop mode, all under vmap).
        inner_loss_scale: fp16 inner loss scale (``None``: dynamic).
        cuda_graphs: replay training steps as CUDA graphs on a GPU (see :class:`MetaLearner`).
        max_consecutive_skipped_steps: stop after this many non-finite (skipped) steps in a row.
        task_memory_budget: memory that ``task_mode="auto"`` may give the tasks of a batch: bytes, a fraction in
            (0, 1] of the free memory, or ``None`` for the device's default (see :class:`MetaLearner`).

    A LightningCLI ``optimizer:`` section replaces the default SGD (the directions are then its gradients).

    Example:
        >>> from lightning_meta.episode import Episode
        >>> from lightning_meta.nn import MLP
        >>> model = Reptile(MLP(4, 3, hidden=(8,)), inner_batch_size=None, task_mode="loop")
        >>> x, y = torch.randn(2, 6, 4), torch.tensor([[0, 1, 2] * 2] * 2)
        >>> model(Episode(x, y, x, y)).shape
        torch.Size([2, 6, 3])
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        inner_lr: float = 0.001,
        inner_steps: int = 5,
        inner_batch_size: int | None = 10,
        eval_inner_steps: int = 50,
        eval_inner_batch_size: int | None = 5,
        inner_optimizer: Literal["adam", "sgd"] = "adam",
        inner_betas: tuple[float, float] = (0.0, 0.999),
        inner_rule: UpdateRule | None = None,
        meta_step_size: float = 1.0,
        meta_step_size_final: float = 0.0,
        meta_iterations: int = 100_000,
        transductive: bool = True,
        task_mode: TaskMode = "auto",
        task_chunk: int | Literal["auto"] | None = "auto",
        inner_loss_scale: float | None = None,
        cuda_graphs: bool = False,
        max_consecutive_skipped_steps: int | None = 100,
        task_memory_budget: float | None = None,
    ) -> None:
        super().__init__(
            meta_lr=meta_step_size,
            task_mode=task_mode,
            task_chunk=task_chunk,
            inner_loss_scale=inner_loss_scale,
            cuda_graphs=cuda_graphs,
            max_consecutive_skipped_steps=max_consecutive_skipped_steps,
            task_memory_budget=task_memory_budget,
        )
        for name, value in (("inner_steps", inner_steps), ("eval_inner_steps", eval_inner_steps)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        for name, size in (("inner_batch_size", inner_batch_size), ("eval_inner_batch_size", eval_inner_batch_size)):
            if size is not None and size < 1:
                raise ValueError(f"{name}={size} must be >= 1 (or None for the whole support set)")
        if inner_optimizer not in ("adam", "sgd"):
            raise ValueError(f"inner_optimizer={inner_optimizer!r}; use 'adam' or 'sgd'")
        if not meta_step_size_final >= 0:
            raise ValueError(f"meta_step_size_final={meta_step_size_final} must be >= 0")
        if meta_iterations < 1:
            raise ValueError(f"meta_iterations={meta_iterations} must be >= 1")
        check_no_running_stats(backbone, type(self).__name__)
        self.save_hyperparameters(ignore=["backbone", "inner_rule"])
        self.backbone = backbone
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.inner_batch_size = inner_batch_size
        self.eval_inner_steps = eval_inner_steps
        self.eval_inner_batch_size = eval_inner_batch_size
        if inner_rule is None and inner_optimizer == "adam":
            beta1, beta2 = inner_betas  # a list when it comes from a YAML config
            inner_rule = AdamRule(betas=(beta1, beta2))
        self.inner_rule = inner_rule
        self.meta_step_size = float(meta_step_size)
        self.meta_step_size_final = float(meta_step_size_final)
        self.meta_iterations = meta_iterations
        self.transductive = transductive

    # ------------------------------------------------------------------ one task
    def adapt(self, support_x: Tensor, support_y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """``(theta', support_x)``: the adapted weights (no graph to ``theta``) and the support set (for the
        non-transductive prediction)."""
        steps = self.inner_steps if self.training else self.eval_inner_steps
        size = self.inner_batch_size if self.training else self.eval_inner_batch_size
        theta = {n: p.detach() for n, p in self.backbone.named_parameters() if p.requires_grad}
        batches = self.minibatch_indices(support_x.shape[0], steps, size, support_x.device)
        loss_fn = default_inner_loss(support_y)
        step = iter(range(steps))

        def objective(fast: dict[str, Tensor]) -> Tensor:
            if batches is None:
                return loss_fn(functional_forward(self.backbone, fast, support_x), support_y)
            idx = batches[next(step)]
            return loss_fn(functional_forward(self.backbone, fast, support_x[idx]), support_y[idx])

        fast = gradient_steps(
            objective,
            theta,
            steps=steps,
            lr=self.inner_lr,
            first_order=True,
            loss_scale=self.inner_loss_scale,
            rule=self.inner_rule,
        )
        return fast, support_x

    @staticmethod
    def minibatch_indices(examples: int, steps: int, batch_size: int | None, device: Any = None) -> Tensor | None:
        """Indices ``(steps, batch)`` of the support examples of each inner step: consecutive slices of random
        permutations (a new one per pass over the support set); ``None`` when every step uses all examples."""
        if batch_size is None or batch_size >= examples or steps == 0:
            return None
        passes = math.ceil(steps * batch_size / examples)
        perms = torch.rand(passes, examples, device=device).argsort(-1).reshape(-1)
        return perms[: steps * batch_size].reshape(steps, batch_size)

    def predict(self, state: tuple[dict[str, Tensor], Tensor], query_x: Tensor) -> Tensor:
        """Query outputs with ``theta'``: all queries together (transductive) or each with the support set."""
        fast, support_x = state
        if self.transductive:
            return functional_forward(self.backbone, fast, query_x)
        outputs = [
            functional_forward(self.backbone, fast, torch.cat([support_x, query_x[j : j + 1]]))[-1]
            for j in range(query_x.shape[0])
        ]
        return torch.stack(outputs)

    def task_meta_gradient(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Direction ``theta - theta'`` of one task (the optimizer then moves ``theta`` towards ``theta'``)."""
        fast, _ = self.adapt(support_x, support_y)
        with torch.no_grad():
            outputs = self.predict((fast, support_x), query_x)
            loss = self.query_loss(outputs, query_y)
        directions = {f"backbone.{n}": p.detach() - fast[n] for n, p in self.backbone.named_parameters() if n in fast}
        return directions, loss, outputs

    # ------------------------------------------------------------------ outer loop
    def meta_step_size_at(self, step: int) -> float:
        """Epsilon at optimizer step ``step``: linear from ``meta_step_size`` to ``meta_step_size_final``."""
        frac = min(step / self.meta_iterations, 1.0)
        return (1.0 - frac) * self.meta_step_size + frac * self.meta_step_size_final

    def configure_optimizers(self) -> Any:
        """SGD with learning rate epsilon (the paper's update) and its linear annealing, per optimizer step."""
        optimizer = torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.meta_step_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.meta_step_size_at(step) / self.meta_step_size
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
