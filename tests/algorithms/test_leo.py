"""LEO: latent and fine-tuning updates against hand computations, penalties, sigma clamp, the LEO
release pickle format, frozen-backbone feature episodes, bf16 and learning."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_meta.algorithms.leo import LEO, _split_gaussian, orthogonality
from lightning_meta.datamodules.features import FeatureDataModule, LEOEmbeddingDataModule
from tests.algorithms._meta_helpers import blob_episode, loader, trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(self.log|num_workers|val_dataloader|sync_dist|precision).*"
)  # Lightning's advice for real training runs


def tiny_leo(**kw) -> LEO:
    torch.manual_seed(0)
    return LEO(feature_dim=4, ways=3, latent_dim=2, dropout=0.0, **kw).double().eval()


def task():
    e = blob_episode(0, ways=3, shots=2, queries=2, dim=4)
    return e.support_x.double(), e.support_y


def hand_grad_wrt_example_weights(w, x, y, ways):
    """d CE(x . mean-of-class(w)) / d w, by hand."""
    onehot = F.one_hot(y, ways).double()
    cn = onehot / onehot.sum(0)  # (examples, ways): class means
    logits = x @ (cn.T @ w).T
    dlogits = (logits.softmax(-1) - onehot) / len(x)
    return cn @ (dlogits.T @ x)  # (examples, feature_dim)


def test_latent_step_equals_hand_computation() -> None:
    leo = tiny_leo()
    with torch.no_grad():
        leo.latent_lr.copy_(torch.tensor([0.7, 1.3]))
    x, y = task()
    z0, onehot, _ = leo.encode(x, y)
    z1 = leo.latent_steps(z0, x, y, onehot, steps=1, first_order=False)
    w_mu = leo.decoder.weight[:4].detach()  # (feature_dim, latent): the mean half of the decoder
    dz = hand_grad_wrt_example_weights(z0.detach() @ w_mu.T, x, y, 3) @ w_mu
    torch.testing.assert_close(z1.detach(), z0.detach() - torch.tensor([0.7, 1.3]).double() * dz)


def test_finetune_step_equals_hand_computation() -> None:
    leo = tiny_leo()
    x, y = task()
    onehot = F.one_hot(y, 3).double()
    w0 = torch.randn(6, 4, dtype=torch.float64)
    with torch.no_grad():
        leo.finetune_lr.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    w1 = leo.finetune(w0, x, y, onehot, steps=1, first_order=False)
    torch.testing.assert_close(w1.detach(), w0 - leo.finetune_lr.detach() * hand_grad_wrt_example_weights(w0, x, y, 3))


def test_encoder_averages_relation_codes_per_class() -> None:
    leo = tiny_leo()
    x, y = task()
    z, _, kl = leo.encode(x, y)
    codes = x @ leo.encoder.weight.T
    m = len(codes)
    rel = torch.stack(
        [torch.stack([leo.relation(torch.cat([codes[i], codes[j]])) for j in range(m)]).mean(0) for i in range(m)]
    )
    for i in range(m):
        mu_class = rel[y == y[i]].mean(0)[:2]
        torch.testing.assert_close(z[i], mu_class)  # evaluation: z = mu of its class
    assert float(kl) == 0.0


def test_sigma_is_clamped_and_kl_is_finite() -> None:
    _, sigma = _split_gaussian(torch.tensor([[0.0, 0.0, -50.0, 0.0]]), 1.0)
    assert sigma.min() == 1e-10 and torch.isfinite(sigma).all()
    _, sigma = _split_gaussian(torch.tensor([[0.0, 500.0]]), 1.0)
    assert torch.isfinite(sigma).all()
    leo = tiny_leo().train()
    x, y = task()
    with torch.no_grad():
        leo.relation[-1].weight.fill_(-10.0)  # drives sigma_raw very negative
    _, _, kl = leo.encode(x, y)
    assert torch.isfinite(kl)


def test_penalties_orthogonality_and_stopgrad_encoder_penalty() -> None:
    w = torch.randn(3, 7, dtype=torch.float64)
    c = (w @ w.T) / (w.norm(dim=1, keepdim=True) @ w.norm(dim=1, keepdim=True).T)
    torch.testing.assert_close(orthogonality(w), ((c - torch.eye(3, dtype=torch.float64)) ** 2).mean())
    q, _ = torch.linalg.qr(torch.randn(7, 3, dtype=torch.float64))
    assert float(orthogonality(q.T)) < 1e-20
    leo = tiny_leo().train()
    x, y = task()
    state = leo.adapt(x, y)
    # ||stopgrad(z') - z||^2 reaches the encoder, not the latent rate that produced z'.
    (g_lr,) = torch.autograd.grad(state["encoder_penalty"], leo.latent_lr, allow_unused=True)
    assert g_lr is None or g_lr.abs().max() == 0
    g_enc = torch.autograd.grad(state["encoder_penalty"], leo.encoder.weight)[0]
    assert g_enc.abs().max() > 0


def write_release(root, dim: int = 640, classes: int = 6, per_class: int = 5):
    """Tiny pickles in the LEO release layout: embeddings, labels and keys '<i>-<class>-<image>'."""
    rng = np.random.default_rng(0)
    table = {}
    for s, split in enumerate(["train", "val", "test"]):
        names = [f"n{s}{c:07d}" for c in range(classes)]
        rows = [(i, n) for n in names for i in range(per_class)]
        rng.shuffle(rows)
        emb = np.abs(0.1 * rng.standard_normal((len(rows), dim))).astype(np.float32)  # post-ReLU-like, as WRN features
        keys = [f"{k}-{n}-{n}_{i:05d}.jpg" for k, (i, n) in enumerate(rows)]
        labels = np.array([names.index(n) for _, n in rows])
        with open(root / f"{split}_embeddings.pkl", "wb") as fh:
            pickle.dump({"embeddings": emb, "labels": labels, "keys": keys}, fh, protocol=2)
        table[split] = {tuple(e.tolist()[:3]): n for e, (_, n) in zip(emb, rows)}
    return table


def test_leo_release_pickles_give_class_consistent_episodes_and_train(tmp_path) -> None:
    table = write_release(tmp_path)
    dm = LEOEmbeddingDataModule(
        str(tmp_path), ways=3, shots=2, queries=2, tasks_per_batch=2, train_episodes=4, test_episodes=2
    )
    dm.setup()
    ep = dm.datasets["train"][1]
    assert ep.support_x.shape == (6, 640) and ep.query_x.shape == (6, 640)
    names = {}
    for x, y in zip(torch.cat([ep.support_x, ep.query_x]), torch.cat([ep.support_y, ep.query_y])):
        names.setdefault(int(y), set()).add(table["train"][tuple(x.tolist()[:3])])
    assert all(len(v) == 1 for v in names.values()) and len(set.union(*names.values())) == 3
    model = LEO(feature_dim=640, ways=3, latent_dim=8, task_mode="loop")
    before = [p.detach().clone() for p in model.parameters()]
    t = trainer(max_steps=2, limit_val_batches=0)
    t.fit(model, dm)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert 0 <= t.test(model, dm, verbose=False)[0]["test/acc"] <= 1


def test_feature_datamodule_caches_backbone_features_of_the_same_episodes(omniglot_dir) -> None:
    from lightning_meta.datamodules import OmniglotDataModule

    images = OmniglotDataModule(
        str(omniglot_dir),
        split="seeded",
        ways=5,
        shots=1,
        queries=2,
        tasks_per_batch=2,
        train_episodes=4,
        test_episodes=4,
    )
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 8))
    feats = FeatureDataModule(images, backbone)
    feats.setup()
    images.setup()
    for split, i in [("train", 3), ("test", 1)]:
        a, b = feats.datasets[split][i], images.datasets[split][i]
        assert torch.equal(a.support_y, b.support_y) and torch.equal(a.query_y, b.query_y)
        with torch.no_grad():
            torch.testing.assert_close(a.support_x, backbone(b.support_x))
            torch.testing.assert_close(a.query_x, backbone(b.query_x))
    assert not any(p.requires_grad for p in backbone.parameters())


def test_bf16_mixed_trains_leo() -> None:
    torch.manual_seed(0)
    model = LEO(feature_dim=4, ways=3, latent_dim=2, task_mode="loop")
    before = [p.detach().clone() for p in model.parameters()]
    t = trainer(max_steps=2, precision="bf16-mixed")
    t.fit(model, loader([blob_episode(i) for i in range(4)], tasks=2))
    assert torch.isfinite(t.callback_metrics["train/loss"]) and model.skipped_steps == 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_leo_learns_blob_tasks() -> None:
    """On Gaussian-blob tasks the adapted classifier beats chance by far after brief meta-training."""
    torch.manual_seed(0)
    model = LEO(feature_dim=4, ways=3, latent_dim=4, dropout=0.0, meta_lr=3e-3, task_mode="loop", kl_weight=0.01)
    val = loader([blob_episode(10_000 + i, queries=5) for i in range(30)], tasks=30)
    t = trainer(max_epochs=1)
    t.fit(model, loader([blob_episode(i) for i in range(240)], tasks=4))
    acc = t.validate(model, val, verbose=False)[0]["val/acc"]
    assert acc > 0.7, acc  # chance is 1/3
