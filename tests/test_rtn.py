import pytest
import torch
from torch import nn

from dicompress.nn.qlinear import QuantLinear
from dicompress.quant.codecs import get_codec
from dicompress.quant.uniform import rtn_dequantize, rtn_quantize


@pytest.mark.parametrize("group_size", [None, 64])
def test_round_trip_through_codec_and_quantlinear(group_size):
    lin = nn.Linear(150, 12)
    codes, buffers, info = rtn_quantize(lin.weight.detach(), 4, group_size)
    q = QuantLinear.from_linear_codes(lin, codes, buffers, "uniform", 4, group_size)
    direct = rtn_dequantize(codes, buffers, 4, group_size)
    assert torch.equal(q.dequantize(), direct)
    assert torch.equal(get_codec("uniform").dequantize(codes, buffers, 4, group_size), direct)
    assert float((direct - lin.weight.detach()).pow(2).mean()) == pytest.approx(info["mse"], rel=1e-5)
    assert info["eta"] is None and info["percentile"] is None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_within_half_step_and_codes_in_range(bits):
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(bits))
    codes, buffers, _ = rtn_quantize(w, bits, 64)
    assert 0 <= int(codes.min()) and int(codes.max()) < 1 << bits
    step = buffers["scales"].float().repeat_interleave(64, 1)[:, :96]
    err = (rtn_dequantize(codes, buffers, bits, 64) - w).abs()
    assert (err <= step / 2 * 1.001 + 1e-7).all()          # nothing clipped: min-max range
    assert buffers["zeros"].float().eq(buffers["zeros"].float().round()).all()   # integer zero point


def test_exact_zeros_and_zero_rows():
    w = torch.randn(3, 40)
    w[0] = 0
    w[1, ::3] = 0
    codes, buffers, _ = rtn_quantize(w, 4)
    w_hat = rtn_dequantize(codes, buffers, 4, None)
    assert torch.equal(w_hat[0], torch.zeros(40))
    assert torch.equal(w_hat[1, ::3], torch.zeros(14))


def test_more_bits_less_error():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    db = [rtn_quantize(w, b)[2]["sqnr_db"] for b in (3, 4, 8)]
    assert db[0] + 4 < db[1] < db[2] - 20 and db[2] > 38


def test_buffer_shapes_and_bad_bits():
    codes, buffers, _ = rtn_quantize(torch.randn(5, 130), 4, 128)
    specs = get_codec("uniform").buffer_specs(5, 130, 4, 128)
    assert {k: (tuple(v.shape), v.dtype) for k, v in buffers.items()} == specs == {
        "scales": ((5, 2), torch.float16), "zeros": ((5, 2), torch.float16)}
    with pytest.raises(ValueError, match="bits"):
        rtn_quantize(torch.randn(2, 2), 9)
