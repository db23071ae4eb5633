"""Griffe extension: read the package's ``Example:`` docstring sections as Google-style ``Examples:`` sections.

The docstrings use the singular title, which griffe's Google parser takes for an admonition (free text), so the
``>>>`` doctests would render as prose instead of code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_TITLE = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and "Example:" in obj.docstring.value:
            obj.docstring.value = _TITLE.sub(r"\1Examples:", obj.docstring.value)
