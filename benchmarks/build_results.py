"""Rebuild ``docs/RESULTS.md`` from result JSON files, with the published numbers of docs/algorithms/ alongside.

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
      "budget": "30 CPU-min, 2,345 optimizer steps",                     # how much training it had
      "date": "2026-11-23 13:45 UTC"
    }

``--collect`` first converts the records that ``benchmarks/bench_accuracy.py`` writes
(``.bench/accuracy/<name>/result.json``) into that schema under ``docs/results/`` (runs with fewer than
``--min-episodes`` test episodes, i.e. smoke runs, are skipped). Then the tables are rebuilt: one per
dataset, each entry ``mean ± 95% CI`` with its command, config, protocol and training budget.

    python benchmarks/build_results.py --collect     # .bench records -> docs/results/*.json -> docs/RESULTS.md
    python benchmarks/build_results.py               # docs/results/*.json -> docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any, Sequence

__all__ = ["PUBLISHED", "build", "collect_bench_accuracy", "load_results", "main", "render"]

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "docs" / "results"
OUT = REPO / "docs" / "RESULTS.md"
REQUIRED = ("dataset", "setting", "algorithm", "metric", "mean", "ci95", "episodes", "command")
DATASETS = {
    "omniglot": "Omniglot",
    "mini_imagenet": "miniImageNet",
    "tiered_imagenet": "tieredImageNet",
    "cifar_fs": "CIFAR-FS",
    "fc100": "FC100",
    "sinusoid": "Sinusoid regression (MSE, lower is better)",
}

#: the published numbers of docs/algorithms/, as printed there (accuracy in %, or MSE), with the source key.
PUBLISHED: dict[tuple[str, str, str], str] = {
    ("omniglot", "5w1s", "MAML"): "98.7 ± 0.4 [F17]",
    ("omniglot", "5w5s", "MAML"): "99.9 ± 0.1 [F17]",
    ("omniglot", "20w1s", "MAML"): "95.8 ± 0.3 [F17]",
    ("omniglot", "20w5s", "MAML"): "98.9 ± 0.2 [F17]",
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

_BENCH_ALGOS = {"maml": ("MAML", "omniglot"), "protonet": ("ProtoNet", "omniglot"), "maml-sinusoid": ("MAML", "sinusoid")}


def collect_bench_accuracy(bench_dir: Path, out_dir: Path, min_episodes: int = 100) -> list[Path]:
    """Convert ``bench_accuracy.py`` records (``<bench_dir>/*/result.json``) to the schema; returns written files."""
    written = []
    for path in sorted(bench_dir.glob("*/result.json")):
        rec = json.loads(path.read_text())
        algo, cfg = rec.get("algo"), rec.get("config", {})
        if algo not in _BENCH_ALGOS or rec.get("test_episodes", 0) < min_episodes:
            continue
        if rec.get("scored_split", "test") != "test":  # a pilot scored on validation characters
            continue
        algorithm, dataset = _BENCH_ALGOS[algo]
        if algorithm == "MAML" and cfg.get("first_order"):
            algorithm = "FOMAML"
        regression = dataset == "sinusoid"
        metric = "mse" if regression else "acc"
        flags = [f"--{k.replace('_', '-')} {shlex.quote(str(v))}" if not isinstance(v, bool) else f"--{k.replace('_', '-')}"
                 for k, v in cfg.items() if v is not None and v is not False and k != "data_dir"]
        steps, cpu = rec.get("optimizer_steps"), rec.get("train_cpu_seconds")
        budget = (f"{cpu / 60:.0f} CPU-min, " if cpu else "") + f"{steps:,} optimizer steps ({rec.get('tasks_seen', 0):,} tasks)"
        if regression:
            setting = f"{cfg.get('shots')}-shot"
            protocol = (f"MAML task family, {rec.get('scored_on')}, {cfg.get('eval_inner_steps')} inner steps at test, "
                        f"inner lr {cfg.get('inner_lr')}")
        else:
            setting = f"{cfg.get('ways')}w{cfg.get('shots')}s"
            train_ways = cfg.get("train_ways") or cfg.get("ways")
            protocol = (f"seeded 70/10/20 character split of images_background_small1+2 (242 characters, rotations as "
                        f"classes), {train_ways}-way training, Q={cfg.get('eval_queries')} at test, "
                        + ("transductive BN, " if algorithm != "ProtoNet" else "running-stat BN, ")
                        + (f"{cfg.get('eval_inner_steps')} inner steps at test" if algorithm != "ProtoNet" else "no adaptation")
                        + (", zeroing trick (head weight zero at every inner loop)" if cfg.get("zero_init") else ""))
        record = {
            "dataset": dataset, "setting": setting, "algorithm": algorithm, "metric": metric,
            "mean": rec[f"test_{metric}_mean"], "ci95": rec[f"test_{metric}_ci95"], "episodes": rec["test_episodes"],
            "command": "".join(f"{k}={v} " for k, v in sorted(rec.get("env", {}).items()))
            + f"python benchmarks/bench_accuracy.py {' '.join(flags)}",
            "config": cfg, "protocol": protocol, "budget": budget, "date": rec.get("date", ""),
            "source": str(path.relative_to(bench_dir.parent.parent)) if bench_dir.parent.parent in path.parents else str(path),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        dest = out_dir / f"{path.parent.name}.json"
        dest.write_text(json.dumps(record, indent=1) + "\n")
        written.append(dest)
    return written


def load_results(folder: Path) -> list[dict[str, Any]]:
    """Every ``*.json`` of ``folder`` checked against the schema (missing keys raise, naming the file)."""
    results = []
    for path in sorted(folder.glob("*.json")):
        rec = json.loads(path.read_text())
        missing = [k for k in REQUIRED if k not in rec]
        if missing:
            raise ValueError(f"{path} lacks {missing}; see the schema in benchmarks/build_results.py")
        if rec["dataset"] not in DATASETS:
            raise ValueError(f"{path}: dataset={rec['dataset']!r}; use one of {sorted(DATASETS)}")
        if rec["metric"] not in ("acc", "mse"):
            raise ValueError(f"{path}: metric={rec['metric']!r}; use 'acc' or 'mse'")
        rec["_file"] = path.name
        results.append(rec)
    return results


def _fmt(rec: dict[str, Any]) -> str:
    if rec["metric"] == "acc":
        return f"{100 * rec['mean']:.2f} ± {100 * rec['ci95']:.2f}"
    return f"{rec['mean']:.3f} ± {rec['ci95']:.3f}"


def _config(rec: dict[str, Any]) -> str:
    cfg = rec.get("config")
    if isinstance(cfg, str):
        return f"`{cfg}`"
    return f"in [`docs/results/{rec['_file']}`](results/{rec['_file']})"


def render(results: list[dict[str, Any]]) -> str:
    """The Markdown of ``docs/RESULTS.md``."""
    lines = [
        "# Results",
        "",
        "Generated by `python benchmarks/build_results.py` from `docs/results/*.json`; do not edit by hand.",
        "Each entry is the mean ± 95% confidence interval (1.96·std/√n over fixed, seeded test episodes) of",
        "one run; accuracy in %, 5-way unless the setting says otherwise. **Budget** says how much training",
        "the run had: the CPU-time-boxed runs here are far shorter than the papers' (e.g. MAML: 60,000",
        "iterations of 32 tasks), so they show that training works and how far it gets, not that the published",
        "numbers are reproduced. Published numbers are those of docs/algorithms/, with their source keys (2° = read in a",
        "secondary source). Protocols differ between rows and papers (split, queries at test, BN mode), and",
        "each row states its own.",
        "",
    ]
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for rec in results:
        by_dataset.setdefault(rec["dataset"], []).append(rec)
    for key, title in DATASETS.items():
        rows = sorted(by_dataset.get(key, []), key=lambda r: (r["setting"], r["algorithm"], r.get("date", "")))
        lines += [f"## {title}", ""]
        if not rows:
            published = sorted((s, a, v) for (d, s, a), v in PUBLISHED.items() if d == key)
            lines.append("No lightning-meta run recorded yet. Published: "
                         + "; ".join(f"{a} {s} {v}" for s, a, v in published) + "." if published else
                         "No lightning-meta run recorded yet.")
            lines.append("")
            continue
        lines += ["| Algorithm | Setting | lightning-meta | Episodes | Budget | Published | Protocol |",
                  "|---|---|---|---|---|---|---|"]
        for rec in rows:
            pub = PUBLISHED.get((key, rec["setting"], rec["algorithm"]), "–")
            lines.append(f"| {rec['algorithm']} | {rec['setting']} | **{_fmt(rec)}** | {rec['episodes']} | "
                         f"{rec.get('budget', '–')} | {pub} | {rec.get('protocol', '–')} |")
        lines += ["", "Commands:", ""]
        for rec in rows:
            lines.append(f"- {rec['algorithm']} {rec['setting']} ({rec.get('date', '')}): `{rec['command']}`; "
                         f"config {_config(rec)}")
        lines.append("")
    return "\n".join(lines)


def build(results_dir: Path = RESULTS_DIR, out: Path = OUT) -> Path:
    """Write ``out`` from the results in ``results_dir``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(load_results(results_dir)))
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
