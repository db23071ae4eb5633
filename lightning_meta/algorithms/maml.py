"""MAML: Model-Agnostic Meta-Learning (Finn, Abbeel, Levine, ICML 2017, arXiv:1703.03400), and FOMAML.

Inner loop per task: ``theta'_{s+1} = theta'_s - inner_lr * grad L_support(theta'_s)``; outer loop:
Adam on the mean query loss at ``theta'_S`` over the tasks of a batch. Second order by default;
``first_order=True`` is FOMAML (inner gradients as constants, query loss still at ``theta'_S``).

Departures from the paper/cbfinn (docs/algorithms/maml.md):

* the inner loss is the *mean* cross-entropy, so ``inner_lr`` is N times cbfinn's alpha (5-way
  Omniglot: 0.4 there is 2.0 here; learn2learn uses 0.5);
* by default every parameter adapts, batch-norm scale/offset included; ``adapt_norm=False`` keeps
  normalisation parameters out of the inner loop, as cbfinn does with its BN offsets;
* batch norm must not track running statistics (``track_running_stats=False``, transductive, as
  cbfinn); evaluation adapts first order (no second-order graph is needed there).

Option ``zero_init`` is the *zeroing trick* of Kao, Chiang, Pfister, Chao ("MAML is a Noisy Contrastive
Learner in Classification", ICLR 2022, arXiv:2106.15367): the named parameters (the classifier's weight
matrix) are zero at the start of every inner loop, so the head is learned from the support set alone and
the body is meta-trained for it. Off by default (plain MAML).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.episode import Episode
from lightning_meta.functional.adaptation import (
    StepLearningRates,
    adapt,
    functional_forward,
)
from lightning_meta.functional.losses import default_inner_loss
from lightning_meta.functional.tasks import TaskMode
from lightning_meta.optim.rules import UpdateRule
from lightning_meta.utils import check_no_running_stats

__all__ = ["MAML", "adaptable_parameters"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def adaptable_parameters(module: nn.Module, adapt_norm: bool = True) -> list[str]:
    """Names of the parameters of ``module`` that the inner loop adapts (norm layers' only if ``adapt_norm``)."""
    if adapt_norm:
        return [n for n, p in module.named_parameters() if p.requires_grad]
    skip = {
        f"{mod_name}.{p_name}" if mod_name else p_name
        for mod_name, mod in module.named_modules()
        if isinstance(mod, _NORMS)
        for p_name, _ in mod.named_parameters(recurse=False)
    }
    return [n for n, p in module.named_parameters() if p.requires_grad and n not in skip]


class MAML(MetaLearner):
    """MAML / FOMAML over any backbone.

    Args:
        backbone: the network ``(examples, *x_shape) -> (examples, ways)`` (or regression outputs). Batch
            norm inside it must not track running statistics (transductive BN; see :mod:`lightning_meta.nn`).
        inner_lr: inner rate alpha (mean-reduced loss; see the module docstring); per tensor or per step below.
        inner_steps: inner steps S in training.
        eval_inner_steps: inner steps at validation/test (``None``: ``inner_steps``).
        first_order: FOMAML.
        adapt_norm: also adapt normalisation-layer parameters in the inner loop.
        meta_lr: Adam learning rate of the outer loop.
        task_mode: ``"auto"``, ``"loop"`` or ``"vmap"`` (see :class:`MetaLearner`).
        task_chunk: tasks per backward chunk (``None``: all at once; ``"auto"``: 1 in loop mode, all under
            vmap; see :class:`MetaLearner`).
        inner_loss_scale: fp16 inner loss scale (``None``: dynamic).
        cuda_graphs: replay training steps as CUDA graphs on a GPU (see :class:`MetaLearner`).
        max_consecutive_skipped_steps: stop after this many non-finite (skipped) steps in a row.
        task_memory_budget: memory that ``task_mode="auto"`` may give the tasks of a batch: bytes, a fraction in
            (0, 1] of the free memory, or ``None`` for the device's default (see :class:`MetaLearner`).
        zero_init: names of adapted parameters that start every inner loop at zero (the zeroing trick,
            see the module docstring), e.g. ``("head.weight",)``; they get no outer gradient and stay zero.
        inner_rule: an :class:`~lightning_meta.optim.UpdateRule` as the inner optimizer instead of gradient descent
            (``inner_lr`` is then its ``lr``); its weights are meta-parameters, trained by the outer optimizer.

    ``inner_lr`` may be a scalar, a dict ``{parameter name: rate}``, or a list with one of those per inner step
    (MAML++'s per-layer per-step rates; its length must equal ``inner_steps`` and, at evaluation,
    ``eval_inner_steps``); see :func:`~lightning_meta.functional.gradient_steps`.

    Example:
        >>> import torch
        >>> from lightning_meta.episode import Episode
        >>> from lightning_meta.nn import MLP
        >>> maml = MAML(MLP(), inner_lr=0.01, inner_steps=2, task_mode="vmap")
        >>> x = torch.randn(4, 10, 1)
        >>> maml(Episode(x, x[..., 0] ** 2, x, x[..., 0] ** 2)).shape  # (tasks, queries, 1)
        torch.Size([4, 10, 1])
    """

    #: ``__init__`` arguments of this class that subclasses set themselves (kept out of ``hparams``).
    _hparams_ignore: tuple[str, ...] = ()

    def __init__(
        self,
        backbone: nn.Module,
        *,
        inner_lr: float | list[float] | dict[str, float] = 0.4,
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
        zero_init: Sequence[str] = (),
        inner_rule: UpdateRule | None = None,
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
        check_no_running_stats(backbone, type(self).__name__)
        self.save_hyperparameters(ignore=["backbone", "inner_rule", *self._hparams_ignore])
        self.backbone = backbone
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.first_order = first_order
        self.adapt_names = adaptable_parameters(backbone, adapt_norm)
        if isinstance(zero_init, str):
            zero_init = (zero_init,)
        unknown = [n for n in zero_init if n not in self.adapt_names]
        if unknown:
            raise ValueError(
                f"zero_init={list(zero_init)}: {unknown} are not adapted parameters of the backbone; "
                f"choose among {self.adapt_names}"
            )
        self.zero_init = tuple(zero_init)
        rates: StepLearningRates = inner_lr
        if isinstance(inner_lr, (list, tuple)):
            lengths = {inner_steps, self.eval_inner_steps}
            if lengths != {len(inner_lr)}:
                raise ValueError(
                    f"inner_lr has {len(inner_lr)} per-step rates but inner_steps={inner_steps} and "
                    f"eval_inner_steps={self.eval_inner_steps}; give one rate per step or a single rate"
                )
            rates = tuple(inner_lr)  # a tuple of floats is part of the CUDA-graph key
        self.inner_lr = rates
        self.inner_rule = inner_rule
        with torch.no_grad():
            for n in self.zero_init:
                backbone.get_parameter(n).zero_()

    def inner_rates(self) -> StepLearningRates:
        """The inner learning rate(s) handed to :func:`~lightning_meta.functional.adapt` (Meta-SGD overrides)."""
        return self.inner_lr

    def initial_fast_weights(self) -> dict[str, Tensor]:
        """The adapted parameters where every inner loop starts: the meta-parameters (``zero_init`` ones at zero),
        detached at evaluation (no graph to the meta-parameters there)."""
        params = dict(self.backbone.named_parameters())
        fast = {n: params[n] * 0 if n in self.zero_init else params[n] for n in self.adapt_names}
        return fast if self.training else {n: p.detach() for n, p in fast.items()}

    def adapt(self, support_x: Tensor, support_y: Tensor, *, trace: list[Tensor] | None = None) -> dict[str, Tensor]:
        """Fast weights of one task after ``inner_steps`` (training) or ``eval_inner_steps`` steps (``trace``
        receives the support loss before every step, see :func:`~lightning_meta.functional.gradient_steps`)."""
        return adapt(
            self.backbone,
            self.initial_fast_weights(),
            support_x,
            support_y,
            steps=self.inner_steps if self.training else self.eval_inner_steps,
            lr=self.inner_rates(),
            first_order=self.first_order or not self.training,
            loss_fn=default_inner_loss(support_y),
            loss_scale=self.inner_loss_scale,
            rule=self.inner_rule,
            trace=trace,
        )

    def predict(self, state: dict[str, Tensor], query_x: Tensor) -> Tensor:
        """Query outputs with the fast weights ``state``."""
        return functional_forward(self.backbone, state, query_x)  # (ways * queries, ways)

    # ------------------------------------------------------------------ divergence check at evaluation
    #: Tasks of the first evaluation batch whose support losses :meth:`check_support_loss` follows.
    support_check_tasks: int = 8

    def support_losses(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        """Support loss of one task before each evaluation inner step and after the last, ``(steps + 1,)``
        (evaluation behaviour: first order from the detached meta-parameters)."""
        trace: list[Tensor] = []
        with torch.enable_grad():
            fast = self.adapt(support_x, support_y, trace=trace)
        with torch.no_grad():
            outputs = self.predict(fast, support_x)
            trace.append(default_inner_loss(support_y)(outputs, support_y).detach())
        return torch.stack([t.float() for t in trace])

    def check_support_loss(self, episode: Episode) -> Tensor | None:
        """Warn (once per learner) when the support loss rises during evaluation adaptation, for the mean over the
        first tasks of ``episode`` or for any one of them (a loss that grows by half and by more than 0.01 in one
        step): the inner rate (``inner_lr``) or ``eval_inner_steps`` is too large for the learned initialisation,
        and the query accuracy collapses although training looked fine. A mean alone can hide it: a few tasks
        diverge while the rest converge. Returns the mean losses ``(steps + 1,)``, or None once warned. Runs per
        task in a loop on ``support_check_tasks`` tasks: a few forwards once per evaluation."""
        if getattr(self, "_warned_support_loss", False) or self.training:
            return None
        k = min(episode.tasks, self.support_check_tasks)
        losses = torch.stack([self.support_losses(episode.support_x[t], episode.support_y[t]) for t in range(k)])
        mean = losses.mean(0)
        mean_rises = bool(((mean[1:] > mean[:-1] * (1 + 1e-3)) & mean[1:].isfinite()).any())
        jumps = (losses[:, 1:] > 1.5 * losses[:, :-1]) & (losses[:, 1:] - losses[:, :-1] > 1e-2)
        diverging = (jumps.any(1) | ~losses.isfinite().all(1)).nonzero().flatten().tolist()
        if mean_rises or diverging or not bool(mean.isfinite().all()):
            self._warned_support_loss = True
            what = [f"mean {' -> '.join(f'{v:.4g}' for v in mean.tolist())}"]
            what += [f"task {t}: {' -> '.join(f'{v:.4g}' for v in losses[t].tolist())}" for t in diverging[:3]]
            warnings.warn(
                f"{type(self).__name__}: the support loss rises during evaluation adaptation over "
                f"{mean.numel() - 1} inner steps in {len(diverging)} of the first {k} tasks ({'; '.join(what)}); "
                "the inner rate (inner_lr) or eval_inner_steps is too large for these weights: lower them (the "
                "query accuracy suffers otherwise)",
                RuntimeWarning,
                stacklevel=2,
            )
        return mean

    def validation_step(self, batch: Episode, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if batch_idx == 0:
            self.check_support_loss(batch)

    def test_step(self, batch: Episode, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        if batch_idx == 0:
            self.check_support_loss(batch)
