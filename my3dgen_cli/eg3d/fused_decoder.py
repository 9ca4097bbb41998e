"""The tri-plane decoder on the CPU as one autograd step that works through the points a few thousand at a time.

Why: per pass the renderer decodes tens of thousands of points (tiny config) to millions (full size).
Op by op, every element-wise step of the 64-wide hidden layer (bias, softplus' five passes, its gradient)
streams a tensor larger than the CPU caches through memory, and the colour slice and its gradient add
copies. In a tiny training step those passes took ~40% of the time. Here each chunk of `CHUNK_POINTS`
points of the plane means (plane_kernels.py) goes through FC -> softplus -> FC -> colour sigmoid while it is in cache,
and for large renders the backward pass recomputes the hidden layer per chunk instead of saving it (its 64
floats per point are the largest activation of the decoder). Small ones (a tiny training view) keep it and its
slope: softplus and its derivative from one exp and one log, where recomputing cost three transcendentals more
per value (~3 ms of a ~95 ms tiny view, forward and backward). Where numba is present, softplus and its slope are
one compiled pass (softplus_loops.py) in training; inference keeps torch's ops (`COMPILED_MIN_POINTS`).

Same function as `OSGDecoder.decode` in `ops.reference_paths()` up to float rounding (tests/test_fused_decoder.py);
`ops.reference_paths()`, autocast, other dtypes and devices, ONNX export and torch.compile take that path.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from my3dgen_cli.eg3d import ops

CHUNK_POINTS = 4096  # per chunk: a 1 MB hidden layer (64 floats a point); 2048-8192 time the same (2 threads)
# Hidden values (points x width, per pass) up to which training keeps the hidden layer and its slope for the
# backward pass (2 x 32 MiB at most) instead of recomputing them: a tiny view's pass holds 0.8 M, a full-size
# view's 50 M, which recomputes.
SAVED_HIDDEN = 1 << 22
RGB_SCALE, RGB_SHIFT = 1 + 2 * 0.001, 0.001  # MipNeRF's widened sigmoid: sigmoid(x) * (1 + 2e) - e


# Points per pass from which an inference render would decode with the compiled softplus; None: never. Training
# always does. Off in inference for the same reason as `plane_kernels.INFERENCE_MIN_TEXELS`: numba's ~100 MiB of
# peak memory in a render, for a few per cent of its time.
COMPILED_MIN_POINTS: int | None = None


@functools.cache
def _compiled() -> Any:
    """softplus_loops (numba-compiled), or None where numba cannot be imported."""
    try:
        from my3dgen_cli.eg3d import softplus_loops
    except Exception:  # not installed, or broken (numba refuses a newer numpy at import): torch's ops do the same
        return None
    return softplus_loops


def _flat(x: torch.Tensor) -> Any:
    return x.detach().view(-1).numpy()


def softplus(x: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """torch's softplus (beta 1, threshold 20) from vectorized exp and log: max(log(1 + e^min(x, 20)), x).

    softplus(x) >= x, and above 20 the log is 20 < x to float rounding, so the maximum picks x there.
    compiled: in one pass of `softplus_loops` (x contiguous, numba present), the same values to float rounding.
    """
    loops = _compiled() if compiled and x.is_contiguous() else None
    if loops is not None:
        out = torch.empty_like(x)
        loops.softplus(_flat(x), _flat(out))
        return out
    y = x.clamp(max=20.0).exp_().add_(1).log_()
    return torch.maximum(y, x, out=y)


def softplus_and_slope(x: torch.Tensor, out: torch.Tensor, slope: torch.Tensor, compiled: bool = False) -> None:
    """`softplus(x)` into out and its derivative, the sigmoid e / (1 + e) with e = e^min(x, 20), into slope.

    One exp and one log for both (torch.sigmoid would be a third transcendental per value; at 20 and above
    both give 1.0 in float32, and far below zero both underflow to 0). compiled: as `softplus`.
    """
    loops = _compiled() if compiled and x.is_contiguous() and out.is_contiguous() and slope.is_contiguous() else None
    if loops is not None:
        loops.softplus_and_slope(_flat(x), _flat(out), _flat(slope))
        return
    e = torch.clamp(x, max=20.0, out=slope).exp_()
    one_plus = torch.add(e, 1, out=out)
    e.div_(one_plus)
    torch.maximum(one_plus.log_(), x, out=out)


def use_fused(features: torch.Tensor) -> bool:
    """Whether `decode_features` may run: fp32 CPU tensors, fast paths on, no autocast, not compiling."""
    return (features.device.type == "cpu" and features.dtype == torch.float32 and ops.fast_paths()
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


class _DecodeFn(torch.autograd.Function):
    """features [N, M, C] (the plane means, any strides), fc1 (w1 [H, C], b1 [H]), fc2 (w2 [O, H], b2 [O]), all
    with their gains applied -> rgb [N, M, O-1], sigma [N, M, 1]; gradients for whichever inputs need them."""

    @staticmethod
    def forward(ctx, features, w1, b1, w2, b2):  # type: ignore[override]
        n, m, _ = features.shape
        rgb = features.new_empty(n, m, w2.shape[0] - 1)
        sigma = features.new_empty(n, m, 1)
        keep = any(ctx.needs_input_grad)
        sig = torch.empty_like(rgb) if keep else rgb  # sigmoid of the colour logits, kept for the backward pass
        # the hidden layer and its slope, kept for the backward pass when small (tiny renders), else recomputed
        saved = keep and n * m * w1.shape[0] <= SAVED_HIDDEN
        hiddens = features.new_empty(2, n, m, w1.shape[0]) if saved else None
        compiled = ctx.compiled = keep or (COMPILED_MIN_POINTS is not None and n * m >= COMPILED_MIN_POINTS)
        for k in range(n):
            for a in range(0, m, CHUNK_POINTS):
                b = min(a + CHUNK_POINTS, m)
                h = torch.addmm(b1, features[k, a:b], w1.t())
                if hiddens is not None:
                    hidden = hiddens[0, k, a:b]
                    softplus_and_slope(h, hidden, hiddens[1, k, a:b], compiled)
                else:
                    hidden = softplus(h, compiled)
                torch.addmm(b2[:1], hidden, w2[:1].t(), out=sigma[k, a:b])  # density and colours apart:
                torch.sigmoid(torch.addmm(b2[1:], hidden, w2[1:].t()), out=sig[k, a:b])  # no strided slices
        if keep:
            ctx.save_for_backward(features, w1, b1, w2, sig, hiddens)
            rgb.copy_(sig)
        return rgb.mul_(RGB_SCALE).sub_(RGB_SHIFT), sigma

    @staticmethod
    def backward(ctx, grad_rgb, grad_sigma):  # type: ignore[override]
        features, w1, b1, w2, sig, hiddens = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        n, m, _ = features.shape
        grads = [torch.zeros_like(t) if need else None
                 for t, need in zip((w1, b1, w2), (need_w1, need_b1, need_w2), strict=True)]
        grad_b2 = w2.new_zeros(w2.shape[0]) if need_b2 else None
        grad_x = torch.empty_like(features, memory_format=torch.contiguous_format) if need_x else None
        sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input  # torch's own, into gy's columns
        grad_y = features.new_empty(min(CHUNK_POINTS, m), w2.shape[0])
        for k in range(n):
            for a in range(0, m, CHUNK_POINTS):
                b = min(a + CHUNK_POINTS, m)
                gy = grad_y[: b - a]
                gy[:, :1] = grad_sigma[k, a:b]
                sigmoid_backward(grad_rgb[k, a:b] * RGB_SCALE, sig[k, a:b], grad_input=gy[:, 1:])
                x = features[k, a:b]
                if hiddens is not None:
                    hidden, slope = hiddens[0, k, a:b], hiddens[1, k, a:b]
                elif grads[2] is not None or ctx.compiled:  # the hidden layer and its slope again, in one pass
                    h = torch.addmm(b1, x, w1.t())
                    hidden, slope = torch.empty_like(h), torch.empty_like(h)
                    softplus_and_slope(h, hidden, slope, ctx.compiled)
                else:
                    hidden, slope = None, torch.sigmoid(torch.addmm(b1, x, w1.t()))  # softplus' derivative
                gh = torch.mm(gy, w2).mul_(slope)
                if grad_x is not None:
                    torch.mm(gh, w1, out=grad_x[k, a:b])
                if grads[0] is not None:
                    grads[0].addmm_(gh.t(), x)
                if grads[1] is not None:
                    grads[1] += gh.sum(0)
                if grads[2] is not None:
                    grads[2].addmm_(gy.t(), hidden)
                if grad_b2 is not None:
                    grad_b2 += gy.sum(0)
        return grad_x, *grads, grad_b2


def decode_features(features: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                    b2: torch.Tensor) -> dict[str, torch.Tensor]:
    """OSGDecoder on plane means [N, M, C] in chunks: {"rgb": [N, M, O-1], "sigma": [N, M, 1]}.

    Without grad mode the inputs are detached: `ctx.needs_input_grad` reads `requires_grad` even under no_grad,
    and a render must not take the training path (its compiled softplus rounds differently) just because the
    base weights it reads are trainable.
    """
    if not torch.is_grad_enabled():
        features, w1, b1, w2, b2 = (t.detach() for t in (features, w1, b1, w2, b2))
    rgb, sigma = _DecodeFn.apply(features, w1, b1, w2, b2)
    return {"rgb": rgb, "sigma": sigma}
