"""Running a per-task function over the tasks of a batch: a Python loop or ``torch.func.vmap``.

Which is faster depends on the device: on a CPU the loop usually wins (vmap's batched kernels are no
faster and add overhead); on a GPU, where per-task kernel launches dominate, vmap is the point.
:class:`TaskModeSelector` decides by timing both on the first batch and caches the choice per
``(device, shapes, ...)`` key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any, Literal, Sequence, Union

import torch
from torch import Tensor

from lightning_meta.functional.adaptation import inside_vmap
from lightning_meta.memory import release_freed_memory

__all__ = ["TaskMode", "TaskModeSelector", "loop_tasks", "run_tasks", "task_chunks", "vmap_tasks"]

log = logging.getLogger(__name__)

TaskMode = Literal["auto", "loop", "vmap"]
Outputs = Union[Tensor, tuple[Tensor, ...]]


def vmap_tasks(fn: Callable[..., Outputs], *args: Tensor, randomness: str = "different") -> Outputs:
    """``fn`` applied to each task (leading dim of every arg) with ``torch.func.vmap``.

    Shared tensors that ``fn`` closes over (the meta-parameters) are broadcast (``in_dims=None``);
    per-task data is mapped (``in_dims=0``). ``randomness="different"`` gives each task its own dropout
    mask. Inner gradients inside ``fn`` use ``torch.func.grad`` (see :func:`inside_vmap`).

    Example:
        >>> vmap_tasks(lambda x, y: (x * y).sum(), torch.ones(3, 2), torch.arange(6.0).view(3, 2))
        tensor([1., 5., 9.])
    """
    with inside_vmap():
        return torch.func.vmap(fn, in_dims=0, randomness=randomness)(*args)


def loop_tasks(fn: Callable[..., Outputs], *args: Tensor) -> Outputs:
    """``fn`` applied to each task in a Python loop; outputs stacked along a new leading task dim.

    Example:
        >>> loop_tasks(lambda x, y: (x * y).sum(), torch.ones(3, 2), torch.arange(6.0).view(3, 2))
        tensor([1., 5., 9.])
    """
    tasks = args[0].shape[0]
    outs = [fn(*(a[i] for a in args)) for i in range(tasks)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*outs))
    return torch.stack(outs)


def run_tasks(fn: Callable[..., Outputs], *args: Tensor, mode: Literal["loop", "vmap"], randomness: str = "different") -> Outputs:
    """Dispatch to :func:`loop_tasks` or :func:`vmap_tasks`."""
    if mode == "vmap":
        return vmap_tasks(fn, *args, randomness=randomness)
    if mode == "loop":
        return loop_tasks(fn, *args)
    raise ValueError(f"mode={mode!r}; use 'loop' or 'vmap' (resolve 'auto' with TaskModeSelector first)")


def task_chunks(tasks: int, chunk: int | None) -> list[slice]:
    """Slices that cover ``range(tasks)`` in chunks of at most ``chunk`` tasks (one slice if ``chunk`` is None).

    Example:
        >>> task_chunks(5, 2)
        [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    if chunk is None or chunk >= tasks:
        return [slice(0, tasks)]
    if chunk < 1:
        raise ValueError(f"task_chunk={chunk} must be >= 1 (or None for all tasks at once)")
    return [slice(i, min(i + chunk, tasks)) for i in range(0, tasks, chunk)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TaskModeSelector:
    """Picks the faster of ``"loop"`` and ``"vmap"`` by timing both, once per key.

    On a CPU with one torch thread the clock is this process's CPU time (``time.process_time``), which
    other processes on a shared machine barely change; wall-clock time there once picked vmap at 515 vs
    575 ms when, on a free core, the loop was 265 vs 326 ms. With several CPU threads (where vmap may use
    them better) and on accelerators the clock is wall time. The choice is cached per key (callers put the device, input shapes, dtype and train/eval state in
    it) in this selector, and logged. If the vmap run raises (a module that cannot be vmapped, e.g. batch
    norm with running statistics), ``"loop"`` is chosen and the reason is logged.

    Args:
        repeats: timed runs per mode after one warm-up run; the minimum is compared.
        report: called with the message that states each choice (default: this module's logger at INFO).
    """

    def __init__(self, repeats: int = 3, report: Callable[[str], None] | None = None) -> None:
        if repeats < 1:
            raise ValueError(f"repeats={repeats} must be >= 1")
        self.repeats = repeats
        self.report = report if report is not None else log.info
        self.choices: dict[Hashable, str] = {}
        self.timings: dict[Hashable, dict[str, float]] = {}

    def select(self, key: Hashable, run: Callable[[str], Any], device: torch.device) -> str:
        """Return the cached choice for ``key`` or measure ``run("loop")`` against ``run("vmap")``.

        On a CPU the memory of the measurement (vmap's peak: ~1.4 GB on 8 Omniglot tasks) is handed back to the
        system afterwards (:func:`lightning_meta.memory.release_freed_memory`), where glibc would keep it resident.
        """
        if key in self.choices:
            return self.choices[key]
        try:
            return self._measure(key, run, device)
        finally:
            if torch.device(device).type == "cpu":
                release_freed_memory()

    def _measure(self, key: Hashable, run: Callable[[str], Any], device: torch.device) -> str:
        times: dict[str, float] = {}
        try:
            run("vmap")  # warm-up, and the check that the function can be vmapped at all
        except Exception as err:  # noqa: BLE001 - any failure means "cannot vmap this"
            self.report(f"task_mode auto: vmap failed ({type(err).__name__}: {err}); using the loop for {key}")
            self.choices[key] = "loop"
            return "loop"
        run("loop")
        clock = self.clock(device)
        best = {"loop": float("inf"), "vmap": float("inf")}
        for _ in range(self.repeats):
            for mode in ("loop", "vmap"):  # interleaved so that background load hits both
                _sync(device)
                t0 = clock()
                run(mode)
                _sync(device)
                best[mode] = min(best[mode], clock() - t0)
        times.update(best)
        choice = "vmap" if best["vmap"] < best["loop"] else "loop"
        self.choices[key] = choice
        self.timings[key] = times
        self.report(
            f"task_mode auto: {choice} (loop {1e3 * best['loop']:.2f} ms, vmap {1e3 * best['vmap']:.2f} ms"
            f"{' of CPU time' if clock is time.process_time else ''}) for {key}"
        )
        return choice

    @staticmethod
    def clock(device: torch.device) -> Callable[[], float]:
        """CPU time on a single-threaded CPU (robust to other processes' load), else wall time."""
        if torch.device(device).type == "cpu" and torch.get_num_threads() == 1:
            return time.process_time
        return time.perf_counter

    @staticmethod
    def key(*parts: Any, tensors: Sequence[Tensor] = ()) -> tuple:
        """A hashable cache key from ``parts`` and the device/shape/dtype of ``tensors``."""
        return (*parts, *((str(t.device), tuple(t.shape), t.dtype) for t in tensors))
