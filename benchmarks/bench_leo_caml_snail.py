"""Accuracy and throughput of CAML (arXiv:1810.03642), LEO (arXiv:1807.05960) and SNAIL (arXiv:1707.03141).

Every accuracy run trains for a fixed number of optimizer steps (``--steps``; ``Trainer(max_steps=...)`` with
``lightning_meta.callbacks.StepBudget``), so the same command is the same experiment on a loaded or a quiet
machine. The defaults (``STEPS`` below) take about the intended CPU time. CPU time (``time.process_time()``) and
wall time of training are measured and reported, never used to stop. There is no wall-clock cap unless
``--max-wall-minutes`` asks for one; a run stopped by it (or interrupted) is recorded with ``"complete": false``
and is not a figure of its budget. Each JSON record holds the budget and the steps done, CPU and wall seconds,
the commit (``+dirty`` for uncommitted changes), the CPU model and thread count, and a command that reruns it.

Subcommands (each prints its figures and writes a JSON record under ``.bench/``, or ``--out-dir``):

* ``sinusoid``: CAML and MAML meta-trained in the same process on sinusoid regression (10-shot, 25 tasks
  per batch, docs/algorithms/maml.md) for the same ``--steps`` each, then scored on 600 fixed test tasks on the
  **100-point grid** over [-5, 5] (CAVIA's protocol, ``SinusoidDataModule(eval_grid=100)``) after 1 inner step
  (the training setting) and, for MAML, also after 10 steps; mean ± 1.96·std/sqrt(600).
* ``omniglot --algo {caml,leo,snail}``: 5-way 1-shot Omniglot from the shared ``images_background_small``
  zips (seeded 70/10/20 character split, rotations as classes, 28x28), meta-trained for ``--steps`` optimizer
  steps (one thread), tested on 600 fixed episodes with 15 queries per class. LEO runs on the 64-d
  features of a Conv4-64 (running-statistics BN) first trained as a plain classifier over the meta-train
  classes for ``--pretrain-steps`` steps of 128 images (LEO's recipe with a WRN-28-10; here a tiny stand-in),
  then frozen and cached (:class:`~lightning_meta.datamodules.features.FeatureDataModule`).
* ``throughput``: training tasks/s of MAML (paper Omniglot Conv4), CAML (ContextConv4-64), SNAIL
  (Conv4-64 + blocks) and LEO (on cached 64-d features) on the same 5-way 1-shot batches (8 tasks,
  5 queries per class), interleaved rounds, medians and ratios to MAML.

Examples::

    nohup python benchmarks/bench_leo_caml_snail.py sinusoid > .bench/sinusoid.log 2>&1 &
    nohup python benchmarks/bench_leo_caml_snail.py omniglot --algo caml > .bench/caml.log 2>&1 &
    python benchmarks/bench_leo_caml_snail.py omniglot --algo leo --steps 3609 --pretrain-steps 608 --tasks 8
    python benchmarks/bench_leo_caml_snail.py throughput --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".bench"
DATA_DIR = "../shared/data/omniglot"  # relative to the repository root; recorded as given
if str(REPO) not in sys.path:  # run as a script: import this checkout's lightning_meta and benchmarks
    sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402

from benchmarks.bench_accuracy import _machine  # noqa: E402  (one definition of the machine record)
from lightning_meta.algorithms.caml import CAML  # noqa: E402
from lightning_meta.algorithms.leo import LEO  # noqa: E402
from lightning_meta.algorithms.maml import MAML  # noqa: E402
from lightning_meta.algorithms.snail import SNAIL  # noqa: E402
from lightning_meta.callbacks import StepBudget  # noqa: E402
from lightning_meta.datamodules import OmniglotDataModule, SinusoidDataModule  # noqa: E402
from lightning_meta.datamodules.features import FeatureDataModule  # noqa: E402
from lightning_meta.functional import mean_ci95  # noqa: E402
from lightning_meta.nn import MLP, conv4_maml_omniglot, conv4_protonet  # noqa: E402
from lightning_meta.nn.film import ContextConv4, ContextMLP  # noqa: E402
from lightning_meta.nn.snail_blocks import snail_omniglot_embedding  # noqa: E402

#: Default budgets in optimizer steps, each about the CPU time the old CPU-minute defaults intended (1 thread),
#: derived from the runs recorded in docs/bench/leo_caml_snail.md (2-core machine, load average ~9; a quiet
#: core does more steps per CPU-second, so there the defaults take less CPU time than intended):
#:
#: * ``sinusoid`` (old default 4 CPU-min per model): the 5-CPU-min run did 19,086 CAML steps (64/s) and 16,902
#:   MAML steps (56/s). Both models get the same number of steps, so that they are compared at equal training;
#:   14,000 is about 3.7 and 4.1 CPU-min at those rates.
#: * ``caml``, ``snail``, ``leo`` (old default 10 CPU-min at ``--tasks 16``): the recorded runs used ``--tasks 8``
#:   and did 391 CAML steps in 8 CPU-min (0.81/s), 465 SNAIL steps in 8 CPU-min (0.97/s) and 3,609 LEO steps in
#:   6 CPU-min (10.0/s). A step of 16 tasks costs about twice one of 8 (the tasks of a batch run one after
#:   another), so 10 CPU-min at 16 tasks is about 245, 290 and 3,000 steps.
STEPS = {"sinusoid": 14_000, "caml": 250, "snail": 300, "leo": 3_000}
#: LEO's backbone pretraining (old default 3 CPU-min): the recorded run did 608 steps of 128 images in 3 CPU-min.
PRETRAIN_STEPS = 600


def trainer(steps: int, budget: StepBudget, max_wall_minutes: float | None) -> L.Trainer:
    """A CPU trainer that stops after ``steps`` optimizer steps (or at the optional wall cap: incomplete)."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=-1,
        max_steps=steps,
        max_time={"minutes": max_wall_minutes} if max_wall_minutes else None,
        callbacks=[budget],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def train(model, loader, args, label: str) -> dict:
    """Meta-train ``model`` for ``args.steps`` optimizer steps; the steps done, CPU and wall seconds, completeness."""
    budget = StepBudget()
    trainer(args.steps, budget, args.max_wall_minutes).fit(model, loader)
    if not budget.complete:
        print(
            f"\nINCOMPLETE ({label}): {budget.steps} of {args.steps} optimizer steps (stopped by --max-wall-minutes "
            f"{args.max_wall_minutes} or interrupted); the record is marked incomplete and is not a figure",
            flush=True,
        )
    return {
        "complete": budget.complete,
        "optimizer_steps": budget.steps,
        "train_cpu_seconds": budget.cpu_seconds,
        "train_seconds": budget.wall_seconds,
    }


