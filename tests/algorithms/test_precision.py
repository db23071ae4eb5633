"""Mixed precision of the inner loop and the non-finite guard."""

from __future__ import annotations

import pytest
import torch

from lightning_meta.algorithms import MAML
from lightning_meta.episode import Episode
from lightning_meta.functional import gradient_steps
from lightning_meta.nn import MLP
from tests.algorithms._meta_helpers import blob_episode, loader, trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(self.log|num_workers|val_dataloader|precision).*"
)  # Lightning's advice for real training runs


def tiny_maml(**kwargs) -> MAML:
    torch.manual_seed(0)
    return MAML(MLP(4, 3, hidden=(8,)), inner_lr=0.5, inner_steps=2, task_mode="loop", **kwargs)


def test_bf16_mixed_trains_and_stays_finite() -> None:
    model = tiny_maml()
    before = [p.detach().clone() for p in model.parameters()]
    t = trainer(max_steps=3, precision="bf16-mixed")
    t.fit(model, loader([blob_episode(i) for i in range(12)], tasks=4))
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert model.skipped_steps == 0


def test_inner_loss_scale_prevents_fp16_underflow() -> None:
    w = torch.ones(4, 3, requires_grad=True)
    x = torch.ones(5, 4)

    def objective(f):
        return (x @ f["w"]).float().sum() * 1e-8  # d/dw = 5e-8: below fp16's smallest subnormal after the matmul

    with torch.autocast("cpu", dtype=torch.float16):
        plain = gradient_steps(objective, {"w": w}, lr=1e6)
        scaled = gradient_steps(objective, {"w": w}, lr=1e6, loss_scale=2.0**12)
    assert torch.equal(plain["w"], w)  # underflowed to a zero step
    torch.testing.assert_close(scaled["w"], w - 0.05)
    assert scaled["w"].dtype == torch.float32


def nan_batch_loader(bad_task: int | None) -> list[Episode]:
    episodes = [blob_episode(i) for i in range(4)]
    if bad_task is not None:
        e = episodes[bad_task]
        sx = e.support_x.clone()
        sx[0, 0] = float("nan")  # inner loss of that task is NaN
        episodes[bad_task] = Episode(sx, e.support_y, e.query_x, e.query_y)
    return episodes


def test_nonfinite_inner_loss_is_counted_logged_and_skipped() -> None:
    model = tiny_maml()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = trainer(max_steps=1)
    t.fit(model, loader(nan_batch_loader(bad_task=2), tasks=4))
    assert t.callback_metrics["train/nonfinite_tasks"] == 1
    assert t.callback_metrics["train/skipped_steps"] == 1
    assert model.skipped_steps == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    # The guard does not stick: the next clean batch is applied.
    t2 = trainer(max_steps=1)
    t2.fit(model, loader(nan_batch_loader(bad_task=None), tasks=4))
    assert t2.callback_metrics["train/nonfinite_tasks"] == 0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def fp16_cpu_trainer(**kwargs):
    """fp16 autocast + GradScaler on CPU (Lightning maps precision="16-mixed" to bf16 on CPU, so pass the plugin)."""
    from lightning.pytorch.plugins import MixedPrecision

    return trainer(plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))], **kwargs)


def test_fp16_cpu_twin_scales_the_inner_loop_and_backs_off_on_a_skipped_step() -> None:
    model = tiny_maml()
    seen = []
    adapt = model.adapt

    def spy(sx, sy):
        seen.append((model.inner_loss_scale, torch.get_autocast_dtype("cpu")))
        return adapt(sx, sy)

    model.adapt = spy
    t = fp16_cpu_trainer(max_steps=2)
    t.fit(model, loader([blob_episode(i) for i in range(8)], tasks=4))
    assert set(seen) == {(2.0**12, torch.float16)}
    assert model.skipped_steps == 0 and model.inner_loss_scaler.good_steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fp16_cpu_trainer(max_steps=1).fit(model, loader(nan_batch_loader(bad_task=0), tasks=4))
    assert model.skipped_steps == 1 and model.inner_loss_scaler.scale == 2.0**11  # halved
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.gpu
def test_fp16_mixed_on_cuda_uses_scaled_inner_loop() -> None:
    model = tiny_maml(inner_loss_scale=None)
    t = trainer(max_steps=3, accelerator="cuda", precision="16-mixed")
    t.fit(model, loader([blob_episode(i) for i in range(12)], tasks=4))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert model.skipped_steps == 0 and model.inner_loss_scale == 1.0  # scale applies only inside fp16 autocast
    assert model.inner_loss_scaler.scale == 2.0**12


def test_dynamic_inner_scale_is_checkpointed() -> None:
    model = tiny_maml()
    model.inner_loss_scaler.scale, model.inner_loss_scaler.good_steps = 64.0, 17
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    fresh = tiny_maml()
    fresh.on_load_checkpoint(checkpoint)
    assert checkpoint["lightning_meta_fp16_inner_scale"] == {
        "scale": 64.0,
        "good_steps": 17,
    }  # the key of old checkpoints
    assert (fresh.inner_loss_scaler.scale, fresh.inner_loss_scaler.good_steps) == (64.0, 17)
    assert fresh.inner_loss_scale == 1.0  # outside fp16 autocast the scale is not applied


def test_conv4_fused_pooling_steps_aside_under_autocast() -> None:
    """Under autocast the convolution returns bf16, so the fp32-only fused batch norm + max-pool must not run
    (it was chosen from the network's fp32 input once and raised on the first bf16 block)."""
    from lightning_meta.nn import Conv4

    torch.manual_seed(0)
    net = Conv4(5, hidden=4, downsample="maxpool", pooling="flatten", image_size=28)
    x = torch.rand(3, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    ref = net(x)  # fp32 (fused path) for scale
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
