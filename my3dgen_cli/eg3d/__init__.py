"""EG3D in plain PyTorch, with the official module names so official weights load strictly.

    G = build_generator("ffhq512-128")   # or "tiny", or {"init_kwargs": ..., "rendering_kwargs": ...}
    G = load_generator(path)             # converted .safetensors (+ .json) or an official .pkl
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from my3dgen_cli.eg3d.configs import GeneratorConfig
    from my3dgen_cli.eg3d.triplane import TriPlaneGenerator

__all__ = ["build_generator", "load_generator", "count_parameters"]


def build_generator(config: str | dict[str, Any] | GeneratorConfig) -> TriPlaneGenerator:
    """A randomly initialized generator for a named config or a config dict (eval mode)."""
    from my3dgen_cli.eg3d.configs import resolve_config
    from my3dgen_cli.eg3d.triplane import TriPlaneGenerator

    return TriPlaneGenerator(resolve_config(config)).eval()


def count_parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def load_generator(path: str | Path, device: Any = None) -> TriPlaneGenerator:
    """Load weights strictly into a generator built from their config. See checkpoint.py."""
    from my3dgen_cli.weights.checkpoint import load_generator as _load

    return _load(path, device=device)
