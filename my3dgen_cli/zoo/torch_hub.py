"""Weights the user already has in torch hub's cache, reused instead of a second download.

torchvision and `lpips` keep their downloads in `$TORCH_HOME/hub/checkpoints/` (default
`~/.cache/torch/hub/checkpoints/`, or `$XDG_CACHE_HOME/torch/...`), under the file names the
registry's URLs end with (`alexnet-owt-7be5be79.pth`, `vgg16-397923af.pth`). Such a file is only a
candidate: it is used when its sha256 is the entry's full published (or recorded) one, and the
caller checks that (`admit.stage`) before the bytes enter the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from my3dgen_cli.zoo.registry import Entry


def checkpoints_dir() -> Path:
    """Where torch hub keeps downloaded weights (as `torch.hub.get_dir()`, without importing torch)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "torch")
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


def candidate(entry: Entry) -> Path | None:
    """torch hub's copy of `entry` when there is one to check: only an entry with a full sha256 can
    verify someone else's file (a short prefix or a hash still to be recorded cannot)."""
    if entry.sha256 is None:
        return None
    path = checkpoints_dir() / entry.display_filename
    return path if path.is_file() else None


def place(src: Path, part: Path) -> bool:
    """Hard-link `src` as `part` (no second copy of hundreds of MB); False when the file systems differ
    (or links are not allowed) and the caller has to copy it."""
    part.unlink(missing_ok=True)
    try:
        os.link(src, part)
    except OSError:
        return False
    return True
