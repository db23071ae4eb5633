"""Replaying a whole meta-gradient computation as a CUDA graph, and what such a graph is keyed on.

A MAML step on small few-shot tasks is a long chain of small kernels: on a GPU the per-task loop spends
most of its time launching them. :class:`CudaGraphCache` records such a computation once per key with
:class:`torch.cuda.CUDAGraph` and afterwards replays it with one launch. Each graph keeps a private memory pool
sized by what its recording held at its peak, so :class:`~lightning_meta.algorithms.MetaLearner` records one
chunk of tasks per graph (one task in the per-task loop: the pool holds one task's tensors) and replays it chunk
by chunk, rather than one graph for a whole batch, whose pool would hold every task at once.

What a recorded function may do is what CUDA graphs allow: tensor work on one device, no host
synchronisation (``.item()``, ``bool(tensor)``, data-dependent shapes), no CPU tensors created inside. The
function must be a pure function of its tensor arguments, of tensors that keep their storage (parameters
updated in place by an optimizer) and of Python state that is part of the cache key: a replay re-runs
the recorded kernels on the *same memory*, so a Python value the function read while recording (a learning
rate, a number of inner steps) is baked in. :func:`module_graph_state` collects that state for a module.

Random numbers (dropout) work: PyTorch registers the default CUDA generator with the graph, and every
replay draws fresh numbers.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["CudaGraphCache", "module_graph_state"]

log = logging.getLogger(__name__)


class CudaGraphCache:
    """Record ``fn(*inputs)`` as a CUDA graph per key and replay it on new inputs of the same signature.

    The first ``warmup`` calls for a key run ``fn`` eagerly on a side stream (what CUDA graph recording
    needs: cuDNN/cuBLAS handles, workspaces and autograd's device threads are set up before recording), the
    next records the graph and replays it. Every call returns fresh tensors (clones of the graph's static
    outputs), so results stay valid after the next replay. At most ``max_graphs`` graphs are kept (least
    recently used first out; each holds its memory pool). If recording raises, the call runs eagerly and the key
    warms up and records again later (a recording can be invalidated by work outside it, see
    :func:`_stale_streams_join_capture`); after ``attempts`` failed recordings (an op that CUDA graphs cannot
    record) it runs eagerly from then on.

    Args:
        warmup: eager calls per key before recording.
        max_graphs: graphs kept at once.
        attempts: recordings tried per key before it runs eagerly for good.

    Example (needs a GPU)::

        cache = CudaGraphCache()
        for x in batches:  # same shape every time
            y = cache.run(("square", tuple(x.shape)), lambda t: (t * t).sum(), (x,))
    """

    def __init__(self, warmup: int = 2, max_graphs: int = 4, attempts: int = 2) -> None:
        if warmup < 1:
            raise ValueError(f"warmup={warmup} must be >= 1 (CUDA graph recording needs an eager warm-up run)")
        if max_graphs < 1:
            raise ValueError(f"max_graphs={max_graphs} must be >= 1")
        if attempts < 1:
            raise ValueError(f"attempts={attempts} must be >= 1")
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.attempts = attempts
        self._failures: dict[Hashable, int] = {}
        self._graphs: OrderedDict[Hashable, tuple[torch.cuda.CUDAGraph, tuple[Tensor, ...], Any]] = OrderedDict()
        self._seen: dict[Hashable, int] = {}
        self._eager_only: set[Hashable] = set()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        #: number of graph recordings, failed recordings and replays so far (for tests and logs)
        self.recordings = 0
        self.failed_recordings = 0
        self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph (and its memory pool)."""
        self._graphs.clear()
        self._seen.clear()
        self._eager_only.clear()
        self._failures.clear()

    def run(self, key: Hashable, fn: Callable[..., Any], inputs: Sequence[Tensor]) -> Any:
        """``fn(*inputs)``: eagerly while warming up, then by replaying the graph recorded for ``key``."""
        inputs = tuple(inputs)
        if not inputs or any(not isinstance(t, Tensor) or t.device.type != "cuda" for t in inputs):
            raise ValueError("CudaGraphCache.run needs CUDA tensors as inputs")
        device = inputs[0].device
        entry = self._graphs.get(key)
        if entry is not None:
            graph, static_in, static_out = entry
            self._graphs.move_to_end(key)
            for dst, src in zip(static_in, inputs):
                dst.copy_(src)
            graph.replay()
            self.replays += 1
            return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, static_out)
        seen = self._seen.get(key, 0)
        # warm-up and recording on one side stream: per-stream lazy set-up (library workspaces) done while warming
        # up would otherwise happen during the first recording, which it invalidates
        stream = self._streams.setdefault(device, torch.cuda.Stream(device))
        if key in self._eager_only or seen < self.warmup:
            self._seen[key] = seen + 1
            return _on_side_stream(stream, fn, inputs)
        static_in = tuple(t.clone() for t in inputs)
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(device)
            with (
                _stale_streams_join_capture(),
                torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"),
            ):
                static_out = fn(*static_in)
        except Exception as err:  # noqa: BLE001 - any recording failure: run this call eagerly, maybe retry later
            self.failed_recordings += 1
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            if failures >= self.attempts:
                self._eager_only.add(key)
            else:
                self._seen[key] = 0  # warm up again, then record again
            log.warning(
                "CUDA graph recording failed (%s: %s); this call runs eagerly%s",
                type(err).__name__,
                str(err).splitlines()[0],
                " and so will the next ones with the same signature"
                if key in self._eager_only
                else "; will record again",
            )
            del graph
            torch.cuda.synchronize(device)
            return _on_side_stream(stream, fn, inputs)
        leaves, _ = tree_flatten(static_out)
        if any(isinstance(t, Tensor) and t.device.type != "cuda" for t in leaves):
            raise ValueError("a function recorded as a CUDA graph must return CUDA tensors only")
        self.recordings += 1
        self._graphs[key] = (graph, static_in, static_out)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return self.run(key, fn, inputs)


