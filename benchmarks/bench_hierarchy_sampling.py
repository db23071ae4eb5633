"""Cost of hierarchy-aware class selection in variable-way episodes, against uniform class selection.

Interleaved episode by episode in one process (machine load affects both alike), medians reported:

1. ``omniglot``: the two small background subsets, whole alphabets per split (custom split files), rotations as
   classes, 28x28; ``VariableEpisodes()`` with ``alphabet_episodes=True`` (one alphabet and rotation per episode)
   against the same datamodule without it;
2. ``dag``: a synthetic ImageNet-sized class DAG (712 leaves like Meta-Dataset's ILSVRC training split, random
   branching 2-6, every fifth internal node given a second, older parent) over a store of 712 classes x 20 images of
   3x8x8; ``ClassHierarchy.from_dag`` against no hierarchy.

For each, per episode: the whole episode (``dataset[i]``: classes, shots, rows, images), its composition
(``dataset.composition(i)``: classes, shots and the rows they take) and the four draws of the protocol alone
(``sample_composition``: classes, queries, support size, shots); plus the one-time cost of binding the hierarchy
to the split.
Episodes drawn under a hierarchy have other ways and shots than uniform ones (e.g. an alphabet caps the ways),
so the whole-episode ratio mixes the selection's cost with the episodes' sizes. Usage::

    python benchmarks/bench_hierarchy_sampling.py --episodes 300
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import warnings

import torch


def synthetic_dag(leaves: int, seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    frontier, children, k = ["root"], {}, 0
    while len(frontier) < leaves:  # split a random frontier node into 2-6 children until there are enough leaves
        node = frontier.pop(rng.randrange(len(frontier)))
        kids = [f"x{k + j}" for j in range(min(rng.randint(2, 6), leaves - len(frontier)))]
        k += len(kids)
        children[node] = kids
        frontier += kids
    order = {n: -1 if n == "root" else int(n[1:]) for n in children}
    internal = sorted(children, key=order.get)
    for n in internal[1::5]:  # second parents make it a DAG, not a tree (as WordNet); edges go from older to newer
        other = rng.choice(internal)  # nodes, so no cycle can form
        if order[other] < order[n] and n not in children[other]:
            children[other].append(n)
    return children


def time_pair(plain, hier, episodes: int, what) -> tuple[float, float]:
    a, b = [], []
    for i in range(episodes):
        t0 = time.perf_counter()
        what(plain, i)
        a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        what(hier, i)
        b.append(time.perf_counter() - t0)
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3


def report(name: str, plain, hier, episodes: int, bind_ms: float) -> None:
    ways = (
        [len(plain.composition(i)[0]) for i in range(episodes)],
        [len(hier.composition(i)[0]) for i in range(episodes)],
    )
    from lightning_meta.datamodules import episode_generator, sample_composition

    def counts_only(d, i) -> None:  # the four draws of the protocol, without choosing rows
        counts = d.store.counts().repeat(d.num_classes // d.store.num_classes)
        sample_composition(counts, d.num_classes, d.config, episode_generator(0, "bench", 0, i), groups=d.class_groups)

    parts = (
        ("episode", lambda d, i: d[i]),
        ("composition", lambda d, i: d.composition(i)),
        ("counts", counts_only),
    )
    for what, fn in parts:
        p, h = time_pair(plain, hier, episodes, fn)
        print(f"{name:9s} {what:12s} uniform {p:7.3f} ms  hierarchy {h:7.3f} ms  ratio {h / p:5.2f}")
    print(
        f"{name:9s} groups {len(hier.class_groups)}, bind {bind_ms:.1f} ms once; mean ways uniform "
        f"{statistics.mean(ways[0]):.2f}, hierarchy {statistics.mean(ways[1]):.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "omniglot"))
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from lightning_meta.datamodules import (
        ClassHierarchy,
        ClassStore,
        OmniglotDataModule,
        VariableEpisodeDataset,
        VariableEpisodes,
    )

    print(f"episodes {args.episodes}, torch threads {torch.get_num_threads()}")
    if os.path.exists(os.path.join(args.root, "images_background_small1.zip")):
        with tempfile.TemporaryDirectory() as splits:
            alphabets = {
                "train": ["Balinese", "Greek", "Japanese_(katakana)", "Korean", "Latin", "Tagalog"],
                "val": ["Early_Aramaic"],
                "test": ["Sanskrit"],
            }
            for s, names in alphabets.items():
                with open(os.path.join(splits, f"{s}.txt"), "w") as f:
                    f.write("\n".join(names))
            common = dict(
                split="custom", split_dir=splits, train_episodes=args.episodes, variable_episodes=VariableEpisodes()
            )
            plain_dm = OmniglotDataModule(args.root, **common)
            plain_dm.setup()
            t0 = time.perf_counter()
            hier_dm = OmniglotDataModule(args.root, alphabet_episodes=True, **common)
            hier_dm.datasets = hier_dm.make_datasets()
            bind_ms = (time.perf_counter() - t0) * 1e3  # includes loading the cached store
            report("omniglot", plain_dm.datasets["train"], hier_dm.datasets["train"], args.episodes, bind_ms)
    children = synthetic_dag(712, seed=0)
    names = sorted({c for kids in children.values() for c in kids if c not in children})
    labels = [c for c in names for _ in range(20)]
    store = ClassStore.from_labeled(torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8), labels, class_names=names)
    cfg = VariableEpisodes()
    plain = VariableEpisodeDataset(store, cfg, length=args.episodes, seed=0, split="train")
    t0 = time.perf_counter()
    h = ClassHierarchy.from_dag(children)
    hier = VariableEpisodeDataset(store, cfg, length=args.episodes, seed=0, split="train", hierarchy=h)
    bind_ms = (time.perf_counter() - t0) * 1e3
    print(f"dag: {len(names)} leaves, {len(children)} internal nodes")
    report("dag", plain, hier, args.episodes, bind_ms)


if __name__ == "__main__":
    main()
