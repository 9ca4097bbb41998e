"""What the viewer shows: one or two latents of a generator, and frames of them on demand.

The backbone (latent -> tri-planes) is the expensive half of EG3D and does not depend on the
camera, so its output is cached per latent (per interpolation step and truncation); a frame then
costs one volume render. A preview is that render alone, at the neural rendering resolution
(`G.render_planes`); a full frame adds the superresolution (`render.render_views`, as
`my3dgen render` does). Depth maps come from the volume render, so both qualities share them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from my3dgen_cli import media
from my3dgen_cli.eg3d.camera import camera_rig
from my3dgen_cli.errors import UserInputError
from my3dgen_cli.use.interpolate import lerp
from my3dgen_cli.use.render import angle_tag, latent_from_seed, render_views

QUALITIES = ("preview", "full")
MODES = ("rgb", "depth")
# Slider positions are rounded to this many decimals before they key the tri-plane cache, so a
# slider dragged back and forth reuses planes instead of computing one set per pixel of travel.
_KEY_DECIMALS = 2


@dataclass(frozen=True)
class Source:
    """A latent to show: fixed ws [1, num_ws, w_dim], or a seed (its ws depends on the truncation)."""

    name: str
    ws: torch.Tensor | None = None
    seed: int | None = None

    def latent(self, G: nn.Module, truncation: float) -> torch.Tensor:
        if self.ws is not None:
            return self.ws
        return latent_from_seed(G, int(self.seed), truncation)


def _number(params: Mapping[str, str], key: str, default: float, lo: float, hi: float) -> float:
    raw = params.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UserInputError(f"{key}: got {raw!r}, expected a number") from None
    if not (math.isfinite(value) and lo <= value <= hi):
        raise UserInputError(f"{key}: got {raw}, expected {lo:g}..{hi:g}")
    return value


def _choice(params: Mapping[str, str], key: str, choices: tuple[str, ...]) -> str:
    value = params.get(key, choices[0])
    if value not in choices:
        raise UserInputError(f"{key}: got {value!r}, expected one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class ViewState:
    """One frame's settings, as the page sends them. Angles in degrees (camera.py's convention)."""

    yaw: float = 0.0
    pitch: float = 0.0
    mix: float = 0.0  # 0 = first latent, 1 = second (linear, as `my3dgen interpolate`'s default)
    truncation: float = 0.7  # seeds only
    mode: str = "rgb"

    @classmethod
    def parse(cls, params: Mapping[str, str], truncation: float = 0.7) -> ViewState:
        """From query parameters; a missing one takes its default, a bad one raises UserInputError."""
        return cls(
            yaw=_number(params, "yaw", 0.0, -180.0, 180.0),
            pitch=_number(params, "pitch", 0.0, -90.0, 90.0),
            mix=round(_number(params, "mix", 0.0, 0.0, 1.0), _KEY_DECIMALS),
            truncation=round(_number(params, "truncation", truncation, 0.0, 2.0), _KEY_DECIMALS),
            mode=_choice(params, "mode", MODES),
        )


class Scene:
    """A generator and the latents it shows, with an LRU cache of their tri-planes."""

    def __init__(self, G: nn.Module, sources: list[Source], cache_size: int = 24) -> None:
        if not 1 <= len(sources) <= 2:
            raise UserInputError(f"view: got {len(sources)} latents, expected 1 (or 2 to interpolate between)")
        self.G, self.sources, self.cache_size = G, sources, cache_size
        self.device = G.backbone.mapping.w_avg.device
        self.rig = camera_rig(G)  # the base's own pivot and radius, as `my3dgen render` uses
        self._planes: OrderedDict[tuple[float, float], torch.Tensor] = OrderedDict()

    @property
    def has_seed(self) -> bool:
        return any(s.seed is not None for s in self.sources)

    def latent(self, state: ViewState) -> torch.Tensor:
        """ws [1, num_ws, w_dim] at the state's interpolation position and truncation."""
        first = self.sources[0].latent(self.G, state.truncation)
        if len(self.sources) == 1 or state.mix == 0.0:
            return first
        return lerp(first, self.sources[1].latent(self.G, state.truncation), state.mix)

    def _key(self, state: ViewState) -> tuple[float, float]:
        mix = state.mix if len(self.sources) == 2 else 0.0
        return mix, state.truncation if self.has_seed else 0.0

    @torch.no_grad()
    def planes(self, state: ViewState) -> tuple[torch.Tensor, torch.Tensor]:
        """(ws, tri-planes) for a state: the planes from the cache, or computed once and kept."""
        key = self._key(state)
        ws = self.latent(state)
        if key in self._planes:
            self._planes.move_to_end(key)
        else:
            self._planes[key] = self.G.planes(ws, noise_mode="const")
            while len(self._planes) > self.cache_size:
                self._planes.popitem(last=False)
        return ws, self._planes[key]

    def camera(self, state: ViewState) -> torch.Tensor:
        return self.rig.lookat(state.yaw, state.pitch).to(self.device)

    @torch.no_grad()
    def frame(self, state: ViewState, quality: str) -> np.ndarray:
        """uint8 [H, W, 3]: the volume render (preview, and every depth map) or the full image."""
        if quality not in QUALITIES:
            raise UserInputError(f"quality: got {quality!r}, expected one of {', '.join(QUALITIES)}")
        ws, planes = self.planes(state)
        cam = self.camera(state)
        if quality == "preview" or state.mode == "depth":
            features, depth = self.G.render_planes(planes, cam)
            if state.mode == "depth":
                return media.colorize_depth(depth[0, 0].float().cpu().numpy())
            return media.to_uint8(features[:, :3])  # image channels, however many features follow
        return media.to_uint8(render_views(self.G, ws, cam, batch=1, planes=planes).images[0])

    @torch.no_grad()
    def orbit(self, state: ViewState, angles: list[tuple[float, float]], batch: int = 8) -> list[np.ndarray]:
        """Full frames of the state's latent from (yaw, pitch) pairs (an orbit video's frames)."""
        ws, planes = self.planes(state)
        cams = self.rig.lookat([y for y, _ in angles], [p for _, p in angles])
        views = render_views(self.G, ws, cams, batch=batch, planes=planes)
        return [media.to_uint8(image) for image in views.images]

    def title(self, state: ViewState, angles: bool = True) -> str:
        """A file stem naming what is shown: seed3_psi0.70_yaw+030_pitch+000, a-b_mix0.40_..., _depth."""
        names = [s.name for s in self.sources]
        stem = names[0]
        if len(names) == 2:
            stem = names[0] if state.mix == 0.0 else names[1] if state.mix == 1.0 else \
                f"{names[0]}-{names[1]}_mix{state.mix:.2f}"
        if self.has_seed:
            stem += f"_psi{state.truncation:.2f}"
        if angles:
            stem += "_" + angle_tag(state.yaw, state.pitch)
        return stem + ("_depth" if state.mode == "depth" else "")
