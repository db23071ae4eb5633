"""Learners on padded batches of variable-way, variable-shot episodes, against hand-written references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_meta.algorithms import MAML, ProtoNet
from lightning_meta.algorithms.padding import mask_absent_classes, run_unpadded
from lightning_meta.episode import Episode
from lightning_meta.nn import MLP
from tests.algorithms._meta_helpers import blob_episode, grads_of_training_step, trainer


def padded_batch() -> tuple[Episode, list[Episode]]:
    eps = [blob_episode(0, ways=3, shots=2, queries=2), blob_episode(1, ways=2, shots=4, queries=1)]
    eps = [Episode(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y) for e in eps]
    return Episode.collate(eps), eps


def hand_protonet_logits(f: nn.Module, e: Episode) -> torch.Tensor:
    ways = int(e.support_y.max()) + 1
    s, q = f(e.support_x), f(e.query_x)
    protos = torch.stack([s[e.support_y == k].mean(0) for k in range(ways)])
    return -((q[:, None, :] - protos[None]) ** 2).sum(-1)


def test_protonet_outputs_and_meta_gradient_equal_unpadded_tasks():
    torch.manual_seed(0)
    net = ProtoNet(nn.Sequential(nn.Linear(4, 5), nn.Tanh())).double()
    b, eps = padded_batch()
    assert b.is_padded
    out = net(b)
    assert out.shape == (2, 6, 3)
    for t, e in enumerate(eps):
        ref = hand_protonet_logits(net.backbone, e)
        n, w = len(e.query_y), ref.shape[1]
        assert torch.allclose(out[t, :n, :w], ref)
        assert bool(torch.isneginf(out[t, :n, w:]).all()) and not out[t, n:].any()
    grads = grads_of_training_step(net, b)
    net.zero_grad()
    loss = sum(F.cross_entropy(hand_protonet_logits(net.backbone, e), e.query_y) for e in eps) / 2
    loss.backward()
    for n, p in net.named_parameters():
        assert torch.allclose(grads[n], p.grad), n


def test_maml_max_ways_head_matches_hand_unrolled_step():
    torch.manual_seed(0)
    backbone = MLP(in_features=4, out_features=5, hidden=(6,)).double()  # head sized for the most ways (5)
    maml = MAML(backbone, inner_lr=0.3, inner_steps=1, task_mode="loop", task_chunk=None)
    b, eps = padded_batch()
    grads = grads_of_training_step(maml, b)
    theta = {n: p.detach().clone().requires_grad_() for n, p in backbone.named_parameters()}
    total = 0.0
    for e in eps:  # inner step on all head logits; query loss over the task's classes only (absent ones masked)
        inner = F.cross_entropy(torch.func.functional_call(backbone, theta, (e.support_x,)), e.support_y)
        g = torch.autograd.grad(inner, list(theta.values()), create_graph=True)
        fast = {n: p - 0.3 * gi for (n, p), gi in zip(theta.items(), g)}
        ways = int(e.support_y.max()) + 1
        logits = torch.func.functional_call(backbone, fast, (e.query_x,))[:, :ways]
        total = total + F.cross_entropy(logits, e.query_y) / 2
    ref = torch.autograd.grad(total, list(theta.values()))
    for (n, _), r in zip(theta.items(), ref):
        assert torch.allclose(grads[f"backbone.{n}"], r), n
    maml.eval()
    out = maml(b)
    assert (
        out.shape == (2, 6, 5)
        and bool(torch.isneginf(out[1, :2, 2:]).all())
        and bool(torch.isneginf(out[0, :, 3:]).all())
    )


def test_too_small_head_and_padding_helpers():
    with pytest.raises(ValueError, match="returned 2 logits for a 3-way task"):
        mask_absent_classes(torch.zeros(1, 2), 3, 3)
    b, _ = padded_batch()
    maml = MAML(MLP(in_features=4, out_features=2, hidden=(6,)).double(), task_mode="loop")
    with pytest.raises((ValueError, IndexError), match="size its head for the most ways|out of bounds"):
        maml(b)  # the inner loop's cross-entropy or the query masking refuses it, never a silent result
    with pytest.raises(ValueError, match="classification episodes only"):
        run_unpadded(
            lambda *a: a[2], Episode(torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.zeros(1, 1, 1), torch.zeros(1, 1))
        )


def test_fit_and_test_with_ci_on_padded_batches():
    from tests.algorithms._meta_helpers import loader

    eps = [blob_episode(i, ways=2 + i % 3, shots=1 + i % 2, queries=2 + i % 2) for i in range(8)]
    net = ProtoNet(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)))
    tr = trainer(max_steps=4, inference_mode=True)
    tr.fit(net, loader(eps, 4))
    res = tr.test(net, loader(eps, 4), verbose=False)[0]
    per_episode = []
    net.eval()
    with torch.no_grad():
        for e in eps:  # each episode alone, no padding
            logits = hand_protonet_logits(net.backbone, e)
            per_episode.append((logits.argmax(1) == e.query_y).double().mean().item())
    from lightning_meta.functional import mean_ci95

    mean, ci = mean_ci95(per_episode)
    assert res["test/acc"] == pytest.approx(mean, abs=1e-6) and res["test/acc_ci95"] == pytest.approx(ci, abs=1e-6)


@pytest.mark.parametrize("make", ["anil", "metasgd", "simpleshot", "finetune", "protomaml"])
def test_other_learners_on_a_padded_batch_equal_each_task_alone(make):
    from lightning_meta.algorithms import ANIL, FineTuneProtoNet, MetaSGD, ProtoMAML, SimpleShot

    torch.manual_seed(0)
    net = {
        "anil": lambda: ANIL(MLP(in_features=4, out_features=5, hidden=(6,)), inner_steps=2, task_mode="loop"),
        "metasgd": lambda: MetaSGD(MLP(in_features=4, out_features=5, hidden=(6,)), task_mode="loop"),
        "simpleshot": lambda: SimpleShot(nn.Linear(4, 6), normalization="L2N"),
        "finetune": lambda: FineTuneProtoNet(nn.Linear(4, 6), finetune_steps=2, finetune_lr=0.1, augment=None),
        "protomaml": lambda: ProtoMAML(nn.Sequential(nn.Linear(4, 6), nn.Tanh()), inner_lr=0.3, inner_steps=2),
    }[make]().double()
    b, eps = padded_batch()
    for mode in ("train", "eval"):
        net.train(mode == "train")
        out = net(b)
        for t, e in enumerate(eps):
            alone = net(Episode.collate([e]))[0]
            n, w = len(e.query_y), int(e.support_y.max()) + 1
            assert torch.allclose(out[t, :n, :w], alone[:, :w]), (make, mode, t)
            assert bool(torch.isneginf(out[t, :n, w:]).all())


def test_cli_head_check_uses_max_ways_of_variable_episodes():
    from types import SimpleNamespace

    from lightning_meta.cli import check_ways
    from lightning_meta.datamodules import VariableEpisodes

    maml = MAML(MLP(in_features=4, out_features=10, hidden=(6,)))
    check_ways(maml, SimpleNamespace(ways=5, eval_ways=5, variable_episodes=VariableEpisodes(max_ways=10)))
    with pytest.raises(ValueError, match="20-way .*variable_episodes.max_ways"):
        check_ways(maml, SimpleNamespace(ways=5, eval_ways=5, variable_episodes=VariableEpisodes(max_ways=20)))


def count_label_checks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Shapes of the label tensors compared with 0 (`Episode.is_padded`'s check, a device sync), as they happen."""
    real, seen = torch.Tensor.__lt__, []

    def lt(self, other):
        if isinstance(other, int) and other == 0 and self.dtype == torch.long:
            seen.append(tuple(self.shape))
        return real(self, other)

    monkeypatch.setattr(torch.Tensor, "__lt__", lt)
    return seen


