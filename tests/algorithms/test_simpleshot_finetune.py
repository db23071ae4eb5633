"""SimpleShot (CL2N nearest centroid) and the P>M>F fine-tuning pipeline, against hand computations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_meta.algorithms import FineTuneProtoNet, ProtoNet, SimpleShot
from lightning_meta.episode import Episode
from tests.algorithms._meta_helpers import blob_episode, loader, trainer


def double_batch(n: int = 3, **kw) -> Episode:
    b = Episode.collate([blob_episode(i, **kw) for i in range(n)])
    return Episode(b.support_x.double(), b.support_y, b.query_x.double(), b.query_y)


def test_simpleshot_centring_and_normalisation_by_hand():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    base = torch.randn(50, 4, dtype=torch.float64)
    net = SimpleShot(lin).double()
    m = net.set_base_mean(base, batch_size=7)
    with torch.no_grad():
        assert torch.allclose(m.double(), lin(base).mean(0), atol=1e-6)
        b = double_batch(1)
        sx, sy, qx = b.support_x[0], b.support_y[0], b.query_x[0]

        def cl2n(x):  # by hand: subtract the base mean, divide by the Euclidean norm
            f = lin(x) - m.double()
            return f / f.pow(2).sum(1, keepdim=True).sqrt()

        fs, fq = cl2n(sx), cl2n(qx)
        cent = torch.stack([fs[sy == k].mean(0) for k in range(3)])
        dist = torch.cdist(fq, cent)  # Euclidean distances to class centroids
        out = net(b)[0]
        assert torch.allclose(out, -(dist**2), atol=1e-10)
        assert torch.equal(out.argmax(1), dist.argmin(1))
        assert torch.allclose(net.embed(qx).norm(dim=1), torch.ones(len(qx), dtype=torch.float64))
    l2n = SimpleShot(lin, normalization="L2N")
    x = torch.randn(2, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(l2n.embed(x), lin(x) / lin(x).norm(dim=1, keepdim=True))
    with pytest.raises(RuntimeError, match="set_base_mean"):
        SimpleShot(lin).embed(x)
    with pytest.raises(ValueError, match="normalization='XX'"):
        SimpleShot(lin, normalization="XX")
    state = net.state_dict()
    assert torch.equal(state["base_mean"], m)  # travels with checkpoints


def test_zero_finetune_steps_equals_protonet():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 6), nn.Tanh()).double()
    b = double_batch()
    proto, ft0 = ProtoNet(backbone).eval(), FineTuneProtoNet(backbone, finetune_steps=0).eval()
    assert torch.equal(ft0(b), proto(b)) and not ft0.needs_grad_at_eval
    ft = FineTuneProtoNet(backbone, finetune_steps=3, finetune_lr=0.1, augment=None).eval()
    assert ft.needs_grad_at_eval and not torch.allclose(ft(b), proto(b))
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    ft(b)
    assert all(torch.equal(before[n], p) for n, p in backbone.named_parameters())  # meta-parameters untouched


def test_finetuning_reduces_the_support_loss_and_matches_a_hand_sgd_step():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    b = double_batch(1, ways=3, shots=3)
    sx, sy = b.support_x[0], b.support_y[0]
    noise = torch.Generator().manual_seed(1)

    def aug(x: torch.Tensor) -> torch.Tensor:
        return x + 0.3 * torch.randn(x.shape, generator=noise, dtype=x.dtype)

    ft = FineTuneProtoNet(backbone, finetune_steps=30, finetune_lr=0.05, augment=aug).eval()

    def support_loss(params):  # the support set classified by its own prototypes
        with torch.no_grad():
            f = torch.func.functional_call(backbone, params, (sx,))
            cent = torch.stack([f[sy == k].mean(0) for k in range(3)])
            return F.cross_entropy(-(torch.cdist(f, cent) ** 2), sy).item()

    params, losses = ft.finetune(sx, sy)
    assert support_loss(params) < 0.5 * support_loss(dict(backbone.named_parameters()))
    assert sum(losses[-5:]) < sum(losses[:5])
    # one step, no augmentation, no momentum: theta - lr * grad of the pseudo-episode loss, by hand
    one = FineTuneProtoNet(backbone, finetune_steps=1, finetune_lr=0.05, momentum=0.0, augment=None).eval()
    p1, _ = one.finetune(sx, sy)
    theta = {n: p.detach().clone().requires_grad_() for n, p in backbone.named_parameters()}
    f = torch.func.functional_call(backbone, theta, (sx,))
    cent = torch.stack([f[sy == k].mean(0) for k in range(3)])
    loss = F.cross_entropy(-((f[:, None] - cent[None]) ** 2).sum(-1), sy)
    grads = torch.autograd.grad(loss, list(theta.values()))
    for (n, p), g in zip(theta.items(), grads):
        assert torch.allclose(p1[n], p - 0.05 * g), n


def test_choose_finetune_lr_and_trainer_test():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
    eps = [blob_episode(i) for i in range(4)]
    ft = FineTuneProtoNet(backbone, finetune_steps=2, finetune_lr=0.5, augment=None)
    scores = ft.choose_finetune_lr(loader(eps, 2), candidates=(0.0, 1e-3, 0.1))
    assert set(scores) == {0.0, 1e-3, 0.1} and ft.finetune_lr == max(scores, key=scores.get)
    assert ft.training  # restored
    res = trainer(inference_mode=False).test(ft, loader(eps, 2), verbose=False)[0]
    assert 0.0 <= res["test/acc"] <= 1.0
    ft.finetune_lr = 0.1
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        trainer(inference_mode=True).test(ft, loader(eps, 2), verbose=False)


def test_choose_finetune_lr_refuses_unlabelled_episodes_and_keeps_the_rate():
    ft = FineTuneProtoNet(nn.Linear(4, 6), finetune_steps=1, finetune_lr=0.5, augment=None)
    unlabelled = [Episode(e.support_x, e.support_y, e.query_x) for e in (blob_episode(i) for i in range(2))]
    with pytest.raises(ValueError, match="batch 0 has no query labels"):
        ft.choose_finetune_lr([Episode.collate(unlabelled)], candidates=(0.0, 0.1))
    assert ft.finetune_lr == 0.5


def test_timm_backbone_from_local_weights_file(tmp_path: Path):
    pytest.importorskip("timm")
    from lightning_meta.nn import TimmBackbone

    torch.manual_seed(0)
    src = TimmBackbone("resnet10t", None, in_channels=1)
    path = tmp_path / "resnet10t.pth"
    torch.save(src.features.state_dict(), path)
    torch.manual_seed(1)
    net = TimmBackbone("resnet10t", None, in_channels=1, checkpoint_path=path)
    assert all(
        torch.equal(a, b) for a, b in zip(src.features.state_dict().values(), net.features.state_dict().values())
    )
    g = torch.Generator().manual_seed(0)
    b = Episode(
        torch.rand(1, 4, 1, 16, 16, generator=g),
        torch.tensor([[0, 1, 0, 1]]),
        torch.rand(1, 2, 1, 16, 16, generator=g),
        torch.tensor([[0, 1]]),
    )
    ft = FineTuneProtoNet(net, finetune_steps=1, finetune_lr=1e-3).eval()
    assert ft(b).shape == (1, 2, 2)
