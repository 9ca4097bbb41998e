"""Where my3dgen keeps files. Read at call time, never at import, so tests can isolate a run.

`MY3DGEN_HOME` (when set) is the single root of everything my3dgen writes:

    $MY3DGEN_HOME/cache/        downloaded artifacts and converted base generators
    $MY3DGEN_HOME/identities/   one folder per personalized identity

Otherwise the cache is platformdirs' user cache dir and identities live in its user data dir.
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "my3dgen"


def home() -> Path | None:
    """The `MY3DGEN_HOME` root, or None when unset; a path that exists but is not a folder is an error."""
    value = os.environ.get("MY3DGEN_HOME", "").strip()
    if not value:
        return None
    root = Path(value).expanduser()
    if root.exists() and not root.is_dir():  # "nothing stored yet" from every command would hide the mistake
        from my3dgen_cli.errors import UserInputError

        raise UserInputError(f"MY3DGEN_HOME: {root} is a file, expected a folder (or a path to create one at)")
    return root


def cache_dir() -> Path:
    """Root of the artifact cache."""
    root = home()
    if root is not None:
        return root / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME))


def data_dir() -> Path:
    """Root of user data (identities)."""
    root = home()
    if root is not None:
        return root
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME))


def identities_dir() -> Path:
    """Folder holding one sub-folder per identity."""
    return data_dir() / "identities"


def offline() -> bool:
    """True when `MY3DGEN_OFFLINE` is set to a true value (1, true, yes, on); false when unset or 0, false, no, off.

    Any other value is an error: a typo such as `MY3DGEN_OFFLINE=ture` silently meant "online".
    """
    value = os.environ.get("MY3DGEN_OFFLINE", "").strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"", "0", "false", "no", "off"}:
        return False
    from my3dgen_cli.errors import UserInputError

    raise UserInputError(f"MY3DGEN_OFFLINE: got {value!r}, expected 1/true/yes/on or 0/false/no/off")


def debug() -> bool:
    """True when `MY3DGEN_DEBUG` asks for full tracebacks."""
    return os.environ.get("MY3DGEN_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}