#: Plain Python values a graph key takes as they are.
_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def module_graph_state(module: nn.Module, *extra: Hashable) -> tuple:
    """What a graph recorded from ``module``'s computation depends on besides its inputs, as a hashable key part.

    It is the storage of every parameter and buffer (a replay reads that memory: a parameter replaced by a new
    tensor needs a new graph, one updated in place does not), which parameters require gradients, ``extra`` (e.g. a loss scale), and every setting of
    every submodule: the public attributes (and ``_mode_override``) holding Python numbers, strings, None, and
    tuples, lists and dicts of them, nested; a tensor inside such a container (a per-tensor inner rate
    ``{name: tensor}``, a list of per-step dicts) counts by its values when it is a small CPU tensor (a kernel
    receives a CPU scalar's value at recording, which the graph then bakes in) and by its storage otherwise (the
    replay reads that memory). A change to any of them makes a different key, so a cache records a new graph
    rather than replaying one that computes with the old value. Other objects (a dataclass, a callable) are not
    looked into: keep the settings a recorded step reads in the types above. Metrics (:mod:`torchmetrics`) are
    skipped: logging state, not part of the computation.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> net.rates = {"weight": 0.1, "bias": [0.1, 0.2]}
        >>> before = module_graph_state(net)
        >>> net.rates["bias"][1] = 0.3
        >>> module_graph_state(net) == before
        False
    """
    from torchmetrics import (
        Metric,  # a dependency of the package; imported here to keep this module torch-only
    )

    settings = []
    for name, sub in module.named_modules():
        if isinstance(sub, Metric):
            continue
        for attr, value in vars(sub).items():
            if attr.startswith("_") and attr != "_mode_override":
                continue
            frozen = _freeze(value)
            if frozen is not _SKIP:
                settings.append((name, attr, frozen))
    return (
        *extra,
        tuple((p.data_ptr(), p.requires_grad) for p in module.parameters()),
        tuple((b.data_ptr(), b.dtype) for b in module.buffers()),
        tuple(settings),
    )


_SKIP = object()
#: CPU tensors up to this many elements count by their values in :func:`module_graph_state`.
_VALUE_NUMEL = 64


def _freeze(value: Any, depth: int = 0) -> Any:
    """A hashable image of a setting, or ``_SKIP`` for what a graph key does not look into."""
    if isinstance(value, _SCALARS):
        return value
    if depth > 4:
        return _SKIP
    if isinstance(value, Tensor):
        if depth == 0:  # a plain tensor attribute: a buffer or parameter-like state, covered by storage or ignored
            return _SKIP
        if value.device.type == "cpu" and value.numel() <= _VALUE_NUMEL:
            return ("tensor", value.dtype, tuple(value.shape), tuple(value.detach().flatten().tolist()))
        return ("tensor", value.dtype, tuple(value.shape), value.device.type, value.data_ptr())
    if isinstance(value, (tuple, list)):
        items = tuple(_freeze(v, depth + 1) for v in value)
        return _SKIP if any(v is _SKIP for v in items) else (type(value).__name__, items)
    if isinstance(value, dict):
        items = tuple((_freeze(k, depth + 1), _freeze(v, depth + 1)) for k, v in value.items())
        return _SKIP if any(k is _SKIP or v is _SKIP for k, v in items) else ("dict", items)
    return _SKIP


@contextmanager
def _stale_streams_join_capture() -> Iterator[None]:
    """While recording: let autograd replace a stale stream on a node by the recording stream.

    An autograd node can keep the stream that was current when it was made (a parameter's gradient
    accumulator made by an eager step on the default stream, say). If a recorded backward meets such a node,
    it waits on that stream, which pulls a stream outside the recording into it and invalidates the recording
    (``cudaErrorStreamCaptureInvalidated``; pytorch/pytorch#180090). Every call here is preceded by a device-wide
    synchronisation, so the stale stream has no pending work and the wait can go. Where PyTorch has the switch
    (``torch.autograd.graph.set_override_stale_capture_stream``, process-wide; torch 2.14 has it), it is on only
    while recording and set back afterwards; without it this is a no-op.
    """
    setter = getattr(torch.autograd.graph, "set_override_stale_capture_stream", None)
    getter = getattr(torch._C, "_override_stale_capture_stream", None)
    if setter is None or getter is None:
        yield
        return
    before = bool(getter())
    setter(True)
    try:
        yield
    finally:
        setter(before)


def _on_side_stream(side: torch.cuda.Stream, fn: Callable[..., Any], inputs: tuple[Tensor, ...]) -> Any:
    """Run ``fn`` eagerly on the side stream (as PyTorch's CUDA-graph warm-up recipe does), ordered after and
    before the current stream's work."""
    current = torch.cuda.current_stream(side.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out = fn(*inputs)
    current.wait_stream(side)
    for t in tree_flatten(out)[0]:
        if isinstance(t, Tensor) and t.device.type == "cuda":
            t.record_stream(current)
    return out
