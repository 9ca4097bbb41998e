"""EG3D volume rendering: rays from cameras, tri-plane sampling, coarse + importance marching.

Numerics follow the official ImportanceRenderer / MipRayMarcher2 / RaySampler exactly, including
the released models' plane-axes quirk (eg3d#67): a point (x, y, z) is read from the three planes
at (x, y), (x, z) and (z, x). Official inference jitters the coarse depths and draws the
importance samples at random; `sampling="deterministic"` fixes both (coarse depths exactly
linspace(ray_start, ray_end, n), importance u = linspace(0, 1, n)) and changes nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from my3dgen_cli.eg3d import composite_kernels, plane_kernels
from my3dgen_cli.eg3d.ops import fast_paths, full_precision

SAMPLING_MODES = ("deterministic", "stochastic")
# (first coordinate, second coordinate) read from each plane; official generate_planes() projected.
PLANE_AXES = ((0, 1), (0, 2), (2, 0))


def ray_bundle(cam2world: torch.Tensor, intrinsics: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre rays of an OpenCV camera.

    cam2world: [N, 4, 4]; intrinsics: [N, 3, 3] normalized (focal, principal point in image units).
    Returns origins and unit directions, each [N, R*R, 3], pixels in row-major order.
    """
    n, m = cam2world.shape[0], resolution**2
    device = cam2world.device
    steps = torch.arange(resolution, dtype=torch.float32, device=device) * (1.0 / resolution) + (0.5 / resolution)
    rows, cols = torch.meshgrid(steps, steps, indexing="ij")
    x_cam = cols.reshape(1, m).expand(n, m)
    y_cam = rows.reshape(1, m).expand(n, m)
    fx, fy = intrinsics[:, 0, 0, None], intrinsics[:, 1, 1, None]
    cx, cy, sk = intrinsics[:, 0, 2, None], intrinsics[:, 1, 2, None], intrinsics[:, 0, 1, None]
    x_lift = (x_cam - cx + cy * sk / fy - sk * y_cam / fy) / fx
    y_lift = (y_cam - cy) / fy
    ones = torch.ones_like(x_lift)
    cam_points = torch.stack((x_lift, y_lift, ones, ones), dim=-1)  # [N, M, 4]
    with full_precision(cam_points):  # geometry: never rounded by autocast
        world_points = torch.bmm(cam2world, cam_points.permute(0, 2, 1)).permute(0, 2, 1)[:, :, :3]
    origins = cam2world[:, None, :3, 3]
    directions = F.normalize(world_points - origins, dim=2)
    return origins.expand(n, m, 3), directions


def _plane_samples(planes: torch.Tensor, coordinates: torch.Tensor, box_warp: float) -> torch.Tensor:
    """grid_sample of every point on every plane: [N*3, C, 1, M] (zeros outside the box).

    planes: [N, 3, C, H, W], or already flat [N*3, C, H, W] (`gather_planes`: any memory format).
    """
    c, h, w = planes.shape[-3:]
    m = coordinates.shape[1]
    coords = (2.0 / box_warp) * coordinates
    if fast_paths():  # the six coordinates in one gather (advanced indexing is ~3x slower per call on the CPU)
        axes = torch.tensor([i for pair in PLANE_AXES for i in pair], device=coords.device)
        grid = coords.index_select(-1, axes).unflatten(-1, (len(PLANE_AXES), 2)).transpose(1, 2)  # [N, 3, M, 2]
    else:
        grid = torch.stack([coords[..., list(axes)] for axes in PLANE_AXES], dim=1)  # [N, 3, M, 2]
    # -1 (not n * 3) for the batch: an ONNX export then keeps the batch dimension dynamic
    grid = grid.reshape(-1, 1, m, 2).float()
    flat = planes if planes.ndim == 4 else planes.reshape(-1, c, h, w)
    return F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def gather_planes(planes: torch.Tensor) -> torch.Tensor:
    """planes [N, 3, C, H, W] as [N*3, C, H, W] in channels_last memory: the layout bilinear sampling wants.

    Each sample reads all C channels at 4 texels; NHWC puts those C values side by side (a cache line or
    two) instead of C planes apart, which makes CPU grid_sample 1.5-2x faster. Same values, bitwise.
    Made once per render and read by both the coarse and the importance pass.
    """
    c, h, w = planes.shape[-3:]
    return planes.reshape(-1, c, h, w).contiguous(memory_format=torch.channels_last)


