"""Accuracy and throughput of CAML (arXiv:1810.03642), LEO (arXiv:1807.05960) and SNAIL (arXiv:1707.03141).

Subcommands (each prints its figures and writes a JSON record under ``.bench/``):

* ``sinusoid``: CAML and MAML meta-trained in the same process on sinusoid regression (10-shot, 25 tasks
  per batch, docs/algorithms/maml.md) for ``--minutes`` of process CPU time each (CPU time, not wall time, so
  background load changes the budget little), then scored on 600 fixed test tasks on the **100-point grid** over [-5, 5] (CAVIA's
  protocol, ``SinusoidDataModule(eval_grid=100)``) after 1 inner step (the training setting) and, for MAML,
  also after 10 steps; mean ± 1.96·std/sqrt(600).
* ``omniglot --algo {caml,leo,snail}``: 5-way 1-shot Omniglot from the shared ``images_background_small``
  zips (seeded 70/10/20 character split, rotations as classes, 28x28), meta-trained for ``--minutes`` of
  CPU time (one thread), tested on 600 fixed episodes with 15 queries per class. LEO runs on the 64-d
  features of a Conv4-64 (running-statistics BN) first trained as a plain classifier over the meta-train
  classes for ``--pretrain-minutes`` (LEO's recipe with a WRN-28-10; here a tiny stand-in), then frozen
  and cached (:class:`~lightning_meta.datamodules.features.FeatureDataModule`).
* ``throughput``: training tasks/s of MAML (paper Omniglot Conv4), CAML (ContextConv4-64), SNAIL
  (Conv4-64 + blocks) and LEO (on cached 64-d features) on the same 5-way 1-shot batches (8 tasks,
  5 queries per class), interleaved rounds, medians and ratios to MAML.

Examples::

    nohup python benchmarks/bench_leo_caml_snail.py sinusoid --minutes 4 > .bench/sinusoid.log 2>&1 &
    nohup python benchmarks/bench_leo_caml_snail.py omniglot --algo caml --minutes 10 > .bench/caml.log 2>&1 &
    python benchmarks/bench_leo_caml_snail.py throughput --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".bench"
DATA = REPO.parent / "shared" / "data" / "omniglot"
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_meta.algorithms.caml import CAML  # noqa: E402
from lightning_meta.algorithms.leo import LEO  # noqa: E402
from lightning_meta.algorithms.maml import MAML  # noqa: E402
from lightning_meta.algorithms.snail import SNAIL  # noqa: E402
from lightning_meta.datamodules import OmniglotDataModule, SinusoidDataModule  # noqa: E402
from lightning_meta.datamodules.features import FeatureDataModule  # noqa: E402
from lightning_meta.functional import mean_ci95  # noqa: E402
from lightning_meta.nn import MLP, conv4_maml_omniglot, conv4_protonet  # noqa: E402
from lightning_meta.nn.film import ContextConv4, ContextMLP  # noqa: E402
from lightning_meta.nn.snail_blocks import snail_omniglot_embedding  # noqa: E402


class CPUBudget(Callback):
    """Stop training after ``seconds`` of process CPU time spent in training."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.used, self.steps = seconds, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.used += time.process_time() - self._t
        self.steps += 1
        if self.used >= self.seconds:
            trainer.should_stop = True


def trainer(**kw) -> L.Trainer:
    opts = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    opts.update(kw)
    return L.Trainer(**opts)


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


