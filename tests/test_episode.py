import pytest
import torch

from lightning_meta import Episode


def test_collate_stacks_task_dimension():
    e = Episode(torch.randn(10, 1, 28, 28), torch.arange(10) % 5, torch.randn(15, 1, 28, 28), torch.arange(15) % 5)
    b = Episode.collate([e, e, e])
    assert b.tasks == 3
    assert b.support_x.shape == (3, 10, 1, 28, 28)
    assert b.query_y.shape == (3, 15)
    assert torch.equal(b.task(2).support_x, e.support_x)


def test_regression_flag_and_to_keeps_label_dtype():
    e = Episode(torch.randn(4, 1), torch.randn(4), torch.randn(6, 1), torch.randn(6))
    assert e.is_regression
    c = Episode(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.randn(2, 3), torch.tensor([1, 0]))
    assert not c.is_regression
    d = c.to(torch.float64)
    assert d.support_x.dtype == torch.float64 and d.support_y.dtype == torch.long


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="support_x"):
        Episode(torch.randn(3, 1), torch.tensor([0, 1]), torch.randn(2, 1), torch.tensor([0, 1]))


def test_collate_empty_raises():
    with pytest.raises(ValueError, match="empty"):
        Episode.collate([])


def test_dataloader_pin_memory_calls_episode_pin_memory(monkeypatch):
    """DataLoader(pin_memory=True) pins custom batch types through their pin_memory() method."""
    from torch.utils.data._utils import pin_memory as pm

    e = Episode(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 3), torch.tensor([1, 0]))
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(self) or self)
    out = pm.pin_memory(e)
    assert isinstance(out, Episode) and len(pinned) == 4


def test_unlabelled_episode_collates_and_query_mask_names_the_missing_labels():
    e = Episode(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(4, 3))
    b = Episode.collate([e, e])
    assert b.query_y is None and b.query_x.shape == (2, 4, 3)
    assert b.to(torch.float64).query_y is None
    assert torch.equal(b.support_mask, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="query_y is None"):
        _ = b.query_mask


def test_is_padded_is_checked_once_per_instance_and_follows_reassigned_fields(monkeypatch):
    real, calls = torch.Tensor.__lt__, []

    def lt(self, other):  # is_padded compares the labels with 0: a device sync
        if isinstance(other, int) and other == 0 and self.dtype == torch.long:
            calls.append(tuple(self.shape))
        return real(self, other)

    monkeypatch.setattr(torch.Tensor, "__lt__", lt)
    a = Episode(torch.ones(1, 1), torch.tensor([0]), torch.ones(1, 1), torch.tensor([0]))
    b = Episode(torch.ones(2, 1), torch.tensor([0, 1]), torch.ones(1, 1), torch.tensor([1]))
    batch = Episode.collate([a, b])
    assert batch.is_padded and batch.is_padded and batch.is_padded
    assert calls.count((2, 2)) == 1
    assert batch.to(torch.float64).is_padded and calls.count((2, 2)) == 1  # moved or cast: the same labels
    batch.support_y = torch.zeros(2, 2, dtype=torch.long)
    batch.query_y = torch.zeros(2, 1, dtype=torch.long)
    assert not batch.is_padded and calls.count((2, 2)) == 2  # reassigned fields: checked again
    known = Episode.collate([b, b])
    known.is_padded = True  # a caller that knows (e.g. for a chunk of a padded batch) skips the check
    assert known.is_padded and calls.count((2, 2)) == 2
    with pytest.raises(TypeError, match="is_padded=1"):
        known.is_padded = 1  # type: ignore[assignment]
    regression = Episode(torch.ones(2, 1), torch.ones(2), torch.ones(2, 1), torch.ones(2))
    assert not regression.is_padded and calls.count((2, 2)) == 2