def per_episode_scores(model, loader, regression: bool) -> list[float]:
    """Independent evaluation loop: one score (MSE or accuracy) per test task."""
    model.eval()
    out = []
    for batch in loader:
        with torch.no_grad():
            losses, outputs = model.task_losses(batch)
        if regression:
            out += ((outputs.squeeze(-1) - batch.query_y) ** 2).mean(1).tolist()
        else:
            out += (outputs.argmax(-1) == batch.query_y).float().mean(1).tolist()
    return out


def data_path(args) -> Path:
    """The Omniglot folder: the default is relative to the repository, a given one to the current directory."""
    return REPO / DATA_DIR if args.data_dir == DATA_DIR else Path(args.data_dir)


def recorded_config(args) -> dict:
    """The run's settings for its record: no output folder, ``data_dir`` as given (an absolute one relative to
    the repository, so that no path of this machine is written)."""
    skip = {"cmd", "out_dir", "minutes", "pretrain_minutes", "machine"}
    cfg = {k: v for k, v in vars(args).items() if k not in skip}
    if "data_dir" in cfg and os.path.isabs(cfg["data_dir"]):
        cfg["data_dir"] = os.path.relpath(cfg["data_dir"], REPO)
    return cfg


def command(args, cfg: dict) -> str:
    """The command that reruns this record (every budget explicit; the default data folder left out)."""
    parts = ["python", "benchmarks/bench_leo_caml_snail.py", args.cmd]
    for k, v in sorted(cfg.items(), key=lambda kv: kv[0] != "algo"):  # --algo first, the rest as parsed
        if v is None or (k == "data_dir" and v == DATA_DIR):
            continue
        parts += [f"--{k.replace('_', '-')}", str(v)]
    return shlex.join(parts)