def save(name: str, record: dict) -> None:
    BENCH.mkdir(exist_ok=True)
    (BENCH / f"{name}.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2), flush=True)


# ---------------------------------------------------------------------------------------------- sinusoid
def sinusoid(args) -> None:
    dm = SinusoidDataModule(
        shots=10, queries=10, tasks_per_batch=25, train_episodes=25 * 200, test_episodes=600, eval_grid=100, seed=0
    )
    dm.setup()
    torch.manual_seed(0)
    models = {
        "caml": CAML(ContextMLP(context_dim=5), inner_lr=1.0, inner_steps=1, meta_lr=1e-3, task_mode="vmap"),
        "maml": MAML(MLP(), inner_lr=0.01, inner_steps=1, meta_lr=1e-3, task_mode="vmap"),
    }
    budgets = {k: CPUBudget(60.0 * args.minutes) for k in models}
    for name, model in models.items():  # one after the other, each for the same CPU time
        trainer(max_epochs=10**6, callbacks=[budgets[name]]).fit(model, dm.train_dataloader())
    record = {"protocol": "10-shot, 100-point grid over [-5,5], 600 test tasks", "minutes_cpu_each": args.minutes}
    for name, model in models.items():
        for steps in [1] if name == "caml" else [1, 10]:
            model.eval_inner_steps = steps
            mse, ci = mean_ci95(per_episode_scores(model, dm.test_dataloader(), regression=True))
            record[f"{name}_{steps}step"] = {"mse": mse, "ci95": ci, "train_steps": budgets[name].steps}
    save("sinusoid_caml_vs_maml", record)


# ---------------------------------------------------------------------------------------------- omniglot
def omniglot_dm(tasks: int, queries: int) -> OmniglotDataModule:
    return OmniglotDataModule(
        str(DATA),
        split="seeded",
        ways=5,
        shots=1,
        queries=queries,
        eval_queries=15,
        tasks_per_batch=tasks,
        train_episodes=tasks * 500,
        test_episodes=600,
        seed=0,
    )


def pretrain_backbone(dm: OmniglotDataModule, minutes: float) -> torch.nn.Module:
    """A Conv4-64 classifier over every meta-train class (rotations included), trained for ``minutes`` CPU time."""
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
    g = torch.Generator().manual_seed(0)
    start, steps = time.process_time(), 0
    while time.process_time() - start < 60 * minutes:
        idx = torch.randint(len(y), (128,), generator=g)
        loss = torch.nn.functional.cross_entropy(head(net(x[idx].float() / 255)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    print(f"pretrained Conv4-64 for {steps} steps, last loss {loss.item():.3f}", flush=True)
    return net.eval()


def build(algo: str, args):
    if algo == "caml":
        dm = omniglot_dm(tasks=args.tasks, queries=5)
        model = CAML(
            ContextConv4(5, context_dim=100, hidden=64, image_size=28),
            inner_lr=1.0,
            inner_steps=2,
            meta_lr=1e-3,
            task_mode="loop",
        )
    elif algo == "snail":
        dm = omniglot_dm(tasks=args.tasks, queries=5)
        model = SNAIL(snail_omniglot_embedding(), ways=5, shots=1, meta_lr=1e-3)
    elif algo == "leo":
        image_dm = omniglot_dm(tasks=args.tasks, queries=5)
        dm = FeatureDataModule(image_dm, pretrain_backbone(image_dm, args.pretrain_minutes))
        model = LEO(feature_dim=64, ways=5, latent_dim=16, dropout=0.3, meta_lr=1e-3, task_mode="loop")
    else:
        raise ValueError(algo)
    return dm, model


def omniglot(args) -> None:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    dm, model = build(args.algo, args)
    dm.setup()
    setup_s = time.perf_counter() - t0
    budget = CPUBudget(60 * args.minutes)
    t0 = time.perf_counter()
    t = trainer(max_epochs=10**6, callbacks=[budget])
    t.fit(model, dm.train_dataloader())
    train_wall = time.perf_counter() - t0
    scores = per_episode_scores(model, dm.test_dataloader(), regression=False)
    acc, ci = mean_ci95(scores)
    save(
        f"omniglot_{args.algo}",
        {
            "algo": args.algo,
            "protocol": "5-way 1-shot, 15 queries/class, 600 fixed test episodes, seeded split",
            "minutes_cpu": args.minutes,
            "train_steps": budget.steps,
            "tasks_per_batch": args.tasks,
            "train_wall_s": train_wall,
            "setup_wall_s": setup_s,
            "test_acc": acc,
            "test_ci95": ci,
            "episodes": len(scores),
        },
    )


# ---------------------------------------------------------------------------------------------- throughput
def throughput(args) -> None:
    dm = omniglot_dm(tasks=8, queries=5)
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
    torch.manual_seed(0)
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
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sinusoid")
    s.add_argument("--minutes", type=float, default=4.0, help="CPU minutes of training per model")
    o = sub.add_parser("omniglot")
    o.add_argument("--algo", choices=["caml", "leo", "snail"], required=True)
    o.add_argument("--minutes", type=float, default=10.0, help="CPU minutes of meta-training")
    o.add_argument("--pretrain-minutes", type=float, default=3.0, help="LEO: CPU minutes of backbone pretraining")
    o.add_argument("--tasks", type=int, default=16, help="tasks per meta-batch")
    t = sub.add_parser("throughput")
    t.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"sinusoid": sinusoid, "omniglot": omniglot, "throughput": throughput}[args.cmd](args)


if __name__ == "__main__":
    main()
