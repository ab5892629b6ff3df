"""Quality metrics as pure functions on tensors (no models, no I/O)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy import linalg


def psnr_db(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR of `x` against `ref` in dB, 10*log10(range^2 / MSE).

    The MSE is pooled over the whole batch (not a mean of per-image PSNRs): one near-identical image
    would otherwise dominate the average with a huge PSNR. `data_range` 2.0 matches images in [-1, 1].
    Identical inputs give +inf.
    """
    mse = torch.mean((x.double() - ref.double()) ** 2).item()
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(data_range ** 2 / mse)


def sqnr_db(signal: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10*log10(sum(signal^2) / sum((signal - approx)^2))."""
    s = signal.double()
    noise = torch.sum((s - approx.double()) ** 2).item()
    power = torch.sum(s ** 2).item()
    if noise == 0.0:
        return float("inf")
    if power == 0.0:
        return float("-inf")
    return 10.0 * math.log10(power / noise)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max logit is the label."""
    return (logits.argmax(dim=-1) == labels.to(logits.device)).double().mean().item()


def _mean_cov(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = feats.detach().double().cpu().numpy().reshape(len(feats), -1)
    mu = f.mean(axis=0)
    if len(f) < 2:  # a single sample has no spread; np.cov would return NaN
        return mu, np.zeros((f.shape[1], f.shape[1]))
    return mu, np.cov(f, rowvar=False)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (the FID formula).

    d = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)). With few samples the covariances are
    singular and sqrtm can return non-finite or strongly complex values; then `eps` is added to both
    diagonals and the root retaken. Only the real part is kept (the imaginary part is rounding noise).
    """
    mu_a, cov_a = _mean_cov(feats_a)
    mu_b, cov_b = _mean_cov(feats_b)
    diff = mu_a - mu_b
    with warnings.catch_warnings():  # singular covariances are expected with few samples; handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(root).all() or np.abs(np.imag(root)).max(initial=0.0) > 1e-3:
            offset = np.eye(len(cov_a)) * eps
            root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    d = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(np.real(root))
    return max(float(d), 0.0)  # a negative value is only rounding error around 0
