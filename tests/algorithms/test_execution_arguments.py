"""Every built-in learner takes the shared execution arguments of ``MetaLearner`` that apply to it, with the base's
defaults, and forwards them: a learner that drops one silently runs with the base default instead."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
from torch import nn

import lightning_meta.algorithms as algorithms
from lightning_meta.algorithms import (
    ANIL,
    CAML,
    IMAML,
    LEO,
    MAML,
    SNAIL,
    FineTuneProtoNet,
    MAMLPlusPlus,
    MatchingNetworks,
    MetaLearner,
    MetaSGD,
    ProtoMAML,
    ProtoNet,
    Reptile,
    SimpleShot,
)
from lightning_meta.nn.film import ContextMLP
from tests.algorithms._meta_helpers import two_layer

SHARED = (
    "task_mode",
    "task_chunk",
    "inner_loss_scale",
    "cuda_graphs",
    "max_consecutive_skipped_steps",
    "task_memory_budget",
)
#: the metric learners always loop over tasks (no task_mode, so no memory budget for its "auto") and have no inner
#: loop under the meta-gradient (no inner loss to scale); their training steps still go through the non-finite guard
METRIC = ("task_chunk", "max_consecutive_skipped_steps")


def _snail(**kw) -> SNAIL:
    emb = nn.Sequential(nn.Flatten(), nn.Linear(4, 6))
    emb.out_dim = 6  # type: ignore[assignment]
    return SNAIL(emb, ways=2, shots=1, key_sizes=(4, 4, 4), value_sizes=(4, 4, 4), tc_filters=4, **kw)


#: learner -> (a small instance built with extra keyword arguments, the shared arguments it takes)
LEARNERS: dict[type, tuple[Callable[..., MetaLearner], tuple[str, ...]]] = {
    ANIL: (lambda **kw: ANIL(two_layer(), **kw), SHARED),
    CAML: (lambda **kw: CAML(ContextMLP(4, 3, context_dim=2, hidden=(6,)), **kw), SHARED),
    IMAML: (lambda **kw: IMAML(two_layer(), **kw), SHARED),
    LEO: (lambda **kw: LEO(**kw), SHARED),
    MAML: (lambda **kw: MAML(two_layer(), **kw), SHARED),
    MAMLPlusPlus: (lambda **kw: MAMLPlusPlus(two_layer(), **kw), SHARED),
    MetaSGD: (lambda **kw: MetaSGD(two_layer(), **kw), SHARED),
    ProtoMAML: (lambda **kw: ProtoMAML(nn.Linear(4, 8), **kw), SHARED),
    Reptile: (lambda **kw: Reptile(two_layer(), **kw), SHARED),
    ProtoNet: (lambda **kw: ProtoNet(nn.Flatten(), **kw), METRIC),
    MatchingNetworks: (lambda **kw: MatchingNetworks(nn.Flatten(), **kw), METRIC),
    SimpleShot: (lambda **kw: SimpleShot(nn.Identity(), **kw), METRIC),
    FineTuneProtoNet: (lambda **kw: FineTuneProtoNet(nn.Flatten(), **kw), METRIC),
    SNAIL: (_snail, METRIC),
}


#: a value other than the default for each argument, and how a built learner shows it
NON_DEFAULT: dict[str, tuple[object, Callable[[MetaLearner], object]]] = {
    "task_mode": ("loop", lambda m: m.task_mode),
    "task_chunk": (3, lambda m: m.task_chunk),
    "inner_loss_scale": (64.0, lambda m: (m.inner_loss_scaler.scale, m.inner_loss_scaler.dynamic)),
    "cuda_graphs": (True, lambda m: m.cuda_graphs),
    "max_consecutive_skipped_steps": (7, lambda m: m.max_consecutive_skipped_steps),
    "task_memory_budget": (0.25, lambda m: m.task_mode_selector.memory_budget),
}
EXPECTED_READBACK = {"inner_loss_scale": (64.0, False)}


def test_every_exported_learner_is_listed() -> None:
    exported = {
        obj
        for obj in (getattr(algorithms, name) for name in algorithms.__all__)
        if isinstance(obj, type) and issubclass(obj, MetaLearner) and obj is not MetaLearner
    }
    assert exported == set(LEARNERS)


@pytest.mark.parametrize("learner", list(LEARNERS), ids=lambda c: c.__name__)
def test_learner_takes_its_shared_execution_arguments_with_the_base_defaults(learner: type) -> None:
    params = inspect.signature(learner.__init__).parameters
    base = inspect.signature(MetaLearner.__init__).parameters
    assert tuple(name for name in SHARED if name in params) == LEARNERS[learner][1]
    for name in LEARNERS[learner][1]:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        if name == "task_chunk":  # "auto" where task_mode may vmap (all tasks at once), else the base's None
            assert params[name].default == ("auto" if "task_mode" in params else None)
        else:
            assert params[name].default == base[name].default, name


@pytest.mark.parametrize("learner", list(LEARNERS), ids=lambda c: c.__name__)
def test_learner_forwards_its_shared_execution_arguments(learner: type) -> None:
    build, names = LEARNERS[learner]
    model = build(**{name: NON_DEFAULT[name][0] for name in names})
    for name in names:
        value, read = NON_DEFAULT[name]
        assert read(model) == EXPECTED_READBACK.get(name, value), name
