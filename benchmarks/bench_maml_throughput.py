"""MAML meta-training throughput, peak memory and FLOP rate: lightning-meta vs learn2learn 0.2.0.

MAML: Finn, Abbeel, Levine, ICML 2017, arXiv:1703.03400. learn2learn: Arnold et al., arXiv:2008.12284.

Workload (one meta-training iteration = inner adaptation of every task, query loss, outer gradient,
Adam step): Omniglot 5-way 1-shot, 15 queries per class, meta-batch 32, Conv4-64 (3x3 conv + BN
(transductive, no running statistics) + ReLU + 2x2 max-pool, x4, then a linear head), mean
cross-entropy, inner lr 0.5. Configurations: ``so1`` (second order, 1 inner step), ``so5`` (second
order, 5 steps), ``fo1`` (first order, 1 step).

Both sides get the same episodes (one real Omniglot meta-batch drawn by
:class:`~lightning_meta.datamodules.OmniglotDataModule`, or random images with ``--data random``), the
same initial weights, the same thread count, and run in separate subprocesses, interleaved round by
round (the machine may be shared: medians over rounds, and ratios within a round, are what to read).

Implementations:

* ``ours`` / ``ours-loop`` / ``ours-vmap``: :class:`lightning_meta.algorithms.maml.MAML` with
  ``task_mode="auto"`` / ``"loop"`` / ``"vmap"``, one iteration = ``training_step`` + ``backward`` +
  ``Adam.step`` (what the Lightning loop runs, minus the loop's own bookkeeping).
* ``l2l``: learn2learn's ``MAML`` wrapper in its own venv (see ``_l2l_env.py``) with its documented
  loop: per task ``clone()``, ``adapt()``, query loss, ``backward()``; then grads scaled by 1/32 and
  ``Adam.step``.
* ``l2l-cl``: the same, given channels-last input (context: our ``Conv4`` picks that layout on CPU, and
  PyTorch's CPU convolutions and batch norm follow the input's layout, so learn2learn users can get most of
  that gain too). Every ratio is against ``l2l`` (learn2learn as documented); ``ours-...-nchw`` runs our
  ``Conv4(channels_last=False)``.

Per worker: tasks/s (median of the timed iterations after warm-up) by wall clock and by the worker's
CPU time (``time.process_time``; with one thread, the figure another process's load changes least),
import-time RSS, peak RSS growth
during the timed iterations over the RSS after setup (VmHWM is reset through
``/proc/self/clear_refs``; on CUDA, ``max_memory_allocated`` growth), the peak of live tensor
memory during one extra iteration (every storage an ATen op creates, counted until it is freed: the
CPU counterpart of ``max_memory_allocated``, free of the allocator's retention and page-fault noise
that makes RSS peaks move by 15-20 MiB between repeats), FLOPs of one iteration
(``torch.utils.flop_counter.FlopCounterMode``: matmuls and convolutions, forward and backward), and
the first iteration's query loss (equal across implementations: same workload). The parent also
times a large fp32 matmul at 1 and 2 threads in every round (the machine's attainable rate).

Usage::

    python benchmarks/bench_maml_throughput.py --rounds 3 --threads 1
    python benchmarks/bench_maml_throughput.py --device cuda --rounds 5   # on a GPU machine
    python benchmarks/bench_maml_throughput.py --device cuda --l2l-src DIR   # ... with no package index there

``benchmarks/gpu_checks.sh`` runs the GPU checks (CUDA tests, this script, the CUDA profile) in one go.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["CONFIGS", "main"]

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / ".bench"
DATA_DIR = REPO.parent / "shared" / "data" / "omniglot"
#: name -> (inner steps, first order)
CONFIGS = {"so1": (1, False), "so5": (5, False), "fo1": (1, True)}
WAYS, SHOTS, QUERIES, TASKS, INNER_LR, META_LR = 5, 1, 15, 32, 0.5, 1e-3
#: the implementations that run learn2learn in its own venv (NCHW input as documented, and channels-last input)
L2L_IMPLS = ("l2l", "l2l-cl")


# ---------------------------------------------------------------------------------------- worker side
def _parse_impl(impl: str) -> tuple[str, int | str | None, bool, bool | None, bool, bool | None]:
    """``ours[-loop|-vmap][-cN|-call][-bn][-nchw][-g][-lean]`` -> (task_mode, task_chunk, fused_bn, channels_last,
    cuda_graphs, lean_ops).

    Without ``-c`` the library default ``task_chunk="auto"`` (1 in loop mode, all tasks under vmap);
    ``-cN`` sets ``task_chunk=N``, ``-call`` ``task_chunk=None`` (every task's graph alive); ``-bn`` swaps the backbone's :class:`~lightning_meta.nn.TaskBatchNorm`
    for PyTorch's fused ``nn.BatchNorm2d(track_running_stats=False)`` (same function; loop mode only); ``-nchw``
    keeps the activations in PyTorch's default NCHW layout (``Conv4(channels_last=False)``; the default runs
    channels-last on CPU); ``-g`` replays each step as a CUDA graph (``MAML(cuda_graphs=True)``; GPU only);
    ``-lean`` runs Conv4's lean max-pool and fused batch norm + max-pool on the GPU too (``Conv4(lean_ops=True)``).
    """
    parts = impl.split("-")
    if parts[0] != "ours" or len(parts) > 7:
        raise ValueError(f"impl={impl!r}; use l2l, l2l-cl or ours[-loop|-vmap][-cN|-call][-bn][-nchw][-g][-lean], e.g. "
                         "ours, ours-loop, ours-loop-call, ours-loop-g")
    mode, chunk, fused, channels_last, graphs, lean = "auto", "auto", False, None, False, None
    for part in parts[1:]:
        if part in ("loop", "vmap"):
            mode = part
        elif part == "bn":
            fused = True
        elif part == "call":
            chunk = None
        elif part == "nchw":
            channels_last = False
        elif part == "g":
            graphs = True
        elif part == "lean":
            lean = True
        elif part.startswith("c") and part[1:].isdigit() and int(part[1:]) >= 1:
            chunk = int(part[1:])
        else:
            raise ValueError(f"impl={impl!r}: unknown part {part!r}; use -loop, -vmap, -cN (task_chunk=N), -bn, -nchw, -g or "
                             "-lean")
    return mode, chunk, fused, channels_last, graphs, lean


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _blas_workspace_mib(torch, device) -> float | None:
    """The cuBLAS/cuBLASLt workspaces the process holds, in MiB: ``memory_allocated`` drop when PyTorch frees them.

    PyTorch keeps one workspace per (handle, stream) for the life of the process, allocated through the caching
    allocator at a stream's first matmul (32 MiB each on Hopper by default, ``CUBLAS_WORKSPACE_CONFIG``), so it
    counts in the step's ``max_memory_allocated`` growth of whoever runs first. Call last: a recorded CUDA graph may
    still point at the freed workspace."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is None:
        return None
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device)
    clear()
    return (held - torch.cuda.memory_allocated(device)) / 2**20


