"""Comparing two compressions on the same samples: per-sample errors against the teacher, the pooled PSNR they
give, and the paired difference of two pooled PSNRs with a bootstrap interval (samples resampled jointly, so the
noise both share cancels). Quality numbers here are heavy-tailed (a few samples carry much of the MSE): claim a
difference only when its interval excludes 0. Pure functions on arrays."""
from __future__ import annotations

import math

import numpy as np
import torch


def per_sample_mse(x: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """[N] mean squared error of each sample of `x` [N, ...] against `ref` (float64)."""
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    d = (x.double() - ref.double()).reshape(x.shape[0], -1)
    return (d * d).mean(dim=1).numpy()


def pooled_psnr(mse: np.ndarray, data_range: float = 2.0) -> float:
    """PSNR of the samples' pooled MSE (metrics.psnr_db on the whole batch), in dB; +inf when it is 0."""
    m = float(np.mean(mse))
    return float("inf") if m == 0.0 else 10.0 * math.log10(data_range ** 2 / m)


def paired_psnr_difference(mse_a: np.ndarray, mse_b: np.ndarray, n_boot: int = 10000, level: float = 0.95,
                           seed: int = 0, data_range: float = 2.0) -> dict:
    """pooled PSNR of b minus that of a, on the same samples (index i is one sample in both), with the
    percentile bootstrap interval at `level`: `n_boot` resamples of the sample indices, each giving both pooled
    PSNRs from the same indices. Returns {"diff_db", "low_db", "high_db", "excludes_zero", "n", "level"}."""
    a, b = np.asarray(mse_a, dtype=np.float64), np.asarray(mse_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two equal-length 1-D arrays of per-sample MSE, got {a.shape} and {b.shape}")
    if (a <= 0).any() or (b <= 0).any():
        raise ValueError("a per-sample MSE is 0: the pooled PSNR of a resample could be infinite")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    # pooled PSNR = 10 log10(range^2) - 10 log10(mean MSE): the range cancels in the difference
    boots = 10.0 * (np.log10(a[idx].mean(axis=1)) - np.log10(b[idx].mean(axis=1)))
    low, high = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    diff = pooled_psnr(b, data_range) - pooled_psnr(a, data_range)
    return {"diff_db": diff, "low_db": float(low), "high_db": float(high),
            "excludes_zero": bool(low > 0 or high < 0), "n": len(a), "level": level}
