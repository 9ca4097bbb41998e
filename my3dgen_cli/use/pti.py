"""Pivotal tuning (PTI): after inversion, train only the adapter so the generator renders this one image.

    psnr, lpips, image = tune_adapter(G, result.ws, result.camera, target, steps=100)

The latent and camera stay fixed; the adapter is changed in place (`get_adapter_state` before and
`restore_adapter` after keep the identity's own adapter for the next image).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from my3dgen_cli.optim import Adam
from my3dgen_cli.use.invert import InvertConfig, lpips_distance, psnr, render_losses


def tune_adapter(
    G: nn.Module,
    ws: torch.Tensor,
    camera: torch.Tensor,
    target: torch.Tensor,
    steps: int,
    lr: float = 3e-4,
    perceptual: nn.Module | None = None,
    config: InvertConfig | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[float, float | None, torch.Tensor]:
    """PTI-style: train only G's adapter tensors so that G(ws, camera) matches `target`.

    G must carry adapters (lora.add_adapters or load_adapter); its other weights stay frozen. The
    adapters are changed in place: callers that keep the identity's adapter elsewhere save the
    tuned tensors to a new file. Returns (psnr, lpips or None, image [1, 3, H, W]).
    """
    from my3dgen_cli.lora import adapter_layers

    cfg = config or InvertConfig()
    layers = adapter_layers(G)
    if not layers:
        raise ValueError("tune_adapter: the generator has no adapters")
    params = [p for a in layers.values() for p in (a.lora_A, a.lora_B)]
    for p in params:
        p.requires_grad_(True)
    ws, camera, target = ws.detach(), camera.detach(), target.detach().float()
    opt = Adam(params, lr=lr, betas=(0.9, 0.999))
    for step in range(steps):
        loss, _ = render_losses(G, ws, camera, target, perceptual, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        image = G.synthesis(ws, camera, noise_mode="const", sampling="deterministic")["image"]
        lp = lpips_distance(perceptual, image, target, cfg.lpips_size)
    return psnr(image, target), None if lp is None else float(lp), image


def restore_adapter(G: nn.Module, original: dict[str, torch.Tensor]) -> None:
    """Put the adapter tensors `original` (lora.get_adapter_state) back; an empty one drops G's adapters."""
    from my3dgen_cli.lora import adapter_layers, remove_adapters

    if not original:
        remove_adapters(G)
        return
    with torch.no_grad():
        for name, a in adapter_layers(G).items():
            a.lora_A.copy_(original[f"{name}.lora_A"])
            a.lora_B.copy_(original[f"{name}.lora_B"])
