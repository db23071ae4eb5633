"""Quality of a learned update rule on held-out tasks, against per-task tuned Adam.

Held-out tasks differ from meta-training in data (real Omniglot images when present), architecture
(deeper/wider MLPs, a 3-channel convnet, GELU/tanh), width and horizon (1x and 10x the meta-training
horizon). Per task and horizon, every optimizer runs the same seeds on the same data stream:

* Adam with a constant lr, and Adam with cosine decay, each tuned on a half-decade grid;
* the learned rule (``--rule``, a ``load_pretrained`` name), its lr tuned on the same grid, except for rules that
  set their own step size (``relative_lr``, as the shipped ``default``): those run at lr multiplier 1.0, untuned,
  as a user runs them (``--rule default``);
* the rule's own initialisation (untrained ``celo2``: a per-tensor RMS-normalised Adam), tuned likewise.

At 1x every optimizer searches the full grid; at 10x (to keep the run short) each searches its 1x-tuned lr
and its two half-decade neighbours. Where the best lr is the highest (or lowest) one searched, the search goes on
past it, one half-decade lr at a time (1e-6 ... 10), until one does not improve: a grid that stops where the loss
still falls would cap a baseline below its tuned value. Records without ``"grid_extended"`` were tuned on the grid
alone (``--grid-only`` reproduces them; ``--previous`` of such a record carries its search on, running only the
lrs it lacks).

A run's score is its training loss averaged over the last 10% of steps; an optimizer's score on a task is
the mean over seeds at its best lr (lr chosen on the same seeds: optimistic for every optimizer
alike). A run diverges when its score is not finite or exceeds its initial loss. Runs over
(lr, seed) are batched into one problem population (``batch_dims=1``), so Adam here is the library's
``AdamRule`` (step-for-step ``torch.optim.Adam``). Wall-clock per step of the deployable
``RuleOptimizer`` vs ``torch.optim.Adam`` is measured on a real ``nn.Module``, interleaved, medians.

Usage::

    python benchmarks/bench_lopt_quality.py                       # default, ~10 min on 1 CPU thread
    python benchmarks/bench_lopt_quality.py --quick               # smoke run
    # the same, split over processes by task, then merged:
    python benchmarks/bench_lopt_quality.py --tasks a,b --out /tmp/p1 --no-wall-clock   (one per subset)
    python benchmarks/bench_lopt_quality.py --merge /tmp/p1 /tmp/p2 ...
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_meta.optim.meta.estimators import inner_step
from lightning_meta.optim.meta.omniglot import OmniglotTaskFamily
from lightning_meta.optim.meta.tasks import (
    ConvTaskFamily,
    MLPTaskFamily,
    QuadraticTaskFamily,
    TaskFamily,
    TeacherStudentTaskFamily,
    sample_batches,
    stack_params,
)
from lightning_meta.optim.pretrained import load_pretrained
from lightning_meta.optim.rules import UpdateRule, get_rule

OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def held_out_tasks(omniglot: Path | None, extended: bool = False) -> dict[str, TaskFamily]:
    """Tasks unlike the meta-training families (mlp 16-32-4 relu, teacher-student 8-32-1, conv 8x8 1ch, quadratic 4x8)."""
    tasks: dict[str, TaskFamily] = {
        "mlp_deep_tanh": MLPTaskFamily(in_features=32, hidden=(64, 64), classes=10, activation="tanh", noise=1.5),
        "teacher_student_wide_gelu": TeacherStudentTaskFamily(
            in_features=16, teacher_hidden=(32, 32), hidden=(64, 64), activation="gelu", batch_size=64
        ),
        "conv_rgb_16px": ConvTaskFamily(image_size=16, in_channels=3, channels=(16, 32), classes=6, noise=1.0),
        "quadratic_16x16_illcond": QuadraticTaskFamily(shape=(16, 16), min_curvature=1e-3, max_curvature=100.0),
    }
    if omniglot is not None and not (omniglot / "images_background_small1.zip").exists():
        print(f"no Omniglot subsets in {omniglot}: the Omniglot tasks are left out", file=sys.stderr)
        omniglot = None
    if omniglot is not None:
        tasks["omniglot_conv_5way"] = OmniglotTaskFamily(omniglot, image_size=14, ways=5, channels=(16, 32))
    if extended and omniglot is not None:
        tasks["omniglot_mlp_20way"] = OmniglotTaskFamily(
            omniglot, image_size=14, ways=20, channels=(), hidden=(64,), batch_size=50
        )
    return tasks


def cosine_factor(t: int, planned: int) -> float:
    """The baselines' cosine decay of the lr at step ``t`` (from 0, before the step) of ``planned``; a cosine
    planned too short stays at 0 past its end."""
    return 0.5 * (1 + math.cos(math.pi * min(t / planned, 1.0)))


def run_population(
    family: TaskFamily,
    rule: UpdateRule,
    lrs: tuple[float, ...],
    seeds: tuple[int, ...],
    horizon: int,
    schedule: str,
    planned_horizon: int | None = None,
    on_step: Callable[[int, Tensor, dict[str, Tensor], dict[str, dict[str, Tensor]]], None] | None = None,
    on_start: Callable[[dict[str, Tensor], dict[str, dict[str, Tensor]]], None] | None = None,
) -> Tensor:
    """Trains ``len(lrs) * len(seeds)`` inner problems with ``rule``; returns losses ``(steps, lrs, seeds)``.

    Problem ``(i, s)`` uses lr ``lrs[i]`` and seed ``seeds[s]``: the seed fixes the task, the initialisation
    and the data stream, identically for every optimizer and lr. The runs take ``horizon`` steps; the rule is told
    ``planned_horizon`` (default: ``horizon``), as a user who planned the wrong number of steps would tell it; so is
    the ``"cosine"`` schedule, which stays at 0 past a planned horizon shorter than the run. ``on_step(step, loss,
    params, state)``, if given, sees every step's losses (the iterate before the step) and the updated parameters
    and rule states; ``on_start(params, state)``, if given, sees (and may change) the initial rule states before the
    first step.
    """
    tasks = [family.sample(torch.Generator().manual_seed(1000 + s)) for s in seeds]
    inits = [t.init(torch.Generator().manual_seed(2000 + s)) for t, s in zip(tasks, seeds)]
    data_gens = [torch.Generator().manual_seed(3000 + s) for s in seeds]
    planned = planned_horizon or horizon
    n_lr = len(lrs)
    params = {k: v.repeat(n_lr, *[1] * (v.ndim - 1)) for k, v in stack_params(inits).items()}  # (lrs*seeds, ...)
    state = {k: rule.init_state(v, batch_dims=1) for k, v in params.items()}
    if on_start is not None:
        on_start(params, state)
    base_lr = torch.tensor(lrs).repeat_interleave(len(seeds))  # (lrs*seeds,)
    losses = torch.empty(horizon, n_lr * len(seeds))
    with torch.no_grad():
        for t in range(horizon):
            batches = [sample_batches([task], g) for task, g in zip(tasks, data_gens)]
            batch = tuple(
                torch.cat([b[j] for b in batches]).repeat(n_lr, *[1] * (batches[0][j].ndim - 1))
                for j in range(len(batches[0]))
            )
            loss, grads = inner_step(tasks[0], params, batch, create_graph=False)
            losses[t] = loss
            factor = cosine_factor(t, planned) if schedule == "cosine" else 1.0
            for k, p in params.items():
                lr = (base_lr * factor).view(-1, *[1] * (p.ndim - 1))
                params[k], state[k] = rule.update(
                    p,
                    torch.nan_to_num(grads[k]),
                    state[k],
                    lr=lr,
                    step=t + 1,
                    horizon=planned,
                    loss=loss,
                    batch_dims=1,
                )
            if on_step is not None:
                on_step(t + 1, loss, params, state)
    return losses.view(horizon, n_lr, len(seeds))


def grid_around(lr: float, grid: tuple[float, ...] = GRID) -> tuple[float, ...]:
    """The 1x-tuned lr and its two half-decade neighbours on ``grid`` (the 10x runs search only these)."""
    i = grid.index(lr)
    return grid[max(0, i - 1) : i + 2]


def wanted_lrs(mult: int, lr_1x: float | None, grid: tuple[float, ...] = GRID) -> tuple[float, ...]:
    """The lrs a cell searches first: the whole grid at 1x, at longer horizons the 1x-tuned lr ``lr_1x`` and its two
    neighbours on ``grid`` (``GRID``: as the grid-only records did; ``LADDER``: past the grid's ends)."""
    if mult == 1:
        return GRID
    assert lr_1x is not None
    return grid_around(lr_1x, grid)


def score(losses: Tensor) -> Tensor:
    """Mean training loss over the last 10% of steps, ``(lrs, seeds)``; non-finite runs score +inf."""
    tail = losses[-max(1, losses.shape[0] // 10) :].mean(0)
    return torch.where(torch.isfinite(tail), tail, torch.full_like(tail, math.inf))


def tuned(losses: Tensor) -> tuple[int, Tensor]:
    """Index of the grid lr with the lowest mean score over seeds, and that lr's per-seed scores."""
    s = score(losses)
    best = int(torch.nan_to_num(s.mean(1), nan=math.inf).argmin())
    return best, s[best]


# Half-decade lrs beyond the grid, for the search at its edges (1e-6 ... 10; GRID is a part of it).
LADDER = tuple(sorted({round(m * 10.0**e, 10) for e in range(-6, 1) for m in (1, 3)} | {10.0}))
assert set(GRID) <= set(LADDER)


def tune_lr(
    family: TaskFamily,
    rule: UpdateRule,
    seeds: tuple[int, ...],
    steps: int,
    schedule: str,
    planned: int,
    wanted: tuple[float, ...],
    known: dict | None = None,
    extend: bool = True,
    runner: Callable[..., Tensor] | None = None,
) -> tuple[dict, float | None, list[float] | None]:
    """The lr with the lowest mean score: the ``wanted`` lrs not searched yet (one population), then, with
    ``extend``, while the best lies at an end of the lrs searched, the next half-decade lr beyond that end (one at a
    time, until one does not improve on the best or the ladder ends); a grid that stops where the loss still falls
    would cap a baseline below its tuned value.

    ``known``: a row already scored (``lr``, ``score``, ``diverged`` and ``searched``, the lrs it was the best
    of); the runs are deterministic, so only the lrs it lacks are run. ``runner`` replaces ``run_population`` (a
    script that swaps the population runner passes its own). Returns the row (``lr``, ``score``, ``per_seed``,
    ``diverged``, and ``searched`` when ``extend``), the initial loss (None when nothing was run) and the
    median-over-seeds loss curve at the best lr (None when the best is ``known``'s)."""
    best = None if known is None else {k: v for k, v in known.items() if k != "searched"}
    searched = set() if known is None else set(known["searched"])
    initial: float | None = None
    curve: list[float] | None = None

    def run(lrs: tuple[float, ...]) -> None:
        nonlocal best, initial, curve
        losses = (runner or run_population)(family, rule, lrs, seeds, steps, schedule, planned_horizon=planned)
        i, per_seed = tuned(losses)
        initial = losses[0, i].mean().item()  # the same for every lr: the iterate before the first step
        row = {
            "lr": lrs[i],
            "score": per_seed.mean().item(),
            "per_seed": per_seed.tolist(),
            "diverged": int((~torch.isfinite(per_seed) | (per_seed > initial)).sum()),
        }
        if best is None or row["score"] < best["score"]:
            best, curve = row, losses[:, i].median(dim=1).values.tolist()
        searched.update(lrs)

    new = tuple(lr for lr in wanted if lr not in searched)
    if new:
        run(new)
    while extend:
        assert best is not None
        low, high = min(searched), max(searched)
        if best["lr"] == high and high < LADDER[-1]:
            beyond = LADDER[LADDER.index(high) + 1]
        elif best["lr"] == low and low > LADDER[0]:
            beyond = LADDER[LADDER.index(low) - 1]
        else:
            break
        run((beyond,))
        if best["lr"] != beyond:
            break
    assert best is not None
    return (best | {"searched": sorted(searched)} if extend else best), initial, curve


def wall_clock(rule: UpdateRule, repeats: int = 7, steps: int = 20) -> dict[str, float]:
    """Median ms per training step (forward, backward, step) of an MLP 784-256-256-10, Adam vs the rule."""
    from lightning_meta.optim.optimizer import RuleOptimizer

    torch.manual_seed(0)
    x, y = torch.randn(128, 784), torch.randint(10, (128,))
    times: dict[str, list[float]] = {"adam": [], "rule": []}
    models = {}
    for name in times:
        models[name] = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    opts = {
        "adam": torch.optim.Adam(models["adam"].parameters(), lr=1e-3),
        "rule": RuleOptimizer(models["rule"].parameters(), rule, lr=1e-3, horizon=(repeats + 1) * steps),
    }
    for r in range(repeats + 1):
        for name in times:  # interleaved
            model, opt = models[name], opts[name]
            start = time.perf_counter()
            for _ in range(steps):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            if r:  # the first round warms up
                times[name].append((time.perf_counter() - start) / steps * 1e3)
    adam, lopt = statistics.median(times["adam"]), statistics.median(times["rule"])
    return {"adam_ms": adam, "rule_ms": lopt, "ratio": lopt / adam}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rule", default="celo2", help="pretrained entry to evaluate (load_pretrained name)")
    parser.add_argument(
        "--weights-dir", default=None, help="read <rule>.json/.pt from this folder instead of the shipped ones"
    )
    parser.add_argument("--init-rule", default="celo2", help="registry name of the rule's untrained initialisation")
    parser.add_argument("--horizon", type=int, default=None, help="meta-training horizon (default: from the .json)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", default=None, help="comma-separated subset of the held-out tasks")
    parser.add_argument(
        "--extended",
        action="store_true",
        help="also the slowest task, omniglot_mlp_20way (a 20-way MLP on 196-pixel images)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 tasks, horizon 20, 2 seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/bench", help="folder for the JSON results and the PNG")
    parser.add_argument("--no-wall-clock", action="store_true", help="skip the per-step timing")
    parser.add_argument(
        "--previous",
        default=None,
        help="a learned_optimizer_quality.json of the same horizon and seeds: reuse its adam, "
        "adam_cosine and learned_init rows (deterministic runs; a record tuned on the grid alone has their search "
        "carried past the grid's ends, running only the lrs it lacks), run the learned rule",
    )
    parser.add_argument(
        "--grid-only",
        action="store_true",
        help="tune the lrs on the grid alone, as records before the search at the grid's edges did",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="combine the results in these --out folders of runs over disjoint --tasks",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lightning_meta.optim.pretrained import _folder

    folder = Path(args.weights_dir) if args.weights_dir else _folder()
    meta_file = folder.joinpath(f"{args.rule}.json")
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    horizon = args.horizon or meta.get("meta_training", {}).get("max_horizon", 200)
    seeds = tuple(range(2 if args.quick else args.seeds))
    tasks = held_out_tasks(OMNIGLOT, args.extended)
    if args.tasks:
        tasks = {k: v for k, v in tasks.items() if k in args.tasks.split(",")}
    if args.quick:
        horizon, tasks = 20, dict(list(tasks.items())[:2])
    if args.weights_dir:
        learned = get_rule(meta["rule"], **meta.get("kwargs", {}))
        learned.load_state_dict(torch.load(folder / meta["weights"], weights_only=True))
    else:
        learned = load_pretrained(args.rule)
    if args.merge:
        return merge(args.merge, learned, args)
    optimizers = {
        "adam": (get_rule("adam"), "constant"),
        "adam_cosine": (get_rule("adam"), "cosine"),
        "learned": (learned, "constant"),
        "learned_init": (get_rule(args.init_rule), "constant"),
    }
    results: dict = {
        "rule": args.rule,
        "meta": {k: meta.get(k) for k in ("sha256", "command", "minutes")},
        "horizon": horizon,
        "seeds": len(seeds),
        "grid": GRID,
        "grid_extended": not args.grid_only,
        "tasks": {},
    }
    curves: dict = {}
    previous = json.loads(Path(args.previous).read_text()) if args.previous else None
    if previous is not None and (previous["horizon"], previous["seeds"]) != (horizon, len(seeds)):
        raise ValueError(
            f"--previous {args.previous}: horizon {previous['horizon']} and {previous['seeds']} seeds, "
            f"this run {horizon} and {len(seeds)}; rerun without --previous"
        )
    if previous is not None:
        results["previous"] = args.previous
        if args.grid_only and previous.get("grid_extended"):
            raise ValueError(f"--previous {args.previous} searched past the grid's ends; drop --grid-only")
    start_all, cpu_all = time.perf_counter(), time.process_time()
    for task_name, family in tasks.items():
        for mult in (1, 10):
            T = horizon * mult
            row, key = {}, f"{task_name}@{mult}x"
            for opt_name, (rule, schedule) in optimizers.items():
                known, old_curve = None, None
                if previous is not None and opt_name != "learned" and key in previous["tasks"]:
                    known = {k: v for k, v in previous["tasks"][key][opt_name].items() if k != "seconds"}
                    old_curve = previous.get("curves", {}).get(task_name, {}).get(opt_name) if mult == 10 else None
                    if rule.relative_lr or args.grid_only or "searched" in known:  # nothing left to search
                        row[opt_name] = known
                        if old_curve is not None:
                            curves.setdefault(task_name, {})[opt_name] = old_curve
                        continue
                    old_1x = previous["tasks"][f"{task_name}@1x"][opt_name]["lr"]  # a grid-only record's search
                    known |= {"searched": list(wanted_lrs(mult, old_1x))}
                if rule.relative_lr:  # sets its own step size: run as a user does, lr multiplier 1.0, no tuning
                    wanted: tuple[float, ...] = (1.0,)
                else:
                    lr_1x = results["tasks"][f"{task_name}@1x"][opt_name]["lr"] if mult != 1 else None
                    wanted = wanted_lrs(mult, lr_1x, GRID if args.grid_only else LADDER)
                found, _, curve = tune_lr(
                    family, rule, seeds, T, schedule, T, wanted, known, extend=not (args.grid_only or rule.relative_lr)
                )
                row[opt_name] = found
                if mult == 10 and (curve or old_curve) is not None:
                    curves.setdefault(task_name, {})[opt_name] = curve or old_curve
            results["tasks"][key] = row
            print(key, {k: (v["lr"], round(v["score"], 4), v["diverged"]) for k, v in row.items()}, flush=True)
    results["seconds_total"] = time.perf_counter() - start_all
    results["cpu_seconds_total"] = time.process_time() - cpu_all  # this process's CPU time (fair on a shared machine)
    results["curves"] = curves
    return finish(results, learned, args, Path(args.out))


def summarize(results: dict) -> dict:
    """Fraction of tasks where the learned rule's score beats each baseline's, and its divergences; the same for
    the rule's initialisation (``init_win_vs_*``: how much of the result needs no meta-training)."""
    summary = {}
    for mult in (1, 10):
        rows = [r for k, r in results["tasks"].items() if k.endswith(f"@{mult}x")]
        summary[f"{mult}x"] = (
            {
                f"win_vs_{b}": sum(r["learned"]["score"] < r[b]["score"] for r in rows) / len(rows)
                for b in ("adam", "adam_cosine", "learned_init")
            }
            | {
                f"init_win_vs_{b}": sum(r["learned_init"]["score"] < r[b]["score"] for r in rows) / len(rows)
                for b in ("adam", "adam_cosine")
            }
            | {
                "learned_diverged_runs": sum(r["learned"]["diverged"] for r in rows),
                "init_diverged_runs": sum(r["learned_init"]["diverged"] for r in rows),
                "tasks": len(rows),
            }
        )
    return summary


def markdown_table(results: dict) -> str:
    """One row per task and horizon: each optimizer's score (mean over seeds) at its tuned lr."""
    names = ("adam", "adam_cosine", "learned", "learned_init")
    lines = [
        "| task @ horizon | " + " | ".join(f"{n} (lr)" for n in names) + " | learned wins vs |",
        "| --- | " + " | ".join("---" for _ in names) + " | --- |",
    ]
    for key, row in results["tasks"].items():
        wins = [n for n in ("adam", "adam_cosine", "learned_init") if row["learned"]["score"] < row[n]["score"]]
        cells = [
            f"{row[n]['score']:.4g} ({row[n]['lr']:g})" + (f" {row[n]['diverged']} div" if row[n]["diverged"] else "")
            for n in names
        ]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {', '.join(wins) or '-'} |")
    return "\n".join(lines)


def finish(results: dict, learned: UpdateRule, args: argparse.Namespace, out: Path) -> dict:
    results["summary"] = summarize(results)
    print(markdown_table(results))
    if not args.no_wall_clock:
        results["wall_clock"] = wall_clock(learned)
    print(
        json.dumps(
            {
                "summary": results["summary"],
                "wall_clock": results.get("wall_clock"),
                "seconds_total": results.get("seconds_total"),
                "cpu_seconds_total": results.get("cpu_seconds_total"),
            },
            indent=2,
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (out / f"learned_optimizer_quality{suffix}.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results["curves"], out / f"learned_optimizer_quality{suffix}.png", results["horizon"] * 10)
    return results


def merge(folders: list[str], learned: UpdateRule, args: argparse.Namespace) -> dict:
    """Combines the JSON results of runs over disjoint task subsets (``--tasks``) into one report."""
    name = "learned_optimizer_quality_quick.json" if args.quick else "learned_optimizer_quality.json"
    parts = [json.loads((Path(f) / name).read_text()) for f in folders]
    results = {k: v for k, v in parts[0].items() if k not in ("tasks", "curves", "summary", "wall_clock")}
    results["tasks"] = {k: v for p in parts for k, v in p["tasks"].items()}
    results["curves"] = {k: v for p in parts for k, v in p["curves"].items()}
    results["seconds_total"] = sum(p["seconds_total"] for p in parts)
    results["cpu_seconds_total"] = sum(p.get("cpu_seconds_total", math.nan) for p in parts)
    results["merged_from"] = folders
    return finish(results, learned, args, Path(args.out))


def plot(curves: dict, path: Path, steps: int) -> None:
    """Median-over-seeds training loss at each optimizer's tuned lr, at 10x the meta-training horizon."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot")
        return
    n = len(curves)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (task, by_opt) in zip(axes.flat, curves.items()):
        for name, values in by_opt.items():
            v = torch.tensor(values)
            k = max(1, len(v) // 50)  # moving average for readability
            smooth = torch.nn.functional.avg_pool1d(v.view(1, 1, -1), k, stride=1).view(-1) if k > 1 else v
            ax.plot(range(len(smooth)), smooth.tolist(), label=name)
        ax.set_yscale("log")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"training loss, {steps} steps (10x meta-training horizon), tuned lr, median of seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
