"""CUDA checks (skipped without a GPU): meta-gradients on the GPU equal a float64 CPU reference, mixed precision.

CI has no GPU; these run where one exists (`python -m pytest -m gpu`). The fp16 test of the scaled inner loop
is in ``test_precision.py``.
"""

from __future__ import annotations

import pytest
import torch

from lightning_meta.algorithms import MAML, MetaSGD
from lightning_meta.episode import Episode
from lightning_meta.nn import Conv4
from tests.algorithms._meta_helpers import grads_of_training_step, loader, trainer

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:.*(self.log|num_workers|val_dataloader|precision).*")]


def image_tasks(n: int, seed: int = 0) -> list[Episode]:
    """``n`` 5-way 1-shot tasks of random 28x28 images (3 queries per class), labels 0..4."""
    g = torch.Generator().manual_seed(seed)
    return [
        Episode(
            torch.rand(5, 1, 28, 28, generator=g),
            torch.arange(5),
            torch.rand(15, 1, 28, 28, generator=g),
            torch.arange(5).repeat_interleave(3),
        )
        for _ in range(n)
    ]


def conv4_maml(mode: str, first_order: bool = False) -> MAML:
    torch.manual_seed(0)
    net = Conv4(5, hidden=8, downsample="maxpool", pooling="flatten", image_size=28)
    return MAML(net, inner_lr=0.4, inner_steps=2, first_order=first_order, task_mode=mode, task_chunk=None)


@pytest.fixture
def exact_fp32():
    """TF32 off for convolutions and matmuls (PyTorch lets cuDNN convolutions use it by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("mode", ["loop", "vmap"])
@pytest.mark.parametrize("first_order", [False, True])
def test_cuda_meta_gradient_equals_float64_cpu(mode: str, first_order: bool, exact_fp32) -> None:
    """The GPU step (fused batch norm + max-pool in the loop, primitive ops under vmap) computes the CPU's function."""
    batch = Episode.collate(image_tasks(4))
    ref = grads_of_training_step(conv4_maml("loop", first_order).double(), batch.to(dtype=torch.float64))
    got = grads_of_training_step(conv4_maml(mode, first_order).cuda(), batch.to("cuda"))
    scale = torch.stack([r.norm() for r in ref.values()]).norm().float()
    for name, g in got.items():
        r = ref[name].float()
        # relative to the tensor's norm, or to the whole gradient's for tensors whose exact gradient is ~0
        # (a convolution bias before batch norm: there fp32 rounding is all there is)
        err = (g.cpu() - r).norm() / torch.maximum(r.norm(), 0.1 * scale)
        assert err < 2e-4, (name, float(err))


def assert_trains_on_cuda(model, precision: str) -> None:
    """3 steps under ``precision`` on CUDA: finite loss and weights, no skipped step, the weights moved."""
    before = [p.detach().clone() for p in model.parameters()]
    t = trainer(max_steps=3, accelerator="cuda", precision=precision)
    t.fit(model, loader(image_tasks(12), tasks=4))
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert model.skipped_steps == 0
    after = [p.detach().cpu() for p in model.parameters()]
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(b, a) for b, a in zip(before, after))


def test_bf16_mixed_on_cuda_trains_and_stays_finite() -> None:
    assert_trains_on_cuda(conv4_maml("vmap"), "bf16-mixed")


def test_meta_sgd_fp16_mixed_on_cuda_with_conv4() -> None:
    """fp16 autocast + GradScaler through a second-order Meta-SGD step on images: finite, applied, no skipped step."""
    torch.manual_seed(0)
    net = Conv4(5, hidden=8, downsample="maxpool", pooling="flatten", image_size=28)
    assert_trains_on_cuda(MetaSGD(net, inner_steps=1, task_mode="loop"), "16-mixed")
