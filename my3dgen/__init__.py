"""my3dgen's public Python API under the name users install: `import my3dgen`.

    import my3dgen
    G = my3dgen.build_generator("tiny")
    c = my3dgen.lookat_camera(yaw=30.0, pitch=0.0)
    params = my3dgen.add_adapters(G, rank=1)

Names load on first use (module `__getattr__`), so `import my3dgen` does not import torch and the
`my3dgen` command stays fast. The implementation lives in `my3dgen_cli`, which stays importable.
"""

from __future__ import annotations

import importlib
from typing import Any

from my3dgen_cli import __version__

# public name -> (module, attribute). ../shared/DESIGN.md's "Public Python API" first, then the library's
# entry points: one per command (a typed plan or config in, a result out) and their building blocks.
_EXPORTS: dict[str, tuple[str, str]] = {
    "build_generator": ("my3dgen_cli.eg3d", "build_generator"),
    "load_generator": ("my3dgen_cli.eg3d", "load_generator"),
    "lookat_camera": ("my3dgen_cli.eg3d.camera", "lookat_camera"),
    "add_adapters": ("my3dgen_cli.lora", "add_adapters"),
    "open_generator": ("my3dgen_cli.generators", "open_generator"),
    "prepare_faces": ("my3dgen_cli.faces.prepare", "prepare_faces"),
    "personalize": ("my3dgen_cli.personalize.pipeline", "personalize"),
    "PersonalizeConfig": ("my3dgen_cli.personalize.pipeline", "PersonalizeConfig"),
    "read_photos": ("my3dgen_cli.personalize.pipeline", "read_photos"),
    "invert": ("my3dgen_cli.use.invert", "run_invert"),
    "InvertPlan": ("my3dgen_cli.use.invert", "InvertPlan"),
    "invert_image": ("my3dgen_cli.use.invert", "invert_image"),
    "InvertConfig": ("my3dgen_cli.use.invert", "InvertConfig"),
    "render": ("my3dgen_cli.use.render", "run_render"),
    "RenderPlan": ("my3dgen_cli.use.render", "RenderPlan"),
    "render_views": ("my3dgen_cli.use.render", "render_views"),
    "latent_from_seed": ("my3dgen_cli.use.render", "latent_from_seed"),
    "interpolate": ("my3dgen_cli.use.interpolate", "run_interpolate"),
    "InterpolatePlan": ("my3dgen_cli.use.interpolate", "InterpolatePlan"),
    "interpolate_latents": ("my3dgen_cli.use.interpolate", "interpolate_latents"),
    "export": ("my3dgen_cli.use.export", "run_export"),
    "ExportPlan": ("my3dgen_cli.use.export", "ExportPlan"),
    "extract_mesh": ("my3dgen_cli.use.mesh", "extract_mesh"),
    "evaluate": ("my3dgen_cli.use.evaluate", "evaluate"),
    "ModelChoice": ("my3dgen_cli.use.sources", "ModelChoice"),
    "My3DGenError": ("my3dgen_cli.errors", "My3DGenError"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'my3dgen' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
