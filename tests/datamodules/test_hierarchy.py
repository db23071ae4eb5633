"""Hierarchy-aware class selection of variable-way episodes (Meta-Dataset's Omniglot and ImageNet rules)."""

from __future__ import annotations

import pytest
import torch

from lightning_meta.datamodules import (
    ClassHierarchy,
    ClassStore,
    EpisodeLoader,
    Rotations,
    VariableEpisodeDataset,
    VariableEpisodes,
    episode_generator,
    sample_composition,
)

# superclass "s<k>" has 5 + k classes "s<k>/c<j>"; class sizes vary so shots and queries vary too
SIZES = {f"s{k}": 5 + k for k in range(6)}
NAMES = [f"{g}/c{j:02d}" for g, n in SIZES.items() for j in range(n)]

# a small WordNet-like DAG: "pet" shares dog and cat with "mammal", so "root" reaches dog along two paths
DAG = {
    "root": ["animal", "plant"],
    "animal": ["mammal", "bird"],
    "mammal": ["dog", "cat", "horse"],
    "bird": ["robin", "crow"],
    "plant": ["tree", "flower"],
    "tree": ["oak", "pine"],
    "flower": ["rose"],
    "pet": ["dog", "cat", "robin"],
}
LEAVES = sorted(["dog", "cat", "horse", "robin", "crow", "oak", "pine", "rose"])


def store(names: list[str], per_class=lambda k: 4 + k % 5) -> ClassStore:
    """Class ``k`` of ``names`` has ``per_class(k)`` images; pixel = row id (fits uint8 here)."""
    labels = [c for k, c in enumerate(names) for _ in range(per_class(k))]
    n = len(labels)
    return ClassStore.from_labeled(torch.arange(n).view(n, 1, 1, 1).to(torch.uint8), labels, class_names=names)


def superclasses() -> ClassHierarchy:
    return ClassHierarchy.group_by(NAMES, lambda c: c.split("/")[0])


def chi_square(counts: list[int]) -> float:
    expected = sum(counts) / len(counts)
    return sum((c - expected) ** 2 / expected for c in counts)


def test_dag_spans_and_eligibility_match_a_hand_computed_list():
    h = ClassHierarchy.from_dag(DAG, max_spanning_leaves=5)
    spans = {g: len(v) for g, v in h.groups.items()}
    # leaves counted once: root spans 8 leaves although dog is reachable along two paths
    assert spans == {"animal": 5, "bird": 2, "flower": 1, "mammal": 3, "pet": 3, "plant": 3, "root": 8, "tree": 2}
    assert h.groups["pet"] == ("cat", "dog", "robin")
    # eligible: internal nodes spanning min_ways..max_spanning_leaves of the split's classes
    assert list(h.eligible(LEAVES, min_ways=3)) == ["animal", "mammal", "pet", "plant"]
    assert h.eligible(LEAVES, min_ways=3)["pet"] == [LEAVES.index(c) for c in ("cat", "dog", "robin")]
    wide = ClassHierarchy.from_dag(DAG)  # Meta-Dataset's bound: 392
    assert list(wide.eligible(LEAVES, min_ways=2)) == ["animal", "bird", "mammal", "pet", "plant", "root", "tree"]
    # a split without "horse": spans are counted over the split's classes only
    split = [c for c in LEAVES if c != "horse"]
    assert list(h.eligible(split, min_ways=3)) == ["animal", "pet", "plant"]


def test_superclass_episodes_stay_in_one_superclass_with_uniform_superclasses():
    h = superclasses()
    ds = VariableEpisodeDataset(
        store(NAMES), VariableEpisodes(max_ways=9), length=1800, seed=0, split="train", hierarchy=h
    )
    assert ds.class_groups is not None and ds.class_groups.names == tuple(sorted(SIZES))
    hits = dict.fromkeys(SIZES, 0)
    ways_seen: dict[str, set[int]] = {g: set() for g in SIZES}
    for i in range(len(ds)):
        classes, shots, q = ds.composition(i)
        supers = {NAMES[c].split("/")[0] for c in classes.tolist()}
        assert len(supers) == 1, supers
        g = supers.pop()
        hits[g] += 1
        ways_seen[g].add(len(classes))
        assert len(set(classes.tolist())) == len(classes) and len(shots) == len(classes)
    # ways uniform in [min_ways, min(max_ways, classes of the superclass)]: every value occurs, no other
    assert ways_seen == {g: set(range(5, min(9, n) + 1)) for g, n in SIZES.items()}
    # superclasses uniformly (not in proportion to their classes): chi-square with 5 degrees of freedom, fixed seed;
    # 20.5 is its 0.999 quantile, while drawing in proportion to their sizes (5 to 10 classes) would give about 93 here
    assert chi_square(list(hits.values())) < 20.5, hits


