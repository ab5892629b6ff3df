"""Codecs own their format: the kernels ask the codec (get_codec) for the buffers they take and the decode
table, so a new codec runs through the ops with no kernel change, and an unregistered one is an error, never
a silent dequantize-then-matmul."""
import pytest
import torch
import torch.nn.functional as F

from dicompress.kernels import cache, gemm_mode, int8_mm, ops, reference, signed_levels
from dicompress.kernels.tables import gather_levels
from dicompress.nn.act import ActTransform
from dicompress.nn.qlinear import QuantLinear
from dicompress.quant import codecs
from dicompress.quant.codecs import KernelArgs, get_codec, register_codec
from dicompress.quant.groups import expand_groups, num_groups
from dicompress.quant.tlq import TLQ_CODEC, tlq_quantize
from dicompress.quant.uniform import UNIFORM_CODEC, rtn_quantize

K, N = 64, 12


class LutCodec:
    """A toy codec: every row stores its own table of 2^b levels plus one layer-wide shift,
    w = (levels[r, code] + shift) · scale[r, group]. Its buffer names are none of the built-ins'."""

    name = "test-lut"
    kernel_args = KernelArgs(scales="scales", aux="levels", eta="shift")

    def buffer_specs(self, out_features, in_features, bits, group_size):
        return {"scales": ((out_features, num_groups(in_features, group_size)), torch.float16),
                "levels": ((out_features, 1 << bits), torch.float16), "shift": ((1,), torch.float32)}

    def dequantize(self, codes, buffers, bits, group_size):
        table = buffers["levels"].float() + buffers["shift"].float().reshape(())
        return table.gather(1, codes) * expand_groups(buffers["scales"].float(), codes.shape[1], group_size)

    def signed_levels(self, buffers, bits):
        return (buffers["levels"].float() + buffers["shift"].float().reshape(()))[:, None]


@pytest.fixture(autouse=True)
def _fresh_cache():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def lut_codec(monkeypatch):
    """LutCodec registered for one test only (the registry is restored afterwards)."""
    monkeypatch.setattr(codecs, "CODECS", dict(codecs.CODECS))
    return register_codec(LutCodec())


def lut_layer(bits=4, group=None, act_bits=None, seed=0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(K, N)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g)
    buffers = {"scales": (torch.rand(N, num_groups(K, group), generator=g) * 0.1 + 0.01).half(),
               "levels": torch.randn(N, 1 << bits, generator=g).half(), "shift": torch.tensor([0.25])}
    act = None if act_bits is None else ActTransform(K, act_bits=act_bits)
    return QuantLinear.from_linear_codes(lin, codes, buffers, "test-lut", bits, group, act=act).eval()


def tlq_layer() -> QuantLinear:
    lin = torch.nn.Linear(K, N)
    codes, buffers, _ = tlq_quantize(lin.weight.detach(), 4, None, etas=(0.0, 0.02), percentiles=(1.0,))
    return QuantLinear.from_linear_codes(lin, codes, buffers, TLQ_CODEC.name, 4).eval()


# -- unknown codecs are errors -------------------------------------------------------------------------
def test_a_quant_linear_with_an_unregistered_codec_raises_naming_it():
    q = tlq_layer()
    q.codec = "no-such-codec"
    x = torch.randn(3, K)
    with pytest.raises(KeyError, match=r"no-such-codec.*known: .*tlq"), torch.no_grad():
        q(x)
    with pytest.raises(KeyError, match="no-such-codec"):            # the differentiable path too
        q(x.requires_grad_(True))
    with pytest.raises(KeyError, match="no-such-codec"):
        QuantLinear(K, N, True, "no-such-codec", 4)


@pytest.mark.parametrize("mode", ["decode", "int8", "int8_unpacked"])
@pytest.mark.parametrize("a8", [False, True])
def test_the_ops_raise_for_an_unregistered_codec(mode, a8):
    q = tlq_layer()
    x = torch.randn(5, K)
    xs = None
    if a8:
        x, xs = reference.quantize_codes(x, 8)
    args = (x, xs, q.qweight, q.scales, q.grid, q.eta, q.bias, "no-such-codec", 4, 0, mode, torch.float32)
    with pytest.raises(KeyError, match="no-such-codec"):
        ops.qlinear(*args)
    with pytest.raises(KeyError, match="no-such-codec"):
        reference.qlinear(*args)
    with pytest.raises(KeyError, match="no-such-codec"):
        signed_levels("no-such-codec", q.scales, q.grid, q.eta, 4)


