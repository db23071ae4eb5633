"""Tally validation records: a candidate's wins against tuned cosine Adam over seed sets, per set and per cell.

Each record is a ``bench_lopt_validation.py`` output (``--out``); a strict win is a lower score than tuned cosine
Adam's, and "within 1 %" is the summary's reading-only figure (within 1 % of cosine Adam's score or below it).
Without arguments it tallies the default rule's fresh seed sets recorded in ``docs/bench`` (the records listed in
``FRESH_DEFAULT``: the sets 7003-7009 ran the default's settings as ``aU6B99`` before they became the default, 7012
as ``D`` in the step-size record, and every ``learned_optimizer_validation_default_*.json`` but the selection set
7000's). Those records tuned the baselines' lr on the grid alone; where ``docs/bench/lopt_validation_edges`` holds
a set's record with the baselines' search carried past the grid's ends (``bench_lopt_validation.py --previous
RECORD``, no candidate), that record is tallied instead, unless ``--grid-only``::

    python benchmarks/tally_lopt_validation.py
    python benchmarks/tally_lopt_validation.py --grid-only   # against the baselines tuned on the grid alone
    python benchmarks/tally_lopt_validation.py docs/bench/learned_optimizer_validation_default_7063.json:D
    python benchmarks/tally_lopt_validation.py --per task RECORD.json:D+X2+X4   # the best of three, per task
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lopt_validation import SEED_BASE, _log_ratio, within_tie  # noqa: E402

__all__ = ["EDGES", "FRESH_DEFAULT", "fresh_default_records", "tally"]

BENCH = Path(__file__).resolve().parents[1] / "docs" / "bench"
EDGES = BENCH / "lopt_validation_edges"  # SEED.json: a record with the baselines' search past the grid's ends
FRESH_DEFAULT = (
    ("learned_optimizer_validation_magnitude_fresh.json", "aU6B99"),
    ("learned_optimizer_validation_magnitude_7006.json", "aU6B99"),
    ("learned_optimizer_validation_magnitude_7009.json", "aU6B99"),
    ("learned_optimizer_validation_d0_7012.json", "D"),
)


def fresh_default_records(grid_only: bool = False) -> list[tuple[Path, str]]:
    """The default's fresh seed sets in ``docs/bench``, in seed order: ``FRESH_DEFAULT`` and the ``default_*`` records
    but the selection set's (``SEED_BASE``, on which the default was chosen); unless ``grid_only``, each set's
    ``EDGES`` record where there is one; with ``grid_only``, only the records tuned on the grid alone."""
    later = {int(p.stem.rsplit("_", 1)[1]): p for p in BENCH.glob("learned_optimizer_validation_default_*.json")}
    later.pop(SEED_BASE, None)
    records = [(BENCH / name, candidate) for name, candidate in FRESH_DEFAULT]
    records += [(later[k], "D") for k in sorted(later)]
    if grid_only:  # the sets scored before the search past the grid's ends
        return [(path, c) for path, c in records if not json.loads(path.read_text()).get("grid_extended")]
    extended = []
    for path, candidate in records:
        edges = EDGES / f"{json.loads(path.read_text())['seeds'][0]}.json"
        extended.append((edges if edges.is_file() else path, candidate))
    return extended


def _pick(rows: dict, names: list[str], per: str) -> dict[str, str]:
    """For each cell, the candidate among ``names`` with the lowest log score ratio against tuned cosine Adam: per
    cell (ties, e.g. of scores below the ratio's floor, go to the lowest score), or per task (one candidate for all of
    a task's horizons, by the mean ratio; ties go to the first named)."""
    if per == "cell":
        return {cell: min(names, key=lambda n: (_log_ratio(row, n), row[n]["score"])) for cell, row in rows.items()}
    tasks: dict[str, list[str]] = {}
    for cell in rows:
        tasks.setdefault(cell.split("@")[0], []).append(cell)
    chosen = {}
    for task_cells in tasks.values():
        best = min(names, key=lambda n: sum(_log_ratio(rows[c], n) for c in task_cells) / len(task_cells))
        chosen |= dict.fromkeys(task_cells, best)
    return chosen


def tally(records: list[tuple[Path, str]], per: str = "cell") -> dict:
    """Per record (its first seed), the whole tally and per cell: strict wins and cells within 1 % or better.

    A candidate ``A+B+...`` is the best of those candidates, chosen with hindsight per cell or per task (``per``), as
    the tuned baselines' lr is: e.g. the rule at several lr multipliers, for the score a perfectly chosen step size
    would get. ``result["picked"]`` counts, per cell, how often each candidate was chosen."""
    if per not in ("cell", "task"):
        raise ValueError(f"per={per!r} must be 'cell' or 'task'")
    sets, cells, picked = [], {}, {}
    for path, name in records:
        record = json.loads(Path(path).read_text())
        rows = record["tasks"]
        names = name.split("+")
        missing = [(cell, n) for cell, row in rows.items() for n in names if n not in row]
        if missing:
            raise ValueError(f"{path}: no candidate {missing[0][1]!r} in {missing[0][0]}; pass FILE:NAME")
        chosen = _pick(rows, names, per)
        wins = {cell: row[chosen[cell]]["score"] < row["adam_cosine"]["score"] for cell, row in rows.items()}
        close = {cell: within_tie(row, chosen[cell]) for cell, row in rows.items()}
        sets.append(
            {
                "seed": record["seeds"][0],
                "cells": len(rows),
                "wins": sum(wins.values()),
                "within": sum(close.values()),
                "grid_extended": bool(record.get("grid_extended")),
            }
        )
        for cell in rows:
            entry = cells.setdefault(cell, {"sets": 0, "wins": 0, "within": 0})
            entry["sets"] += 1
            entry["wins"] += wins[cell]
            entry["within"] += close[cell]
            counts = picked.setdefault(cell, {})
            counts[chosen[cell]] = counts.get(chosen[cell], 0) + 1
    total = {key: sum(s[key] for s in sets) for key in ("cells", "wins", "within")}
    return {"sets": sets, "total": total, "cells": cells, "picked": picked}


def _record(text: str) -> tuple[Path, str]:
    """``FILE:NAME`` or ``FILE`` (candidate ``D``)."""
    path, colon, name = text.rpartition(":")
    if colon and name and not any(c in name for c in "/\\."):
        return Path(path), name
    return Path(text), "D"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "records",
        nargs="*",
        help="FILE[:NAME] (NAME default D, or A+B+...: the best of them); none: the default's fresh sets",
    )
    parser.add_argument("--per", choices=("cell", "task"), default="cell", help="where A+B+... picks its best")
    parser.add_argument(
        "--grid-only",
        action="store_true",
        help="with no records: the default's records whose baselines were tuned on the grid alone (the sets scored "
        "before the search past the grid's ends)",
    )
    args = parser.parse_args(argv)
    records = [_record(r) for r in args.records] or fresh_default_records(args.grid_only)
    result = tally(records, args.per)
    if not args.records:
        extended = sum(s["grid_extended"] for s in result["sets"])
        print(f"{extended} of {len(records)} sets with the baselines' lr searched past the grid's ends")
    best_of = any("+" in name for _, name in records)
    for s in result["sets"]:
        print(f"seed set {s['seed']}: {s['wins']} of {s['cells']} (within 1 %: {s['within']})")
    t = result["total"]
    print(
        f"{len(result['sets'])} sets: {t['wins']} of {t['cells']} ({100 * t['wins'] / t['cells']:.0f} %), "
        f"within 1 % or better {t['within']} of {t['cells']} ({100 * t['within'] / t['cells']:.0f} %)"
    )
    for cell, c in sorted(result["cells"].items(), key=lambda kv: (-kv[1]["wins"], -kv[1]["within"])):
        chosen = ", ".join(f"{n} {k}" for n, k in sorted(result["picked"][cell].items(), key=lambda nk: -nk[1]))
        print(f"  {cell}: {c['wins']} ({c['within']}) of {c['sets']}" + (f"; chose {chosen}" if best_of else ""))
    return result


if __name__ == "__main__":
    main()
