"""The published peers of tools/peers_extra.py / peers_autoround.py: each quantizes exactly the selected linears of a
small stack, moves its output by a small nonzero amount, and counts the bytes of its packed storage. Each test is
skipped where its library (pyproject's `bench` extra) is not installed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

IN, HID = 128, 256
SELECTED = ("0", "2")            # the GELU is no linear; "3" is kept out by `keep`


def _stack():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HID), nn.GELU(), nn.Linear(HID, IN), nn.Linear(IN, IN)).eval()


def _x(n: int = 48):
    return torch.randn(n, IN, generator=torch.Generator().manual_seed(1))


def _rel_err(model, ref, x):
    with torch.no_grad():
        y = model(x)
    return ((y - ref).pow(2).mean() / ref.pow(2).mean()).item()


def _quantize(apply):
    model, x = _stack(), _x()
    with torch.no_grad():
        ref = model(x)
    rep = apply(model, ["*"], ["3"])
    assert rep["layers"] == 2 and rep["bf16_bytes"] == 2 * IN * HID * 2
    assert torch.equal(model[3].weight, _stack()[3].weight)          # kept (ModelOpt wraps it, quantizers off)
    err = _rel_err(model, ref, x)
    assert 0 < err < 0.03, err                       # int4: a small, nonzero change of the output
    return model, rep, err


N = 2 * IN * HID                                     # weights of the two selected linears


def test_torchao_int4_weight_only():
    pytest.importorskip("torchao")
    import peers_extra as px
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_
    model, rep, _ = _quantize(px.apply_torchao_int4wo)
    # evaluated on the weights read back through torchao's int4 kernel: the same outputs as the packed model
    packed = _stack()
    quantize_(packed, PrototypeInt4WeightOnlyConfig(group_size=128), filter_fn=lambda m, fqn: fqn in SELECTED)
    assert all(type(model[int(n)].weight) is nn.Parameter for n in SELECTED)
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), packed(_x()), rtol=1e-5, atol=1e-5)
    groups = N // 128
    assert rep["bytes"] == N // 2 + groups * 2 * 4    # packed codes + fp32 (scale, zero) per group of 128


def test_torchao_w4a8_quantizes_the_activations():
    pytest.importorskip("torchao")
    import peers_extra as px
    model, rep, _ = _quantize(px.apply_torchao_w4a8)
    groups = N // 32
    assert rep["bytes"] == N // 2 + groups * (4 + 1)       # 4-bit codes + fp32 scale + int8 zero per group of 32
    assert rep["bytes_stored"] == N + groups * 5           # the unpacked layout: one int8 byte per code
    lin, x = model[0], _x()
    w = lin.weight
    w_dq = (w.qdata.float().view(HID, -1, 32) - w.zero_point.float()[..., None]) * w.scale[..., None]
    with torch.no_grad():
        weight_only = x @ w_dq.reshape(HID, IN).t() + lin.bias
        y = lin(x)
    assert 0 < (y - weight_only).abs().max() < 0.05 * weight_only.abs().max()   # int8 inputs on top of W4


@pytest.mark.parametrize("setting", ["w8a8-sq", "w4a8-awq"])
def test_modelopt(setting):
    pytest.importorskip("modelopt.torch.quantization")
    import peers_extra as px
    x = _x()
    calls = []

    def calibrate(m):
        calls.append(1)
        m(x)

    model, rep, err = _quantize(lambda m, i, k: px.apply_modelopt(m, i, k, calibrate, setting))
    assert calls
    for n in SELECTED:
        iq = model[int(n)].input_quantizer
        assert iq.is_enabled and iq.amax is not None and iq.pre_quant_scale is not None   # calibrated, smoothed
    assert not model[3].input_quantizer.is_enabled and not model[3].weight_quantizer.is_enabled
    per_linear_inputs = 2 * 4 + 4 * (IN + HID)             # fp32 input amax + pre_quant_scale, per linear
    if setting == "w8a8-sq":
        assert err < 1e-3                                  # 8 bits
        assert rep["bytes"] == N + 4 * (HID + IN) + per_linear_inputs     # int8 codes + fp32 scale per row
    else:
        groups = N // 128
        assert rep["bytes"] == N // 2 + 4 * groups + 2 * 4 + per_linear_inputs   # + the FP8 stage's amax


def test_hqq():
    pytest.importorskip("hqq")
    import peers_extra as px
    from hqq.core.quantize import HQQLinear
    model, rep, _ = _quantize(px.apply_hqq)
    assert all(isinstance(model[int(n)], HQQLinear) for n in SELECTED)
    assert rep["bytes"] == N // 2 + (N // 64) * 2 * 4     # packed codes + fp32 scale and zero per group of 64


@pytest.mark.slow     # svd_lowrank takes minutes when the test threads contend for the CPU
def test_sdnq_svd_counts_the_low_rank_factors():
    pytest.importorskip("sdnq")
    import peers
    model, rep, _ = _quantize(lambda m, i, k: peers.apply_sdnq(m, i, k, use_svd=True))
    rank = rep["options"].get("svd_rank", 32)
    assert all(model[int(n)].svd_up is not None for n in SELECTED)
    up_down = sum(model[int(n)].svd_up.numel() + model[int(n)].svd_down.numel() for n in SELECTED)
    assert up_down == rank * (HID + IN) * 2               # sdnq's default rank 32: the up and down factors
    # packed int4 codes + one fp32 scale per output row (sdnq's grouping with SVD on) + the fp32 factors
    assert rep["bytes"] == N // 2 + 4 * (HID + IN) + 4 * up_down


@pytest.mark.slow     # AutoRound's block loop costs seconds per block even at 2 iterations
def test_autoround_tunes_exactly_the_selection():
    pytest.importorskip("auto_round")
    from peers_autoround import apply_autoround

    from dicompress.arch import adapter_for
    from dicompress.models import load_transformer, resolve_model
    from dicompress.nn.surgery import iter_linears
    info = resolve_model("zoo:tiny-flux-digits")
    model = load_transformer(info)
    a = adapter_for(model)
    names = [n for n, _ in iter_linears(model, a.quant_include, a.quant_keep)]
    w0 = model.get_submodule(names[0]).weight.detach().clone()
    rep = apply_autoround(model, a.quant_include, a.quant_keep, info.path, classes=(0, 1), seeds=(0,), steps=2,
                          iters=2, batch_size=2)
    assert rep["layers"] == len(names)
    q = model.get_submodule(names[0])
    assert q.bits == 4 and not torch.equal(q.weight, w0)
    assert rep["bytes"] == sum(model.get_submodule(n).weight.numel() // 2 + model.get_submodule(n).scale.numel() * 2
                               for n in names)
