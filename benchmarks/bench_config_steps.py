"""A fixed number of training steps of a shipped Omniglot config, scored on fixed validation or test episodes.

Runs ``examples/configs/<config>.yaml`` through the library's LightningCLI on the seeded character split of the
shared ``images_background_small{1,2}`` zips (242 characters, 70/10/20 % train/val/test, rotations as classes),
for ``--steps`` optimizer steps, then scores ``--episodes`` fixed episodes of ``--split`` (validation by default:
use it to choose settings; the test characters are for final numbers) with an accuracy loop written here
(mean ± 1.96·std/sqrt(n) of the per-episode accuracies). Extra ``--key=value`` arguments go to the CLI as they
are, e.g. ``--data.init_args.tasks_per_batch=8``. Prints and writes a JSON record under ``--out``.

Example::

    nice -n 10 python benchmarks/bench_config_steps.py proto_maml_omniglot_5w1s --steps 1500
    nice -n 10 python benchmarks/bench_config_steps.py matching_networks_omniglot_5w1s --steps 300 \\
        --data.init_args.tasks_per_batch=8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data" / "omniglot"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="name of a config in examples/configs, without .yaml")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args, extra = p.parse_known_args(argv)

    import torch

    from lightning_meta.cli import MetaLightningCLI

    torch.set_num_threads(args.threads)
    out = args.out or REPO / ".bench" / "config_steps" / f"{args.config}-{args.steps}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    episodes = "val_episodes" if args.split == "val" else "test_episodes"
    cli_args = [
        "--config",
        str(REPO / "examples" / "configs" / f"{args.config}.yaml"),
        f"--data.init_args.root={args.data_dir}",
        "--data.init_args.split=seeded",
        f"--data.init_args.{episodes}={args.episodes}",
        "--data.init_args.eval_queries=15",
        f"--trainer.max_steps={args.steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[]",
        f"--trainer.default_root_dir={out}",
        *extra,
    ]
    cli = MetaLightningCLI(args=cli_args, run=False)
    cpu0, wall0 = time.process_time(), time.time()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    train_cpu, train_wall = time.process_time() - cpu0, time.time() - wall0

    dm, model = cli.datamodule, cli.model
    dm.setup("validate" if args.split == "val" else "test")
    model.eval()
    scores: list[float] = []
    for batch in dm.val_dataloader() if args.split == "val" else dm.test_dataloader():
        with torch.no_grad():  # gradient-based learners enable gradients for their own adaptation
            outputs = model(batch)  # (tasks, queries, ways)
        scores += (outputs.argmax(-1) == batch.query_y).float().mean(-1).tolist()
    n = len(scores)
    mean = sum(scores) / n
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else 0.0
    record = {
        "config": args.config,
        "split": args.split,
        "optimizer_steps": cli.trainer.global_step,
        "tasks_per_batch": dm.tasks_per_batch,
        "train_cpu_seconds": train_cpu,
        "train_wall_seconds": train_wall,
        "episodes": n,
        "acc_mean": mean,
        "acc_ci95": 1.96 * std / math.sqrt(n),
        "total_wall_seconds": time.time() - wall0,
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(record))
    (out / "result.json").write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
