"""Published peers (tools/peers.py): optimum-quanto W4A8 and sdnq quantize exactly dicompress' selection."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import peers  # noqa: E402
from dicompress.arch import adapter_for  # noqa: E402
from dicompress.nn.surgery import iter_linears  # noqa: E402

CFG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def _model():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(**CFG).eval()


def _inputs(seed: int = 0, batch: int = 2):
    # batch 2 x 16 tokens per stream: >= 32 rows per linear, so sdnq's int8 matmul path is taken (not its
    # small-input fallback).
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, 16, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.full((batch,), 0.5),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(16, 3), return_dict=False)


@torch.no_grad()
def _run(model, seed: int = 0):
    return model(**_inputs(seed))[0]


def _selected(model):
    a = adapter_for(model)
    return a.quant_include, a.quant_keep, [n for n, _ in iter_linears(model, a.quant_include, a.quant_keep)]


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def _calibrate(model):
    for s in range(3):
        _run(model, s)


def test_quanto_w4a8_quantizes_exactly_the_selection():
    from optimum.quanto import QModuleMixin, qint4, qint8
    from optimum.quanto.tensor import QTensor
    model = _model()
    ref = _run(model)
    include, keep, names = _selected(model)
    rep = peers.apply_quanto_w4a8(model, include, keep, calibrate=_calibrate)
    got = [n for n, m in model.named_modules() if isinstance(m, QModuleMixin)]
    assert sorted(got) == sorted(names) and rep["layers"] == len(names)
    for n in names:
        m = model.get_submodule(n)
        assert m.weight_qtype == qint4 and m.activation_qtype == qint8
        assert isinstance(m.weight, QTensor)                       # frozen
        assert m.input_scale.item() != 1.0                         # calibrated
    assert _cos(_run(model), ref) > 0.9
    assert rep["bf16_bytes"] == sum(model.get_submodule(n).weight.numel() * 2 for n in names)
    # packed int4 codes are half a byte per weight; the rest is scales + shifts
    codes = sum(model.get_submodule(n).weight.numel() // 2 for n in names)
    assert codes < rep["bytes"] < rep["bf16_bytes"]


def test_quanto_activations_really_int8_on_cpu():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    x = torch.randn(8, 64)
    rep = peers.apply_quanto_w4a8(model, ["*"], (), calibrate=lambda m: m(x))
    assert rep["layers"] == 1
    q = model[0]
    s = q.input_scale
    xq = torch.clamp(torch.round(x / s), -127, 127) * s
    with torch.no_grad():
        y = q(x)
        y = y.dequantize() if hasattr(y, "dequantize") else y
    torch.testing.assert_close(y, xq @ q.weight.dequantize().t() + q.bias)


def test_sdnq_w4_quantizes_exactly_the_selection():
    model = _model()
    ref = _run(model)
    include, keep, names = _selected(model)
    rep = peers.apply_sdnq(model, include, keep)
    got = [n for n, m in model.named_modules() if hasattr(m, "sdnq_dequantizer")]
    assert sorted(got) == sorted(names) and rep["layers"] == len(names)
    assert rep["weights_dtype"] == "int4"
    assert all(model.get_submodule(n).weight.dtype == torch.uint8 for n in names)
    assert _cos(_run(model), ref) > 0.9
    codes = rep["bf16_bytes"] // 4                                    # int4 codes: a quarter of bf16
    assert codes < rep["bytes"] < rep["bf16_bytes"]


def test_sdnq_w4a8_int8_matmul_on_cpu():
    w4 = _model()
    include, keep, names = _selected(w4)
    ref = _run(w4)
    peers.apply_sdnq(w4, include, keep)
    model = _model()
    rep = peers.apply_sdnq(model, include, keep, a_bits=8)
    assert rep["layers"] == len(names) and rep["a8_layers"] == len(names)
    out, out_w4 = _run(model), _run(w4)
    assert _cos(out, ref) > 0.9
    assert not torch.equal(out, out_w4)          # the activations are quantized on top of the same W4 weights
    assert rep["bytes"] < rep["bf16_bytes"]


@pytest.mark.slow   # fast alone, but svd_lowrank takes seconds when the test threads contend for the CPU
def test_sdnq_hadamard_svd_options():
    model = _model()
    include, keep, names = _selected(model)
    ref = _run(model)
    rep = peers.apply_sdnq(model, include, keep, use_hadamard=True, use_svd=True, svd_rank=4)
    assert rep["layers"] == len(names)
    assert all(getattr(model.get_submodule(n), "svd_up", None) is not None for n in names)
    assert _cos(_run(model), ref) > 0.9


def test_sdnq_unsupported_activation_bits():
    model = _model()
    include, keep, _ = _selected(model)
    with pytest.raises(NotImplementedError):
        peers.apply_sdnq(model, include, keep, a_bits=4)
