"""Every name the package exports imports, and the subpackages' exports do too."""

import ast
import importlib
from pathlib import Path

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


def _private(dotted: str) -> list[str]:
    return [part for part in dotted.split(".") if part.startswith("_") and not part.startswith("__")]


def test_no_module_imports_a_private_name_of_another_module():
    """Modules share only public names: a ``from lightning_meta.x import _y`` (or a relative one) of a private name
    couples the importer to another module's internals."""
    package = Path(lightning_meta.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (
                node.level > 0 or (node.module or "").startswith("lightning_meta")
            ):
                names = [
                    f"{node.module or '.'}.{a.name}" for a in node.names if _private(f"{node.module or ''}.{a.name}")
                ]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("lightning_meta") and _private(a.name)]
            else:
                continue
            found += [f"{path.relative_to(package.parent)}:{node.lineno} imports {n}" for n in names]
    assert found == []
