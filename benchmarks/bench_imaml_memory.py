"""Peak memory of one meta-training step, iMAML vs second-order MAML, at several inner-step counts (CPU).

iMAML's inner loop keeps no graph (the implicit gradient needs only the adapted weights), so its peak should not
grow with the number of inner steps; MAML's second-order graph holds every step. ``imaml_hf`` is iMAML with the
Hessian-free inner solver, measured at ``--hf-steps`` Newton steps (5 CG steps and a 5-step line search each).
Measured as the peak of live tensor storage created during ``training_step`` + ``backward`` (a
``TorchDispatchMode`` that counts every new CPU storage until it is freed; memory outside tensors, e.g. oneDNN
scratch, is not counted on either side). Each configuration is measured ``--repeats`` times and the median is
reported, with the ratio to the same learner's peak at the smallest step count measured in the same run.

    nice -n 10 python benchmarks/bench_imaml_memory.py --steps 5 10 20 --hf-steps 1 2 4
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_meta.algorithms import IMAML, MAML
from lightning_meta.episode import Episode
from lightning_meta.nn import Conv4


class LiveBytes(TorchDispatchMode):
    """Peak bytes of CPU tensor storage created inside the mode and still alive."""

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
                if size == 0 or key in inputs or key in self.sizes:
                    continue
                self.sizes[key] = size
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key)
        return out


def episode(tasks: int, ways: int, shots: int, queries: int) -> Episode:
    g = torch.Generator().manual_seed(0)
    sx = torch.randn(tasks, ways * shots, 1, 28, 28, generator=g)
    qx = torch.randn(tasks, ways * queries, 1, 28, 28, generator=g)
    sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    qy = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    return Episode(sx, sy, qx, qy)


def measure(name: str, steps: int, b: Episode, ways: int) -> tuple[float, float]:
    torch.manual_seed(0)
    backbone = Conv4(ways, in_channels=1, hidden=64)
    if name == "maml":
        model = MAML(backbone, inner_lr=0.4, inner_steps=steps, task_mode="loop", task_chunk=1)
    elif name == "imaml_hf":
        model = IMAML(
            backbone,
            inner_solver="hessian_free",
            newton_steps=steps,
            lam=1.0,
            cg_steps=5,
            task_mode="loop",
            task_chunk=1,
        )
    else:
        model = IMAML(backbone, inner_lr=0.1, inner_steps=steps, lam=1.0, cg_steps=5, task_mode="loop", task_chunk=1)
    model.train()
    model.training_step(b, 0).backward()  # warm-up (allocator, oneDNN primitives)
    model.zero_grad(set_to_none=True)
    mode = LiveBytes()
    start = time.perf_counter()
    with mode:
        model.training_step(b, 0).backward()
    return mode.peak / 2**20, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--hf-steps", type=int, nargs="*", default=[1, 2, 4], help="Newton steps of imaml_hf")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    b = episode(args.tasks, args.ways, args.shots, args.queries)
    print(f"torch {torch.__version__}, CPU, 1 thread; Conv4-64 Omniglot 28x28, {args.ways}-way {args.shots}-shot, "
          f"{args.queries} queries/class, {args.tasks} tasks, task_mode=loop, task_chunk=1")  # fmt: skip
    print(f"{'learner':8} {'steps':>5} {'peak MiB':>9} {'x vs first':>10} {'step s':>7}")
    for name in ("maml", "imaml", "imaml_hf"):
        first = None
        for steps in args.hf_steps if name == "imaml_hf" else args.steps:
            runs = [measure(name, steps, b, args.ways) for _ in range(args.repeats)]
            peak = statistics.median(r[0] for r in runs)
            secs = statistics.median(r[1] for r in runs)
            first = first or peak
            print(f"{name:8} {steps:5d} {peak:9.1f} {peak / first:10.2f} {secs:7.2f}")


if __name__ == "__main__":
    main()
