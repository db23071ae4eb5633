"""ANIL: equals MAML restricted to the head, against the hand-unrolled reference and MAML itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_meta.algorithms import ANIL, MAML
from lightning_meta.nn import MLP
from tests.algorithms._meta_helpers import batch, grads_of_training_step, reference, two_layer

pytestmark = pytest.mark.filterwarnings("ignore:.*self.log.*")  # Lightning's advice for real training runs


@pytest.mark.parametrize(
    ("first_order", "steps", "mode"), [(False, 1, "loop"), (False, 3, "vmap"), (True, 3, "loop"), (True, 2, "vmap")]
)
def test_anil_meta_gradient_matches_head_only_reference(first_order: bool, steps: int, mode: str) -> None:
    anil = ANIL(two_layer(), inner_lr=0.5, inner_steps=steps, first_order=first_order, task_mode=mode)
    b = batch()
    got = grads_of_training_step(anil, b)
    ref = reference(anil.backbone, b, 0.5, steps, first_order, head_only=True)
    for n in ref:
        torch.testing.assert_close(got[f"backbone.{n}"], ref[n], rtol=1e-8, atol=1e-10)


def test_anil_equals_maml_restricted_to_the_head() -> None:
    b = batch()
    anil = ANIL(two_layer(), inner_lr=0.3, inner_steps=2, task_mode="vmap")
    maml = MAML(two_layer(), inner_lr=0.3, inner_steps=2, task_mode="loop")
    maml.adapt_names = ["head.weight", "head.bias"]
    ga, gm = grads_of_training_step(anil, b), grads_of_training_step(maml, b)
    for n in gm:
        torch.testing.assert_close(ga[n], gm[n], rtol=1e-9, atol=1e-12)
    anil.eval(), maml.eval()
    torch.testing.assert_close(anil(b), maml(b))


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_batch_features_equal_per_task_features_without_batchnorm(mode: str) -> None:
    b = batch()
    per_task = ANIL(two_layer(), inner_lr=0.3, inner_steps=2, task_mode="loop")
    batched = ANIL(two_layer(), inner_lr=0.3, inner_steps=2, task_mode=mode, batch_features=True)
    gp, gb = grads_of_training_step(per_task, b), grads_of_training_step(batched, b)
    for n in gp:
        torch.testing.assert_close(gb[n], gp[n], rtol=1e-9, atol=1e-12)
    per_task.eval(), batched.eval()
    torch.testing.assert_close(batched(b), per_task(b))


def test_anil_vmap_is_exact_with_fused_batchnorm_in_the_body() -> None:
    """Only the head is differentiated twice, so the fused-BN vmap problem does not reach ANIL."""

    def net() -> nn.Module:
        m = MLP(4, 3, hidden=(6,))
        m.features.insert(1, nn.BatchNorm1d(6, track_running_stats=False))
        return m.double()

    b = batch()
    torch.manual_seed(0)
    loop = ANIL(net(), inner_lr=0.5, inner_steps=2, task_mode="loop")
    vmapped = ANIL(net(), inner_lr=0.5, inner_steps=2, task_mode="vmap")
    vmapped.load_state_dict(loop.state_dict())
    gl, gv = grads_of_training_step(loop, b), grads_of_training_step(vmapped, b)
    for n in gl:
        torch.testing.assert_close(gv[n], gl[n], rtol=1e-7, atol=1e-10)


def test_anil_needs_a_head() -> None:
    with pytest.raises(ValueError, match="no submodule"):
        ANIL(nn.Sequential(nn.Linear(2, 2)))
