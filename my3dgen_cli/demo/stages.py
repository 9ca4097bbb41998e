"""The demo's uses of its new identity: invert a held-out view, orbit, interpolate, export ONNX, evaluate.

Each step writes its files into the demo's output folder and returns what the report shows; run.py
calls them in order and times them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from my3dgen_cli import media
from my3dgen_cli.errors import My3DGenError
from my3dgen_cli.fileio import write_text_atomic
from my3dgen_cli.output import Output


def upscaled(image: np.ndarray, res: int, size: int = 128) -> np.ndarray:
    """Nearest-neighbour enlargement of small demo renders so the report shows them at a visible size."""
    k = max(1, size // res)
    return np.repeat(np.repeat(image, k, axis=0), k, axis=1) if k > 1 else image


def held_out_latent(evaluation: Any, base: str, identity: str, held: Any, size: int,
                    out_dir: Path) -> tuple[Any, torch.Tensor, Path]:
    """(inversion, target image, .latent path): eval's inversion of the first held-out view under the
    personalized prior, written as heldout.latent."""
    from my3dgen_cli.identity import Latent, write_latent
    from my3dgen_cli.personalize.anchors import resize

    inv = evaluation.inversions["personalized"][0]
    target = resize(held.images[:1].float(), size).to(inv.image.device)
    return inv, target, write_latent(out_dir / "heldout.latent", Latent(inv.ws, inv.camera, base, identity, "w"))


def orbit(G: nn.Module, ws: torch.Tensor, frames: int, out_dir: Path) -> dict[str, Path]:
    """orbit.gif (`frames` views around the head) and contact_sheet.png (yaw -50 to 50)."""
    from my3dgen_cli.eg3d.camera import camera_rig
    from my3dgen_cli.use.render import orbit_angles, render_views

    rig, res = camera_rig(G), G.img_resolution
    angles = orbit_angles(frames)
    views = render_views(G, ws, rig.lookat([a for a, _ in angles], [b for _, b in angles]))
    gif = media.write_gif(out_dir / "orbit.gif", [media.to_uint8(im) for im in views.images], fps=12)
    sheet = render_views(G, ws, rig.lookat([-50.0, -25.0, 0.0, 25.0, 50.0], 0.0)).images
    png = media.write_png(out_dir / "contact_sheet.png",
                          media.grid([upscaled(media.to_uint8(im), res) for im in sheet]))
    return {"orbit_gif": gif, "contact_sheet": png}


def interpolate(G: nn.Module, anchors: torch.Tensor, anchor_cams: torch.Tensor, frames: int, out_dir: Path) -> Path:
    """interpolation.png: the first to the last training photo (slerp of anchors, cameras interpolated)."""
    from my3dgen_cli.eg3d.camera import camera_rig
    from my3dgen_cli.use.interpolate import interpolate_cameras, interpolate_latents

    dev = next(G.parameters()).device
    a, b = 0, anchors.shape[0] - 1
    ws_path = interpolate_latents([anchors[a:a + 1], anchors[b:b + 1]], frames, "slerp")
    cam_path = interpolate_cameras(anchor_cams[[a, b]].cpu(), frames, rig=camera_rig(G))
    with torch.no_grad():
        morph = [G.synthesis(w[None].to(dev), c[None].to(dev), noise_mode="const")["image"][0]
                 for w, c in zip(ws_path, cam_path, strict=True)]
    return media.write_png(out_dir / "interpolation.png",
                           media.grid([upscaled(media.to_uint8(m), G.img_resolution) for m in morph]))


def export_onnx(identity: str, path: Path, out: Output) -> dict[str, Any]:
    """ONNX export of the identity, checked by onnxruntime; a skip (with its reason) without it."""
    try:
        from my3dgen_cli.use import export as lib

        G, ref, _, merge_diff = lib.merged_generator(identity=identity, device="cpu", offline=True)
        check = lib.export_onnx(G, path, metadata={"identity": identity, "base": ref.name})
    except (My3DGenError, ImportError) as err:
        out.warn(f"ONNX export skipped: {err}")
        return {"skipped": str(err)}
    return {"path": str(path), "size": path.stat().st_size, "max_abs_diff": check.max_abs_diff,
            "merge_max_abs_diff": merge_diff}


def evaluate_held_out(identity: str, held: Any, steps: int, device: Any, nets: Any, out_dir: Path) -> tuple[Any, Path]:
    """(evaluation, metrics.json): base vs personalized on the held-out views."""
    from my3dgen_cli.use.evaluate import evaluate

    evaluation = evaluate(identity, held.images, held.cameras, held.names, steps=steps, device=device,
                          lpips=nets.train_lpips, arcface=nets.identity)
    path = out_dir / "metrics.json"
    write_text_atomic(path, json.dumps(evaluation.to_dict(), indent=1))
    return evaluation, path