def test_a_codec_without_a_kernel_table_is_refused_at_registration(monkeypatch):
    monkeypatch.setattr(codecs, "CODECS", dict(codecs.CODECS))

    class DecodeOnly:
        name = "decode-only"
        buffer_specs = LutCodec.buffer_specs
        dequantize = LutCodec.dequantize

    with pytest.raises(TypeError, match="decode-only.*kernel_args, signed_levels"):
        register_codec(DecodeOnly())
    assert "decode-only" not in codecs.CODECS


# -- a new codec runs through the ops ------------------------------------------------------------------
@pytest.mark.parametrize("group", [None, 32])
def test_a_registered_codec_runs_through_the_reference_op(lut_codec, group):
    q = lut_layer(group=group)
    x = torch.randn(2, 5, K)
    expected = F.linear(x, q.dequantize(), q.bias)                   # its own dequantize-then-matmul
    with torch.no_grad():
        assert torch.equal(q(x), expected)
    assert torch.equal(ops.qlinear(x, None, q.qweight, q.scales, q.levels, q.shift, q.bias, "test-lut", 4,
                                   group or 0, "decode", torch.float32), expected)
    xg = x.clone().requires_grad_(True)                                # the differentiable path
    y = q(xg)
    y.sum().backward()
    assert torch.equal(y.detach(), expected) and torch.allclose(xg.grad, q.dequantize().sum(0).expand_as(x))


def test_a_registered_codec_runs_the_int8_modes(lut_codec):
    q = lut_layer(act_bits=8)
    x = torch.randn(7, K)
    with torch.no_grad():
        decode = q(x)
        with gemm_mode("int8"):
            int8 = q(x)                                                # CPU: torch._int_mm on the mapped table
    assert int8_mm.int8_gemm_layers(torch.nn.Sequential(q)) == 1
    assert (int8 - decode).norm() <= 0.02 * decode.norm()              # int8 grid per row: ~0.4% per level


@pytest.mark.triton
@pytest.mark.parametrize("mode", ["decode", "int8"])
def test_a_registered_codec_runs_the_triton_gemm(lut_codec, mode):
    qlinear_triton = pytest.importorskip("dicompress.kernels.triton_gemm").qlinear_triton  # triton is optional
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = lut_layer(group=32)
    x, xs = reference.quantize_codes(torch.randn(9, K), 8)
    w = [t.to(dev) for t in (q.qweight, q.scales, q.levels, q.shift, q.bias)]
    y = qlinear_triton(x.to(dev), xs.to(dev), *w, "test-lut", 4, 32, mode, torch.float32,
                       blocks={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32})
    ref = reference.qlinear(x, xs, q.qweight, q.scales, q.levels, q.shift, q.bias, "test-lut", 4, 32, mode,
                            torch.float32)
    assert (y.cpu() - ref).norm() <= 2e-3 * ref.norm()


# -- the built-in codecs' tables are their decode ------------------------------------------------------
def builtin(codec, bits, group):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.2, 2, K)
    w[0, :4] = 0
    if codec == TLQ_CODEC.name:
        return tlq_quantize(w, bits, group, etas=(0.0, 0.02), percentiles=(0.99, 1.0))[:2]
    return rtn_quantize(w, bits, group)[:2]


@pytest.mark.parametrize("codec,bits,group", [(TLQ_CODEC.name, 4, None), (TLQ_CODEC.name, 3, 32),
                                              (UNIFORM_CODEC.name, 4, None), (UNIFORM_CODEC.name, 2, 32)])
def test_builtin_tables_equal_their_dequantize(codec, bits, group):
    codes, buffers = builtin(codec, bits, group)
    c = get_codec(codec)
    table = c.signed_levels(buffers, bits)
    assert table.dtype == torch.float32 and table.shape[::2] == (N, 1 << bits)
    assert table.shape[1] in (1, num_groups(K, group))
    decoded = gather_levels(table, codes, group) * expand_groups(buffers["scales"].float(), K, group)
    assert torch.equal(decoded, c.dequantize(codes, buffers, bits, group))
    scales, aux, eta = (buffers[c.kernel_args.scales], buffers[c.kernel_args.aux],
                        buffers.get(c.kernel_args.eta) if c.kernel_args.eta else None)
    assert torch.equal(signed_levels(codec, scales, aux, eta, bits), table)   # what the kernels use
