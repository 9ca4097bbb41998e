"""Shared fixtures: every test runs with its own MY3DGEN_HOME and offline by default."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private MY3DGEN_HOME so no test reads or writes the user's cache or identities."""
    home = tmp_path / "my3dgen_home"
    monkeypatch.setenv("MY3DGEN_HOME", str(home))
    monkeypatch.delenv("MY3DGEN_OFFLINE", raising=False)
    monkeypatch.delenv("MY3DGEN_DEBUG", raising=False)
    monkeypatch.delenv("MY3DGEN_REGISTRY", raising=False)
    return home


@pytest.fixture
def shared_dir() -> Path:
    """../shared beside the project (CI has it; a fresh clone does not: skip then)."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present beside the project")
    return SHARED
