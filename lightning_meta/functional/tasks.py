"""Running a per-task function over the tasks of a batch: a Python loop or ``torch.func.vmap``.

Which is faster depends on the device: on a CPU the loop usually wins (vmap's batched kernels are no
faster and add overhead); on a GPU, where per-task kernel launches dominate, vmap is the point.
:class:`TaskModeSelector` picks the faster of the two whose measured memory fits a budget (vmap possibly in
chunks of tasks), on the first batch of each ``(device, shapes, ...)`` size bucket (a bounded number of trials when
the episode shapes keep changing), and keeps the choice (also across a checkpoint and resume).
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, TypeVar, cast

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from typing_extensions import Self

from lightning_meta.functional.adaptation import inside_vmap
from lightning_meta.memory import release_freed_memory

__all__ = [
    "MemoryOverBudget",
    "TaskMode",
    "TaskModeSelector",
    "default_memory_budget",
    "loop_tasks",
    "run_tasks",
    "task_chunks",
    "vmap_tasks",
]

log = logging.getLogger(__name__)

TaskMode = Literal["auto", "loop", "vmap"]
Outputs = Tensor | tuple[Tensor, ...]
#: what a per-task function returns; running it over tasks keeps that structure (a tensor, or a tuple of them)
_O = TypeVar("_O", bound=Outputs)


def vmap_tasks(fn: Callable[..., _O], *args: Tensor, randomness: str = "different") -> _O:
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


def loop_tasks(fn: Callable[..., _O], *args: Tensor) -> _O:
    """``fn`` applied to each task in a Python loop; outputs stacked along a new leading task dim.

    Example:
        >>> loop_tasks(lambda x, y: (x * y).sum(), torch.ones(3, 2), torch.arange(6.0).view(3, 2))
        tensor([1., 5., 9.])
    """
    tasks = args[0].shape[0]
    outs = [fn(*(a[i] for a in args)) for i in range(tasks)]
    # fn returns the same structure for every task, and stacking keeps it: a tensor, or a tuple of as many tensors
    if isinstance(outs[0], tuple):
        return cast(_O, tuple(torch.stack(parts) for parts in zip(*cast(list[tuple[Tensor, ...]], outs))))
    return cast(_O, torch.stack(cast(list[Tensor], outs)))


def run_tasks(fn: Callable[..., _O], *args: Tensor, mode: Literal["loop", "vmap"], randomness: str = "different") -> _O:
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


class MemoryOverBudget(RuntimeError):
    """Raised inside a measured trial run when its live memory passes the limit (the run is abandoned)."""


class _LiveMemory(TorchDispatchMode):
    """Peak bytes of tensor memory created during a run and still alive, checked against ``limit`` after every op.

    CPU: every storage an ATen op creates is counted until its last reference dies (``weakref.finalize``), so the
    figure is the tensors' own memory, deterministic and the same in every process: unlike RSS it does not depend on
    what the C allocator kept from earlier runs, on page-fault timing or on other threads. CUDA: the caching
    allocator's own count (``torch.cuda.memory_allocated``) is read after every op for the limit, and the peak is
    ``torch.cuda.max_memory_allocated`` (reset before the run).
    """

    def __init__(self, device: torch.device, limit: float) -> None:
        super().__init__()
        self.device, self.limit = device, limit
        self.live = self.peak = 0
        self.exceeded = False
        self._sizes: dict[int, int] = {}
        self._cuda_base = 0

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_base = torch.cuda.memory_allocated(self.device)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) - self._cuda_base)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.device.type == "cuda":
            self.live = torch.cuda.memory_allocated(self.device) - self._cuda_base
        else:
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor) and t.device.type == "cpu":
                    storage = t.untyped_storage()
                    key, size = storage.data_ptr(), storage.nbytes()
                    if size == 0 or key in inputs or key in self._sizes:  # a view, an in-place result, or counted
                        continue
                    self._sizes[key] = size
                    self.live += size
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.live)
        if self.live > self.limit:
            self.exceeded = True
            raise MemoryOverBudget(f"live memory {_mib(self.live)} passed the limit {_mib(self.limit)}")
        return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**40 else "unlimited"


def default_memory_budget(device: torch.device) -> float | None:
    """The default budget of a task mode's memory on ``device``, in bytes; None on a CPU (see :class:`TaskModeSelector`).

    CUDA: half of what the device can still give this process (free memory plus what PyTorch's caching allocator holds
    unused): room is left for the optimizer, evaluation and fragmentation. CPU: None, which the selector reads as
    "no more than the loop needs" (at least :data:`CPU_MIN_BUDGET`).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return 0.5 * (free + cached)
    return None


