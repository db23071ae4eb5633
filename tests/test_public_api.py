"""Every name the package exports imports, and the subpackages' exports do too."""

import importlib

import pytest

import lightning_meta

SUBPACKAGES = [
    "lightning_meta.algorithms",
    "lightning_meta.callbacks",
    "lightning_meta.datamodules",
    "lightning_meta.functional",
    "lightning_meta.nn",
    "lightning_meta.optim",
]


def test_top_level_exports_resolve():
    missing = [name for name in lightning_meta.__all__ if not hasattr(lightning_meta, name)]
    assert missing == []


@pytest.mark.parametrize("module", SUBPACKAGES)
def test_subpackage_exports_resolve(module):
    mod = importlib.import_module(module)
    assert mod.__all__, f"{module} exports nothing"
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert missing == []