def test_dag_episodes_lie_under_one_eligible_node_with_uniform_nodes():
    names = LEAVES
    h = ClassHierarchy.from_dag(DAG, max_spanning_leaves=5)
    eligible = h.eligible(names, min_ways=3)
    cfg = VariableEpisodes(min_ways=3, max_ways=4, max_support=20)
    ds = VariableEpisodeDataset(store(names), cfg, length=1200, seed=1, split="val", hierarchy=h,
                                resample_per_epoch=False)  # fmt: skip
    assert ds.class_groups is not None and ds.class_groups.names == tuple(eligible)
    subsets = 0
    for i in range(len(ds)):
        classes = sorted(ds.composition(i)[0].tolist())
        # the node's classes when it spans at most max_ways, else max_ways of them (only "animal" spans 5)
        exact = [g for g, ids in eligible.items() if ids == classes]
        under = [g for g, ids in eligible.items() if len(ids) > 4 and set(classes) <= set(ids)]
        assert exact or (under and len(classes) == 4), classes
        subsets += not exact
    assert 0 < subsets < len(ds)
    # nodes uniformly: the group draws of the sampler itself (its first draw), 4 nodes, 3 degrees of freedom
    groups = ds.class_groups
    hits = [0] * len(groups)
    for i in range(3000):
        hits[groups.draw(3, 4, episode_generator(1, "val", 0, i))[0]] += 1
    assert chi_square(hits) < 16.3, hits  # the 0.999 quantile of chi-square(3)
    # and the dataset's episodes are those draws: episode i's classes come from node draw(i)
    for i in range(20):
        g, cls = groups.draw(3, 4, episode_generator(1, "val", 0, i))
        assert torch.equal(ds.composition(i)[0], cls)


def test_hierarchy_episodes_are_a_pure_function_of_seed_split_epoch_index():
    def make(split="train", **kw) -> VariableEpisodeDataset:
        return VariableEpisodeDataset(store(NAMES), VariableEpisodes(max_ways=9), length=16, seed=0, split=split,
                                      hierarchy=superclasses(), **kw)  # fmt: skip

    a, b = make(), make()
    assert all(
        torch.equal(a[i].support_x, b[i].support_x) and torch.equal(a[i].query_y, b[i].query_y) for i in range(8)
    )
    b.set_epoch(1)
    assert any(not torch.equal(a.composition(i)[0], b.composition(i)[0]) for i in range(8))
    assert any(not torch.equal(a.composition(i)[0], make("val").composition(i)[0]) for i in range(8))
    # the default sampler draws other classes from the same generator: the hierarchy changes episodes
    plain = VariableEpisodeDataset(store(NAMES), VariableEpisodes(max_ways=9), length=16, seed=0, split="train")
    assert any(not torch.equal(a.composition(i)[0], plain.composition(i)[0]) for i in range(8))

    # loader: batches are the episodes by index, and a resumed loader continues where the first stopped
    def ids(x: torch.Tensor) -> list[int]:
        return (x * 255).round().long().flatten().tolist()

    def rows(loader: EpisodeLoader) -> list[list[list[int]]]:  # batch -> task -> support rows without padding
        return [[ids(b.support_x[t][b.support_mask[t]]) for t in range(b.tasks)] for b in loader]

    full = rows(EpisodeLoader(make(), batch_size=4))
    assert sum(full, []) == [ids(a[i].support_x) for i in range(16)]
    first = EpisodeLoader(make(), batch_size=4)
    it = iter(first)
    next(it)
    resumed = EpisodeLoader(make(), batch_size=4)
    resumed.load_state_dict(first.state_dict())
    assert rows(resumed) == full[1:]


