"""Meta-train an update rule and write it as shipped pretrained weights (``<name>.pt`` + ``<name>.json``).

Usage::

    python -m lightning_meta.optim.meta.pretrain --rule celo2 --minutes 25 --out lightning_meta/optim/pretrained/

Runs :class:`~lightning_meta.optim.meta.module.RuleMetaTrainer` on the CPU with a fixed seed and thread
count, for ``--minutes`` of wall-clock and/or ``--cpu-minutes`` of this process's CPU time (the fair
measure on a shared machine), or up to ``--steps`` meta-steps in all. A time-limited run records the
number of steps it reached and the ``--steps`` command that reproduces it bit for bit on the same machine
and library versions. The ``.json`` records the rule, its version and hash, the command, the machine, the
estimator, the task families and the meta-loss of the initial and the trained rule on fixed held-out
inner problems.

Long runs: ``--checkpoint-every N`` writes a Lightning checkpoint ``<out>/<name>.ckpt`` every ``N`` meta-steps
and at the end (rule weights, meta-optimizer, the estimators' inner problems and perturbations, RNG states, step
counter); ``--resume <out>/<name>.ckpt`` with the same settings continues it, and N + M steps in one go equal N
steps, a resume and M more, bit for bit. SIGINT or SIGTERM stop a run after the current meta-step with its
checkpoint and files written. Time budgets count this process only; ``--steps`` counts the steps of all parts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_meta.optim.meta.estimators import evaluate_rule
from lightning_meta.optim.meta.module import RuleMetaTrainer
from lightning_meta.optim.meta.tasks import family_names, family_parameters, get_family
from lightning_meta.optim.pretrained import save_pretrained
from lightning_meta.optim.rules import UpdateRule, get_rule, rule_hash
from lightning_meta.progress import rich_progress_bar

__all__ = ["evaluate_families", "main", "parse_args", "parse_family_kwargs", "parse_value"]

EVAL_SEED = 12345
_METRICS = {
    "mean": "mean training loss over the run / initial loss",
    "mean_log": "mean over the run of log(training loss / initial loss)",
    "final": "final training loss / initial loss",
    "valid": "mean validation loss over the run / initial loss",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_meta.optim.meta.pretrain", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rule", default="celo2", help="registry name of the rule to meta-train")
    parser.add_argument(
        "--rule-kwargs",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="constructor arguments of the rule; numbers, true/false/none, text, or comma-separated tuples, as in "
        "--family-kwargs (e.g. step_size=relative final_fraction=0)",
    )
    parser.add_argument("--name", default=None, help="entry name of the written files (default: the rule name)")
    parser.add_argument("--out", default="lightning_meta/optim/pretrained/", help="folder for <name>.pt/.json")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget of meta-training")
    parser.add_argument(
        "--cpu-minutes",
        type=float,
        default=None,
        help="CPU-time budget of this process (fair on a shared machine); may combine with --minutes",
    )
    parser.add_argument("--steps", type=int, default=None, help="exact number of meta-steps (reproducible)")
    parser.add_argument("--estimator", default="pes", choices=["pes", "es", "tbptt"])
    parser.add_argument("--families", default="mlp,teacher_student,conv,quadratic", help="comma-separated families")
    parser.add_argument(
        "--family-kwargs",
        nargs="+",
        default=[],
        metavar="FAMILY:KEY=VALUE",
        help="constructor arguments of a family in --families; numbers, true/false/none, text, or comma-separated tuples "
        "(a trailing comma makes a one-element tuple), e.g. mlp:widths=16,128 mlp:depths=1,4 transformer_lm:layers=2",
    )
    parser.add_argument("--num-tasks", type=int, default=4, help="inner problems per family per step")
    parser.add_argument("--truncation-length", type=int, default=10)
    parser.add_argument("--min-horizon", type=int, default=50)
    parser.add_argument("--max-horizon", type=int, default=200)
    parser.add_argument("--objective", default="mean", choices=["mean", "mean_log", "final", "valid"])
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--inner-lr", type=float, nargs="+", default=[1e-2], help="one lr, or a low high range")
    parser.add_argument("--meta-lr", type=float, default=3e-3)
    parser.add_argument(
        "--trainable",
        nargs="+",
        default=None,
        help="meta-train only these weights (names or prefixes, e.g. schedule); default: all",
    )
    parser.add_argument(
        "--anchor", type=float, default=0.0, help="L2 pull of the rule's weights towards their initialisation (0: none)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--eval-tasks", type=int, default=8, help="held-out inner problems per family for the report")
    parser.add_argument("--no-progress-bar", action="store_true", help="no progress bar (e.g. in logs)")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help="write the resumable checkpoint <out>/<name>.ckpt every N meta-steps and at the end (default: none)",
    )
    parser.add_argument("--resume", default=None, metavar="CKPT", help="continue the run of this checkpoint")
    args = parser.parse_args(argv)
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every {args.checkpoint_every} must be >= 1 (leave it out for no checkpoints)")
    try:
        args.rule_kwargs = _parse_kwargs(args.rule_kwargs)
        args.family_kwargs = parse_family_kwargs(args.family_kwargs, [f for f in args.families.split(",") if f])
    except ValueError as err:
        parser.error(str(err))
    timed = args.minutes is not None or args.cpu_minutes is not None
    if timed == (args.steps is not None):
        parser.error("pass a time budget (--minutes and/or --cpu-minutes) or --steps (exact, reproducible), not both")
    if len(args.inner_lr) not in (1, 2):
        parser.error(f"--inner-lr takes one value or a low high pair, got {args.inner_lr}")
    return args


# settings that may differ between the parts of a resumed run (budgets, outputs, display)
_RUN_CONTROL = ("out", "name", "minutes", "cpu_minutes", "steps", "checkpoint_every", "resume", "no_progress_bar")


def _parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--rule-kwargs {item!r} is not KEY=VALUE (e.g. step_size=relative)")
        kwargs[key] = parse_value(value)
    return kwargs


def parse_value(text: str) -> Any:
    """A value of ``--rule-kwargs`` or ``--family-kwargs``: an int, a float, ``true``/``false``, ``none``, a
    comma-separated tuple of those (``16,128`` -> ``(16, 128)``, ``64,`` -> ``(64,)``), or else the text itself."""
    if "," in text:
        return tuple(parse_value(v) for v in text.split(",") if v)
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_family_kwargs(items: Sequence[str], families: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``FAMILY:KEY=VALUE`` items as ``{family: {key: value}}``; a value with a comma is a tuple of values
    (``16,128`` -> ``(16, 128)``, ``64,`` -> ``(64,)``). The family must be one of ``families`` and take ``KEY``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        family, colon, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        if not (colon and eq and family and key):
            raise ValueError(f"--family-kwargs {item!r} is not FAMILY:KEY=VALUE (e.g. mlp:widths=16,128)")
        if family not in family_names():
            raise ValueError(
                f"--family-kwargs {item!r}: no task family {family!r}; choose one of {list(family_names())}"
            )
        if family not in families:
            raise ValueError(f"--family-kwargs {item!r}: {family!r} is not in --families {','.join(families)}")
        if key not in family_parameters(family):
            raise ValueError(
                f"--family-kwargs {item!r}: {family!r} takes no {key!r}; it takes {', '.join(family_parameters(family))}"
            )
        out.setdefault(family, {})[key] = parse_value(value)
    return out


class _RunControl(Callback):
    """Stops training at this process's CPU/wall budget or on SIGINT/SIGTERM, prints progress every ``every``
    steps and writes the resumable checkpoint every ``checkpoint_every`` steps and at the end."""

    def __init__(
        self,
        cpu_minutes: float | None,
        minutes: float | None,
        checkpoint: Path | None,
        checkpoint_every: int | None,
        run_info: dict[str, Any],
        every: int = 100,
    ) -> None:
        self.cpu_limit = None if cpu_minutes is None else cpu_minutes * 60
        self.wall_limit = None if minutes is None else minutes * 60
        self.checkpoint, self.checkpoint_every, self.every = checkpoint, checkpoint_every, every
        self.run_info = run_info  # pretrain's own record, written into every checkpoint
        self.start, self.wall_start = time.process_time(), time.perf_counter()
        self.stop_signal: int | None = None
        self._saved_step = -1

    def used(self) -> tuple[float, float]:
        """CPU and wall seconds of this process since training started."""
        return time.process_time() - self.start, time.perf_counter() - self.wall_start

    def _save(self, trainer: Trainer) -> None:
        if self.checkpoint is None or trainer.global_step == self._saved_step:
            return
        tmp = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.checkpoint)  # a kill while writing leaves the previous checkpoint intact
        self._saved_step = trainer.global_step

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        cpu, wall = self.used()
        info = dict(self.run_info)
        info["cpu_seconds"] = info["cpu_seconds_before"] + cpu
        info["wall_seconds"] = info["wall_seconds_before"] + wall
        checkpoint["pretrain"] = info

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        cpu, wall = self.used()
        if trainer.global_step % self.every == 0:
            loss = trainer.callback_metrics.get("train/meta_loss")
            shown = "n/a" if loss is None else f"{float(loss):.4f}"  # not logged yet
            print(f"step {trainer.global_step}: meta_loss {shown}, cpu {cpu / 60:.1f} min", flush=True)
        if self.checkpoint_every is not None and trainer.global_step % self.checkpoint_every == 0:
            self._save(trainer)
        over = (self.cpu_limit is not None and cpu >= self.cpu_limit) or (
            self.wall_limit is not None and wall >= self.wall_limit
        )
        if over or self.stop_signal is not None:
            self._save(trainer)  # here, not only in on_train_end: after SIGTERM, Lightning ends fit by raising
            trainer.should_stop = True

    @override
    def on_train_end(self, trainer: Trainer, pl_module) -> None:
        self._save(trainer)

    def on_signal(self, signum: int, frame: Any) -> None:
        print(f"received signal {signum}: stopping after this meta-step", flush=True)
        self.stop_signal = signum


def _machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()}; {threads} torch thread(s); "
        f"torch {torch.__version__}; lightning {lightning.__version__}"
    )


def evaluate_families(
    rule: UpdateRule,
    families: Sequence[str],
    *,
    horizon: int,
    inner_lr: float,
    num_tasks: int,
    seed: int = EVAL_SEED,
    objective: str = "mean",
    family_kwargs: dict[str, dict[str, Any]] | None = None,
) -> dict[str, float]:
    """The meta-objective (normalised training loss, ``objective`` as in meta-training) of ``rule`` over full runs
    of ``horizon`` updates, per family (built with its ``family_kwargs`` entry)."""
    kwargs = family_kwargs or {}
    return {
        name: evaluate_rule(
            rule,
            get_family(name, **kwargs.get(name, {})),
            num_tasks=num_tasks,
            horizon=horizon,
            inner_lr=inner_lr,
            seed=seed + i,
            objective=objective,
        )
        for i, name in enumerate(families)
    }


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that shape meta-training (all but budgets, outputs and display), JSON-comparable."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in _RUN_CONTROL}))


# settings added after checkpoints were written, with the value that reproduces those runs
_ADDED_SETTINGS: dict[str, Any] = {"family_kwargs": {}}


def _load_resume(path: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``pretrain``'s record in the checkpoint at ``path``, after checking it was written with ``settings``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint (pretrain writes <out>/<name>.ckpt)")
    info = torch.load(path, map_location="cpu", weights_only=True).get("pretrain")
    if info is None:
        raise ValueError(f"--resume {path} is not a checkpoint written by pretrain --checkpoint-every")
    saved = {**_ADDED_SETTINGS, **info["settings"]}
    diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in diff.items())
        raise ValueError(f"--resume {path} was meta-trained with other settings ({shown}); pass the checkpoint's")
    return info


def _reproduce(argv: Sequence[str], steps: int) -> list[str]:
    """``argv`` without budgets, checkpointing and resuming, with ``--steps`` the steps reached."""
    drop = ("--minutes", "--cpu-minutes", "--checkpoint-every", "--resume", "--steps")
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in drop:
            skip = True
        elif not a.startswith(tuple(f"{d}=" for d in drop)):
            out.append(a)
    return [*out, "--steps", str(steps)]


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    seed_everything(args.seed, verbose=False)
    families = [f for f in args.families.split(",") if f]
    inner_lr = args.inner_lr[0] if len(args.inner_lr) == 1 else tuple(args.inner_lr)
    eval_lr = args.inner_lr[0] if len(args.inner_lr) == 1 else float(torch.tensor(args.inner_lr).log().mean().exp())
    settings = _settings(args)
    resumed = _load_resume(args.resume, settings) if args.resume is not None else None
    module = RuleMetaTrainer(
        args.rule,
        rule_kwargs=args.rule_kwargs,
        families=families,
        family_kwargs=args.family_kwargs,
        estimator=args.estimator,
        num_tasks=args.num_tasks,
        truncation_length=args.truncation_length,
        min_horizon=args.min_horizon,
        max_horizon=args.max_horizon,
        objective=args.objective,
        sigma=args.sigma,
        inner_lr=inner_lr,
        meta_lr=args.meta_lr,
        anchor=args.anchor,
        trainable=args.trainable,
        steps_per_epoch=1000,
        seed=args.seed,
    )
    eval_kwargs = dict(
        horizon=args.max_horizon,
        inner_lr=eval_lr,
        num_tasks=args.eval_tasks,
        objective=args.objective,
        family_kwargs=args.family_kwargs,
    )
    if resumed is not None:
        initial = resumed["initial_meta_loss"]  # the initial rule's report, computed by the first part
    else:
        initial = evaluate_families(get_rule(args.rule, **args.rule_kwargs), families, **eval_kwargs)
    name = args.name or args.rule
    checkpoint = None
    if args.checkpoint_every is not None:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        checkpoint = Path(args.out) / f"{name}.ckpt"
    run_info = {
        "settings": settings,
        "initial_meta_loss": initial,
        "cpu_seconds_before": resumed["cpu_seconds"] if resumed else 0.0,
        "wall_seconds_before": resumed["wall_seconds"] if resumed else 0.0,
        "parts": [*(resumed["parts"] if resumed else []), shlex.join(argv)],
    }
    control = _RunControl(args.cpu_minutes, args.minutes, checkpoint, args.checkpoint_every, run_info)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps if args.steps is not None else -1,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress_bar,
        deterministic=True,
        callbacks=[control, *rich_progress_bar(args.no_progress_bar)],
    )
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        handlers = {sig: signal.signal(sig, control.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with warnings.catch_warnings():
            # the loader's batches only count steps, so restarting it mid-epoch changes nothing
            warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")
            trainer.fit(module, ckpt_path=args.resume, weights_only=True)
    except SIGTERMException:  # Lightning ends fit this way after SIGTERM; the checkpoint is written by then
        pass
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    cpu_seconds, seconds = control.used()
    rule = module.rule.cpu().eval()
    final = evaluate_families(rule, families, **eval_kwargs)
    steps = trainer.global_step
    metadata = {
        "command": "python -m lightning_meta.optim.meta.pretrain " + shlex.join(argv),
        "reproduce": "python -m lightning_meta.optim.meta.pretrain " + shlex.join(_reproduce(argv, steps)),
        "machine": _machine(args.threads),
        "minutes": round((run_info["wall_seconds_before"] + seconds) / 60, 2),
        "cpu_minutes": round((run_info["cpu_seconds_before"] + cpu_seconds) / 60, 2),
        "meta_steps": steps,
        "estimator": args.estimator,
        "task_families": families,
        "meta_training": {k: v for k, v in vars(args).items() if k not in ("out", "name")},
        "eval": {
            "horizon": args.max_horizon,
            "inner_lr": eval_lr,
            "tasks_per_family": args.eval_tasks,
            "seed": EVAL_SEED,
            "metric": _METRICS[args.objective],
        },
        "initial_meta_loss": initial,
        "final_meta_loss": final,
        "skipped_estimates": module.skipped_estimates,
    }
    if resumed is not None or checkpoint is not None:
        metadata["parts"] = run_info["parts"]  # the command of each part of a resumed run
        metadata["checkpoint"] = None if checkpoint is None else str(checkpoint)
    if control.stop_signal is not None:
        metadata["stopped_by_signal"] = control.stop_signal
    path = save_pretrained(rule, name, kwargs=args.rule_kwargs, directory=args.out, metadata=metadata)
    print(
        json.dumps(
            {"written": str(path), "hash": rule_hash(rule), "meta_steps": steps, "initial": initial, "final": final},
            indent=2,
        )
    )
    return path


if __name__ == "__main__":
    main()
