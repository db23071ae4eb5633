"""Variable-way, variable-shot episodes (Meta-Dataset's sampler), padding and their loaders."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from lightning_meta.datamodules import (
    ClassStore,
    EpisodeLoader,
    OmniglotDataModule,
    Rotations,
    VariableEpisodeDataset,
    VariableEpisodes,
    sample_composition,
)
from lightning_meta.episode import PAD_LABEL, Episode

OMNIGLOT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot"


def imbalanced_store(classes: int = 30) -> ClassStore:
    """Class c has 4 + c examples; pixel value = row id, so every image names its store row."""
    labels = torch.cat([torch.full((4 + c,), c) for c in range(classes)])
    n = len(labels)
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    images[:, 0, 0, 1] = (torch.arange(n) // 256).to(torch.uint8)
    return ClassStore.from_labeled(images, labels)


def row_ids(x: torch.Tensor) -> list[int]:
    px = (x * 255).round().long()
    return (px[..., 0, 0, 0] + 256 * px[..., 0, 0, 1]).flatten().tolist()


def dataset(split: str = "train", config: VariableEpisodes | None = None, **kw) -> VariableEpisodeDataset:
    opts = dict(length=40, seed=0, split=split)
    opts.update(kw)
    return VariableEpisodeDataset(imbalanced_store(), config or VariableEpisodes(max_ways=12), **opts)


def test_episodes_follow_the_protocol_and_sets_are_disjoint():
    store = imbalanced_store()
    ds = dataset(length=300)
    seen_ways = set()
    for i in range(300):
        e = ds[i]
        classes, shots, q = ds.composition(i)
        ways = len(classes)
        seen_ways.add(ways)
        assert 5 <= ways <= 12 and len(set(classes.tolist())) == ways
        counts = store.counts()[classes]
        assert q == min(10, int(counts.min()) // 2)  # balanced query sets, at most half the smallest class
        assert bool((shots >= 1).all()) and bool((shots <= counts - q).all())
        assert int(shots.sum()) <= 500
        assert torch.equal(torch.bincount(e.support_y, minlength=ways), shots)
        assert torch.equal(torch.bincount(e.query_y, minlength=ways), torch.full((ways,), q))
        s_rows, q_rows = row_ids(e.support_x), row_ids(e.query_x)
        assert not set(s_rows) & set(q_rows) and len(set(s_rows)) == len(s_rows)
        for rows, ys in ((s_rows, e.support_y), (q_rows, e.query_y)):  # every row belongs to its label's class
            for r, y in zip(rows, ys.tolist()):
                c = int(classes[y])
                assert int(store.offsets[c]) <= r < int(store.offsets[c + 1])
    assert seen_ways == set(range(5, 13))  # every way count in [min_ways, max_ways] occurs


def test_support_size_and_shots_closed_forms():
    # contribution capped at 1 per class: size = sum(floor(beta * 1 + 1)) = ways, so exactly one shot per class
    ds = dataset(config=VariableEpisodes(max_ways=12, max_support_per_class=1))
    for i in range(20):
        assert ds.composition(i)[1].tolist() == [1] * len(ds.composition(i)[0])
    # equal class sizes and no perturbation: equal proportions, floor((size - N) / N) + 1 shots per class
    labels = torch.arange(20 * 30) % 20
    store = ClassStore.from_labeled(torch.zeros(600, 1, 1, 1, dtype=torch.uint8), labels)
    cfg = VariableEpisodes(min_ways=5, max_ways=10, min_log_weight=0.0, max_log_weight=0.0)
    for k in range(20):
        g = torch.Generator().manual_seed(k)
        classes, shots, q = sample_composition(store.counts(), 20, cfg, g)
        assert 5 <= len(classes) <= 10 and q == 10 and len(set(shots.tolist())) == 1
        # size is in [N, N * 20] (20 = 30 - 10 remaining per class), so shots lie in [1, 20]
        assert 1 <= int(shots[0]) <= 20
    # the 500 cap: 50 classes of 300 examples -> uncapped sizes reach thousands
    big = ClassStore.from_labeled(torch.zeros(50 * 300, 1, 1, 1, dtype=torch.uint8), torch.arange(50 * 300) % 50)
    sizes = [
        int(sample_composition(big.counts(), 50, VariableEpisodes(), torch.Generator().manual_seed(k))[1].sum())
        for k in range(50)
    ]
    assert max(sizes) <= 500 and sum(s > 400 for s in sizes) > 5


def test_shots_follow_class_sizes():
    # two class sizes (20 and 80): shots follow the sizes (proportions 4:1 perturbed by log-uniform weights)
    labels = torch.cat([torch.full((20 if c < 10 else 80,), c) for c in range(20)])
    store = ClassStore.from_labeled(torch.zeros(len(labels), 1, 1, 1, dtype=torch.uint8), labels)
    small, large = [], []
    for k in range(400):
        classes, shots, _ = sample_composition(
            store.counts(), 20, VariableEpisodes(max_ways=20), torch.Generator().manual_seed(k)
        )
        small += shots[classes < 10].tolist()
        large += shots[classes >= 10].tolist()
    ratio = (sum(large) / len(large)) / (sum(small) / len(small))
    assert 3.0 < ratio < 6.0, ratio  # uniform shots would give 1; small classes are also capped at 10 remaining


def test_pure_function_of_seed_split_epoch_index():
    a, b = dataset(), dataset()
    assert row_ids(a[3].support_x) == row_ids(b[3].support_x)
    b.set_epoch(1)
    assert row_ids(a[3].support_x) != row_ids(b[3].support_x)
    ev1, ev2 = dataset("val", resample_per_epoch=False), dataset("val", resample_per_epoch=False)
    ev2.set_epoch(5)
    assert row_ids(ev1[3].query_x) == row_ids(ev2[3].query_x)
    assert row_ids(dataset("test")[3].query_x) != row_ids(ev1[3].query_x)


def test_rotations_and_errors():
    ds = dataset(class_augment=Rotations(), config=VariableEpisodes(max_ways=50))
    assert ds.num_classes == 120 and any(len(ds.composition(i)[0]) > 30 for i in range(40))
    with pytest.raises(ValueError, match="at least 2 per class"):
        VariableEpisodeDataset(
            ClassStore.from_labeled(torch.zeros(3, 1, 1, 1, dtype=torch.uint8), [0, 0, 1]),
            VariableEpisodes(min_ways=1),
            length=1,
            seed=0,
            split="train",
        )
    with pytest.raises(ValueError, match="ways=5 but split 'train' has only 3 classes"):
        VariableEpisodeDataset(imbalanced_store(3), VariableEpisodes(), length=1, seed=0, split="train")
    with pytest.raises(ValueError, match="max_ways=3 < min_ways=5"):
        VariableEpisodes(max_ways=3)


def test_collate_pads_and_masks():
    ds = dataset()
    eps = [ds[i] for i in range(4)]
    b = Episode.collate(eps)
    assert b.is_padded and b.support_y.shape == (4, max(len(e.support_y) for e in eps))
    for t, e in enumerate(eps):
        n, m = len(e.support_y), len(e.query_y)
        assert torch.equal(b.support_y[t, :n], e.support_y) and bool((b.support_y[t, n:] == PAD_LABEL).all())
        assert torch.equal(b.support_x[t, :n], e.support_x) and not b.support_x[t, n:].any()
        assert int(b.support_mask[t].sum()) == n and int(b.query_mask[t].sum()) == m
        assert torch.equal(b.task(t).query_y[:m], e.query_y)
    fixed = Episode.collate([eps[0], eps[0]])
    assert not fixed.is_padded and fixed.support_mask.all()
    with pytest.raises(ValueError, match="regression episodes must share shapes"):
        Episode.collate(
            [
                Episode(torch.zeros(1, 1), torch.zeros(1), torch.zeros(1, 1), torch.zeros(1)),
                Episode(torch.zeros(2, 1), torch.zeros(2), torch.zeros(1, 1), torch.zeros(1)),
            ]
        )


def _batches(loader) -> list[list[list[int]]]:
    return [[row_ids(b.support_x[t][b.support_mask[t]]) for t in range(b.tasks)] for b in loader]


def test_loader_ddp_shards_and_resume():
    ref = EpisodeLoader(dataset(length=16), batch_size=4)
    ref.set_epoch(1)
    full = _batches(ref)
    singles = []
    d = dataset(length=16)
    d.set_epoch(1)
    singles = [row_ids(d[i].support_x) for i in range(16)]
    assert sum(full, []) == singles
    shards = []
    for rank in (0, 1):
        sampler = DistributedSampler(dataset(length=16), num_replicas=2, rank=rank, shuffle=False)
        loader = EpisodeLoader(dataset(length=16), batch_size=4, sampler=sampler)
        loader.set_epoch(1)
        shards.append(sum(_batches(loader), []))
    assert sorted(map(tuple, shards[0] + shards[1])) == sorted(map(tuple, singles))
    assert not set(map(tuple, shards[0])) & set(map(tuple, shards[1]))
    live = EpisodeLoader(dataset(length=16), batch_size=4)
    live.set_epoch(1)
    it = iter(live)
    next(it)
    resumed = EpisodeLoader(dataset(length=16), batch_size=4)
    resumed.load_state_dict(live.state_dict())
    assert _batches(resumed) == full[1:]
    two_workers = EpisodeLoader(dataset(length=16), batch_size=4, num_workers=2)
    two_workers.set_epoch(1)
    assert _batches(two_workers) == full


@pytest.mark.skipif(not (OMNIGLOT / "images_background_small1.zip").exists(), reason="no Omniglot subsets")
def test_omniglot_datamodule_option(tmp_path: Path):
    dm = OmniglotDataModule(
        str(OMNIGLOT),
        split="seeded",
        cache_dir=str(tmp_path),
        tasks_per_batch=3,
        train_episodes=6,
        val_episodes=3,
        test_episodes=3,
        variable_episodes=VariableEpisodes(max_ways=20),
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    ways = [int(batch.support_y[t].max()) + 1 for t in range(3)]
    assert all(5 <= w <= 20 for w in ways)
    assert batch.query_y.shape[1] == max(int(batch.query_mask[t].sum()) for t in range(3))
    assert all(int(batch.query_mask[t].sum()) == 10 * w for t, w in enumerate(ways))  # 20 drawings: 10 queries
    with pytest.raises(ValueError, match="must be a VariableEpisodes"):
        OmniglotDataModule(str(OMNIGLOT), variable_episodes={"max_ways": 5})


def test_cross_entropy_accuracy_and_ci_ignore_padding():
    from lightning_meta.functional import per_task_accuracy, per_task_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits_a, y_a = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.tensor([0, 3, 1])
    logits_b, y_b = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.tensor([2, 2, 0, 1, 3])
    padded_logits = torch.stack([torch.cat([logits_a, torch.full((2, 4), 1e6, dtype=torch.float64)]), logits_b])
    padded_y = torch.stack([torch.cat([y_a, torch.tensor([-1, -1])]), y_b])
    ce = per_task_cross_entropy(padded_logits, padded_y)

    def hand_ce(logits, y):  # -log softmax at the target, averaged
        return float(sum(-logits[i, y[i]] + torch.logsumexp(logits[i], 0) for i in range(len(y))) / len(y))

    assert ce[0].item() == pytest.approx(hand_ce(logits_a, y_a)) and ce[1].item() == pytest.approx(
        hand_ce(logits_b, y_b)
    )
    acc = per_task_accuracy(padded_logits, padded_y)
    assert acc[0].item() == pytest.approx((logits_a.argmax(1) == y_a).double().mean().item())
    assert not math.isnan(acc[1].item())


@pytest.mark.skipif(not (OMNIGLOT / "images_background_small1.zip").exists(), reason="no Omniglot subsets")
def test_omniglot_alphabet_episodes(tmp_path: Path):
    splits = tmp_path / "splits"
    splits.mkdir()
    train_alphabets = ["Balinese", "Greek", "Japanese_(katakana)", "Korean", "Latin", "Tagalog"]
    for name, alphabets in {"train": train_alphabets, "val": ["Early_Aramaic"], "test": ["Sanskrit"]}.items():
        (splits / f"{name}.txt").write_text("\n".join(alphabets))
    common = dict(split="custom", split_dir=str(splits), cache_dir=str(tmp_path), tasks_per_batch=1,
                  train_episodes=60, val_episodes=2, test_episodes=2, variable_episodes=VariableEpisodes(max_ways=20))  # fmt: skip
    dm = OmniglotDataModule(str(OMNIGLOT), alphabet_episodes=True, **common)
    dm.setup()
    train = dm.datasets["train"]
    assert train.class_groups.names == tuple(f"{a}/rot{r:03d}" for a in train_alphabets for r in (0, 90, 180, 270))
    for i in range(len(train)):
        names = [train.class_name(c).split("/") for c in train.composition(i)[0].tolist()]
        assert len({(n[0], n[2]) for n in names}) == 1, names  # one alphabet, one rotation
    plain = OmniglotDataModule(str(OMNIGLOT), **common)
    plain.setup()
    assert plain.datasets["train"].class_groups is None
    with pytest.raises(ValueError, match=r"superclasses \[.*have fewer than min_ways=5 classes"):
        OmniglotDataModule(str(OMNIGLOT), split="seeded", split_fractions=(0.9, 0.05, 0.05), cache_dir=str(tmp_path),
                           alphabet_episodes=True, variable_episodes=VariableEpisodes()).setup()  # fmt: skip


@pytest.mark.skipif(not (OMNIGLOT / "images_background_small1.zip").exists(), reason="no Omniglot subsets")
def test_omniglot_split_by_alphabets_keeps_alphabets_whole_for_alphabet_episodes(tmp_path: Path):
    """``split="alphabets"``: a seeded split of the alphabets (``split_fractions`` of them), every character of an
    alphabet in one split, reproducible from ``split_seed``; alphabet episodes then work without split files,
    where the same fractions by character fail."""
    common = dict(cache_dir=str(tmp_path), tasks_per_batch=1, train_episodes=20, val_episodes=2, test_episodes=2,
                  variable_episodes=VariableEpisodes(max_ways=20), split_fractions=(0.5, 0.25, 0.25))  # fmt: skip
    dm = OmniglotDataModule(str(OMNIGLOT), split="alphabets", alphabet_episodes=True, **common)
    store, origin = dm.characters()
    plan = dm.split_characters(store.class_names, origin)
    alphabets = {s: {c.split("/")[0] for c, _ in entries} for s, entries in plan.items()}
    everything = {c.split("/")[0] for c in store.class_names}
    assert len(everything) == 8 and [len(alphabets[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    assert set().union(*alphabets.values()) == everything and not (alphabets["train"] & alphabets["val"])
    assert not (alphabets["train"] & alphabets["test"]) and not (alphabets["val"] & alphabets["test"])
    assert sum(len(v) for v in plan.values()) == len(store.class_names)  # every character of every alphabet
    other = OmniglotDataModule(str(OMNIGLOT), split="alphabets", split_seed=1, **common)
    assert other.split_characters(store.class_names, origin) != plan
    fallback = OmniglotDataModule(str(OMNIGLOT), split="vinyals", fallback_split="alphabets", **common)
    assert fallback.split_characters(store.class_names, origin) == plan  # the subsets lack the Vinyals split's data
    dm.setup()
    train = dm.datasets["train"]
    for i in range(len(train)):
        names = [train.class_name(c).split("/") for c in train.composition(i)[0].tolist()]
        assert len({(n[0], n[2]) for n in names}) == 1 and names[0][0] in alphabets["train"]
    with pytest.raises(ValueError, match="fewer than min_ways"):
        OmniglotDataModule(str(OMNIGLOT), split="seeded", alphabet_episodes=True, **common).setup()
    with pytest.raises(ValueError, match="'seeded', 'alphabets' or 'custom'"):
        OmniglotDataModule(str(OMNIGLOT), fallback_split="bogus")


def test_omniglot_split_by_alphabets_needs_three(tmp_path: Path):
    from tests._tiny_data import write_tiny_omniglot

    root = write_tiny_omniglot(tmp_path / "omniglot", alphabets=2, characters=3, drawings=20)
    dm = OmniglotDataModule(str(root), split="alphabets", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"split='alphabets' needs at least 3 alphabets .* has 2"):
        dm.setup()