#: The least default budget on a CPU: small models (an MLP on sinusoids) may try vmap within it.
CPU_MIN_BUDGET = 64 << 20


class TaskModeSelector:
    """Picks the fastest of ``"loop"`` and ``"vmap"`` whose memory fits a budget, once per key, and remembers it.

    The trial, on the first batch of each key (callers put the device, input shapes, dtype and train/eval state in it;
    see below for keys that differ only in their number of examples):

    1. **loop**, on a few tasks of the batch, run as the real step runs them (``run(mode, n)`` is the caller's: e.g.
       one task's graph at a time): its peak memory per task alive at once, projected to the batch;
    2. **vmap memory**, on two tasks, only if its projection from the loop's per-task figure (vmap keeps at least the
       loop's activations per task) fits the budget; the run is abandoned as soon as its live memory passes the
       budget. Its per-task peak gives the tasks per vmap call that fit: the whole batch, or (where the caller can
       run chunks, ``chunkable=True``) the largest chunk, at least 2; else the loop is chosen without timing;
    3. **timing**, on ``min(trial_tasks, fitting chunk)`` tasks, interleaved, ``repeats`` times each after a warm-up;
       the lower time per task wins.

    So the trial's memory never exceeds the budget, and vmap is never timed where it could not be used. Memory is
    the peak of live tensor memory (see :class:`_LiveMemory`): on CUDA ``torch.cuda.max_memory_allocated`` with a
    reset; on a CPU the storages ATen ops create, counted until freed (RSS is not used: glibc keeps freed memory and
    serves a later run from it, so RSS growth depends on what ran before, and moves by tens of MiB between repeats).

    The budget (``memory_budget``): bytes, or a fraction in (0, 1] of the device's free memory (CUDA) or of the
    machine's available memory (CPU, ``MemAvailable``). Default (None): half the free memory on CUDA; on a CPU the
    loop's own projected peak (at least 64 MiB), i.e. ``auto`` never costs more memory than the loop there: on a CPU
    the loop is usually the faster anyway, and the vmap trial alone (two Omniglot Conv4 tasks: 214 MiB) would
    otherwise be the largest allocation of a MAML run.

    Clock: on a CPU with one torch thread the process's CPU time (``time.process_time``), which other processes on a
    shared machine barely change; else wall time. If the vmap run raises (a module that cannot be vmapped, e.g. batch
    norm with running statistics), ``"loop"`` is chosen and the reason is logged.

    Episode shapes that keep changing (unpadded variable-way, variable-shot episodes, one task per batch) would cost a
    trial nearly every step. Keys made by :meth:`key` whose tensors are batches ``(tasks, examples, ...)`` therefore
    share trials: a key with the same task count whose example counts round up to the same powers of two as a tried
    key's (its size bucket) reuses that trial's choice without timing: the loop as is, vmap if its memory per task,
    scaled by the growth of the example counts (never below the trial's), fits the budget (else a new trial). And
    once ``max_trials`` trials were run for keys that differ only in their task and example counts (a family), new
    shapes of the family take its most frequent choice (vmap only where it fits, else the loop) without a trial; this
    is logged once, and ``task_mode="loop"`` (or ``"vmap"``) pins the mode instead.

    Each trial's decision is reported once (``report``, default this module's logger at INFO) with its time and
    memory figures (a decision without a trial is logged at DEBUG). Every decision is kept in :attr:`decisions` and
    saved by :meth:`state_dict`: a selector that loaded it reuses the decision for the same key instead of timing
    again, and derives new shapes from the same saved trials, so that a resumed run computes exactly what an
    uninterrupted one would (loop and vmap agree only up to rounding).

    Args:
        repeats: timed runs per mode after the warm-up; the minimum is compared.
        report: called with the message that states each choice (default: this module's logger at INFO).
        memory_budget: see above.
        max_trials: trials per family of keys before new shapes take the family's most frequent choice (None: a
            trial for every new size bucket).
    """

    def __init__(
        self,
        repeats: int = 3,
        report: Callable[[str], None] | None = None,
        memory_budget: float | None = None,
        max_trials: int | None = 8,
    ) -> None:
        if repeats < 1:
            raise ValueError(f"repeats={repeats} must be >= 1")
        if max_trials is not None and (
            isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1
        ):
            raise ValueError(f"max_trials={max_trials!r} must be an integer >= 1 (or None to trial every bucket)")
        self.repeats = repeats
        self.max_trials = max_trials
        self.report = report if report is not None else log.info
        self.memory_budget = memory_budget
        self.choices: dict[Hashable, Literal["loop", "vmap"]] = {}
        self.timings: dict[Hashable, dict[str, float]] = {}
        #: key -> the decision: mode, vmap chunk (None: whole batch), per-task times and memory, budget, reason
        self.decisions: dict[Hashable, dict[str, Any]] = {}
        self._loaded: dict[str, dict[str, Any]] = {}
        #: the trials (decisions with shape fields) by size bucket and by family, loaded ones first, in order
        self._by_bucket: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self._by_family: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self._stopped_logged: set[str] = set()

    @property
    def memory_budget(self) -> float | None:
        """Bytes, a fraction in (0, 1] of the free memory, or None for the device's default (see the class)."""
        return self._memory_budget

    @memory_budget.setter
    def memory_budget(self, value: float | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(
                f"memory_budget={value!r}; use bytes (e.g. 2 * 2**30), a fraction in (0, 1] of the free memory, "
                "or None for the device's default"
            )
        self._memory_budget = value

    def budget(self, device: torch.device, loop_bytes: float = 0.0) -> float:
        """The budget in bytes on ``device``; ``loop_bytes`` is the loop's projected peak (the CPU default)."""
        device = torch.device(device)
        value = self.memory_budget
        if value is None:
            default = default_memory_budget(device)
            return max(float(CPU_MIN_BUDGET), loop_bytes) if default is None else default
        if value <= 1 and isinstance(value, float):
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                return value * (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
            return value * _available_cpu_memory()
        return float(value)

    def chunk(self, key: Hashable) -> int | None:
        """Tasks per vmap call chosen for ``key`` (None: the whole batch, or the loop)."""
        decision = self.decisions.get(key)
        return None if decision is None else decision.get("chunk")

    def select(
        self,
        key: Hashable,
        run: Callable[..., Any],
        device: torch.device,
        *,
        tasks: int | None = None,
        trial_tasks: int = 8,
        loop_chunk: int | None = None,
        chunkable: bool = False,
    ) -> Literal["loop", "vmap"]:
        """Return the choice for ``key``: cached, loaded from a checkpoint, or measured.

        Args:
            run: ``run(mode, n)`` runs the step's work (forward and backward) for the first ``n`` tasks of the batch
                in ``mode``, the loop as the real step runs it. Without ``tasks``: ``run(mode)`` runs a fixed slice,
                which is then the unit of memory and time.
            tasks: the tasks of the batch (the projections' target).
            trial_tasks: at most this many tasks are timed.
            loop_chunk: tasks whose graphs the loop keeps alive at once (None: all ``n``), for its projection.
            chunkable: whether the caller can run vmap in chunks of :meth:`chunk` tasks.

        On a CPU the memory of the trial is handed back to the system afterwards
        (:func:`lightning_meta.memory.release_freed_memory`), where glibc would keep it resident.
        """
        if key in self.choices:
            return self.choices[key]
        loaded = self._loaded.get(_key_string(key))
        if loaded is not None:
            self.decisions[key] = dict(loaded)
            self.choices[key] = loaded["mode"]
            log.debug("task_mode auto: %s for %s, from the checkpoint", loaded["mode"], key)
            return loaded["mode"]
        if tasks is None:
            unit = run
            run, tasks, trial_tasks, loop_chunk, chunkable = (lambda mode, n: unit(mode)), 1, 1, None, False
        shape = _ShapeClass.of(key)
        if shape is not None:
            reused = self._reuse(key, shape, torch.device(device), tasks, loop_chunk, chunkable)
            if reused is not None:
                return reused
        try:
            decision = self._measure(
                run, torch.device(device), tasks, max(1, min(trial_tasks, tasks)), loop_chunk, chunkable
            )
        finally:
            if torch.device(device).type == "cpu":
                release_freed_memory()
        if shape is not None:
            decision.update(shape.fields(), trial=True)
            self._index(_key_string(key), decision)
        self.decisions[key] = decision
        self.choices[key] = decision["mode"]
        if "loop_ms" in decision and "vmap_ms" in decision:
            self.timings[key] = {"loop": decision["loop_ms"] / 1e3, "vmap": decision["vmap_ms"] / 1e3}
        self.report(f"task_mode auto: {_describe(decision)} for {key}")
        return decision["mode"]

    def trials(self) -> int:
        """Trials whose decisions this selector holds for shape buckets (made here or loaded from a checkpoint)."""
        return sum(len(v) for v in self._by_family.values())

    def _index(self, name: str, decision: dict[str, Any]) -> None:
        if decision.get("trial") and isinstance(decision.get("examples"), list):
            self._by_bucket.setdefault(str(decision.get("bucket")), []).append((name, decision))
            self._by_family.setdefault(str(decision.get("family")), []).append((name, decision))

    def _reuse(
        self,
        key: Hashable,
        shape: _ShapeClass,
        device: torch.device,
        tasks: int,
        loop_chunk: int | None,
        chunkable: bool,
    ) -> Literal["loop", "vmap"] | None:
        """A decision for a new shape without a trial: from a trial of the same size bucket, or, once the family has
        had ``max_trials`` trials, its most frequent choice; None where a trial is needed."""
        decision = self._derive(self._by_bucket.get(shape.bucket, []), shape, device, tasks, loop_chunk, chunkable)
        family = self._by_family.get(shape.family, [])
        if decision is None and self.max_trials is not None and len(family) >= self.max_trials:
            votes = {m: sum(d["mode"] == m for _, d in family) for m in ("loop", "vmap")}
            mode = "vmap" if votes["vmap"] > votes["loop"] else "loop"
            if mode == "vmap":
                vmapped = [(k, d) for k, d in family if d["mode"] == "vmap"]
                decision = self._derive(vmapped, shape, device, tasks, loop_chunk, chunkable)
            if decision is None:
                decision = {"mode": "loop", "chunk": None, "tasks": tasks}
                if mode == "vmap":
                    decision["reason"] = "vmap, the most frequent choice, would not fit the memory budget"
            if shape.family not in self._stopped_logged:
                self._stopped_logged.add(shape.family)
                log.info(
                    "task_mode auto: %d trials for %s (%d chose the loop, %d vmap) and the episode shapes keep "
                    "changing: no further trials, new shapes use %s, the most frequent choice; task_mode=%r pins it "
                    "(model.task_mode_selector.max_trials sets the number of trials)",
                    len(family), shape.family, votes["loop"], votes["vmap"], mode, mode,
                )  # fmt: skip
        if decision is None:
            return None
        decision["trial"] = False
        self.decisions[key] = decision
        self.choices[key] = decision["mode"]
        log.debug("task_mode auto: %s for %s, without a trial", _describe(decision), key)
        return decision["mode"]

    def _derive(
        self,
        sources: list[tuple[str, dict[str, Any]]],
        shape: _ShapeClass,
        device: torch.device,
        tasks: int,
        loop_chunk: int | None,
        chunkable: bool,
    ) -> dict[str, Any] | None:
        """The decision of the trial in ``sources`` nearest to ``shape`` (least growth of the examples), carried over
        to ``tasks`` tasks: a loop as is; vmap with its memory per task scaled by that growth (never below the trial's)
        and the whole batch or a chunk fitted to the budget as a trial would. None if nothing fits or no sources."""
        if not sources:
            return None
        growth, source = min(((shape.growth(d["examples"]), d) for _, d in sources), key=lambda item: item[0])
        decision: dict[str, Any] = {"mode": "loop", "chunk": None, "tasks": tasks}
        if source["mode"] == "loop":
            return decision
        if not all(isinstance(source.get(f), (int, float)) for f in ("vmap_mib", "loop_mib", "budget_mib")):
            return None
        vmap_task = source["vmap_mib"] * 2**20 * growth
        value = self.memory_budget
        if value is None and device.type == "cpu":  # the loop's own projected peak, as in a trial
            budget = max(float(CPU_MIN_BUDGET), source["loop_mib"] * 2**20 * growth * min(tasks, loop_chunk or tasks))
        elif value is not None and not (value <= 1 and isinstance(value, float)):
            budget = float(value)  # bytes
        else:  # a share of the free memory: as the trial found it, so that a resumed run derives the same
            budget = source["budget_mib"] * 2**20
        fit = tasks if vmap_task * tasks <= budget else int(budget // max(vmap_task, 1.0))
        if fit < tasks and (not chunkable or fit < 2):
            return None
        decision.update(mode="vmap", chunk=None if fit >= tasks else fit)
        return decision

    def _measure(
        self,
        run: Callable[[str, int], Any],
        device: torch.device,
        tasks: int,
        trial: int,
        loop_chunk: int | None,
        chunkable: bool,
    ) -> dict[str, Any]:
        d: dict[str, Any] = {"mode": "loop", "chunk": None, "tasks": tasks}
        n0 = min(2, trial)
        # 1. the loop (the fallback: it runs whatever the budget), its per-task memory and the projection
        peak = self.peak_memory(lambda: run("loop", n0), device, float("inf"))
        held = min(n0, loop_chunk or n0)
        loop_task = peak / held
        loop_batch = loop_task * min(tasks, loop_chunk or tasks)
        budget = self.budget(device, loop_batch)
        d.update(loop_mib=loop_task / 2**20, loop_batch_mib=loop_batch / 2**20, budget_mib=budget / 2**20)
        # 2. vmap's memory, where its projection fits
        if n0 * loop_task > budget:
            d["reason"] = f"vmap of {n0} tasks needs at least {_mib(n0 * loop_task)}, over the budget"
            return d
        try:
            peak = self.peak_memory(lambda: run("vmap", n0), device, budget)
        except MemoryOverBudget:
            d["reason"] = f"vmap of {n0} tasks passed the budget"
            return d
        except Exception as err:  # noqa: BLE001 - any failure means "cannot vmap this"
            d["reason"] = f"vmap failed ({type(err).__name__}: {err})"
            return d
        vmap_task = peak / n0
        d["vmap_mib"] = vmap_task / 2**20
        fit = tasks if vmap_task * tasks <= budget else int(budget // max(vmap_task, 1.0))
        if fit < tasks and (not chunkable or fit < 2):
            need = tasks if not chunkable else 2
            d["reason"] = f"vmap of {need} tasks would need {_mib(vmap_task * need)}, over the budget"
            return d
        # 3. timing, on as many tasks as one vmap call will run (at most `trial`)
        n = min(trial, fit)
        if n != n0:
            try:
                self.peak_memory(lambda: run("vmap", n), device, budget)  # warm-up at this size, still guarded
            except MemoryOverBudget:
                d["reason"] = f"vmap of {n} tasks passed the budget"
                return d
        clock = self.clock(device)
        best = {"loop": float("inf"), "vmap": float("inf")}
        for _ in range(self.repeats):
            for mode in ("loop", "vmap"):  # interleaved so that background load hits both
                best[mode] = min(best[mode], self._timed(run, mode, n, device, clock))
        d.update(
            loop_ms=1e3 * best["loop"] / n,
            vmap_ms=1e3 * best["vmap"] / n,
            timed_tasks=n,
            clock="cpu" if clock is time.process_time else "wall",
        )
        if best["vmap"] < best["loop"]:
            d.update(mode="vmap", chunk=None if fit >= tasks else fit)
        return d

    @staticmethod
    def _timed(
        run: Callable[[str, int], Any], mode: str, n: int, device: torch.device, clock: Callable[[], float]
    ) -> float:
        _sync(device)
        t0 = clock()
        run(mode, n)
        _sync(device)
        return clock() - t0

    @staticmethod
    def peak_memory(fn: Callable[[], Any], device: torch.device, limit: float) -> float:
        """Peak bytes of live tensor memory that ``fn()`` creates on ``device``; raises :class:`MemoryOverBudget`
        (abandoning ``fn``) when it passes ``limit``."""
        meter = _LiveMemory(torch.device(device), limit)
        try:
            with meter:
                fn()
        except Exception:
            if meter.exceeded:  # raised inside the run (possibly re-wrapped by autograd): report it as such
                raise MemoryOverBudget(f"passed the limit {_mib(limit)}") from None
            raise
        return float(meter.peak)

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

    def state_dict(self) -> dict[str, Any]:
        """The decisions, keyed by the key's text (plain Python values: safe for ``torch.load(weights_only=True)``)."""
        saved = {**self._loaded, **{_key_string(k): dict(v) for k, v in self.decisions.items()}}
        return {"decisions": saved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Reuse saved decisions: :meth:`select` returns them for the same key without measuring."""
        decisions = state.get("decisions")
        if not isinstance(decisions, dict) or not all(
            isinstance(v, dict) and v.get("mode") in ("loop", "vmap") for v in decisions.values()
        ):
            raise ValueError(f"not a TaskModeSelector state: {state!r:.200}")
        self._loaded = {str(k): dict(v) for k, v in decisions.items()}
        self.choices.clear()
        self.decisions.clear()
        self.timings.clear()
        self._by_bucket.clear()
        self._by_family.clear()
        for name, decision in self._loaded.items():  # states saved before shape buckets have no trials to index
            self._index(name, decision)


def _key_string(key: Hashable) -> str:
    return repr(key)


def _bucket(n: int) -> int:
    """The next power of two ``>= n`` (``n`` itself below 2)."""
    return n if n < 2 else 1 << (n - 1).bit_length()


class _ShapeClass:
    """Where a :meth:`TaskModeSelector.key` with tensors ``(tasks, examples, ...)`` (the support and query sets of a
    batch) belongs: its size ``bucket`` (the same key with each example count rounded up to a power of two), its
    ``family`` (the key without task and example counts) and its example counts."""

    def __init__(self, bucket: str, family: str, examples: list[int]) -> None:
        self.bucket, self.family, self.examples = bucket, family, examples

    @classmethod
    def of(cls, key: Hashable) -> _ShapeClass | None:
        """None where the key holds no tensor of at least two dimensions (nothing to bucket)."""
        if not isinstance(key, tuple):
            return None
        bucket, family, examples = [], [], []
        for part in key:
            if (
                isinstance(part, tuple)
                and len(part) == 3
                and isinstance(part[1], tuple)
                and len(part[1]) >= 2
                and isinstance(part[2], torch.dtype)
            ):
                device, shape, dtype = part
                bucket.append((device, (shape[0], _bucket(shape[1]), *shape[2:]), dtype))
                family.append((device, ("tasks", "examples", *shape[2:]), dtype))
                examples.append(int(shape[1]))
            else:
                bucket.append(part)
                family.append(part)
        if not examples:
            return None
        return cls(_key_string(tuple(bucket)), _key_string(tuple(family)), examples)

    def fields(self) -> dict[str, Any]:
        """What a decision records to be reused for other shapes (plain values, saved in checkpoints)."""
        return {"bucket": self.bucket, "family": self.family, "examples": list(self.examples)}

    def growth(self, examples: Sequence[int]) -> float:
        """How many times more examples this shape has than ``examples`` (the largest ratio of any tensor), >= 1."""
        if len(examples) != len(self.examples):
            return float("inf")
        return max([1.0] + [n / max(int(m), 1) for n, m in zip(self.examples, examples)])


def _describe(d: dict[str, Any]) -> str:
    mode = d["mode"] if d.get("chunk") is None else f"vmap in chunks of {d['chunk']} tasks"
    parts = []
    if "loop_ms" in d:
        parts.append(
            f"loop {d['loop_ms']:.2f} ms, vmap {d['vmap_ms']:.2f} ms per task"
            f"{' of CPU time' if d.get('clock') == 'cpu' else ''}"
        )
    if "loop_mib" in d:
        mem = f"memory per task: loop {d['loop_mib']:.1f} MiB"
        if "vmap_mib" in d:
            mem += f", vmap {d['vmap_mib']:.1f} MiB"
        parts.append(f"{mem}; budget {_mib(d['budget_mib'] * 2**20)} for {d['tasks']} tasks")
    if "reason" in d:
        parts.append(d["reason"])
    return f"{mode} ({'; '.join(parts)})" if parts else mode


def _available_cpu_memory() -> float:
    """``MemAvailable`` of /proc/meminfo in bytes (or the physical memory where that file is missing)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
