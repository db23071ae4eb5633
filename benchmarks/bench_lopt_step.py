"""Cost of learned-optimizer steps relative to ``torch.optim.Adam(foreach=True)``: time and state memory.

Measures, in one process and interleaved round by round (so background load hits every contender alike):

1. the optimizer step alone (fixed gradients) of each rule applied by ``RuleOptimizer``, on MLPs
   784-w-w-10 of about 0.3M and 1.8M parameters;
2. optimizer-state memory (bytes of state tensors);
3. a whole training step (forward + backward + optimizer step) of a small convnet, default rule vs Adam.

Prints medians and ratios to Adam as a Markdown table. Usage::

    python benchmarks/bench_lopt_step.py --threads 1 --repeats 15
    python benchmarks/bench_lopt_step.py --threads 1 --repeats 21 --rules adam celo2 --celo2-hidden 4 8
    python benchmarks/bench_lopt_step.py --threads 1 --repeats 21 --widths 300 1000 --rules adam celo2 default \
        default-compiled

``--device cuda`` times the same on a GPU (each round synchronised); ``adamw-fused`` adds
``torch.optim.AdamW(fused=True)``, the baseline a fused GPU update is measured against (the issue's comparison)::

    python benchmarks/bench_lopt_step.py --device cuda --repeats 21 --widths 1000 3000 \
        --rules adam adamw-fused default default-compiled

``default-compiled`` is the shipped default with ``Celo2Rule.compile_fast_path()`` (torch.compile; the first step
compiles, its time is printed and not counted). A shipped pretrained name (``celo2-pes``) times those weights;
other names are registry rules at their initialisation. At the initialisation the MLP's output layer is zero and
the eager step computes only the one feature the skip path uses; ``default-mlp`` is the default with a nonzero output
layer, so the whole MLP runs (the cost of a rule whose meta-training changed it); ``default-dog`` is the default with
``step_size="dog"`` (a copy of the initial parameters and the distance travelled from them); ``default-prodigy`` the
default with ``step_size="prodigy"`` (the initial parameters and Prodigy's running gradient sum);
``default-general`` the default with ``magnitude_power`` 1 - 1e-9, which takes the general single-feature form
(materialise the feature, sum its squares, add it) instead of the Adam form the default's power of 1 allows: what
the shortcut saves, in the same run; ``default-orthogonal`` the default with ``orthogonalize=True`` (Newton–Schulz on
every matrix's direction, as Muon)::

    python benchmarks/bench_lopt_step.py --threads 1 --repeats 21 --widths 300 1000 --rules adam default \
        default-general
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_meta.optim import RuleOptimizer, available_pretrained, get_rule, load_pretrained


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def _convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and key != "step"
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(
    contenders: dict[str, Callable[[], None]], repeats: int, warmup: int = 2, device: torch.device | None = None
) -> dict[str, float]:
    """Median seconds per call of each contender, timed round-robin (on a GPU: from and to an idle device)."""
    device = device or torch.device("cpu")
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(warmup + repeats):
        for name, call in contenders.items():
            _synchronize(device)
            start = time.perf_counter()
            call()
            _synchronize(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


#: ``--rules`` names that time the shipped default with another path or step size (same weights)
DEFAULT_VARIANTS = (
    "default",
    "default-compiled",
    "default-mlp",
    "default-dog",
    "default-prodigy",
    "default-prodigy-compiled",
    "default-general",
    "default-orthogonal",
)


def _contenders(rules: list[str], celo2_hidden: list[int]) -> dict[str, dict]:
    """Label -> get_rule kwargs (name included); celo2 once per hidden size (the default size is labelled celo2)."""
    default_hidden = get_rule("celo2").hidden_size
    out: dict[str, dict] = {}
    for name in rules:
        if name in DEFAULT_VARIANTS:  # the shipped default and its variants
            variant = name.removeprefix("default").removesuffix("-compiled").lstrip("-")  # "", mlp, dog, prodigy
            out[name] = {
                "pretrained": "default",
                "compile": name.endswith("-compiled"),
                "mlp": variant == "mlp",
                "general": variant == "general",
                "orthogonal": variant == "orthogonal",
                "step_size": variant if variant in ("dog", "prodigy") else None,
            }
            continue
        if name == "adamw-fused":  # torch's fused AdamW: the baseline of a fused update
            out[name] = {"torch": "adamw-fused"}
            continue
        if name in available_pretrained():  # another shipped entry, e.g. the meta-trained celo2-pes
            out[name] = {"pretrained": name}
            continue
        if name != "celo2":
            out[name] = {"name": name}
            continue
        for hidden in celo2_hidden:
            label = "celo2" if hidden == default_hidden else f"celo2 (hidden {hidden})"
            out[label] = {"name": "celo2", "hidden_size": hidden}
    return out


def bench_steps(width: int, rules: dict[str, dict], repeats: int, device: torch.device | None = None) -> list[str]:
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    model = _mlp(width).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    optimizers: dict[str, torch.optim.Optimizer] = {
        "Adam(foreach)": torch.optim.Adam(model.parameters(), lr=1e-6, foreach=True)
    }
    for label, kwargs in rules.items():
        if kwargs.get("torch") == "adamw-fused":
            optimizers[label] = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
            continue
        rule = load_pretrained(kwargs["pretrained"]) if "pretrained" in kwargs else get_rule(**kwargs)
        if kwargs.get("step_size"):  # the same weights and settings with another step size (dog, prodigy)
            rule = rule.replace(step_size=kwargs["step_size"])
        if kwargs.get("compile"):
            rule.compile_fast_path()
        if kwargs.get("general"):  # off the power of 1 whose cancellation gives the Adam form: the general path
            rule = rule.replace(magnitude_power=1.0 - 1e-9)
        if kwargs.get("orthogonal"):  # matrices step along Newton–Schulz's orthogonalised direction
            rule = rule.replace(orthogonalize=True)
        if kwargs.get("mlp"):  # a live MLP (nonzero output layer), as a meta-trained rule would have
            with torch.no_grad():
                rule.output.weight.fill_(0.1)
        optimizers[label] = RuleOptimizer(model.parameters(), rule.to(device), lr=1e-6, horizon=10**6)
    for label, opt in optimizers.items():  # create state (and compile)
        start = time.perf_counter()
        opt.step()
        _synchronize(device)
        if rules.get(label, {}).get("compile"):
            print(f"<!-- {label}: first step (compiles) {time.perf_counter() - start:.1f} s -->")
    medians = _interleaved({name: opt.step for name, opt in optimizers.items()}, repeats, device=device)
    n = sum(p.numel() for p in model.parameters())
    base, base_mem = medians["Adam(foreach)"], _state_bytes(optimizers["Adam(foreach)"])
    rows = []
    for name, opt in optimizers.items():
        mem = _state_bytes(opt)
        rows.append(
            f"| {n / 1e6:.2f}M | {name} | {medians[name] * 1e3:.2f} | {medians[name] / base:.2f}x "
            f"| {mem / 2**20:.1f} | {mem / base_mem:.2f}x |"
        )
    return rows


def bench_convnet(rule: str, repeats: int, batch: int, device: torch.device | None = None) -> list[str]:
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    models = {"Adam(foreach)": _convnet().to(device), rule: _convnet().to(device)}
    optimizers = {
        "Adam(foreach)": torch.optim.Adam(models["Adam(foreach)"].parameters(), lr=1e-3, foreach=True),
        rule: RuleOptimizer(models[rule].parameters(), rule, lr=1e-3, horizon=10**6),
    }

    def train_step(name: str) -> Callable[[], None]:
        def call() -> None:
            optimizers[name].zero_grad()
            nn.functional.cross_entropy(models[name](x), y).backward()
            optimizers[name].step()

        return call

    medians = _interleaved({name: train_step(name) for name in models}, repeats, device=device)
    n = sum(p.numel() for p in models[rule].parameters())
    base = medians["Adam(foreach)"]
    label = f"convnet {n / 1e6:.2f}M, batch {batch}x3x32x32"
    return [f"| {label} | {name} | {medians[name] * 1e3:.2f} | {medians[name] / base:.2f}x |" for name in models]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--widths", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--rules", nargs="+", default=["adam", "celo2", "mlp", "lstm"])
    parser.add_argument("--lstm-max-params", type=float, default=5e5, help="skip the LSTM rule above this size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--celo2-hidden", type=int, nargs="+", default=[4], help="hidden sizes of celo2 to time")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} thread(s)"
    print(f"torch {torch.__version__}, {where}, median of {args.repeats} interleaved rounds\n")
    print("| params | optimizer | step ms | vs Adam | state MiB | vs Adam |\n|---|---|---|---|---|---|")
    for width in args.widths:
        n = sum(p.numel() for p in _mlp(width).parameters())
        rules = _contenders([r for r in args.rules if r != "lstm" or n <= args.lstm_max_params], args.celo2_hidden)
        for row in bench_steps(width, rules, args.repeats, device):
            print(row)
    print("\n| model | optimizer | train step ms | vs Adam |\n|---|---|---|---|")
    for row in bench_convnet("default", args.repeats, args.batch, device):
        print(row)


if __name__ == "__main__":
    main()