def sampling_layout(planes: torch.Tensor) -> torch.Tensor:
    """planes [N, 3, C, H, W] with the same shape and values, stored as `gather_planes` wants them.

    For tri-planes made to be rendered (inference): a render's `gather_planes` is then a no-op, instead of a
    copy living beside the NCHW planes through the render (25 MiB per view at full size).
    """
    return gather_planes(planes).view(planes.shape)


def sample_from_planes(planes: torch.Tensor, coordinates: torch.Tensor, box_warp: float) -> torch.Tensor:
    """Bilinear features of 3-D points from the tri-planes (the official layout).

    planes: [N, 3, C, H, W]; coordinates: [N, M, 3] -> features [N, 3, M, C].
    """
    n_planes, c = planes.shape[1], planes.shape[2]
    out = _plane_samples(planes, coordinates, box_warp)
    return out.permute(0, 3, 2, 1).reshape(-1, n_planes, out.shape[-1], c)


def mean_plane_features(planes: torch.Tensor, coordinates: torch.Tensor, box_warp: float) -> torch.Tensor:
    """Mean over the 3 planes of `sample_from_planes`, [N, M, C]: what the decoder consumes.

    planes: [N, 3, C, H, W] or `gather_planes`' flat table (same values, faster).

    Averaging before the channels-last permute copies a third as much; the same three values are
    summed in the same order, so the result is bitwise that of `sample_from_planes(...).mean(1)`.
    """
    return plane_samples(planes, coordinates, box_warp).mean(1).transpose(1, 2)


def plane_samples(planes: torch.Tensor, coordinates: torch.Tensor, box_warp: float) -> torch.Tensor:
    """`sample_from_planes` in grid_sample's own layout, [N, 3, C, M] (no copy): `OSGDecoder.decode_samples`' input."""
    out = _plane_samples(planes, coordinates, box_warp)  # [N*3, C, 1, M]
    return out.reshape(-1, len(PLANE_AXES), planes.shape[-3], out.shape[-1])


def _cumprod(x: torch.Tensor, dim: int) -> torch.Tensor:
    """cumprod, in a form ONNX has (exp of cumsum of log) while exporting; x > 0 here."""
    if torch.onnx.is_in_onnx_export():
        return torch.exp(torch.cumsum(torch.log(x), dim=dim))
    return torch.cumprod(x, dim=dim)


