"""Docs that cannot go stale: the CLI reference is regenerated and compared, links resolve."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_cli_reference_is_current():
    from my3dgen_cli.clidoc import render

    assert (DOCS / "cli.md").read_text(encoding="utf-8") == render(), (
        "docs/cli.md is stale: run `python -m my3dgen_cli.clidoc > docs/cli.md`")


def test_cli_reference_covers_every_command():
    from my3dgen_cli.clidoc import command_paths

    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    for path in command_paths():
        assert f"## my3dgen {' '.join(path)}\n" in text


def test_index_links_every_page_and_links_resolve():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for page in DOCS.glob("*.md"):
        if page.name != "index.md":
            assert f"({page.name})" in index, f"docs/index.md does not link {page.name}"
    for md in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (md.parent / target).exists(), f"{md.name}: broken link {target}"


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    block = "\n".join(lines[:8])
    assert "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/my3dgen demo" in block
    assert '.venv/bin/pip install -q -e ".[dev]" && .venv/bin/python -m pytest' in block