def _peak_composition(snapshot: dict, device_index: int, base_bytes: int, top: int = 8) -> dict:
    """What was live at the allocator's peak during a ``torch.cuda.memory._record_memory_history`` window.

    Replays the window's alloc/free events; blocks live before the window count as one ``before`` figure.
    Blocks are grouped by where they were allocated: the innermost Python frame outside torch (the caller's line)
    and the innermost torch frame (the op), so a convolution's transient workspace shows as a large block under
    the conv line next to its output tensors."""
    live: dict[int, tuple[int, str]] = {}
    cur = peak = 0
    peak_blocks: dict[int, tuple[int, str]] = {}
    for ev in snapshot["device_traces"][device_index]:
        action, addr = ev.get("action"), ev.get("addr")
        if action == "alloc":
            frames = ev.get("frames") or []
            user = next((f for f in frames if "/torch/" not in f.get("filename", "")), None)
            inner = next((f for f in frames if "/torch/" in f.get("filename", "")), None)
            where = (f"{Path(user['filename']).name}:{user['line']} {user['name']}" if user else "(no python frame)")
            if inner:
                where += f" > {inner['name']}"
            live[addr] = (ev["size"], where)
            cur += ev["size"]
            if cur > peak:
                peak, peak_blocks = cur, dict(live)
        elif action == "free_requested" and addr in live:
            cur -= live.pop(addr)[0]
    groups: dict[str, list[int]] = {}
    for size, where in peak_blocks.values():
        groups.setdefault(where, []).append(size)
    mib = 2**20
    ranked = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "before_mib": base_bytes / mib, "window_peak_mib": peak / mib, "blocks_at_peak": len(peak_blocks),
        "largest_blocks_mib": sorted((s / mib for s, _ in peak_blocks.values()), reverse=True)[:top],
        "by_site_mib": [(where, sum(sizes) / mib, len(sizes), max(sizes) / mib) for where, sizes in ranked],
    }


