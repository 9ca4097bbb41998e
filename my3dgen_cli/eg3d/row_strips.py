"""A synthesis block computed a band of output rows at a time (inference only), for memory.

Computed whole, a block holds its input and two full-size activation maps at once (three with the
2x conv's transposed output): the superresolution's last block alone was ~320 MiB of a full-size
view's peak (docs/benchmarks.md). Band by band, only the input, one band of each layer and what the
caller keeps are alive. The backbone's last block (256 px, whose image is the tri-planes) discards
its activations `x`, so they are never built whole (`block_forward`); the superresolution's two
blocks (256 and 512 px) go by bands of the second's rows together, so neither's are (`pair_image`).

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


def applies(block: torch.nn.Module, x: torch.Tensor | None, fused_modconv: bool, noise_mode: str = "const") -> bool:
    """Whether `block` (a SynthesisBlock) may run in bands: CPU inference, fused, >= MIN_RESOLUTION, > one band.

    Not on GPUs: there a band's smaller kernels may cost more than the memory saved (not measured). Not for
    random noise under autocast: each layer draws it in the dtype of its own input, which the bands draw
    before any layer has run."""
    if x is None or x.device.type != "cpu" or (noise_mode == "random" and torch.is_autocast_enabled("cpu")):
        return False
    return (block.in_channels != 0 and fused_modconv
            and block.resolution >= MIN_RESOLUTION and band_rows(block, x.shape[0]) < block.resolution
            and not torch.is_grad_enabled() and ops.fast_paths() and not torch.compiler.is_compiling())


def band_rows(block: torch.nn.Module, batch: int) -> int:
    """Output rows per band (even: the 2x conv's bands then start on a whole input row, with no overlap)."""
    row_bytes = batch * block.out_channels * block.resolution * 4
    rows = max(MIN_BAND_ROWS, BAND_BYTES // row_bytes)
    return min(block.resolution, rows - rows % 2)


def _layer_rows(layer: torch.nn.Module, x: torch.Tensor, w_styles: torch.Tensor, weight: torch.Tensor,
                noise: torch.Tensor | None, lo: int, hi: int, channels_last: bool, row0: int = 0) -> torch.Tensor:
    """Rows [lo, hi) (counted from `row0`) of `layer`'s output (conv, noise, bias, lrelu, clamp) from input `x`.

    `x` is the whole input (row0 0), or a band of it whose first row's outputs start at output row `row0`
    of the whole (its first input row times `up`); the band holds the rows asked for plus their halo, or
    reaches the image's edge. The conv reads x's rows [i0, i1) = those rows plus the halo; its output
    then starts at output row row0 + i0 * up (the convs are translation-equivariant, padding aside),
    and the rows [lo, hi) are exact because the halo keeps them clear of the band's own (artificial)
    zero padding.
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


class _Banded:
    """One block's per-sample weights, styles and noise, made once, and its layers on any rows."""

    def __init__(self, block: torch.nn.Module, ws: torch.Tensor, x: torch.Tensor, noise_mode: str,
                 generator: torch.Generator | None, channels_last: bool) -> None:
        ops.check_shape("SynthesisBlock ws", ws, [None, 3, block.w_dim])
        self.block, self.channels_last = block, channels_last
        w0, w1, self.w_rgb = ws.unbind(dim=1)
        self.styles = (block.conv0.affine(w0), block.conv1.affine(w1))
        self.weights = (block.conv0.effective_weight(), block.conv1.effective_weight())
        self.noise = (block.conv0.noise(noise_mode, x, generator), block.conv1.noise(noise_mode, x, generator))

    def rows(self, x: torch.Tensor, lo: int, hi: int, x_row0: int = 0) -> torch.Tensor:
        """Rows [lo, hi) of the block's activations (conv0, then conv1) from input rows starting at `x_row0`.

        `x` holds at least the input rows these need (one row of halo per conv), or reaches the image's edge.
        """
        block, up = self.block, self.block.conv0.up
        a0, a1 = max(lo - 1, 0), min(hi + 1, block.resolution)  # conv1's input rows (3x3: one row of halo)
        h0 = _layer_rows(block.conv0, x, self.styles[0], self.weights[0], self.noise[0], a0 - x_row0 * up,
                         a1 - x_row0 * up, self.channels_last, row0=x_row0 * up)
        return _layer_rows(block.conv1, h0, self.styles[1], self.weights[1], self.noise[1], lo - a0, hi - a0,
                           self.channels_last, row0=a0)

    def rgb(self, h: torch.Tensor) -> torch.Tensor:
        """The block's ToRGB of activation rows, as float32 (what the whole forward adds to the image)."""
        return self.block.torgb(h, self.w_rgb, fused_modconv=True, channels_last=self.channels_last).to(torch.float32)

    def skip(self, img: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """The image the block adds its ToRGB to: img upsampled, a copy of it, or zeros; float32, new."""
        block = self.block
        if img is None:
            return torch.zeros([x.shape[0], block.img_channels, block.resolution, block.resolution], device=x.device)
        return ops.upsample2d(img, block.resample_filter) if block.up else img.clone()


def block_forward(block: torch.nn.Module, x: torch.Tensor, img: torch.Tensor | None, ws: torch.Tensor,
                  noise_mode: str = "const", generator: torch.Generator | None = None,
                  channels_last: bool = False, keep_x: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What `block(x, img, ws)` returns, band by band: (x or None unless `keep_x`, image).

    Without `keep_x` the block's activations never exist whole; with it, only its output does (each
    band is copied in, in the layout the whole forward gives), not the conv0 output and the
    transposed conv's before it. ws: [N, 3, w_dim] (conv0, conv1, torgb). Random noise is drawn for
    conv0 then conv1, whole, before any band: the same draws in the same order as the whole forward.
    """
    resolution = block.resolution
    heap.release_free(x.shape[0] * block.out_channels * resolution * resolution * 4, x.device)  # what came before
    banded = _Banded(block, ws, x, noise_mode, generator, channels_last)
    out, x_out = banded.skip(img, x), None
    step = band_rows(block, x.shape[0])
    for lo in range(0, resolution, step):
        hi = min(lo + step, resolution)
        h = banded.rows(x, lo, hi)
        if keep_x:
            if x_out is None:
                x_out = _whole_like(h, resolution, channels_last)
            x_out[:, :, lo:hi] = h
        out[:, :, lo:hi] += banded.rgb(h)
    return x_out, out


def pair_image(first: torch.nn.Module, second: torch.nn.Module, x: torch.Tensor, img: torch.Tensor | None,
               ws_first: torch.Tensor, ws_second: torch.Tensor, noise_mode: str = "const",
               generator: torch.Generator | None = None, channels_last: bool = False) -> torch.Tensor:
    """The image of `second(*first(x, img, ws_first), ws_second)` by bands of the second block's rows.

    The superresolution's two blocks: the first block's activations (64 MiB at full size) are never built
    whole either. Each band computes the first block's rows it newly needs and keeps those it shares
    with the next band, so every row of either block is computed once (plus one row of conv0 per band).
    The first block's image gets its ToRGB row by row as they are made, and is upsampled into the
    second's only at the end (the same single addition per pixel as the whole forward).
    """
    heap.release_free(x.shape[0] * second.out_channels * second.resolution ** 2 * 4, x.device)
    one = _Banded(first, ws_first, x, noise_mode, generator, channels_last)
    two = _Banded(second, ws_second, x, noise_mode, generator, channels_last)
    image_one = one.skip(img, x)
    rgb_two = torch.zeros([x.shape[0], second.img_channels, second.resolution, second.resolution], device=x.device)
    up, res_one = second.conv0.up, first.resolution
    kept, k0, k1 = None, 0, 0  # the first block's activation rows [k0, k1)
    step = band_rows(second, x.shape[0])
    for lo in range(0, second.resolution, step):
        hi = min(lo + step, second.resolution)
        a0, a1 = max(lo - 1, 0), min(hi + 1, second.resolution)  # the second block's conv0 rows for its conv1
        b0, b1 = max(a0 // up - 1, 0), min(-(-a1 // up) + 1, res_one)  # the first block's rows for that conv0
        if b1 > k1:
            fresh = one.rows(x, max(k1, b0), b1)
            image_one[:, :, max(k1, b0) : b1] += one.rgb(fresh)
            reuse = kept[:, :, b0 - k0 :] if kept is not None and b0 < k1 else None
            kept = fresh if reuse is None else _cat_rows(reuse, fresh, channels_last)
            k0, k1 = (b0 if reuse is not None else max(k1, b0)), b1
        h = two.rows(kept[:, :, b0 - k0 : b1 - k0], lo, hi, x_row0=b0)
        rgb_two[:, :, lo:hi] = two.rgb(h)
    return two.skip(image_one, x) + rgb_two


def _cat_rows(top: torch.Tensor, bottom: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """torch.cat([top, bottom], dim=2), in the fused conv's layout when NHWC. torch.cat gives NCHW for the fused
    conv's NHWC (a batch stride below C*H*W, see `ops.nhwc`), and the next conv then copied it back: two
    transposing copies of the kept rows per band (~4 ms each at full size; within a view's noise)."""
    if not channels_last:
        return torch.cat([top, bottom], dim=2)
    h = top.shape[2]
    rows = _empty_like(top, h + bottom.shape[2], top.shape[3], channels_last)
    rows[:, :, :h] = top
    rows[:, :, h:] = bottom
    return rows


def _whole_like(band: torch.Tensor, resolution: int, channels_last: bool) -> torch.Tensor:
    """An empty [N, C, R, R] for a band's rows, in the fused conv's own output layout (NHWC of [1, N*C, R, R])."""
    return _empty_like(band, resolution, resolution, channels_last)


def _empty_like(band: torch.Tensor, height: int, width: int, channels_last: bool) -> torch.Tensor:
    """An empty [N, C, height, width] in the fused conv's own layout: NHWC of [1, N*C, height, width] (what the
    next fused conv's reshape reads without a copy), or NCHW."""
    n, c = band.shape[:2]
    if not channels_last:
        return band.new_empty(n, c, height, width)
    grouped = torch.empty([1, n * c, height, width], dtype=band.dtype, device=band.device,
                          memory_format=torch.channels_last)
    return grouped.view(n, c, height, width)
