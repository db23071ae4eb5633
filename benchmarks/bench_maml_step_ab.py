"""A/B of one MAML meta-training step between a git ref and the working tree: CPU time and page faults.

Workload: ``profile_maml_step.maml_step`` (as ``bench_maml_throughput.py``: Conv4-64 with max-pooling, 5-way
1-shot, 15 queries per class, inner lr 0.5, one inner step, second order unless ``--first-order``, per-task
loop) on ``--tasks`` tasks of random 28x28 images. Each side runs in its own subprocess (``PYTHONPATH`` pointing at the ref's worktree or at
this checkout), the sides alternating ``--pairs`` times so that background load hits both; per run: the median
CPU time (``time.process_time``, one thread) and the median minor page faults of ``--steps`` steps after one
warm-up. ``--malloc-keep`` sets glibc's ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` for both sides
(freed memory stays in the process: no page faults on re-allocation).

Usage::

    python benchmarks/bench_maml_step_ab.py HEAD~1 --pairs 3 --malloc-keep
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]


def _worker(args: argparse.Namespace) -> None:
    import resource
    import time

    import torch
    from profile_maml_step import maml_step  # this folder is on sys.path: the script's own

    torch.set_num_threads(1)
    step = maml_step(args.tasks, first_order=args.first_order)
    step()
    cpu, faults = [], []
    for _ in range(args.steps):
        f0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
        step()
        cpu.append(time.process_time() - c0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(json.dumps({"cpu_s": statistics.median(cpu), "minflt": statistics.median(faults)}))


def _run(path: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": "1"}
    if args.malloc_keep:
        from lightning_meta.memory import GLIBC_KEEP_ENV

        env |= GLIBC_KEEP_ENV
    cmd = [sys.executable, __file__, "--worker", "--tasks", str(args.tasks), "--steps", str(args.steps)]
    if args.first_order:
        cmd.append("--first-order")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=path)
    if proc.returncode != 0:
        raise RuntimeError(f"worker at {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ref", nargs="?", default="HEAD", help="git ref to compare the working tree against")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps per run (median)")
    p.add_argument("--first-order", action="store_true")
    p.add_argument("--malloc-keep", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="lm-ab-") as tmp:
        base = Path(tmp) / "ref"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base), args.ref], check=True)
        try:
            rows = []
            for i in range(args.pairs):
                order = [("ref", base), ("tree", REPO)] if i % 2 else [("tree", REPO), ("ref", base)]
                res = {name: _run(path, args) for name, path in order}
                rows.append(res)
                print(
                    f"pair {i}: tree {res['tree']['cpu_s']:.3f} CPU-s ({res['tree']['minflt']:.0f} faults), "
                    f"{args.ref} {res['ref']['cpu_s']:.3f} CPU-s ({res['ref']['minflt']:.0f} faults), "
                    f"tree/ref {res['tree']['cpu_s'] / res['ref']['cpu_s']:.3f}",
                    flush=True,
                )
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
    ratios = [r["tree"]["cpu_s"] / r["ref"]["cpu_s"] for r in rows]
    print(
        f"\n{args.tasks} tasks, {'first' if args.first_order else 'second'} order, malloc-keep {args.malloc_keep}: "
        f"median tree/{args.ref} CPU time {statistics.median(ratios):.3f} over {args.pairs} pairs "
        f"({', '.join(f'{r:.3f}' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
