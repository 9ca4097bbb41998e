"""Every file format my3dgen writes or reads, with its tag, contract and reader / writer: the one index.

Each artifact's contract lives with the code that owns the artifact (so an artifact and its reader
change together) and follows one pattern: a dataclass for what the file holds, `read_<artifact>(path)`
returning it after checking the format tag, dtypes, shapes, finite values and metadata types (a
one-line `UserInputError` otherwise), `write_<artifact>(path, obj)` writing it atomically, and the tag
constant beside them. This table names them as "module:attribute", resolved on demand (`resolve`), so
importing it costs nothing; tests/test_formats.py checks every entry against its module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Format:
    """One artifact: its format tag(s) (the constants' names), contract dataclass, reader and writer."""

    artifact: str
    module: str
    tags: tuple[str, ...]  # names of the tag constants in `module` (empty: a foreign format, no tag)
    contract: str
    reader: str
    writer: str | None  # None: my3dgen reads the format but never writes it


FORMATS: tuple[Format, ...] = (
    Format("adapter", "my3dgen_cli.adapter_file", ("ADAPTER_FORMAT", "ADAPTER_FORMAT_EXTRAS"), "AdapterFile",
           "read_adapter", "write_adapter"),
    Format("anchors", "my3dgen_cli.identity", ("ANCHORS_FORMAT",), "Anchors", "read_anchors", "write_anchors"),
    Format("partial anchors", "my3dgen_cli.identity", ("PARTIAL_ANCHORS_FORMAT",), "PartialAnchors",
           "read_partial_anchors", "write_partial_anchors"),
    Format("latent", "my3dgen_cli.identity", ("LATENT_FORMAT",), "Latent", "read_latent", "write_latent"),
    Format(".npy latent", "my3dgen_cli.latents", (), "my3dgen_cli.identity:Latent", "read_npy_latent", None),
    Format("converted base", "my3dgen_cli.weights.converted", ("CONVERTED_FORMAT",), "ConvertedBase",
           "read_converted_base", "write_converted_base"),
    Format("training checkpoint", "my3dgen_cli.personalize.checkpoints", ("CHECKPOINT_FORMAT",), "TrainingCheckpoint",
           "read_training_checkpoint", "write_training_checkpoint"),
)


def resolve(fmt: Format, name: str) -> Any:
    """The object named `name` (a tag constant, the contract, reader or writer) in `fmt`'s module, or in
    another module when written "module:name"."""
    module, _, attr = name.rpartition(":")
    return getattr(importlib.import_module(module or fmt.module), attr)


def tags() -> dict[str, Format]:
    """Format tag (the string a file carries) -> its Format."""
    return {resolve(fmt, tag): fmt for fmt in FORMATS for tag in fmt.tags}
