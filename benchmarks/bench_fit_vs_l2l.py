"""User-level comparison: ``Trainer.fit`` of lightning-meta's MAML with default arguments vs learn2learn's MAML loop.

MAML: Finn, Abbeel, Levine, ICML 2017, arXiv:1703.03400. learn2learn: Arnold et al., arXiv:2008.12284.

What a user runs, on each side, in its own subprocess:

* ``ours``: ``Trainer(max_steps=N, limit_val_batches=0, ...).fit(MAML(Conv4(...)), OmniglotDataModule(root))``,
  with **every MAML argument at its default** (inner lr 0.4, one inner step, second order, ``task_mode="auto"``,
  ``task_chunk="auto"``) and the Trainer's defaults except those that print or write (no progress bar,
  no model summary, no logger or checkpoint files: the other side writes none either);
* ``l2l``: learn2learn 0.2.0's documented loop (``MAML(net, lr=0.4)``; per task ``clone()``, ``adapt()`` on the
  support loss, the query loss's ``backward()``; gradients scaled by 1/tasks; ``Adam.step``), over the same
  ``OmniglotDataModule``'s training batches (learn2learn's own data layer does not build on Python 3.11).

Same data (the same seeded Omniglot 5-way 1-shot batches, 15 queries, meta-batch 32, from ``../shared/data/omniglot``;
each worker prints a checksum of its first batch), same initial weights (a Conv4-64 with max-pooling, the paper's
Omniglot network, saved by the parent), same threads. Each worker reports the CPU time (``time.process_time``) of
the training (Trainer construction and ``fit`` / the loop, data sampling included on both sides), its RSS after
imports, and its memory growth over import: the peak RSS (``VmHWM``) minus the RSS after imports. The workers are
interleaved round by round; the medians over rounds and the ratios are printed.

Usage::

    nice -n 10 python benchmarks/bench_fit_vs_l2l.py --steps 12 --rounds 3
    nice -n 10 python benchmarks/bench_fit_vs_l2l.py --task-mode loop   # ours with task_mode="loop"

The learn2learn side needs only learn2learn's MAML wrapper (three pure-Python files of its sdist). By default they
are extracted into the cache of ``_l2l_env.py`` and run with this interpreter (the same torch);
``--l2l-venv`` uses ``_l2l_env.py``'s private venv instead (a separate torch install: slow to build).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / ".bench"
DATA_DIR = REPO.parent / "shared" / "data" / "omniglot"
WAYS, SHOTS, QUERIES, TASKS = 5, 1, 15, 32
#: MAML's defaults in lightning-meta (checked by the worker against the signature), used on both sides
INNER_LR, META_LR = 0.4, 1e-3


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _batches(root: str, seed: int):
    from lightning_meta.datamodules import OmniglotDataModule

    dm = OmniglotDataModule(root, ways=WAYS, shots=SHOTS, queries=QUERIES, tasks_per_batch=TASKS, seed=seed)
    return dm


def _checksum(ep) -> str:
    h = hashlib.sha1()
    for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import torch.nn.functional as F

    if args.worker == "l2l":
        from learn2learn.algorithms.maml import MAML as L2LMAML

        from lightning_meta.datamodules import OmniglotDataModule
    else:
        import lightning.pytorch as pl

        from lightning_meta.algorithms import MAML
        from lightning_meta.datamodules import OmniglotDataModule  # noqa: F401 - imported before the import RSS is read, as the l2l side does
        from lightning_meta.nn import Conv4
    rss_import = _rss_kib("VmRSS")
    state = torch.load(args.init, map_location="cpu")
    dm = _batches(args.data, args.seed)
    first: dict = {}
    c0, t0 = time.process_time(), time.perf_counter()
    if args.worker == "l2l":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_maml_throughput import _conv4_plain

        net = _conv4_plain(WAYS)
        net.load_state_dict(state)
        maml = L2LMAML(net, lr=INNER_LR, first_order=False)
        opt = torch.optim.Adam(maml.parameters(), lr=META_LR)
        dm.setup("fit")
        for step, ep in enumerate(dm.train_dataloader()):
            if step == args.steps:
                break
            if step == 0:
                first["checksum"] = _checksum(ep)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for t in range(ep.support_x.shape[0]):
                learner = maml.clone()
                learner.adapt(F.cross_entropy(learner(ep.support_x[t]), ep.support_y[t]))
                loss = F.cross_entropy(learner(ep.query_x[t]), ep.query_y[t])
                loss.backward()
                total += loss.item()
            for p in maml.parameters():
                p.grad.mul_(1.0 / ep.support_x.shape[0])
            opt.step()
            if step == 0:
                first["loss"] = total / ep.support_x.shape[0]
        params = list(maml.parameters())
        mode = "l2l"
    else:
        import inspect

        defaults = {k: v.default for k, v in inspect.signature(MAML).parameters.items()}
        assert defaults["inner_lr"] == INNER_LR and defaults["meta_lr"] == META_LR, defaults
        net = Conv4(WAYS, hidden=64, downsample="maxpool", pooling="flatten", image_size=28)
        net.load_state_dict(state)
        kwargs = {} if args.task_mode == "default" else {"task_mode": args.task_mode}
        model = MAML(net, **kwargs)

        class First(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
                if batch_idx == 0:
                    first["checksum"], first["loss"] = _checksum(batch), float(outputs["loss"])

        with tempfile.TemporaryDirectory() as root:
            trainer = pl.Trainer(
                max_steps=args.steps,
                limit_val_batches=0,
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=root,
                callbacks=[First()],
            )
            trainer.fit(model, datamodule=dm)
        params = list(model.parameters())
        choices = getattr(model.task_mode_selector, "choices", {})
        mode = ",".join(sorted({str(c) for c in choices.values()})) or args.task_mode
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    print(
        json.dumps(
            {
                "worker": args.worker,
                "mode": mode,
                "steps": args.steps,
                "cpu_s": cpu,
                "wall_s": wall,
                "rss_import_mib": rss_import / 1024,
                "peak_mib": _rss_kib("VmHWM") / 1024,
                "growth_mib": (_rss_kib("VmHWM") - rss_import) / 1024,
                "first_loss": first.get("loss"),
                "first_batch": first.get("checksum"),
                "param_sum": float(sum(p.detach().double().sum() for p in params)),
            }
        )
    )


def _l2l_sources(cache: Path) -> Path:
    """learn2learn's MAML wrapper (three files of its sdist) under ``cache/l2l-src``, as ``_l2l_env.py`` lays them out."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _l2l_env

    src = cache / "l2l-src"
    if (src / "learn2learn" / "algorithms" / "maml.py").exists():
        return src
    sdist_dir = cache / "sdist"
    sdist = sdist_dir / f"learn2learn-{_l2l_env.L2L_VERSION}.tar.gz"
    if not sdist.exists():
        sdist_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                f"learn2learn=={_l2l_env.L2L_VERSION}",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--no-build-isolation",
                "-d",
                str(sdist_dir),
            ],
            check=True,
        )
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
        for inner, target in _l2l_env._FILES.items():
            out = src / target
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(members[inner]).read())  # type: ignore[union-attr]
    for target, text in _l2l_env._STUBS.items():
        (src / target).write_text(text)
    return src


