import math

import pytest
import torch
from torch import nn

from dicompress.nn.qlinear import QuantLinear
from dicompress.quant.codecs import get_codec
from dicompress.quant.tlq import (DEFAULT_BOTTOMS, DEFAULT_ETAS, DEFAULT_PERCENTILES, absmax_scales, normalise,
                                  tlq_dequantize, tlq_levels, tlq_quantize)
from dicompress.quant.uniform import rtn_quantize


def laplacian(rows, cols, seed=0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, cols, generator=g, dtype=torch.float64) - 0.5
    return (-std * math.sqrt(0.5) * u.sign() * torch.log1p(-2 * u.abs())).float()


def sqnr(w, w_hat):
    return 10 * math.log10(float(w.pow(2).sum() / (w - w_hat).pow(2).sum()))


def naive_mse(w, bits, eta):
    """Reference TLQ for one eta, per-channel: row by row and sign by sign, the best (bottom quantile,
    top percentile) pair by brute force with torch.quantile."""
    M = 1 << (bits - 1)
    scales = absmax_scales(w, None)
    u = normalise(w, scales, None)
    total = 0.0
    for r in range(w.shape[0]):
        s2 = float(scales[r].float()) ** 2
        for mask in (u[r] >= 0, u[r] < 0):
            a = u[r][mask].abs()
            L = torch.log2(a + eta).double()
            best = float("inf")
            for qb in DEFAULT_BOTTOMS:
                for p in DEFAULT_PERCENTILES:
                    bottom, top = torch.quantile(L, qb).float(), torch.quantile(L, p).float()
                    grid = torch.stack([bottom, (top - bottom).clamp(min=0) / (M - 1)]).half()
                    lev = tlq_levels(torch.cat([grid, grid]), eta, bits)[0]
                    err = (a[:, None] - lev).abs().min(1).values.double().pow(2).sum() * s2
                    best = min(best, float(err))
            total += best
    return total / w.numel()


def test_search_picks_the_best_candidate_exactly():
    w = laplacian(12, 96, seed=3) * 0.05
    codes, buffers, info = tlq_quantize(w, 4)
    brute = {e: naive_mse(w, 4, e) for e in DEFAULT_ETAS[1:]}
    assert info["eta"] > 0 and info["mse"] <= min(brute.values()) * (1 + 1e-4)
    assert info["mse"] == pytest.approx(brute[info["eta"]], rel=1e-4)


@pytest.mark.parametrize("group_size", [None, 64])
def test_round_trip_through_codec_and_quantlinear(group_size):
    lin = nn.Linear(200, 24)
    codes, buffers, info = tlq_quantize(lin.weight.detach(), 4, group_size)
    q = QuantLinear.from_linear_codes(lin, codes, buffers, "tlq", 4, group_size)
    direct = tlq_dequantize(codes, buffers, 4, group_size)
    assert torch.equal(q.codes(), codes)
    assert torch.equal(q.dequantize(), direct)
    assert torch.equal(get_codec("tlq").dequantize(codes, buffers, 4, group_size), direct)
    assert float((direct - lin.weight.detach()).pow(2).mean()) == pytest.approx(info["mse"], rel=1e-5)
    x = torch.randn(3, 200)
    assert torch.allclose(q(x), x @ direct.T + lin.bias, atol=1e-5)


def test_beats_rtn_per_channel_on_laplacian():
    w = laplacian(256, 256)
    _, _, tlq = tlq_quantize(w, 4)
    _, _, rtn = rtn_quantize(w, 4)
    assert tlq["sqnr_db"] > rtn["sqnr_db"] + 1.0


def test_small_std_rows_do_not_hit_the_released_code_defect():
    # The released code pins the grid top at log2(1) = 0 when |w| + eta < 1: 12.5 dB at std 0.02.
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    _, _, info = tlq_quantize(w, 4)
    assert info["sqnr_db"] >= 17.0


def test_exact_zeros_and_zero_rows():
    w = laplacian(6, 80, seed=2)
    w[0] = 0.0                   # all-zero row
    w[1, ::4] = 0.0              # scattered exact zeros
    for eta in (0.1, 0.0):
        codes, buffers, _ = tlq_quantize(w, 4, etas=(eta,))
        w_hat = tlq_dequantize(codes, buffers, 4, None)
        assert torch.equal(w_hat[0], torch.zeros(80))                          # scale 0: exactly zero
        assert (codes[1, ::4] < 8).all()                                       # zeros take the positive sign
        if eta > 0:   # bottom of the positive grid = log2(eta): zero up to fp16 rounding of B
            assert w_hat[1, ::4].abs().max() < 3e-3 * eta * w[1].abs().max()
        else:         # eta = 0: zeros decode to the smallest positive level, never above it
            smallest = w[1][w[1] > 0].min()
            assert w_hat[1, ::4].abs().max() <= smallest * 1.01


@pytest.mark.parametrize("group_size,groups", [(None, 1), (64, 4), (128, 2)])
def test_buffer_shapes_channel_and_group(group_size, groups):
    w = laplacian(10, 200)
    codes, buffers, _ = tlq_quantize(w, 3, group_size)
    specs = get_codec("tlq").buffer_specs(10, 200, 3, group_size)
    assert {k: (tuple(v.shape), v.dtype) for k, v in buffers.items()} == specs
    assert buffers["scales"].shape == (10, groups) and codes.shape == (10, 200) and codes.dtype == torch.int64


def test_group_scales_help_rows_with_uneven_groups():
    w = laplacian(32, 256)
    w[:, :64] *= 20          # one loud group per row
    quiet = slice(64, None)
    w_ch = tlq_dequantize(*tlq_quantize(w, 4, None)[:2], 4, None)
    w_gr = tlq_dequantize(*tlq_quantize(w, 4, 64)[:2], 4, 64)
    assert sqnr(w[:, quiet], w_gr[:, quiet]) > sqnr(w[:, quiet], w_ch[:, quiet]) + 3


@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_in_range_and_sign_bit(bits):
    w = laplacian(8, 64, seed=bits)
    codes, buffers, info = tlq_quantize(w, bits)
    assert 0 <= int(codes.min()) and int(codes.max()) < 1 << bits
    neg = (codes >> (bits - 1)).bool()
    assert torch.equal(neg, w < 0)
    assert info["sqnr_db"] > 6.0 * bits - 8      # ~6 dB/bit, loose: catches a broken grid


def test_one_sign_rows():
    w = laplacian(4, 128, seed=5).abs()
    w[2:] *= -1                  # rows 0,1 all positive; rows 2,3 all negative
    codes, buffers, info = tlq_quantize(w, 4)
    assert (codes[:2] < 8).all() and (codes[2:] >= 8).all()
    w_hat = tlq_dequantize(codes, buffers, 4, None)
    assert (w_hat[:2] >= 0).all() and (w_hat[2:] <= 0).all()
    assert info["sqnr_db"] > 16                  # the 3-bit magnitude grid spans the one sign present


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"):
        tlq_quantize(torch.randn(4, 8), 1)
    with pytest.raises(ValueError, match="finite"):
        tlq_quantize(torch.tensor([[1.0, float("nan")]]), 4)
    with pytest.raises(ValueError, match="percentiles"):
        tlq_quantize(torch.randn(4, 8), 4, percentiles=(1.5,))
