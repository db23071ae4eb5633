"""MkDocs hook: the site shows the version of lightning-meta that pyproject.toml declares (the single source)."""

from __future__ import annotations

import re
from pathlib import Path

_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _version() -> str:
    match = re.search(r'^version = "([^"]+)"$', _PYPROJECT.read_text(), re.M)
    if match is None:
        raise RuntimeError(f"no static version in {_PYPROJECT}")
    return match.group(1)


def on_config(config, **kwargs):
    config["site_name"] = f"lightning-meta {_version()}"
    return config


def on_page_markdown(markdown: str, **kwargs) -> str:
    return markdown.replace("{{ version }}", _version())