def save(name: str, record: dict, args) -> None:
    cfg = recorded_config(args)
    record = {
        "command": command(args, cfg),
        "config": cfg,
        **record,
        "torch_threads": torch.get_num_threads(),
        **args.machine,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
    }
    out = Path(args.out_dir) if args.out_dir else BENCH
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2), flush=True)


# ---------------------------------------------------------------------------------------------- sinusoid
def sinusoid(args) -> None:
    dm = SinusoidDataModule(
        shots=10,
        queries=10,
        tasks_per_batch=25,
        train_episodes=25 * 200,
        test_episodes=args.test_episodes,
        eval_grid=100,
        seed=args.seed,
    )
    dm.setup()
    torch.manual_seed(args.seed)
    models = {
        "caml": CAML(ContextMLP(context_dim=5), inner_lr=1.0, inner_steps=1, meta_lr=1e-3, task_mode="vmap"),
        "maml": MAML(MLP(), inner_lr=0.01, inner_steps=1, meta_lr=1e-3, task_mode="vmap"),
    }
    runs = {name: train(model, dm.train_dataloader(), args, name) for name, model in models.items()}
    record = {
        "protocol": f"10-shot, 25 tasks per batch, 100-point grid over [-5,5], {args.test_episodes} test tasks",
        "complete": all(r["complete"] for r in runs.values()),
        "steps_budget": args.steps,
        "runs": runs,
    }
    for name, model in models.items():
        for steps in [1] if name == "caml" else [1, 10]:
            model.eval_inner_steps = steps
            scores = per_episode_scores(model, dm.test_dataloader(), regression=True)
            mse, ci = mean_ci95(scores)
            record[f"{name}_{steps}step"] = {
                "mse": mse,
                "ci95": ci,
                "episodes": len(scores),
                "train_steps": runs[name]["optimizer_steps"],
            }
    save("sinusoid_caml_vs_maml", record, args)


# ---------------------------------------------------------------------------------------------- omniglot
def omniglot_dm(args, tasks: int, queries: int, test_episodes: int = 600) -> OmniglotDataModule:
    return OmniglotDataModule(
        str(data_path(args)),
        split="seeded",
        ways=5,
        shots=1,
        queries=queries,
        eval_queries=15,
        tasks_per_batch=tasks,
        train_episodes=tasks * 500,
        test_episodes=test_episodes,
        seed=args.seed,
    )


