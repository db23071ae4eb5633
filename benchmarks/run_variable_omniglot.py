"""A short fixed-step run on variable-way, variable-shot Omniglot episodes, tested on held-out characters.

Meta-trains ``--algo`` (ProtoNet, Proto-MAML or ProtoNet + per-task fine-tuning, all on Conv4-64) for
``--steps`` steps on Meta-Dataset-style episodes (``VariableEpisodes()``: 5-50 ways, up to 10 queries per
class, support sets up to 500) of the training characters of the Omniglot subsets (``split="seeded"``:
70/10/20 % of the characters, rotations as classes in training), then tests on ``--test-episodes`` variable
episodes of the held-out test characters and prints the mean query accuracy with its 95 % confidence interval
over episodes.

* ``protonet``: :class:`~lightning_meta.algorithms.ProtoNet` on ``conv4_protonet()`` (batch norm with running
  statistics).
* ``proto_maml``: :class:`~lightning_meta.algorithms.ProtoMAML` (first order, ``--inner-steps`` steps of rate
  ``--inner-lr`` in training and test, tasks run in a loop) on the same Conv4-64 with transductive batch norm
  (MAML cannot use running statistics); padded batches (``--tasks`` > 1) run task by task without padding.
* ``finetune``: :class:`~lightning_meta.algorithms.FineTuneProtoNet`: the same ProtoNet meta-training, then at test
  ``--finetune-steps`` SGD steps (rate ``--finetune-lr``) per task on the support set with augmented copies as
  pseudo-queries; with ``--finetune-lrs`` the rate is chosen among them on ``--val-episodes`` variable episodes
  of the validation characters (never the test ones) before testing.

Usage::

    python benchmarks/run_variable_omniglot.py --root ../shared/data/omniglot --steps 300 --test-episodes 300
    python benchmarks/run_variable_omniglot.py --algo proto_maml --steps 300 --test-episodes 300
    python benchmarks/run_variable_omniglot.py --algo finetune --finetune-lrs 0 1e-3 1e-2 --val-episodes 50
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "omniglot"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tasks", type=int, default=1, help="episodes per step")
    ap.add_argument("--test-episodes", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--algo", choices=("protonet", "proto_maml", "finetune"), default="protonet")
    ap.add_argument("--inner-steps", type=int, default=5, help="proto_maml: inner steps (training and test)")
    ap.add_argument("--inner-lr", type=float, default=0.01, help="proto_maml: inner learning rate")
    ap.add_argument("--finetune-steps", type=int, default=20, help="finetune: SGD steps per test task")
    ap.add_argument("--finetune-lr", type=float, default=1e-3, help="finetune: SGD learning rate")
    ap.add_argument(
        "--finetune-lrs",
        type=float,
        nargs="+",
        default=None,
        help="finetune: choose the rate among these on --val-episodes validation episodes (0 = no fine-tuning)",
    )
    ap.add_argument("--val-episodes", type=int, default=None, help="validation episodes (with --finetune-lrs)")
    args = ap.parse_args()
    if args.finetune_lrs is not None and (args.algo != "finetune" or not args.val_episodes):
        ap.error("--finetune-lrs chooses the rate of --algo finetune on validation episodes: give --val-episodes N")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import lightning as L

    from lightning_meta.algorithms import FineTuneProtoNet, ProtoMAML, ProtoNet
    from lightning_meta.datamodules import OmniglotDataModule, VariableEpisodes
    from lightning_meta.nn import Conv4, conv4_protonet

    L.seed_everything(args.seed, verbose=False)
    dm = OmniglotDataModule(
        args.root,
        split="seeded",
        variable_episodes=VariableEpisodes(),
        tasks_per_batch=args.tasks,
        train_episodes=args.steps * args.tasks,
        val_episodes=args.val_episodes or args.tasks,
        test_episodes=args.test_episodes,
        seed=args.seed,
    )
    dm.setup()
    print({s: d.num_classes for s, d in dm.datasets.items()}, "classes per split")
    if args.algo == "protonet":
        net = ProtoNet(conv4_protonet())
    elif args.algo == "finetune":
        net = FineTuneProtoNet(conv4_protonet(), finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr)
    else:  # conv4_protonet() with transductive batch norm
        body = Conv4(None, hidden=64, downsample="maxpool", pooling="flatten", image_size=28, track_running_stats=False)
        # One task per batch: "loop" skips task_mode="auto"'s loop-vs-vmap timing, redone for every new episode shape.
        net = ProtoMAML(body, inner_lr=args.inner_lr, inner_steps=args.inner_steps, task_mode="loop")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        inference_mode=False,  # Proto-MAML and fine-tuning adapt with gradients at test
    )
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(net, datamodule=dm)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    dm.tasks_per_batch = 1
    if args.finetune_lrs is not None:
        assert isinstance(net, FineTuneProtoNet)
        t0 = time.perf_counter()
        dm.setup("validate")
        scores = net.choose_finetune_lr(dm.val_dataloader(), candidates=args.finetune_lrs)
        print(
            f"fine-tuning rate on {args.val_episodes} validation episodes: "
            + ", ".join(f"{lr:g}: {100 * acc:.2f} %" for lr, acc in scores.items())
            + f" -> {net.finetune_lr:g} ({time.perf_counter() - t0:.0f} s wall)",
            flush=True,
        )
    t0, c0 = time.perf_counter(), time.process_time()
    res = trainer.test(net, datamodule=dm, verbose=False)[0]
    test_s, test_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"{args.algo}: train {args.steps} steps in {train_s:.0f} s wall / {train_cpu:.0f} s CPU, "
        f"test {args.test_episodes} episodes in {test_s:.0f} s wall / {test_cpu:.0f} s CPU"
    )
    print(f"test accuracy {100 * res['test/acc']:.2f} +- {100 * res['test/acc_ci95']:.2f} % (95 % CI over episodes)")


if __name__ == "__main__":
    main()
