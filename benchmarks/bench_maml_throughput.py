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

import maml_harness as harness  # the sibling module (this script's folder is sys.path[0]), importable without torch

__all__ = ["main"]


# ---------------------------------------------------------------------------------------- worker side
def _worker(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    if not args.cudnn:  # both sides: PyTorch's own convolution kernels instead of cuDNN's
        torch.backends.cudnn.enabled = False
    rss_import = harness.rss_kib("VmRSS")
    device = torch.device(args.device)
    steps, first_order = harness.CONFIGS[args.config]
    blob = torch.load(args.batch, map_location="cpu")
    sx, sy, qx, qy = (blob[k][: args.tasks].to(device) for k in ("support_x", "support_y", "query_x", "query_y"))
    dtype = getattr(torch, args.dtype)
    sx, qx = sx.to(dtype), qx.to(dtype)

    if args.impl in harness.L2L_IMPLS:
        from learn2learn.algorithms.maml import MAML as L2LMAML

        if args.impl == "l2l-cl":  # learn2learn given channels-last input (the layout our Conv4 picks on CPU)
            sx = sx.flatten(0, 1).to(memory_format=torch.channels_last).unflatten(0, sx.shape[:2])
            qx = qx.flatten(0, 1).to(memory_format=torch.channels_last).unflatten(0, qx.shape[:2])

        net = harness.conv4_plain(harness.WAYS)
        net.load_state_dict(blob["state_dict"])
        net.to(device, dtype)
        maml = L2LMAML(net, lr=harness.INNER_LR, first_order=first_order)
        opt = torch.optim.Adam(maml.parameters(), lr=harness.META_LR)

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
        mode, chunk, fused, channels_last, graphs, lean = harness.parse_impl(args.impl)
        net = Conv4(
            harness.WAYS,
            hidden=64,
            downsample="maxpool",
            pooling="flatten",
            image_size=28,
            channels_last=channels_last,
            lean_ops=lean,
        )
        net.load_state_dict(blob["state_dict"])
        if fused:
            harness.to_fused_bn(net)
        module = MAML(
            net,
            inner_lr=harness.INNER_LR,
            inner_steps=steps,
            first_order=first_order,
            meta_lr=harness.META_LR,
            task_mode=mode,
            task_chunk=chunk,
            cuda_graphs=graphs,
        ).to(device, dtype)
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

    rss_setup = harness.rss_kib("VmRSS")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
        base_reserved = torch.cuda.memory_reserved(device)
    hwm_reset = harness.reset_hwm()
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
    peak_kib = harness.rss_kib("VmHWM") - rss_setup if hwm_reset else harness.rss_kib("VmHWM") - rss_import
    peak_parts = None
    if trace:
        try:
            peak_parts = harness.peak_composition(torch.cuda.memory._snapshot(), device.index or 0, base_alloc)
        except Exception as err:  # an attribution aid: never lose the run's figures to it
            peak_parts = {"error": f"{type(err).__name__}: {err}"}
        torch.cuda.memory._record_memory_history(enabled=None)
    gpu_peak = gpu_reserved = None
    if device.type == "cuda":
        gpu_peak = (torch.cuda.max_memory_allocated(device) - base_alloc) / 2**20
        # what the caching allocator held at its peak (a CUDA graph's private pool shows here, fragmentation too)
        gpu_reserved = (torch.cuda.max_memory_reserved(device) - base_reserved) / 2**20
    if args.impl.startswith("ours") and harness.parse_impl(args.impl)[0] == "auto":
        choices = getattr(module.task_mode_selector, "choices", {})
        chosen = "auto->" + ",".join(sorted(set(choices.values()))) if choices else "auto->?"
    live_peak = harness.live_tensor_peak(step)[0] if args.live and device.type == "cpu" else None
    flops = None
    if args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = counter.get_total_flops()
    blas_ws = harness.blas_workspace_mib(torch, device) if device.type == "cuda" else None  # last: frees the workspaces
    med = statistics.median(times)
    cpu_med = statistics.median(cpu_times)
    print(
        json.dumps(
            {
                "impl": args.impl,
                "config": args.config,
                "mode": chosen,
                "threads": args.threads,
                "device": args.device,
                "iter_s": times,
                "median_iter_s": med,
                "tasks": int(sx.shape[0]),
                "tasks_per_s": sx.shape[0] / med,
                "first_loss": first_loss,
                "cpu_iter_s": cpu_times,
                "tasks_per_cpu_s": sx.shape[0] / cpu_med,
                "rss_import_mib": rss_import / 1024,
                "rss_setup_mib": rss_setup / 1024,
                "peak_growth_mib": peak_kib / 1024,
                "hwm_reset": hwm_reset,
                "gpu_peak_mib": gpu_peak,
                "gpu_reserved_mib": gpu_reserved,
                "gpu_blas_ws_mib": blas_ws,
                "gpu_peak_parts": peak_parts,
                "live_peak_mib": live_peak,
                "flops": flops,
                "torch": torch.__version__,
                "wall_s": time.perf_counter() - t_start,
            }
        )
    )


# ---------------------------------------------------------------------------------------- parent side
def _run_worker(impl: str, config: str, args: argparse.Namespace, l2l_env, flops: bool) -> dict:
    cmd = [
        __file__,
        "--worker",
        impl,
        "--config",
        config,
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
        "--dtype",
        args.dtype,
        "--warmup",
        str(args.warmup),
        "--iters",
        str(args.iters),
        "--device",
        args.device,
        "--tasks",
        str(args.tasks),
    ]
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
    if impl in harness.L2L_IMPLS:
        python, env = str(l2l_env.python), l2l_env.env(**threads)
    else:
        python, env = sys.executable, {**os.environ, **threads}
    proc = subprocess.run([python, *cmd], env=env, capture_output=True, text=True, cwd=harness.REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {impl}/{config} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch threads of every worker (same for both sides)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are taken over rounds")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed iterations per worker (ours: includes the auto choice)"
    )
    p.add_argument("--iters", type=int, default=3, help="timed iterations per worker")
    p.add_argument("--configs", default="so1,fo1,so5", help=f"comma list of {sorted(harness.CONFIGS)}")
    p.add_argument(
        "--impls",
        default="ours,ours-loop,ours-vmap,l2l",
        help="comma list of l2l and ours[-loop|-vmap][-cN|-call] (auto/loop/vmap task_mode; task_chunk=N or None; "
        "default: the library's task_chunk='auto')",
    )
    p.add_argument(
        "--auto-rounds",
        type=int,
        default=1,
        help="rounds in which auto-mode impls (ours, ours-cN) run; later rounds skip them (their choice "
        "is one of the fixed modes, which run every round)",
    )
    p.add_argument(
        "--tasks",
        type=int,
        default=harness.TASKS,
        help=f"meta-batch: the first N of the {harness.TASKS} stored tasks (the workload is {harness.TASKS}; a smaller N "
        "changes the workload: say so when quoting it)",
    )
    p.add_argument("--data", default="omniglot", choices=["omniglot", "random"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=Path, default=None, help="episode + initial weights file (made if missing)")
    p.add_argument("--out", type=Path, default=harness.BENCH_DIR / "maml_throughput.json")
    p.add_argument(
        "--l2l-src",
        type=Path,
        default=None,
        help="folder holding learn2learn's MAML files (as _l2l_env.py lays them out): run learn2learn with this "
        "interpreter instead of building its venv (for a machine without a package index, e.g. a lent GPU)",
    )
    p.add_argument(
        "--malloc-keep",
        action="store_true",
        help="run every worker with glibc's MALLOC_MMAP_THRESHOLD_=32 MiB and MALLOC_TRIM_THRESHOLD_=1 TiB "
        "(freed memory stays in the process: no page faults on re-allocation)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64"],
        help="float64: a parity check of the first iteration's loss (timings are then not the benchmark's)",
    )
    p.add_argument(
        "--live",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the peak of live tensor memory in one extra iteration (CPU)",
    )
    p.add_argument(
        "--memory-trace",
        action="store_true",
        help="cuda: record every allocation from the first iteration on and print what was live at the peak, "
        "by allocation site (slows the step: timings of such a run are not the benchmark's)",
    )
    p.add_argument(
        "--blas-workspace",
        default=None,
        metavar="CONFIG",
        help="cuda: CUBLAS_WORKSPACE_CONFIG for every worker, both sides (e.g. :4096:1 for one 4 MiB buffer; "
        "PyTorch's default on Hopper is 32 MiB per stream)",
    )
    p.add_argument(
        "--cudnn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cuda: --no-cudnn runs every worker, both sides, with torch.backends.cudnn.enabled = False",
    )
    p.add_argument(
        "--no-flops",
        action="store_true",
        help="skip the FLOP count (done in round 0 by l2l and ours-loop: the workload's FLOPs)",
    )
    p.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(argparse.Namespace(**{**vars(args), "impl": args.worker}))
        return
    args.configs = [c for c in args.configs.split(",") if c]
    args.impls = [i for i in args.impls.split(",") if i]
    if not 1 <= args.tasks <= harness.TASKS:
        p.error(f"--tasks {args.tasks} must be in 1..{harness.TASKS} (the stored meta-batch)")
    bad = [c for c in args.configs if c not in harness.CONFIGS]
    if bad:
        p.error(f"unknown configs {bad}; use {sorted(harness.CONFIGS)}")
    for impl in args.impls:
        if impl not in harness.L2L_IMPLS:
            try:
                harness.parse_impl(impl)
            except ValueError as err:
                p.error(str(err))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda but torch.cuda.is_available() is False; run on a GPU machine or use --device cpu")
    args.batch = args.batch or harness.BENCH_DIR / f"maml_batch_{args.data}_{args.seed}.pt"
    if not args.batch.exists():
        harness.make_batch(args.batch, args.data, args.seed)
    l2l_env = None
    if set(harness.L2L_IMPLS) & set(args.impls):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _l2l_env import L2LEnv, ensure_l2l_env

        if args.l2l_src is not None:
            import torch

            if not (args.l2l_src / "learn2learn" / "algorithms" / "maml.py").exists():
                p.error(f"--l2l-src {args.l2l_src}: no learn2learn/algorithms/maml.py there")
            l2l_env = L2LEnv(
                python=Path(sys.executable), pythonpath=args.l2l_src.resolve(), torch_version=torch.__version__
            )
        else:
            l2l_env = ensure_l2l_env()
    print(f"command: python {' '.join(sys.argv)}", flush=True)
    results: list[dict] = []
    gemm: dict[int, list[float]] = (
        {t: [] for t in sorted({1, 2, args.threads})} if args.device == "cpu" else {args.threads: []}
    )
    for r in range(args.rounds):
        for t in gemm:
            gemm[t].append(harness.matmul_gflops(t, args.device))
        for config in args.configs:
            order = args.impls[r % len(args.impls) :] + args.impls[: r % len(args.impls)]  # rotate who goes first
            for impl in order:
                if impl not in harness.L2L_IMPLS and harness.parse_impl(impl)[0] == "auto" and r >= args.auto_rounds:
                    continue
                count = r == 0 and not args.no_flops and impl in ("l2l", "ours-loop")  # the workload's FLOPs
                res = _run_worker(impl, config, args, l2l_env, flops=count)
                res["round"] = r
                results.append(res)
                partial = args.out.with_suffix(".partial.json")  # survives an interrupted run
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))
                print(
                    f"round {r} {config:4} {impl:10} {res['mode']:12} {res['tasks_per_s']:7.2f} tasks/s "
                    f"peak +{res['peak_growth_mib']:.0f} MiB live {res.get('live_peak_mib') or float('nan'):.1f} MiB loss0 {res['first_loss']:.4f}",
                    flush=True,
                )
    summary = harness.summarise(results, gemm, args)
    harness.print_summary(summary, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "summary": summary,
                "results": results,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            },
            indent=1,
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
