"""Every name in the ``__all__`` of the core subpackages imports and is documented."""

from __future__ import annotations

import importlib

import pytest

MODULES = [
    "lightning_meta.functional",
    "lightning_meta.functional.adaptation",
    "lightning_meta.functional.losses",
    "lightning_meta.functional.tasks",
    "lightning_meta.functional.meta_gradient",
    "lightning_meta.functional.scaling",
    "lightning_meta.functional.graphs",
    "lightning_meta.nn",
    "lightning_meta.nn.conv4",
    "lightning_meta.nn.mlp",
    "lightning_meta.nn.norm",
    "lightning_meta.nn.resnet12",
    "lightning_meta.nn.timm_backbone",
    "lightning_meta.algorithms.base",
    "lightning_meta.algorithms.execution",
    "lightning_meta.algorithms.maml",
    "lightning_meta.algorithms.anil",
    "lightning_meta.algorithms.meta_sgd",
    "lightning_meta.algorithms.protonet",
    "lightning_meta.algorithms.metrics",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_import_and_have_docstrings(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__doc__, name
    for attr in module.__all__:
        obj = getattr(module, attr)
        if (
            callable(obj)
            and not isinstance(obj, type(module))
            and getattr(obj, "__module__", "").startswith("lightning_meta")
        ):
            assert obj.__doc__, f"{name}.{attr} has no docstring"


def test_algorithm_files_name_their_paper() -> None:
    for name in ("maml", "anil", "meta_sgd", "protonet"):
        doc = importlib.import_module(f"lightning_meta.algorithms.{name}").__doc__
        assert "arXiv:" in doc.splitlines()[0] or "arXiv:" in doc, name
