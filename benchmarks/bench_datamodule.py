"""Episode sampling throughput of the Omniglot datamodule, its share of a MAML step, and learn2learn.

Measures, interleaved round by round in one process (so machine load affects all alike):

1. ``ours``: one batch of 32 episodes (5-way 1-shot 15 queries, 28x28, rotations as classes)
   from ``OmniglotDataModule`` over the given zips, warm cache, ``num_workers=0``.
2. ``maml``: one second-order MAML meta-training step (Finn et al. 2017, arXiv:1703.03400) on a
   Conv4, 1 inner step, meta-batch 32, written inline with ``torch.func.functional_call``.
3. ``l2l`` (optional, ``--l2l-python``): learn2learn 0.2.0 ``TaskDataset`` (NWays, KShots,
   LoadData, RemapLabels, ConsecutiveLabels) over the same decoded training images, 32
   ``sample()`` calls stacked and split into support/query. ``pip install learn2learn==0.2.0``
   fails on Python 3.11 (its shipped Cython-generated C includes ``longintrepr.h``); what worked::

       python3 -m venv /tmp/l2l/venv
       echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/l2l/venv/lib/python3.11/site-packages/project.pth
       /tmp/l2l/venv/bin/pip install wheel "cython<3" requests tqdm gym==0.26.2
       cd /tmp/l2l && venv/bin/pip download --no-deps --no-build-isolation learn2learn==0.2.0 -d .
       tar xzf learn2learn-0.2.0.tar.gz && cd learn2learn-0.2.0
       rm learn2learn/data/*.c && /tmp/l2l/venv/bin/python setup.py build_ext --inplace
       export PYTHONPATH=/tmp/l2l/learn2learn-0.2.0

   When given, the whole measurement runs under that interpreter so all three are interleaved.

Prints medians, episodes/s and ratios. Usage::

    python benchmarks/bench_datamodule.py --root ../shared/data/omniglot [--l2l-python /tmp/l2l/venv/bin/python]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

WAYS, SHOTS, QUERIES, TASKS = 5, 1, 15, 32


def conv4_params(ways: int, hidden: int = 64, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    params, cin = {}, 1
    for i in range(4):
        params[f"conv{i}.weight"] = torch.randn(hidden, cin, 3, 3, generator=generator) * (2 / (9 * cin)) ** 0.5
        params[f"conv{i}.bias"] = torch.zeros(hidden)
        params[f"bn{i}.weight"] = torch.ones(hidden)
        params[f"bn{i}.bias"] = torch.zeros(hidden)
        cin = hidden
    params["head.weight"] = torch.randn(ways, hidden, generator=generator) * hidden**-0.5
    params["head.bias"] = torch.zeros(ways)
    return {k: v.requires_grad_() for k, v in params.items()}


def conv4(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for i in range(4):
        x = F.conv2d(x, params[f"conv{i}.weight"], params[f"conv{i}.bias"], padding=1)
        x = F.batch_norm(x, None, None, params[f"bn{i}.weight"], params[f"bn{i}.bias"], training=True)
        x = F.max_pool2d(F.relu(x), 2)  # 28 -> 14 -> 7 -> 3 -> 1
    return F.linear(x.flatten(1), params["head.weight"], params["head.bias"])


def maml_step(params, opt, batch, inner_lr: float = 0.4) -> float:
    """One second-order MAML step: per task, one inner SGD step on the support set, query loss backward."""
    total = 0.0
    for t in range(batch.tasks):
        loss = F.cross_entropy(conv4(params, batch.support_x[t]), batch.support_y[t])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        fast = {k: p - inner_lr * g for (k, p), g in zip(params.items(), grads)}
        qloss = F.cross_entropy(conv4(fast, batch.query_x[t]), batch.query_y[t]) / batch.tasks
        qloss.backward()
        total += float(qloss.detach())
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def l2l_sampler(images: torch.Tensor, labels: torch.Tensor):
    """A function drawing one learn2learn batch of TASKS tasks, split into support/query like our Episode."""
    import learn2learn as l2l
    from learn2learn.data.transforms import ConsecutiveLabels, KShots, LoadData, NWays, RemapLabels

    data = l2l.data.MetaDataset(torch.utils.data.TensorDataset(images, labels))
    tasks = l2l.data.TaskDataset(
        data,
        task_transforms=[
            NWays(data, WAYS),
            KShots(data, SHOTS + QUERIES),
            LoadData(data),
            RemapLabels(data),
            ConsecutiveLabels(data),
        ],
        num_tasks=-1,
    )

    def draw():
        xs, ys = zip(*(tasks.sample() for _ in range(TASKS)))
        x, y = torch.stack(xs).float().div_(255), torch.stack(ys)  # (tasks, ways * (shots + queries), ...)
        # ConsecutiveLabels groups rows by label: support = first SHOTS rows of each class
        x = x.view(TASKS, WAYS, SHOTS + QUERIES, *x.shape[2:])
        y = y.view(TASKS, WAYS, SHOTS + QUERIES)
        return (
            x[:, :, :SHOTS].flatten(1, 2),
            y[:, :, :SHOTS].flatten(1),
            x[:, :, SHOTS:].flatten(1, 2),
            y[:, :, SHOTS:].flatten(1),
        )

    return draw


def measure(root: str, rounds: int, maml_rounds: int, with_l2l: bool) -> dict[str, list[float]]:
    from lightning_meta.datamodules.omniglot import OmniglotDataModule

    dm = OmniglotDataModule(
        root, ways=WAYS, shots=SHOTS, queries=QUERIES, tasks_per_batch=TASKS, train_episodes=TASKS * (rounds + 1)
    )
    t0 = time.perf_counter()
    dm.setup()  # fills the cache if needed
    print(f"setup (first): {time.perf_counter() - t0:.2f} s", flush=True)
    t0 = time.perf_counter()
    dm = OmniglotDataModule(
        root, ways=WAYS, shots=SHOTS, queries=QUERIES, tasks_per_batch=TASKS, train_episodes=TASKS * (rounds + 1)
    )
    dm.setup()
    print(f"setup (warm cache): {time.perf_counter() - t0:.2f} s", flush=True)
    store = dm.datasets["train"].store
    draw_l2l = None
    if with_l2l:
        labels = torch.repeat_interleave(torch.arange(store.num_classes), store.counts())
        draw_l2l = l2l_sampler(store.images, labels)
        draw_l2l()  # warm up
    params = conv4_params(WAYS, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    times: dict[str, list[float]] = {"ours": [], "maml": []} | ({"l2l": []} if with_l2l else {})
    it = iter(dm.train_dataloader())
    batch = next(it)  # warm up
    maml_step(params, opt, batch)
    for r in range(rounds):
        t0 = time.perf_counter()
        batch = next(it)
        times["ours"].append(time.perf_counter() - t0)
        if draw_l2l is not None:
            t0 = time.perf_counter()
            draw_l2l()
            times["l2l"].append(time.perf_counter() - t0)
        if r < maml_rounds:  # a CPU second-order step takes seconds: time fewer of them
            t0 = time.perf_counter()
            maml_step(params, opt, batch)
            times["maml"].append(time.perf_counter() - t0)
    return times


def report(times: dict[str, list[float]]) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"rounds: {len(times['ours'])} sampling, {len(times['maml'])} maml; torch threads: {torch.get_num_threads()}, python {sys.version.split()[0]}"
    )
    print(f"ours: {med['ours'] * 1e3:8.2f} ms / batch of {TASKS} episodes = {TASKS / med['ours']:8.0f} episodes/s")
    if "l2l" in med:
        print(f"l2l : {med['l2l'] * 1e3:8.2f} ms / batch of {TASKS} tasks    = {TASKS / med['l2l']:8.0f} episodes/s")
        print(f"ratio l2l/ours time per batch: {med['l2l'] / med['ours']:.2f}x (ours is that many times faster)")
    print(f"maml: {med['maml'] * 1e3:8.2f} ms / second-order step (Conv4, 1 inner step, {TASKS} tasks)")
    print(f"sampling share of a step, ours: {med['ours'] / (med['ours'] + med['maml']):.4f}")
    if "l2l" in med:
        print(f"sampling share of a step, l2l : {med['l2l'] / (med['l2l'] + med['maml']):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "omniglot"))
    ap.add_argument("--rounds", type=int, default=30, help="sampling rounds (ours and l2l interleaved)")
    ap.add_argument("--maml-rounds", type=int, default=3, help="MAML steps timed (in the first rounds)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--l2l-python", default=None, help="interpreter with learn2learn 0.2.0 (and this project) importable"
    )
    ap.add_argument("--in-l2l", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.l2l_python and not args.in_l2l:
        cmd = [
            args.l2l_python,
            __file__,
            "--root",
            args.root,
            "--rounds",
            str(args.rounds),
            "--maml-rounds",
            str(args.maml_rounds),
            "--threads",
            str(args.threads),
            "--in-l2l",
        ]
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
        sys.exit(subprocess.call(cmd, env=env))
    report(measure(args.root, args.rounds, args.maml_rounds, with_l2l=args.in_l2l))


if __name__ == "__main__":
    main()
