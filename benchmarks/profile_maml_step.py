"""Where the time of one second-order MAML step goes on this machine: op categories from torch.profiler.

Workload as ``bench_maml_throughput.py`` (Omniglot-shaped 5-way 1-shot, 15 queries per class, Conv4-64 with
max-pooling, inner lr 0.5, 1 inner step, second order, per-task loop), on ``--tasks`` tasks of random 28x28
images (the kernels' cost does not depend on pixel values). Prints the self CPU time per op category
(convolutions forward/backward, batch norm, max-pool, ReLU, the rest) and the FLOP rate of the convolutions
alone, which is what bounds the "% of the machine's matmul rate" figure of the throughput benchmark.

Usage::

    python benchmarks/profile_maml_step.py --tasks 8 --threads 1
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import defaultdict

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


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--task-chunk", type=int, default=None)
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_meta.algorithms import MAML
    from lightning_meta.episode import Episode
    from lightning_meta.nn import Conv4

    warnings.filterwarnings("ignore", message=".*self.log.*")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t = args.tasks
    net = Conv4(5, hidden=64, downsample="maxpool", pooling="flatten", image_size=28)
    model = MAML(net, inner_lr=0.5, inner_steps=1, task_mode="loop", task_chunk=args.task_chunk).train()
    opt = model.configure_optimizers()
    episode = Episode(torch.rand(t, 5, 1, 28, 28), torch.arange(5).repeat(t, 1),
                      torch.rand(t, 75, 1, 28, 28), torch.arange(5).repeat_interleave(15).repeat(t, 1))

    def step() -> None:
        loss = model.training_step(episode, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
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
    print(f"one step, {t} tasks, {args.threads} thread(s): {cpu_s:.3f} CPU-s unprofiled, {flops / 1e9:.1f} GFLOP "
          f"({flops / 1e9 / cpu_s:.1f} GFLOP/s overall)")
    for cat, sec in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:66} {100 * sec / total:5.1f} %")
    print(f"convolutions alone: {flops / 1e9 / (conv_s * cpu_s / total):.1f} GFLOP/s (all counted FLOPs are conv/linear)")
    return {k: v / total for k, v in by_cat.items()}


if __name__ == "__main__":
    main()
