"""Metrics agree with scikit-image's reference implementations."""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from my3dgen_cli.losses.metrics import psnr, ssim


def test_psnr_and_ssim_match_skimage() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 48, 48, generator=g) * 2 - 1
    b = (a + 0.1 * torch.randn(1, 3, 48, 48, generator=g)).clamp(-1, 1)
    ua, ub = ((a[0] + 1) / 2).permute(1, 2, 0).numpy(), ((b[0] + 1) / 2).permute(1, 2, 0).numpy()
    expected_psnr = peak_signal_noise_ratio(ua, ub, data_range=1.0)
    expected_ssim = structural_similarity(ua, ub, data_range=1.0, channel_axis=2, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False)
    assert abs(psnr(a, b).item() - expected_psnr) < 1e-3
    assert abs(ssim(a, b).item() - expected_ssim) < 1e-3
    assert np.isclose(ssim(a, a).item(), 1.0, atol=1e-5)
