"""The offline quickstart (``python -m lightning_meta.quickstart``) at reduced size."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_meta import quickstart
from lightning_meta.episode import Episode


def reference_mse(model: torch.nn.Module, episode: Episode, steps: int, lr: float) -> float:
    """Plain-PyTorch fine-tuning, written independently of lightning-meta: SGD on the mean support MSE."""
    net = copy.deepcopy(model)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(episode.support_x)[:, 0], episode.support_y).backward()
        opt.step()
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(net(episode.query_x)[:, 0], episode.query_y))


def test_quickstart_reduced_size_prints_mse_and_writes_the_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figs" / "maml.png"
    threads = torch.get_num_threads()
    try:
        result = quickstart.main(
            [
                "--steps",
                "30",
                "--test-tasks",
                "8",
                "--plot-tasks",
                "2",
                "--eval-steps",
                "5",
                "--out",
                str(out),
                "--no-progress-bar",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "10-shot test MSE over 8 fixed tasks" in printed
    assert f"{result.mse_after:.3f} +/- {result.mse_after_ci95:.3f}" in printed

    # the figure is a real PNG of the requested layout
    assert out.stat().st_size > 10_000
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > img.height > 100
        pixels = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32))
    assert pixels.std() > 10  # not a blank canvas

    # the reported MSEs equal plain fine-tuning of the trained network on the same fixed test tasks
    backbone = result.model.backbone
    tasks = [result.data.datasets["test"][i] for i in range(8)]
    before = torch.tensor([reference_mse(backbone, t, 0, 0.01) for t in tasks])
    after = torch.tensor([reference_mse(backbone, t, 5, 0.01) for t in tasks])
    assert result.mse_before == pytest.approx(float(before.mean()), rel=1e-4)
    assert result.mse_after == pytest.approx(float(after.mean()), rel=1e-4)
    assert result.mse_after_ci95 == pytest.approx(1.96 * float(after.std()) / 8**0.5, rel=0.08)


def test_quickstart_flags_are_checked() -> None:
    with pytest.raises(SystemExit):
        quickstart.parse_args(["--steps", "0"])
    args = quickstart.parse_args([])
    assert (args.steps, args.tasks_per_batch, args.shots, args.inner_lr) == (3000, 25, 10, 0.01)  # MAML section 5.1
