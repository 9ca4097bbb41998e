"""A convolution whose weight is a frozen base plus a low-rank delta, trained through the factors only.

Training an adapted conv the plain way, `conv(x, W + B∘A)`, makes autograd compute the gradient of
the whole weight [O, I, k, k] (it needs one to reach A and B), which costs as much as the forward
convolution; the base W never uses it. Here the forward is that same single convolution, and the
backward gives the input its gradient through the effective weight as before, but reaches the
factors through the rank-R path only: u = conv(x, A) (R output channels), then
dB = <dy, u> and dA = the weight gradient of conv(x, .) for du = B^T dy: convolutions with R
instead of O outputs (R = rank * k for My3DGen's factors, 3 at rank 1), where the full weight
gradient was about a third of the conv's training work. Same values as autograd through
`W + delta` up to the order of float sums (tests/test_lowrank_conv.py).

`layers.adapted_conv_factors` decides when it applies: on the CPU, in training (an autograd graph),
the base weight frozen, fast paths on, not under autocast, and only for convs large enough to pay;
anything else keeps the plain form.
"""

from __future__ import annotations

import torch

_DILATION = [1, 1]


class _LowRankConv(torch.autograd.Function):
    """y = conv(x, weight), where weight (a value, no gradient of its own) = frozen base + b ∘ a.

    a: the conv weight of the rank path in the layout of `weight` ([R, I, k, k], or [I, R, k, k]
    when transposed); b: [O, R, 1, 1], a 1x1 conv mixing its R channels into the O outputs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,  # type: ignore[override]
                stride: list[int], padding: list[int], transposed: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight, a, b)
        ctx.conv = (stride, padding, transposed)
        return torch.ops.aten.convolution(x, weight, None, stride, padding, _DILATION, transposed, [0, 0], 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, a, b = ctx.saved_tensors
        stride, padding, transposed = ctx.conv
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, _DILATION, transposed,
                                                         [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            u = torch.ops.aten.convolution(x, a, None, stride, padding, _DILATION, transposed, [0, 0], 1)
            grad_u, grad_b, _ = torch.ops.aten.convolution_backward(grad, u, b, None, [1, 1], [0, 0], _DILATION, False,
                                                                    [0, 0], 1, [True, True, False])
            if ctx.needs_input_grad[2]:
                grad_a = torch.ops.aten.convolution_backward(grad_u, x, a, None, stride, padding, _DILATION, transposed,
                                                             [0, 0], 1, [False, True, False])[1]
        return grad_x, None, grad_a, grad_b, None, None, None


def lowrank_conv2d(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   stride: int = 1, padding: int = 0, transposed: bool = False) -> torch.Tensor:
    """`F.conv2d` (or `F.conv_transpose2d` when transposed) of x with weight = base + b∘a, gradients to x, a, b.

    weight: the effective weight's value (its own gradient is never computed: the base must be frozen);
    a, b: as `_LowRankConv` says. The caller guarantees weight == base + b∘a.
    """
    return _LowRankConv.apply(x, weight.detach(), a, b, [stride, stride], [padding, padding], transposed)
