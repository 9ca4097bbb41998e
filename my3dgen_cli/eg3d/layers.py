"""StyleGAN2 layers with the official module and parameter names (NVlabs networks_stylegan2).

Weights are stored unscaled and multiplied by their equalized-learning-rate gain at run time,
as in the official code, so official state dicts load strictly and numerics match.
Each layer reads its weight through `effective_weight()` so an adapter (lora.py) sitting in the
layer's `adapter` slot adds its low-rank delta before modulation, without replacing the layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from my3dgen_cli.eg3d import ops, row_strips

_RANDOM_INIT: ContextVar[bool] = ContextVar("random_init", default=True)


@contextmanager
def skip_random_init() -> Iterator[None]:
    """Build layers with uninitialised weights instead of random ones (the caller loads a checkpoint).

    Drawing the ~30 M normals of a full-size generator costs about half a second, all overwritten by
    the loaded weights. Only `init_randn` tensors are skipped: everything else (zeros, filters,
    non-persistent buffers) is computed as usual.
    """
    token = _RANDOM_INIT.set(False)
    try:
        yield
    finally:
        _RANDOM_INIT.reset(token)


def init_randn(shape: list[int], divisor: float = 1.0) -> torch.Tensor:
    """`torch.randn(shape) / divisor` (the official init), or `torch.empty(shape)` in `skip_random_init`."""
    if not _RANDOM_INIT.get():
        return torch.empty(shape)
    x = torch.randn(shape)
    return x / divisor if divisor != 1 else x  # x / 1 == x exactly: skip the pass


def adapted_weight(layer: nn.Module, gain: float = 1.0) -> torch.Tensor:
    """gain * (`layer.weight`, plus `layer.adapter(weight)` (a delta of the same shape) when an adapter is attached).

    With the fast paths on, an adapter that can (`LoRA.adapted`) adds its delta and the gain in one op, unless
    autocast or another dtype would round the base weight along with the delta.
    """
    weight, adapter = layer.weight, layer.adapter
    if adapter is None:
        return weight if gain == 1 else weight * gain
    fold = getattr(adapter, "adapted", None)
    kind = weight.device.type
    autocast = kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind)  # (meta has no autocast state)
    if fold is not None and ops.fast_paths() and not autocast and weight.dtype == adapter.lora_A.dtype:
        return fold(weight, gain)
    weight = weight + adapter(weight)
    return weight if gain == 1 else weight * gain


# The factor-only gradient pays where the full weight gradient is large and the rank path small beside
# it: at full size 0.50-0.93x of a conv's forward + backward (3x3, >= 128 outputs; docs/benchmarks.md),
# but 1.0-1.7x for the tiny config's 8-32 channels and ~1x for the 1x1 ToRGBs, where the extra calls
# cost about what the gradient they skip does.
LOW_RANK_MIN_WEIGHT = 65536  # values in [O, I, k, k]
LOW_RANK_MIN_OUT_PER_RANK = 16  # O / R, R = the rank path's channels


def low_rank_pays(weight_shape: tuple[int, ...] | torch.Size, rank_channels: int) -> bool:
    """Whether a conv weight of this shape trains faster through a rank path of `rank_channels` (`LOW_RANK_MIN_*`)."""
    large = math.prod(weight_shape) >= LOW_RANK_MIN_WEIGHT
    return large and weight_shape[0] >= LOW_RANK_MIN_OUT_PER_RANK * rank_channels


def adapted_conv_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The adapter's factors as convolution weights (a, b: `LoRA.conv_factors`) when the layer's conv should
    reach them without the full weight gradient (`lowrank_conv.py`): on the CPU (where it was measured),
    an autograd graph is being recorded, the base weight is frozen, the fast paths are on, autocast is
    off and the weight is large enough to pay (`LOW_RANK_MIN_*`). Else None: the plain `conv(x, W + delta)`."""
    conv_factors = getattr(layer.adapter, "conv_factors", None)
    if conv_factors is None or layer.weight.requires_grad or not torch.is_grad_enabled() or not ops.fast_paths():
        return None
    if layer.weight.device.type != "cpu" or torch.is_autocast_enabled("cpu"):  # measured on the CPU only
        return None
    if layer.weight.numel() < LOW_RANK_MIN_WEIGHT:  # before building the factors: most calls stop here or above
        return None
    a, b = conv_factors()
    return (a, b) if low_rank_pays(layer.weight.shape, b.shape[1]) else None


