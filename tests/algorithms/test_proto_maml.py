"""Proto-MAML: the prototype head, ProtoNet parity before any step, and meta-gradients against a hand-unrolled
float64 reference (first and second order, loop and vmap)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_meta.algorithms import ProtoMAML
from lightning_meta.algorithms.protonet import prototype_logits
from lightning_meta.episode import Episode
from lightning_meta.nn import Conv4
from tests.algorithms._meta_helpers import blob_episode, grads_of_training_step, loader, trainer

pytestmark = pytest.mark.filterwarnings("ignore:.*(self.log|num_workers|val_dataloader|precision|eval mode).*")


def batch(tasks: int = 3, ways: int = 3, shots: int = 2) -> Episode:
    e = Episode.collate([blob_episode(i, ways=ways, shots=shots) for i in range(tasks)])
    return Episode(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y)


def linear_model(**kwargs) -> ProtoMAML:
    torch.manual_seed(0)
    return ProtoMAML(nn.Linear(4, 5).double(), **kwargs)


def test_initial_head_is_the_prototype_formula() -> None:
    net = linear_model()
    b = batch()
    w, a = net.backbone.weight.detach(), net.backbone.bias.detach()
    for t in range(b.tasks):
        weight, bias = net.initial_head(b.support_x[t], b.support_y[t], 3)
        for k in range(3):
            rows = [b.support_x[t, i] @ w.T + a for i in range(6) if b.support_y[t, i] == k]
            c = sum(rows) / len(rows)
            torch.testing.assert_close(weight[k], 2 * c)
            torch.testing.assert_close(bias[k], -(c * c).sum())


@pytest.mark.parametrize("shots", [1, 3])
def test_zero_steps_predict_as_protonet(shots: int) -> None:
    net = linear_model(inner_steps=0)
    b = batch(ways=4, shots=shots)
    out = net(b)  # (tasks, queries, ways)
    emb_s, emb_q = net.backbone(b.support_x), net.backbone(b.query_x)
    proto = prototype_logits(emb_s, b.support_y, emb_q, 4)
    torch.testing.assert_close(out.softmax(-1), proto.softmax(-1))
    shift = out - proto  # a per-query constant: ||f(x)||^2
    torch.testing.assert_close(shift, shift[..., :1].expand_as(shift))
    torch.testing.assert_close(shift[..., 0], (emb_q**2).sum(-1))


def reference_meta_grads(net: ProtoMAML, b: Episode, lr: float, steps: int, first_order: bool, adapt_body: bool):
    """Outer gradient of the mean query loss, with the inner gradients of the linear backbone written out."""
    A = net.backbone.weight.detach().clone().requires_grad_()
    a = net.backbone.bias.detach().clone().requires_grad_()
    total = 0.0
    for t in range(b.tasks):
        sx, sy, qx, qy = b.support_x[t], b.support_y[t], b.query_x[t], b.query_y[t]
        ways = int(sy.max()) + 1
        e = sx @ A.T + a
        protos = torch.stack([e[sy == k].mean(0) for k in range(ways)])
        W, c = 2 * protos, -(protos**2).sum(-1)
        A_t, a_t = A, a
        onehot = F.one_hot(sy, ways).double()
        for _ in range(steps):
            e = sx @ A_t.T + a_t
            D = ((e @ W.T + c).softmax(-1) - onehot) / len(sy)  # d mean-CE / d logits
            gW, gc, de = D.T @ e, D.sum(0), D @ W
            gA, ga = de.T @ sx, de.sum(0)
            if first_order:
                gW, gc, gA, ga = gW.detach(), gc.detach(), gA.detach(), ga.detach()
            W, c = W - lr * gW, c - lr * gc
            if adapt_body:
                A_t, a_t = A_t - lr * gA, a_t - lr * ga
        total = total + F.cross_entropy((qx @ A_t.T + a_t) @ W.T + c, qy)
    gA, ga = torch.autograd.grad(total / b.tasks, [A, a])
    return {"backbone.weight": gA, "backbone.bias": ga}


@pytest.mark.parametrize("task_mode", ["loop", "vmap"])
@pytest.mark.parametrize("first_order", [True, False])
@pytest.mark.parametrize("adapt_body", [True, False])
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradients_equal_hand_unrolled_reference(
    task_mode: str, first_order: bool, adapt_body: bool, steps: int
) -> None:
    net = linear_model(
        inner_lr=0.3, inner_steps=steps, first_order=first_order, adapt_body=adapt_body, task_mode=task_mode
    )
    b = batch()
    got = grads_of_training_step(net, b)
    want = reference_meta_grads(net, b, 0.3, steps, first_order, adapt_body)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12)
    assert got["backbone.weight"].abs().sum() > 0  # the prototype initialisation passes the gradient on


def test_first_and_second_order_differ() -> None:
    b = batch()
    fo = grads_of_training_step(linear_model(inner_lr=0.3, inner_steps=2, first_order=True), b)
    so = grads_of_training_step(linear_model(inner_lr=0.3, inner_steps=2, first_order=False), b)
    assert not torch.allclose(fo["backbone.weight"], so["backbone.weight"])


@pytest.mark.parametrize("first_order", [True, False])
def test_loop_equals_vmap_on_conv4(first_order: bool) -> None:
    torch.manual_seed(0)
    backbone = Conv4(None, hidden=4, downsample="maxpool", pooling="flatten", image_size=28).double()
    g = torch.Generator().manual_seed(0)
    sx, qx = (
        torch.rand(2, 6, 1, 28, 28, generator=g, dtype=torch.float64),
        torch.rand(2, 6, 1, 28, 28, generator=g, dtype=torch.float64),
    )
    y = torch.tensor([[0, 1, 2, 2, 1, 0], [2, 2, 0, 0, 1, 1]])
    b = Episode(sx, y, qx, y)
    results = {}
    for mode in ("loop", "vmap"):
        net = ProtoMAML(backbone, inner_lr=0.1, inner_steps=2, first_order=first_order, task_mode=mode)
        results[mode] = (net(b), grads_of_training_step(net, b))
    torch.testing.assert_close(results["loop"][0], results["vmap"][0])
    for name, grad in results["loop"][1].items():
        torch.testing.assert_close(grad, results["vmap"][1][name], rtol=1e-7, atol=1e-10)


def test_evaluation_adapts_with_eval_inner_steps_and_detached_weights() -> None:
    b = batch()
    net = linear_model(inner_lr=0.3, inner_steps=2, eval_inner_steps=0)
    net.eval()
    with torch.no_grad():
        out = net(b)
    protonet = ProtoMAML(net.backbone, inner_steps=0)
    torch.testing.assert_close(out, protonet(b))
    net.eval_inner_steps = 2
    with torch.no_grad():
        evaluated = net(b)
    net.train()
    torch.testing.assert_close(evaluated, net(b).detach())  # first order at evaluation: same values


def test_training_lowers_the_loss() -> None:
    torch.manual_seed(0)
    net = ProtoMAML(
        nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8)),
        inner_lr=0.1,
        inner_steps=2,
        meta_lr=1e-2,
        task_mode="loop",
    )
    held_out = Episode.collate([blob_episode(1000 + i) for i in range(20)])

    def loss() -> float:
        with torch.no_grad():
            net.eval()
            value = float(net.task_losses(held_out)[0].mean())
            net.train()
        return value

    before = loss()
    trainer(max_steps=30).fit(net, loader([blob_episode(i) for i in range(120)], tasks=4))
    after = loss()
    assert after < before - 0.05, (before, after)


def test_bf16_mixed_trains_and_stays_finite() -> None:
    torch.manual_seed(0)
    net = ProtoMAML(
        Conv4(None, hidden=4, downsample="maxpool", pooling="flatten", image_size=28), inner_steps=2, task_mode="loop"
    )
    before = [p.detach().clone() for p in net.parameters()]
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(2)
    episodes = [
        Episode(torch.rand(6, 1, 28, 28, generator=g), y, torch.rand(6, 1, 28, 28, generator=g), y) for _ in range(8)
    ]
    t = trainer(max_steps=2, precision="bf16-mixed")
    t.fit(net, loader(episodes, tasks=4))
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))
    assert net.skipped_steps == 0


def test_bad_backbones_and_targets_are_rejected() -> None:
    with pytest.raises(ValueError, match="running statistics"):
        ProtoMAML(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    bad = nn.Module()
    bad.proto_head = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="rename"):
        ProtoMAML(bad)
    x = torch.randn(1, 4, 4)
    with pytest.raises(ValueError, match="classifier"):
        ProtoMAML(nn.Linear(4, 2), task_mode="loop")(Episode(x, torch.randn(1, 4), x, torch.randn(1, 4)))


def test_adapt_alone_reads_the_ways_from_the_labels() -> None:
    net = linear_model(inner_steps=1)
    b = batch()
    state = net.adapt(b.support_x[0], b.support_y[0])
    assert set(state) == {"weight", "bias", "proto_head.weight", "proto_head.bias"}
    assert state["proto_head.weight"].shape == (3, 5)
    torch.testing.assert_close(net.predict(state, b.query_x[0]), net(b)[0])


@pytest.mark.parametrize("shots", [1, 2])
def test_per_task_pair_without_ways_runs_under_vmap_with_the_same_loss_and_gradients(shots: int) -> None:
    """The base class times ``adapt``/``predict`` under vmap without the number of ways (``task_chunk="auto"``):
    the padded head must give the loss and meta-gradient of the exact one."""
    from lightning_meta.functional import vmap_tasks

    b = batch(ways=3, shots=shots)
    net = linear_model(inner_lr=0.3, inner_steps=2, first_order=False, task_mode="loop")

    def loss_of(outputs):
        return F.cross_entropy(outputs.flatten(0, 1), b.query_y.flatten())

    exact = net(b)
    padded = vmap_tasks(lambda sx, sy, qx: net.predict(net.adapt(sx, sy), qx), b.support_x, b.support_y, b.query_x)
    assert padded.shape[-1] == 3 * shots and torch.isfinite(padded).all()
    torch.testing.assert_close(padded[..., :3], exact)
    torch.testing.assert_close(padded.argmax(-1), exact.argmax(-1))
    params = list(net.parameters())
    grads_padded = torch.autograd.grad(loss_of(padded), params)
    torch.testing.assert_close(grads_padded, torch.autograd.grad(loss_of(exact), params))


def test_task_chunk_auto_times_vmap_with_the_learners_own_pair() -> None:
    net = linear_model(inner_steps=1, task_mode="auto", task_chunk="auto")
    messages: list[str] = []
    net.task_mode_selector.report = messages.append
    _chunk, mode = net.resolve_task_chunk(batch())
    assert mode in ("loop", "vmap") and not any("vmap failed" in m for m in messages), messages
