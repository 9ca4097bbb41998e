"""The StyleGAN2 backbone that paints the tri-planes ("skip" synthesis) and its mapping network.

Official names: `backbone.synthesis.b{res}` and `backbone.mapping`. For ffhq512-128 the planes are
256x256 with 96 channels (3 planes x 32) and there are 14 ws.
"""

from __future__ import annotations

import torch
from torch import nn

from my3dgen_cli.eg3d import ops
from my3dgen_cli.eg3d.layers import MappingNetwork, SynthesisBlock


class SynthesisNetwork(nn.Module):
    """Blocks b4 .. b{img_resolution}; channels per resolution = min(channel_base // res, channel_max)."""

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int,
        channel_max: int,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f"backbone resolution: got {img_resolution}, expected a power of two >= 4")
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.block_resolutions = [2**i for i in range(2, img_resolution.bit_length())]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        self.num_ws = 0
        for res in self.block_resolutions:
            in_channels = channels[res // 2] if res > 4 else 0
            block = SynthesisBlock(in_channels, channels[res], w_dim, res, img_channels, conv_clamp=conv_clamp)
            self.num_ws += block.num_conv
            setattr(self, f"b{res}", block)
        self.num_ws += 1  # the last block's toRGB

    def blocks(self) -> list[SynthesisBlock]:
        return [getattr(self, f"b{res}") for res in self.block_resolutions]

    def forward(self, ws: torch.Tensor, **block_kwargs) -> torch.Tensor:
        """ws: [N, num_ws, w_dim] -> planes image [N, img_channels, R, R]."""
        ops.check_shape("ws", ws, [None, self.num_ws, self.w_dim])
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        blocks = self.blocks()
        for block in blocks:
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(x, img, block_ws, keep_x=block is not blocks[-1], **block_kwargs)
        return img


class Backbone(nn.Module):
    """Official `Generator` of networks_stylegan2: `synthesis` then `mapping` (state-dict order)."""

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int,
        channel_max: int,
        mapping_layers: int = 2,
        mapping_lr_multiplier: float = 0.01,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels, channel_base, channel_max, conv_clamp)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, self.num_ws, mapping_layers, mapping_lr_multiplier)
