"""The tri-plane decoder on the CPU as one autograd step that works through the points a few thousand at a time.

Why: per pass the renderer decodes tens of thousands of points (tiny config) to millions (full size).
Op by op, every element-wise step of the 64-wide hidden layer (bias, softplus' five passes, its gradient)
streams a tensor larger than the CPU caches through memory, and the plane mean, the colour slice and their
gradients add copies. In a tiny training step those passes took ~40% of the time. Here each chunk of
`CHUNK_POINTS` points goes through mean -> FC -> softplus -> FC -> colour sigmoid while it is in cache,
and the backward pass recomputes the hidden layer per chunk instead of saving it (its 64 floats per point
are the largest activation of the decoder; the recomputation is one small matrix product).

Same function as `OSGDecoder.decode(samples.mean over planes)` up to float rounding (tests/test_fused_decoder.py);
`ops.reference_paths()`, autocast, other dtypes and devices, ONNX export and torch.compile take that path.
"""

from __future__ import annotations

import torch

from my3dgen_cli.eg3d import ops

CHUNK_POINTS = 4096  # per chunk: a 1 MB hidden layer (64 floats a point); 2048-8192 time the same (2 threads)
RGB_SCALE, RGB_SHIFT = 1 + 2 * 0.001, 0.001  # MipNeRF's widened sigmoid: sigmoid(x) * (1 + 2e) - e


def softplus(x: torch.Tensor) -> torch.Tensor:
    """torch's softplus (beta 1, threshold 20) from vectorized exp and log: max(log(1 + e^min(x, 20)), x).

    softplus(x) >= x, and above 20 the log is 20 < x to float rounding, so the maximum picks x there.
    """
    y = x.clamp(max=20.0).exp_().add_(1).log_()
    return torch.maximum(y, x, out=y)


def use_fused(samples: torch.Tensor) -> bool:
    """Whether `decode_plane_samples` may run: fp32 CPU tensors, fast paths on, no autocast, not compiling."""
    return (samples.device.type == "cpu" and samples.dtype == torch.float32 and ops.fast_paths()
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


class _PlaneDecodeFn(torch.autograd.Function):
    """samples [N, P, C, M] (any strides), fc1 (w1 [H, C], b1 [H]), fc2 (w2 [O, H], b2 [O]), all with their
    gains applied -> rgb [N, M, O-1], sigma [N, M, 1]; gradients for whichever inputs need them."""

    @staticmethod
    def forward(ctx, samples, w1, b1, w2, b2):  # type: ignore[override]
        n, _, _, m = samples.shape
        rgb = samples.new_empty(n, m, w2.shape[0] - 1)
        sigma = samples.new_empty(n, m, 1)
        keep = any(ctx.needs_input_grad)
        sig = torch.empty_like(rgb) if keep else rgb  # sigmoid of the colour logits, kept for the backward pass
        for k in range(n):
            for a in range(0, m, CHUNK_POINTS):
                b = min(a + CHUNK_POINTS, m)
                x = samples[k, :, :, a:b].mean(0).t()  # [points, C]
                hidden = softplus(torch.addmm(b1, x, w1.t()))
                torch.addmm(b2[:1], hidden, w2[:1].t(), out=sigma[k, a:b])  # density and colours apart:
                torch.sigmoid(torch.addmm(b2[1:], hidden, w2[1:].t()), out=sig[k, a:b])  # no strided slices
        if keep:
            ctx.save_for_backward(samples, w1, b1, w2, sig)
            rgb.copy_(sig)
        return rgb.mul_(RGB_SCALE).sub_(RGB_SHIFT), sigma

    @staticmethod
    def backward(ctx, grad_rgb, grad_sigma):  # type: ignore[override]
        samples, w1, b1, w2, sig = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        n, planes, _, m = samples.shape
        grads = [torch.zeros_like(t) if need else None
                 for t, need in zip((w1, b1, w2), (need_w1, need_b1, need_w2), strict=True)]
        grad_b2 = w2.new_zeros(w2.shape[0]) if need_b2 else None
        grad_x = samples.new_empty(n, planes, samples.shape[2], m) if need_x else None
        sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input  # torch's own, into gy's columns
        grad_y = samples.new_empty(min(CHUNK_POINTS, m), w2.shape[0])
        for k in range(n):
            for a in range(0, m, CHUNK_POINTS):
                b = min(a + CHUNK_POINTS, m)
                gy = grad_y[: b - a]
                gy[:, :1] = grad_sigma[k, a:b]
                sigmoid_backward(grad_rgb[k, a:b] * RGB_SCALE, sig[k, a:b], grad_input=gy[:, 1:])
                x = samples[k, :, :, a:b].mean(0).t()
                h = torch.addmm(b1, x, w1.t())
                gh = torch.mm(gy, w2).mul_(torch.sigmoid(h))  # softplus' derivative is the sigmoid
                if need_x:  # the mean shares the gradient out over the planes
                    grad_x[k, :, :, a:b] = torch.mm(w1.t(), gh.t()).div_(planes)
                if grads[0] is not None:
                    grads[0].addmm_(gh.t(), x)
                if grads[1] is not None:
                    grads[1] += gh.sum(0)
                if grads[2] is not None:
                    grads[2].addmm_(gy.t(), softplus(h))
                if grad_b2 is not None:
                    grad_b2 += gy.sum(0)
        return grad_x, *grads, grad_b2


def decode_plane_samples(samples: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                         b2: torch.Tensor) -> dict[str, torch.Tensor]:
    """OSGDecoder on plane samples [N, P, C, M] in chunks: {"rgb": [N, M, O-1], "sigma": [N, M, 1]}."""
    rgb, sigma = _PlaneDecodeFn.apply(samples, w1, b1, w2, b2)
    return {"rgb": rgb, "sigma": sigma}
