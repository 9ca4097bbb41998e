"""Mesh extraction: sample the density field on a cube grid and run marching cubes.

The cube has side `box_warp` (the tri-planes' extent, 1 for the FFHQ models) centred on the world
origin; grid points are cell-free samples at linspace(-box/2, box/2, R) per axis, array axes
ordered (x, y, z) in camera.py's world (+y up, the face looks along +z). EG3D's own
`gen_samples.py --shapes` thresholds the raw sigma at 10; that is the default level here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

DEFAULT_LEVEL = 10.0


@torch.no_grad()
def density_grid(G: nn.Module, ws: torch.Tensor, resolution: int = 128, chunk: int = 1 << 16) -> np.ndarray:
    """Raw sigma on a [R, R, R] grid (axes x, y, z) over the box of side box_warp. ws: [1, num_ws, w_dim]."""
    if resolution < 2:
        raise ValueError(f"mesh resolution: got {resolution}, expected 2 or more")
    box = float(G.rendering_kwargs["box_warp"])
    axis = torch.linspace(-box / 2, box / 2, resolution, device=ws.device)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(1, -1, 3)
    planes = G.planes(ws, noise_mode="const")
    from my3dgen_cli.eg3d.renderer import mean_plane_features

    sigma = []
    for start in range(0, points.shape[1], chunk):
        part = points[:, start:start + chunk]
        sigma.append(G.decoder.decode(mean_plane_features(planes, part, box))["sigma"][0, :, 0].float().cpu())
    return torch.cat(sigma).reshape(resolution, resolution, resolution).numpy()


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


def extract_mesh(G: nn.Module, ws: torch.Tensor, resolution: int = 128,
                 level: float = DEFAULT_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """(vertices [V, 3], faces [F, 3]) of the density iso-surface of one latent ws [1, num_ws, w_dim]."""
    field = density_grid(G, ws, resolution)
    return marching_cubes(field, level, float(G.rendering_kwargs["box_warp"]))