def _searchsorted_right(sorted_seq: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """torch.searchsorted(right=True), as a comparison count while exporting to ONNX."""
    if torch.onnx.is_in_onnx_export():
        return (sorted_seq.unsqueeze(-2) <= values.unsqueeze(-1)).sum(-1)
    return torch.searchsorted(sorted_seq, values, right=True)


def march_weights(densities: torch.Tensor, depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MipRayMarcher2's weights [N, M, S-1, 1] and depth [N, M, 1] (densities, depths: [N, M, S, 1])."""
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    densities_mid = F.softplus((densities[:, :, :-1] + densities[:, :, 1:]) / 2 - 1)
    depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
    alpha = 1 - torch.exp(-densities_mid * deltas)
    alpha_shifted = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2)
    weights = alpha * _cumprod(alpha_shifted, -2)[:, :, :-1]
    depth = torch.sum(weights * depths_mid, -2) / weights.sum(2)
    depth = torch.nan_to_num(depth, float("inf"))
    depth = torch.clamp(depth, torch.min(depths), torch.max(depths))
    return weights, depth


def march(
    colors: torch.Tensor, densities: torch.Tensor, depths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MipRayMarcher2: composite samples along each ray (midpoint rule, softplus(sigma - 1) density).

    colors: [N, M, S, C]; densities, depths: [N, M, S, 1].
    Returns rgb in [-1, 1]-ish [N, M, C], depth [N, M, 1] (clamped to the sample range of the
    whole batch, as the official code does), weights [N, M, S-1, 1].
    """
    weights, depth = march_weights(densities, depths)
    colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    rgb = torch.sum(weights * colors_mid, -2)
    return rgb * 2 - 1, depth, weights


def sample_weights(weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weights [N, M, S, 1] u with sum_j u_j c_j == sum_k weights_k (c_k + c_k+1) / 2.

    The midpoint rule gives each interval's weight half to either end: u_j = (w_j + w_j-1) / 2 with
    w_-1 = w_S-1 = 0. The colours then enter once, linearly, so they need neither midpoints nor sorting.
    """
    zero = torch.zeros_like(weights[:, :, :1])
    return (torch.cat([weights, zero], -2) + torch.cat([zero, weights], -2)) / 2


SMALL_PRODUCT = 400  # samples x channels per ray below which `weighted_colors` multiplies and sums (tiny: 12 x 16)


def weighted_colors(colors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_s weights[n, m, s] colors[n, m, s, :] as one batched matrix product: [N, M, S, C] -> [N, M, C].

    The result has the dtype the reference's weights * colours has (fp32 weights: fp32 under autocast too).
    """
    n, m, s, c = colors.shape
    if s * c < SMALL_PRODUCT and composite_kernels.usable(colors, weights):  # training: one compiled loop each way
        return composite_kernels.weighted_sum(colors, weights)
    if s * c < SMALL_PRODUCT:  # torch's CPU bmm loops element by element below this size; a multiply-sum vectorizes
        return (weights.to(colors.dtype) * colors).sum(-2).to(torch.promote_types(weights.dtype, colors.dtype))
    out = torch.bmm(weights.reshape(-1, 1, s).to(colors.dtype), colors.reshape(-1, s, c))
    return out.reshape(n, m, c).to(torch.promote_types(weights.dtype, colors.dtype))


def coarse_depths(
    n: int, m: int, ray_start: float, ray_end: float, count: int, sampling: str,
    device: torch.device, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[N, M, count, 1] depths: linspace(ray_start, ray_end), jittered by one step in 'stochastic'."""
    depths = torch.linspace(ray_start, ray_end, count, device=device).reshape(1, 1, count, 1).repeat(n, m, 1, 1)
    if sampling == "stochastic":
        delta = (ray_end - ray_start) / (count - 1)
        jitter = torch.rand(depths.shape, device=device, generator=generator)
        depths = depths + jitter * delta
    return depths


def importance_depths(
    depths: torch.Tensor, weights: torch.Tensor, count: int, sampling: str,
    generator: torch.Generator | None = None, eps: float = 1e-5,
) -> torch.Tensor:
    """Inverse-CDF samples from the smoothed coarse weights (official sample_importance + sample_pdf).

    depths: [N, M, S, 1]; weights: [N, M, S-1, 1] -> [N, M, count, 1]. No gradient flows.
    """
    with torch.no_grad():
        n, m, s, _ = depths.shape
        z = depths.reshape(-1, s)  # [R = N*M, S]; -1 keeps an exported batch dynamic
        w = weights.reshape(-1, 1, s - 1).float()
        w = F.avg_pool1d(F.max_pool1d(w, 2, 1, padding=1), 2, 1).reshape(-1, s - 1) + 0.01
        bins = 0.5 * (z[:, :-1] + z[:, 1:])  # [R, S-1]
        pdf_w = w[:, 1:-1] + eps  # [R, S-3]
        n_bins = pdf_w.shape[1]
        pdf = pdf_w / torch.sum(pdf_w, -1, keepdim=True)
        cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)  # [R, S-2]
        if sampling == "deterministic":
            u = torch.linspace(0, 1, count, device=z.device).expand(z.shape[0], count).contiguous()
        else:
            u = torch.rand(z.shape[0], count, device=z.device, generator=generator)
        inds = _searchsorted_right(cdf, u)
        below = torch.clamp_min(inds - 1, 0)
        above = torch.clamp_max(inds, n_bins)
        cdf_lo, cdf_hi = torch.gather(cdf, 1, below), torch.gather(cdf, 1, above)
        bin_lo, bin_hi = torch.gather(bins, 1, below), torch.gather(bins, 1, above)
        denom = cdf_hi - cdf_lo
        denom = torch.where(denom < eps, torch.ones_like(denom), denom)
        samples = bin_lo + (u - cdf_lo) / denom * (bin_hi - bin_lo)
        return samples.reshape(-1, m, count, 1)


# Points per chunk (per batch element) of an inference render's sampling and decoding. 2^16 rendered a full-size
# view at nrr 128 in 0.89x the time of 2^18, bitwise the same, and takes the render's peak below the
# superresolution's (docs/benchmarks.md); under heavy load smaller chunks lost (each op's thread barrier).
DECODE_POINTS = 1 << 16
# Rays per group (over the batch) of a deterministic inference render on the CPU. Each ray's samples, weights
# and colours depend on that ray alone, and the depth clamp's range is the sample range, [ray_start, ray_end],
# in every group; so grouping changes no value (up to matmul blocking), while only a group's colours exist at
# once (~12 MiB per pass at 2048 rays, ~100 MiB whole at nrr 128). Time within 3 % of 4096 (docs/benchmarks.md).
RENDER_RAYS = 2048


def decode_in_chunks(decode: Callable[[torch.Tensor], dict], inputs: torch.Tensor, points: int | None = None) -> dict:
    """`decode(inputs)` on `points` points (dim 1 of inputs) at a time, written into the whole outputs.

    A full-size view samples and decodes ~0.8 M points per pass at nrr 128 (x the batch): whole, its
    three planes' samples, their mean and the decoder's 64-float hidden layer cost ~0.5 GB at once,
    for outputs a fifth that size. In slices only the outputs exist whole. No autograd graph (the
    outputs are written in place): inference only. Same values up to matmul blocking (~1e-7).
    """
    n, m = inputs.shape[:2]
    points = points or DECODE_POINTS
    outputs: dict[str, torch.Tensor] = {}
    for start in range(0, m, points):
        part = decode(inputs[:, start : start + points])
        for key, value in part.items():
            if key not in outputs:
                outputs[key] = value.new_empty(n, m, value.shape[-1])
            outputs[key][:, start : start + points] = value
    return outputs


class ImportanceRenderer(nn.Module):
    """Coarse pass, importance pass, merge sorted by depth, composite. Holds no parameters.

    `fused` (default) composites without moving colours: the merged samples' weights are computed in
    depth order from the densities alone, handed back to each sample's place in the coarse and fine
    passes (`sample_weights`), and each pass's colours enter one batched product (`weighted_colors`).
    The reference path (`fused = False`, `ops.reference_paths()`, ONNX export) sorts and gathers the
    colours and composites them as the official marcher does. Same sums in another order (~1e-7).
    """

    def __init__(self, fused: bool = True) -> None:
        super().__init__()
        self.fused = fused

    def forward(
        self,
        planes: torch.Tensor,
        decoder: nn.Module,
        origins: torch.Tensor,
        directions: torch.Tensor,
        options: dict,
        sampling: str = "deterministic",
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """planes: [N,3,C,H,W]; origins, directions: [N,M,3] -> rgb/features [N,M,F], depth [N,M,1],
        accumulated weight [N,M,1]."""
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling: got {sampling!r}, expected one of {SAMPLING_MODES}")
        fused = self.fused and fast_paths()
        if not fused or torch.is_grad_enabled():
            return self._render(planes, decoder, origins, directions, options, sampling, generator, fused, False)
        # inference: gather-friendly planes, decoder in chunks, and (deterministic, CPU) the rays in groups
        planes = gather_planes(planes)
        n, m, _ = origins.shape
        grouped = sampling == "deterministic" and origins.device.type == "cpu" and not torch.compiler.is_compiling()
        step = max(RENDER_RAYS // n, 1) if grouped else m
        if step >= m:
            return self._render(planes, decoder, origins, directions, options, sampling, generator, fused, True)
        parts = [self._render(planes, decoder, origins[:, i : i + step], directions[:, i : i + step], options,
                              sampling, generator, fused, True) for i in range(0, m, step)]
        return tuple(torch.cat(outs, dim=1) for outs in zip(*parts, strict=True))  # type: ignore[return-value]

    def _render(self, planes: torch.Tensor, decoder: nn.Module, origins: torch.Tensor, directions: torch.Tensor,
                options: dict, sampling: str, generator: torch.Generator | None, fused: bool, chunked: bool,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The render of `forward`, all rays at once (planes already gathered when `chunked`)."""
        n, m, _ = origins.shape
        depths_c = coarse_depths(n, m, float(options["ray_start"]), float(options["ray_end"]),
                                 int(options["depth_resolution"]), sampling, origins.device, generator)
        if fused and plane_kernels.usable(planes) and hasattr(decoder, "decode"):
            table = plane_kernels.plane_table(planes)  # once for both passes (a free view of gathered planes)
        else:
            table = None
        colors_c, densities_c = self.run_model(planes, decoder, origins, directions, depths_c, options, chunked,
                                               table)
        n_fine = int(options["depth_resolution_importance"])
        if n_fine <= 0:
            if fused:
                weights, depth = march_weights(densities_c, depths_c)
                rgb = weighted_colors(colors_c, sample_weights(weights)) * 2 - 1
                return rgb, depth, weights.sum(2)
            rgb, depth, weights = march(colors_c, densities_c, depths_c)
            return rgb, depth, weights.sum(2)
        weights = march_weights(densities_c, depths_c)[0] if fused else march(colors_c, densities_c, depths_c)[2]
        depths_f = importance_depths(depths_c, weights, n_fine, sampling, generator)
        colors_f, densities_f = self.run_model(planes, decoder, origins, directions, depths_f, options, chunked,
                                               table)
        depths = torch.cat([depths_c, depths_f], dim=-2)
        densities = torch.cat([densities_c, densities_f], dim=-2)
        depths, order = torch.sort(depths, dim=-2)
        densities = torch.gather(densities, -2, order)
        if fused:
            weights, depth = march_weights(densities, depths)
            per_sample = torch.zeros_like(depths).scatter(-2, order, sample_weights(weights))  # unsorted places
            s_c = depths_c.shape[-2]
            rgb = weighted_colors(colors_c, per_sample[:, :, :s_c]) + weighted_colors(colors_f, per_sample[:, :, s_c:])
            return rgb * 2 - 1, depth, weights.sum(2)
        colors = torch.cat([colors_c, colors_f], dim=-2)
        colors = torch.gather(colors, -2, order.expand(-1, -1, -1, colors.shape[-1]))
        rgb, depth, weights = march(colors, densities, depths)
        return rgb, depth, weights.sum(2)

    @staticmethod
    def run_model(
        planes: torch.Tensor, decoder: nn.Module, origins: torch.Tensor, directions: torch.Tensor,
        depths: torch.Tensor, options: dict, chunked: bool = False, table: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode colour features and density at depths [N,M,S,1] along the rays.

        chunked: sample and decode `DECODE_POINTS` points at a time (`decode_in_chunks`; inference only).
        table: the planes as `plane_kernels.plane_table` lays them out, to sample with its compiled loops."""
        n, m, s, _ = depths.shape
        points = (origins.unsqueeze(-2) + depths * directions.unsqueeze(-2)).reshape(-1, m * s, 3)
        box_warp = float(options["box_warp"])

        def decode(part: torch.Tensor) -> dict:
            if table is not None and not part.requires_grad:
                return decoder.decode(plane_kernels.plane_means(table, part, box_warp))
            if hasattr(decoder, "decode_samples"):
                return decoder.decode_samples(plane_samples(planes, part, box_warp))
            return decoder.decode(mean_plane_features(planes, part, box_warp))

        out = decode_in_chunks(decode, points) if chunked else decode(points)
        rgb = out["rgb"]
        return rgb.reshape(-1, m, s, rgb.shape[-1]), out["sigma"].reshape(-1, m, s, 1)
