"""Class hierarchies for Meta-Dataset's episode class selection (Triantafillou et al., ICLR 2020, arXiv:1903.03096).

Meta-Dataset does not draw an episode's classes uniformly from a split when its source has a class hierarchy
(Section 3.2 of the paper; ``EpisodeDescriptionSampler`` in its ``data/sampling.py``):

* **superclasses** (Omniglot's alphabets, ``kind="superclasses"``): one superclass uniformly among the split's,
  then ways uniform in ``[min_ways, min(max_ways, its classes)]`` and that many of its classes uniformly. A
  superclass with fewer than ``min_ways`` classes is an error, as in Meta-Dataset.
* **a DAG** (ImageNet's WordNet graph, ``kind="dag"``): one node uniformly among the *eligible* internal nodes,
  those spanning between ``min_ways`` and ``max_spanning_leaves`` (392) of the split's classes (its leaf
  descendants); its spanned classes are the episode's, or ``max_ways`` of them drawn uniformly when it spans
  more. The number of ways follows from the node; it is not drawn.

A :class:`ClassHierarchy` names classes by their store names and may cover several splits: binding it to a
split (:meth:`ClassHierarchy.bind`) keeps each superclass's or node's classes that the split has. Class
augmentation (e.g. rotations as new classes) turns each superclass or node into one per variant (a rotated
alphabet is a new alphabet, as a rotated character is a new character), so an episode never mixes variants.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

__all__ = ["MAX_SPANNING_LEAVES_ELIGIBLE", "ClassGroups", "ClassHierarchy", "HierarchyKind"]

#: Meta-Dataset's bound on the leaves an ImageNet node may span to be drawn: the smallest value that lets every
#: training class appear; a larger one makes more episodes plain uniform draws among many unrelated classes.
MAX_SPANNING_LEAVES_ELIGIBLE = 392

HierarchyKind = Literal["superclasses", "dag"]


@dataclass(frozen=True)
class ClassHierarchy:
    """Groups of classes that an episode's classes are drawn from (see the module docstring for the rule).

    Build one with :meth:`from_superclasses`, :meth:`group_by` or :meth:`from_dag`; pass it to
    :class:`~lightning_meta.datamodules.VariableEpisodeDataset` (``hierarchy=``) or return it from a datamodule's
    :meth:`~lightning_meta.datamodules.EpisodicDataModule.class_hierarchy`.

    Attributes:
        kind: ``"superclasses"`` or ``"dag"``.
        groups: superclass -> its classes, or internal DAG node -> the leaves (classes) it spans.
        max_spanning_leaves: most classes a DAG node may span to be eligible (unused for superclasses).

    Example:
        >>> h = ClassHierarchy.from_dag({"animal": ["dog", "cat", "bird"], "pet": ["dog", "cat"]})
        >>> h.groups["animal"], h.eligible(["bird", "cat", "dog"], min_ways=3)
        (('bird', 'cat', 'dog'), {'animal': [0, 1, 2]})
    """

    kind: HierarchyKind
    groups: Mapping[str, tuple[str, ...]] = field(repr=False)
    max_spanning_leaves: int = MAX_SPANNING_LEAVES_ELIGIBLE

    def __post_init__(self) -> None:
        if self.kind not in ("superclasses", "dag"):
            raise ValueError(f"kind={self.kind!r} must be 'superclasses' or 'dag'")
        if not isinstance(self.max_spanning_leaves, int) or self.max_spanning_leaves < 1:
            raise ValueError(f"max_spanning_leaves={self.max_spanning_leaves!r} must be a positive integer")
        if not self.groups:
            raise ValueError("the hierarchy has no superclasses or internal nodes; give at least one group of classes")
        empty = [g for g, members in self.groups.items() if not members]
        if empty:
            raise ValueError(f"groups {empty[:5]} have no classes; drop them")
        if self.kind == "superclasses":
            owner: dict[str, str] = {}
            for g, members in self.groups.items():
                for c in members:
                    if owner.setdefault(c, g) != g:
                        raise ValueError(
                            f"class {c!r} is in superclasses {owner[c]!r} and {g!r}; each class needs exactly one "
                            "superclass (for overlapping groups use ClassHierarchy.from_dag)"
                        )

    @classmethod
    def from_superclasses(cls, superclasses: Mapping[str, Iterable[str]]) -> ClassHierarchy:
        """A two-level hierarchy (Meta-Dataset's bi-level one): superclass name -> its class names.

        Example:
            >>> ClassHierarchy.from_superclasses({"Latin": ["Latin/a", "Latin/b"], "Greek": ["Greek/a"]}).kind
            'superclasses'
        """
        return cls("superclasses", {str(g): _unique(str(c) for c in cs) for g, cs in superclasses.items()})

    @classmethod
    def group_by(cls, class_names: Iterable[str], key: Callable[[str], str]) -> ClassHierarchy:
        """Superclasses named by ``key(class_name)``, e.g. Omniglot's alphabet ``lambda c: c.split("/")[0]``.

        Example:
            >>> h = ClassHierarchy.group_by(["Latin/a", "Latin/b", "Greek/a"], lambda c: c.split("/")[0])
            >>> dict(h.groups)
            {'Latin': ('Latin/a', 'Latin/b'), 'Greek': ('Greek/a',)}
        """
        out: dict[str, list[str]] = {}
        for c in class_names:
            out.setdefault(str(key(c)), []).append(str(c))
        return cls.from_superclasses(out)

    @classmethod
    def from_dag(
        cls, children: Mapping[str, Iterable[str]], *, max_spanning_leaves: int = MAX_SPANNING_LEAVES_ELIGIBLE
    ) -> ClassHierarchy:
        """A DAG given as node -> children; nodes without children are the leaves, i.e. the class names.

        A leaf reached along several paths counts once. Every internal node becomes a group of the leaves it
        spans (its descendants that are leaves).

        Raises:
            ValueError: when the graph has a cycle (naming a node on it) or no internal node.
        """
        kids = {str(n): _unique(str(c) for c in cs) for n, cs in children.items()}
        spans: dict[str, frozenset[str]] = {}
        state: dict[str, int] = {}  # 1: on the current path, 2: done

        def span(node: str) -> frozenset[str]:
            # iterative depth-first search: WordNet paths are deep enough to make recursion fragile
            stack = [(node, iter(kids.get(node, ())))]
            state[node] = 1
            while stack:
                n, it = stack[-1]
                child = next(it, None)
                if child is None:
                    stack.pop()
                    cs = kids.get(n, ())
                    spans[n] = frozenset({n}) if not cs else frozenset().union(*(spans[c] for c in cs))
                    state[n] = 2
                elif state.get(child) == 1:
                    raise ValueError(f"the class DAG has a cycle through node {child!r}; a hierarchy must be acyclic")
                elif state.get(child) is None:
                    state[child] = 1
                    stack.append((child, iter(kids.get(child, ()))))
            return spans[node]

        for n in kids:
            if state.get(n) is None:
                span(n)
        groups = {n: tuple(sorted(spans[n])) for n in sorted(kids) if kids[n]}
        return cls("dag", groups, max_spanning_leaves)

    @property
    def classes(self) -> set[str]:
        """Every class the hierarchy places."""
        return {c for members in self.groups.values() for c in members}

    def eligible(self, class_names: Sequence[str], min_ways: int, *, split: str = "") -> dict[str, list[int]]:
        """The groups that episodes of a split with ``class_names`` draw from: name -> indices into ``class_names``.

        Each group keeps the classes that the split has (groups without any are not the split's). Superclasses
        all stay; DAG nodes stay when they span ``min_ways`` to ``max_spanning_leaves`` of the split's classes.
        Groups are sorted by name (the draw order, so episodes do not depend on the mapping's order).

        Raises:
            ValueError: when a class of the split is in no group, a superclass has 1 to ``min_ways - 1`` of the
                split's classes, or no DAG node is eligible; each error names the values and the fix.
        """
        index = {c: k for k, c in enumerate(class_names)}
        where = f"split '{split}'" if split else "the split"
        placed = self.classes
        missing = [c for c in class_names if c not in placed]
        if missing:
            unit = "superclass" if self.kind == "superclasses" else "internal node of the DAG"
            raise ValueError(
                f"{len(missing)} of the {len(class_names)} classes of {where} are under no {unit}, e.g. "
                f"{missing[:5]}; the hierarchy must cover every class of the split (hierarchy names: "
                f"{sorted(placed)[:3]}...): fix the hierarchy or draw classes uniformly (no hierarchy)"
            )
        out: dict[str, list[int]] = {}
        small: list[tuple[str, int]] = []
        sizes: list[int] = []
        for g in sorted(self.groups):
            ids = sorted(index[c] for c in self.groups[g] if c in index)
            if not ids:
                continue
            sizes.append(len(ids))
            if self.kind == "superclasses" and len(ids) < min_ways:
                small.append((g, len(ids)))
            elif self.kind == "superclasses" or min_ways <= len(ids) <= self.max_spanning_leaves:
                out[g] = ids
        if small:
            raise ValueError(
                f"superclasses {small[:5]} of {where} have fewer than min_ways={min_ways} classes (Meta-Dataset "
                f"requires min_ways per superclass); lower min_ways to {min(n for _, n in small)}, or split the "
                "classes by superclass so that each superclass keeps its classes together"
            )
        if not out:
            raise ValueError(
                f"no node of the class DAG is eligible for {where}: nodes must span min_ways={min_ways} to "
                f"max_spanning_leaves={self.max_spanning_leaves} of its {len(class_names)} classes, and they span "
                f"{min(sizes, default=0)} to {max(sizes, default=0)}; lower min_ways or raise max_spanning_leaves"
            )
        if self.kind == "dag":
            reached = {k for ids in out.values() for k in ids}
            if len(reached) < len(class_names):
                lost = [c for k, c in enumerate(class_names) if k not in reached]
                rank_zero_warn(
                    f"{len(lost)} of the {len(class_names)} classes of {where} are under no eligible DAG node and "
                    f"never appear in episodes, e.g. {lost[:5]}; lower min_ways or raise max_spanning_leaves"
                )
        return out

    def bind(
        self,
        class_names: Sequence[str],
        min_ways: int,
        *,
        multiplier: int = 1,
        suffix: Callable[[int], str] | None = None,
        split: str = "",
    ) -> ClassGroups:
        """The split's :meth:`eligible` groups as class indices, one group per variant of class augmentation.

        Args:
            class_names: the split's (store) classes.
            min_ways: fewest classes of an episode.
            multiplier: variants per class (virtual class ``v`` is class ``v % C`` under variant ``v // C``).
            suffix: a variant's name (e.g. ``Rotations.suffix``), appended to the group names.
            split: the split's name, for error messages.
        """
        if multiplier < 1:
            raise ValueError(f"multiplier={multiplier} must be >= 1")
        groups = self.eligible(class_names, min_ways, split=split)
        n = len(class_names)
        names, members = [], []
        for g, ids in groups.items():
            base = torch.tensor(ids, dtype=torch.long)
            for k in range(multiplier):
                names.append(g if multiplier == 1 else f"{g}/{suffix(k) if suffix is not None else k}")
                members.append(base + k * n)
        return ClassGroups(self.kind, tuple(names), tuple(members), min_ways)


@dataclass(frozen=True)
class ClassGroups:
    """A hierarchy bound to one split (:meth:`ClassHierarchy.bind`): the groups an episode's classes come from.

    Attributes:
        kind: as :attr:`ClassHierarchy.kind`.
        names: the groups' names (with a variant suffix under class augmentation).
        members: each group's (virtual) class indices, long, at least ``min_ways`` each.
        min_ways: the ``min_ways`` they were bound with.
    """

    kind: HierarchyKind
    names: tuple[str, ...]
    members: tuple[Tensor, ...] = field(repr=False)
    min_ways: int

    def __len__(self) -> int:
        return len(self.names)

    def draw(self, min_ways: int, max_ways: int, generator: torch.Generator) -> tuple[int, Tensor]:
        """``(group, classes)``: a group uniformly, then its classes by the kind's rule (module docstring).

        The classes come in random order (label ``j`` is ``classes[j]``).
        """
        if min_ways > self.min_ways:
            raise ValueError(
                f"min_ways={min_ways} but the groups were bound with min_ways={self.min_ways}; bind the hierarchy "
                "with the sampler's min_ways"
            )
        g = int(torch.randint(len(self.members), (1,), generator=generator))
        cand = self.members[g]
        n = len(cand)
        if self.kind == "superclasses":
            ways = int(torch.randint(min_ways, min(max_ways, n) + 1, (1,), generator=generator))
        else:
            ways = min(max_ways, n)
        return g, cand[torch.randperm(n, generator=generator)[:ways]]


def _unique(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))
