"""Anchors: each training photo projected into W (or W+) of the frozen base generator.

My3DGen trains its adapters on (photo, camera, anchor latent) triples; the anchor is found once,
before training, by optimizing a latent so the *frozen* base renders the photo from the photo's
camera (EG3D's projector: LPIPS at 256 px + L2, a few hundred steps, starting at w_avg).

We keep the noise inputs constant (`noise_mode="const"`), so there is no noise regularization
term, and render with deterministic sampling, so a projection is reproducible.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from my3dgen_cli.optim import Adam
from my3dgen_cli.speed import summed_gradients

SPACES = ("w", "w+")


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of [N, C, H, W] to size x size (identity when already that size)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def perceptual_distance(lpips: nn.Module | None, a: torch.Tensor, b: torch.Tensor, max_size: int = 256) -> torch.Tensor:
    """Mean LPIPS of images in [-1, 1] (resized to at most `max_size`); 0 when `lpips` is None."""
    if lpips is None:
        return a.new_zeros(())
    if a.shape[-1] > max_size:
        a, b = resize(a, max_size), resize(b, max_size)
    return lpips(a, b).mean()


def project_to_w(
    G: nn.Module,
    images: torch.Tensor,
    cameras: torch.Tensor,
    steps: int = 300,
    *,
    space: str = "w",
    lr: float = 0.01,
    lpips: nn.Module | None = None,
    l2_weight: float = 1.0,
    batch: int = 4,
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """Latents that make the frozen `G` render `images` from `cameras`.

    images: [N, 3, H, W] in [-1, 1] (resized to G's output size); cameras: [N, 25] labels.
    space "w": one w per photo, broadcast to every layer; "w+": one w per layer (fits better,
    generalizes worse to new views). Loss per photo: LPIPS(render, photo) at <= 256 px (skipped when
    `lpips` is None) + l2_weight * MSE. Adam(lr) with EG3D's projector schedule (linear ramp-up over
    the first 5 %, cosine ramp-down over the last 25 %). Photos are projected in chunks of `batch`.
    on_step(step, loss) is called after each step of each chunk. Returns ws [N, num_ws, w_dim]
    (detached, on the images' device). G's parameters are not changed.
    """
    if space not in SPACES:
        raise ValueError(f"space: got {space!r}, expected one of {SPACES}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: got shape {tuple(images.shape)}, expected (N, 3, H, W)")
    if cameras.shape != (images.shape[0], 25):
        raise ValueError(f"cameras: got shape {tuple(cameras.shape)}, expected ({images.shape[0]}, 25)")
    if steps < 0:
        raise ValueError(f"steps: got {steps}, expected >= 0")
    w_avg = G.backbone.mapping.w_avg.detach()
    num_ws = G.num_ws

    def part_loss(w: torch.Tensor, target: torch.Tensor, cams: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Rows lo:hi's share of the chunk's loss (its mean over the chunk's photos)."""
        ws = w[lo:hi].expand(hi - lo, num_ws, -1)  # w: one row ("w") or num_ws rows ("w+") per photo
        render = G.synthesis(ws, cams[lo:hi], noise_mode="const", sampling="deterministic")["image"]
        part = perceptual_distance(lpips, render, target[lo:hi]) + l2_weight * F.mse_loss(render, target[lo:hi])
        return part * ((hi - lo) / target.shape[0]) if hi - lo < target.shape[0] else part
    target_all = resize(images, G.img_resolution)
    out = []
    requires = [p.requires_grad for p in G.parameters()]
    for p in G.parameters():
        p.requires_grad_(False)
    try:
        for start in range(0, images.shape[0], batch):
            target = target_all[start:start + batch]
            cams = cameras[start:start + batch]
            n = target.shape[0]
            rows = 1 if space == "w" else num_ws
            w = w_avg.reshape(1, 1, -1).repeat(n, rows, 1).to(target.device).clone().requires_grad_(True)
            opt = Adam([w], lr=lr, betas=(0.9, 0.999))
            for step in range(steps):
                t = step / max(steps, 1)
                ramp = min(1.0, (1 - t) / 0.25)
                ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
                ramp *= min(1.0, (step + 1) / max(0.05 * steps, 1.0))
                for group in opt.param_groups:
                    group["lr"] = lr * ramp
                opt.zero_grad(set_to_none=True)
                loss = summed_gradients(functools.partial(part_loss, w, target, cams), n, [w], w.device)
                opt.step()
                if on_step is not None:
                    on_step(step, float(loss.detach()))
            out.append(w.detach().expand(n, num_ws, -1).clone())
    finally:
        for p, flag in zip(G.parameters(), requires, strict=True):
            p.requires_grad_(flag)
    if not out:
        return w_avg.reshape(1, 1, -1).expand(0, num_ws, -1).clone()
    return torch.cat(out)
