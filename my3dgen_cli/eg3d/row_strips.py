"""A synthesis block computed a band of output rows at a time (inference only), for memory.

Computed whole, a block holds its input and two full-size activation maps at once (three with the
2x conv's transposed output): the superresolution's last block alone was ~320 MiB of a full-size
view's peak (docs/benchmarks.md). Band by band, only the input, one band of each layer and what the
caller keeps are alive. The last block of the backbone (256 px, whose image is the tri-planes) and of
the superresolution (512 px, whose image is the output) discard their activations `x`, so these are
never built whole; the superresolution's first block (256 px) keeps them for the next.

Every op of a block is local in the rows: a 3x3 conv needs 1 input row above and below its output
rows, and so does the 2x-upsampling conv (a stride-2 transposed conv, whose output row 2i+1 reads
input row i alone, then a 4-tap blur over output rows y-1..y+2); a 1x1 conv needs none. Each band
therefore reads its input rows plus one row either side (clipped at the image's edges, where the zero
padding is the real one), and keeps only the rows that the halo makes exact. The values are those of
the whole-image computation up to float summation order (tests/test_row_strips.py).
"""

from __future__ import annotations

import torch

from my3dgen_cli.eg3d import heap, ops

# Output rows per band so that one band of one layer's activations is about this many bytes (8 MiB: a 512 px,
# 128-channel layer in 16 bands of 32 rows); bands are at least MIN_BAND_ROWS tall so the halo rows
# (recomputed by both neighbours) stay a small share.
BAND_BYTES = 8 << 20
MIN_BAND_ROWS = 32
MIN_RESOLUTION = 256  # below this a block's maps are small: bands would only add calls


def applies(block: torch.nn.Module, x: torch.Tensor | None, fused_modconv: bool) -> bool:
    """Whether `block` (a SynthesisBlock) may run in bands: CPU inference, fused, >= MIN_RESOLUTION, > one band.

    Not on GPUs: there a band's smaller kernels may cost more than the memory saved (not measured)."""
    return (x is not None and x.device.type == "cpu" and block.in_channels != 0 and block.resolution >= MIN_RESOLUTION
            and fused_modconv
            and not torch.is_grad_enabled() and ops.fast_paths() and not torch.compiler.is_compiling()
            and band_rows(block, x.shape[0]) < block.resolution)


def band_rows(block: torch.nn.Module, batch: int) -> int:
    """Output rows per band: even (so a band starts on an input row of the upsampling conv)."""
    row_bytes = batch * block.out_channels * block.resolution * 4
    rows = max(MIN_BAND_ROWS, BAND_BYTES // row_bytes)
    return min(block.resolution, rows - rows % 2)


def _layer_rows(layer: torch.nn.Module, x: torch.Tensor, w_styles: torch.Tensor, weight: torch.Tensor,
                noise: torch.Tensor | None, lo: int, hi: int, channels_last: bool, row0: int = 0) -> torch.Tensor:
    """Rows [lo, hi) of `layer`'s output (conv, noise, bias, lrelu, clamp) from its input `x`.

    `x` is the whole input, or (up 1) a band of it whose first row is row `row0` of the whole: its own
    first and last rows are then real neighbours, or the image's edge, for the rows asked for.
    The conv reads input rows [i0, i1) = the band's rows plus the halo; its output then starts at row
    i0 * up of the whole output (the convs are translation-equivariant, padding aside), and the rows
    [lo, hi) are exact because the halo keeps them clear of the band's own (artificial) zero padding.
    """
    up, height = layer.up, x.shape[2]
    i0, i1 = max(lo // up - 1, 0), min(-(-hi // up) + 1, height)  # one input row of halo either side
    band_noise = None
    if noise is not None:  # [R, R] or [N, 1, R, R]: the rows the conv writes
        band_noise = noise[..., row0 + i0 * up : row0 + i1 * up, :]
    y = ops.modulated_conv2d_lrelu(x[:, :, i0:i1], weight, w_styles, layer.bias, noise=band_noise, up=up,
                                   resample_filter=layer.resample_filter, clamp=layer.conv_clamp,
                                   channels_last=channels_last)
    return y[:, :, lo - i0 * up : hi - i0 * up]


def block_forward(block: torch.nn.Module, x: torch.Tensor, img: torch.Tensor | None, ws: torch.Tensor,
                  noise_mode: str = "const", generator: torch.Generator | None = None,
                  channels_last: bool = False, keep_x: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What `block(x, img, ws)` returns, band by band: (x or None unless `keep_x`, image).

    Without `keep_x` the block's activations never exist whole; with it, only its output does (each
    band is copied in, in the layout the whole forward gives), not the conv0 output and the
    transposed conv's before it. ws: [N, 3, w_dim] (conv0, conv1, torgb). Random noise is drawn for
    conv0 then conv1, whole, before any band: the same draws in the same order as the whole forward.
    """
    ops.check_shape("SynthesisBlock ws", ws, [None, 3, block.w_dim])
    conv0, conv1, resolution = block.conv0, block.conv1, block.resolution
    heap.release_free(x.shape[0] * block.out_channels * resolution * resolution * 4, x.device)  # what came before
    w0, w1, w_rgb = ws.unbind(dim=1)
    styles0, styles1 = conv0.affine(w0), conv1.affine(w1)
    weight0, weight1 = conv0.effective_weight(), conv1.effective_weight()
    noise0, noise1 = conv0.noise(noise_mode, x, generator), conv1.noise(noise_mode, x, generator)
    if img is None:
        out = torch.zeros([x.shape[0], block.img_channels, resolution, resolution], device=x.device)
    elif block.up:
        out = ops.upsample2d(img, block.resample_filter)
    else:
        out = img.clone()  # added to in place below: never the caller's tensor
    x_out = None
    step = band_rows(block, x.shape[0])
    for lo in range(0, resolution, step):
        hi = min(lo + step, resolution)
        a0, a1 = max(lo - 1, 0), min(hi + 1, resolution)  # conv1's input rows (3x3: one row of halo)
        h0 = _layer_rows(conv0, x, styles0, weight0, noise0, a0, a1, channels_last)
        h1 = _layer_rows(conv1, h0, styles1, weight1, noise1, lo - a0, hi - a0, channels_last, row0=a0)
        del h0
        if keep_x:
            if x_out is None:
                x_out = _whole_like(h1, resolution, channels_last)
            x_out[:, :, lo:hi] = h1
        y = block.torgb(h1, w_rgb, fused_modconv=True, channels_last=channels_last)
        out[:, :, lo:hi] += y.to(torch.float32)
    return x_out, out


def _whole_like(band: torch.Tensor, resolution: int, channels_last: bool) -> torch.Tensor:
    """An empty [N, C, R, R] for a band's rows, in the fused conv's own output layout (NHWC of [1, N*C, R, R])."""
    n, c = band.shape[:2]
    if not channels_last:
        return band.new_empty(n, c, resolution, resolution)
    grouped = torch.empty([1, n * c, resolution, resolution], dtype=band.dtype, device=band.device,
                          memory_format=torch.channels_last)
    return grouped.view(n, c, resolution, resolution)
