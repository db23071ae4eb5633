"""The parts of ``bench_maml_throughput.py`` that are not the timed worker: workload constants, the ``--impls``
grammar, process and GPU memory probes, the shared episode file, and the summary (ratios against learn2learn).

Only the standard library is imported at module level: the learn2learn worker imports this module from its own
virtual environment, where lightning_meta is not installed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / ".bench"
DATA_DIR = REPO.parent / "shared" / "data" / "omniglot"
#: name -> (inner steps, first order)
CONFIGS = {"so1": (1, False), "so5": (5, False), "fo1": (1, True)}
WAYS, SHOTS, QUERIES, TASKS, INNER_LR, META_LR = 5, 1, 15, 32, 0.5, 1e-3
#: the implementations that run learn2learn in its own venv (NCHW input as documented, and channels-last input)
L2L_IMPLS = ("l2l", "l2l-cl")


def parse_impl(impl: str) -> tuple[str, int | str | None, bool, bool | None, bool, bool | None]:
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
        raise ValueError(
            f"impl={impl!r}; use l2l, l2l-cl or ours[-loop|-vmap][-cN|-call][-bn][-nchw][-g][-lean], e.g. "
            "ours, ours-loop, ours-loop-call, ours-loop-g"
        )
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
            raise ValueError(
                f"impl={impl!r}: unknown part {part!r}; use -loop, -vmap, -cN (task_chunk=N), -bn, -nchw, -g or -lean"
            )
    return mode, chunk, fused, channels_last, graphs, lean


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def blas_workspace_mib(torch, device) -> float | None:
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


def peak_composition(snapshot: dict, device_index: int, base_bytes: int, top: int = 8) -> dict:
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
            where = f"{Path(user['filename']).name}:{user['line']} {user['name']}" if user else "(no python frame)"
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
        "before_mib": base_bytes / mib,
        "window_peak_mib": peak / mib,
        "blocks_at_peak": len(peak_blocks),
        "largest_blocks_mib": sorted((s / mib for s, _ in peak_blocks.values()), reverse=True)[:top],
        "by_site_mib": [(where, sum(sizes) / mib, len(sizes), max(sizes) / mib) for where, sizes in ranked],
    }


def to_fused_bn(module) -> None:
    """Replace every TaskBatchNorm in ``module`` by ``nn.BatchNorm2d(track_running_stats=False)`` (weights kept)."""
    from torch import nn

    from lightning_meta.nn import TaskBatchNorm

    for name, child in module.named_children():
        if isinstance(child, TaskBatchNorm):
            new = nn.BatchNorm2d(child.num_features, eps=child.eps, track_running_stats=False)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            to_fused_bn(child)


def conv4_plain(ways: int):
    """Conv4-64 with max-pooling and a linear head, as plain ``nn`` modules (state-dict compatible with ours)."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            for i in range(4):
                layers += [
                    nn.Conv2d(1 if i == 0 else 64, 64, 3, padding=1),
                    nn.BatchNorm2d(64, track_running_stats=False),
                    nn.ReLU(),
                    nn.MaxPool2d(2),
                ]
            self.features = nn.Sequential(*layers, nn.Flatten())
            self.head = nn.Linear(64, ways)

        def forward(self, x):
            return self.head(self.features(x))

    return Net()


def live_tensor_peak(step) -> tuple[float, float]:
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
            inputs = {
                t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
            }
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


def make_batch(path: Path, data: str, seed: int) -> None:
    import torch

    from lightning_meta.nn import Conv4

    torch.manual_seed(seed)
    net = Conv4(WAYS, hidden=64, downsample="maxpool", pooling="flatten", image_size=28)
    if data == "omniglot":
        from lightning_meta.datamodules.omniglot import OmniglotDataModule

        os.environ.setdefault("LIGHTNING_META_CACHE", str(BENCH_DIR / "cache"))
        dm = OmniglotDataModule(
            str(DATA_DIR), ways=WAYS, shots=SHOTS, queries=QUERIES, tasks_per_batch=TASKS, seed=seed
        )
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


def matmul_gflops(threads: int, device: str, n: int = 2048, repeats: int = 5) -> float:
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


def summarise(results: list[dict], gemm: dict[int, list[float]], args: argparse.Namespace) -> dict:
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
                "live_peak_mib": med(r["live_peak_mib"] for r in rs)
                if rs[0].get("live_peak_mib") is not None
                else None,
                "gpu_reserved_mib": med(r["gpu_reserved_mib"] for r in rs)
                if rs[0].get("gpu_reserved_mib") is not None
                else None,
                "gpu_blas_ws_mib": med(r["gpu_blas_ws_mib"] for r in rs)
                if rs[0].get("gpu_blas_ws_mib") is not None
                else None,
                "gpu_peak_parts": rs[0].get("gpu_peak_parts"),
                "rss_import_mib": med(r["rss_import_mib"] for r in rs),
                "rss_setup_mib": med(r["rss_setup_mib"] for r in rs),
                "flops_counted": counted,
                "first_loss": rs[0]["first_loss"],
                "modes": sorted({r["mode"] for r in rs}),
                "rounds": len(rs),
            }
        # The algorithmic work of one iteration: what FlopCounterMode counts for learn2learn (or our loop);
        # under vmap the counter sees batched kernels and over-counts, so the same figure is used for all.
        work = next(
            (rows[i]["flops_counted"] for i in ("l2l", "ours-loop") if i in rows and rows[i]["flops_counted"]), None
        )
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
                row["peak_less_blas_ws_vs_l2l"] = (row["gpu_peak_mib"] - base_ws) / (
                    rows["l2l"]["gpu_peak_mib"] - base_ws
                )
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
        summary["second_over_first_order_time"] = {
            i: so[i]["median_iter_s"] / fo[i]["median_iter_s"] for i in so if i in fo
        }
    return summary


