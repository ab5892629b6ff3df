"""Comparing two compressions on the same samples: per-sample errors against the teacher, the pooled PSNR they
give, and the paired difference of two pooled PSNRs with a bootstrap interval (samples resampled jointly, so the
noise both share cancels); likewise the paired difference of two Frechet distances to the real data's features. Quality numbers here are heavy-tailed (a few samples carry much of the MSE): claim a
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


def _frechet_to_reference(feats: np.ndarray, mu_r: np.ndarray, root_r: np.ndarray, tr_r: float) -> np.ndarray:
    """Frechet distances of feature sets [B, N, D] to a fixed Gaussian (mean mu_r, covariance with symmetric root
    root_r and trace tr_r): Tr((S S_r)^1/2) = Tr((R S R)^1/2) with R = S_r^1/2, as R S R is symmetric PSD its
    root's trace is the sum of the square roots of its eigenvalues (no sqrtm: fast, batched, and exact for the
    singular covariances that resamples with repeated samples have)."""
    n = feats.shape[1]
    mu = feats.mean(axis=1)
    centred = feats - mu[:, None, :]
    cov = centred.transpose(0, 2, 1) @ centred / (n - 1)
    eig = np.linalg.eigvalsh(root_r @ cov @ root_r)
    diff = mu - mu_r
    d = (diff * diff).sum(1) + np.trace(cov, axis1=1, axis2=2) + tr_r - 2.0 * np.sqrt(eig.clip(min=0)).sum(1)
    return d.clip(min=0.0)


def paired_frechet_difference(feats_a, feats_b, real_feats, n_boot: int = 2000, level: float = 0.95,
                              seed: int = 0, chunk: int = 50) -> dict:
    """Frechet distance (metrics.frechet_distance, the one evaluate_digits reports) of b's features to the real
    data's minus a's, on the same samples (row i of `feats_a` and `feats_b` [N, D]: one noise and class), with
    the percentile bootstrap interval at `level`: `n_boot` resamples of the sample indices, each giving both
    distances from the same indices; the real features [M, D] are the fixed reference. Negative: b is closer.
    Returns {"diff", "low", "high", "excludes_zero", "frechet_a", "frechet_b", "n", "level"}.
    A resample holds about 63% distinct samples: where N is not far above D its covariance loses rank and every
    resampled distance is inflated (digits eval, N = 200, D = 128: about 61 against a point value of 21.5). Both
    sides share that inflation, so the difference stays centred, but its interval is wide: prefer N >> D."""
    from .metrics import frechet_distance
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    r = np.asarray(real_feats, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or len(a) < 3 or r.ndim != 2 or r.shape[1] != a.shape[1]:
        raise ValueError(f"need two equal [N >= 3, D] feature arrays and real features [M, D], got {a.shape}, "
                         f"{b.shape} and {r.shape}")
    fd_a = frechet_distance(torch.from_numpy(a), torch.from_numpy(r))
    fd_b = frechet_distance(torch.from_numpy(b), torch.from_numpy(r))
    mu_r, cov_r = r.mean(0), np.cov(r, rowvar=False)
    w, v = np.linalg.eigh(cov_r)
    root_r = (v * np.sqrt(w.clip(min=0))) @ v.T
    tr_r = float(np.trace(cov_r))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    boots = np.concatenate([_frechet_to_reference(b[i], mu_r, root_r, tr_r) -
                            _frechet_to_reference(a[i], mu_r, root_r, tr_r)
                            for i in np.array_split(idx, max(1, -(-n_boot // chunk)))])
    low, high = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": fd_b - fd_a, "low": float(low), "high": float(high), "excludes_zero": bool(low > 0 or high < 0),
            "frechet_a": fd_a, "frechet_b": fd_b, "n": len(a), "level": level}
