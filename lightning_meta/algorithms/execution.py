"""How the tasks of a batch run: a loop or ``torch.func.vmap`` (``task_mode``), in chunks (``task_chunk``), eagerly
or as CUDA graphs.

:class:`TaskExecution` is the part of :class:`~lightning_meta.algorithms.MetaLearner` that resolves ``task_mode``
(``"auto"`` asks :class:`~lightning_meta.functional.TaskModeSelector`, running the function that the step will run)
and ``task_chunk`` for a batch, refuses vmap where it would compute wrong gradients, runs
``task_meta_gradient`` per task, and replays chunks as CUDA graphs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from lightning_meta.episode import Episode
from lightning_meta.functional.graphs import CudaGraphCache, module_graph_state
from lightning_meta.functional.meta_gradient import ChunkRunner
from lightning_meta.functional.tasks import TaskMode, TaskModeSelector, run_tasks
from lightning_meta.nn.norm import TaskBatchNorm

__all__ = ["TaskExecution", "check_execution"]

log = logging.getLogger(__name__)


class TaskExecution(nn.Module):
    """Task execution for :class:`~lightning_meta.algorithms.MetaLearner` (a mixin: it reads the learner's execution
    settings, its task-mode selector, graph cache and per-task hooks)."""

    # set by MetaLearner (class attributes and __init__); declared here for the type checker
    task_mode: TaskMode
    task_chunk: int | Literal["auto"] | None
    cuda_graphs: bool
    vmap_randomness: str
    task_mode_trial_tasks: int
    task_mode_selector: TaskModeSelector
    _fp16_active: bool
    _warned_vmap_unsafe: bool
    _mode_override: Literal["loop", "vmap"] | None
    _graph_cache: CudaGraphCache
    _warned_graph_autocast: bool

    if TYPE_CHECKING:  # MetaLearner's per-task hooks and helpers, which the methods below call

        def adapt(self, support_x: Tensor, support_y: Tensor) -> Any: ...

        def predict(self, state: Any, query_x: Tensor) -> Tensor: ...

        def task_loss(
            self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
        ) -> tuple[Tensor, Tensor]: ...

        def task_meta_gradient(
            self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
        ) -> tuple[dict[str, Tensor], Tensor, Tensor]: ...

        def _per_task(
            self, adapt: Callable[[Tensor, Tensor], Any], predict: Callable[[Any, Tensor], Tensor]
        ) -> Callable[[Tensor, Tensor, Tensor], Tensor]: ...

        def _overrides(self, name: str) -> bool: ...

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
        query_y: Tensor | None = None,
        differentiate: bool = True,
        chunkable: bool = False,
    ) -> Literal["loop", "vmap"]:
        """``"loop"`` or ``"vmap"`` for these inputs; ``"auto"`` measures ``one_task`` (default: ``predict(adapt)``)
        with :class:`TaskModeSelector`, called with ``query_y`` too when given, and (in training, if
        ``differentiate``) its first output's backward; ``chunkable``: the caller runs vmap in the selector's
        chunks."""
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
        tensors = [t for t in (support_x, support_y, query_x, query_y) if t is not None]

        def run(mode: Literal["loop", "vmap"], n: int) -> None:
            step = 1 if mode == "loop" and loop_chunk == 1 else n
            for i in range(0, n, step):
                sl = slice(i, min(i + step, n))
                out = run_tasks(one_task, *(t[sl] for t in tensors), mode=mode, randomness=self.vmap_randomness)
                first = out[0] if isinstance(out, tuple) else out
                if differentiate and self.training and params and first.requires_grad:
                    torch.autograd.grad(first.float().sum(), params, allow_unused=True)

        return self.task_mode_selector.select(
            key,
            run,
            support_x.device,
            tasks=support_x.shape[0],
            trial_tasks=self.task_mode_trial_tasks,
            loop_chunk=loop_chunk,
            chunkable=chunkable,
        )

    def resolve_task_chunk(self, episode: Episode) -> tuple[int | None, Literal["loop", "vmap"] | None]:
        """``(task_chunk, task mode)`` for a training batch: ``task_chunk="auto"`` is 1 in loop mode; under vmap all
        tasks, or the chunk that fits ``task_mode="auto"``'s memory budget. With ``task_chunk=None`` and
        ``task_mode="auto"`` the loop keeps every task's graph, and vmap runs in the chunks that fit. The mode is
        resolved here, on the whole batch, and pinned for its chunks."""
        auto_chunks = self.task_chunk is None and self.task_mode == "auto"
        if self.task_chunk != "auto" and not auto_chunks:
            return self.task_chunk, None
        if episode.is_padded:  # variable-way batches run task by task (MetaLearner.episode_outputs)
            return 1, "loop"
        sx, sy, qx = episode.support_x, episode.support_y, episode.query_x
        if self._overrides("task_meta_gradient"):  # time the function that runs
            params = [p for p in self.parameters() if p.requires_grad]
            mode = self._resolve_task_mode(
                sx, sy, qx, self._direction_task(params), query_y=episode.query_y, differentiate=False, chunkable=True
            )
        elif self._overrides("task_loss"):
            mode = self._resolve_task_mode(sx, sy, qx, self.task_loss, query_y=episode.query_y, chunkable=True)
        else:
            mode = self._resolve_task_mode(sx, sy, qx, chunkable=True)
        if mode == "loop":
            return (None if auto_chunks else 1), mode
        key = TaskModeSelector.key(type(self).__name__, self.training, self._fp16_active, tensors=(sx, sy, qx))
        return self.task_mode_selector.chunk(key), mode

    def _direction_task(self, params: Sequence[Tensor]) -> Callable[..., tuple[Tensor, ...]]:
        """:meth:`task_meta_gradient` returning a flat ``(loss, outputs, *directions aligned with params)`` (vmappable)."""
        names = {id(p): n for n, p in self.named_parameters()}
        order = [names[id(p)] for p in params]

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, ...]:
            directions, loss, outputs = self.task_meta_gradient(sx, sy, qx, qy)
            unknown = sorted(set(directions) - set(order))
            if unknown:
                raise KeyError(
                    f"{type(self).__name__}.task_meta_gradient returned directions for {unknown}, which are not "
                    f"trainable parameters; use names from named_parameters(), e.g. {order[:4]}"
                )
            dirs = [directions[n].detach() if n in directions else torch.zeros_like(p) for n, p in zip(order, params)]
            return (loss.detach(), outputs.detach(), *dirs)

        return one_task

    def _chunk_directions(self, params: Sequence[Tensor]) -> Callable[..., tuple[list[Tensor], Tensor, Tensor]]:
        """A chunk's per-task directions (leading task dimension), losses and outputs, in the resolved task mode."""
        one_task = self._direction_task(params)

        def chunk(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
            mode = self._resolve_task_mode(sx, sy, qx, one_task, query_y=qy, differentiate=False)
            loss, outputs, *dirs = run_tasks(one_task, sx, sy, qx, qy, mode=mode, randomness=self.vmap_randomness)
            return dirs, loss, outputs

        return chunk

    def _graph_runner(self, episode: Episode, scale: float) -> ChunkRunner | None:
        """Replays chunks as CUDA graphs (``cuda_graphs=True``, CUDA data, no autocast), else None (eager)."""
        if not self.cuda_graphs or episode.support_x.device.type != "cuda" or episode.is_padded:
            return None
        if torch.is_autocast_enabled("cuda"):
            if not self._warned_graph_autocast:
                log.warning(
                    "cuda_graphs=True: mixed-precision (autocast) steps run eagerly; CUDA graphs are used in fp32 "
                    "(and with bf16/fp16 weights) only"
                )
                self._warned_graph_autocast = True
            return None
        state = module_graph_state(self, scale)  # once per step: the same for every chunk

        def run(fn: Callable[..., Any], inputs: tuple[Tensor, ...]) -> Any:
            key = (TaskModeSelector.key(type(self).__name__, tensors=inputs), state)
            return self._graph_cache.run(key, fn, inputs)

        return run


def check_execution(
    meta_lr: float, task_mode: Any, task_chunk: Any, inner_loss_scale: Any, cuda_graphs: Any, max_skipped: Any
) -> None:
    """Raise ``ValueError`` naming the first execution argument of :class:`MetaLearner` that is not valid."""
    if not meta_lr > 0:
        raise ValueError(f"meta_lr={meta_lr} must be > 0")
    if task_mode not in ("auto", "loop", "vmap"):
        raise ValueError(f"task_mode={task_mode!r}; use 'auto', 'loop' or 'vmap'")
    if task_chunk != "auto" and task_chunk is not None and (isinstance(task_chunk, str) or task_chunk < 1):
        raise ValueError(f"task_chunk={task_chunk!r} must be >= 1, None for all tasks of a batch at once, or 'auto'")
    if inner_loss_scale is not None and not inner_loss_scale > 0:
        raise ValueError(f"inner_loss_scale={inner_loss_scale} must be > 0 (or None for a dynamic scale)")
    if max_skipped is not None and (
        isinstance(max_skipped, bool) or not isinstance(max_skipped, int) or max_skipped < 1
    ):
        raise ValueError(
            f"max_consecutive_skipped_steps={max_skipped!r} must be an integer >= 1 (or None to never stop)"
        )
    if not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs={cuda_graphs!r} must be True or False")
