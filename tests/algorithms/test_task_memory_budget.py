"""Every built-in learner that exposes `task_mode` also takes and forwards `task_memory_budget`."""

from __future__ import annotations

import inspect

import pytest
from torch import nn

import lightning_meta.algorithms as algorithms
from lightning_meta.algorithms import MetaLearner
from lightning_meta.nn import MLP, ContextMLP

MiB = 2**20


def learners_with_task_mode() -> list[type[MetaLearner]]:
    found = []
    for name in algorithms.__all__:
        cls = getattr(algorithms, name)
        if inspect.isclass(cls) and issubclass(cls, MetaLearner) and cls is not MetaLearner:
            if "task_mode" in inspect.signature(cls.__init__).parameters:
                found.append(cls)
    return found


def build(cls: type[MetaLearner], **kwargs) -> MetaLearner:
    if cls is algorithms.LEO:
        return cls(feature_dim=8, ways=3, latent_dim=4, **kwargs)
    if cls is algorithms.CAML:
        return cls(ContextMLP(), **kwargs)
    return cls(MLP(4, 3, hidden=(8,)), **kwargs)


def test_every_learner_with_task_mode_is_covered() -> None:
    names = {cls.__name__ for cls in learners_with_task_mode()}
    assert names >= {"MAML", "MetaSGD", "ANIL", "CAML", "LEO", "MAMLPlusPlus", "Reptile", "IMAML", "ProtoMAML"}


@pytest.mark.parametrize("cls", learners_with_task_mode(), ids=lambda c: c.__name__)
def test_task_memory_budget_reaches_the_selector(cls: type[MetaLearner]) -> None:
    base = inspect.signature(MetaLearner.__init__).parameters["task_memory_budget"]
    param = inspect.signature(cls.__init__).parameters.get("task_memory_budget")
    assert param is not None, f"{cls.__name__} does not take task_memory_budget"
    assert param.default == base.default and param.kind is inspect.Parameter.KEYWORD_ONLY
    assert "task_memory_budget:" in (cls.__doc__ or "") + (cls.__init__.__doc__ or "")
    for budget in (3 * MiB, 0.25):
        model = build(cls, task_memory_budget=budget)
        assert model.task_mode_selector.memory_budget == budget
    assert build(cls).task_mode_selector.memory_budget is None
    with pytest.raises(ValueError, match="memory_budget=-1"):
        build(cls, task_memory_budget=-1)


def test_the_budget_is_a_saved_hyperparameter() -> None:
    model = algorithms.MAML(nn.Linear(4, 3), task_memory_budget=5 * MiB)
    assert model.hparams["task_memory_budget"] == 5 * MiB
