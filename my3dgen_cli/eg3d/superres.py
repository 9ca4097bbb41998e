"""EG3D superresolution: the neural render (its rgb `image_raw` and the 32-ch `image_features`) -> final image.

One class covers the official variants; `SR_SPECS` gives each one's fixed widths. All layers use
the *last* w. The input is first resized to the module's input resolution (bilinear,
align_corners False, antialiased as configured). Official names: `superresolution.block{0,1}`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from my3dgen_cli.eg3d import ops, row_strips
from my3dgen_cli.eg3d.layers import SynthesisBlock


@dataclass(frozen=True)
class SRSpec:
    """Fixed layout of one superresolution variant."""

    input_resolution: int
    block0_channels: int
    block0_up: bool
    block1_channels: int
    resize_only_if_smaller: bool  # the 4X variant resizes only upwards
    has_filter_buffer: bool  # the module itself registers `resample_filter` (all but 8XDC)

    @property
    def output_resolution(self) -> int:
        return self.input_resolution * (4 if self.block0_up else 2)


SR_SPECS: dict[str, SRSpec] = {
    "training.superresolution.SuperresolutionHybrid8XDC": SRSpec(128, 256, True, 128, False, False),
    "training.superresolution.SuperresolutionHybrid8X": SRSpec(128, 128, True, 64, False, True),
    "training.superresolution.SuperresolutionHybrid4X": SRSpec(128, 128, False, 64, True, True),
    "training.superresolution.SuperresolutionHybrid2X": SRSpec(64, 128, False, 64, False, True),
    # my3dgen's test/demo size: 32 px neural render -> 64 px image.
    "my3dgen.superresolution.Tiny2X": SRSpec(32, 32, False, 16, False, True),
}


def resize_matrix(size_in: int, size_out: int, antialias: bool) -> torch.Tensor:
    """[size_out, size_in] float32 R with interpolate(x, bilinear) == R @ x @ R.T for x [..., in, in].

    Bilinear (align_corners False, optionally antialiased) resizing is separable, so resizing the
    rows of an identity image (columns kept, so no change there) gives the 1-D operator exactly.
    """
    eye = torch.eye(int(size_in), dtype=torch.float32).reshape(1, 1, int(size_in), int(size_in))
    r = F.interpolate(eye, size=(int(size_out), int(size_in)), mode="bilinear", align_corners=False,
                      antialias=antialias)
    return r[0, 0]


class Superresolution(nn.Module):
    def __init__(
        self,
        spec: SRSpec,
        channels: int,
        w_dim: int,
        antialias: bool,
        conv_clamp: float | None,
    ) -> None:
        super().__init__()
        self.spec, self.antialias = spec, antialias
        res0 = spec.input_resolution * (2 if spec.block0_up else 1)
        self.block0 = SynthesisBlock(
            channels, spec.block0_channels, w_dim, res0, 3, conv_clamp=conv_clamp, up=spec.block0_up
        )
        self.block1 = SynthesisBlock(spec.block0_channels, spec.block1_channels, w_dim, res0 * 2, 3, conv_clamp)
        if spec.has_filter_buffer:
            self.register_buffer("resample_filter", ops.setup_filter([1, 3, 3, 1]))

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        size = self.spec.input_resolution
        needed = x.shape[-1] < size if self.spec.resize_only_if_smaller else x.shape[-1] != size
        if not needed:
            return x
        if torch.onnx.is_in_onnx_export():
            # ONNX form: the same separable resize as two constant matrix products (MatMul only)
            r = resize_matrix(x.shape[-1], size, self.antialias).to(x)  # [size, in]
            return r @ x @ r.T
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=self.antialias)

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, ws: torch.Tensor, **block_kwargs) -> torch.Tensor:
        """rgb: [N,3,r,r], x: [N,C,r,r], ws: [N,num_ws,w_dim] -> image [N,3,out,out]."""
        ws = ws[:, -1:, :].repeat(1, 3, 1)
        x, rgb = self._resize(x), self._resize(rgb)
        fused, noise_mode = block_kwargs.get("fused_modconv", True), block_kwargs.get("noise_mode", "const")
        if all(row_strips.applies(block, x, fused, noise_mode) for block in (self.block0, self.block1)):
            kwargs = {k: v for k, v in block_kwargs.items() if k != "fused_modconv"}
            return row_strips.pair_image(self.block0, self.block1, x, rgb, ws, ws, **kwargs)
        x, rgb = self.block0(x, rgb, ws, **block_kwargs)
        _, rgb = self.block1(x, rgb, ws, keep_x=False, **block_kwargs)
        return rgb
