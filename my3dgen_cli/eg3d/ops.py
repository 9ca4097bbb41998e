"""Low-level ops of StyleGAN2/EG3D in plain PyTorch (no compiled extensions).

Each op has the official reference semantics (NVlabs torch_utils/ops). Where a faster form
exists it sits beside the reference and tests check that the two agree.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from my3dgen_cli.eg3d.lowrank_conv import lowrank_conv2d

LRELU_ALPHA = 0.2
LRELU_GAIN = math.sqrt(2.0)
_FAST_PATHS: ContextVar[bool] = ContextVar("fast_paths", default=True)


@contextmanager
def reference_paths() -> Iterator[None]:
    """Run the reference forms instead of the CPU fast paths while open (benchmarks and tests compare them).

    Covers the in-place conv epilogue (`modulated_conv2d_lrelu`, bitwise the reference in fp32), the
    decoder's Softplus and the renderer's fused compositing, channels_last plane table
    (`renderer.gather_planes`), chunked decoding (`renderer.decode_in_chunks`) and rays in groups, the
    large synthesis blocks by row bands (`row_strips.py`) with their heap trims, and in training the
    adapted convolutions' factor-only gradient (`lowrank_conv.py`). Both give the same values up to
    float rounding.
    """
    token = _FAST_PATHS.set(False)
    try:
        yield
    finally:
        _FAST_PATHS.reset(token)


def fast_paths() -> bool:
    """Whether the fast paths may run: not inside `reference_paths()`, not while exporting to ONNX."""
    return _FAST_PATHS.get() and not torch.onnx.is_in_onnx_export()


def full_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on x's device while open, for the few ops whose inputs are geometry or final pixels.

    Under bf16 autocast a camera's ray directions (a 4x4 matrix product) would be rounded to 8 bits
    of mantissa, and the 512 px image's skip path (a FIR upsampling, a convolution) would round pixel
    values of up to ~2.5 to steps of 0.016; both cost nothing to keep exact and carried most of a bf16
    view's largest pixel error (docs/benchmarks.md, "bf16 on a CPU with AVX512-BF16").
    """
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def check_shape(name: str, tensor: torch.Tensor, expected: list[int | None]) -> None:
    """Raise ValueError "got X, expected Y" unless `tensor` has `expected` shape (None = any)."""
    ok = tensor.ndim == len(expected) and all(e is None or s == e for s, e in zip(tensor.shape, expected, strict=False))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name}: got shape {list(tensor.shape)}, expected {want}")


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    act: str = "linear",
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """Add bias (along dim 1), apply the activation, scale by gain, clamp to +-clamp.

    act: "linear" (default gain 1) or "lrelu" (slope 0.2, default gain sqrt 2).
    """
    if b is not None:
        x = x + b.reshape([1, -1] + [1] * (x.ndim - 2))
    if act == "lrelu":
        x = F.leaky_relu(x, LRELU_ALPHA)
        default_gain = LRELU_GAIN
    elif act == "linear":
        default_gain = 1.0
    else:
        raise ValueError(f"activation: got {act!r}, expected 'linear' or 'lrelu'")
    gain = default_gain if gain is None else gain
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def nhwc(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x [N, C, H, W] in channels_last (NHWC) memory when asked, else as it is; no copy if it already is.

    Only the strides change, never the values or the shape, so every op gives the same numbers up to
    the order of its float sums. Applied to the tensors a convolution reads (input and weight), which
    is where NHWC pays: cuDNN's tensor-core kernels are NHWC, fed NCHW they transpose first.
    """
    if not channels_last:
        return x
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    if x.stride(0) != c * h * w and x.numel() > 0:
        # A reshape (the fused modconv's [N, I, H, W] <-> [1, N*I, H, W]) leaves a size-1 or grouped batch dim
        # with a stride below C*H*W. NHWC memory all the same, but torch's layout check then calls it NCHW, and
        # a convolution whose weight says neither (1x1: ToRGB) copied its whole input to NCHW first (~10 % of a
        # full-size view in NHWC). The same memory, re-viewed with the strides that check expects:
        x = x.permute(0, 2, 3, 1).reshape(-1).view(n, h, w, c).permute(0, 3, 1, 2)
    return x


def setup_filter(taps: list[float]) -> torch.Tensor:
    """The 2-D FIR filter EG3D registers as `resample_filter`: outer(taps, taps) / sum, float32."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor,
    up: int = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    gain: float = 1.0,
    channels_last: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference upfirdn2d (no downsampling), in four steps per channel:

    1. upsample by inserting `up - 1` zeros after each pixel;
    2. pad by (x0, x1, y0, y1) zeros (negative = crop);
    3. convolve with the 2-D filter `f` (symmetric here, so no flip matters) times gain**(f.ndim/2);
    4. (downsampling is never used by the generator and is not implemented).
    x: [N, C, H, W]; f: [fh, fw] float32. channels_last: run the filter convolution in NHWC.
    bias [C]: added by the filter convolution itself (no pass of its own).
    Without upsampling and with one padding >= 0 on all sides (the 2x-upsampling conv's blur), the
    convolution pads by itself: the same zeros, without writing a padded copy first.
    """
    n, c, h, w = x.shape
    kernel = (f * (gain ** (f.ndim / 2))).to(x.dtype).flip([0, 1])
    kernel = kernel[None, None].repeat(int(c), 1, 1, 1)  # int: a static channel count keeps ONNX's Conv typed
    if up == 1 and len(set(padding)) == 1 and padding[0] >= 0:
        return F.conv2d(nhwc(x, channels_last), nhwc(kernel, channels_last), bias, padding=padding[0], groups=c)
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    px0, px1, py0, py1 = padding
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0) : x.shape[2] - max(-py1, 0), max(-px0, 0) : x.shape[3] - max(-px1, 0)]
    return F.conv2d(nhwc(x, channels_last), nhwc(kernel, channels_last), bias, groups=c)


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """2x FIR upsampling of an image (the skip path of ToRGB outputs): [N,C,H,W] -> [N,C,2H,2W]."""
    fw = f.shape[-1]
    pad = ((fw + up - 1) // 2, (fw - up) // 2)
    with full_precision(x):  # the image itself: exact under autocast too
        return upfirdn2d(x, f, up=up, padding=(pad[0], pad[1], pad[0], pad[1]), gain=up * up)


def conv2d_up2(x: torch.Tensor, w: torch.Tensor, f: torch.Tensor, groups: int = 1,
               channels_last: bool = False, bias: torch.Tensor | None = None,
               low_rank: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """3x3 convolution at twice the resolution, as the official conv2d_resample(up=2, padding=1).

    = conv_transpose2d(stride 2) with the weight as given (correlation convention), then a blur
    with `f` padded [1, 1, 1, 1] and gain 4. x: [N, I*groups? , H, W]; w: [O, I, k, k].
    low_rank: see `conv2d` (groups 1 only).
    """
    out_channels, in_per_group, kh, kw = w.shape
    if groups == 1:
        wt = w.transpose(0, 1)
    else:
        wt = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
        wt = wt.reshape(groups * in_per_group, out_channels // groups, kh, kw)
    # NHWC of the transposed weight [I, O, k, k] (its own layout, not w's: conv_transpose reads it as is)
    if low_rank is not None and groups == 1:
        a, b = low_rank
        x = lowrank_conv2d(nhwc(x, channels_last), nhwc(wt, channels_last), nhwc(a.transpose(0, 1), channels_last),
                           nhwc(b, channels_last), stride=2, transposed=True)
    else:
        x = F.conv_transpose2d(nhwc(x, channels_last), nhwc(wt, channels_last), stride=2, groups=groups)
    fw = f.shape[-1]
    p0 = 1 + (fw + 1) // 2 - (kw - 1)  # padding 1, adjusted as in conv2d_resample
    p1 = 1 + (fw - 2) // 2 - (kw - 2)
    return upfirdn2d(x, f, padding=(p0, p1, p0, p1), gain=4.0, channels_last=channels_last, bias=bias)


def conv2d(x: torch.Tensor, w: torch.Tensor, up: int, f: torch.Tensor | None, groups: int = 1,
           channels_last: bool = False, bias: torch.Tensor | None = None,
           low_rank: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Same-size correlation (padding k//2) or the 2x-upsampling conv; channels_last: run it in NHWC.

    bias [O]: added per output channel by the (last) convolution itself. low_rank (a [R, I, k, k],
    b [O, R, 1, 1]): w is a frozen base plus b∘a, and the gradient reaches the weight through a and b
    only (`lowrank_conv.py`); groups 1, no bias."""
    if up == 2:
        if f is None:
            raise ValueError("conv2d: up=2 needs a resample filter")
        return conv2d_up2(x, w, f, groups=groups, channels_last=channels_last, bias=bias, low_rank=low_rank)
    if low_rank is not None and groups == 1 and bias is None:
        a, b = low_rank
        return lowrank_conv2d(nhwc(x, channels_last), nhwc(w, channels_last), nhwc(a, channels_last),
                              nhwc(b, channels_last), padding=w.shape[-1] // 2)
    return F.conv2d(nhwc(x, channels_last), nhwc(w, channels_last), bias, padding=w.shape[-1] // 2,
                    groups=groups)


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor | None = None,
    up: int = 1,
    resample_filter: torch.Tensor | None = None,
    demodulate: bool = True,
    fused: bool = True,
    channels_last: bool = False,
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
    gain: float = 1.0,
) -> torch.Tensor:
    """StyleGAN2 modulated convolution.

    x:      [N, I, H, W]   activations
    weight: [O, I, k, k]   base weight (any adapter delta already added: modulation comes after)
    styles: [N, I]         per-sample input scales
    noise:  broadcastable to [N, O, H*up, W*up], added after demodulation
    Demodulation: d[n, o] = rsqrt(sum_{i,kh,kw} (weight * styles[n, i])^2 + 1e-8).
    fused=True runs one grouped convolution with per-sample weights; fused=False scales the
    activations before and after a shared convolution (exports to ONNX, better for large N).
    channels_last: the convolution reads its input and weight in NHWC memory. Fused, that is NHWC of
    the grouped image [1, N*I, H, W] (all samples' channels side by side at each pixel), whose
    [N, I, H, W] view the next layer reshapes back without a copy; plain NHWC [N, H, W, I] would be
    copied back to NCHW by that reshape at every layer. Same values either way, up to float order.
    low_rank: the adapter's factors as convolutions (`layers.adapted_conv_factors`): unfused, the shared
    convolution then skips the full weight gradient (`conv2d`).
    bias [O], gain > 0 (fused only): the output is gain * (conv + bias), both applied by the convolution itself
    (the per-sample weights scaled, the bias added to its accumulator), before the noise.
    """
    batch = x.shape[0]
    out_ch, in_ch, kh, kw = weight.shape
    check_shape("modulated_conv2d weight", weight, [out_ch, in_ch, kh, kw])
    check_shape("modulated_conv2d x", x, [None, in_ch, None, None])
    check_shape("modulated_conv2d styles", styles, [batch, in_ch])

    dcoefs = None
    if demodulate and not fused and torch.onnx.is_in_onnx_export():
        # Same d[n, o] as sum_i s[n,i]^2 * sum_k W[o,i,k]^2: W's square sum folds into an [O, I] constant,
        # so the exported graph carries no second [O, I, k, k] copy of every weight (about half the file).
        # (computed outside the trace: from_numpy makes it a constant, which the exporter cannot fold itself)
        w_sq = torch.from_numpy(weight.detach().square().sum(dim=[2, 3]).T.contiguous().cpu().numpy())  # [I, O]
        dcoefs = (styles.square() @ w_sq.to(styles) + 1e-8).rsqrt()  # [N, O]
    elif demodulate or fused:
        w = weight.unsqueeze(0) * styles.reshape(batch, 1, -1, 1, 1)  # [N, O, I, k, k]
        if demodulate:
            dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # [N, O]

    if not fused:
        x = x * styles.to(x.dtype).reshape(batch, -1, 1, 1)
        if low_rank is not None:
            low_rank = (low_rank[0].to(x.dtype), low_rank[1].to(x.dtype))
        x = conv2d(x, weight.to(x.dtype), up, resample_filter, channels_last=channels_last, low_rank=low_rank)
        if dcoefs is not None:
            x = x * dcoefs.to(x.dtype).reshape(batch, -1, 1, 1)
        if noise is not None:
            x = x + noise.to(x.dtype)
        return x

    if dcoefs is not None:
        w = w * dcoefs.reshape(batch, -1, 1, 1, 1)
    if gain != 1:
        w = w * gain
    x = x.reshape(1, -1, *x.shape[2:])  # [1, N*I, H, W]
    w = w.reshape(-1, in_ch, kh, kw)  # [N*O, I, k, k]
    grouped_bias = None if bias is None else (bias.to(w.dtype) * gain).repeat(batch).to(x.dtype)
    x = conv2d(x, w.to(x.dtype), up, resample_filter, groups=batch, channels_last=channels_last, bias=grouped_bias)
    x = x.reshape(batch, -1, *x.shape[2:])
    if noise is not None:
        x = x + noise
    return x


def modulated_conv2d_lrelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    bias: torch.Tensor,
    noise: torch.Tensor | None = None,
    up: int = 1,
    resample_filter: torch.Tensor | None = None,
    clamp: float | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """`bias_act(modulated_conv2d(x, ..., fused=True, noise=noise), bias, "lrelu", clamp=clamp)`, in place.

    For inference (no autograd graph). The epilogue runs the reference's own element-wise ops in the
    reference's order, but writes over the convolution's output instead of allocating a new tensor for
    each of the five: in float32 the result is bitwise that of the reference (tests/test_eg3d.py), so
    the two paths can never tell two renders of one latent apart. In low precision (autocast, or bf16 /
    fp16 activations) the bias and the gain go into the convolution instead (`_conv_lrelu_folded`).
    """
    if _low_precision(x):
        return _conv_lrelu_folded(x, weight, styles, bias, noise, up, resample_filter, clamp, channels_last)
    x = modulated_conv2d(x, weight, styles, up=up, resample_filter=resample_filter, fused=True,
                         channels_last=channels_last)
    if noise is not None:
        x.add_(noise.to(x.dtype))
    x.add_(bias.to(x.dtype).reshape(1, -1, 1, 1))
    F.leaky_relu_(x, LRELU_ALPHA)
    x.mul_(LRELU_GAIN)
    if clamp is not None and clamp >= 0:
        x.clamp_(-clamp, clamp)
    return x


def _low_precision(x: torch.Tensor) -> bool:
    """Whether a convolution of x computes in bf16 / fp16: x is, or autocast to one is on for its device."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return True
    kind = x.device.type
    return (kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind)
            and torch.get_autocast_dtype(kind) in (torch.bfloat16, torch.float16))


def _conv_lrelu_folded(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, bias: torch.Tensor,
                       noise: torch.Tensor | None, up: int, resample_filter: torch.Tensor | None,
                       clamp: float | None, channels_last: bool) -> torch.Tensor:
    """`modulated_conv2d_lrelu` with the bias and the gain in the convolution: one rounding instead of four.

    In bf16 each element-wise step of the epilogue (add noise, add bias, multiply by sqrt 2) rounds
    the activations to 8 bits of mantissa again, on top of the convolution's own rounding; they
    carried about a quarter of a bf16 view's largest pixel error (docs/benchmarks.md). Since
    lrelu(g * y) = g * lrelu(y) for g > 0, the gain scales the fp32 weights and the bias, and the
    convolution adds the bias to its fp32 accumulator before it rounds; what is left is the lrelu
    (and the noise, scaled the same way, where a layer has any).
    """
    y = modulated_conv2d(x, weight, styles, up=up, resample_filter=resample_filter, fused=True,
                         channels_last=channels_last, bias=bias, gain=LRELU_GAIN)
    if noise is not None:
        y.add_((noise * LRELU_GAIN).to(y.dtype))
    F.leaky_relu_(y, LRELU_ALPHA)
    if clamp is not None and clamp >= 0:
        y.clamp_(-clamp, clamp)
    return y


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()
