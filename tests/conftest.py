"""Shared fixtures: every test runs with its own MY3DGEN_HOME and offline by default."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private MY3DGEN_HOME (and TORCH_HOME) so no test reads or writes the user's cache or identities."""
    home = tmp_path / "my3dgen_home"
    monkeypatch.setenv("MY3DGEN_HOME", str(home))
    monkeypatch.delenv("MY3DGEN_OFFLINE", raising=False)
    monkeypatch.delenv("MY3DGEN_DEBUG", raising=False)
    monkeypatch.delenv("MY3DGEN_REGISTRY", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # never the user's torch hub downloads
    return home


@pytest.fixture
def shared_dir() -> Path:
    """../shared beside the project (CI has it; a fresh clone does not: skip then)."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present beside the project")
    return SHARED


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The CI box has 2 shared cores: more threads only oversubscribe (and make timings noisy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread_offline(one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """One thread and no network: training tests use the logged offline fallbacks (pixel losses)."""
    monkeypatch.setenv("MY3DGEN_OFFLINE", "1")
