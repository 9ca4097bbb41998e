"""Image reconstruction metrics on [-1, 1] image tensors [N, 3, H, W].

PSNR and SSIM are computed on images mapped to [0, 1] (SSIM: 11x11 Gaussian window, sigma 1.5,
K1 0.01, K2 0.03, as Wang et al. 2004 and skimage with gaussian_weights=True). LPIPS and
identity similarity take their networks as arguments, so callers decide what is cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB: [N]."""
    mse = (_unit(a) - _unit(b)).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean SSIM over channels and valid window positions: [N]."""
    x, y = _unit(a), _unit(b)
    c = x.shape[1]
    window = _gaussian_window().to(x.device)[None, None].repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def lpips_distance(lpips_model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS: [N]."""
    with torch.no_grad():
        return lpips_model(a.float(), b.float()).flatten()


def identity_similarity(id_model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of identity embeddings (e.g. ArcFace at 112 px): [N]."""
    with torch.no_grad():
        return F.cosine_similarity(id_model(a.float()), id_model(b.float()), dim=1)
