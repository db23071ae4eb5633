"""SNAIL: causality, all-queries-in-one-pass == per-query sequences, the blocks against plain torch,
the zeroed query label, bf16, and one DDP test that trains CAML, LEO and SNAIL under ddp_spawn."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_meta.algorithms.caml import CAML
from lightning_meta.algorithms.leo import LEO
from lightning_meta.algorithms.snail import SNAIL
from lightning_meta.episode import Episode
from lightning_meta.nn.film import ContextMLP
from lightning_meta.nn.snail_blocks import AttentionBlock, CausalConv1d, SNAILResNetEmbedding, causal_mask
from tests.algorithms._meta_helpers import blob_episode, loader, trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(self.log|num_workers|val_dataloader|sync_dist|precision).*"
)  # Lightning's advice for real training runs


def tiny_snail(ways: int = 3, shots: int = 2) -> SNAIL:
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    emb.out_dim = 6
    return SNAIL(emb, ways=ways, shots=shots, key_sizes=(4, 5, 6), value_sizes=(3, 4, 5), tc_filters=4).double().eval()


def test_causal_conv_equals_left_padded_conv1d() -> None:
    conv = CausalConv1d(3, 5, dilation=2).double()
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (2, 0)), conv.weight, conv.bias, dilation=2).transpose(1, 2)
    torch.testing.assert_close(conv(x), ref)


def test_attention_masks_future_keys_and_normalises_over_keys() -> None:
    att = AttentionBlock(3, 4, 2).double()
    x = torch.randn(1, 5, 3, dtype=torch.float64)
    q, k, v = att.query(x)[0], att.key(x)[0], att.value(x)[0]
    ref = []
    for t in range(5):
        p = (q[t] @ k[: t + 1].T / 2.0).softmax(-1)  # keys 0..t only, sqrt(4) = 2
        ref.append(p @ v[: t + 1])
    torch.testing.assert_close(att(x)[0, :, 3:], torch.stack(ref))


def test_output_at_a_position_ignores_later_positions() -> None:
    snail = tiny_snail()
    seq = torch.randn(1, 7, 6 + 3, dtype=torch.float64)
    out = snail.sequence_logits(seq)
    changed = seq.clone()
    changed[:, 4:] = torch.randn(1, 3, 9, dtype=torch.float64)
    out2 = snail.sequence_logits(changed)
    torch.testing.assert_close(out2[:, :4], out[:, :4])
    assert not torch.allclose(out2[:, 4:], out[:, 4:])


def test_all_queries_in_one_pass_equal_per_query_sequences() -> None:
    snail = tiny_snail()
    e = Episode.collate([blob_episode(i, ways=3, shots=2, queries=3) for i in range(2)])
    sx, sy, qx = e.support_x.double(), e.support_y, e.query_x.double()
    together = snail.forward_tasks(sx, sy, qx)  # (tasks, 9, 3)
    for j in range(qx.shape[1]):
        # the paper's sequence: support steps, then this query with an all-zero label, nothing else
        seq = torch.cat(
            [
                snail.embedding(torch.cat([sx, qx[:, j : j + 1]], 1)),
                torch.cat([F.one_hot(sy, 3).double(), torch.zeros(2, 1, 3, dtype=torch.float64)], 1),
            ],
            -1,
        )
        torch.testing.assert_close(together[:, j], snail.sequence_logits(seq)[:, -1], rtol=1e-10, atol=1e-12)
    assert causal_mask(5, n_support=3)[4].tolist() == [True, True, True, False, True]


def test_query_label_is_zeroed_and_support_labels_are_one_hot() -> None:
    snail = tiny_snail()
    seen = []
    snail.att1.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    e = Episode.collate([blob_episode(0, ways=3, shots=2, queries=2)])
    snail.forward_tasks(e.support_x.double(), e.support_y, e.query_x.double())
    labels = seen[0][0, :, -3:]
    torch.testing.assert_close(labels[:6], F.one_hot(e.support_y[0], 3).double())
    assert labels[6:].abs().sum() == 0


def test_episode_larger_than_the_network_is_rejected() -> None:
    e = Episode.collate([blob_episode(0, ways=3, shots=5)])
    with pytest.raises(ValueError, match="ways \\* shots"):
        tiny_snail(ways=3, shots=1).forward_tasks(e.support_x.double(), e.support_y, e.query_x.double())


def test_resnet_embedding_shape() -> None:
    net = SNAILResNetEmbedding(channels=(4, 4, 4, 4), hidden=8, out_dim=6)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 6) and net.out_dim == 6


def test_bf16_mixed_trains_snail_and_it_learns_blob_tasks() -> None:
    torch.manual_seed(0)
    model = tiny_snail().float().train()
    model.meta_lr = 3e-3
    before = [p.detach().clone() for p in model.parameters()]
    t = trainer(max_steps=2, precision="bf16-mixed")
    t.fit(model, loader([blob_episode(i) for i in range(4)], tasks=2))
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    t = trainer(max_epochs=1)
    t.fit(model, loader([blob_episode(100 + i) for i in range(600)], tasks=8))
    acc = t.validate(model, loader([blob_episode(10_000 + i, queries=5) for i in range(40)], tasks=40), verbose=False)[
        0
    ]["val/acc"]
    assert acc > 0.45, acc  # chance is 1/3; 600 queries: 1 SE ~ 0.02


def _tiny(name: str):
    torch.manual_seed(0)
    if name == "caml":
        return CAML(ContextMLP(4, 3, context_dim=2, hidden=(8,)), inner_lr=0.5, task_mode="loop")
    if name == "leo":
        return LEO(feature_dim=4, ways=3, latent_dim=2, task_mode="loop")
    return tiny_snail().float().train()


class Three(L.LightningModule):
    """CAML, LEO and SNAIL side by side: the sum of their training-step losses (each carries its own
    meta-gradient, and the three share no parameter), one SGD step: one DDP spawn for all three."""

    def __init__(self) -> None:
        super().__init__()
        self.nets = nn.ModuleDict({k: _tiny(k) for k in ("caml", "leo", "snail")})

    def training_step(self, batch, batch_idx):
        return sum(net.training_step(batch, batch_idx) for net in self.nets.values())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.ddp
def test_caml_leo_snail_train_under_ddp_spawn() -> None:
    """2 gloo processes on CPU (the CPU twin of a multi-GPU run); one spawn instead of three to save CI time."""

    def fit() -> tuple[Three, dict[str, torch.Tensor]]:
        model = Three()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer(max_steps=2, strategy="ddp_spawn", devices=2).fit(
            model, loader([blob_episode(i) for i in range(8)], tasks=2)
        )
        return model, before

    model, before = fit()
    for k in ("caml", "leo", "snail"):
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(f"nets.{k}.")]
        assert all(torch.isfinite(p).all() for _, p in params), k
        assert any(not torch.equal(before[n], p) for n, p in params), k
