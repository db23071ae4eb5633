"""Interleaved A/B of the Celo2 fast path: ``celo2.py`` at a git revision vs the working tree, with Adam(foreach).

Loads ``lightning_meta/optim/celo2.py`` as it was at ``REV`` (unregistered, next to the installed rule) and times
``RuleOptimizer.step`` of both, and of ``torch.optim.Adam(foreach=True)``, on MLPs 784-w-w-10 of about 0.33M and
1.8M parameters with fixed gradients, round-robin in one process (background load hits all three alike). Prints
medians, ratios to Adam and new / old. Usage (run it from the repository root)::

    python benchmarks/bench_lopt_ab.py 0e6bece --repeats 41
    python benchmarks/bench_lopt_ab.py HEAD --repeats 21 --widths 1000 --step-size relative   # the default's mode
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import time

import torch
from torch import nn

from lightning_meta.optim import RuleOptimizer, get_rule


def old_rule_class(rev: str) -> type:
    """``Celo2Rule`` as defined at git revision ``rev`` (not registered, so it does not replace the current one)."""
    src = subprocess.check_output(["git", "show", f"{rev}:lightning_meta/optim/celo2.py"]).decode()
    for old, new in (("_coordinate_mlp", "coordinate_mlp"), ("_features", "flatten_features")):  # renamed helpers
        src = re.sub(rf"\b{old}\b", new, src)
    namespace = {"__name__": f"celo2_at_{rev}"}
    exec(compile(src.replace("@register_rule\n", ""), f"celo2.py@{rev}", "exec"), namespace)
    return namespace["Celo2Rule"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rev", help="git revision of the old celo2.py")
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--widths", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--step-size",
        choices=["lr", "relative"],
        default="lr",
        help="celo2's step_size (relative: the mode of the shipped default)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    old = old_rule_class(args.rev)
    kwargs = {"step_size": "relative"} if args.step_size == "relative" else {}  # old revisions lack the argument
    for width in args.widths:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
        )
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
        n = sum(p.numel() for p in model.parameters())
        optimizers = {
            "adam": torch.optim.Adam(model.parameters(), lr=1e-6, foreach=True),
            "old": RuleOptimizer(model.parameters(), old(**kwargs), lr=1e-6, horizon=10**6),
            "new": RuleOptimizer(model.parameters(), get_rule("celo2", **kwargs), lr=1e-6, horizon=10**6),
        }
        times: dict[str, list[float]] = {k: [] for k in optimizers}
        for round_ in range(args.repeats + 2):  # two warm-up rounds
            for name, opt in optimizers.items():
                start = time.perf_counter()
                opt.step()
                if round_ >= 2:
                    times[name].append((time.perf_counter() - start) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"{n / 1e6:.2f}M",
            " ".join(f"{k} {v:.2f} ms ({v / med['adam']:.2f}x)" for k, v in med.items()),
            f"new/old {med['new'] / med['old']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
