"""MetaLearner: the one LightningModule base class of lightning-meta.

A subclass says how one task is learned (``adapt``/``predict``, or a per-task objective ``task_loss``, or an outer
update ``task_meta_gradient``); the base runs the tasks of a batch (loop or vmap, in chunks), computes the
meta-gradient with :func:`lightning_meta.functional.meta_gradient`, and owns the steps, the metrics, the
non-finite guard, the fp16 inner-loss scale and what a checkpoint must keep. The contract, with complete examples,
is in the guide "Write your own meta-learner" (docs/guide/write_your_own.md).

Example:
    >>> from torch import nn
    >>> from lightning_meta.functional import adapt, functional_forward
    >>> class OneStep(MetaLearner):
    ...     def __init__(self, ways: int = 2, inner_lr: float = 0.5, meta_lr: float = 1e-3) -> None:
    ...         super().__init__(meta_lr=meta_lr, task_mode="loop")
    ...         self.inner_lr = inner_lr
    ...         self.net = nn.Linear(4, ways)
    ...     def adapt(self, support_x, support_y):
    ...         params = dict(self.net.named_parameters())
    ...         return adapt(self.net, params, support_x, support_y, lr=self.inner_lr, first_order=not self.training)
    ...     def predict(self, state, query_x):
    ...         return functional_forward(self.net, state, query_x)
    >>> episode = Episode(torch.randn(3, 4, 4), torch.tensor([[0, 1, 0, 1]] * 3),
    ...                   torch.randn(3, 6, 4), torch.tensor([[0, 1] * 3] * 3))
    >>> OneStep()(episode).shape  # (tasks, ways * queries, ways)
    torch.Size([3, 6, 2])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.optim import Optimizer
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_meta.algorithms.execution import TaskExecution, check_execution
from lightning_meta.algorithms.metrics import MeanCI95
from lightning_meta.algorithms.padding import run_unpadded
from lightning_meta.episode import Episode
from lightning_meta.functional.graphs import CudaGraphCache
from lightning_meta.functional.losses import per_task_accuracy, per_task_cross_entropy, per_task_mse
from lightning_meta.functional.meta_gradient import MetaGradient, TaskDirectionFn, meta_gradient
from lightning_meta.functional.scaling import InnerLossScaler
from lightning_meta.functional.tasks import TaskMode, TaskModeSelector, run_tasks
from lightning_meta.memory import keep_freed_memory

__all__ = ["MetaLearner"]

#: A per-task objective: ``(support_x, support_y, query_x, query_y) -> (scalar loss, query outputs)``.
TaskLoss = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]

log = logging.getLogger(__name__)

#: checkpoint key of the fp16 inner-loss scale (``InnerLossScaler.state_dict()``)
FP16_SCALE_KEY = "lightning_meta_fp16_inner_scale"


class MetaLearner(TaskExecution, LightningModule):
    """Base class of few-shot learners (the contract: docs/guide/write_your_own.md).

    Args:
        meta_lr: learning rate of the default outer optimizer, Adam.
        task_mode: how tasks of a batch are run: ``"loop"``, ``"vmap"``, or ``"auto"`` (on the first batch
            of each shape, the faster of the two whose memory fits ``task_memory_budget``, per device; the
            choice is logged once through :mod:`logging` and saved in checkpoints, so a resumed run keeps it).
            Both give the same results up to rounding; ``"auto"``'s trial runs draw random numbers (dropout),
            and each DDP rank measures for itself, so pin a mode for bitwise-reproducible runs across ranks.
            Shapes whose support and query sizes round up to the same powers of two share a trial, and after
            ``task_mode_selector.max_trials`` (8) trials new shapes take the most frequent choice (logged once).
        task_chunk: tasks whose graphs are alive at once in training (``None``: all tasks of the
            batch). Lower it to bound memory; the meta-gradient is the same. ``"auto"``: 1 when the
            tasks run as a loop (each task's graph is freed after its backward, as in learn2learn:
            peak memory of one task, and no slower on CPU) and all tasks under vmap (which needs them
            in one call), or, with ``task_mode="auto"``, the chunk of tasks that fits the memory budget.
        inner_loss_scale: scale of the inner (and outer) loss before differentiation under fp16
            autocast, so fp16 gradients do not underflow (:class:`~lightning_meta.functional.InnerLossScaler`,
            saved in checkpoints). ``None``: dynamic, starting at 2**12, halved on every skipped step and doubled
            after 200 good ones. Ignored (1.0) without fp16.
        cuda_graphs: on a CUDA device, record the meta-gradient of a chunk of tasks (one task in the per-task loop)
            as a CUDA graph after two eager warm-up calls and replay it for every later chunk of the same shape
            (:class:`~lightning_meta.functional.CudaGraphCache`): one launch per chunk instead of many small
            kernels, with one chunk's memory. A graph is recorded per chunk shape and per value of the module's
            settings (:func:`~lightning_meta.functional.module_graph_state`: a changed ``inner_lr`` records a new
            one). Steps under autocast, on a CPU, and evaluation run eagerly. The adapt/predict code must not
            synchronise with the host (no ``.item()``).
        max_consecutive_skipped_steps: stop the run with a ``RuntimeError`` after this many optimizer steps in a
            row were skipped for non-finite values (``None``: never stop).
        task_memory_budget: memory that ``task_mode="auto"`` may give the tasks of a batch: bytes, a fraction in
            (0, 1] of the free memory, or ``None`` (default: half the free memory on CUDA, the loop's own peak on a
            CPU). vmap is chosen only where it fits, in chunks if the whole batch does not (see
            :class:`~lightning_meta.functional.TaskModeSelector`); every built-in learner with ``task_mode`` takes
            it, and a subclass of your own without it can set ``model.task_mode_selector.memory_budget``. The
            decisions are saved in checkpoints and reused on resume.

    The gradient-based learners (MAML, FOMAML, MetaSGD, ANIL, CAML, LEO) all take these execution arguments
    with the same defaults: ``task_mode="auto"``, ``task_chunk="auto"``, ``inner_loss_scale=None``,
    ``cuda_graphs=False``, ``max_consecutive_skipped_steps=100``, ``task_memory_budget=None``. A step with a
    non-finite task loss or meta-gradient is skipped on every rank (``train/nonfinite_tasks``,
    ``train/skipped_steps``).
    """

    #: Set to False in learners that adapt without gradients (e.g. ProtoNet).
    needs_grad_at_eval: bool = True
    #: ``randomness`` of ``torch.func.vmap`` over tasks ("different": each task its own dropout mask).
    vmap_randomness: str = "different"
    #: ``task_mode="auto"`` times loop against vmap on at most this many tasks of the first batch.
    task_mode_trial_tasks: int = 8
    #: At the first step on a CPU, call :func:`lightning_meta.memory.keep_freed_memory` (process-wide: glibc keeps
    #: freed memory for reuse, so a step's activations do not page-fault in again for every task; logged once).
    #: False (or ``LIGHTNING_META_KEEP_FREED_MEMORY=0``) leaves ``malloc`` alone.
    keep_freed_cpu_memory: bool = True
    #: optimizer steps skipped for non-finite values (a buffer: saved in checkpoints)
    skipped_steps: Tensor

    def __init__(
        self,
        *,
        meta_lr: float = 1e-3,
        task_mode: TaskMode = "auto",
        task_chunk: int | Literal["auto"] | None = None,
        inner_loss_scale: float | None = None,
        cuda_graphs: bool = False,
        max_consecutive_skipped_steps: int | None = 100,
        task_memory_budget: float | None = None,
    ) -> None:
        super().__init__()
        check_execution(meta_lr, task_mode, task_chunk, inner_loss_scale, cuda_graphs, max_consecutive_skipped_steps)
        self.meta_lr, self.task_mode, self.task_chunk, self.cuda_graphs = meta_lr, task_mode, task_chunk, cuda_graphs
        self.max_consecutive_skipped_steps = max_consecutive_skipped_steps
        self._consecutive_skipped = 0
        self.train_loss, self.train_score = MeanMetric(), MeanMetric()
        self.val_loss, self.val_score = MeanMetric(), MeanMetric()
        self.test_loss, self.test_score, self.test_score_ci95 = MeanMetric(), MeanMetric(), MeanCI95()
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.task_mode_selector = TaskModeSelector(memory_budget=task_memory_budget)
        self.inner_loss_scaler = (
            InnerLossScaler()
            if inner_loss_scale is None
            else InnerLossScaler(init_scale=inner_loss_scale, dynamic=False)
        )
        self._fp16_active = False
        self._warned_vmap_unsafe = False
        self._mode_override = None
        self._graph_cache = CudaGraphCache()
        self._warned_graph_autocast = False

    # ------------------------------------------------------------------ the subclass's part
    def adapt(self, support_x: Tensor, support_y: Tensor) -> Any:
        """Adapt to one task's support set (no task dimension) and return a state that :meth:`predict` reads."""
        raise NotImplementedError(f"{type(self).__name__} must implement adapt() and predict(), or forward_tasks()")

    def predict(self, state: Any, query_x: Tensor) -> Tensor:
        """Outputs for one task's queries given the state returned by :meth:`adapt`."""
        raise NotImplementedError(f"{type(self).__name__} must implement adapt() and predict(), or forward_tasks()")

    def task_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The per-task objective ``(scalar loss, query outputs)`` of one task (no task dimension); the default is
        :meth:`query_loss` of :meth:`task_outputs`. The base runs it per task (loop, vmap, chunks), under
        ``torch.no_grad()`` at evaluation; ``task_mode="auto"`` times it."""
        outputs = self.task_outputs(support_x, support_y, query_x)
        return self.query_loss(outputs, query_y), outputs

    def task_outputs(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """``predict(adapt(support), query)`` of one task; at evaluation ``adapt`` runs with gradients enabled and
        ``predict`` without."""
        return self._per_task(self.adapt, self.predict)(support_x, support_y, query_x)

    def query_loss(self, outputs: Tensor, query_y: Tensor) -> Tensor:
        """One task's query loss: mean cross-entropy for class labels, MSE for float targets (computed in fp32
        for half-precision outputs), the same values as the batched :meth:`query_losses`."""
        return self.query_losses(outputs.unsqueeze(0), query_y.unsqueeze(0)).squeeze(0)

    @staticmethod
    def query_losses(outputs: Tensor, query_y: Tensor) -> Tensor:
        """Per-task query losses ``(tasks,)`` of batched outputs ``(tasks, queries, ...)``: cross-entropy or MSE."""
        if query_y.is_floating_point():
            return per_task_mse(outputs, query_y)
        return per_task_cross_entropy(outputs, query_y)

    def task_meta_gradient(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Optional: the outer update of one task as directions ``({name: direction}, query loss, query outputs)``
        (names from ``named_parameters()``, missing ones zero) that the optimizer descends instead of the gradient of
        :meth:`task_loss` (Reptile's ``theta - theta'``). Their mean over the tasks becomes each parameter's gradient;
        the loss is logged as ``train/loss``. Evaluation still uses :meth:`task_loss`."""
        raise NotImplementedError(f"{type(self).__name__} does not define task_meta_gradient (optional)")

    def _overrides(self, name: str) -> bool:
        return getattr(type(self), name) is not getattr(MetaLearner, name)

    # ------------------------------------------------------------------ inference
    def adapt_and_predict(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, steps: int | None = None
    ) -> Tensor:
        """Adapt on labelled support sets ``(tasks, examples, ...)`` (or one task without the task dimension) and
        return the outputs for unlabelled queries, without gradients, with the evaluation behaviour (the mode is
        restored afterwards); ``steps``: inner steps for this call (``eval_inner_steps`` otherwise)."""
        single = support_y.dim() == 1
        if single:
            support_x, support_y, query_x = support_x.unsqueeze(0), support_y.unsqueeze(0), query_x.unsqueeze(0)
        episode = self._check_episode(Episode(support_x, support_y, query_x), need_query_y=False)
        self._check_grad_possible("prediction")
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise ValueError(f"steps={steps!r} must be an integer >= 0 (or None for eval_inner_steps)")
            if not hasattr(self, "eval_inner_steps"):
                raise ValueError(
                    f"steps={steps}: {type(self).__name__} has no eval_inner_steps attribute to set; it does not "
                    "adapt by a number of steps (pass steps=None)"
                )
        modes = [(m, m.training) for m in self.modules()]
        saved_steps: Any = getattr(self, "eval_inner_steps", None)  # the subclass's attribute, of its type
        self.train(False)
        try:
            if steps is not None:
                self.eval_inner_steps = steps
            self._fp16_active = _fp16_autocast(episode.support_x.device)
            with torch.no_grad():
                outputs = self.forward_tasks(episode.support_x, episode.support_y, episode.query_x)
        finally:
            if steps is not None:
                self.eval_inner_steps = saved_steps
            for m, mode in modes:
                m.training = mode
        return outputs[0] if single else outputs

    @override
    def predict_step(self, batch: Episode, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Query outputs ``(tasks, queries, ...)`` of an Episode batch for ``Trainer.predict``; ``query_y`` may be
        None. Learners that adapt with gradients need ``Trainer(inference_mode=False)``."""
        episode = self._check_episode(batch, need_query_y=False)
        return self.adapt_and_predict(episode.support_x, episode.support_y, episode.query_x)

    # ------------------------------------------------------------------ forward
    @override
    def forward(self, episode: Episode) -> Tensor:
        """Query outputs of every task of a batched episode, ``(tasks, ways * queries, ...)``."""
        episode = self._check_episode(episode)
        return self.episode_outputs(episode)

    def episode_outputs(self, episode: Episode) -> Tensor:
        """:meth:`forward_tasks` of a batch; a padded batch (variable-way episodes) runs task by task without its
        padding, in a loop (``lightning_meta.algorithms.padding.run_unpadded``)."""
        capturing = episode.support_x.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing or not episode.is_padded:
            return self.forward_tasks(episode.support_x, episode.support_y, episode.query_x)
        previous, self._mode_override = self._mode_override, "loop"
        try:
            return run_unpadded(self.forward_tasks, episode)
        finally:
            self._mode_override = previous

    def forward_tasks(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Run ``predict(adapt(support), query)`` for every task (leading dim), as a loop or with vmap."""
        return self.run_tasks(self.adapt, self.predict, support_x, support_y, query_x)

    def run_tasks(
        self,
        adapt: Callable[[Tensor, Tensor], Any],
        predict: Callable[[Any, Tensor], Tensor],
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
    ) -> Tensor:
        """``predict(adapt(support), query)`` per task in the resolved ``task_mode``, with the evaluation grad handling
        of :meth:`task_outputs`; for batched methods that precompute something first (ANIL's features)."""
        one_task = self._per_task(adapt, predict)
        mode = self._resolve_task_mode(support_x, support_y, query_x, one_task)
        return run_tasks(one_task, support_x, support_y, query_x, mode=mode, randomness=self.vmap_randomness)

    def run_task_loss(
        self, task_loss: TaskLoss, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``task_loss`` of every task in the resolved ``task_mode`` (which it times): ``(losses (tasks,), outputs)``;
        for batched methods with their own per-task function (LEO's ``task_losses``)."""
        mode = self._resolve_task_mode(support_x, support_y, query_x, task_loss, query_y=query_y)
        return run_tasks(task_loss, support_x, support_y, query_x, query_y, mode=mode, randomness=self.vmap_randomness)

    def _per_task(
        self, adapt: Callable[[Tensor, Tensor], Any], predict: Callable[[Any, Tensor], Tensor]
    ) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        def one_task(sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
            if self.training:
                return predict(adapt(sx, sy), qx)
            with torch.enable_grad():
                state = adapt(sx, sy)
            with torch.no_grad():
                return predict(state, qx)

        return one_task

    def task_losses(self, episode: Episode) -> tuple[Tensor, Tensor]:
        """Per-task losses ``(tasks,)`` and the outputs: :meth:`task_loss` of every task when a subclass overrides
        it, else the query losses of :meth:`forward_tasks`'s outputs (cross-entropy, or MSE for regression)."""
        query_y = self._query_y(episode)
        if self._overrides("task_loss"):
            return self.run_task_loss(self.task_loss, episode.support_x, episode.support_y, episode.query_x, query_y)
        outputs = self.episode_outputs(episode)
        return self.query_losses(outputs, query_y), outputs

    @property
    def inner_loss_scale(self) -> float:
        """Loss scale for inner-loop gradients: 1 unless called under fp16 autocast (the dynamic scale then)."""
        return self.inner_loss_scaler.scale if _fp16_autocast(self.device) else 1.0

    # ------------------------------------------------------------------ training
    @override
    def training_step(self, batch: Episode, batch_idx: int) -> Tensor:
        episode = self._prepare(batch)
        params = [p for p in self.parameters() if p.requires_grad]
        result = self.batch_meta_gradient(episode, params)
        self._guard_nonfinite(result)
        self._log_training(result)
        # a surrogate whose value is the mean query loss and whose gradient is the meta-gradient: Lightning's
        # backward, DDP all-reduce, precision plugin, accumulation, clipping and optimizer step apply unchanged
        # cast: sum() of an empty list is 0, but params is never empty here (Adam refuses an empty parameter list)
        surrogate = cast(Tensor, sum((p * g).sum() for p, g in zip(params, result.grads)))
        return result.losses.mean() + surrogate - surrogate.detach()

    def batch_meta_gradient(self, episode: Episode, params: Sequence[Tensor]) -> MetaGradient:
        """:func:`~lightning_meta.functional.meta_gradient` of a training batch with this learner's hooks and
        execution settings (task mode and chunks, fp16 scale, CUDA graphs): what :meth:`training_step` descends."""
        query_y = self._query_y(episode)
        task_chunk, self._mode_override = self.resolve_task_chunk(episode)
        scale = self.inner_loss_scale

        padded = episode.is_padded  # checked once per step (a device sync), cached on the episode

        def chunk_losses(*chunk: Tensor) -> tuple[Tensor, Tensor]:
            part = Episode(*chunk)
            if not padded:  # the chunks of a batch without padding have none
                part.is_padded = False
            return self.task_losses(part)

        task_direction: TaskDirectionFn | None = None
        task_loss: TaskLoss | None = None
        if self._overrides("task_meta_gradient"):
            task_direction = self._chunk_directions(params)
        else:
            task_loss = chunk_losses
        try:
            return meta_gradient(
                params, episode.support_x, episode.support_y, episode.query_x, query_y, batched=True,
                task_chunk=task_chunk, loss_scale=scale, run_chunk=self._graph_runner(episode, scale),
                task_loss=task_loss, task_direction=task_direction,
            )  # fmt: skip
        finally:
            self._mode_override = None

    def _guard_nonfinite(self, result: MetaGradient) -> None:
        nonfinite = int(result.nonfinite.sum())
        if nonfinite:  # poison the gradient: after the DDP all-reduce every rank sees it and skips the same step
            result.grads[0].fill_(float("nan"))
            log.warning(
                "skipping the step: %d of %d tasks gave a non-finite loss or gradient", nonfinite, len(result.losses)
            )
        self.log(
            "train/nonfinite_tasks", float(nonfinite), on_step=True, on_epoch=False, reduce_fx="sum", sync_dist=False
        )

    def _log_training(self, result: MetaGradient) -> None:
        good = ~result.nonfinite
        if good.any():
            self.train_loss(result.losses[good])
            self.log("train/loss", self.train_loss, on_step=True, on_epoch=False, prog_bar=True)
            if result.scores is not None:
                self.train_score(result.scores[good])
                self.log("train/acc", self.train_score, on_step=True, on_epoch=False, prog_bar=True)

    # ------------------------------------------------------------------ evaluation
    @override
    def validation_step(self, batch: Episode, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: Episode, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    @override
    def on_validation_epoch_start(self) -> None:
        # fresh metric state per evaluation epoch: under ddp_spawn the main process's state tensors are shared with
        # the workers of an earlier fit, which updated them in place
        self.val_loss.reset()
        self.val_score.reset()

    @override
    def on_test_epoch_start(self) -> None:
        self.test_loss.reset()
        self.test_score.reset()
        self.test_score_ci95.reset()

    def _check_grad_possible(self, stage: str) -> None:
        if self.needs_grad_at_eval and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} adapts with gradients in {stage}, but the trainer runs {stage} under "
                "inference mode, where torch.enable_grad() has no effect; create the trainer with "
                "`Trainer(inference_mode=False)`"
            )

    def _evaluate(self, batch: Episode, stage: str) -> None:
        episode = self._prepare(batch)
        self._check_grad_possible(stage)
        with torch.no_grad():
            losses, outputs = self.task_losses(episode)
        loss_metric, score_metric = (
            (self.val_loss, self.val_score) if stage == "val" else (self.test_loss, self.test_score)
        )
        query_y = self._query_y(episode)
        if episode.is_regression:
            name, scores = "mse", per_task_mse(outputs, query_y)
        else:
            name, scores = "acc", per_task_accuracy(outputs, query_y)
        loss_metric.update(losses)
        score_metric.update(scores)
        self.log(f"{stage}/loss", loss_metric, on_step=False, on_epoch=True, prog_bar=stage == "val")
        self.log(f"{stage}/{name}", score_metric, on_step=False, on_epoch=True, prog_bar=stage == "val")
        if stage == "test":
            self.test_score_ci95.update(scores)
            self.log(f"test/{name}_ci95", self.test_score_ci95, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ optimization
    @override
    def configure_optimizers(self) -> Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.meta_lr)

    @override
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Run the closure, then step only if every gradient is finite (else count and skip the step)."""
        if optimizer_closure is None or not self.automatic_optimization:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        result = optimizer_closure()
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True
        if finite:
            self._consecutive_skipped = 0
            optimizer.step(closure=lambda: result)
        else:
            self.skipped_steps += 1
            self._consecutive_skipped += 1
        if self._fp16_active:
            self.inner_loss_scaler.update(found_nonfinite=not finite)
        self.log("train/skipped_steps", self.skipped_steps.float(), on_step=True, on_epoch=False)
        limit = self.max_consecutive_skipped_steps
        if limit is not None and self._consecutive_skipped >= limit:
            raise RuntimeError(
                f"{type(self).__name__}: the last {self._consecutive_skipped} optimizer steps were all skipped "
                "because the loss or the meta-gradient was not finite (NaN/inf), so the run is not learning; lower "
                "the inner or outer learning rate, check the data for NaNs, or raise "
                f"max_consecutive_skipped_steps={limit} (None never stops)"
            )

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[FP16_SCALE_KEY] = self.inner_loss_scaler.state_dict()
        # task_mode="auto"'s decisions: a resumed run reuses them instead of timing again (loop and vmap differ in rounding)
        checkpoint["lightning_meta_task_mode"] = self.task_mode_selector.state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if FP16_SCALE_KEY in checkpoint:
            self.inner_loss_scaler.load_state_dict(checkpoint[FP16_SCALE_KEY])
        if "lightning_meta_task_mode" in checkpoint:
            self.task_mode_selector.load_state_dict(checkpoint["lightning_meta_task_mode"])

    # ------------------------------------------------------------------ helpers
    def _check_episode(self, batch: Any, need_query_y: bool = True) -> Episode:
        if not isinstance(batch, Episode):
            raise TypeError(f"{type(self).__name__} expects an Episode batch, got {type(batch).__name__}")
        return batch.check_batched(type(self).__name__, need_query_y)

    def _query_y(self, episode: Episode) -> Tensor:
        """The query labels of a training/evaluation batch (checked by :meth:`_prepare`; a clear error otherwise)."""
        if episode.query_y is None:
            raise ValueError(
                f"{type(self).__name__} needs query_y (labelled queries) in training and evaluation; "
                "use predict_step or adapt_and_predict for unlabelled queries"
            )
        return episode.query_y

    def _prepare(self, batch: Any) -> Episode:
        """Check a training/evaluation batch; at the first step on a CPU apply :attr:`keep_freed_cpu_memory`."""
        episode = self._check_episode(batch)
        if self.keep_freed_cpu_memory and episode.support_x.device.type == "cpu":
            keep_freed_memory()  # once per process, logged once
        self._fp16_active = _fp16_autocast(episode.support_x.device)
        return episode


def _fp16_autocast(device: torch.device) -> bool:
    kind = device.type
    return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16
