"""Episode sampling: label/sets invariants, purity in (seed, split, epoch, index), the epoch-aware
stateful loader, mid-epoch resume through a Trainer, and DDP sharding (2 CPU processes)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_meta.datamodules.episodic import (
    BatchedEpisodeList,
    EpisodeDataset,
    EpisodeLoader,
    EpisodicDataModule,
    Rotations,
    episode_seed,
)
from lightning_meta.datamodules.store import ClassStore
from lightning_meta.episode import Episode

CLASSES, PER_CLASS = 12, 8


def toy_store(classes: int = CLASSES, per_class: int = PER_CLASS, offset: int = 0) -> ClassStore:
    """Row r holds the value offset + r in every pixel, so an episode's rows can be read back."""
    n = classes * per_class
    images = (torch.arange(n) + offset).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    labels = [f"c{offset + r // per_class:03d}" for r in range(n)]
    return ClassStore.from_labeled(images, labels)


def rows(x: torch.Tensor) -> list[int]:
    return (x[..., 0, 0, 0] * 255).round().long().flatten().tolist()


def dataset(split: str = "train", **kw) -> EpisodeDataset:
    args = dict(ways=3, shots=2, queries=3, length=16, seed=0, split=split)
    args.update(kw)
    return EpisodeDataset(kw.pop("store", toy_store()), **{k: v for k, v in args.items() if k != "store"})