def _run(worker: str, args: argparse.Namespace, init: Path, l2l: tuple[str, str]) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        worker,
        "--init",
        str(init),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--data",
        args.data,
        "--seed",
        str(args.seed),
        "--task-mode",
        args.task_mode,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        LIGHTNING_META_CACHE=str(BENCH_DIR / "cache"),
    )
    env["PYTHONPATH"] = str(REPO)
    if worker == "l2l":
        cmd[0] = l2l[0]
        env["PYTHONPATH"] = os.pathsep.join([l2l[1], str(REPO)])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{worker} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=12, help="meta-training steps per worker (the auto trial is in step 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ours, l2l); medians over rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(DATA_DIR))
    p.add_argument(
        "--task-mode",
        default="default",
        choices=["default", "auto", "loop", "vmap"],
        help="ours' task_mode (default: MAML's default, not passed)",
    )
    p.add_argument("--l2l-venv", action="store_true", help="run learn2learn in _l2l_env.py's private venv")
    p.add_argument("--out", type=Path, default=None, help="write the per-round results here (JSON)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--init", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _l2l_env import default_cache_dir, ensure_l2l_env

    from lightning_meta.nn import Conv4

    if args.l2l_venv:
        env = ensure_l2l_env()
        l2l = (str(env.python), str(env.pythonpath))
    else:
        l2l = (sys.executable, str(_l2l_sources(default_cache_dir())))
    BENCH_DIR.mkdir(exist_ok=True)
    init = BENCH_DIR / f"fit_vs_l2l_init_{args.seed}.pt"
    torch.manual_seed(args.seed)
    torch.save(Conv4(WAYS, hidden=64, downsample="maxpool", pooling="flatten", image_size=28).state_dict(), init)
    t_all = time.perf_counter()
    rounds = []
    for r in range(args.rounds):
        ours, theirs = _run("ours", args, init, l2l), _run("l2l", args, init, l2l)
        if ours["first_batch"] != theirs["first_batch"]:
            raise RuntimeError(f"the two sides saw different data: {ours['first_batch']} vs {theirs['first_batch']}")
        rounds.append({"ours": ours, "l2l": theirs})
        if args.out:  # after every round: a run cut short keeps what it measured
            args.out.write_text(json.dumps(rounds, indent=1))
        print(
            f"round {r}: ours ({ours['mode']}) {ours['cpu_s']:.1f} CPU-s, growth {ours['growth_mib']:.0f} MiB "
            f"(import {ours['rss_import_mib']:.0f}) | l2l {theirs['cpu_s']:.1f} CPU-s, growth {theirs['growth_mib']:.0f} MiB "
            f"(import {theirs['rss_import_mib']:.0f}) | "
            f"speed {theirs['cpu_s'] / ours['cpu_s']:.2f}x, memory {ours['growth_mib'] / theirs['growth_mib']:.2f}x | "
            f"first loss {ours['first_loss']:.6f} vs {theirs['first_loss']:.6f}",
            flush=True,
        )

    def med(side: str, key: str) -> float:
        return statistics.median(x[side][key] for x in rounds)

    speed = statistics.median(x["l2l"]["cpu_s"] / x["ours"]["cpu_s"] for x in rounds)
    memory = statistics.median(x["ours"]["growth_mib"] / x["l2l"]["growth_mib"] for x in rounds)
    print(
        f"\n{args.steps} steps of Omniglot 5w1s, meta-batch {TASKS}, second order, {args.threads} thread(s); "
        f"medians over {args.rounds} rounds ({time.perf_counter() - t_all:.0f} s in all)"
    )
    for side in ("ours", "l2l"):
        print(
            f"  {side:4s}: {med(side, 'cpu_s'):7.1f} CPU-s ({med(side, 'wall_s'):.1f} s wall), import RSS "
            f"{med(side, 'rss_import_mib'):.0f} MiB, memory growth over import {med(side, 'growth_mib'):.0f} MiB"
        )
    print(
        f"  ours vs learn2learn: {speed:.2f}x its speed by CPU time, {memory:.2f}x its memory growth over import "
        f"(ours' task mode: {rounds[-1]['ours']['mode']})"
    )


if __name__ == "__main__":
    main()