def test_class_augment_makes_one_group_per_variant():
    h = superclasses()
    ds = VariableEpisodeDataset(store(NAMES), VariableEpisodes(max_ways=9), length=200, seed=0, split="train",
                                hierarchy=h, class_augment=Rotations())  # fmt: skip
    assert ds.class_groups is not None and len(ds.class_groups) == 4 * len(SIZES)
    assert ds.class_groups.names[:4] == ("s0/rot000", "s0/rot090", "s0/rot180", "s0/rot270")
    variants = set()
    for i in range(len(ds)):
        classes = ds.composition(i)[0]
        base, variant = classes % len(NAMES), classes // len(NAMES)
        assert len({NAMES[c].split("/")[0] for c in base.tolist()}) == 1
        assert len(set(variant.tolist())) == 1  # an episode never mixes rotations
        variants.add(int(variant[0]))
    assert variants == {0, 1, 2, 3}


def test_sample_composition_with_groups():
    h = superclasses()
    groups = h.bind(NAMES, 5)
    counts = store(NAMES).counts()
    g = torch.Generator().manual_seed(0)
    classes, shots, q = sample_composition(counts, len(NAMES), VariableEpisodes(max_ways=9), g, groups=groups)
    assert len({NAMES[c].split("/")[0] for c in classes.tolist()}) == 1
    assert q == min(10, int(counts[classes].min()) // 2) and bool((shots >= 1).all())
    with pytest.raises(ValueError, match="bound with min_ways=5"):
        groups.draw(6, 9, g)


def test_hierarchy_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"2 of the 47 classes of split 'train' are under no superclass.*'x/c00'"):
        VariableEpisodeDataset(store([*NAMES, "x/c00", "y/c00"]), VariableEpisodes(), length=1, seed=0,
                               split="train", hierarchy=superclasses())  # fmt: skip
    with pytest.raises(ValueError, match=r"superclasses \[\('s0', 5\), \('s1', 6\)\].*min_ways=7.*lower min_ways to 5"):
        VariableEpisodeDataset(store(NAMES), VariableEpisodes(min_ways=7, max_ways=9), length=1, seed=0,
                               split="train", hierarchy=superclasses())  # fmt: skip
    dag = ClassHierarchy.from_dag(DAG, max_spanning_leaves=5)
    with pytest.raises(ValueError, match=r"no node of the class DAG is eligible for split 'val'.*span 1 to 7"):
        dag.eligible([c for c in LEAVES if c != "horse"], min_ways=5, split="val")
    with pytest.raises(ValueError, match="eligible for the split.*of its 0 classes, and they span 0 to 0"):
        dag.eligible([], min_ways=3)
    with pytest.raises(ValueError, match="under no internal node of the DAG"):
        dag.eligible([*LEAVES, "fish"], min_ways=3)
    with pytest.warns(UserWarning, match="1 of the 8 classes of split 'test' are under no eligible DAG node.*'crow'"):
        ClassHierarchy.from_dag(DAG, max_spanning_leaves=3).eligible(LEAVES, 3, split="test")
    with pytest.raises(ValueError, match="cycle through node 'a'"):
        ClassHierarchy.from_dag({"a": ["b"], "b": ["c", "a"]})
    with pytest.raises(ValueError, match="class 'x' is in superclasses 'A' and 'B'"):
        ClassHierarchy.from_superclasses({"A": ["x", "y"], "B": ["x"]})
    with pytest.raises(ValueError, match="no superclasses or internal nodes"):
        ClassHierarchy.from_dag({"a": []})
    with pytest.raises(ValueError, match="must be a ClassHierarchy"):
        VariableEpisodeDataset(store(NAMES), VariableEpisodes(), length=1, seed=0, split="train",
                               hierarchy={"s0": NAMES[:5]})  # type: ignore[arg-type]  # fmt: skip
    with pytest.raises(ValueError, match="max_spanning_leaves=0"):
        ClassHierarchy.from_dag(DAG, max_spanning_leaves=0)
