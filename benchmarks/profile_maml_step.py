"""Where the time of one second-order MAML step goes on this machine: op categories from torch.profiler.

Workload as ``bench_maml_throughput.py`` (Omniglot-shaped 5-way 1-shot, 15 queries per class, Conv4-64 with
max-pooling, inner lr 0.5, 1 inner step, second order, per-task loop), on ``--tasks`` tasks of random 28x28
images (the kernels' cost does not depend on pixel values). Prints the self CPU time per op category
(convolutions forward/backward, batch norm, max-pool, ReLU, the rest) and the FLOP rate of the convolutions
alone, which is what bounds the "% of the machine's matmul rate" figure of the throughput benchmark.

On CUDA (``--device cuda``) it prints instead what bounds a step on a GPU: the median wall time of a step,
the number of kernels launched, the summed kernel time (the GPU's busy share of the step: a low share means
launch- or CPU-bound), and the kernels that take the most GPU time.

Usage::

    python benchmarks/profile_maml_step.py --tasks 8 --threads 1
    python benchmarks/profile_maml_step.py --device cuda --tasks 32 --task-mode vmap
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import defaultdict
from collections.abc import Callable

__all__ = ["CATEGORIES", "main"]

#: op-name substrings -> category (first match wins)
CATEGORIES = [
    ("convolution_backward", "conv backward"),
    ("convolution", "conv forward"),
    ("batch_norm", "batch norm"),
    ("max_pool", "max-pool"),
    ("max_unpool", "max-pool"),
    ("threshold_backward", "relu"),
    ("clamp_min", "relu"),
    ("relu", "relu"),
    ("copy_", "copies (layout changes, contiguous)"),
]


def _category(name: str) -> str:
    for key, cat in CATEGORIES:
        if key in name:
            return cat
    return "other (elementwise, copies, fills, linear, optimizer, autograd)"


def maml_step(
    tasks: int,
    *,
    inner_steps: int = 1,
    first_order: bool = False,
    task_mode: str = "loop",
    task_chunk: int | str | None = "auto",
    device: str = "cpu",
) -> Callable[[], None]:
    """One meta-training step of the workload above (seeded weights, ``tasks`` tasks of random images) as a
    closure: ``training_step`` + ``backward`` + ``Adam.step``. Shared with ``bench_maml_step_ab.py``."""
    import torch

    from lightning_meta.algorithms import MAML
    from lightning_meta.episode import Episode
    from lightning_meta.nn import Conv4

    warnings.filterwarnings("ignore", message=".*self.log.*")
    torch.manual_seed(0)
    net = Conv4(5, hidden=64, downsample="maxpool", pooling="flatten", image_size=28)
    model = (
        MAML(
            net,
            inner_lr=0.5,
            inner_steps=inner_steps,
            first_order=first_order,
            task_mode=task_mode,
            task_chunk=task_chunk,
        )
        .train()
        .to(device)
    )
    opt = model.configure_optimizers()
    episode = Episode(
        torch.rand(tasks, 5, 1, 28, 28),
        torch.arange(5).repeat(tasks, 1),
        torch.rand(tasks, 75, 1, 28, 28),
        torch.arange(5).repeat_interleave(15).repeat(tasks, 1),
    ).to(device)

    def step() -> None:
        loss = model.training_step(episode, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--task-chunk", type=int, default=None)
    p.add_argument("--task-mode", default="loop", choices=["loop", "vmap"])
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--first-order", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=10, help="timed steps on CUDA (median)")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    t = args.tasks
    step = maml_step(
        t,
        inner_steps=args.inner_steps,
        first_order=args.first_order,
        task_mode=args.task_mode,
        task_chunk=args.task_chunk,
        device=args.device,
    )
    step()  # warm-up
    if args.device == "cuda":
        return _profile_cuda(step, args)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    c0 = time.process_time()
    step()
    cpu_s = time.process_time() - c0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    by_cat: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        if ev.key.startswith("aten::"):
            by_cat[_category(ev.key)] += ev.self_cpu_time_total / 1e6
    total = sum(by_cat.values())
    conv_s = by_cat["conv forward"] + by_cat["conv backward"]
    print(
        f"one step, {t} tasks, {args.threads} thread(s): {cpu_s:.3f} CPU-s unprofiled, {flops / 1e9:.1f} GFLOP "
        f"({flops / 1e9 / cpu_s:.1f} GFLOP/s overall)"
    )
    for cat, sec in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:66} {100 * sec / total:5.1f} %")
    print(
        f"convolutions alone: {flops / 1e9 / (conv_s * cpu_s / total):.1f} GFLOP/s (all counted FLOPs are conv/linear)"
    )
    return {k: v / total for k, v in by_cat.items()}


def _profile_cuda(step, args: argparse.Namespace) -> dict[str, float]:
    import statistics

    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    times = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    wall = statistics.median(times)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time_total for e in kernels) / 1e6
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.device_time_total / 1e6
    print(
        f"one step on {torch.cuda.get_device_name()}, {args.tasks} tasks, mode {args.task_mode}, {args.inner_steps} inner "
        f"step(s), {'first' if args.first_order else 'second'} order: {1e3 * wall:.2f} ms wall (median of {args.repeats}), "
        f"{len(kernels)} kernels, {1e3 * busy:.2f} ms of kernel time ({100 * busy / wall:.0f} % of the wall time)"
    )
    for name, (count, sec) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"  {1e3 * sec:7.3f} ms {count:5d}x  {name[:110]}")
    return {"wall_s": wall, "kernels": float(len(kernels)), "kernel_s": busy}


if __name__ == "__main__":
    main()
