"""Trace the default learned rule's per-tensor step-size state on one validation task (one seed, untuned).

Prints, at five points of the run, the mean training loss over the last 10 % of steps so far and, per weight
tensor: ``d/d0`` (the Prodigy estimate over its start), ``h`` (the hypergradient log gain), ``a`` (the RMS of
Adam's update ``m̂ / sqrt(v̂ + eps²)``, which ``magnitude_power`` follows) and ``r/|s|`` (Prodigy's ratio that
``d`` must exceed to grow; negative when the gradient points back towards the initial weights).

    python benchmarks/trace_lopt_state.py --task teacher_student --steps 200 [--rule celo2-prodigy] [--seed 7000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lopt_validation import validation_tasks  # noqa: E402

from lightning_meta.optim.meta.estimators import inner_step  # noqa: E402
from lightning_meta.optim.meta.tasks import sample_batches, stack_params  # noqa: E402
from lightning_meta.optim.pretrained import load_pretrained  # noqa: E402


def trace(task_name: str, steps: int, rule_name: str = "default", seed: int = 7000) -> list[dict]:
    """One run as ``bench_lopt_quality.run_population`` runs it (seed ``seed``, lr multiplier 1); the rows printed."""
    rule = load_pretrained(rule_name)
    if getattr(rule, "step_size", None) != "prodigy":
        raise ValueError(f"--rule {rule_name}: the trace reads the Prodigy state; pick a rule with step_size='prodigy'")
    task = validation_tasks()[task_name].sample(torch.Generator().manual_seed(1000 + seed))
    params = stack_params([task.init(torch.Generator().manual_seed(2000 + seed))])  # one problem: (1, ...)
    state = {k: rule.init_state(v, batch_dims=1) for k, v in params.items()}
    data = torch.Generator().manual_seed(3000 + seed)
    beta1, beta2 = rule.betas
    losses, rows = [], []
    lr = torch.ones(1)
    with torch.no_grad():
        for t in range(1, steps + 1):
            loss, grads = inner_step(task, params, sample_batches([task], data), create_graph=False)
            losses.append(float(loss.mean()))
            for k, p in params.items():
                params[k], state[k] = rule.update(
                    p,
                    torch.nan_to_num(grads[k]),
                    state[k],
                    lr=lr.view(-1, *[1] * (p.ndim - 1)),
                    step=t,
                    horizon=steps,
                    batch_dims=1,
                )
            if t % max(1, steps // 5) == 0:
                row: dict = {"step": t, "loss": sum(losses[-max(1, t // 10) :]) / max(1, t // 10)}
                for k, st in state.items():
                    if params[k].ndim < 3:  # biases: AdamW's step, no matrix statistics
                        continue
                    m_hat = st["exp_avg"] / (1 - beta1**t)
                    v_hat = st["exp_avg_sq"] / (1 - beta2**t)
                    l1 = float((st["grad_sum"].abs().sum() * st["grad_sum_scale"]).reshape(-1)[0])
                    row[k] = {
                        "d/d0": float((st["estimate"] / st["step_scale"]).reshape(-1)[0]),
                        "h": float(st["log_gain"].reshape(-1)[0]),
                        "a": float((m_hat / torch.sqrt(v_hat + rule.eps**2)).pow(2).mean().sqrt()),
                        "r/|s|": float(st["numerator"].reshape(-1)[0]) / l1 if l1 else 0.0,
                    }
                rows.append(row)
                print(
                    f"step {t}: loss {row['loss']:.4g} | "
                    + " | ".join(
                        f"{k}: " + " ".join(f"{n}={v:.3g}" for n, v in s.items())
                        for k, s in row.items()
                        if isinstance(s, dict)
                    ),
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="teacher_student", choices=sorted(validation_tasks()))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rule", default="default", help="a shipped pretrained rule with step_size='prodigy'")
    parser.add_argument("--seed", type=int, default=7000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    return trace(args.task, args.steps, args.rule, args.seed)


if __name__ == "__main__":
    main()
