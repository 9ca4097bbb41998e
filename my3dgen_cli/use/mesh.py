"""Mesh extraction as EG3D's `gen_samples.py --shapes`: density on a cube grid, border trimmed, marching cubes.

The cube has side `box_warp` (the tri-planes' extent, 1 for the FFHQ models) centred on the world
origin; grid points are cell-free samples at linspace(-box/2, box/2, R) per axis, array axes
ordered (x, y, z) in camera.py's world (+y up, the face looks along +z). Like `gen_samples.py`:

- the surface is the raw sigma at level 10 (`DEFAULT_LEVEL`);
- before marching cubes a slab of int(30 * R / 256) samples on each of the six faces of the cube
  is set to sigma -1000 (`trim_border`), so density that reaches the edge of the box (the
  tri-planes' outside, where nothing was supervised) closes off inside the cube instead of
  leaving walls on its border. Here the slab is at least one sample thick (at R < 9 the official
  formula gives 0, and its `sigmas[-0:]` would blank the whole cube).

Vertex colours are the radiance field's: the decoder's first three colour features at each
vertex, in [0, 1] (what the neural render composites), scaled to 0..255.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

DEFAULT_LEVEL = 10.0
TRIM_AT_256 = 30  # gen_samples.py: samples trimmed per face at --shape-res 256, scaled with R
TRIM_VALUE = -1000.0  # gen_samples.py's sigma for the trimmed slabs


@dataclass(frozen=True)
class Mesh:
    """A triangle mesh in world units: vertices [V, 3] float32, faces [F, 3] int64, colours [V, 3] uint8."""

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray | None = None


def _grid_points(box: float, resolution: int, device: torch.device) -> torch.Tensor:
    axis = torch.linspace(-box / 2, box / 2, resolution, device=device)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(1, -1, 3)


@torch.no_grad()
def _decode(G: nn.Module, planes: torch.Tensor, points: torch.Tensor, key: str, chunk: int) -> torch.Tensor:
    """Decoder output `key` ("sigma" or "rgb") at world points [1, M, 3] -> [M, C] float32 on the CPU."""
    from my3dgen_cli.eg3d.renderer import mean_plane_features

    box = float(G.rendering_kwargs["box_warp"])
    parts = []
    for start in range(0, points.shape[1], chunk):
        part = points[:, start:start + chunk]
        parts.append(G.decoder.decode(mean_plane_features(planes, part, box))[key][0].float().cpu())
    return torch.cat(parts) if parts else torch.zeros(0, 1)


@torch.no_grad()
def density_grid(G: nn.Module, ws: torch.Tensor, resolution: int = 128, chunk: int = 1 << 16,
                 planes: torch.Tensor | None = None) -> np.ndarray:
    """Raw sigma on a [R, R, R] grid (axes x, y, z) over the box of side box_warp. ws: [1, num_ws, w_dim]."""
    if resolution < 2:
        raise ValueError(f"mesh resolution: got {resolution}, expected 2 or more")
    box = float(G.rendering_kwargs["box_warp"])
    planes = G.planes(ws, noise_mode="const") if planes is None else planes
    sigma = _decode(G, planes, _grid_points(box, resolution, ws.device), "sigma", chunk)[:, 0]
    return sigma.reshape(resolution, resolution, resolution).numpy()


def trim_width(resolution: int) -> int:
    """Samples trimmed on each face of a cube of `resolution` samples per axis (gen_samples.py's, at least 1)."""
    return max(1, int(TRIM_AT_256 * resolution / 256))


def trim_border(field: np.ndarray) -> np.ndarray:
    """A copy of `field` [R, R, R] with a `trim_width(R)`-thick slab on all six faces set to TRIM_VALUE."""
    out = np.array(field, dtype=np.float32, copy=True)
    pad = trim_width(out.shape[0])
    for axis in range(3):
        index = [slice(None)] * 3
        index[axis] = slice(0, pad)
        out[tuple(index)] = TRIM_VALUE
        index[axis] = slice(out.shape[axis] - pad, None)
        out[tuple(index)] = TRIM_VALUE
    return out


def marching_cubes(field: np.ndarray, level: float, box: float) -> tuple[np.ndarray, np.ndarray]:
    """Iso-surface of `field` [R, R, R] at `level` -> (vertices [V, 3] in world units, faces [F, 3]).

    Winding follows scikit-image's "ascent" convention for a field that is larger inside (not
    checked by a test). Raises ValueError naming the field's range when the level is never crossed.
    """
    from skimage.measure import marching_cubes as skimage_mc

    lo, hi = float(field.min()), float(field.max())
    if not lo < level < hi:
        raise ValueError(f"mesh level: got {level:g}, expected a value inside the density range ({lo:.3g}, {hi:.3g})")
    verts, faces, _, _ = skimage_mc(field.astype(np.float32), level=level, gradient_direction="ascent")
    r = field.shape[0]
    verts = verts * (box / (r - 1)) - box / 2
    return verts.astype(np.float32), faces.astype(np.int64)


@torch.no_grad()
def vertex_colors(G: nn.Module, planes: torch.Tensor, vertices: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """uint8 [V, 3]: the decoder's first three colour features at world `vertices` [V, 3], [0, 1] -> 0..255."""
    points = torch.from_numpy(np.ascontiguousarray(vertices, dtype=np.float32)).to(planes.device)[None]
    rgb = _decode(G, planes, points, "rgb", chunk)[:, :3]
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy().reshape(-1, 3)


def extract_mesh(G: nn.Module, ws: torch.Tensor, resolution: int = 128, level: float = DEFAULT_LEVEL,
                 trim: bool = True, colors: bool = True) -> Mesh:
    """The density iso-surface of one latent ws [1, num_ws, w_dim], border-trimmed and coloured by default."""
    with torch.no_grad():
        planes = G.planes(ws, noise_mode="const")
    field = density_grid(G, ws, resolution, planes=planes)
    if trim:
        field = trim_border(field)
    verts, faces = marching_cubes(field, level, float(G.rendering_kwargs["box_warp"]))
    return Mesh(verts, faces, vertex_colors(G, planes, verts) if colors else None)
