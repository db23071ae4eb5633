"""Fixed-step accuracy runs: Omniglot 5-way 1-shot (MAML, MAML++, Reptile, iMAML, ProtoNet, Matching Networks,
Proto-MAML) and MAML on sinusoid regression.

Papers: MAML (Finn, Abbeel, Levine, ICML 2017, arXiv:1703.03400); MAML++ (Antoniou, Edwards, Storkey, ICLR 2019,
arXiv:1810.09502); Reptile (Nichol, Achiam, Schulman 2018, arXiv:1803.02999); iMAML (Rajeswaran et al., NeurIPS
2019, arXiv:1909.04630); Prototypical Networks (Snell, Swersky, Zemel, NeurIPS 2017, arXiv:1703.05175); Matching
Networks (Vinyals et al., NeurIPS 2016, arXiv:1606.04080); Proto-MAML (Triantafillou et al., ICLR 2020,
arXiv:1903.03096). Protocols: docs/algorithms/, docs/guide/datasets.md.

Each run meta-trains with a plain ``lightning.Trainer`` for a fixed number of optimizer steps (``--steps``;
``Trainer(max_steps=...)`` with ``lightning_meta.callbacks.StepBudget``, whose optional cosine runs over those
steps), so the same command is the same experiment on a loaded or a quiet machine. The defaults are chosen to take
about the intended CPU time on a quiet core (``STEPS`` below). CPU time (``time.process_time()``) and wall time
of training are measured and reported, never used to stop. There is no wall-clock cap unless
``--max-wall-minutes`` asks for one; a run stopped by it (or interrupted) is recorded with ``"complete": false``
and ``benchmarks/build_results.py`` refuses to turn it into a figure. Then it evaluates on fixed test episodes
(600 by default; episodes are a pure function of the seed, so every run sees the same ones) twice: with
``Trainer.test`` (the library's ``test/acc`` and ``test/acc_ci95`` metrics) and with an independent loop written
here over the same test loader (mean ± 1.96·std/sqrt(n) of the per-episode scores). It prints the config and the
final ``mean ± 95% CI``, and writes a JSON record (with the commit, the CPU model and thread count) next to the
Lightning CSV log.

Omniglot: the datamodule's seeded character split of the shared ``images_background_small{1,2}``
zips (242 characters; 70/10/20 % train/val/test characters, ``split_seed=0``), rotations as new
classes, 28x28, strokes = 1; test characters are never seen in training. MAML uses the paper's
Omniglot Conv4 (stride 2, no pooling, transductive BN); ProtoNet the Conv4-64 embedding (max-pool,
BN with running statistics, non-transductive).

Sinusoid: ``y = A sin(x - phi)``, K support points; the test MSE is scored on K random query points
per task (MAML's protocol) by default, or on a 100-point grid over [-5, 5] with ``--eval-grid 100``
(CAVIA's protocol): docs/guide/evaluation.md.

Examples::

    python benchmarks/bench_accuracy.py --algo maml --zero-init --cosine-to 0.05 --seed 0
    python benchmarks/bench_accuracy.py --algo protonet --seed 1
    python benchmarks/bench_accuracy.py --algo maml-sinusoid --eval-inner-steps 10
    # a pilot: choose settings on the validation characters, never on the test ones
    python benchmarks/bench_accuracy.py --algo maml --steps 2000 --task-mode loop --eval-split val --zero-init

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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / ".bench"
DATA_DIR = "../shared/data/omniglot"  # relative to the repository root; recorded as given

#: Default budgets in optimizer steps, each about the CPU time the protocol intends on a quiet core (1 thread),
#: derived from recorded runs: MAML 5w1s (zeroing trick, meta-batch 8, loop mode) did 11,753 steps in 30 CPU-min;
#: ProtoNet 5w1s (20-way training episodes) ran 8.3 steps per CPU-second and MAML sinusoid (meta-batch 25) 83 in
#: short timing runs on the 2-core project machine under light load, so
#: their defaults are short runs of about 6 and 2 CPU-min. From 20-step timing runs under load (2026-12-06), one
#: step costs about 0.3 CPU-s for Reptile (5 tasks x 5 inner steps) and Proto-MAML (one 20-way task, 5 first-order
#: inner steps), 1.5 CPU-s for iMAML (8 tasks x 16 inner + 5 CG steps), and about as much as ProtoNet's for
#: Matching Networks; MAML++ (5 second-order inner steps, first order for its first third) about 0.5 CPU-s. The
#: budgets of algorithms compared with each other stay equal in steps (MAML and MAML++; ProtoNet, Matching
#: Networks and Proto-MAML), whatever their CPU time.
STEPS = {
    "maml": 12_000,
    "maml_pp": 12_000,
    "reptile": 6_000,
    "imaml": 1_200,
    "protonet": 3_000,
    "matching": 3_000,
    "proto_maml": 3_000,
    "maml-sinusoid": 10_000,
}

#: Options that only one algorithm takes: given with another --algo they are an error.
ALGO_OPTIONS = {
    "maml_pp": ("pp_epochs", "first_order_epochs", "msl_epochs", "bn_stats"),
    "matching": ("scale",),
    "imaml": (
        "lam",
        "inner_solver",
        "newton_steps",
        "eval_newton_steps",
        "newton_cg_steps",
        "newton_damping",
        "line_search_steps",
    ),
}

#: Per-algorithm defaults (each can be overridden from the command line).
DEFAULTS = {
    # inner_lr 2.0 = MAML's alpha 0.4 on its 5x-mean loss; in 4-CPU-minute pilots it beat 1.0 (90.6 vs 90.0 %)
    # and 0.4, and 5 training queries per class beat 1 (88 %) at equal CPU time (docs/bench/maml.md)
    "maml": dict(
        tasks_per_batch=8,
        queries=5,
        eval_queries=15,
        inner_lr=2.0,
        inner_steps=1,
        eval_inner_steps=3,
        meta_lr=3e-3,
        first_order=False,
        ways=5,
        shots=1,
        train_ways=None,
        cosine_to=0.05,
    ),
    # MAML++'s paper settings (5 inner steps at a learned per-layer rate starting at 0.1 on the mean loss, Adam
    # 1e-3 annealed to 1e-5); its epoch schedules (MSL, first order, cosine) are spread over --steps
    "maml_pp": dict(
        tasks_per_batch=8,
        queries=5,
        eval_queries=15,
        inner_lr=0.1,
        inner_steps=5,
        eval_inner_steps=5,
        meta_lr=1e-3,
        first_order=False,
        ways=5,
        shots=1,
        train_ways=None,
        pp_epochs=150,
        first_order_epochs=50,
        msl_epochs=10,
        bn_stats=True,
    ),
    # Reptile's Omniglot settings: 5 inner Adam steps of 10 examples on 10-shot training episodes, meta-batch 5,
    # outer step 1 annealed to 0 over --steps, 50 evaluation steps of 5 examples (transductive)
    "reptile": dict(
        tasks_per_batch=5,
        queries=5,
        eval_queries=15,
        inner_lr=1e-3,
        inner_steps=5,
        eval_inner_steps=50,
        meta_lr=1.0,
        first_order=None,
        ways=5,
        shots=1,
        train_shots=10,
        train_ways=None,
    ),
    # iMAML's Omniglot settings: lam 2, 16 inner steps, 5 conjugate-gradient steps (inner rate not in the paper);
    # --inner-solver hessian_free: 5 CG steps per Newton step and a line search (the paper's), 3 Newton steps (ours)
    "imaml": dict(
        lam=2.0,
        inner_solver="gd",
        newton_steps=3,
        eval_newton_steps=3,
        newton_cg_steps=5,
        newton_damping=0.0,
        line_search_steps=5,
        tasks_per_batch=8,
        queries=5,
        eval_queries=15,
        inner_lr=0.01,
        inner_steps=16,
        eval_inner_steps=16,
        meta_lr=1e-3,
        first_order=None,
        ways=5,
        shots=1,
        train_ways=None,
    ),
    # ProtoNet's training (20-way episodes, one per step, Adam 1e-3, Conv4-64): only the classifier differs
    "matching": dict(
        tasks_per_batch=1,
        queries=5,
        eval_queries=15,
        inner_lr=None,
        inner_steps=None,
        eval_inner_steps=None,
        meta_lr=1e-3,
        first_order=None,
        ways=5,
        shots=1,
        train_ways=20,
    ),
    # ProtoNet's training, plus 5 first-order inner steps (rate 0.01) from the prototype head; transductive BN
    "proto_maml": dict(
        tasks_per_batch=1,
        queries=5,
        eval_queries=15,
        inner_lr=0.01,
        inner_steps=5,
        eval_inner_steps=5,
        meta_lr=1e-3,
        first_order=True,
        ways=5,
        shots=1,
        train_ways=20,
    ),
    "protonet": dict(
        tasks_per_batch=1,
        queries=5,
        eval_queries=15,
        inner_lr=None,
        inner_steps=None,
        eval_inner_steps=None,
        meta_lr=1e-3,
        first_order=None,
        ways=5,
        shots=1,
        train_ways=20,
    ),
    "maml-sinusoid": dict(
        tasks_per_batch=25,
        queries=10,
        eval_queries=10,
        inner_lr=0.01,
        inner_steps=1,
        eval_inner_steps=1,
        meta_lr=1e-3,
        first_order=False,
        ways=1,
        shots=10,
        train_ways=None,
    ),
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

        dm = SinusoidDataModule(
            shots=args.shots,
            queries=args.queries,
            tasks_per_batch=args.tasks_per_batch,
            train_episodes=args.tasks_per_batch * 100,
            val_episodes=args.tasks_per_batch,
            test_episodes=args.test_episodes,
            eval_queries=args.eval_queries,
            eval_grid=args.eval_grid,
            seed=args.seed,
        )
        model = MAML(
            MLP(),
            inner_lr=args.inner_lr,
            inner_steps=args.inner_steps,
            eval_inner_steps=args.eval_inner_steps,
            first_order=args.first_order,
            meta_lr=args.meta_lr,
            task_mode=args.task_mode,
        )
        return dm, model

    from lightning_meta.datamodules.omniglot import OmniglotDataModule

    class BenchOmniglot(OmniglotDataModule):
        """Training images shifted by up to ``--train-shift`` pixels (a random crop of the image padded with the
        background, 0), and only the first ``--train-characters`` of the seeded split's (shuffled) training
        characters; validation and test untouched."""

        def split_characters(self, chars: list[str], origin: dict[str, str]) -> dict[str, list[tuple[str, int | None]]]:
            plan = super().split_characters(chars, origin)
            if args.train_characters is not None:
                if args.train_characters > len(plan["train"]):
                    raise ValueError(
                        f"--train-characters {args.train_characters}: the training split has {len(plan['train'])}"
                    )
                plan["train"] = plan["train"][: args.train_characters]
            return plan

        @property
        def train_transform(self) -> Callable[[Tensor], Tensor] | None:
            from torchvision.transforms.v2 import RandomCrop

            return RandomCrop(self.image_size, padding=args.train_shift) if args.train_shift else None

    train_ways = args.train_ways or args.ways
    dm = BenchOmniglot(
        str(args.data_path),
        split="seeded",
        split_seed=0,
        ways=train_ways,
        shots=args.train_shots or args.shots,
        queries=args.queries,
        tasks_per_batch=args.tasks_per_batch,
        train_episodes=args.tasks_per_batch * 100,
        val_episodes=args.test_episodes if args.eval_split == "val" else args.tasks_per_batch,
        test_episodes=args.test_episodes,
        eval_ways=args.ways,
        eval_shots=args.shots,
        eval_queries=args.eval_queries,
        seed=args.seed,
    )
    from lightning_meta.algorithms import (
        IMAML,
        MAML,
        MAMLPlusPlus,
        MatchingNetworks,
        ProtoMAML,
        ProtoNet,
        Reptile,
    )
    from lightning_meta.nn import Conv4, conv4_maml_omniglot, conv4_protonet

    # the inner-loop settings every gradient-based learner here takes from the command line
    inner = dict(
        inner_lr=args.inner_lr,
        inner_steps=args.inner_steps,
        eval_inner_steps=args.eval_inner_steps,
        task_mode=args.task_mode,
    )
    zero_init = ("head.weight",) if args.zero_init else ()  # maml, maml_pp
    if args.algo == "maml":
        model = MAML(
            conv4_maml_omniglot(args.ways),
            **inner,
            first_order=args.first_order,
            meta_lr=args.meta_lr,
            zero_init=zero_init,
        )
    elif args.algo == "maml_pp":
        # the paper's schedules are in epochs of 500 steps over 150 epochs; here an epoch is --steps / --pp-epochs
        model = MAMLPlusPlus(
            conv4_maml_omniglot(args.ways),
            **inner,
            first_order=args.first_order,
            first_order_epochs=args.first_order_epochs,
            multi_step_loss_epochs=args.msl_epochs,
            per_step_bn_stats=args.bn_stats,
            zero_init=zero_init,
            total_epochs=args.pp_epochs,
            iterations_per_epoch=max(1, args.steps // args.pp_epochs),
            meta_lr=args.meta_lr,
        )
    elif args.algo == "reptile":
        model = Reptile(
            conv4_maml_omniglot(args.ways), **inner, meta_step_size=args.meta_lr, meta_iterations=args.steps
        )
    elif args.algo == "imaml":
        model = IMAML(
            conv4_maml_omniglot(args.ways),
            **inner,
            lam=args.lam,
            meta_lr=args.meta_lr,
            inner_solver=args.inner_solver,
            newton_steps=args.newton_steps,
            eval_newton_steps=args.eval_newton_steps,
            newton_cg_steps=args.newton_cg_steps,
            newton_damping=args.newton_damping,
            line_search_steps=args.line_search_steps,
        )
    elif args.algo == "matching":
        model = MatchingNetworks(conv4_protonet(), scale=args.scale or 1.0, meta_lr=args.meta_lr)
    elif args.algo == "proto_maml":
        body = Conv4(None, hidden=64, downsample="maxpool", pooling="flatten", image_size=28)  # transductive BN
        model = ProtoMAML(body, **inner, first_order=args.first_order, meta_lr=args.meta_lr)
    else:
        model = ProtoNet(conv4_protonet(), meta_lr=args.meta_lr)
    return dm, model


def _machine() -> dict:
    """The commit (with ``+dirty`` when the tree has uncommitted changes), the CPU model and its thread count."""
    import platform
    import subprocess

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", *cmd], check=False, cwd=REPO, capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "commit": commit,
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpu_threads": os.cpu_count(),
    }


def _independent_eval(model, dm, regression: bool, split: str = "test") -> list[float]:
    """Per-episode accuracy (or MSE) on the test (or validation) episodes, computed here from the query outputs."""
    import torch

    model.eval()
    scores: list[float] = []
    for batch in dm.test_dataloader() if split == "test" else dm.val_dataloader():
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
    record = {
        "weights": str(args.eval_only),
        "split": args.eval_split,
        "episodes": len(scores),
        "eval_inner_steps": args.eval_inner_steps,
        "mean": mean,
        "ci95": ci,
        "eval_cpu_seconds": time.process_time() - c0,
        "command": "python " + " ".join(sys.argv),
    }
    path = out_dir / f"eval-{args.eval_split}-steps{args.eval_inner_steps}.json"
    path.write_text(json.dumps(record, indent=1))
    print(
        f"\n{args.eval_split} on {len(scores)} episodes, {args.eval_inner_steps} inner steps: "
        f"{100 * mean:.2f} ± {100 * ci:.2f} (95% CI); wrote {path}"
    )
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked, with each algorithm's defaults filled in and ``data_path`` resolved."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--algo", required=True, choices=sorted(DEFAULTS))
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="meta-training budget in optimizer steps (default: STEPS[algo], about the intended CPU time "
        "on a quiet core)",
    )
    p.add_argument("--minutes", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--max-wall-minutes",
        type=float,
        default=None,
        help="optional wall-clock cap; a run that reaches it is recorded as incomplete, not as a figure",
    )
    p.add_argument(
        "--out-dir", type=Path, default=None, help="where run folders go (default: .bench/accuracy/ of the repository)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of every episode draw")
    p.add_argument(
        "--data-dir",
        default=DATA_DIR,
        help="folder with the Omniglot zips; relative paths are taken from the current directory "
        "(default: ../shared/data/omniglot from the repository root)",
    )
    p.add_argument("--test-episodes", type=int, default=600)
    p.add_argument("--eval-grid", type=int, default=None, help="sinusoid: score on this many grid points")
    p.add_argument("--task-mode", default="auto", choices=["auto", "loop", "vmap"])
    p.add_argument("--name", default=None, help="run name (log folder under .bench/accuracy/)")
    for key in (
        "tasks_per_batch",
        "queries",
        "eval_queries",
        "inner_steps",
        "eval_inner_steps",
        "ways",
        "shots",
        "train_ways",
        "train_shots",
    ):
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    for key in ("inner_lr", "meta_lr"):
        p.add_argument("--" + key.replace("_", "-"), type=float, default=None)
    p.add_argument("--first-order", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--eval-only",
        type=Path,
        default=None,
        help="skip training: load these weights (a run's weights.pt) and score them (e.g. to choose "
        "--eval-inner-steps on --eval-split val, then report test)",
    )
    p.add_argument(
        "--eval-split",
        default="test",
        choices=["test", "val"],
        help="score the test characters or, for choosing settings (pilots), the validation ones",
    )
    p.add_argument(
        "--zero-init",
        action="store_true",
        help="maml, maml_pp: the zeroing trick (the head's weight starts every inner loop at zero; Kao et al. 2022)",
    )
    p.add_argument(
        "--train-shift",
        type=int,
        default=None,
        metavar="PX",
        help="Omniglot: shift each training image by up to PX pixels in x and y (random crop of the zero-padded "
        "image); validation and test images are not shifted (default: off)",
    )
    p.add_argument(
        "--train-characters",
        type=int,
        default=None,
        metavar="N",
        help="Omniglot: train on only the first N characters of the seeded training split (each with its rotations), "
        "to see how accuracy depends on the number of training characters (default: all)",
    )
    p.add_argument(
        "--cosine-to",
        type=float,
        default=None,
        help="anneal the outer lr by a cosine over the CPU budget down to this fraction of it (default: constant)",
    )
    p.add_argument(
        "--pp-epochs", type=int, default=None, help="maml_pp: schedule epochs that --steps is split into (150)"
    )
    p.add_argument("--first-order-epochs", type=int, default=None, help="maml_pp: first-order epochs (DA; 50)")
    p.add_argument("--msl-epochs", type=int, default=None, help="maml_pp: epochs of the multi-step loss (MSL; 10)")
    p.add_argument(
        "--bn-stats",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="maml_pp: per-step running statistics (BNRS), used at evaluation (default: on)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help="matching: inverse temperature of the cosine attention (default 1, the paper's)",
    )
    p.add_argument(
        "--lam", type=float, default=None, help="imaml: strength of the proximal term (default 2, the paper's)"
    )
    p.add_argument(
        "--inner-solver",
        default=None,
        choices=["gd", "hessian_free"],
        help="imaml: inner solver, gradient descent (default) or Hessian-free truncated Newton",
    )
    p.add_argument("--newton-steps", type=int, default=None, help="imaml hessian_free: Newton steps (3)")
    p.add_argument("--eval-newton-steps", type=int, default=None, help="imaml hessian_free: at evaluation (3)")
    p.add_argument("--newton-cg-steps", type=int, default=None, help="imaml hessian_free: CG steps per Newton step (5)")
    p.add_argument("--newton-damping", type=float, default=None, help="imaml hessian_free: Hessian damping (0)")
    p.add_argument(
        "--line-search-steps", type=int, default=None, help="imaml hessian_free: step sizes tried, 1 to 1/16 (5)"
    )
    args = p.parse_args(argv)
    for owner, keys in ALGO_OPTIONS.items():
        if args.algo != owner and any(getattr(args, k) is not None for k in keys):
            flags = "/".join("--" + k.replace("_", "-") for k in keys)
            p.error(f"{flags} {'is an option' if len(keys) == 1 else 'are options'} of --algo {owner}")
    newton = ("newton_steps", "eval_newton_steps", "newton_cg_steps", "newton_damping", "line_search_steps")
    if (
        args.algo == "imaml"
        and args.inner_solver != "hessian_free"
        and any(getattr(args, k) is not None for k in newton)
    ):
        p.error("--newton-*/--line-search-steps are options of --inner-solver hessian_free")
    if args.algo == "imaml" and args.inner_solver == "hessian_free" and args.inner_lr is not None:
        p.error(
            f"--inner-lr {args.inner_lr}: the hessian_free solver takes Newton steps with a line search and has no "
            "inner learning rate; drop --inner-lr (or use --inner-solver gd)"
        )
    if args.train_shift is not None and args.train_shift < 1:
        p.error(f"--train-shift {args.train_shift}: give a number of pixels >= 1 (leave it out for no shift)")
    if args.train_characters is not None and args.train_characters < 5:
        p.error(f"--train-characters {args.train_characters}: give at least 5 (one 5-way episode's worth)")
    if (args.train_shift is not None or args.train_characters is not None) and args.algo == "maml-sinusoid":
        p.error("--train-shift and --train-characters are Omniglot options; maml-sinusoid has no images")
    if args.zero_init and args.algo not in ("maml", "maml_pp"):
        p.error(f"--zero-init is an option of --algo maml and maml_pp, not {args.algo}")
    if args.algo == "maml_pp" and args.cosine_to is not None:
        p.error("--cosine-to: maml_pp anneals its meta learning rate itself (cosine to 1e-5 over --steps)")
    if args.minutes is not None:
        p.error(
            f"--minutes {args.minutes}: the budget is a number of optimizer steps now (--steps N; the default "
            f"--steps {STEPS[args.algo]} takes about the intended CPU time on a quiet core), so that the same "
            "command trains the same amount on any machine"
        )
    if args.steps is None:
        args.steps = STEPS[args.algo]
    if args.steps <= 0:
        p.error(f"--steps {args.steps}: give a positive number of optimizer steps")
    for key, value in DEFAULTS[args.algo].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    data_dir = Path(args.data_dir)
    if args.data_dir == DATA_DIR:  # the default is relative to the repository, not to the current directory
        data_dir = REPO / DATA_DIR
    args.data_path = data_dir
    if args.algo != "maml-sinusoid" and not (data_dir / "images_background_small1.zip").exists():
        p.error(f"--data-dir {args.data_dir} has no images_background_small1.zip; point it at the Omniglot zips")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("LIGHTNING_META_CACHE", str(BENCH_DIR / "cache"))
    import torch
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import CSVLogger

    from lightning_meta.callbacks import StepBudget

    torch.set_num_threads(args.threads)
    seed_everything(args.seed, workers=True, verbose=False)
    name = args.name or f"{args.algo}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    out_dir = (args.out_dir or BENCH_DIR / "accuracy") / name
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("data_path", "out_dir", "minutes") and not (k == "data_dir" and args.algo == "maml-sinusoid")
    }
    machine = _machine()  # the code that runs is the code at start: later edits to the tree must not show here
    print(
        f"command: python {' '.join(sys.argv)}\nconfig: {json.dumps(config)}\nmachine: {json.dumps(machine)}",
        flush=True,
    )

    dm, model = _build(args)
    if args.eval_only is not None:
        return _eval_only(args, dm, model, out_dir)
    budget = StepBudget(cosine_to=args.cosine_to)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=-1,
        max_steps=args.steps,
        max_time={"minutes": args.max_wall_minutes} if args.max_wall_minutes else None,
        callbacks=[budget],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        inference_mode=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        logger=CSVLogger(str(out_dir), name="", version=""),
        deterministic=False,
    )
    trainer.fit(model, datamodule=dm)
    train_s, train_cpu_s, steps, complete = budget.wall_seconds, budget.cpu_seconds, budget.steps, budget.complete
    if not complete:
        print(
            f"\nINCOMPLETE: {steps} of {args.steps} optimizer steps (stopped by --max-wall-minutes "
            f"{args.max_wall_minutes} or interrupted); the record is marked incomplete and is not a figure",
            flush=True,
        )
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
        "algo": args.algo,
        "config": config,
        "complete": complete,
        "steps_budget": args.steps,
        "optimizer_steps": steps,
        "train_seconds": train_s,
        "train_cpu_seconds": train_cpu_s,
        "torch_threads": torch.get_num_threads(),
        **machine,
        "scored_split": args.eval_split,
        "tasks_seen": steps * args.tasks_per_batch,
        "eval_seconds": eval_s,
        "test_episodes": len(scores),
        f"{args.eval_split}_{metric}_mean": mean,
        f"{args.eval_split}_{metric}_ci95": ci,
        f"lib_test_{metric}": tested.get(f"test/{metric}"),
        f"lib_test_{metric}_ci95": tested.get(f"test/{metric}_ci95"),
        "scored_on": (f"{args.eval_grid}-point grid" if args.eval_grid else f"{args.eval_queries} random query points")
        if regression
        else f"{args.eval_queries} queries per class",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},  # allocator settings change speed
    }
    (out_dir / "result.json").write_text(json.dumps(record, indent=1))
    scale = 1.0 if regression else 100.0
    unit = "" if regression else "%"
    print(
        f"\n{args.algo}: {steps}/{args.steps} optimizer steps ({steps * args.tasks_per_batch} tasks) in {train_cpu_s / 60:.1f} CPU min "
        f"({train_s / 60:.1f} wall min); "
        f"{args.eval_split} on {len(scores)} episodes ({record['scored_on']}): "
        f"{metric} = {scale * mean:.{3 if regression else 2}f}{unit} ± {scale * ci:.{3 if regression else 2}f}{unit} (95% CI)"
    )
    print(
        f"library metrics: test/{metric} = {tested.get(f'test/{metric}')}, test/{metric}_ci95 = {tested.get(f'test/{metric}_ci95')}"
    )
    print(f"wrote {out_dir / 'result.json'}")
    return record


if __name__ == "__main__":
    main()
