"""Share of a training step spent sampling variable-way, variable-shot episodes (Meta-Dataset's sampler).

Interleaved round by round in one process (machine load affects all alike):

1. ``variable``: one batch of ``--tasks`` episodes from ``OmniglotDataModule(variable_episodes=VariableEpisodes())``
   (5-50 ways, up to 10 queries per class, support set up to 500; 28x28, rotations as classes; warm cache,
   ``num_workers=0``), padded by the loader;
2. ``fixed``: one batch of 5-way 1-shot 15-query episodes from the same datamodule without the option
   (the baseline sampler);
3. ``step``: one ProtoNet training step (Conv4-64, ``MetaLearner.training_step`` + backward + Adam) on the
   variable batch just drawn.

Shapes vary per batch, so the share is computed per round (sampling / (sampling + step)) and its median
reported, besides the medians of each part. Usage::

    python benchmarks/bench_variable_episodes.py --root ../shared/data/omniglot --rounds 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "omniglot"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--tasks", type=int, default=1, help="episodes per batch (Meta-Dataset trains on one)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from lightning_meta.algorithms import ProtoNet
    from lightning_meta.datamodules import OmniglotDataModule, VariableEpisodes
    from lightning_meta.nn import conv4_protonet

    n = args.tasks * (args.rounds + 1)
    common = dict(split="seeded", tasks_per_batch=args.tasks, train_episodes=n)
    var_dm = OmniglotDataModule(args.root, variable_episodes=VariableEpisodes(), **common)
    fix_dm = OmniglotDataModule(args.root, ways=5, shots=1, queries=15, **common)
    var_dm.setup(), fix_dm.setup()
    print(f"train classes (with rotations): {var_dm.datasets['train'].num_classes}")
    torch.manual_seed(0)
    net = ProtoNet(conv4_protonet())
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    it_var, it_fix = iter(var_dm.train_dataloader()), iter(fix_dm.train_dataloader())

    def step(batch) -> None:
        loss = net.training_step(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(next(it_var)), next(it_fix)  # warm up
    t_var, t_fix, t_step, share, sizes = [], [], [], [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        batch = next(it_var)
        t_var.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        next(it_fix)
        t_fix.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        step(batch)
        t_step.append(time.perf_counter() - t0)
        share.append(t_var[-1] / (t_var[-1] + t_step[-1]))
        sizes.append((batch.support_y.shape[1], batch.query_y.shape[1]))
    med = statistics.median
    print(
        f"rounds {args.rounds}, tasks/batch {args.tasks}, torch threads {torch.get_num_threads()}, python {sys.version.split()[0]}"
    )
    print(f"padded (support, query) rows per task: min {min(sizes)}, max {max(sizes)}")
    print(f"variable sampling: {med(t_var) * 1e3:8.2f} ms / batch")
    print(f"fixed 5w1s sampling: {med(t_fix) * 1e3:6.2f} ms / batch (variable/fixed {med(t_var) / med(t_fix):.2f}x)")
    print(f"ProtoNet step:     {med(t_step) * 1e3:8.2f} ms / batch")
    print(f"sampling share of a step: median {med(share):.4f}, max {max(share):.4f}")


if __name__ == "__main__":
    main()
