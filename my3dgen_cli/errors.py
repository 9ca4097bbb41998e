"""Exception types the CLI turns into one-line messages.

Library code raises these for problems a user can fix (bad input, missing artifact, wrong
checksum). Anything else is a bug and keeps its traceback under `MY3DGEN_DEBUG=1`.
"""

from __future__ import annotations


class My3DGenError(Exception):
    """A problem the user can act on; `str(err)` is the whole message."""

    exit_code = 1


class UserInputError(My3DGenError, ValueError):
    """A file, flag or value given by the user is unusable ("got X, expected Y")."""

    exit_code = 2


class ArtifactError(My3DGenError):
    """A registry artifact is unknown, missing from the cache, or failed verification."""


class UnknownArtifactError(ArtifactError):
    """No registry entry, local base or file has this name."""


class OfflineError(ArtifactError):
    """The artifact is not cached and the network may not be used."""


class ChecksumError(ArtifactError):
    """Downloaded or imported bytes do not match the registry sha256."""


class DownloadError(ArtifactError):
    """The server could not be reached or answered with an error."""


class UnsafeCheckpointError(My3DGenError):
    """A checkpoint asks to run or import something that a weights file never needs."""


class IncompatibleAdapterError(My3DGenError):
    """An adapter was made on another base generator than the one it is applied to."""


def shown(value: object, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters: a value read from a file can be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reason(err: BaseException, limit: int = 160) -> str:
    """A library exception's text on one line, cut to `limit` characters (for "not readable (...)")."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
