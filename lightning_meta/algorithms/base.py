"""MetaLearner: the one LightningModule base class of lightning-meta.

It owns what every few-shot learner shares: the training/validation/test steps over a batched
:class:`~lightning_meta.episode.Episode`, the metrics (torchmetrics, so they reduce across ranks),
the default outer optimizer, running the tasks of a batch as a loop or with ``torch.func.vmap``
(``task_mode``), bounding memory by tasks chunks (``task_chunk``), mixed precision of the inner loop,
non-finite guards and the inference-mode check of evaluation.

Subclassing contract
--------------------
A subclass says only how one task is learned:

* ``adapt(support_x, support_y) -> state``: adapt to one task (no task dimension:
  ``support_x (ways*shots, *x_shape)``). The state is anything ``predict`` understands, typically a
  dict of fast weights from :func:`lightning_meta.functional.adapt`. Read ``self.training`` to
  choose training behaviour (second-order graph, ``inner_steps``) or evaluation behaviour
  (``first_order=True``, detached meta-parameters, ``eval_inner_steps``). Pass
  ``loss_scale=self.inner_loss_scale`` to the functional core (it is 1 except under fp16 autocast).
* ``predict(state, query_x) -> outputs``: ``(ways*queries, ways)`` logits, or
  ``(queries, 1)``/``(queries,)`` regression outputs.

The base runs ``predict(adapt(...))`` per task, in a loop or under ``vmap`` (so ``adapt``/``predict``
must be vmappable: no data-dependent Python control flow, no batch norm with running statistics;
``task_mode="loop"`` lifts that restriction). At evaluation it runs ``adapt`` under
``torch.enable_grad()`` and ``predict`` under ``torch.no_grad()``.

Instead of the per-task pair a subclass may override one batched method,
``forward_tasks(support_x, support_y, query_x) -> outputs (tasks, queries, ...)`` (ProtoNet does);
it must then enable gradients for its own adaptation at evaluation (``with torch.enable_grad():``).
A batched method that precomputes something for all tasks and then adapts per task can hand its own
per-task pair to ``self.run_tasks(adapt_fn, predict_fn, support, support_y, query)`` and keep the
loop/vmap choice and the evaluation grad handling (ANIL's ``batch_features`` does). For latent codes or
context vectors instead of weights, use :func:`lightning_meta.functional.gradient_steps` with your own
objective over a dict of tensors. Subclasses with manual optimization override ``training_step``.
To change the outer objective (extra regularisers, as LEO's), override
``task_losses(episode) -> (per-task losses (tasks,), outputs)``. Learners that need no gradients at
evaluation set the class attribute ``needs_grad_at_eval = False``.

Outer gradients are computed inside ``training_step`` with ``torch.autograd.grad`` per chunk of
``task_chunk`` tasks (each chunk's graph is freed before the next is built, the learn2learn pattern,
scaled by 1/tasks) and handed to Lightning as a surrogate loss whose value is the mean query loss
and whose gradient is the accumulated meta-gradient; Lightning's backward, DDP all-reduce,
precision plugin, gradient accumulation/clipping and optimizer step apply to it unchanged.

Non-finite values: a task whose query loss is non-finite, or a chunk whose meta-gradient is,
is counted (``train/nonfinite_tasks``) and the whole optimizer step is skipped on every rank
(``train/skipped_steps``): the gradient is deliberately poisoned so that the DDP all-reduce spreads
the decision, and :meth:`MetaLearner.optimizer_step` skips ``optimizer.step()`` when any gradient is
non-finite. Meta-parameters are never written with a non-finite value. Zeroing only the bad task's
contribution was rejected: a NaN in one task's second-order graph leaks into others' gradients
through ``where``/multiply-by-zero masking.

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

import functools
import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MeanMetric, Metric
from typing_extensions import override

from lightning_meta.algorithms.metrics import MeanCI95
from lightning_meta.episode import Episode
from lightning_meta.functional.graphs import CudaGraphCache
from lightning_meta.functional.losses import per_task_accuracy, per_task_cross_entropy, per_task_mse
from lightning_meta.functional.tasks import TaskMode, TaskModeSelector, run_tasks, task_chunks
from lightning_meta.memory import keep_freed_memory
from lightning_meta.nn.norm import TaskBatchNorm

__all__ = ["MetaLearner"]

log = logging.getLogger(__name__)

_FP16_INIT_SCALE = 2.0**12
_FP16_MAX_SCALE = 2.0**16
_FP16_GROWTH_INTERVAL = 200


class MetaLearner(LightningModule):
    """Base class of few-shot learners; see the module docstring for the subclassing contract.

    Args:
        meta_lr: learning rate of the default outer optimizer, Adam.
        task_mode: how tasks of a batch are run: ``"loop"``, ``"vmap"``, or ``"auto"`` (on the first batch
            of each shape, the faster of the two whose memory fits ``task_memory_budget``, per device; the
            choice is logged once through :mod:`logging` and saved in checkpoints, so a resumed run keeps it).
            Both give the same results up to rounding; ``"auto"``'s trial runs draw random numbers (dropout),
            and each DDP rank measures for itself, so pin a mode for bitwise-reproducible runs across ranks.
        task_chunk: tasks whose graphs are alive at once in training (``None``: all tasks of the
            batch). Lower it to bound memory; the meta-gradient is the same. ``"auto"``: 1 when the
            tasks run as a loop (each task's graph is freed after its backward, as in learn2learn:
            peak memory of one task, and no slower on CPU) and all tasks under vmap (which needs them
            in one call), or, with ``task_mode="auto"``, the chunk of tasks that fits the memory budget.
        inner_loss_scale: scale of the inner (and outer) loss before differentiation under fp16
            autocast, so fp16 gradients do not underflow. ``None``: dynamic, starting at 2**12,
            halved on every skipped step and doubled after 200 good ones. Ignored (1.0) without fp16.
        cuda_graphs: on a CUDA device, record the meta-gradient computation of a chunk of tasks (``task_chunk``;
            one task in the per-task loop) as a CUDA graph after two eager warm-up calls and replay it for every
            later chunk of the same shape (:class:`~lightning_meta.functional.CudaGraphCache`): one launch per chunk
            instead of thousands of small kernels, which is where a per-task loop on a GPU spends its time, with
            one chunk's memory. A graph is recorded per chunk shape and per value of the module's Python settings
            (a changed ``inner_lr`` records a new one). Steps under autocast (``precision="bf16-mixed"``/
            ``"16-mixed"``), on a CPU, and evaluation run eagerly. The adapt/predict code must not synchronise with
            the host (no ``.item()``).
        task_memory_budget: memory that ``task_mode="auto"`` may give the tasks of a batch: bytes, a fraction in
            (0, 1] of the free memory, or ``None`` (default: half the free memory on CUDA, the loop's own peak on a
            CPU). vmap is chosen only where it fits, in chunks if the whole batch does not (see
            :class:`~lightning_meta.functional.TaskModeSelector`); subclasses without this argument take
            ``model.task_mode_selector.memory_budget = ...``. The decisions are saved in checkpoints and reused on
            resume.
    """

    #: Set to False in learners that adapt without gradients (e.g. ProtoNet).
    needs_grad_at_eval: bool = True
    #: ``randomness`` of ``torch.func.vmap`` over tasks ("different": each task its own dropout mask).
    vmap_randomness: str = "different"
    #: ``task_mode="auto"`` times loop against vmap on at most this many tasks of the first batch.
    task_mode_trial_tasks: int = 8
    #: At the first step on a CPU, have glibc keep freed memory for reuse (:func:`lightning_meta.memory.keep_freed_memory`:
    #: a step's activations then do not page-fault in again for every task; ~15 % of a MAML step). Process-wide;
    #: False (or ``LIGHTNING_META_KEEP_FREED_MEMORY=0``) leaves ``malloc`` alone.
    keep_freed_cpu_memory: bool = True

    def __init__(
        self,
        *,
        meta_lr: float = 1e-3,
        task_mode: TaskMode = "auto",
        task_chunk: int | Literal["auto"] | None = None,
        inner_loss_scale: float | None = None,
        cuda_graphs: bool = False,
        task_memory_budget: float | None = None,
    ) -> None:
        super().__init__()
        if not meta_lr > 0:
            raise ValueError(f"meta_lr={meta_lr} must be > 0")
        if task_mode not in ("auto", "loop", "vmap"):
            raise ValueError(f"task_mode={task_mode!r}; use 'auto', 'loop' or 'vmap'")
        if task_chunk != "auto" and task_chunk is not None and (isinstance(task_chunk, str) or task_chunk < 1):
            raise ValueError(
                f"task_chunk={task_chunk!r} must be >= 1, None for all tasks of a batch at once, or 'auto'"
            )
        if inner_loss_scale is not None and not inner_loss_scale > 0:
            raise ValueError(f"inner_loss_scale={inner_loss_scale} must be > 0 (or None for a dynamic scale)")
        self.meta_lr = meta_lr
        self.task_mode = task_mode
        self.task_chunk = task_chunk
        self.inner_loss_scale_init = inner_loss_scale
        self.train_loss, self.train_score = MeanMetric(), MeanMetric()
        self.val_loss, self.val_score = MeanMetric(), MeanMetric()
        self.test_loss, self.test_score, self.test_score_ci95 = MeanMetric(), MeanMetric(), MeanCI95()
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.task_mode_selector = TaskModeSelector(memory_budget=task_memory_budget)
        self._fp16_scale = _FP16_INIT_SCALE if inner_loss_scale is None else inner_loss_scale
        self._fp16_good_steps = 0
        self._fp16_active = False
        self._warned_vmap_unsafe = False
        self._mode_override: str | None = None
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs={cuda_graphs!r} must be True or False")
        self.cuda_graphs = cuda_graphs
        self._graph_cache = CudaGraphCache()
        self._warned_graph_autocast = False

    # ------------------------------------------------------------------ the subclass's part
    def adapt(self, support_x: Tensor, support_y: Tensor) -> Any:
        """Adapt to one task's support set and return a task state (see the module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must implement adapt() and predict(), or forward_tasks()")

    def predict(self, state: Any, query_x: Tensor) -> Tensor:
        """Outputs for one task's queries given the state returned by :meth:`adapt`."""
        raise NotImplementedError(f"{type(self).__name__} must implement adapt() and predict(), or forward_tasks()")

    # ------------------------------------------------------------------ forward
    @override
    def forward(self, episode: Episode) -> Tensor:
        """Query outputs of every task of a batched episode, ``(tasks, ways * queries, ...)``."""
        episode = self._check_episode(episode)
        return self.forward_tasks(episode.support_x, episode.support_y, episode.query_x)

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
        """``predict(adapt(support), query)`` per task under the resolved ``task_mode`` (loop or vmap).

        At evaluation ``adapt`` runs under ``torch.enable_grad()`` and ``predict`` under ``torch.no_grad()``.
        Subclasses that precompute something for all tasks (ANIL's batched features) call this with their
        own per-task pair.
        """

        one_task = self._per_task(adapt, predict)
        mode = self._resolve_task_mode(support_x, support_y, query_x, one_task)
        return run_tasks(one_task, support_x, support_y, query_x, mode=mode, randomness=self.vmap_randomness)

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
        """Per-task query losses ``(tasks,)`` (cross-entropy, or MSE for regression) and the outputs."""
        outputs = self.forward_tasks(episode.support_x, episode.support_y, episode.query_x)
        if episode.is_regression:
            return per_task_mse(outputs, episode.query_y), outputs
        return per_task_cross_entropy(outputs, episode.query_y), outputs

    @property
    def inner_loss_scale(self) -> float:
        """Loss scale for inner-loop gradients: 1 unless called under fp16 autocast (the dynamic scale then)."""
        return self._fp16_scale if _fp16_autocast(self.device) else 1.0

    # ------------------------------------------------------------------ training
    @override
    def training_step(self, batch: Episode, batch_idx: int) -> Tensor:
        episode = self._check_episode(batch)
        self._on_cpu_keep_memory(episode)
        self._fp16_active = _fp16_autocast(episode.support_x.device)
        scale = self.inner_loss_scale
        params = [p for p in self.parameters() if p.requires_grad]
        tasks = episode.tasks
        task_chunk, self._mode_override = self.resolve_task_chunk(episode)
        graphs = self._graphs_apply(episode)
        graph_state = self._graph_state(params, scale) if graphs else None  # once per step: the same for every chunk
        grad_sum = [torch.zeros_like(p) for p in params]
        losses_all, bad_all, scores_all = [], [], []
        try:
            for sl in task_chunks(tasks, task_chunk):
                inputs = (episode.support_x[sl], episode.support_y[sl], episode.query_x[sl], episode.query_y[sl])
                if graphs:  # one graph per chunk shape: its memory pool holds one chunk's tensors
                    key = (TaskModeSelector.key(type(self).__name__, tensors=inputs), graph_state)
                    fn = functools.partial(self._chunk_meta_gradient, params=params, scale=scale)
                    grads, losses, bad, scores = self._graph_cache.run(key, fn, inputs)
                else:
                    grads, losses, bad, scores = self._chunk_meta_gradient(*inputs, params=params, scale=scale)
                torch._foreach_add_(grad_sum, grads, alpha=1.0 / tasks)
                losses_all.append(losses)
                bad_all.append(bad)
                if scores is not None:
                    scores_all.append(scores)
        finally:
            self._mode_override = None
        losses, bad = torch.cat(losses_all), torch.cat(bad_all)
        scores = torch.cat(scores_all) if scores_all else None
        nonfinite = int(bad.sum())
        if nonfinite:
            # Poison the gradient: after the DDP all-reduce every rank sees it and skips the same step.
            grad_sum[0].fill_(float("nan"))
            log.warning("skipping the step: %d of %d tasks gave a non-finite loss or gradient", nonfinite, tasks)
        self.log("train/nonfinite_tasks", float(nonfinite), on_step=True, on_epoch=False, reduce_fx="sum", sync_dist=False)
        good = ~bad
        if good.any():
            self.train_loss(losses[good])
            self.log("train/loss", self.train_loss, on_step=True, on_epoch=False, prog_bar=True)
            if scores is not None:
                self.train_score(scores[good])
                self.log("train/acc", self.train_score, on_step=True, on_epoch=False, prog_bar=True)
        surrogate = sum((p * g).sum() for p, g in zip(params, grad_sum))
        return losses.mean() + surrogate - surrogate.detach()

    def _chunk_meta_gradient(
        self, *inputs: Tensor, params: list[Tensor], scale: float
    ) -> tuple[list[Tensor], Tensor, Tensor, Tensor | None]:
        """For one chunk of tasks ``(support_x, support_y, query_x, query_y)``: the gradient of the sum of its
        tasks' query losses (zeros for unused parameters), the losses, the per-task non-finite flags and accuracies
        (None for regression). Tensor work only (no host synchronisation), so that it can be recorded as a CUDA
        graph."""
        chunk = Episode(*inputs)
        losses, outputs = self.task_losses(chunk)  # (chunk,), (chunk, queries, ...)
        grads = torch.autograd.grad(losses.sum() * scale, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else (g / scale if scale != 1.0 else g) for p, g in zip(params, grads)]
        finite = torch.stack([g.isfinite().all() for g in grads]).all() if grads else losses.new_ones((), dtype=torch.bool)
        bad = ~losses.detach().isfinite()
        # A non-finite gradient with finite losses: blame the whole chunk (the tasks cannot be told apart).
        bad = bad | (~finite & ~bad.any())
        scores = None if chunk.is_regression else per_task_accuracy(outputs.detach(), chunk.query_y)
        return grads, losses.detach(), bad, scores

    def _on_cpu_keep_memory(self, episode: Episode) -> None:
        if self.keep_freed_cpu_memory and episode.support_x.device.type == "cpu":
            keep_freed_memory()  # once per process

    def _graphs_apply(self, episode: Episode) -> bool:
        """Whether this training step runs as a CUDA graph (``cuda_graphs=True``, CUDA data, no autocast)."""
        if not self.cuda_graphs or episode.support_x.device.type != "cuda":
            return False
        if torch.is_autocast_enabled("cuda"):
            if not self._warned_graph_autocast:
                log.warning(
                    "cuda_graphs=True: mixed-precision (autocast) steps run eagerly; CUDA graphs are used in fp32 "
                    "(and with bf16/fp16 weights) only"
                )
                self._warned_graph_autocast = True
            return False
        return True

    def _graph_state(self, params: list[Tensor], scale: float) -> tuple:
        """What a recorded chunk depends on besides its inputs (whose shapes and dtypes complete its key): the
        storage of every parameter and buffer, the loss scale, and every plain Python attribute of every submodule
        (rates, step counts, ``training``, the task mode, ...): a change to any of them records a new graph."""
        state = []
        for name, module in self.named_modules():
            if isinstance(module, Metric):  # logging state, not part of the computation
                continue
            for attr, value in vars(module).items():
                if attr.startswith("_") and attr != "_mode_override":
                    continue
                if value is None or isinstance(value, (bool, int, float, str)) or (
                    isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str)) for v in value)
                ):
                    state.append((name, attr, value))
        return (
            scale,
            tuple(p.data_ptr() for p in params),
            tuple((b.data_ptr(), b.dtype) for b in self.buffers()),
            tuple(state),
        )

    def resolve_task_chunk(self, episode: Episode) -> tuple[int | None, str | None]:
        """``(task_chunk, task mode)`` for a training batch: ``task_chunk="auto"`` is 1 in loop mode; under vmap all
        tasks, or the chunk that fits ``task_mode="auto"``'s memory budget. With ``task_chunk=None`` and
        ``task_mode="auto"`` the loop keeps every task's graph, and vmap runs in the chunks that fit. The mode is
        resolved here, on the whole batch, and pinned for its chunks."""
        auto_chunks = self.task_chunk is None and self.task_mode == "auto"
        if self.task_chunk != "auto" and not auto_chunks:
            return self.task_chunk, None
        sx, sy, qx = episode.support_x, episode.support_y, episode.query_x
        mode = self._resolve_task_mode(sx, sy, qx, chunkable=True)
        if mode == "loop":
            return (None if auto_chunks else 1), mode
        key = TaskModeSelector.key(type(self).__name__, self.training, self._fp16_active, tensors=(sx, sy, qx))
        return self.task_mode_selector.chunk(key), mode

    # ------------------------------------------------------------------ evaluation
    @override
    def validation_step(self, batch: Episode, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: Episode, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: Episode, stage: str) -> None:
        episode = self._check_episode(batch)
        self._on_cpu_keep_memory(episode)
        if self.needs_grad_at_eval and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} adapts with gradients in {stage}, but the trainer runs {stage} under "
                "inference mode, where torch.enable_grad() has no effect; create the trainer with "
                "`Trainer(inference_mode=False)`"
            )
        self._fp16_active = _fp16_autocast(episode.support_x.device)
        with torch.no_grad():
            losses, outputs = self.task_losses(episode)
        loss_metric, score_metric = (self.val_loss, self.val_score) if stage == "val" else (self.test_loss, self.test_score)
        if episode.is_regression:
            name, scores = "mse", per_task_mse(outputs, episode.query_y)
        else:
            name, scores = "acc", per_task_accuracy(outputs, episode.query_y)
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
            optimizer.step(closure=lambda: result)
            if self._fp16_active and self.inner_loss_scale_init is None:
                self._fp16_good_steps += 1
                if self._fp16_good_steps >= _FP16_GROWTH_INTERVAL:
                    self._fp16_scale = min(self._fp16_scale * 2.0, _FP16_MAX_SCALE)
                    self._fp16_good_steps = 0
        else:
            self.skipped_steps += 1
            if self._fp16_active and self.inner_loss_scale_init is None:
                self._fp16_scale = max(self._fp16_scale / 2.0, 1.0)
                self._fp16_good_steps = 0
        self.log("train/skipped_steps", self.skipped_steps.float(), on_step=True, on_epoch=False)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lightning_meta_fp16_inner_scale"] = {"scale": self._fp16_scale, "good_steps": self._fp16_good_steps}
        # task_mode="auto"'s decisions: a resumed run reuses them instead of timing again (loop and vmap differ in rounding)
        checkpoint["lightning_meta_task_mode"] = self.task_mode_selector.state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lightning_meta_fp16_inner_scale")
        if state is not None:
            self._fp16_scale, self._fp16_good_steps = float(state["scale"]), int(state["good_steps"])
        if "lightning_meta_task_mode" in checkpoint:
            self.task_mode_selector.load_state_dict(checkpoint["lightning_meta_task_mode"])

    # ------------------------------------------------------------------ helpers
    def vmap_unsafe_reason(self) -> str | None:
        """Why the current step must not run under vmap, or None. Override to refine.

        The default flags second-order training through fused ``nn.BatchNorm*d`` modules, whose
        second-order gradients under ``torch.func.vmap`` are wrong (see :mod:`lightning_meta.nn.norm`).
        """
        if not self.training or getattr(self, "first_order", False):
            return None
        fused = [
            n
            for n, m in self.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, TaskBatchNorm)
        ]
        if not fused:
            return None
        return (
            f"fused batch norm {fused[:3]} gives wrong second-order gradients under torch.func.vmap "
            "(pytorch/functorch#534); convert it with lightning_meta.nn.convert_batchnorm(backbone) or use "
            "task_mode='loop'"
        )

    def _resolve_task_mode(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        one_task: Callable[..., Any] | None = None,
        *,
        chunkable: bool = False,
    ) -> str:
        """``"loop"`` or ``"vmap"`` for these inputs; ``"auto"`` measures ``one_task`` (default: ``predict(adapt)``)
        with :class:`TaskModeSelector`; ``chunkable``: the caller runs vmap in the selector's chunks."""
        if self._mode_override is not None:
            return self._mode_override
        if one_task is None:
            one_task = self._per_task(self.adapt, self.predict)
        reason = self.vmap_unsafe_reason()
        if reason is not None:
            if self.task_mode == "vmap":
                raise ValueError(f"task_mode='vmap' is unsafe for {type(self).__name__}: {reason}")
            if self.task_mode == "auto" and not self._warned_vmap_unsafe:
                log.warning("task_mode auto: using the loop because %s", reason)
                self._warned_vmap_unsafe = True
            return "loop"
        if self.task_mode != "auto":
            return self.task_mode
        key = TaskModeSelector.key(
            type(self).__name__, self.training, self._fp16_active, tensors=(support_x, support_y, query_x)
        )
        params = [p for p in self.parameters() if p.requires_grad]

        # the trial runs slices of the batch (at most task_mode_trial_tasks tasks), the loop as the step runs it: one
        # task's graph at a time under task_chunk="auto" (and at evaluation, where nothing is kept), else all of them
        loop_chunk = 1 if (self.task_chunk == "auto" and chunkable) or not self.training else None

        def run(mode: str, n: int) -> None:
            step = 1 if mode == "loop" and loop_chunk == 1 else n
            for i in range(0, n, step):
                sl = slice(i, min(i + step, n))
                out = run_tasks(one_task, support_x[sl], support_y[sl], query_x[sl], mode=mode,
                                randomness=self.vmap_randomness)
                first = out[0] if isinstance(out, tuple) else out
                if self.training and params and first.requires_grad:
                    torch.autograd.grad(first.float().sum(), params, allow_unused=True)

        return self.task_mode_selector.select(
            key, run, support_x.device, tasks=support_x.shape[0], trial_tasks=self.task_mode_trial_tasks,
            loop_chunk=loop_chunk, chunkable=chunkable,
        )

    def _check_episode(self, batch: Any) -> Episode:
        if not isinstance(batch, Episode):
            raise TypeError(f"{type(self).__name__} expects an Episode batch, got {type(batch).__name__}")
        if batch.support_y.dim() != 2 or batch.query_y.dim() != 2:
            raise ValueError(
                f"expected a batched Episode with a leading task dimension (support_y (tasks, examples)), got "
                f"support_y {tuple(batch.support_y.shape)}; batch episodes with a DataLoader or Episode.collate"
            )
        if batch.support_x.shape[2:] != batch.query_x.shape[2:]:
            raise ValueError(
                f"support inputs {tuple(batch.support_x.shape[2:])} and query inputs "
                f"{tuple(batch.query_x.shape[2:])} have different shapes"
            )
        return batch


def _fp16_autocast(device: torch.device) -> bool:
    kind = device.type
    return torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16
