"""Where a bf16 view's pixel error comes from: the full-size generator under bf16 autocast, each part in turn kept fp32.

    python bench/bf16_error_bench.py [--batch 4] [--nrr 64] [--threads 2]

Renders a batch of random-weight views (the seeds of bench/render_bench.py) in fp32, then under bf16
autocast (NHWC, as `render --amp bf16` does) as the code stands, then with one part at a time run in
fp32 (autocast off inside it): the backbone, the renderer (decoder included) and each of the
superresolution's convolutions. Prints, per row, the largest error of the feature image the
superresolution reads and of the 512 px image (over the batch and per view), and the seconds per view.
The rows for single superresolution convolutions render its blocks whole (without row bands, which
call the layers' kernels directly), so their seconds are not the default path's. Needs a CPU with bf16
kernels (`speed.cpu_has_bf16_kernels`) or a GPU.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from my3dgen_cli.eg3d import build_generator, row_strips
from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
from my3dgen_cli.speed import check_amp_on


def kept_fp32(module: nn.Module) -> Callable[[], None]:
    """Run `module` with autocast off (its floating inputs cast to fp32) until the returned undo is called."""
    inner = module.forward

    def forward(*args, **kwargs):
        def up(v):
            return v.float() if torch.is_tensor(v) and v.is_floating_point() else v
        with torch.autocast(args[0].device.type, enabled=False):
            return inner(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})

    module.forward = forward
    return lambda: delattr(module, "forward")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--nrr", type=int, default=64, help="neural rendering resolution")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    check_amp_on(device, "bf16")
    torch.manual_seed(0)
    G = build_generator("ffhq512-128").to(device).eval()
    n = args.batch
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(1)).to(device)
    c_cond, c = frontal_camera(n).to(device), lookat_camera([20.0] * n, 5.0).to(device)
    with torch.no_grad():
        ws = G.mapping(z, c_cond)
        ref = G.synthesis(ws, c, neural_rendering_resolution=args.nrr)
    low, high = float(ref["image"].min()), float(ref["image"].max())
    print(f"config ffhq512-128 (random weights), batch {n}, nrr {args.nrr}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}; fp32 image range {low:.2f}..{high:.2f}")
    print("| kept in fp32 | feature image max abs diff | image max abs diff | per view | s/view |")
    print("|---|---:|---:|---|---:|")

    def row(label: str, modules: list[nn.Module]) -> None:
        undo = [kept_fp32(m) for m in modules]
        try:
            best = float("inf")
            for _ in range(2):
                start = time.perf_counter()
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                    out = G.synthesis(ws, c, neural_rendering_resolution=args.nrr, channels_last=True)
                best = min(best, time.perf_counter() - start)
        finally:
            for u in undo:
                u()
        feat = (out["image_features"].float() - ref["image_features"]).abs().max()
        img = (out["image"].float() - ref["image"]).abs().flatten(1).amax(1)
        views = " ".join(f"{v:.3f}" for v in img.tolist())
        print(f"| {label} | {feat:.4f} | {img.max():.4f} | {views} | {best / n:.3f} |", flush=True)

    row("nothing (as is)", [])
    row("backbone", [G.backbone.synthesis])
    row("renderer and decoder", [G.renderer])
    sr = G.superresolution
    row("superresolution (whole)", [sr])
    band_bytes = row_strips.BAND_BYTES
    row_strips.BAND_BYTES = 1 << 62  # one band: the blocks call their layers' forward
    try:
        row("nothing, blocks whole", [])
        for name in ("block0.conv0", "block0.conv1", "block1.conv0", "block1.conv1", "block1.torgb"):
            row(f"superresolution.{name}, blocks whole", [sr.get_submodule(name)])
    finally:
        row_strips.BAND_BYTES = band_bytes


if __name__ == "__main__":
    main()
