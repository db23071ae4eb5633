"""Cross-domain few-shot: meta-train on Omniglot, test on scikit-learn's 8x8 handwritten digits.

1. ProtoNet (Conv4-64) meta-trains for ``--steps`` steps on 5-way 5-shot episodes of the Omniglot
   subsets' training characters (``split="seeded"``, rotations as classes, 28x28).
2. The digits (``sklearn.datasets.load_digits``: 1,797 images of 10 classes, 16 grey levels, shipped
   with scikit-learn, offline) are inverted to Omniglot's black strokes on white, resized to 28x28 and
   become the test domain: 5-way 5-shot 15-query episodes of all 10 classes.
3. Two learners with the same meta-trained backbone are tested on the same ``--test-episodes`` digit
   episodes: ProtoNet, and the fine-tuning pipeline (:class:`~lightning_meta.algorithms.FineTuneProtoNet`,
   ``--finetune-steps`` steps per task) whose rate is chosen on ``--val-episodes`` other digit episodes
   (split "val": the same 10 classes, different draws; the P>M>F protocol selects it per domain).

Prints accuracy with 95 % CI over episodes for both. Usage::

    python benchmarks/run_cross_domain_digits.py --steps 300 --test-episodes 200
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings

import torch


def digits_store(size: int = 28):
    """The 8x8 digits as a ClassStore of uint8 (1, size, size) images, strokes dark on white like Omniglot."""
    from sklearn.datasets import load_digits
    from torchvision.transforms.v2.functional import resize

    from lightning_meta.datamodules import ClassStore

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0  # (n, 8, 8), ink = 1
    x = resize(1.0 - x[:, None], [size, size], antialias=True)  # ink dark, background white
    return ClassStore.from_labeled((x.clamp(0, 1) * 255).round().to(torch.uint8), [str(int(t)) for t in d.target])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "omniglot"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tasks", type=int, default=8, help="episodes per meta-training step")
    ap.add_argument("--test-episodes", type=int, default=200)
    ap.add_argument("--val-episodes", type=int, default=30)
    ap.add_argument("--finetune-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import lightning as L

    from lightning_meta.algorithms import FineTuneProtoNet, ProtoNet
    from lightning_meta.datamodules import (
        EpisodeDataset,
        EpisodeLoader,
        OmniglotDataModule,
    )
    from lightning_meta.nn import conv4_protonet

    L.seed_everything(args.seed, verbose=False)
    dm = OmniglotDataModule(
        args.root,
        split="seeded",
        ways=5,
        shots=5,
        queries=15,
        tasks_per_batch=args.tasks,
        train_episodes=args.steps * args.tasks,
        seed=args.seed,
    )
    proto = ProtoNet(conv4_protonet())
    kw = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    t0 = time.perf_counter()
    L.Trainer(max_steps=args.steps, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0, **kw).fit(proto, dm)
    print(f"meta-trained {args.steps} steps x {args.tasks} Omniglot episodes in {time.perf_counter() - t0:.0f} s")

    store = digits_store()

    def episodes(split: str, n: int) -> EpisodeLoader:
        ds = EpisodeDataset(
            store, ways=5, shots=5, queries=15, length=n, seed=args.seed, split=split, resample_per_epoch=False
        )
        return EpisodeLoader(ds, batch_size=1)

    results = {}
    t0 = time.perf_counter()
    res = L.Trainer(**kw).test(proto, episodes("test", args.test_episodes), verbose=False)[0]
    results["ProtoNet"] = (res["test/acc"], res["test/acc_ci95"], time.perf_counter() - t0)
    ft = FineTuneProtoNet(copy.deepcopy(proto.backbone), finetune_steps=args.finetune_steps)
    t0 = time.perf_counter()
    scores = ft.choose_finetune_lr(episodes("val", args.val_episodes), candidates=(0.0, 1e-3, 1e-2, 1e-1))
    print(
        "fine-tuning lr on validation digit episodes:",
        {k: round(100 * v, 2) for k, v in scores.items()},
        f"-> {ft.finetune_lr} ({time.perf_counter() - t0:.0f} s)",
    )
    t0 = time.perf_counter()
    res = L.Trainer(inference_mode=False, **kw).test(ft, episodes("test", args.test_episodes), verbose=False)[0]
    results[f"ProtoNet + fine-tuning ({args.finetune_steps} steps, lr {ft.finetune_lr})"] = (
        res["test/acc"],
        res["test/acc_ci95"],
        time.perf_counter() - t0,
    )
    for name, (acc, ci, s) in results.items():
        print(
            f"digits 5-way 5-shot, {name}: {100 * acc:.2f} +- {100 * ci:.2f} % ({args.test_episodes} episodes, {s:.0f} s)"
        )


if __name__ == "__main__":
    main()
