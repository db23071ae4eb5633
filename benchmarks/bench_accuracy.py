"""Time-boxed accuracy runs: MAML and ProtoNet on Omniglot 5-way 1-shot, MAML on sinusoid regression.

Papers: MAML (Finn, Abbeel, Levine, ICML 2017, arXiv:1703.03400); Prototypical Networks (Snell,
Swersky, Zemel, NeurIPS 2017, arXiv:1703.05175). Protocols: docs/algorithms/maml.md, docs/algorithms/protonet.md, docs/guide/datasets.md.

Each run meta-trains with a plain ``lightning.Trainer`` for ``--minutes`` of *CPU time* of the
training process (``time.process_time()``, checked after every optimizer step; on a shared machine
wall-clock time says little about how much training was done), capped at ``--max-wall-minutes`` of
wall-clock time (``Trainer(max_time=...)``), then evaluates on fixed test episodes (600 by default; episodes are a
pure function of the seed, so every run sees the same ones) twice: with ``Trainer.test`` (the
library's ``test/acc`` and ``test/acc_ci95`` metrics) and with an independent loop written here over
the same test loader (mean ± 1.96·std/sqrt(n) of the per-episode scores). It prints the config and
the final ``mean ± 95% CI``, and writes a JSON record next to the Lightning CSV log.

Omniglot: the datamodule's seeded character split of the shared ``images_background_small{1,2}``
zips (242 characters; 70/10/20 % train/val/test characters, ``split_seed=0``), rotations as new
classes, 28x28, strokes = 1; test characters are never seen in training. MAML uses the paper's
Omniglot Conv4 (stride 2, no pooling, transductive BN); ProtoNet the Conv4-64 embedding (max-pool,
BN with running statistics, non-transductive).

Sinusoid: ``y = A sin(x - phi)``, K support points; the test MSE is scored on K random query points
per task (MAML's protocol) by default, or on a 100-point grid over [-5, 5] with ``--eval-grid 100``
(CAVIA's protocol): docs/guide/evaluation.md.

Examples::

    python benchmarks/bench_accuracy.py --algo maml --minutes 30 --max-wall-minutes 80
    python benchmarks/bench_accuracy.py --algo protonet --minutes 30
    python benchmarks/bench_accuracy.py --algo maml-sinusoid --minutes 10 --eval-inner-steps 10
    # a pilot: choose settings on the validation characters, never on the test ones
    python benchmarks/bench_accuracy.py --algo maml --minutes 6 --task-mode loop --eval-split val --zero-init

glibc's allocator hands freed memory back to the OS after every task and page-faults it in again;
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1099511627776`` in the environment keeps it
(docs/bench/maml.md). This session's runs set them; say so when quoting a run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / ".bench"
DATA_DIR = REPO.parent / "shared" / "data" / "omniglot"

#: Per-algorithm defaults (each can be overridden from the command line).
DEFAULTS = {
    # inner_lr 2.0 = MAML's alpha 0.4 on its 5x-mean loss; in 4-CPU-minute pilots it beat 1.0 (90.6 vs 90.0 %)
    # and 0.4, and 5 training queries per class beat 1 (88 %) at equal CPU time (docs/bench/maml.md)
    "maml": dict(tasks_per_batch=8, queries=5, eval_queries=15, inner_lr=2.0, inner_steps=1, eval_inner_steps=3,
                 meta_lr=3e-3, first_order=False, ways=5, shots=1, train_ways=None, cosine_to=0.05),
    "protonet": dict(tasks_per_batch=1, queries=5, eval_queries=15, inner_lr=None, inner_steps=None,
                     eval_inner_steps=None, meta_lr=1e-3, first_order=None, ways=5, shots=1, train_ways=20),
    "maml-sinusoid": dict(tasks_per_batch=25, queries=10, eval_queries=10, inner_lr=0.01, inner_steps=1,
                          eval_inner_steps=1, meta_lr=1e-3, first_order=False, ways=1, shots=10, train_ways=None),
}


def _ci95(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, 1.96 * math.sqrt(var / n)


def _build(args: argparse.Namespace):
    """The datamodule and the LightningModule of ``args.algo``."""
    if args.algo == "maml-sinusoid":
        from lightning_meta.algorithms.maml import MAML
        from lightning_meta.datamodules.sinusoid import SinusoidDataModule
        from lightning_meta.nn import MLP

        dm = SinusoidDataModule(shots=args.shots, queries=args.queries, tasks_per_batch=args.tasks_per_batch,
                                train_episodes=args.tasks_per_batch * 100, val_episodes=args.tasks_per_batch,
                                test_episodes=args.test_episodes, eval_queries=args.eval_queries,
                                eval_grid=args.eval_grid, seed=args.seed)
        model = MAML(MLP(), inner_lr=args.inner_lr, inner_steps=args.inner_steps,
                     eval_inner_steps=args.eval_inner_steps, first_order=args.first_order, meta_lr=args.meta_lr,
                     task_mode=args.task_mode)
        return dm, model

    from lightning_meta.datamodules.omniglot import OmniglotDataModule

    train_ways = args.train_ways or args.ways
    dm = OmniglotDataModule(str(args.data_dir), split="seeded", split_seed=0, ways=train_ways, shots=args.shots,
                            queries=args.queries, tasks_per_batch=args.tasks_per_batch,
                            train_episodes=args.tasks_per_batch * 100,
                            val_episodes=args.test_episodes if args.eval_split == "val" else args.tasks_per_batch,
                            test_episodes=args.test_episodes, eval_ways=args.ways, eval_shots=args.shots,
                            eval_queries=args.eval_queries, seed=args.seed)
    if args.algo == "maml":
        from lightning_meta.algorithms.maml import MAML
        from lightning_meta.nn import conv4_maml_omniglot

        model = MAML(conv4_maml_omniglot(args.ways), inner_lr=args.inner_lr, inner_steps=args.inner_steps,
                     eval_inner_steps=args.eval_inner_steps, first_order=args.first_order, meta_lr=args.meta_lr,
                     task_mode=args.task_mode, zero_init=("head.weight",) if args.zero_init else ())
    else:
        from lightning_meta.algorithms.protonet import ProtoNet
        from lightning_meta.nn import conv4_protonet

        model = ProtoNet(conv4_protonet(), meta_lr=args.meta_lr)
    return dm, model


def _cpu_budget_callback(minutes: float, cosine_to: float | None = None):
    """A callback that stops training once this process has used ``minutes`` of CPU time.

    With ``cosine_to`` it also anneals every optimizer's learning rate by a cosine over the *CPU-time*
    fraction of the budget, from its initial value down to ``cosine_to`` times it (the number of steps a
    time budget buys is not known in advance, so the schedule runs on the clock the budget is counted in).
    """
    import math

    from lightning.pytorch import Callback

    class CPUTimeBudget(Callback):
        def __init__(self) -> None:
            self.start = time.process_time()
            self.base_lrs: list[list[float]] = []

        def on_train_start(self, trainer, pl_module) -> None:
            self.start = time.process_time()  # data decoding and set-up are not training
            self.base_lrs = [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers]

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if cosine_to is None:
                return
            frac = min(1.0, (time.process_time() - self.start) / (60.0 * minutes))
            factor = cosine_to + (1.0 - cosine_to) * 0.5 * (1.0 + math.cos(math.pi * frac))
            for opt, bases in zip(trainer.optimizers, self.base_lrs):
                for group, base in zip(opt.param_groups, bases):
                    group["lr"] = base * factor

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if time.process_time() - self.start >= 60.0 * minutes:
                trainer.should_stop = True

    return CPUTimeBudget()


def _independent_eval(model, dm, regression: bool, split: str = "test") -> list[float]:
    """Per-episode accuracy (or MSE) on the test (or validation) episodes, computed here from the query outputs."""
    import torch

    model.eval()
    scores: list[float] = []
    for batch in (dm.test_dataloader() if split == "test" else dm.val_dataloader()):
        with torch.no_grad():
            out = model(batch)  # (tasks, queries, ways) or (tasks, queries, 1)
        if regression:
            per = ((out.reshape(batch.query_y.shape).float() - batch.query_y) ** 2).mean(-1)
        else:
            per = (out.argmax(-1) == batch.query_y).float().mean(-1)
        scores += per.tolist()
    return scores


def _eval_only(args: argparse.Namespace, dm, model, out_dir: Path) -> dict:
    """Score saved weights on ``args.eval_split`` (Omniglot/sinusoid episodes as in training runs)."""
    import torch

    model.load_state_dict(torch.load(args.eval_only, map_location="cpu", weights_only=True))
    dm.setup("validate" if args.eval_split == "val" else "test")
    c0 = time.process_time()
    scores = _independent_eval(model, dm, args.algo == "maml-sinusoid", args.eval_split)
    mean, ci = _ci95(scores)
    record = {"weights": str(args.eval_only), "split": args.eval_split, "episodes": len(scores),
              "eval_inner_steps": args.eval_inner_steps, "mean": mean, "ci95": ci,
              "eval_cpu_seconds": time.process_time() - c0, "command": "python " + " ".join(sys.argv)}
    path = out_dir / f"eval-{args.eval_split}-steps{args.eval_inner_steps}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"\n{args.eval_split} on {len(scores)} episodes, {args.eval_inner_steps} inner steps: "
          f"{100 * mean:.2f} ± {100 * ci:.2f} (95% CI); wrote {path}")
    return record


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", required=True, choices=sorted(DEFAULTS))
    p.add_argument("--minutes", type=float, default=30.0, help="meta-training budget in CPU minutes of this process")
    p.add_argument("--max-wall-minutes", type=float, default=None,
                   help="wall-clock cap on meta-training (default: 3 x --minutes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of every episode draw")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--test-episodes", type=int, default=600)
    p.add_argument("--eval-grid", type=int, default=None, help="sinusoid: score on this many grid points")
    p.add_argument("--task-mode", default="auto", choices=["auto", "loop", "vmap"])
    p.add_argument("--name", default=None, help="run name (log folder under .bench/accuracy/)")
    for key in ("tasks_per_batch", "queries", "eval_queries", "inner_steps", "eval_inner_steps", "ways", "shots", "train_ways"):
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    for key in ("inner_lr", "meta_lr"):
        p.add_argument("--" + key.replace("_", "-"), type=float, default=None)
    p.add_argument("--first-order", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--eval-only", type=Path, default=None,
                   help="skip training: load these weights (a run's weights.pt) and score them (e.g. to choose "
                        "--eval-inner-steps on --eval-split val, then report test)")
    p.add_argument("--eval-split", default="test", choices=["test", "val"],
                   help="score the test characters or, for choosing settings (pilots), the validation ones")
    p.add_argument("--zero-init", action="store_true",
                   help="maml: the zeroing trick (the head's weight starts every inner loop at zero; Kao et al. 2022)")
    p.add_argument("--cosine-to", type=float, default=None,
                   help="anneal the outer lr by a cosine over the CPU budget down to this fraction of it (default: constant)")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.algo].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.algo != "maml-sinusoid" and not (args.data_dir / "images_background_small1.zip").exists():
        p.error(f"--data-dir {args.data_dir} has no images_background_small1.zip; point it at the Omniglot zips")

    os.environ.setdefault("LIGHTNING_META_CACHE", str(BENCH_DIR / "cache"))
    import torch
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import CSVLogger

    torch.set_num_threads(args.threads)
    seed_everything(args.seed, workers=True, verbose=False)
    name = args.name or f"{args.algo}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    out_dir = BENCH_DIR / "accuracy" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(f"command: python {' '.join(sys.argv)}\nconfig: {json.dumps(config)}", flush=True)

    dm, model = _build(args)
    if args.eval_only is not None:
        return _eval_only(args, dm, model, out_dir)
    wall = args.max_wall_minutes or 3 * args.minutes
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=-1, max_time={"minutes": wall},
                      callbacks=[_cpu_budget_callback(args.minutes, args.cosine_to)],
                      limit_val_batches=0, num_sanity_val_steps=0, inference_mode=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
                      logger=CSVLogger(str(out_dir), name="", version=""), deterministic=False)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(model, datamodule=dm)
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    steps = trainer.global_step
    torch.save(model.state_dict(), out_dir / "weights.pt")

    regression = args.algo == "maml-sinusoid"
    metric = "mse" if regression else "acc"
    t1 = time.perf_counter()
    if args.eval_split == "val":  # a pilot: settings are chosen on validation characters, never on test ones
        dm.setup("validate")
        tested = {}
    else:
        tested = trainer.test(model, datamodule=dm, verbose=False)[0]
    scores = _independent_eval(model, dm, regression, args.eval_split)
    eval_s = time.perf_counter() - t1
    mean, ci = _ci95(scores)
    record = {
        "algo": args.algo, "config": config, "train_seconds": train_s, "train_cpu_seconds": train_cpu_s,
        "optimizer_steps": steps, "scored_split": args.eval_split,
        "tasks_seen": steps * args.tasks_per_batch, "eval_seconds": eval_s, "test_episodes": len(scores),
        f"{args.eval_split}_{metric}_mean": mean, f"{args.eval_split}_{metric}_ci95": ci,
        f"lib_test_{metric}": tested.get(f"test/{metric}"), f"lib_test_{metric}_ci95": tested.get(f"test/{metric}_ci95"),
        "scored_on": (f"{args.eval_grid}-point grid" if args.eval_grid else f"{args.eval_queries} random query points")
        if regression else f"{args.eval_queries} queries per class",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
        "env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},  # allocator settings change speed
    }
    (out_dir / "result.json").write_text(json.dumps(record, indent=1))
    scale = 1.0 if regression else 100.0
    unit = "" if regression else "%"
    print(f"\n{args.algo}: {steps} optimizer steps ({steps * args.tasks_per_batch} tasks) in {train_cpu_s / 60:.1f} CPU min "
          f"({train_s / 60:.1f} wall min); "
          f"{args.eval_split} on {len(scores)} episodes ({record['scored_on']}): "
          f"{metric} = {scale * mean:.{3 if regression else 2}f}{unit} ± {scale * ci:.{3 if regression else 2}f}{unit} (95% CI)")
    print(f"library metrics: test/{metric} = {tested.get(f'test/{metric}')}, test/{metric}_ci95 = {tested.get(f'test/{metric}_ci95')}")
    print(f"wrote {out_dir / 'result.json'}")
    return record


if __name__ == "__main__":
    main()
