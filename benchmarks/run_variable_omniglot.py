"""A short fixed-step ProtoNet run on variable-way, variable-shot Omniglot episodes, tested on held-out characters.

Meta-trains ProtoNet (Conv4-64) for ``--steps`` steps on Meta-Dataset-style episodes
(``VariableEpisodes()``: 5-50 ways, up to 10 queries per class, support sets up to 500) of the training
characters of the Omniglot subsets (``split="seeded"``: 70/10/20 % of the characters, rotations as classes
in training), then tests on ``--test-episodes`` variable episodes of the held-out test characters and
prints the mean query accuracy with its 95 % confidence interval over episodes. Usage::

    python benchmarks/run_variable_omniglot.py --root ../shared/data/omniglot --steps 300 --test-episodes 300
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import lightning as L

    from lightning_meta.algorithms import ProtoNet
    from lightning_meta.datamodules import OmniglotDataModule, VariableEpisodes
    from lightning_meta.nn import conv4_protonet

    L.seed_everything(args.seed, verbose=False)
    dm = OmniglotDataModule(
        args.root,
        split="seeded",
        variable_episodes=VariableEpisodes(),
        tasks_per_batch=args.tasks,
        train_episodes=args.steps * args.tasks,
        val_episodes=args.tasks,
        test_episodes=args.test_episodes,
        seed=args.seed,
    )
    dm.setup()
    print({s: d.num_classes for s, d in dm.datasets.items()}, "classes per split")
    net = ProtoNet(conv4_protonet())
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
    )
    t0 = time.perf_counter()
    trainer.fit(net, datamodule=dm)
    train_s = time.perf_counter() - t0
    dm.tasks_per_batch = 1
    t0 = time.perf_counter()
    res = trainer.test(net, datamodule=dm, verbose=False)[0]
    test_s = time.perf_counter() - t0
    print(f"train {args.steps} steps in {train_s:.0f} s, test {args.test_episodes} episodes in {test_s:.0f} s")
    print(f"test accuracy {100 * res['test/acc']:.2f} +- {100 * res['test/acc_ci95']:.2f} % (95 % CI over episodes)")


if __name__ == "__main__":
    main()
