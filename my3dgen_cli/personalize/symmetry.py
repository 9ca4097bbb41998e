"""Face-symmetry regularization (My3DGen): a face seen from yaw θ, mirrored, is the face seen from -θ.

For a training latent w and a camera c at yaw θ, render I = G(w, c) and I' = G(w, mirror(c)) (the
camera at -θ, `camera.mirror_camera`), flip I' horizontally and penalize the distance between I and
flip(I'). The paper measures it as identity distance, 1 - cos(ArcFace IR-SE50 features), weight 1,
every 4th step. When the identity network is unavailable (or on request) LPIPS is used; without
LPIPS weights, pixel MSE. A perfectly symmetric face gives 0 under each of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from my3dgen_cli.eg3d.camera import CameraRig, camera_rig, mirror_camera

SYM_LOSSES = ("id", "lpips")
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SymmetryDistance:
    """A distance between two image batches [N, 3, H, W] in [-1, 1] -> scalar, and what it is."""

    fn: Distance
    kind: str  # "id", "lpips" or "mse"

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fn(a, b)


def identity_distance(net: nn.Module) -> SymmetryDistance:
    """1 - cosine of ArcFace IR-SE50 features (pSp's face crop, 112 px), mean over the batch."""
    from my3dgen_cli.losses.arcface import identity_features

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa, fb = identity_features(net, a), identity_features(net, b)
        return (1 - (fa * fb).sum(dim=1)).mean()

    return SymmetryDistance(fn, "id")


def lpips_distance(lpips: nn.Module) -> SymmetryDistance:
    from my3dgen_cli.personalize.anchors import perceptual_distance

    return SymmetryDistance(lambda a, b: perceptual_distance(lpips, a, b), "lpips")


def mse_distance() -> SymmetryDistance:
    return SymmetryDistance(lambda a, b: F.mse_loss(a, b), "mse")


def choose_distance(kind: str, identity_net: nn.Module | None, lpips: nn.Module | None) -> SymmetryDistance:
    """The distance for `--sym-loss kind`, falling back id -> lpips -> mse when networks are missing."""
    if kind not in SYM_LOSSES:
        raise ValueError(f"sym_loss: got {kind!r}, expected one of {SYM_LOSSES}")
    if kind == "id" and identity_net is not None:
        return identity_distance(identity_net)
    if lpips is not None:
        return lpips_distance(lpips)
    return mse_distance()


def mirror_pair(
    G: nn.Module, ws: torch.Tensor, cameras: torch.Tensor, neural_rendering_resolution: int | None = None,
    channels_last: bool = False, planes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(I, flip(I')): ws [N, num_ws, w_dim] rendered from cameras [N, 25] and from their mirrors.

    Both views come from one batched synthesis call (2N images) on one set of tri-planes per latent:
    the backbone does not see the camera, so it runs once per latent, not once per view. `planes`
    [N, 3, C, R, R]: those tri-planes when the caller already has them (training shares the main
    pass's); None = computed here. Returns two [N, 3, H, W] tensors.
    """
    n = ws.shape[0]
    if planes is None:
        planes = G.planes(ws, noise_mode="const", channels_last=channels_last)
    both = G.synthesis(torch.cat([ws, ws]), torch.cat([cameras, mirror_camera(cameras)]),
                       neural_rendering_resolution=neural_rendering_resolution, noise_mode="const",
                       sampling="deterministic", channels_last=channels_last, planes=torch.cat([planes, planes]))
    return both["image"][:n], both["image"][n:].flip(-1)


def symmetry_cameras(n: int, max_yaw: float, generator: torch.Generator, pitch: float = 0.0,
                     rig: CameraRig | None = None) -> torch.Tensor:
    """n cameras at yaws drawn uniformly from [-max_yaw, max_yaw] degrees with `generator` (CPU). [n, 25].

    rig: the base's camera rig (`camera_rig(G)`); None = FFHQ's.
    """
    yaw = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * max_yaw
    return camera_rig(rig).lookat(yaw, pitch)


def symmetry_loss(
    G: nn.Module, ws: torch.Tensor, cameras: torch.Tensor, distance: SymmetryDistance, channels_last: bool = False,
    planes: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mirror inconsistency of G for latents ws seen from cameras (differentiable in G and ws).

    planes: ws's tri-planes when already computed (mirror_pair)."""
    a, b = mirror_pair(G, ws, cameras.to(ws.device), channels_last=channels_last, planes=planes)
    return distance(a, b)
