"""Validation protocol for choosing a learned rule: the quality benchmark's protocol on tasks disjoint from it.

Choosing the shipped rule (or the meta-training settings that produced it) by its score on the held-out tasks of
``bench_lopt_quality.py`` would make that benchmark a training set. This script scores candidate rules on
*validation* tasks instead: fresh instances (seeds never used by meta-training or by the benchmark) of the
meta-training families with their meta-training settings, plus two width/size variants of them and a character-level
GRU language model on held-aside text (help topics that meta-training never reads), at the short horizon
(1x = 200 steps) and at 10x it (2000 steps). Everything else is the benchmark's protocol, by import:
tuned constant and cosine Adam as baselines, lr tuned on the half-decade grid (at 10x: the 1x-tuned lr and its
neighbours), score = training loss over the last 10 % of steps, mean over seeds. Where the best lr is the highest
(or lowest) one searched, the search goes on past it, one half-decade lr at a time (up to 10), until one does not
improve: a baseline whose loss still falls at the grid's end would otherwise be capped below its tuned value (the
records before this search, ``"grid_extended"`` absent, tuned on the grid alone: ``--grid-only`` reproduces them, and
``--previous RECORD`` with no candidate carries a record's search past the grid's ends, running only the lrs it
lacks).

Selection rule (fixed before any candidate was scored): a candidate qualifies when none of its runs diverged;
among qualifying candidates the one with the most wins over the two tuned Adams (summed over tasks and both
horizons) is chosen, ties broken by the lower mean log score ratio against tuned cosine Adam (scores floored at
1e-6 of the run's initial loss, so differences between numerically-zero losses do not count).

The summary also says, for reading only (the selection and the issue's goal count strict wins), on what fraction of
the cells a candidate is within 1 % of tuned cosine Adam or better (``within_1pct_of_adam_cosine``): some cells
(the noisy quadratic at 10x) end within a fraction of a per cent on every seed set, where a strict win is a coin toss.

Usage::

    python benchmarks/bench_lopt_validation.py --candidate init=init shipped=shipped new=/tmp/run/ --out /tmp/val
    python benchmarks/bench_lopt_validation.py --quick --candidate init=init      # smoke run

A candidate is ``NAME=init`` (the untrained ``celo2`` rule), ``NAME=shipped`` (the package's ``celo2`` weights),
``NAME=FOLDER`` (a folder with ``celo2.json``/``celo2.pt`` written by ``lightning_meta.optim.meta.pretrain``),
``NAME=PATH.ckpt`` (the rule in a checkpoint of ``pretrain --checkpoint-every``),
``NAME=pretrained:ENTRY`` (a shipped ``load_pretrained`` entry) or ``NAME=relative:STEP[:MIN_RMS[:GAIN_RATE[:MAX_LOG_GAIN]]][:KEY=VALUE...]`` (the untrained
rule with ``step_size="relative"`` and any other float ``Celo2Rule`` arguments, e.g. ``final_fraction=0``) or
``NAME=dog:...`` (the same fields with ``step_size="dog"``, e.g. ``dog:0.01:0.1:0.05:0:max_growth=1000``) or
``NAME=prodigy:...`` (the same fields with ``step_size="prodigy"``, whose STEP is unused, e.g.
``prodigy:0.1:0.1:0.05:0:prodigy_d0=1e-6:prodigy_max_d=0.1``). Rules whose
step size does not depend on the lr's size (``relative_lr``) are
run at lr 1.0 only, **without tuning**: that is how a user runs them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lopt_quality import GRID, LADDER, run_population, wanted_lrs  # noqa: E402
from bench_lopt_quality import tune_lr as quality_tune_lr  # noqa: E402

from lightning_meta.optim.meta.pretrain import parse_value  # noqa: E402
from lightning_meta.optim.meta.tasks import (  # noqa: E402
    ConvTaskFamily,
    GRULanguageModelTaskFamily,
    MLPTaskFamily,
    TaskFamily,
    get_family,
)
from lightning_meta.optim.pretrained import load_pretrained  # noqa: E402
from lightning_meta.optim.rules import UpdateRule, get_rule  # noqa: E402

__all__ = ["choose", "load_candidate", "validation_tasks", "within_tie"]

SEED_BASE = 7000  # validation instances: seeds 7000.. (benchmark: 0..; meta-training draws from seeds 0..3)
FLOOR = 1e-6  # scores below FLOOR * initial loss count as FLOOR * initial loss in the log ratio
BASELINES = ("adam", "adam_cosine")
PLANNED_COSINE = "adam_cosine_planned"  # --planned-horizon-factor: cosine Adam told the same wrong horizon


def validation_tasks() -> dict[str, TaskFamily]:
    """The four meta-training families (their ``pretrain`` settings), two size variants and a GRU language model on
    the held-aside text (added before any candidate was scored on it); never held-out tasks."""
    return {
        "mlp": get_family("mlp"),
        "teacher_student": get_family("teacher_student"),
        "conv": get_family("conv"),
        "quadratic": get_family("quadratic"),
        "mlp_width64": MLPTaskFamily(hidden=(64,)),
        "conv_12px": ConvTaskFamily(image_size=12),
        "gru_lm_aside": GRULanguageModelTaskFamily(corpus="held-aside"),
    }


def load_candidate(spec: str) -> UpdateRule:
    """``init``: untrained ``celo2``; ``shipped``: the package's ``celo2`` weights; else a folder with ``celo2.*``."""
    if spec == "init":
        return get_rule("celo2")
    if spec == "shipped":
        return load_pretrained("celo2")
    if spec.startswith("pretrained:"):
        return load_pretrained(spec.split(":", 1)[1])
    if spec.startswith(("relative:", "dog:", "prodigy:")):
        mode, *fields = spec.split(":")
        values = [float(v) for v in fields if "=" not in v]
        kwargs = dict(zip(("relative_step", "min_rms", "gain_rate", "max_log_gain"), values))
        kwargs |= {
            k: parse_value(v) for k, _, v in (f.partition("=") for f in fields if "=" in f)
        }  # e.g. magnitude_power=1
        return get_rule("celo2", step_size=mode, **kwargs)
    if spec.endswith(".ckpt"):  # a meta-training checkpoint (pretrain --checkpoint-every): the rule it holds
        checkpoint = torch.load(spec, map_location="cpu", weights_only=True)
        hparams = checkpoint["hyper_parameters"]
        rule = get_rule(hparams["rule"], **(hparams.get("rule_kwargs") or {}))
        rule.load_state_dict({k[5:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("rule.")})
        return rule.eval()
    folder = Path(spec)
    meta_file = folder / "celo2.json"
    if not meta_file.is_file():
        raise ValueError(f"candidate {spec!r}: no {meta_file}; pass init, shipped or a folder written by pretrain")
    meta = json.loads(meta_file.read_text())
    rule = get_rule(meta["rule"], **meta.get("kwargs", {}))
    rule.load_state_dict(torch.load(folder / meta["weights"], weights_only=True))
    return rule.eval()


def tune_lr(*args, **kwargs) -> tuple[dict, float | None]:
    """``bench_lopt_quality.tune_lr`` with this module's ``run_population`` (which ``bench_lopt_variants.py`` swaps
    for its variants' runner): the row and the initial loss."""
    row, initial, _ = quality_tune_lr(*args, runner=run_population, **kwargs)
    return row, initial


def _log_ratio(row: dict, name: str) -> float:
    floor = FLOOR * row["_initial"]
    a, b = max(row[name]["score"], floor), max(row["adam_cosine"]["score"], floor)
    return math.log(a / b) if math.isfinite(a) else math.inf


TIE = 0.01  # "within 1 %" of the summary's secondary figure


def within_tie(row: dict, name: str) -> bool:
    """Whether ``name``'s score in ``row`` is within ``TIE`` (relative) of tuned cosine Adam's or below it."""
    return _log_ratio(row, name) <= math.log1p(TIE)


def summarize(results: dict, names: list[str]) -> dict:
    """Per candidate: wins over each tuned Adam at 1x and 10x, diverged runs, the mean log ratio vs cosine Adam and
    the fraction of cells within ``TIE`` (relative) of cosine Adam's score or below it."""
    summary = {}
    for name in names:
        entry: dict = {"wins": 0, "diverged_runs": 0}
        ratios, within = [], 0
        for mult in (1, 10):
            rows = [r for k, r in results["tasks"].items() if k.endswith(f"@{mult}x")]
            if not rows:
                continue
            for b in BASELINES:
                wins = sum(r[name]["score"] < r[b]["score"] for r in rows)
                entry[f"{mult}x_win_vs_{b}"] = wins / len(rows)
                entry["wins"] += wins
            if all(PLANNED_COSINE in r for r in rows):
                wins = sum(r[name]["score"] < r[PLANNED_COSINE]["score"] for r in rows)
                entry[f"{mult}x_win_vs_{PLANNED_COSINE}"] = wins / len(rows)
            entry["diverged_runs"] += sum(r[name]["diverged"] for r in rows)
            ratios += [_log_ratio(r, name) for r in rows]
            within += sum(within_tie(r, name) for r in rows)
        entry["mean_log_ratio_vs_adam_cosine"] = sum(ratios) / len(ratios)
        entry["within_1pct_of_adam_cosine"] = within / len(ratios)
        summary[name] = entry
    return summary


def choose(summary: dict) -> str:
    """The selection rule of the module docstring."""
    qualifying = [n for n, e in summary.items() if e["diverged_runs"] == 0] or list(summary)
    return min(qualifying, key=lambda n: (-summary[n]["wins"], summary[n]["mean_log_ratio_vs_adam_cosine"]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--candidate",
        nargs="*",
        default=[],
        help="NAME=init|shipped|FOLDER, one or more (none with --previous: only extend its baselines' search)",
    )
    parser.add_argument("--horizon", type=int, default=200, help="the 1x horizon (10x is also run)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--seed-base",
        type=int,
        default=SEED_BASE,
        help="first instance seed; another value re-scores on fresh instances (e.g. 7003 with --seeds 3), a check "
        "of a selection, not the protocol",
    )
    parser.add_argument("--tasks", default=None, help="comma-separated subset of the validation tasks")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 tasks, horizon 20, 2 seeds")
    parser.add_argument(
        "--multipliers",
        type=int,
        nargs="+",
        default=[1, 10],
        help="horizon multipliers to run (a pilot may run 1 only; the protocol runs 1 and 10)",
    )
    parser.add_argument(
        "--planned-horizon-factor",
        type=float,
        default=1.0,
        help="tell the candidates this many times the real number of steps (a misplanned horizon); the Adam "
        "baselines keep the real one, and cosine Adam misplanned the same way is added as adam_cosine_planned",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="folder for lopt_validation.json")
    parser.add_argument(
        "--previous",
        default=None,
        help="a lopt_validation.json of the same settings: reuse its rows for the optimizers it has "
        "(the runs are deterministic), run only the new candidates",
    )
    parser.add_argument(
        "--grid-only",
        action="store_true",
        help="tune the lrs on the grid alone, as records before the search at the grid's edges did",
    )
    args = parser.parse_args(argv)
    if not args.candidate and not args.previous:
        parser.error("--candidate is required (it may be left out only with --previous)")
    if not args.planned_horizon_factor > 0:
        parser.error(f"--planned-horizon-factor {args.planned_horizon_factor} must be > 0")
    torch.set_num_threads(args.threads)
    candidates = {}
    for item in args.candidate:
        name, _, spec = item.partition("=")
        if not spec or name in (*BASELINES, PLANNED_COSINE, "_initial") or name in candidates:
            raise ValueError(f"--candidate {item!r}: use NAME=init|shipped|FOLDER with a new NAME (not adam...)")
        candidates[name] = load_candidate(spec)
    horizon = 20 if args.quick else args.horizon
    seeds = tuple(args.seed_base + s for s in range(2 if args.quick else args.seeds))
    tasks = validation_tasks()
    if args.tasks:
        tasks = {k: v for k, v in tasks.items() if k in args.tasks.split(",")}
    if args.quick:
        tasks = dict(list(tasks.items())[:2])
    optimizers = {"adam": (get_rule("adam"), "constant"), "adam_cosine": (get_rule("adam"), "cosine")}
    if args.planned_horizon_factor != 1.0:  # the fair reference: cosine Adam misplanned the same way, lr tuned
        optimizers[PLANNED_COSINE] = (get_rule("adam"), "cosine")
    optimizers |= {name: (rule, "constant") for name, rule in candidates.items()}
    misplanned = {PLANNED_COSINE, *candidates}
    results: dict = {
        "candidates": dict(item.partition("=")[::2] for item in args.candidate),
        "horizon": horizon,
        "seeds": list(seeds),
        "grid": GRID,
        "grid_extended": not args.grid_only,
        "planned_horizon_factor": args.planned_horizon_factor,
        "tasks": {},
    }
    previous = json.loads(Path(args.previous).read_text()) if args.previous else None
    if previous is not None:
        if (previous["horizon"], previous["seeds"]) != (horizon, list(seeds)):
            raise ValueError(
                f"--previous {args.previous} used horizon {previous['horizon']} and seeds "
                f"{previous['seeds']}, this run {horizon} and {list(seeds)}; rerun without --previous"
            )
        if args.grid_only and previous.get("grid_extended"):
            raise ValueError(f"--previous {args.previous} searched past the grid's ends; drop --grid-only")
        results["candidates"] = previous["candidates"] | results["candidates"]
    # a misplanned cosine of another --planned-horizon-factor is another optimizer: rerun it, do not reuse it
    same_plan = previous is not None and previous.get("planned_horizon_factor", 1.0) == args.planned_horizon_factor
    stale = set() if same_plan else {PLANNED_COSINE}
    cpu = time.process_time()
    for task_name, family in tasks.items():
        for mult in args.multipliers:
            key, row = f"{task_name}@{mult}x", {}
            if previous is not None and key in previous["tasks"]:
                row = {k: v for k, v in previous["tasks"][key].items() if k not in candidates and k not in stale}
            for opt_name, (rule, schedule) in optimizers.items():
                steps = horizon * mult
                planned = max(1, round(steps * args.planned_horizon_factor)) if opt_name in misplanned else steps
                if rule.relative_lr:  # no lr to tune: run at the default multiplier 1.0, as a user does
                    if opt_name not in row:
                        row[opt_name], row["_initial"] = tune_lr(
                            family, rule, seeds, steps, schedule, planned, (1.0,), extend=False
                        )
                    continue
                if opt_name in row and (args.grid_only or "searched" in row[opt_name]):
                    continue
                lr_1x = results["tasks"][f"{task_name}@1x"][opt_name]["lr"] if mult != 1 else None
                wanted = wanted_lrs(mult, lr_1x, GRID if args.grid_only else LADDER)
                known = row.get(opt_name)  # reused from --previous
                if known is not None and "searched" not in known:  # a record of the grid-only protocol
                    old_1x = previous["tasks"][f"{task_name}@1x"][opt_name]["lr"]
                    known = known | {"searched": list(wanted_lrs(mult, old_1x))}
                found, initial = tune_lr(
                    family, rule, seeds, steps, schedule, planned, wanted, known, extend=not args.grid_only
                )
                if initial is not None:
                    row["_initial"] = initial
                row[opt_name] = found
            results["tasks"][key] = row
            print(key, {k: (v["lr"], f"{v['score']:.4g}") for k, v in row.items() if k != "_initial"}, flush=True)
    results["cpu_seconds"] = time.process_time() - cpu
    # candidates scored on every task (with --previous, 1x-only pilots of earlier runs are left out)
    names = [n for n in results["candidates"] if all(n in row for row in results["tasks"].values())]
    results["summary"] = summarize(results, names)
    results["chosen"] = choose(results["summary"])
    print(
        json.dumps(
            {"summary": results["summary"], "chosen": results["chosen"], "cpu_seconds": results["cpu_seconds"]},
            indent=1,
        )
    )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "lopt_validation.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