def pretrain_backbone(dm: OmniglotDataModule, steps: int, seed: int) -> tuple[torch.nn.Module, dict]:
    """A Conv4-64 classifier over every meta-train class (rotations included), trained for ``steps`` Adam steps
    of 128 images; returns the backbone and the steps, CPU and wall seconds and last loss of its training."""
    dm.setup()
    ds = dm.datasets["train"]
    store, aug = ds.store, ds.class_augment
    n = store.num_classes
    x = torch.cat([aug(store.images, v) for v in range(aug.multiplier)]) if aug else store.images
    base = torch.repeat_interleave(torch.arange(n), store.counts())
    y = torch.cat([base + v * n for v in range(aug.multiplier if aug else 1)])
    net = conv4_protonet(hidden=64)
    head = torch.nn.Linear(net.out_dim, int(y.max()) + 1)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):  # a fixed number of steps: only an exception (which ends the run) stops it early
        idx = torch.randint(len(y), (128,), generator=g)
        loss = torch.nn.functional.cross_entropy(head(net(x[idx].float() / 255)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    info = {
        "steps": steps,
        "batch": 128,
        "cpu_seconds": time.process_time() - cpu0,
        "wall_seconds": time.perf_counter() - wall0,
        "last_loss": loss.item(),
    }
    print(f"pretrained Conv4-64 for {steps} steps, last loss {info['last_loss']:.3f}", flush=True)
    return net.eval(), info


def build(algo: str, args):
    pretrain = None
    if algo == "caml":
        dm = omniglot_dm(args, tasks=args.tasks, queries=5, test_episodes=args.test_episodes)
        model = CAML(
            ContextConv4(5, context_dim=100, hidden=64, image_size=28),
            inner_lr=1.0,
            inner_steps=2,
            meta_lr=1e-3,
            task_mode="loop",
        )
    elif algo == "snail":
        dm = omniglot_dm(args, tasks=args.tasks, queries=5, test_episodes=args.test_episodes)
        model = SNAIL(snail_omniglot_embedding(), ways=5, shots=1, meta_lr=1e-3)
    elif algo == "leo":
        image_dm = omniglot_dm(args, tasks=args.tasks, queries=5, test_episodes=args.test_episodes)
        backbone, pretrain = pretrain_backbone(image_dm, args.pretrain_steps, args.seed)
        dm = FeatureDataModule(image_dm, backbone)
        model = LEO(feature_dim=64, ways=5, latent_dim=16, dropout=0.3, meta_lr=1e-3, task_mode="loop")
    else:
        raise ValueError(algo)
    return dm, model, pretrain


def omniglot(args) -> None:
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    dm, model, pretrain = build(args.algo, args)
    dm.setup()
    setup_s = time.perf_counter() - t0
    run = train(model, dm.train_dataloader(), args, args.algo)
    scores = per_episode_scores(model, dm.test_dataloader(), regression=False)
    acc, ci = mean_ci95(scores)
    save(
        f"omniglot_{args.algo}",
        {
            "algo": args.algo,
            "protocol": f"5-way 1-shot, 15 queries/class, {args.test_episodes} fixed test episodes, seeded split",
            "complete": run["complete"],
            "steps_budget": args.steps,
            **run,
            "tasks_per_batch": args.tasks,
            "tasks_seen": run["optimizer_steps"] * args.tasks,
            "pretrain": pretrain,
            "setup_wall_s": setup_s,
            "test_acc": acc,
            "test_ci95": ci,
            "episodes": len(scores),
        },
        args,
    )


# ---------------------------------------------------------------------------------------------- throughput
def throughput(args) -> None:
    dm = omniglot_dm(args, tasks=8, queries=5)
    dm.setup()
    batches = [b for _, b in zip(range(3), dm.train_dataloader())]
    feat = torch.nn.Sequential(conv4_protonet(hidden=64)).eval()
    with torch.no_grad():
        fbatches = [
            type(b)(
                feat(b.support_x.flatten(0, 1)).view(8, 5, -1),
                b.support_y,
                feat(b.query_x.flatten(0, 1)).view(8, 25, -1),
                b.query_y,
            )
            for b in batches
        ]
    torch.manual_seed(args.seed)
    models = {
        "maml": (MAML(conv4_maml_omniglot(5), inner_lr=0.4, task_mode="loop"), batches),
        "caml": (CAML(ContextConv4(5, context_dim=100, hidden=64), inner_steps=2, task_mode="loop"), batches),
        "snail": (SNAIL(snail_omniglot_embedding(), ways=5, shots=1), batches),
        "leo": (LEO(feature_dim=64, ways=5, latent_dim=16, task_mode="loop"), fbatches),
    }
    times = {k: [] for k in models}
    for r in range(args.rounds + 1):
        for name, (model, bs) in models.items():
            model.train()
            t0 = time.perf_counter()
            for b in bs:
                model.zero_grad()
                model.training_step(b, 0).backward()
            if r:  # round 0 is warm-up
                times[name].append(len(bs) * 8 / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    save(
        "throughput_leo_caml_snail",
        {
            "unit": "training tasks/s (5-way 1-shot, 5 queries/class, batch of 8, 1 thread), median over rounds",
            "median_tasks_per_s": med,
            "ratio_to_maml": {k: v / med["maml"] for k, v in med.items()},
            "rounds": args.rounds,
            "maml": "conv4_maml_omniglot, 1 inner step, 2nd order",
            "caml": "ContextConv4-64, context 100, 2 steps",
            "leo": "5 latent + 5 fine-tune steps on 64-d cached features (feature extraction not included)",
        },
        args,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the budgets resolved (``--steps`` and LEO's ``--pretrain-steps`` defaults filled in);
    exits with status 2 and a message naming the fix for bad values and for the old CPU-minute flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=1, help="torch threads")
    common.add_argument("--seed", type=int, default=0, help="seed of the weights and of every episode draw")
    common.add_argument(
        "--out-dir", default=None, help="where the JSON record goes (default: .bench/ of the repository)"
    )
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--data-dir",
        default=DATA_DIR,
        help="folder with the Omniglot zips; relative paths are taken from the current directory "
        "(default: ../shared/data/omniglot from the repository root)",
    )
    budget = argparse.ArgumentParser(add_help=False)
    budget.add_argument("--minutes", type=float, default=None, help=argparse.SUPPRESS)
    budget.add_argument(
        "--max-wall-minutes",
        type=float,
        default=None,
        help="optional wall-clock cap (per model); a run that reaches it is recorded as incomplete, not as a figure",
    )
    budget.add_argument("--test-episodes", type=int, default=600, help="fixed test episodes (tasks) scored")
    sub = p.add_subparsers(dest="cmd", required=True)
    subs = {}
    subs["sinusoid"] = s = sub.add_parser("sinusoid", parents=[common, budget])
    s.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps of meta-training per model (default {STEPS['sinusoid']}, about 4 CPU-min each)",
    )
    subs["omniglot"] = o = sub.add_parser("omniglot", parents=[common, data, budget])
    o.add_argument("--algo", choices=["caml", "leo", "snail"], required=True)
    o.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps of meta-training (default: STEPS[algo], about 10 CPU-min at --tasks 16)",
    )
    o.add_argument("--pretrain-minutes", type=float, default=None, help=argparse.SUPPRESS)
    o.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help=f"LEO: Adam steps (128 images each) of backbone pretraining (default {PRETRAIN_STEPS}, about 3 CPU-min)",
    )
    o.add_argument("--tasks", type=int, default=16, help="tasks per meta-batch")
    subs["throughput"] = t = sub.add_parser("throughput", parents=[common, data])
    t.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    sp = subs[args.cmd]
    if args.cmd != "throughput":
        key = args.algo if args.cmd == "omniglot" else "sinusoid"
        if args.minutes is not None:
            sp.error(
                f"--minutes {args.minutes}: the budget is a number of optimizer steps now (--steps N; the default "
                f"--steps {STEPS[key]} takes about the intended CPU time), so that the same command trains the "
                "same amount on any machine"
            )
        if getattr(args, "pretrain_minutes", None) is not None:
            sp.error(
                f"--pretrain-minutes {args.pretrain_minutes}: LEO's pretraining budget is a number of steps now "
                f"(--pretrain-steps N; default {PRETRAIN_STEPS}, about 3 CPU-min)"
            )
        if args.steps is None:
            args.steps = STEPS[key]
        if args.steps <= 0:
            sp.error(f"--steps {args.steps}: give a positive number of optimizer steps")
        if args.test_episodes <= 0:
            sp.error(f"--test-episodes {args.test_episodes}: give a positive number of test episodes")
    if args.cmd == "omniglot":
        if args.algo != "leo":
            if args.pretrain_steps is not None:
                sp.error(f"--pretrain-steps is an option of --algo leo (got --algo {args.algo})")
        else:
            args.pretrain_steps = PRETRAIN_STEPS if args.pretrain_steps is None else args.pretrain_steps
            if args.pretrain_steps <= 0:
                sp.error(f"--pretrain-steps {args.pretrain_steps}: give a positive number of pretraining steps")
    omniglot_files = (
        "images_background_small1.zip",
        "images_background.zip",
        "images_background_small1",
        "images_background",
    )
    if args.cmd != "sinusoid" and not any((data_path(args) / f).exists() for f in omniglot_files):
        sp.error(f"--data-dir {args.data_dir} has none of {omniglot_files}; point it at the Omniglot data")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    args.machine = _machine()  # the code that runs is the code at start: later edits to the tree must not show here
    {"sinusoid": sinusoid, "omniglot": omniglot, "throughput": throughput}[args.cmd](args)


if __name__ == "__main__":
    main()