@pytest.mark.parametrize("task_chunk", ["auto", None, 1])
def test_a_training_step_checks_the_padding_of_an_unpadded_batch_once(monkeypatch, task_chunk):
    """`Episode.is_padded` synchronises with the device: asked by the task-chunk resolution, the graph runner and
    every chunk's forward, it must read the labels once per step (the chunks of an unpadded batch inherit it)."""
    torch.manual_seed(0)
    model = MAML(MLP(4, 3, hidden=(8,)), inner_steps=1, task_chunk=task_chunk).train()
    seen = count_label_checks(monkeypatch)
    for step in range(3):  # 4 tasks of 9 support rows: 4 chunks of one task under "auto" and 1
        batch = Episode.collate([blob_episode(4 * step + i, shots=3, queries=1) for i in range(4)])
        model.training_step(batch, step)
        assert seen.count((4, 9)) == step + 1  # the batch's support labels, once per step
        assert not [s for s in seen if s != (4, 9) and s != (4, 3)]  # and no chunk's labels


def test_a_padded_batch_is_checked_once_and_its_chunks_by_their_own_labels(monkeypatch):
    """Its values are test_maml_max_ways_head_matches_hand_unrolled_step's; here only the checks are counted."""
    torch.manual_seed(0)
    model = MAML(MLP(4, 3, hidden=(8,)), inner_steps=1).double().train()
    b, _ = padded_batch()
    seen = count_label_checks(monkeypatch)
    model.training_step(b, 0)
    assert seen.count(tuple(b.support_y.shape)) == 1  # the batch itself: once
    assert len(seen) > 2 and all(s[0] == 1 for s in seen[2:])  # then its one-task chunks, whose padding differs