def print_summary(summary: dict, args: argparse.Namespace) -> None:
    gm = summary["matmul_gflops"]
    print(
        "\nfp32 matmul (2048^3), median over rounds: "
        + ", ".join(f"{t} thread(s) {v:.1f} GFLOP/s" for t, v in gm.items())
    )
    for config, rows in summary["configs"].items():
        steps, fo = CONFIGS[config]
        work = summary["workload_gflop_per_iter"][config]
        print(
            f"\n[{config}] meta-batch {args.tasks}, {'first' if fo else 'second'} order, {steps} inner step(s), {args.threads} thread(s), "
            f"{args.device}; workload {work:.1f} GFLOP/iteration (GFLOP/s and %matmul use it for every impl)"
        )
        cuda = (
            args.device == "cuda"
        )  # the second memory pair: live tensors on CPU, the allocator's reserved peak on CUDA
        print(
            f"{'impl':10} {'mode':12} {'tasks/s':>8} {'iter s':>7} {'xl2l':>6} {'tasks/cpu-s':>11} {'xl2l cpu':>8} {'peak MiB':>9} {'mem/l2l':>7} "
            f"{'resv MiB' if cuda else 'live MiB':>8} {'resv/l2l' if cuda else 'live/l2l':>8} {'import MiB':>10} {'GFLOP cnt':>9} {'GFLOP/s':>8} {'%matmul':>7} {'loss0':>8}"
        )
        for impl, r in rows.items():
            mem = r["gpu_peak_mib"] if args.device == "cuda" else r["peak_growth_mib"]
            print(
                f"{impl:10} {','.join(r['modes']):12} {r['tasks_per_s']:8.2f} {r['median_iter_s']:7.3f} "
                f"{r.get('speedup_vs_l2l', float('nan')):6.2f} {r['tasks_per_cpu_s']:11.2f} "
                f"{r.get('cpu_speedup_vs_l2l', float('nan')):8.2f} {mem:9.1f} {r.get('peak_mem_vs_l2l', float('nan')):7.2f} "
                f"{(r['gpu_reserved_mib'] if cuda else r['live_peak_mib']) or float('nan'):8.1f} "
                f"{r.get('reserved_vs_l2l' if cuda else 'live_peak_vs_l2l', float('nan')):8.2f} "
                f"{r['rss_import_mib']:10.0f} {(r['flops_counted'] or 0) / 1e9:9.2f} {r.get('gflops', float('nan')):8.2f} "
                f"{r.get('pct_of_matmul', float('nan')):7.1f} {r['first_loss']:8.4f}"
            )
    for config, rows in summary["configs"].items():
        base_ws = rows.get("l2l", {}).get("gpu_blas_ws_mib")
        for impl, r in rows.items():
            if r.get("gpu_blas_ws_mib") is not None:
                less = (
                    f"; peak less learn2learn's {base_ws:.1f} MiB of them, x l2l {r.get('peak_less_blas_ws_vs_l2l', 1.0):.2f}"
                    if base_ws is not None
                    else ""
                )
                print(
                    f"[{config}] {impl:18} cuBLAS workspaces held {r['gpu_blas_ws_mib']:6.1f} MiB (in the peak above){less}"
                )
            parts = r.get("gpu_peak_parts")
            if parts and "error" in parts:
                print(f"[{config}] {impl}: peak composition failed: {parts['error']}")
            elif parts:
                print(
                    f"[{config}] {impl}: at the traced peak {parts['before_mib']:.1f} MiB held from before the first "
                    f"iteration + {parts['window_peak_mib']:.1f} MiB in {parts['blocks_at_peak']} blocks; largest "
                    + ", ".join(f"{b:.1f}" for b in parts["largest_blocks_mib"])
                    + " MiB"
                )
                for where, mib, n, largest in parts["by_site_mib"]:
                    print(f"      {mib:7.1f} MiB {n:4d} blocks (largest {largest:6.1f})  {where[:110]}")
    for config, h in summary["headline"].items():
        print(
            f"headline {config}: auto chose {h['auto_choice']}; ours/l2l tasks/s {h['speedup_vs_l2l']:.2f}x, "
            f"{h['pct_of_matmul'] or float('nan'):.1f}% of matmul rate, peak memory ours(auto)/l2l {h['peak_mem_vs_l2l']:.2f}x "
            f"(RSS), {h['live_peak_vs_l2l'] or float('nan'):.2f}x (live tensors)"
        )
    if "second_over_first_order_time" in summary:
        print(
            "\nsecond-order / first-order iteration time (so1/fo1): "
            + ", ".join(f"{k} {v:.2f}" for k, v in summary["second_over_first_order_time"].items())
        )