class FullyConnectedLayer(nn.Module):
    """y = act(x W^T * (lr/sqrt(in)) + b * lr). Weight stored as [out, in]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "linear",
        lr_multiplier: float = 1.0,
        bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(init_randn([out_features, in_features], lr_multiplier))
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier
        self.adapter: nn.Module | None = None

    def effective_weight(self) -> torch.Tensor:
        """The stored weight plus the adapter's delta, if one is attached."""
        return adapted_weight(self)

    def scaled(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) as the layer applies them: adapted, times their gains, in `dtype`."""
        if dtype == self.weight.dtype:
            w = adapted_weight(self, self.weight_gain)
        else:
            w = self.effective_weight().to(dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.scaled(x.dtype)
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return ops.bias_act(x.matmul(w.t()), b, act=self.activation)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


class _SoftplusFn(torch.autograd.Function):
    """softplus(x) = log(1 + e^x) from vectorized exp and log, in place; the gradient, sigmoid(x) = e^x / (1 + e^x),
    is made from the same e^x in the forward pass and saved, so the backward pass is one multiply.

    max(log(1 + e^min(x, 20)), x) replaces torch's `x if x > 20`: softplus(x) >= x always, and above
    20 the log is 20 (to float rounding) < x, so the maximum picks x there, one pass instead of a
    comparison and a select.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        e = x.clamp(max=Softplus.THRESHOLD).exp_()
        y = e + 1
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(e.div_(y))  # sigmoid(x), before y becomes its log
        y.log_()
        return torch.maximum(y, x, out=y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (sigmoid,) = ctx.saved_tensors
        return grad * sigmoid


class Softplus(nn.Softplus):
    """nn.Softplus() (beta 1, threshold 20: x itself above it) at about twice the CPU speed.

    torch's CPU softplus calls a scalar log1p per element; exp then log of (1 + e^x) both vectorize.
    For x < -17, 1 + e^x rounds to 1, so the result is 0 instead of e^x < 5e-8 (absolute error below
    that); elsewhere the two agree to float rounding (tests/test_eg3d.py). Saving the sigmoid and the
    maximum took a quarter off its CPU time, forward and forward + backward ([24576, 64], one thread).
    The tri-plane decoder's hidden layer is the only user, where its chunked path (fused_decoder.py, which has
    its own softplus) does not run: under autocast and in other dtypes.
    Inside `ops.reference_paths()`, while exporting to ONNX (which has Softplus) and off the CPU: torch's op.
    """

    THRESHOLD = 20.0

    def __init__(self) -> None:
        super().__init__(beta=1.0, threshold=self.THRESHOLD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not ops.fast_paths() or x.device.type != "cpu":
            return super().forward(x)
        return _SoftplusFn.apply(x)


class MappingNetwork(nn.Module):
    """z (+ camera label c) -> w, broadcast to num_ws rows, with truncation towards w_avg."""

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        num_ws: int,
        num_layers: int = 2,
        lr_multiplier: float = 0.01,
    ) -> None:
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws, self.num_layers = z_dim, c_dim, w_dim, num_ws, num_layers
        embed_features = w_dim if c_dim > 0 else 0
        features = [z_dim + embed_features] + [w_dim] * num_layers
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(
                features[idx], features[idx + 1], activation="lrelu", lr_multiplier=lr_multiplier
            )
            setattr(self, f"fc{idx}", layer)
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
    ) -> torch.Tensor:
        """z: [N, z_dim], c: [N, c_dim] -> ws: [N, num_ws, w_dim]."""
        parts = []
        if self.z_dim > 0:
            ops.check_shape("z", z, [None, self.z_dim])
            parts.append(ops.normalize_2nd_moment(z.to(torch.float32)))
        if self.c_dim > 0:
            ops.check_shape("c", c, [None, self.c_dim])
            parts.append(ops.normalize_2nd_moment(self.embed(c.to(torch.float32))))
        x = torch.cat(parts, dim=1)
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            head = self.w_avg.lerp(x[:, :cutoff], truncation_psi)
            x = torch.cat([head, x[:, cutoff:]], dim=1)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally 2x upsampling) + noise + bias + lrelu."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        up: int = 1,
        conv_clamp: float | None = None,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.w_dim = in_channels, out_channels, w_dim
        self.resolution, self.up, self.conv_clamp = resolution, up, conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(init_randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.register_buffer("resample_filter", ops.setup_filter([1, 3, 3, 1]))
        self.register_buffer("noise_const", init_randn([resolution, resolution]))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.adapter: nn.Module | None = None

    def effective_weight(self) -> torch.Tensor:
        return adapted_weight(self)

    def noise(self, noise_mode: str, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """The noise added to the output: [R, R] ("const"), [N, 1, R, R] ("random", drawn now) or None."""
        if noise_mode == "random":
            shape = [x.shape[0], 1, self.resolution, self.resolution]
            return torch.randn(shape, device=x.device, dtype=x.dtype, generator=generator) * self.noise_strength
        if noise_mode == "const":
            return self.noise_const * self.noise_strength
        if noise_mode != "none":
            raise ValueError(f"noise_mode: got {noise_mode!r}, expected 'const', 'random' or 'none'")
        return None

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        noise_mode: str = "const",
        fused_modconv: bool = True,
        generator: torch.Generator | None = None,
        channels_last: bool = False,
    ) -> torch.Tensor:
        """x: [N, I, R/up, R/up], w: [N, w_dim] -> [N, O, R, R]; channels_last: convolve in NHWC."""
        in_res = self.resolution // self.up
        ops.check_shape("SynthesisLayer x", x, [None, self.in_channels, in_res, in_res])
        styles = self.affine(w)
        noise = self.noise(noise_mode, x, generator)
        if fused_modconv and not torch.is_grad_enabled() and ops.fast_paths():  # bitwise the same in fp32
            return ops.modulated_conv2d_lrelu(x, self.effective_weight(), styles, self.bias, noise=noise, up=self.up,
                                              resample_filter=self.resample_filter, clamp=self.conv_clamp,
                                              channels_last=channels_last)
        x = ops.modulated_conv2d(
            x, self.effective_weight(), styles, noise=noise, up=self.up,
            resample_filter=self.resample_filter, fused=fused_modconv, channels_last=channels_last,
            low_rank=None if fused_modconv else adapted_conv_factors(self),
        )
        return ops.bias_act(x, self.bias.to(x.dtype), act="lrelu", clamp=self.conv_clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv without demodulation; styles scaled by 1/sqrt(in_channels)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.conv_clamp = in_channels, out_channels, conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(init_randn([out_channels, in_channels, 1, 1]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels)
        self.adapter: nn.Module | None = None

    def effective_weight(self) -> torch.Tensor:
        return adapted_weight(self)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True,
                channels_last: bool = False) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = ops.modulated_conv2d(x, self.effective_weight(), styles, demodulate=False, fused=fused_modconv,
                                 channels_last=channels_last,
                                 low_rank=None if fused_modconv else adapted_conv_factors(self))
        return ops.bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the 'skip' synthesis: [conv0 (2x up)], conv1, torgb; image skip upsampled.

    up=False gives the official `SynthesisBlockNoUp` (superresolution of the 4X/2X variants).
    in_channels == 0 makes the first block, which starts from a learned constant.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        conv_clamp: float | None = None,
        up: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.w_dim = in_channels, out_channels, w_dim
        self.resolution, self.img_channels, self.up = resolution, img_channels, up
        self.register_buffer("resample_filter", ops.setup_filter([1, 3, 3, 1]))
        if in_channels == 0:
            self.const = nn.Parameter(init_randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(
                in_channels, out_channels, w_dim, resolution, up=2 if up else 1, conv_clamp=conv_clamp
            )
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1

    def layers(self) -> Iterator[SynthesisLayer]:
        if self.in_channels != 0:
            yield self.conv0
        yield self.conv1

    def forward(
        self,
        x: torch.Tensor | None,
        img: torch.Tensor | None,
        ws: torch.Tensor,
        noise_mode: str = "const",
        fused_modconv: bool = True,
        generator: torch.Generator | None = None,
        channels_last: bool = False,
        keep_x: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """ws: [N, num_conv + 1, w_dim] (toRGB shares its w with the next block's conv0).

        channels_last: the convolutions run in NHWC memory (as the official fp16 blocks can, with
        `fp16_channels_last`); x is returned in that layout, img always in NCHW (few channels: the
        image skip path gains nothing from NHWC).
        At high resolution in inference the block runs a band of rows at a time (`row_strips`).
        keep_x=False: the caller discards x (a network's last block), which then comes back as None
        from the bands and is never built whole.
        """
        ops.check_shape("SynthesisBlock ws", ws, [None, self.num_conv + self.num_torgb, self.w_dim])
        if row_strips.applies(self, x, fused_modconv, noise_mode):
            return row_strips.block_forward(self, x, img, ws, noise_mode=noise_mode, generator=generator,
                                            channels_last=channels_last, keep_x=keep_x)
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.const.to(ws.dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
        for layer in self.layers():
            x = layer(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv, generator=generator,
                      channels_last=channels_last)
        if img is not None and self.up:
            img = ops.upsample2d(img, self.resample_filter)
        y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv, channels_last=channels_last)
        y = y.to(torch.float32, memory_format=torch.contiguous_format)  # no-op unless autocast or NHWC
        img = img + y if img is not None else y
        return x, img
