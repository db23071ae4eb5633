"""Matching Networks: cosine attention equals a hand computation; full context embeddings behave as the paper's."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_meta.algorithms import MatchingNetworks
from lightning_meta.algorithms.matching_networks import FullContextEmbedding, cosine_attention_log_probs
from lightning_meta.episode import Episode
from tests.algorithms._meta_helpers import blob_episode, loader, trainer

pytestmark = pytest.mark.filterwarnings("ignore:.*(self.log|num_workers|val_dataloader|precision).*")


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_outputs_equal_cosine_attention_by_hand(scale: float) -> None:
    torch.manual_seed(0)
    net = MatchingNetworks(nn.Linear(4, 3).double(), scale=scale)
    sx, qx = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    sy = torch.tensor([[2, 0, 1, 1, 0, 2], [0, 0, 1, 1, 2, 2]])
    out = net(Episode(sx, sy, qx, torch.zeros(2, 5, dtype=torch.long)))
    assert out.shape == (2, 5, 3)
    w, b = net.backbone.weight.detach(), net.backbone.bias.detach()
    for t in range(2):
        for q in range(5):
            f = qx[t, q] @ w.T + b
            cos = []
            for i in range(6):
                g = sx[t, i] @ w.T + b
                cos.append(scale * float(f @ g) / math.sqrt(float(f @ f) * float(g @ g)))
            z = sum(math.exp(c) for c in cos)
            for k in range(3):
                p = sum(math.exp(c) / z for c, y in zip(cos, sy[t].tolist()) if y == k)
                assert out[t, q, k].item() == pytest.approx(math.log(p), rel=1e-12, abs=1e-12)


def test_learned_scale_starts_at_scale_and_gets_the_gradient_of_the_loss() -> None:
    torch.manual_seed(0)
    sx, qx = torch.randn(1, 4, 3, dtype=torch.float64), torch.randn(1, 2, 3, dtype=torch.float64)
    sy, qy = torch.tensor([[0, 1, 0, 1]]), torch.tensor([[1, 0]])
    net = MatchingNetworks(nn.Identity(), scale=4.0, learn_scale=True).double()
    assert net.log_scale is not None and net.log_scale.item() == pytest.approx(math.log(4.0))
    loss = -net(Episode(sx, sy, qx, qy)).gather(-1, qy.unsqueeze(-1)).sum()
    loss.backward()

    def loss_at(log_s: float) -> float:  # the same loss with the scale fixed, by central differences
        out = cosine_attention_log_probs(sx, sy, qx, 2, math.exp(log_s))
        return float(-out.gather(-1, qy.unsqueeze(-1)).sum())

    eps = 1e-6
    fd = (loss_at(math.log(4.0) + eps) - loss_at(math.log(4.0) - eps)) / (2 * eps)
    assert net.log_scale.grad is not None and net.log_scale.grad.item() == pytest.approx(fd, rel=1e-6)
    with pytest.raises(ValueError, match="scale=0"):
        MatchingNetworks(nn.Identity(), scale=0.0)


def test_outputs_are_log_probabilities_and_loss_is_minus_log_p() -> None:
    torch.manual_seed(1)
    net = MatchingNetworks(nn.Linear(4, 3).double())
    e = Episode.collate([blob_episode(i) for i in range(3)])
    e = Episode(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y)
    out = net(e)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3, 6, dtype=torch.float64))
    losses, _ = net.task_losses(e)
    minus_log_p = -out.gather(-1, e.query_y.unsqueeze(-1)).squeeze(-1).mean(-1)
    torch.testing.assert_close(losses, minus_log_p)


def test_without_fce_support_order_does_not_matter() -> None:
    torch.manual_seed(2)
    net = MatchingNetworks(nn.Linear(4, 3).double())
    sx, qx = torch.randn(1, 6, 4, dtype=torch.float64), torch.randn(1, 5, 4, dtype=torch.float64)
    sy = torch.tensor([[2, 0, 1, 1, 0, 2]])
    perm = torch.randperm(6)
    a = net(Episode(sx, sy, qx, sy[:, :5]))
    b = net(Episode(sx[:, perm], sy[:, perm], qx, sy[:, :5]))
    torch.testing.assert_close(a, b)


def test_missing_class_in_support_is_an_error() -> None:
    with pytest.raises(ValueError, match="class 1 has no support example in task 0"):
        cosine_attention_log_probs(torch.randn(1, 2, 3), torch.tensor([[0, 2]]), torch.randn(1, 1, 3), 3)


def fce_model() -> FullContextEmbedding:
    torch.manual_seed(0)
    return FullContextEmbedding(4, read_steps=3).double()


def test_fce_query_embedding_is_per_query_and_independent_of_support_order() -> None:
    fce = fce_model()
    g = fce.support(torch.randn(2, 6, 4, dtype=torch.float64))
    q = torch.randn(2, 5, 4, dtype=torch.float64)
    f = fce.query(q, g)
    assert f.shape == (2, 5, 4)
    perm = torch.randperm(5)
    torch.testing.assert_close(fce.query(q[:, perm], g), f[:, perm])  # other queries do not matter
    torch.testing.assert_close(fce.query(q[:, :1], g), f[:, :1])  # alone or with others: the same
    torch.testing.assert_close(fce.query(q, g[:, torch.randperm(6)]), f)  # the reads are sums over the support set
    assert not torch.allclose(f, q)  # the read steps change the embedding


def test_fce_support_embedding_depends_on_support_order_as_a_bidirectional_lstm() -> None:
    fce = fce_model()
    s = torch.randn(1, 6, 4, dtype=torch.float64)
    g = fce.support(s)
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    g_perm = fce.support(s[:, perm])
    assert not torch.allclose(g_perm, g[:, perm], atol=1e-6)  # a set function would be equivariant
    # g_i sees the whole set: changing the last support example changes the first one's embedding
    s2 = s.clone()
    s2[0, -1] += 1.0
    assert not torch.allclose(fce.support(s2)[0, 0], g[0, 0])
    # h_fwd + h_bwd + skip: with the LSTM's outputs computed by nn.LSTM itself
    out, _ = fce.support_lstm(s)
    torch.testing.assert_close(g, out[..., :4] + out[..., 4:] + s)


def test_fce_gradients_match_finite_differences() -> None:
    fce = FullContextEmbedding(3, read_steps=2).double()
    support = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    query = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    sy = torch.tensor([[0, 1, 1, 0]])
    params = dict(fce.named_parameters())
    w_read = params["read_hidden.weight"].detach().clone().requires_grad_()
    w_lstm = params["support_lstm.weight_hh_l0_reverse"].detach().clone().requires_grad_()

    def full(s, q, wr, wl):
        tensors = {**params, "read_hidden.weight": wr, "support_lstm.weight_hh_l0_reverse": wl}
        g = torch.func.functional_call(_Both(fce), {f"m.{k}": v for k, v in tensors.items()}, (s, q))
        return cosine_attention_log_probs(g[0], sy, g[1], 2)

    assert torch.autograd.gradcheck(full, (support, query, w_read, w_lstm), eps=1e-6, atol=1e-5)


class _Both(nn.Module):
    """Wraps a FullContextEmbedding so that functional_call can run ``support`` then ``query``."""

    def __init__(self, m: FullContextEmbedding) -> None:
        super().__init__()
        self.m = m

    def forward(self, s, q):
        g = self.m.support(s)
        return g, self.m.query(q, g)


def test_fce_model_outputs_use_f_and_g() -> None:
    torch.manual_seed(3)
    net = MatchingNetworks(nn.Linear(4, 3).double(), fce=True, read_steps=2, embedding_dim=3)
    net.context.double()
    sx, qx = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    sy = torch.tensor([[2, 0, 1, 1, 0, 2], [0, 0, 1, 1, 2, 2]])
    out = net(Episode(sx, sy, qx, sy[:, :5]))
    g = net.context.support(net.backbone(sx))
    f = net.context.query(net.backbone(qx), g)
    torch.testing.assert_close(out, cosine_attention_log_probs(g, sy, f, 3))
    perm = torch.randperm(5)
    torch.testing.assert_close(net(Episode(sx, sy, qx[:, perm], sy[:, :5])), out[:, perm])


def test_fce_needs_the_embedding_size() -> None:
    with pytest.raises(ValueError, match="embedding_dim"):
        MatchingNetworks(nn.Linear(4, 3), fce=True)
    assert MatchingNetworks(nn.Linear(4, 3), fce=True, embedding_dim=3).context.dim == 3


def mean_loss(net: MatchingNetworks, episodes: list[Episode]) -> float:
    net.eval()
    with torch.no_grad():
        losses, _ = net.task_losses(Episode.collate(episodes))
    net.train()
    return float(losses.mean())


@pytest.mark.parametrize("fce", [False, True])
def test_training_lowers_the_loss(fce: bool) -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
    net = MatchingNetworks(backbone, fce=fce, read_steps=2, embedding_dim=8, meta_lr=1e-2)
    held_out = [blob_episode(1000 + i) for i in range(20)]
    before = mean_loss(net, held_out)
    trainer(max_steps=30).fit(net, loader([blob_episode(i) for i in range(120)], tasks=4))
    after = mean_loss(net, held_out)
    assert after < before - 0.05, (before, after)


@pytest.mark.parametrize("fce", [False, True])
def test_bf16_mixed_trains_and_stays_finite(fce: bool) -> None:
    torch.manual_seed(0)
    net = MatchingNetworks(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)), fce=fce, read_steps=2, embedding_dim=8
    )
    before = [p.detach().clone() for p in net.parameters()]
    t = trainer(max_steps=3, precision="bf16-mixed")
    t.fit(net, loader([blob_episode(i) for i in range(12)], tasks=4))
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert all(not torch.equal(b, p) for b, p in zip(before, net.parameters()))  # every part got gradient
    assert net.skipped_steps == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(Episode.collate([blob_episode(50)]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_evaluation_runs_under_inference_mode() -> None:
    torch.manual_seed(0)
    net = MatchingNetworks(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8)))
    (metrics,) = trainer(inference_mode=True).test(
        net, loader([blob_episode(i) for i in range(8)], tasks=4), verbose=False
    )
    assert 0.0 <= metrics["test/acc"] <= 1.0


def test_regression_targets_are_rejected() -> None:
    x = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="classifier"):
        MatchingNetworks(nn.Flatten())(Episode(x, torch.randn(1, 4), x, torch.randn(1, 4)))
