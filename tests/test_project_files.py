"""The files a user and a packager expect next to the code: licence, changelog, one version."""

from __future__ import annotations

import re
from importlib.metadata import metadata, version
from pathlib import Path

import lightning_meta

REPO = Path(__file__).resolve().parents[1]


def _pyproject_version() -> str:
    match = re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert match, "pyproject.toml declares no static version"
    return match.group(1)


def test_version_has_one_source() -> None:
    # the package reads its installed metadata, which pip builds from pyproject.toml
    assert lightning_meta.__version__ == version("lightning-meta") == _pyproject_version()


def test_license_file_is_the_declared_apache_2() -> None:
    assert metadata("lightning-meta")["License-Expression"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    # the full text, not a notice: all nine sections of the terms
    for section in range(1, 10):
        assert re.search(rf"^\s+{section}\. \w", text, re.M), f"section {section} missing"
    assert "END OF TERMS AND CONDITIONS" in text


def test_changelog_has_unreleased_and_the_current_version() -> None:
    text = (REPO / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    assert headings[0] == "Unreleased"
    assert _pyproject_version() in headings


def _project_texts() -> list[Path]:
    files = [REPO / "README.md", REPO / "CHANGELOG.md", REPO / "pyproject.toml"]
    for folder, patterns in (
        ("lightning_meta", ("*.py",)),
        ("examples", ("*.py", "*.yaml")),
        ("benchmarks", ("*.py", "*.sh")),
        ("docs", ("*.md",)),
        ("tests", ("*.py",)),
    ):
        for pattern in patterns:
            files += sorted((REPO / folder).rglob(pattern))
    return files


def test_cited_doc_pages_exist_and_no_team_notes_are_cited() -> None:
    missing, notes = [], []
    note_names = (
        "REFERENCE" + ".md",
        "REFERENCE" + " §",
        "LEARNED_OPTIMIZERS" + ".md",
        "DESIGN" + ".md",
        "STYLE" + ".md",
    )  # split so that this file does not cite them itself
    for path in _project_texts():
        text = path.read_text(errors="replace")
        for cited in re.findall(r"docs/[\w./-]+?\.md", text):
            if not (REPO / cited).is_file():
                missing.append(f"{path.relative_to(REPO)}: {cited}")
        notes += [f"{path.relative_to(REPO)}: {n}" for n in note_names if n in text]
    assert missing == [], "cited pages that do not exist"
    assert notes == [], "files users do not have are cited"
