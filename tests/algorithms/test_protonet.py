"""ProtoNet: logits equal a hand computation; evaluation runs under inference mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_meta.algorithms import ProtoNet
from lightning_meta.episode import Episode
from lightning_meta.nn import conv4_protonet
from tests.algorithms._meta_helpers import blob_episode, loader, trainer

pytestmark = pytest.mark.filterwarnings("ignore:.*self.log.*")  # Lightning's advice for real training runs


def test_logits_equal_hand_computation() -> None:
    torch.manual_seed(0)
    net = ProtoNet(nn.Linear(4, 3, bias=False).double())
    sx, qx = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    sy = torch.tensor([[2, 0, 1, 1, 0, 2], [0, 0, 1, 1, 2, 2]])
    logits = net(Episode(sx, sy, qx, torch.zeros(2, 5, dtype=torch.long)))
    w = net.backbone.weight.detach()
    for t in range(2):
        for k in range(3):
            proto = sum(sx[t, i] @ w.T for i in range(6) if sy[t, i] == k) / 2
            for q in range(5):
                d = qx[t, q] @ w.T - proto
                torch.testing.assert_close(logits[t, q, k], -(d * d).sum())


def test_fit_and_test_under_inference_mode() -> None:
    torch.manual_seed(0)
    net = ProtoNet(nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8)), meta_lr=1e-2)
    val = loader([blob_episode(i, ways=5) for i in range(20)], tasks=10)
    t = trainer(max_epochs=2, inference_mode=True)
    t.fit(net, loader([blob_episode(100 + i, ways=5) for i in range(200)], tasks=10))
    result = t.test(net, val, verbose=False)[0]
    assert result["test/acc"] > 0.85 and 0 < result["test/acc_ci95"] < 0.1


def test_conv4_protonet_embedding_shapes() -> None:
    assert conv4_protonet(1, 28)(torch.randn(2, 1, 28, 28)).shape == (2, 64)
    assert conv4_protonet(3, 84)(torch.randn(2, 3, 84, 84)).shape == (2, 1600)