def test_episode_shapes_labels_and_disjoint_sets():
    ds = dataset()
    for i in range(len(ds)):
        e = ds[i]
        assert e.support_x.shape == (6, 1, 2, 2) and e.query_x.shape == (9, 1, 2, 2)
        assert e.support_x.dtype == torch.float32 and e.support_y.dtype == torch.long
        assert 0 <= e.support_x.min() and e.support_x.max() <= 1
        assert sorted(e.support_y.tolist()) == [0, 0, 1, 1, 2, 2]
        assert sorted(e.query_y.tolist()) == [0] * 3 + [1] * 3 + [2] * 3
        s_rows, q_rows = rows(e.support_x), rows(e.query_x)
        assert not set(s_rows) & set(q_rows) and len(set(s_rows + q_rows)) == 15
        # every label is one class, and different labels are different classes
        cls_of = {}
        for r, y in zip(s_rows + q_rows, e.support_y.tolist() + e.query_y.tolist()):
            cls_of.setdefault(y, set()).add(r // PER_CLASS)
        assert all(len(v) == 1 for v in cls_of.values()) and len(set.union(*cls_of.values())) == 3
        assert [ds.class_name(int(c)) for c in ds.episode_classes(i)] == [
            f"c{next(iter(cls_of[y])):03d}" for y in range(3)
        ]


def test_episode_rows_name_the_rows_and_labels_that_the_episode_serves():
    ds = dataset()
    for i in range(4):
        e = ds[i]
        classes, sr, sy, qr, qy = ds.episode_rows(i)
        assert sr.tolist() == rows(e.support_x) and qr.tolist() == rows(e.query_x)
        assert torch.equal(sy, e.support_y) and torch.equal(qy, e.query_y)
        assert torch.equal(classes, ds.episode_classes(i))


def test_label_mapping_and_support_order_are_shuffled_per_episode():
    ds = dataset(length=40)
    first_classes = {int(ds.episode_classes(i)[0]) for i in range(40)}
    assert len(first_classes) > 5  # label 0 is not tied to a class
    sorted_support = sum(ds[i].support_y.tolist() == sorted(ds[i].support_y.tolist()) for i in range(40))
    assert sorted_support < 5  # support order is shuffled, not grouped by label
    # a class appears under different labels across episodes
    labels_of_class: dict[int, set[int]] = {}
    for i in range(40):
        for y, c in enumerate(ds.episode_classes(i).tolist()):
            labels_of_class.setdefault(c, set()).add(y)
    assert max(len(v) for v in labels_of_class.values()) == 3


def test_episodes_are_a_pure_function_of_seed_split_epoch_index():
    a, b = dataset(), dataset()
    b.set_epoch(0)
    assert rows(a[5].support_x) == rows(b[5].support_x) and torch.equal(a[5].query_y, b[5].query_y)
    assert rows(a[5].support_x) == rows(a[5].support_x)
    b.set_epoch(1)
    assert [rows(a[i].support_x) for i in range(8)] != [rows(b[i].support_x) for i in range(8)]
    assert rows(dataset(seed=1)[5].support_x) != rows(a[5].support_x)
    assert rows(dataset(split="val")[5].support_x) != rows(a[5].support_x)
    v = dataset(split="val", resample_per_epoch=False)
    before = [rows(v[i].support_x) for i in range(8)]
    v.set_epoch(3)
    assert [rows(v[i].support_x) for i in range(8)] == before
    assert episode_seed(0, "train", 0, 1) != episode_seed(0, "train", 0, 2)


def test_random_transform_is_seeded_by_the_episode():
    noise = lambda img: img + torch.rand(img.shape)  # noqa: E731 - uses the global RNG on purpose
    a, b = dataset(transform=noise), dataset(transform=noise)
    torch.manual_seed(123)
    ea = a[3]
    torch.manual_seed(999)
    eb = b[3]
    assert torch.equal(ea.support_x, eb.support_x) and not torch.equal(ea.support_x, dataset()[3].support_x)
    s = torch.initial_seed()
    assert s == 999  # the global RNG state is untouched by the episode's draw


def test_rotations_as_classes():
    store = toy_store(classes=2, per_class=4)
    ds = EpisodeDataset(store, ways=8, shots=1, queries=1, length=4, seed=0, split="train", class_augment=Rotations())
    assert ds.num_classes == 8 and ds.class_name(3) == "c001/rot090"
    raw = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).expand(8, 1, 4, 4).contiguous()
    rs = ClassStore.from_labeled(raw, [0, 0, 0, 0, 1, 1, 1, 1])
    ds = EpisodeDataset(rs, ways=8, shots=1, queries=0, length=1, seed=0, split="t", class_augment=Rotations())
    e, classes = ds[0], ds.episode_classes(0)
    for y, c in enumerate(classes.tolist()):
        img = e.support_x[e.support_y == y][0, 0]
        assert torch.equal(img, torch.rot90(raw[0, 0].float() / 255, c // 2))
    with pytest.raises(ValueError, match="multiples of 90"):
        Rotations((0, 45))


def test_bad_episode_shapes_name_value_split_and_fix():
    with pytest.raises(ValueError, match=r"^eval_ways=13 but split 'val' has only 12 classes; lower eval_ways "):
        dataset(split="val", ways=13)
    with pytest.raises(ValueError, match=r"shots \+ queries = 2 \+ 7 = 9 but class 'c000' of split 'train' has only 8"):
        dataset(queries=7)
    with pytest.raises(ValueError, match="shots=0"):
        dataset(shots=0)


def test_loader_is_identical_for_0_and_2_workers_and_passes_the_epoch():
    ds = dataset(length=12)
    l0 = EpisodeLoader(ds, batch_size=4)
    l2 = EpisodeLoader(dataset(length=12), batch_size=4, num_workers=2)
    for epoch in (0, 1):
        it0, it2 = iter(l0), iter(l2)  # iterators made before set_epoch, as Lightning does
        l0.set_epoch(epoch)
        l2.set_epoch(epoch)
        b0, b2 = list(it0), list(it2)
        assert len(b0) == 3 and isinstance(b0[0], Episode) and b0[0].support_x.shape == (4, 6, 1, 2, 2)
        assert [rows(b.support_x) for b in b0] == [rows(b.support_x) for b in b2]
        expect = [rows(dataset(length=12).__getitem__(i).support_x) for i in range(12)] if epoch == 0 else None
        if expect is not None:
            assert sum((rows(b.support_x) for b in b0), []) == sum(expect, [])
        else:
            assert rows(b0[0].support_x) != rows(dataset()[0].support_x)
    assert l0.state_dict() == {"epoch": 1, "batches": 3}


def test_loader_resume_skips_consumed_batches_without_generating_them():
    class Counting(EpisodeDataset):
        calls: list[int] = []

        def _draw(self, i):  # every episode, batched or single, is drawn here
            Counting.calls.append(int(i))
            return super()._draw(i)

    full = EpisodeLoader(dataset(length=20), batch_size=4)
    full.set_epoch(2)
    reference = [rows(b.support_x) for b in full]
    live = EpisodeLoader(dataset(length=20), batch_size=4)
    live.set_epoch(2)
    it = iter(live)
    next(it), next(it)
    state = live.state_dict()
    assert state == {"epoch": 2, "batches": 2}
    resumed = EpisodeLoader(
        Counting(toy_store(), ways=3, shots=2, queries=3, length=20, seed=0, split="train"), batch_size=4
    )
    resumed.load_state_dict(state)
    assert [rows(b.support_x) for b in resumed] == reference[2:]
    assert Counting.calls == list(range(8, 20))
    assert [rows(b.support_x) for b in resumed] == reference  # the next pass is a full epoch again
    with_workers = EpisodeLoader(dataset(length=20), batch_size=4, num_workers=2)
    with_workers.load_state_dict(state)
    assert [rows(b.support_x) for b in with_workers] == reference[2:]
    stale = EpisodeLoader(dataset(length=20), batch_size=4)
    stale.load_state_dict(state)
    stale.set_epoch(3)  # the saved position belongs to epoch 2: epoch 3 starts from its beginning
    assert len(list(stale)) == 5


@pytest.mark.parametrize("augment", [None, Rotations()])
def test_batched_getitems_equals_single_episodes(augment):
    ds = dataset(length=8, class_augment=augment)
    items = ds.__getitems__([5, 2, 7])
    single = Episode.collate([ds[5], ds[2], ds[7]])
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(items.batched, name), getattr(single, name))
        assert torch.equal(getattr(items[1], name), getattr(ds[2], name))
    batch = next(iter(EpisodeLoader(ds, batch_size=3)))
    assert torch.equal(batch.query_x, Episode.collate([ds[0], ds[1], ds[2]]).query_x)


def test_a_dataset_returning_a_batched_episode_list_is_not_stacked_again():
    """The loader's default collate takes ``batched`` of a :class:`BatchedEpisodeList` as the batch."""
    inner = dataset(length=4)
    assert isinstance(inner.__getitems__([0, 1]), BatchedEpisodeList)

    class PreStacked(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> Episode:
            return inner[i]

        def __getitems__(self, indices: list[int]) -> BatchedEpisodeList:
            out = BatchedEpisodeList(inner[i] for i in indices)
            b = Episode.collate(out)
            out.batched = Episode(b.support_x + 7, b.support_y, b.query_x, b.query_y)  # marked: not a re-stack
            return out

    batch = next(iter(EpisodeLoader(PreStacked(), batch_size=2)))
    assert torch.equal(batch.support_x, Episode.collate([inner[0], inner[1]]).support_x + 7)


def test_loader_refuses_persistent_workers_and_shuffle():
    with pytest.raises(ValueError, match="persistent_workers=False"):
        EpisodeLoader(dataset(), batch_size=2, num_workers=1, persistent_workers=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        EpisodeLoader(dataset(), batch_size=2, shuffle=True)


class ToyDataModule(EpisodicDataModule):
    def build_stores(self):
        return {"train": toy_store(), "val": toy_store(6, offset=96), "test": toy_store(6, offset=144)}


class Recorder(pl.LightningModule):
    def __init__(self, out: Path | None = None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.train_seen: list[list[int]] = []
        self.val_seen: list[list[int]] = []
        self.out = out

    def training_step(self, batch: Episode, batch_idx: int):
        self.train_seen.append([self.current_epoch] + rows(batch.support_x))
        return (self.w**2).sum() + batch.query_x.mean() * 0

    def validation_step(self, batch: Episode, batch_idx: int):
        self.val_seen.append(rows(batch.support_x))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_end(self) -> None:
        if self.out is not None:
            torch.save({"train": self.train_seen, "val": self.val_seen}, self.out / f"rank{self.global_rank}.pt")


def _trainer(tmp_path: Path, **kw) -> pl.Trainer:
    args = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    args.update(kw)
    return pl.Trainer(**args)


def test_datamodule_eval_shapes_and_validation():
    dm = ToyDataModule(
        ways=3,
        shots=2,
        queries=3,
        tasks_per_batch=4,
        train_episodes=8,
        val_episodes=4,
        test_episodes=4,
        eval_ways=5,
        eval_shots=1,
        eval_queries=2,
    )
    dm.setup("fit")
    tb, vb, sb = next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader())), next(iter(dm.test_dataloader()))
    assert tb.support_x.shape == (4, 6, 1, 2, 2) and tb.query_y.shape == (4, 9)
    assert vb.support_x.shape == (4, 5, 1, 2, 2) and vb.query_y.shape == (4, 10)
    assert sb.support_y.max() == 4
    classes = [set(r // PER_CLASS for r in rows(b.support_x)) for b in (tb, vb, sb)]
    assert not (classes[0] & classes[1]) and not (classes[0] & classes[2]) and not (classes[1] & classes[2])
    with pytest.raises(ValueError, match=r"^eval_ways=7 but split 'val' has only 6 classes"):
        ToyDataModule(eval_ways=7, queries=1).setup()
    with pytest.raises(ValueError, match="tasks_per_batch=0"):
        ToyDataModule(tasks_per_batch=0)

    class Leaky(EpisodicDataModule):
        def build_stores(self):
            return {"train": toy_store(), "val": toy_store(), "test": toy_store()}

    with pytest.raises(ValueError, match="disjoint"):
        Leaky(queries=1).setup()


@pytest.mark.slow
def test_trainer_epochs_change_train_but_not_val_and_resume_mid_epoch(tmp_path: Path):
    def dm():
        return ToyDataModule(ways=3, shots=2, queries=3, tasks_per_batch=2, train_episodes=8, val_episodes=4)

    full = Recorder()
    _trainer(tmp_path / "a").fit(full, datamodule=dm())
    assert len(full.train_seen) == 8
    assert full.train_seen[:4] != full.train_seen[4:]  # epoch 1 draws new episodes
    assert full.val_seen[:2] == full.val_seen[2:]  # validation is the same every epoch
    ref = EpisodeLoader(dm().make_datasets()["train"], batch_size=2)
    ref.set_epoch(1)
    assert [b[1:] for b in full.train_seen[4:]] == [rows(b.support_x) for b in ref]

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=6, save_top_k=-1)
    _trainer(tmp_path / "b", enable_checkpointing=True, callbacks=[ckpt]).fit(Recorder(), datamodule=dm())
    path = tmp_path / "ck" / "epoch=1-step=6.ckpt"
    assert torch.load(path, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 2}
    ]
    resumed = Recorder()
    _trainer(tmp_path / "c").fit(resumed, datamodule=dm(), ckpt_path=path)
    assert resumed.train_seen == full.train_seen[6:]

    # resuming from the end of epoch 0: Lightning creates the iterator before set_epoch(1)
    end = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck2", every_n_epochs=1, save_top_k=-1)
    _trainer(tmp_path / "d", enable_checkpointing=True, callbacks=[end], max_epochs=1).fit(Recorder(), datamodule=dm())
    resumed = Recorder()
    _trainer(tmp_path / "e").fit(resumed, datamodule=dm(), ckpt_path=tmp_path / "ck2" / "epoch=0-step=4.ckpt")
    assert resumed.train_seen == full.train_seen[4:]


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_see_disjoint_episodes(tmp_path: Path):
    dm = ToyDataModule(ways=3, shots=2, queries=3, tasks_per_batch=2, train_episodes=8, val_episodes=8)
    _trainer(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=2).fit(Recorder(tmp_path), datamodule=dm)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    ref = dm.make_datasets()
    single_train = []
    for epoch in (0, 1):
        ref["train"].set_epoch(epoch)
        single_train += [[epoch] + rows(ref["train"][i].support_x) for i in range(8)]
    single_val = [rows(ref["val"][i].support_x) for i in range(8)]

    def episodes(batches, width):  # split batches of 2 episodes into single episodes (with epoch tag)
        out = []
        for b in batches:
            epoch, flat = (b[0], b[1:]) if width else (None, b)
            for k in range(0, len(flat), 6):
                out.append((epoch, tuple(flat[k : k + 6])))
        return out

    t0, t1 = episodes(r0["train"], 1), episodes(r1["train"], 1)
    assert len(t0) == len(t1) == 8 and not set(t0) & set(t1)
    assert sorted(t0 + t1) == sorted(episodes(single_train, 1))  # together: exactly the 1-process epochs
    v0, v1 = episodes(r0["val"], 0), episodes(r1["val"], 0)
    assert not set(v0) & set(v1) and set(v0 + v1) == set(episodes(single_val, 0))
