"""Tally validation records: a candidate's wins against tuned cosine Adam over seed sets, per set and per cell.

Each record is a ``bench_lopt_validation.py`` output (``--out``); a strict win is a lower score than tuned cosine
Adam's, and "within 1 %" is the summary's reading-only figure (within 1 % of cosine Adam's score or below it).
Without arguments it tallies the default rule's fresh seed sets recorded in ``docs/bench`` (the records listed in
``FRESH_DEFAULT``: the sets 7003-7009 ran the default's settings as ``aU6B99`` before they became the default, 7012
as ``D`` in the step-size record, and every ``learned_optimizer_validation_default_*.json`` but the selection set
7000's)::

    python benchmarks/tally_lopt_validation.py
    python benchmarks/tally_lopt_validation.py docs/bench/learned_optimizer_validation_default_7063.json:D
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lopt_validation import SEED_BASE, within_tie  # noqa: E402

__all__ = ["FRESH_DEFAULT", "fresh_default_records", "tally"]

BENCH = Path(__file__).resolve().parents[1] / "docs" / "bench"
FRESH_DEFAULT = (
    ("learned_optimizer_validation_magnitude_fresh.json", "aU6B99"),
    ("learned_optimizer_validation_magnitude_7006.json", "aU6B99"),
    ("learned_optimizer_validation_magnitude_7009.json", "aU6B99"),
    ("learned_optimizer_validation_d0_7012.json", "D"),
)


def fresh_default_records() -> list[tuple[Path, str]]:
    """The default's fresh seed sets in ``docs/bench``, in seed order: ``FRESH_DEFAULT`` and the ``default_*`` records
    but the selection set's (``SEED_BASE``, on which the default was chosen)."""
    later = {int(p.stem.rsplit("_", 1)[1]): p for p in BENCH.glob("learned_optimizer_validation_default_*.json")}
    later.pop(SEED_BASE, None)
    return [(BENCH / name, candidate) for name, candidate in FRESH_DEFAULT] + [(later[k], "D") for k in sorted(later)]


def tally(records: list[tuple[Path, str]]) -> dict:
    """Per record (its first seed), the whole tally and per cell: strict wins and cells within 1 % or better."""
    sets, cells = [], {}
    for path, name in records:
        record = json.loads(Path(path).read_text())
        rows = record["tasks"]
        missing = [cell for cell, row in rows.items() if name not in row]
        if missing:
            raise ValueError(f"{path}: no candidate {name!r} in {missing}; pass FILE:NAME")
        wins = {cell: row[name]["score"] < row["adam_cosine"]["score"] for cell, row in rows.items()}
        close = {cell: within_tie(row, name) for cell, row in rows.items()}
        sets.append(
            {"seed": record["seeds"][0], "cells": len(rows), "wins": sum(wins.values()), "within": sum(close.values())}
        )
        for cell in rows:
            entry = cells.setdefault(cell, {"sets": 0, "wins": 0, "within": 0})
            entry["sets"] += 1
            entry["wins"] += wins[cell]
            entry["within"] += close[cell]
    total = {key: sum(s[key] for s in sets) for key in ("cells", "wins", "within")}
    return {"sets": sets, "total": total, "cells": cells}


def _record(text: str) -> tuple[Path, str]:
    """``FILE:NAME`` or ``FILE`` (candidate ``D``)."""
    path, colon, name = text.rpartition(":")
    if colon and name and not any(c in name for c in "/\\."):
        return Path(path), name
    return Path(text), "D"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("records", nargs="*", help="FILE[:NAME] (NAME default D); none: the default's fresh sets")
    args = parser.parse_args(argv)
    records = [_record(r) for r in args.records] or fresh_default_records()
    result = tally(records)
    for s in result["sets"]:
        print(f"seed set {s['seed']}: {s['wins']} of {s['cells']} (within 1 %: {s['within']})")
    t = result["total"]
    print(
        f"{len(result['sets'])} sets: {t['wins']} of {t['cells']} ({100 * t['wins'] / t['cells']:.0f} %), "
        f"within 1 % or better {t['within']} of {t['cells']} ({100 * t['within'] / t['cells']:.0f} %)"
    )
    for cell, c in sorted(result["cells"].items(), key=lambda kv: (-kv[1]["wins"], -kv[1]["within"])):
        print(f"  {cell}: {c['wins']} ({c['within']}) of {c['sets']}")
    return result


if __name__ == "__main__":
    main()
