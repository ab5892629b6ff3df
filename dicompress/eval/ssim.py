"""SSIM (Wang, Bovik, Sheikh, Simoncelli 2004, "Image quality assessment: from error visibility to structural
similarity") as a pure function, with the paper's settings: an 11x11 circular-symmetric Gaussian window of
sigma 1.5 (normalised to sum 1), K1 = 0.01, K2 = 0.03, C_i = (K_i L)^2 for the data range L, statistics over
every position where the window fits inside the image ('valid', as the authors' ssim_index.m), and the mean
of the SSIM map (MSSIM). Colour images: per channel, then averaged over channels, as SVDQuant / ViDiT-Q report
it against the 16-bit model's images (torchmetrics' and skimage's channel handling)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA, dtype=torch.float64) -> torch.Tensor:
    """The 1-D Gaussian [size], sum 1; the 2-D window is its outer product (separable)."""
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x [N, C, H, W] filtered by g ⊗ g over H and W, valid positions only: [N, C, H-k+1, W-k+1]."""
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = WINDOW,
             sigma: float = SIGMA) -> torch.Tensor:
    """The SSIM map of two image batches [N, C, H, W] (or [C, H, W]) in float64: [N, C, H-w+1, W-w+1]."""
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() == 3:
        x, y = x[None], y[None]
    if x.dim() != 4:
        raise ValueError(f"ssim: expected [N, C, H, W] or [C, H, W], got {tuple(x.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim: images of {tuple(x.shape[-2:])} are smaller than the {window}x{window} window")
    x, y = x.double(), y.double()
    g = gaussian_window(window, sigma).to(x.device)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mx, my = _filter(x, g), _filter(y, g)
    vx = _filter(x * x, g) - mx * mx          # E[x^2] - E[x]^2 under the window weights
    vy = _filter(y * y, g) - my * my
    cxy = _filter(x * y, g) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = WINDOW,
         sigma: float = SIGMA) -> torch.Tensor:
    """Mean SSIM per image: [N] (a [C, H, W] pair gives [1]); 1 for identical images."""
    m = ssim_map(x, y, data_range, window, sigma)
    return m.flatten(1).mean(1)