def _to_fused_bn(module) -> None:
    """Replace every TaskBatchNorm in ``module`` by ``nn.BatchNorm2d(track_running_stats=False)`` (weights kept)."""
    from torch import nn

    from lightning_meta.nn import TaskBatchNorm

    for name, child in module.named_children():
        if isinstance(child, TaskBatchNorm):
            new = nn.BatchNorm2d(child.num_features, eps=child.eps, track_running_stats=False)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            _to_fused_bn(child)


def _conv4_plain(ways: int):
    """Conv4-64 with max-pooling and a linear head, as plain ``nn`` modules (state-dict compatible with ours)."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            for i in range(4):
                layers += [nn.Conv2d(1 if i == 0 else 64, 64, 3, padding=1),
                           nn.BatchNorm2d(64, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
            self.features = nn.Sequential(*layers, nn.Flatten())
            self.head = nn.Linear(64, ways)

        def forward(self, x):
            return self.head(self.features(x))

    return Net()


def _live_tensor_peak(step) -> tuple[float, float]:
    """(peak, end) MiB of tensor storage created by ATen ops during ``step()`` and still alive.

    A ``TorchDispatchMode`` sees every op (forward, backward, optimizer); each new storage is counted
    until its last reference dies (``weakref.finalize``; PyTorch preserves a storage's Python object
    while the storage lives). Memory allocated outside tensors (oneDNN scratch) is not counted, on
    either side of a comparison.
    """
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = self.peak = 0
            self.sizes: dict[int, int] = {}

        def _free(self, key: int) -> None:
            self.live -= self.sizes.pop(key, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    storage = t.untyped_storage()
                    key, size = storage.data_ptr(), storage.nbytes()
                    # a view or an in-place result (of a tensor made before the step, too: e.g. one task's slice
                    # of the batch), or a storage already counted
                    if size == 0 or key in inputs or key in self.sizes:
                        continue
                    self.sizes[key] = size
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
            return out

    mode = LiveBytes()
    with mode:
        step()
    return mode.peak / 2**20, mode.live / 2**20


def _worker(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    if not args.cudnn:  # both sides: PyTorch's own convolution kernels instead of cuDNN's
        torch.backends.cudnn.enabled = False
    rss_import = _rss_kib("VmRSS")
    device = torch.device(args.device)
    steps, first_order = CONFIGS[args.config]
    blob = torch.load(args.batch, map_location="cpu")
    sx, sy, qx, qy = (blob[k][: args.tasks].to(device) for k in ("support_x", "support_y", "query_x", "query_y"))
    dtype = getattr(torch, args.dtype)
    sx, qx = sx.to(dtype), qx.to(dtype)

    if args.impl in L2L_IMPLS:
        from learn2learn.algorithms.maml import MAML as L2LMAML

        if args.impl == "l2l-cl":  # learn2learn given channels-last input (the layout our Conv4 picks on CPU)
            sx = sx.flatten(0, 1).to(memory_format=torch.channels_last).unflatten(0, sx.shape[:2])
            qx = qx.flatten(0, 1).to(memory_format=torch.channels_last).unflatten(0, qx.shape[:2])

        net = _conv4_plain(WAYS)
        net.load_state_dict(blob["state_dict"])
        net.to(device, dtype)
        maml = L2LMAML(net, lr=INNER_LR, first_order=first_order)
        opt = torch.optim.Adam(maml.parameters(), lr=META_LR)

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for t in range(sx.shape[0]):
                learner = maml.clone()
                for _ in range(steps):
                    learner.adapt(F.cross_entropy(learner(sx[t]), sy[t]))
                loss = F.cross_entropy(learner(qx[t]), qy[t])
                loss.backward()
                total += loss.item()
            for p in maml.parameters():
                p.grad.mul_(1.0 / sx.shape[0])
            opt.step()
            return total / sx.shape[0]

        chosen = args.impl
    else:
        import warnings

        from lightning_meta.algorithms.maml import MAML
        from lightning_meta.episode import Episode
        from lightning_meta.nn import Conv4

        warnings.filterwarnings("ignore", message=".*self.log.*")
        mode, chunk, fused, channels_last, graphs, lean = _parse_impl(args.impl)
        net = Conv4(WAYS, hidden=64, downsample="maxpool", pooling="flatten", image_size=28, channels_last=channels_last,
                    lean_ops=lean)
        net.load_state_dict(blob["state_dict"])
        if fused:
            _to_fused_bn(net)
        module = MAML(net, inner_lr=INNER_LR, inner_steps=steps, first_order=first_order, meta_lr=META_LR,
                      task_mode=mode, task_chunk=chunk, cuda_graphs=graphs).to(device, dtype)
        module.train()
        opt = module.configure_optimizers()
        episode = Episode(sx, sy, qx, qy)

        def step() -> float:
            loss = module.training_step(episode, 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())

        chosen = mode

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rss_setup = _rss_kib("VmRSS")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
        base_reserved = torch.cuda.memory_reserved(device)
    hwm_reset = _reset_hwm()
    trace = args.memory_trace and device.type == "cuda"
    if trace:  # every allocation from the first iteration on (warm-up included: lazy workspaces, a graph's recording),
        # with its Python stack; slows the step, so such a run's timings are not the benchmark's
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    times, cpu_times, first_loss = [], [], None
    for i in range(args.warmup + args.iters):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        sync()
        if i == 0:
            first_loss = loss
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    peak_kib = _rss_kib("VmHWM") - rss_setup if hwm_reset else _rss_kib("VmHWM") - rss_import
    peak_parts = None
    if trace:
        try:
            peak_parts = _peak_composition(torch.cuda.memory._snapshot(), device.index or 0, base_alloc)
        except Exception as err:  # an attribution aid: never lose the run's figures to it
            peak_parts = {"error": f"{type(err).__name__}: {err}"}
        torch.cuda.memory._record_memory_history(enabled=None)
    gpu_peak = gpu_reserved = None
    if device.type == "cuda":
        gpu_peak = (torch.cuda.max_memory_allocated(device) - base_alloc) / 2**20
        # what the caching allocator held at its peak (a CUDA graph's private pool shows here, fragmentation too)
        gpu_reserved = (torch.cuda.max_memory_reserved(device) - base_reserved) / 2**20
    if args.impl.startswith("ours") and _parse_impl(args.impl)[0] == "auto":
        choices = getattr(module.task_mode_selector, "choices", {})
        chosen = "auto->" + ",".join(sorted(set(choices.values()))) if choices else "auto->?"
    live_peak = _live_tensor_peak(step)[0] if args.live and device.type == "cpu" else None
    flops = None
    if args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = counter.get_total_flops()
    blas_ws = _blas_workspace_mib(torch, device) if device.type == "cuda" else None  # last: frees the workspaces
    med = statistics.median(times)
    cpu_med = statistics.median(cpu_times)
    print(json.dumps({
        "impl": args.impl, "config": args.config, "mode": chosen, "threads": args.threads, "device": args.device,
        "iter_s": times, "median_iter_s": med, "tasks": int(sx.shape[0]), "tasks_per_s": sx.shape[0] / med, "first_loss": first_loss,
        "cpu_iter_s": cpu_times, "tasks_per_cpu_s": sx.shape[0] / cpu_med,
        "rss_import_mib": rss_import / 1024, "rss_setup_mib": rss_setup / 1024, "peak_growth_mib": peak_kib / 1024,
        "hwm_reset": hwm_reset, "gpu_peak_mib": gpu_peak, "gpu_reserved_mib": gpu_reserved, "gpu_blas_ws_mib": blas_ws, "gpu_peak_parts": peak_parts, "live_peak_mib": live_peak, "flops": flops, "torch": torch.__version__,
        "wall_s": time.perf_counter() - t_start,
    }))


# ---------------------------------------------------------------------------------------- parent side
def _make_batch(path: Path, data: str, seed: int) -> None:
    import torch

    from lightning_meta.nn import Conv4

    torch.manual_seed(seed)
    net = Conv4(WAYS, hidden=64, downsample="maxpool", pooling="flatten", image_size=28)
    if data == "omniglot":
        from lightning_meta.datamodules.omniglot import OmniglotDataModule

        os.environ.setdefault("LIGHTNING_META_CACHE", str(BENCH_DIR / "cache"))
        dm = OmniglotDataModule(str(DATA_DIR), ways=WAYS, shots=SHOTS, queries=QUERIES, tasks_per_batch=TASKS, seed=seed)
        dm.setup("fit")
        ep = next(iter(dm.train_dataloader()))
        tensors = dict(support_x=ep.support_x, support_y=ep.support_y, query_x=ep.query_x, query_y=ep.query_y)
    else:
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(WAYS)
        tensors = dict(
            support_x=torch.rand(TASKS, WAYS * SHOTS, 1, 28, 28, generator=g),
            support_y=labels.repeat_interleave(SHOTS).expand(TASKS, -1).clone(),
            query_x=torch.rand(TASKS, WAYS * QUERIES, 1, 28, 28, generator=g),
            query_y=labels.repeat_interleave(QUERIES).expand(TASKS, -1).clone(),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**tensors, "state_dict": net.state_dict(), "data": data}, path)


def _matmul_gflops(threads: int, device: str, n: int = 2048, repeats: int = 5) -> float:
    """Median fp32 GFLOP/s of an ``n x n @ n x n`` matmul at ``threads`` threads."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        rates = []
        for i in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first is a warm-up
                rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
        return statistics.median(rates)
    finally:
        torch.set_num_threads(old)


