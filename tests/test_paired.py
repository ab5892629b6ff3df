"""The paired PSNR comparison (dicompress/eval/paired.py) on synthetic per-sample errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dicompress.eval.metrics import psnr_db
from dicompress.eval.paired import paired_psnr_difference, per_sample_mse, pooled_psnr


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
