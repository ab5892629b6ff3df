"""The paired PSNR and Frechet comparisons (dicompress/eval/paired.py) on synthetic per-sample errors and features."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dicompress.eval.metrics import frechet_distance, psnr_db
from dicompress.eval.paired import (_frechet_to_reference, paired_frechet_difference, paired_psnr_difference,
                                    per_sample_mse, pooled_psnr)


def test_pooled_psnr_of_per_sample_mse_is_the_batch_psnr():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(50, 1, 8, 8, generator=g) * 2 - 1
    x = ref + 0.05 * torch.randn(ref.shape, generator=g)
    assert pooled_psnr(per_sample_mse(x, ref)) == pytest.approx(psnr_db(x, ref), abs=1e-9)


def heavy_tailed(n, rng):
    return rng.lognormal(mean=-6.0, sigma=1.5, size=n)      # a few samples carry much of the error


def test_a_real_gain_is_found_and_its_interval_covers_it():
    rng = np.random.default_rng(1)
    a = heavy_tailed(500, rng)
    b = a / 2.0                                                # half the error on every sample: +3.01 dB
    r = paired_psnr_difference(a, b, n_boot=2000)
    assert r["diff_db"] == pytest.approx(10 * math.log10(2), abs=1e-9)
    assert r["low_db"] <= r["diff_db"] <= r["high_db"] and r["excludes_zero"]


def test_noise_alone_gives_an_interval_around_zero():
    rng = np.random.default_rng(2)
    a = heavy_tailed(500, rng)
    b = a * rng.lognormal(0.0, 0.3, size=500)                  # per-sample noise, no systematic change
    r = paired_psnr_difference(a, b, n_boot=2000)
    assert not r["excludes_zero"], r
    assert r["high_db"] - r["low_db"] < 2.0


def test_pairing_matters_more_than_the_spread_of_samples():
    """The same +1 dB on a heavy-tailed set: paired, the interval is tight; unpaired it would straddle 0."""
    rng = np.random.default_rng(3)
    a = heavy_tailed(200, rng)
    b = a * 10 ** -0.1 * rng.lognormal(0.0, 0.05, size=200)
    r = paired_psnr_difference(a, b, n_boot=2000)
    assert r["excludes_zero"] and r["high_db"] - r["low_db"] < 0.5


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="equal-length"):
        paired_psnr_difference(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="MSE is 0"):
        paired_psnr_difference(np.zeros(3), np.ones(3))


# -- the paired Frechet difference ---------------------------------------------------------------------------
def features(n, rng, dim=16):
    """Correlated, non-negative features like the classifier's penultimate ReLU layer."""
    mix = rng.normal(size=(dim, dim)) / dim ** 0.5
    return np.maximum(rng.normal(size=(n, dim)) @ mix + 0.5, 0.0)


def test_frechet_point_estimate_is_the_reported_distance():
    rng = np.random.default_rng(4)
    real, a = features(1000, rng), features(200, rng)
    b = a + rng.normal(scale=0.05, size=a.shape)
    r = paired_frechet_difference(a, b, real, n_boot=50)
    fd = [frechet_distance(torch.from_numpy(x), torch.from_numpy(real)) for x in (a, b)]
    assert r["frechet_a"] == fd[0] and r["frechet_b"] == fd[1] and r["diff"] == fd[1] - fd[0]


def test_batched_frechet_matches_frechet_distance():
    """The bootstrap's eigenvalue form is the same distance as metrics.frechet_distance (sqrtm)."""
    rng = np.random.default_rng(5)
    real, a = features(1000, rng), features(100, rng)
    cov_r = np.cov(real, rowvar=False)
    w, v = np.linalg.eigh(cov_r)
    got = _frechet_to_reference(a[None], real.mean(0), (v * np.sqrt(w.clip(min=0))) @ v.T, float(np.trace(cov_r)))
    assert got[0] == pytest.approx(frechet_distance(torch.from_numpy(a), torch.from_numpy(real)), rel=1e-6)


def test_identical_features_give_exactly_zero():
    rng = np.random.default_rng(6)
    real, a = features(500, rng), features(100, rng)
    r = paired_frechet_difference(a, a.copy(), real, n_boot=200)
    assert r["diff"] == 0.0 and r["low"] == 0.0 and r["high"] == 0.0 and not r["excludes_zero"]


def test_a_shifted_distribution_is_found_in_both_directions():
    rng = np.random.default_rng(7)
    real = features(1000, rng)
    a = features(200, rng)                               # same law as the real data
    b = a + 0.3                                          # every sample moved away from it
    worse = paired_frechet_difference(a, b, real, n_boot=500)
    assert worse["diff"] > 0 and worse["low"] > 0 and worse["excludes_zero"]
    better = paired_frechet_difference(b, a, real, n_boot=500)
    assert better["diff"] < 0 and better["high"] < 0 and better["low"] <= better["diff"] <= better["high"]


def test_per_sample_noise_alone_does_not_claim_a_difference():
    rng = np.random.default_rng(8)
    real, base = features(1000, rng), features(200, rng)
    a = base + rng.normal(scale=0.05, size=base.shape)
    b = base + rng.normal(scale=0.05, size=base.shape)   # two students equally close to one teacher
    assert not paired_frechet_difference(a, b, real, n_boot=500)["excludes_zero"]


def test_frechet_bad_input_is_refused():
    with pytest.raises(ValueError, match="feature arrays"):
        paired_frechet_difference(np.ones((5, 4)), np.ones((6, 4)), np.ones((10, 4)))
    with pytest.raises(ValueError, match="feature arrays"):
        paired_frechet_difference(np.ones((5, 4)), np.ones((5, 4)), np.ones((10, 3)))