def _run_worker(impl: str, config: str, args: argparse.Namespace, l2l_env, flops: bool) -> dict:
    cmd = [__file__, "--worker", impl, "--config", config, "--batch", str(args.batch), "--threads", str(args.threads),
           "--dtype", args.dtype,
           "--warmup", str(args.warmup), "--iters", str(args.iters), "--device", args.device, "--tasks", str(args.tasks)]
    if flops:
        cmd.append("--flops")
    if not args.live:
        cmd.append("--no-live")
    if args.memory_trace:
        cmd.append("--memory-trace")
    if not args.cudnn:
        cmd.append("--no-cudnn")
    threads = {k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    if args.malloc_keep:
        # glibc: keep freed memory in the process (no trim, no per-tensor mmap) instead of handing it back to the
        # OS after every task and page-faulting it in again for the next; the same for every implementation.
        from lightning_meta.memory import GLIBC_KEEP_ENV  # parent side (learn2learn's workers cannot import it)

        threads |= GLIBC_KEEP_ENV
    if args.blas_workspace is not None:  # read once per process by PyTorch, so it goes in through the environment
        threads["CUBLAS_WORKSPACE_CONFIG"] = args.blas_workspace
    if impl in L2L_IMPLS:
        python, env = str(l2l_env.python), l2l_env.env(**threads)
    else:
        python, env = sys.executable, {**os.environ, **threads}
    proc = subprocess.run([python, *cmd], env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {impl}/{config} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summarise(results: list[dict], gemm: dict[int, list[float]], args: argparse.Namespace) -> dict:
    med = statistics.median
    mem_key = "gpu_peak_mib" if args.device == "cuda" else "peak_growth_mib"
    summary: dict = {"matmul_gflops": {t: med(v) for t, v in gemm.items()}, "configs": {}, "headline": {}}
    for config in args.configs:
        rows = {}
        for impl in args.impls:
            rs = [r for r in results if r["impl"] == impl and r["config"] == config]
            if not rs:
                continue
            counted = next((r["flops"] for r in rs if r["flops"]), None)
            rows[impl] = {
                "tasks_per_s": med(r["tasks_per_s"] for r in rs),
                "median_iter_s": med(r["median_iter_s"] for r in rs),
                "tasks_per_cpu_s": med(r["tasks_per_cpu_s"] for r in rs),
                "peak_growth_mib": med(r["peak_growth_mib"] for r in rs),
                "gpu_peak_mib": med(r["gpu_peak_mib"] for r in rs) if rs[0]["gpu_peak_mib"] is not None else None,
                "live_peak_mib": med(r["live_peak_mib"] for r in rs) if rs[0].get("live_peak_mib") is not None else None,
                "gpu_reserved_mib": med(r["gpu_reserved_mib"] for r in rs) if rs[0].get("gpu_reserved_mib") is not None else None,
                "gpu_blas_ws_mib": med(r["gpu_blas_ws_mib"] for r in rs) if rs[0].get("gpu_blas_ws_mib") is not None else None,
                "gpu_peak_parts": rs[0].get("gpu_peak_parts"),
                "rss_import_mib": med(r["rss_import_mib"] for r in rs),
                "rss_setup_mib": med(r["rss_setup_mib"] for r in rs),
                "flops_counted": counted, "first_loss": rs[0]["first_loss"], "modes": sorted({r["mode"] for r in rs}),
                "rounds": len(rs),
            }
        # The algorithmic work of one iteration: what FlopCounterMode counts for learn2learn (or our loop);
        # under vmap the counter sees batched kernels and over-counts, so the same figure is used for all.
        work = next((rows[i]["flops_counted"] for i in ("l2l", "ours-loop") if i in rows and rows[i]["flops_counted"]), None)
        for impl, row in rows.items():
            if work:
                row["gflops"] = work / row["median_iter_s"] / 1e9
                row["pct_of_matmul"] = 100 * row["gflops"] / summary["matmul_gflops"][args.threads]
            if impl == "l2l" or "l2l" not in rows:  # every ratio is against learn2learn as documented (NCHW)
                continue
            ratios, cpu_ratios = [], []  # per-round ratios (same round = similar background load), then medians
            for r in range(args.rounds):
                a = [x for x in results if x["impl"] == impl and x["config"] == config and x["round"] == r]
                b = [x for x in results if x["impl"] == "l2l" and x["config"] == config and x["round"] == r]
                if a and b:
                    ratios.append(a[0]["tasks_per_s"] / b[0]["tasks_per_s"])
                    cpu_ratios.append(a[0]["tasks_per_cpu_s"] / b[0]["tasks_per_cpu_s"])
            row["speedup_vs_l2l_per_round"] = ratios
            row["speedup_vs_l2l"] = med(ratios)
            # By CPU time of the (single-threaded) worker: what another process's load on the machine changes least.
            row["cpu_speedup_vs_l2l_per_round"] = cpu_ratios
            row["cpu_speedup_vs_l2l"] = med(cpu_ratios)
            row["peak_mem_vs_l2l"] = row[mem_key] / rows["l2l"][mem_key]
            if row["live_peak_mib"] is not None and rows["l2l"]["live_peak_mib"]:
                row["live_peak_vs_l2l"] = row["live_peak_mib"] / rows["l2l"]["live_peak_mib"]
            if row.get("gpu_reserved_mib") is not None and rows["l2l"].get("gpu_reserved_mib"):
                row["reserved_vs_l2l"] = row["gpu_reserved_mib"] / rows["l2l"]["gpu_reserved_mib"]
            if row.get("gpu_blas_ws_mib") is not None and rows["l2l"].get("gpu_blas_ws_mib") is not None:
                # the same ratio with learn2learn's cuBLAS workspace (what any PyTorch process pays once, on its first
                # matmul) taken out of both sides; workspaces ours holds beyond it (e.g. a CUDA graph's side stream
                # has its own) stay in our figure. Reported next to the full ratio, never instead of it.
                base_ws = rows["l2l"]["gpu_blas_ws_mib"]
                row["peak_less_blas_ws_vs_l2l"] = (row["gpu_peak_mib"] - base_ws) / (rows["l2l"]["gpu_peak_mib"] - base_ws)
        summary["configs"][config] = rows
        summary["workload_gflop_per_iter"] = summary.get("workload_gflop_per_iter", {}) | {config: (work or 0) / 1e9}
        if "ours" in rows and "l2l" in rows:
            choice = rows["ours"]["modes"][0].split("->")[-1]
            fixed = rows.get(f"ours-{choice}")
            summary["headline"][config] = {
                "auto_choice": choice,
                "speedup_vs_l2l": (fixed or rows["ours"])["speedup_vs_l2l"],
                "pct_of_matmul": (fixed or rows["ours"]).get("pct_of_matmul"),
                "peak_mem_vs_l2l": rows["ours"]["peak_mem_vs_l2l"],
                "live_peak_vs_l2l": rows["ours"].get("live_peak_vs_l2l"),
            }
    if "so1" in summary["configs"] and "fo1" in summary["configs"]:
        so, fo = summary["configs"]["so1"], summary["configs"]["fo1"]
        summary["second_over_first_order_time"] = {i: so[i]["median_iter_s"] / fo[i]["median_iter_s"] for i in so if i in fo}
    return summary


def _print(summary: dict, args: argparse.Namespace) -> None:
    gm = summary["matmul_gflops"]
    print(f"\nfp32 matmul (2048^3), median over rounds: " + ", ".join(f"{t} thread(s) {v:.1f} GFLOP/s" for t, v in gm.items()))
    for config, rows in summary["configs"].items():
        steps, fo = CONFIGS[config]
        work = summary["workload_gflop_per_iter"][config]
        print(f"\n[{config}] meta-batch {args.tasks}, {'first' if fo else 'second'} order, {steps} inner step(s), {args.threads} thread(s), "
              f"{args.device}; workload {work:.1f} GFLOP/iteration (GFLOP/s and %matmul use it for every impl)")
        cuda = args.device == "cuda"  # the second memory pair: live tensors on CPU, the allocator's reserved peak on CUDA
        print(f"{'impl':10} {'mode':12} {'tasks/s':>8} {'iter s':>7} {'xl2l':>6} {'tasks/cpu-s':>11} {'xl2l cpu':>8} {'peak MiB':>9} {'mem/l2l':>7} "
              f"{'resv MiB' if cuda else 'live MiB':>8} {'resv/l2l' if cuda else 'live/l2l':>8} {'import MiB':>10} {'GFLOP cnt':>9} {'GFLOP/s':>8} {'%matmul':>7} {'loss0':>8}")
        for impl, r in rows.items():
            mem = r["gpu_peak_mib"] if args.device == "cuda" else r["peak_growth_mib"]
            print(f"{impl:10} {','.join(r['modes']):12} {r['tasks_per_s']:8.2f} {r['median_iter_s']:7.3f} "
                  f"{r.get('speedup_vs_l2l', float('nan')):6.2f} {r['tasks_per_cpu_s']:11.2f} "
                  f"{r.get('cpu_speedup_vs_l2l', float('nan')):8.2f} {mem:9.1f} {r.get('peak_mem_vs_l2l', float('nan')):7.2f} "
                  f"{(r['gpu_reserved_mib'] if cuda else r['live_peak_mib']) or float('nan'):8.1f} "
                  f"{r.get('reserved_vs_l2l' if cuda else 'live_peak_vs_l2l', float('nan')):8.2f} "
                  f"{r['rss_import_mib']:10.0f} {(r['flops_counted'] or 0) / 1e9:9.2f} {r.get('gflops', float('nan')):8.2f} "
                  f"{r.get('pct_of_matmul', float('nan')):7.1f} {r['first_loss']:8.4f}")
    for config, rows in summary["configs"].items():
        base_ws = rows.get("l2l", {}).get("gpu_blas_ws_mib")
        for impl, r in rows.items():
            if r.get("gpu_blas_ws_mib") is not None:
                less = f"; peak less learn2learn's {base_ws:.1f} MiB of them, x l2l {r.get('peak_less_blas_ws_vs_l2l', 1.0):.2f}" \
                    if base_ws is not None else ""
                print(f"[{config}] {impl:18} cuBLAS workspaces held {r['gpu_blas_ws_mib']:6.1f} MiB (in the peak above){less}")
            parts = r.get("gpu_peak_parts")
            if parts and "error" in parts:
                print(f"[{config}] {impl}: peak composition failed: {parts['error']}")
            elif parts:
                print(f"[{config}] {impl}: at the traced peak {parts['before_mib']:.1f} MiB held from before the first "
                      f"iteration + {parts['window_peak_mib']:.1f} MiB in {parts['blocks_at_peak']} blocks; largest "
                      + ", ".join(f"{b:.1f}" for b in parts["largest_blocks_mib"]) + " MiB")
                for where, mib, n, largest in parts["by_site_mib"]:
                    print(f"      {mib:7.1f} MiB {n:4d} blocks (largest {largest:6.1f})  {where[:110]}")
    for config, h in summary["headline"].items():
        print(f"headline {config}: auto chose {h['auto_choice']}; ours/l2l tasks/s {h['speedup_vs_l2l']:.2f}x, "
              f"{h['pct_of_matmul'] or float('nan'):.1f}% of matmul rate, peak memory ours(auto)/l2l {h['peak_mem_vs_l2l']:.2f}x "
              f"(RSS), {h['live_peak_vs_l2l'] or float('nan'):.2f}x (live tensors)")
    if "second_over_first_order_time" in summary:
        print("\nsecond-order / first-order iteration time (so1/fo1): "
              + ", ".join(f"{k} {v:.2f}" for k, v in summary["second_over_first_order_time"].items()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch threads of every worker (same for both sides)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are taken over rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per worker (ours: includes the auto choice)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per worker")
    p.add_argument("--configs", default="so1,fo1,so5", help=f"comma list of {sorted(CONFIGS)}")
    p.add_argument("--impls", default="ours,ours-loop,ours-vmap,l2l",
                   help="comma list of l2l and ours[-loop|-vmap][-cN|-call] (auto/loop/vmap task_mode; task_chunk=N or None; "
                        "default: the library's task_chunk='auto')")
    p.add_argument("--auto-rounds", type=int, default=1,
                   help="rounds in which auto-mode impls (ours, ours-cN) run; later rounds skip them (their choice "
                        "is one of the fixed modes, which run every round)")
    p.add_argument("--tasks", type=int, default=TASKS,
                   help=f"meta-batch: the first N of the {TASKS} stored tasks (the workload is {TASKS}; a smaller N "
                        "changes the workload: say so when quoting it)")
    p.add_argument("--data", default="omniglot", choices=["omniglot", "random"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=Path, default=None, help="episode + initial weights file (made if missing)")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "maml_throughput.json")
    p.add_argument("--l2l-src", type=Path, default=None,
                   help="folder holding learn2learn's MAML files (as _l2l_env.py lays them out): run learn2learn with this "
                        "interpreter instead of building its venv (for a machine without a package index, e.g. a lent GPU)")
    p.add_argument("--malloc-keep", action="store_true",
                   help="run every worker with glibc's MALLOC_MMAP_THRESHOLD_=32 MiB and MALLOC_TRIM_THRESHOLD_=1 TiB "
                        "(freed memory stays in the process: no page faults on re-allocation)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="float64: a parity check of the first iteration's loss (timings are then not the benchmark's)")
    p.add_argument("--live", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the peak of live tensor memory in one extra iteration (CPU)")
    p.add_argument("--memory-trace", action="store_true",
                   help="cuda: record every allocation from the first iteration on and print what was live at the peak, "
                        "by allocation site (slows the step: timings of such a run are not the benchmark's)")
    p.add_argument("--blas-workspace", default=None, metavar="CONFIG",
                   help="cuda: CUBLAS_WORKSPACE_CONFIG for every worker, both sides (e.g. :4096:1 for one 4 MiB buffer; "
                        "PyTorch's default on Hopper is 32 MiB per stream)")
    p.add_argument("--cudnn", action=argparse.BooleanOptionalAction, default=True,
                   help="cuda: --no-cudnn runs every worker, both sides, with torch.backends.cudnn.enabled = False")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (done in round 0 by l2l and ours-loop: the workload's FLOPs)")
    p.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(argparse.Namespace(**{**vars(args), "impl": args.worker}))
        return
    args.configs = [c for c in args.configs.split(",") if c]
    args.impls = [i for i in args.impls.split(",") if i]
    if not 1 <= args.tasks <= TASKS:
        p.error(f"--tasks {args.tasks} must be in 1..{TASKS} (the stored meta-batch)")
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        p.error(f"unknown configs {bad}; use {sorted(CONFIGS)}")
    for impl in args.impls:
        if impl not in L2L_IMPLS:
            try:
                _parse_impl(impl)
            except ValueError as err:
                p.error(str(err))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda but torch.cuda.is_available() is False; run on a GPU machine or use --device cpu")
    args.batch = args.batch or BENCH_DIR / f"maml_batch_{args.data}_{args.seed}.pt"
    if not args.batch.exists():
        _make_batch(args.batch, args.data, args.seed)
    l2l_env = None
    if set(L2L_IMPLS) & set(args.impls):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _l2l_env import L2LEnv, ensure_l2l_env

        if args.l2l_src is not None:
            import torch

            if not (args.l2l_src / "learn2learn" / "algorithms" / "maml.py").exists():
                p.error(f"--l2l-src {args.l2l_src}: no learn2learn/algorithms/maml.py there")
            l2l_env = L2LEnv(python=Path(sys.executable), pythonpath=args.l2l_src.resolve(), torch_version=torch.__version__)
        else:
            l2l_env = ensure_l2l_env()
    print(f"command: python {' '.join(sys.argv)}", flush=True)
    results: list[dict] = []
    gemm: dict[int, list[float]] = {t: [] for t in sorted({1, 2, args.threads})} if args.device == "cpu" else {args.threads: []}
    for r in range(args.rounds):
        for t in gemm:
            gemm[t].append(_matmul_gflops(t, args.device))
        for config in args.configs:
            order = args.impls[r % len(args.impls):] + args.impls[: r % len(args.impls)]  # rotate who goes first
            for impl in order:
                if impl not in L2L_IMPLS and _parse_impl(impl)[0] == "auto" and r >= args.auto_rounds:
                    continue
                count = r == 0 and not args.no_flops and impl in ("l2l", "ours-loop")  # the workload's FLOPs
                res = _run_worker(impl, config, args, l2l_env, flops=count)
                res["round"] = r
                results.append(res)
                partial = args.out.with_suffix(".partial.json")  # survives an interrupted run
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))
                print(f"round {r} {config:4} {impl:10} {res['mode']:12} {res['tasks_per_s']:7.2f} tasks/s "
                      f"peak +{res['peak_growth_mib']:.0f} MiB live {res.get('live_peak_mib') or float('nan'):.1f} MiB loss0 {res['first_loss']:.4f}", flush=True)
    summary = _summarise(results, gemm, args)
    _print(summary, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
                                    "results": results, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
