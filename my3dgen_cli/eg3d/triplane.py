"""The EG3D tri-plane generator (official `TriPlaneGenerator`), with no hidden state in forward.

Module tree and names match the official G_ema: `backbone` (StyleGAN2 mapping + synthesis),
`superresolution`, `decoder` (OSGDecoder), plus the parameter-free `renderer` and
`ray_sampler`. Unlike the official code, `synthesis` never stores the neural rendering
resolution or cached planes on the module.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from my3dgen_cli.eg3d import heap, ops
from my3dgen_cli.eg3d.backbone import Backbone
from my3dgen_cli.eg3d.camera import check_label
from my3dgen_cli.eg3d.configs import GeneratorConfig
from my3dgen_cli.eg3d.fused_decoder import decode_features, use_fused
from my3dgen_cli.eg3d.layers import FullyConnectedLayer, Softplus
from my3dgen_cli.eg3d.renderer import ImportanceRenderer, ray_bundle, sampling_layout
from my3dgen_cli.eg3d.superres import Superresolution
from my3dgen_cli.speed import cpu_workers, run_parallel


class OSGDecoder(nn.Module):
    """Mean of the 3 plane features -> FC, softplus, FC -> sigma (channel 0) + colour features."""

    def __init__(self, n_features: int, hidden: int = 64, out_features: int = 32, lr_multiplier: float = 1.0):
        super().__init__()
        self.net = nn.Sequential(
            FullyConnectedLayer(n_features, hidden, lr_multiplier=lr_multiplier),
            Softplus(),
            FullyConnectedLayer(hidden, 1 + out_features, lr_multiplier=lr_multiplier),
        )

    def forward(self, sampled_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """sampled_features: [N, 3, M, C] -> {"rgb": [N, M, out], "sigma": [N, M, 1]}."""
        return self.decode(sampled_features.mean(1))

    def decode_samples(self, samples: torch.Tensor) -> dict[str, torch.Tensor]:
        """Plane samples [N, 3, C, M] (channels before points: grid_sample's layout) -> `forward`'s outputs."""
        return self._decode_means(samples.mean(1).transpose(1, 2))

    def decode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features already averaged over the planes, [N, M, C]."""
        return self._decode_means(x)

    def _decode_means(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The public decoders' work (speed.activation_checkpointing wraps those names, not this one).

        fp32 on the CPU both layers run in cache-sized chunks (fused_decoder.py); elsewhere (and inside
        `ops.reference_paths()`) op by op.
        """
        fc1, act, fc2 = self.net
        if use_fused(x) and isinstance(act, Softplus):
            w1, b1 = fc1.scaled(x.dtype)
            w2, b2 = fc2.scaled(x.dtype)
            if b1 is not None and b2 is not None:
                return decode_features(x, w1, b1, w2, b2)
        return self._decode(x)

    def _decode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`decode` op by op."""
        m, c = x.shape[1], x.shape[2]
        x = self.net(x.reshape(-1, c))
        x = x.reshape(-1, m, x.shape[-1])  # -1 for the batch: exported graphs keep it dynamic
        rgb = torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001  # MipNeRF's widened sigmoid
        return {"rgb": rgb, "sigma": x[..., 0:1]}


class RaySampler(nn.Module):
    """Parameter-free; kept as a module so the tree matches the official one."""

    def forward(self, cam2world: torch.Tensor, intrinsics: torch.Tensor, resolution: int):
        return ray_bundle(cam2world, intrinsics, resolution)


class TriPlaneGenerator(nn.Module):
    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.z_dim, self.c_dim, self.w_dim = config.z_dim, config.c_dim, config.w_dim
        self.img_resolution = config.img_resolution
        self.neural_rendering_resolution = config.neural_rendering_resolution
        self.rendering_kwargs = dict(config.rendering)
        self.renderer = ImportanceRenderer()
        self.ray_sampler = RaySampler()
        pc = config.plane_channels
        self.backbone = Backbone(
            config.z_dim, config.c_dim, config.w_dim, config.backbone_resolution, pc * 3,
            config.channel_base, config.channel_max, config.mapping_layers, conv_clamp=config.conv_clamp,
        )
        self.superresolution = Superresolution(
            config.sr_spec, pc, config.w_dim, bool(self.rendering_kwargs["sr_antialias"]), config.sr_conv_clamp
        )
        self.decoder = OSGDecoder(pc, 64, pc, lr_multiplier=float(self.rendering_kwargs.get("decoder_lr_mul", 1)))
        self.num_ws = self.backbone.num_ws

    def mapping(
        self,
        z: torch.Tensor,
        c: torch.Tensor,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
    ) -> torch.Tensor:
        """z: [N, z_dim], c: [N, 25] conditioning camera -> ws [N, num_ws, w_dim]."""
        check_label(c)
        if self.rendering_kwargs["c_gen_conditioning_zero"]:
            c = torch.zeros_like(c)
        c_scale = float(self.rendering_kwargs.get("c_scale", 1.0))
        return self.backbone.mapping(z, c * c_scale, truncation_psi, truncation_cutoff)

    def planes(self, ws: torch.Tensor, noise_mode: str = "const", fused_modconv: bool | None = None,
               generator: torch.Generator | None = None, channels_last: bool = False) -> torch.Tensor:
        """ws -> tri-planes [N, 3, C, R, R] (contiguous whatever `channels_last`)."""
        fused = (not self.training) if fused_modconv is None else fused_modconv
        img = self.backbone.synthesis(ws, noise_mode=noise_mode, fused_modconv=fused, generator=generator,
                                      channels_last=channels_last)
        return img.reshape(-1, 3, img.shape[1] // 3, img.shape[-2], img.shape[-1])

    def render_planes(self, planes: torch.Tensor, c: torch.Tensor, neural_rendering_resolution: int | None = None,
                      sampling: str = "deterministic", generator: torch.Generator | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Volume-render tri-planes [N, 3, C, R, R] from cameras c [N, 25], without superresolution.

        Returns (features [N, C, r, r], first 3 = rgb in [-1, 1]; depth [N, 1, r, r]) at the neural
        rendering resolution r: synthesis' "image_features" and "image_depth", the cheap part of
        `synthesis`, for previews of cached planes.
        """
        check_label(c)
        res = int(neural_rendering_resolution or self.neural_rendering_resolution)
        origins, directions = self.ray_sampler(c[:, :16].reshape(-1, 4, 4), c[:, 16:25].reshape(-1, 3, 3), res)
        features, depth, _ = self.renderer(planes, self.decoder, origins, directions, self.rendering_kwargs,
                                           sampling=sampling, generator=generator)
        feature_image = features.permute(0, 2, 1).reshape(-1, features.shape[-1], res, res).contiguous()
        return feature_image, depth.permute(0, 2, 1).reshape(-1, 1, res, res)

    def synthesis(
        self,
        ws: torch.Tensor,
        c: torch.Tensor,
        neural_rendering_resolution: int | None = None,
        noise_mode: str = "const",
        sampling: str = "deterministic",
        fused_modconv: bool | None = None,
        generator: torch.Generator | None = None,
        planes: torch.Tensor | None = None,
        channels_last: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Render ws from camera c.

        ws: [N, num_ws, w_dim]; c: [N, 25]. fused_modconv None = fused in eval, unfused in training
        (the official "inference_only"). `planes` skips the backbone (render many views of one face).
        channels_last: backbone and superresolution convolutions run in NHWC memory (speed.py; same
        values up to float order); the outputs are contiguous either way.
        Returns, as the official generator, {"image": [N,3,img,img] (superresolved),
        "image_raw": [N,3,r,r] (the neural render's rgb), "image_depth": [N,1,r,r]}, plus
        "image_features": [N,C,r,r], the whole feature image that superresolution reads (its first
        3 channels are image_raw); r is the neural rendering resolution.
        """
        check_label(c)
        ops.check_shape("ws", ws, [c.shape[0], self.num_ws, self.w_dim])
        if planes is None and self._split_by_view(ws, noise_mode, sampling, generator):
            return self._synthesis_on_threads(ws, c, neural_rendering_resolution, noise_mode, fused_modconv,
                                              channels_last)
        fused = (not self.training) if fused_modconv is None else fused_modconv
        if planes is None:
            planes = self.planes(ws, noise_mode=noise_mode, fused_modconv=fused, generator=generator,
                                 channels_last=channels_last)
            if ops.fast_paths() and not torch.is_grad_enabled():
                planes = sampling_layout(planes)  # the NCHW planes freed before the render, not kept beside a copy
        if ops.fast_paths():  # the backbone's free blocks, which the render would not fit
            heap.release_free(planes.numel() * planes.element_size(), planes.device)
        feature_image, depth_image = self.render_planes(planes, c, neural_rendering_resolution, sampling, generator)
        del planes  # the superresolution's 512 px layers set the peak memory: free the tri-planes first
        rgb_image = feature_image[:, :3].contiguous()  # outputs are plain NCHW tensors
        image = self.superresolution(
            rgb_image, feature_image, ws, noise_mode=self.rendering_kwargs["superresolution_noise_mode"],
            fused_modconv=fused, generator=generator, channels_last=channels_last,
        )
        return {"image": image, "image_raw": rgb_image, "image_depth": depth_image, "image_features": feature_image}

    def _split_by_view(self, ws: torch.Tensor, noise_mode: str, sampling: str,
                       generator: torch.Generator | None) -> bool:
        """Whether an inference batch renders its views on CPU threads (`_synthesis_on_threads`): no autograd, no
        random draws (their order would depend on the threads), not inside torch.compile, more than one part."""
        return (ws.device.type == "cpu" and not torch.is_grad_enabled() and generator is None
                and sampling == "deterministic"
                and "random" not in (noise_mode, self.rendering_kwargs["superresolution_noise_mode"])
                and not torch.compiler.is_compiling() and cpu_workers(ws.device, ws.shape[0]) > 1)

    def _synthesis_on_threads(self, ws: torch.Tensor, c: torch.Tensor, resolution: int | None, noise_mode: str,
                              fused_modconv: bool | None, channels_last: bool) -> dict[str, torch.Tensor]:
        """`synthesis` of a batch split into parts rendered on a thread each (speed.run_parallel), concatenated.

        Same pixels up to float rounding; a batch of 4 full-size views took 0.83x the time of one pass split op
        by op over 2 OpenMP threads (docs/benchmarks.md).
        """
        def part(rows: torch.Tensor) -> dict[str, torch.Tensor]:  # in the caller's no_grad and autocast
            return self.synthesis(ws[rows], c[rows], resolution, noise_mode, "deterministic", fused_modconv,
                                  channels_last=channels_last)

        rows = torch.arange(ws.shape[0], device=ws.device).tensor_split(cpu_workers(ws.device, ws.shape[0]))
        outs = run_parallel([functools.partial(part, r) for r in rows])
        return {key: torch.cat([out[key] for out in outs]) for key in outs[0]}

    def forward(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, **synthesis_kwargs: Any) -> dict[str, torch.Tensor]:
        """Official call: mapping conditioned on c, rendered from c."""
        ws = self.mapping(z, c, truncation_psi, truncation_cutoff)
        return self.synthesis(ws, c, **synthesis_kwargs)

    def sample_density(self, ws: torch.Tensor, points: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        """Raw sigma at world points [N, M, 3] -> [N, M, 1] (for mesh extraction)."""
        from my3dgen_cli.eg3d.renderer import mean_plane_features

        planes = self.planes(ws, noise_mode=noise_mode)
        out = self.decoder.decode(mean_plane_features(planes, points, float(self.rendering_kwargs["box_warp"])))
        return out["sigma"]
