"""Rebuild ``docs/RESULTS.md`` from result JSON files, with the published numbers of docs/algorithms/ alongside.

Every figure in ``docs/results/*.json`` comes from a run whose budget its command fixes: a number of optimizer
steps (``bench_accuracy.py --steps``), reached in full (``"complete": true``); CPU and wall time are recorded
beside it, with the commit and the machine's CPU, but they did not decide when training stopped. Files that lack
these keys, or record an incomplete run, are refused. Older figures, whose budget was CPU minutes under a
wall-clock cap (so the same command trained different amounts on different days), live in
``docs/results/history/`` and are rendered only in a separate, labelled history section.

Result schema (one JSON object per file in ``docs/results/*.json``; small, committed)::

    {
      "dataset": "omniglot" | "mini_imagenet" | "tiered_imagenet" | "cifar_fs" | "fc100" | "sinusoid",
      "setting": "5w1s" (classification: N-way K-shot) | "10-shot" (sinusoid),
      "algorithm": "MAML" | "FOMAML" | "ANIL" | "MetaSGD" | "ProtoNet" | "CAML" | "LEO" | "SNAIL",
      "metric": "acc" (fraction in [0, 1]) | "mse",
      "mean": 0.953, "ci95": 0.006,       # 95% CI half-width, 1.96 * std / sqrt(episodes)
      "episodes": 600,                    # fixed, seeded test episodes
      "command": "python benchmarks/bench_accuracy.py --algo maml ...",   # exactly what produced it
      "config": "examples/configs/maml_omniglot_5w1s.yaml" or {...},     # path or the full settings
      "protocol": "seeded split of images_background_small1+2, Q=15 at test, transductive BN",
      "budget": "12,000 optimizer steps (96,000 tasks)",                 # how much training it had
      "date": "2026-11-23 13:45 UTC",
      # required in docs/results/*.json (not in history/):
      "complete": true, "steps": 12000, "tasks_seen": 96000,
      "cpu_seconds": 1830.2, "wall_seconds": 4410.5,                      # of training; reported, not the budget
      "commit": "035917a...", "cpu_model": "AMD EPYC", "cpu_threads": 2, "torch_threads": 1,
      "seed": 0, "group": "<the command without --seed and --name>"       # runs of one group differ only in seed
    }

``--collect`` first converts the records that ``benchmarks/bench_accuracy.py`` writes
(``.bench/accuracy/<name>/result.json``) into that schema under ``docs/results/`` (runs with fewer than
``--min-episodes`` test episodes, i.e. smoke runs, validation pilots, incomplete runs and records of the old
CPU-minute protocol are skipped, each with a line saying why). Then the tables are rebuilt: one per dataset,
each row a group of runs that differ only in their seed, with the mean and spread across seeds beside each run's
``mean ± 95% CI`` over test episodes, its command, protocol, budget and machine.

    python benchmarks/build_results.py --collect     # .bench records -> docs/results/*.json -> docs/RESULTS.md
    python benchmarks/build_results.py               # docs/results/*.json -> docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PUBLISHED", "SOURCES", "build", "collect_bench_accuracy", "load_results", "main", "render", "seed_groups"]

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "docs" / "results"
OUT = REPO / "docs" / "RESULTS.md"
HISTORY_DIR = RESULTS_DIR / "history"
REQUIRED = ("dataset", "setting", "algorithm", "metric", "mean", "ci95", "episodes", "command")
#: Keys a current (step-budget) figure must have on top of ``REQUIRED``.
REQUIRED_CURRENT = ("complete", "steps", "cpu_seconds", "wall_seconds", "commit", "cpu_model", "cpu_threads")
#: bench_accuracy's default --data-dir (relative to the repository root); left out of the commands.
DEFAULT_DATA_DIR = "../shared/data/omniglot"
DATASETS = {
    "omniglot": "Omniglot",
    "mini_imagenet": "miniImageNet",
    "tiered_imagenet": "tieredImageNet",
    "cifar_fs": "CIFAR-FS",
    "fc100": "FC100",
    "sinusoid": "Sinusoid regression (MSE, lower is better)",
}

#: what each source key of ``PUBLISHED`` stands for (rendered under the tables); "2°" = read in a secondary source.
SOURCES: dict[str, str] = {
    "F17": "Finn, Abbeel, Levine, ICML 2017 (MAML), Table 1 and the miniImageNet table",
    "REP": "Nichol, Achiam, Schulman 2018 (Reptile), as quoted in the iMAML paper's Omniglot table",
    "MSGD": "Li et al. 2017 (Meta-SGD)",
    "ANIL": "Raghu et al., ICLR 2020 (ANIL)",
    "SN-e": "Mishra et al., ICLR 2018 (SNAIL)",
    "PN-p": "Snell, Swersky, Zemel, NeurIPS 2017 (Prototypical Networks), the paper's tables",
    "CAV-p": "Zintgraf et al., ICML 2019 (CAVIA), the paper's miniImageNet table",
    "LEO-p": "Rusu et al., ICLR 2019 (LEO), the paper's tables",
    "MON": "Lee et al., CVPR 2019 (MetaOptNet), Tables 1-2",
    "L2L": "learn2learn's reproductions (its ANIL examples)",
    "TNAS": "as printed by the T-NAS paper, Table 4 (provenance unclear)",
    "M++": "Antoniou, Edwards, Storkey, ICLR 2019 (MAML++), via the paper's Papers with Code listing",
    "iM": "Rajeswaran et al., NeurIPS 2019 (iMAML), the paper's Omniglot table",
    "MN": "Vinyals et al., NeurIPS 2016 (Matching Networks), as quoted in Table 1 of Snell et al. 2017",
}

#: the published numbers of docs/algorithms/, as printed there (accuracy in %, or MSE), with the source key.
PUBLISHED: dict[tuple[str, str, str], str] = {
    ("omniglot", "5w1s", "MAML"): "98.7 ± 0.4 [F17]",
    ("omniglot", "5w5s", "MAML"): "99.9 ± 0.1 [F17]",
    ("omniglot", "20w1s", "MAML"): "95.8 ± 0.3 [F17]",
    ("omniglot", "20w5s", "MAML"): "98.9 ± 0.2 [F17]",
    ("omniglot", "5w1s", "MAML++"): "99.47 [M++ 2°]",
    ("omniglot", "20w1s", "MAML++"): "97.65 [M++ 2°]",
    ("omniglot", "5w1s", "Reptile"): "97.68 ± 0.04 (+transduction) [REP 2°]",
    ("omniglot", "5w1s", "iMAML"): "99.16 ± 0.35 (GD inner loop) [iM]",
    ("omniglot", "20w1s", "iMAML"): "94.46 ± 0.42 (GD inner loop) [iM]",
    ("omniglot", "5w1s", "MatchingNets"): "98.1 [MN 2°]",
    ("omniglot", "20w1s", "MatchingNets"): "93.8 [MN 2°]",
    ("omniglot", "5w1s", "FOMAML"): "98.3 ± 0.5 (+transduction) [REP 2°]",
    ("omniglot", "20w1s", "FOMAML"): "89.4 ± 0.5 (+transduction) [REP 2°]",
    ("omniglot", "5w1s", "MetaSGD"): "99.53 ± 0.26 [MSGD 2°]",
    ("omniglot", "5w5s", "MetaSGD"): "99.93 ± 0.09 [MSGD 2°]",
    ("omniglot", "20w1s", "MetaSGD"): "95.93 ± 0.38 [MSGD 2°]",
    ("omniglot", "20w1s", "ANIL"): "96.2 ± 0.5 [ANIL 2°]",
    ("omniglot", "5w1s", "SNAIL"): "99.07 [SN-e 2°]",
    ("omniglot", "5w5s", "SNAIL"): "99.78 [SN-e 2°]",
    ("omniglot", "5w1s", "ProtoNet"): "98.8 [PN-p]",
    ("omniglot", "5w5s", "ProtoNet"): "99.7 [PN-p]",
    ("omniglot", "20w1s", "ProtoNet"): "96.0 [PN-p]",
    ("omniglot", "20w5s", "ProtoNet"): "98.9 [PN-p]",
    ("mini_imagenet", "5w1s", "MAML"): "48.70 ± 1.84 [F17]",
    ("mini_imagenet", "5w5s", "MAML"): "63.11 ± 0.92 [F17]",
    ("mini_imagenet", "5w1s", "FOMAML"): "48.07 ± 1.75 [F17]",
    ("mini_imagenet", "5w5s", "FOMAML"): "63.15 ± 0.91 [F17]",
    ("mini_imagenet", "5w1s", "MetaSGD"): "50.47 ± 1.87 [MSGD 2°]",
    ("mini_imagenet", "5w5s", "MetaSGD"): "64.03 ± 0.94 [MSGD 2°]",
    ("mini_imagenet", "5w1s", "ANIL"): "46.7 ± 0.4 [ANIL 2°]",
    ("mini_imagenet", "5w5s", "ANIL"): "61.5 ± 0.5 [ANIL 2°]",
    ("mini_imagenet", "5w1s", "CAML"): "47.24 ± 0.65 (32 filters) [CAV-p 2°]",
    ("mini_imagenet", "5w5s", "CAML"): "59.05 ± 0.54 (32 filters) [CAV-p 2°]",
    ("mini_imagenet", "5w1s", "SNAIL"): "55.71 ± 0.99 [LEO-p, MON]",
    ("mini_imagenet", "5w5s", "SNAIL"): "68.88 ± 0.92 [LEO-p, MON]",
    ("mini_imagenet", "5w1s", "LEO"): "61.76 ± 0.08 [LEO-p]",
    ("mini_imagenet", "5w5s", "LEO"): "77.59 ± 0.12 [LEO-p]",
    ("mini_imagenet", "5w1s", "ProtoNet"): "49.42 ± 0.78 [PN-p]",
    ("mini_imagenet", "5w5s", "ProtoNet"): "68.20 ± 0.66 [PN-p]",
    ("tiered_imagenet", "5w1s", "LEO"): "66.33 ± 0.05 [LEO-p]",
    ("tiered_imagenet", "5w5s", "LEO"): "81.44 ± 0.09 [LEO-p]",
    ("tiered_imagenet", "5w1s", "MAML"): "51.67 ± 1.81 [MON]",
    ("tiered_imagenet", "5w5s", "MAML"): "70.30 ± 1.75 [MON]",
    ("tiered_imagenet", "5w1s", "ProtoNet"): "53.31 ± 0.89 [MON]",
    ("tiered_imagenet", "5w5s", "ProtoNet"): "72.69 ± 0.74 [MON]",
    ("cifar_fs", "5w1s", "MAML"): "58.9 ± 1.9 [MON]",
    ("cifar_fs", "5w5s", "MAML"): "71.5 ± 1.0 [MON]",
    ("cifar_fs", "5w5s", "ANIL"): "68.3 [L2L]",
    ("cifar_fs", "5w1s", "ProtoNet"): "55.5 ± 0.7 [MON]",
    ("cifar_fs", "5w5s", "ProtoNet"): "72.0 ± 0.6 [MON]",
    ("fc100", "5w1s", "MAML"): "38.1 ± 1.7 [TNAS]",
    ("fc100", "5w5s", "MAML"): "50.4 ± 1.0 [TNAS]",
    ("fc100", "5w5s", "ANIL"): "47.6 [L2L]",
    ("fc100", "5w1s", "ProtoNet"): "35.3 ± 0.6 [MON]",
    ("fc100", "5w5s", "ProtoNet"): "48.6 ± 0.6 [MON]",
    ("sinusoid", "5-shot", "MAML"): "0.35 after 10 steps (K=5 fine-tuning, App. C Table 2) [F17]",
}

_BENCH_ALGOS = {
    "maml": ("MAML", "omniglot"),
    "maml_pp": ("MAML++", "omniglot"),
    "reptile": ("Reptile", "omniglot"),
    "imaml": ("iMAML", "omniglot"),
    "matching": ("MatchingNets", "omniglot"),
    "proto_maml": ("Proto-MAML", "omniglot"),
    "protonet": ("ProtoNet", "omniglot"),
    "maml-sinusoid": ("MAML", "sinusoid"),
}

#: bench_accuracy's switches that are on by default (``--x/--no-x``), so a run with ``False`` shows ``--no-x``
_DEFAULT_ON = frozenset({"bn_stats"})


def _relative_data_dir(value: str) -> str:
    """``data_dir`` as given when relative; an absolute path made relative to the repository (no machine paths)."""
    if not os.path.isabs(value):
        return value
    return os.path.relpath(value, REPO)


def collect_bench_accuracy(bench_dir: Path, out_dir: Path, min_episodes: int = 100) -> list[Path]:
    """Convert ``bench_accuracy.py`` records (``<bench_dir>/*/result.json``) to the schema; returns written files.

    Only complete step-budget runs scored on the test split with at least ``min_episodes`` episodes become
    figures; every other record is skipped with a printed reason.
    """
    written = []
    for path in sorted(bench_dir.glob("*/result.json")):
        rec = json.loads(path.read_text())
        algo, cfg = rec.get("algo"), dict(rec.get("config", {}))
        name = path.parent.name
        reason = None
        if algo not in _BENCH_ALGOS:
            reason = f"algo {algo!r} is not one of {sorted(_BENCH_ALGOS)}"
        elif rec.get("test_episodes", 0) < min_episodes:
            reason = f"{rec.get('test_episodes', 0)} test episodes < --min-episodes {min_episodes} (a smoke run)"
        elif rec.get("scored_split", "test") != "test":
            reason = "scored on validation characters (a pilot)"
        elif "complete" not in rec or "steps_budget" not in rec:
            reason = "a CPU-minute-budget record of the old protocol (no step budget); rerun it with --steps"
        elif not rec["complete"]:
            reason = (
                f"INCOMPLETE: {rec.get('optimizer_steps')} of {rec['steps_budget']} optimizer steps (stopped by "
                "a wall-clock cap or interrupted); not a figure of its budget"
            )
        if reason:
            print(f"skipped {path}: {reason}")
            continue
        algorithm, dataset = _BENCH_ALGOS[algo]
        if algorithm == "MAML" and cfg.get("first_order"):
            algorithm = "FOMAML"
        if "data_dir" in cfg:
            cfg["data_dir"] = _relative_data_dir(str(cfg["data_dir"]))
        regression = dataset == "sinusoid"
        metric = "mse" if regression else "acc"

        def flags(skip: tuple[str, ...], cfg: dict[str, Any] = cfg) -> str:
            def flag(k: str, v: Any) -> str:
                if isinstance(v, bool):  # on by default: only its --no- form changes the run
                    return f"--{'' if v else 'no-'}{k.replace('_', '-')}"
                return f"--{k.replace('_', '-')} {shlex.quote(str(v))}"

            return " ".join(
                flag(k, v)
                for k, v in cfg.items()
                if v is not None
                and (v is not False or k in _DEFAULT_ON)
                and k not in skip
                and not (k == "data_dir" and v == DEFAULT_DATA_DIR)
            )

        env = "".join(f"{k}={v} " for k, v in sorted(rec.get("env", {}).items()))
        steps, cpu, wall = rec["optimizer_steps"], rec.get("train_cpu_seconds"), rec.get("train_seconds")
        budget = f"{steps:,} optimizer steps ({rec.get('tasks_seen', 0):,} tasks)"
        if regression:
            setting = f"{cfg.get('shots')}-shot"
            protocol = (
                f"MAML task family, {rec.get('scored_on')}, {cfg.get('eval_inner_steps')} inner steps at test, "
                f"inner lr {cfg.get('inner_lr')}"
            )
        else:
            setting = f"{cfg.get('ways')}w{cfg.get('shots')}s"
            train_ways = cfg.get("train_ways") or cfg.get("ways")
            train_shots = f" {cfg['train_shots']}-shot" if cfg.get("train_shots") else ""
            metric_only = algorithm in ("ProtoNet", "MatchingNets")
            protocol = (
                f"seeded 70/10/20 character split of images_background_small1+2 (242 characters, rotations as "
                f"classes), {train_ways}-way{train_shots} training, Q={cfg.get('eval_queries')} at test, "
                + (
                    "per-step running-stat BN, "
                    if cfg.get("bn_stats")
                    else ("running-stat BN, " if metric_only else "transductive BN, ")
                )
                + ("no adaptation" if metric_only else f"{cfg.get('eval_inner_steps')} inner steps at test")
                + (", zeroing trick (head weight zero at every inner loop)" if cfg.get("zero_init") else "")
                + (f", training images shifted by up to {cfg['train_shift']} px" if cfg.get("train_shift") else "")
                + (f", only {cfg['train_characters']} training characters" if cfg.get("train_characters") else "")
            )
        if cfg.get("cosine_to") is not None:
            protocol += f", outer lr cosine over the steps to {cfg['cosine_to']}x"
        record = {
            "dataset": dataset,
            "setting": setting,
            "algorithm": algorithm,
            "metric": metric,
            "mean": rec[f"test_{metric}_mean"],
            "ci95": rec[f"test_{metric}_ci95"],
            "episodes": rec["test_episodes"],
            "command": env + f"python benchmarks/bench_accuracy.py {flags(())}",
            "config": cfg,
            "protocol": protocol,
            "budget": budget,
            "date": rec.get("date", ""),
            "complete": True,
            "steps": steps,
            "tasks_seen": rec.get("tasks_seen"),
            "cpu_seconds": cpu,
            "wall_seconds": wall,
            "commit": rec.get("commit", "unknown"),
            "cpu_model": rec.get("cpu_model", "unknown"),
            "cpu_threads": rec.get("cpu_threads"),
            "torch_threads": rec.get("torch_threads", cfg.get("threads")),
            "seed": cfg.get("seed"),
            "group": env + f"python benchmarks/bench_accuracy.py {flags(('seed', 'name'))}",
            "source": name,
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        dest = out_dir / f"{name}.json"
        dest.write_text(json.dumps(record, indent=1) + "\n")
        written.append(dest)
    return written


def load_results(folder: Path, *, history: bool = False) -> list[dict[str, Any]]:
    """Every ``*.json`` of ``folder`` checked against the schema (problems raise, naming the file).

    Current figures (``history=False``) must also carry ``REQUIRED_CURRENT`` and be complete runs.
    """
    results = []
    for path in sorted(folder.glob("*.json")):
        rec = json.loads(path.read_text())
        missing = [k for k in REQUIRED + (() if history else REQUIRED_CURRENT) if k not in rec]
        if missing:
            hint = "; a figure without a step budget belongs in docs/results/history/" if not history else ""
            raise ValueError(f"{path} lacks {missing}; see the schema in benchmarks/build_results.py{hint}")
        if rec["dataset"] not in DATASETS:
            raise ValueError(f"{path}: dataset={rec['dataset']!r}; use one of {sorted(DATASETS)}")
        if rec["metric"] not in ("acc", "mse"):
            raise ValueError(f"{path}: metric={rec['metric']!r}; use 'acc' or 'mse'")
        if not history and rec["complete"] is not True:
            raise ValueError(
                f"{path} records an incomplete run ({rec['steps']} steps); it is not a figure: "
                "rerun it to its full --steps, or delete the file"
            )
        config = json.dumps(rec.get("config", ""))
        if not history and ('"/' in config or '"data_dir": "/' in config):
            raise ValueError(
                f"{path}: its config holds an absolute path of the machine; write paths as given "
                "or relative to the repository"
            )
        rec["_file"] = path.name
        results.append(rec)
    return results


def seed_groups(results: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Runs grouped by everything but their seed (key ``group``, else the command): one table row per group."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in results:
        key = (rec["dataset"], rec["setting"], rec["algorithm"], rec.get("group", rec["command"]))
        groups.setdefault(key, []).append(rec)
    return [sorted(g, key=lambda r: (r.get("seed") is None, r.get("seed"), r.get("date", ""))) for g in groups.values()]


def _scale(rec: dict[str, Any]) -> tuple[float, int]:
    return (100.0, 2) if rec["metric"] == "acc" else (1.0, 3)


def _fmt(rec: dict[str, Any]) -> str:
    k, d = _scale(rec)
    return f"{k * rec['mean']:.{d}f} ± {k * rec['ci95']:.{d}f}"


def _fmt_group(group: list[dict[str, Any]]) -> str:
    """One run: ``mean ± CI``. Several seeds: the mean across seeds, their standard deviation, each run's CI."""
    if len(group) == 1:
        return f"**{_fmt(group[0])}**"
    k, d = _scale(group[0])
    means = [r["mean"] for r in group]
    mean = sum(means) / len(means)
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (len(means) - 1))
    runs = ", ".join(f"{_fmt(r)} (seed {r.get('seed')})" for r in group)
    return f"**{k * mean:.{d}f}** (sd {k * sd:.{d}f} across {len(group)} seeds; runs: {runs})"


def _minutes(seconds: list[float]) -> str:
    vals = [s / 60 for s in seconds if s is not None]
    if not vals:
        return "?"
    return f"{min(vals):.0f}" if round(min(vals)) == round(max(vals)) else f"{min(vals):.0f}–{max(vals):.0f}"


def _config(rec: dict[str, Any]) -> str:
    cfg = rec.get("config")
    if isinstance(cfg, str):
        return f"`{cfg}`"
    return f"in [`docs/results/{rec['_file']}`](results/{rec['_file']})"


def _history_config(rec: dict[str, Any]) -> str:
    cfg = rec.get("config")
    if isinstance(cfg, str):
        return f"`{cfg}`"
    return f"in [`docs/results/history/{rec['_file']}`](results/history/{rec['_file']})"


HEADER = [
    "# Results",
    "",
    "Generated by `python benchmarks/build_results.py` from `docs/results/*.json`; do not edit by hand.",
    "",
    "**Protocol.** Each run trains for a fixed number of optimizer steps that its command sets",
    "(`benchmarks/bench_accuracy.py --steps N`), so rerunning the command repeats the experiment on any machine.",
    "CPU time and wall time of training are recorded beside each figure with the commit and the CPU, but they do",
    "not stop training. A run stopped before its step budget (an optional `--max-wall-minutes` cap, an",
    "interrupt) is marked incomplete and never becomes a figure. The default budgets take about 30 CPU-min",
    "(MAML, 12,000 steps), 6 CPU-min (ProtoNet, 3,000 steps) and 2 CPU-min (sinusoid, 10,000 steps) on one",
    "quiet core. A row with several seeds gives the mean across seeds in bold, the standard deviation across",
    "seeds, and each run's mean ± 95% confidence interval (1.96·std/√n over fixed, seeded test episodes);",
    "compare algorithms only at equal steps, and preferably in runs of the same session. Accuracy in %.",
    "",
    "These budgets are far shorter than the papers' (e.g. MAML: 60,000 iterations of 32 tasks), so they show",
    "that training works and how far it gets, not that the published numbers are reproduced. Published",
    "numbers are those of the algorithm pages (docs/algorithms/), with their source keys (2° = read in a",
    "secondary source). Protocols differ between rows and papers (split, queries at test, BN mode), and each row",
    "states its own. Variable-way episodes and the cross-domain runs are in docs/bench/real_world.md.",
    "",
]


def render(results: list[dict[str, Any]], history: list[dict[str, Any]] | None = None) -> str:
    """The Markdown of ``docs/RESULTS.md``: current figures per dataset, then the history section."""
    lines = list(HEADER)
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for rec in results:
        by_dataset.setdefault(rec["dataset"], []).append(rec)
    for key, title in DATASETS.items():
        groups = sorted(
            seed_groups(by_dataset.get(key, [])),
            key=lambda g: (g[0]["setting"], g[0]["algorithm"], g[0].get("date", "")),
        )
        lines += [f"## {title}", ""]
        if not groups:
            published = sorted((s, a, v) for (d, s, a), v in PUBLISHED.items() if d == key)
            lines.append(
                (
                    "No lightning-meta run recorded yet. Published: "
                    + "; ".join(f"{a} {s} {v}" for s, a, v in published)
                    + "."
                )
                if published
                else "No lightning-meta run recorded yet."
            )
            lines.append("")
            continue
        lines += [
            (
                "| Algorithm | Setting | lightning-meta | Episodes | Budget (CPU / wall min of training) | "
                "Machine, commit | Published | Protocol |"
            ),
            "|---|---|---|---|---|---|---|---|",
        ]
        for group in groups:
            rec = group[0]
            pub = PUBLISHED.get((key, rec["setting"], rec["algorithm"]), "–")
            commits = ", ".join(
                sorted({str(r["commit"])[:7] + ("+dirty" if "dirty" in str(r["commit"]) else "") for r in group})
            )
            machine = (
                f"{rec['cpu_model']}, {rec['cpu_threads']} threads ({rec.get('torch_threads', '?')} used); {commits}"
            )
            budget = (
                f"{rec.get('budget', '–')}; {_minutes([r['cpu_seconds'] for r in group])} CPU-min, "
                f"{_minutes([r['wall_seconds'] for r in group])} wall-min"
            )
            lines.append(
                f"| {rec['algorithm']} | {rec['setting']} | {_fmt_group(group)} | {rec['episodes']} | "
                f"{budget} | {machine} | {pub} | {rec.get('protocol', '–')} |"
            )
        lines += ["", "Commands (the seeds of a row differ only in `--seed` and `--name`):", ""]
        for group in groups:
            for rec in group:
                lines.append(
                    f"- {rec['algorithm']} {rec['setting']}, seed {rec.get('seed')} ({rec.get('date', '')}): "
                    f"`{rec['command']}`; config {_config(rec)}"
                )
        lines.append("")
    lines += ["## Sources of the published figures", ""]
    lines += [f"- [{key}]: {text}" for key, text in SOURCES.items()]
    lines.append("")
    if history:
        lines += [
            "## History: CPU-minute budgets (superseded)",
            "",
            "Figures of the earlier protocol, kept as history only: each run trained for N minutes of CPU time",
            "under a wall-clock cap, so its command does not fix how much it trained (the recorded steps depended",
            "on the machine's load, and a cap could cut a run short: the ProtoNet row below stopped at 1,065 steps",
            "of an intended 30 CPU-min). Do not compare them with the figures above or with each other as if at",
            "equal budget. The `--minutes` flag of their commands no longer exists.",
            "",
            "| Dataset | Algorithm | Setting | lightning-meta | Episodes | Budget | Protocol |",
            "|---|---|---|---|---|---|---|",
        ]
        rows = sorted(
            history, key=lambda r: (list(DATASETS).index(r["dataset"]), r["setting"], r["algorithm"], r.get("date", ""))
        )
        for rec in rows:
            lines.append(
                f"| {DATASETS[rec['dataset']].split(' (')[0]} | {rec['algorithm']} | {rec['setting']} | "
                f"{_fmt(rec)} | {rec['episodes']} | {rec.get('budget', '–')} | {rec.get('protocol', '–')} |"
            )
        lines += ["", "Commands:", ""]
        for rec in rows:
            lines.append(
                f"- {rec['algorithm']} {rec['setting']} ({rec.get('date', '')}): `{rec['command']}`; "
                f"config {_history_config(rec)}"
            )
        lines.append("")
    return "\n".join(lines)


def build(results_dir: Path = RESULTS_DIR, out: Path = OUT, history_dir: Path | None = None) -> Path:
    """Write ``out`` from the results in ``results_dir`` (and the history in ``history_dir``, default its ``history/``)."""
    history_dir = results_dir / "history" if history_dir is None else history_dir
    history = load_results(history_dir, history=True) if history_dir.is_dir() else []
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(load_results(results_dir), history))
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--collect", action="store_true", help="first convert .bench/accuracy/*/result.json")
    p.add_argument("--bench-dir", type=Path, default=REPO / ".bench" / "accuracy")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--min-episodes", type=int, default=100, help="skip collected runs with fewer test episodes")
    args = p.parse_args(argv)
    if args.collect:
        for path in collect_bench_accuracy(args.bench_dir, args.results_dir, args.min_episodes):
            print(f"collected {path}")
    out = build(args.results_dir, args.out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
