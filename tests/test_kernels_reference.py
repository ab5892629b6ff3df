"""The kernel ops' reference path (what runs on CPU): bit-identical to the pre-kernel QuantLinear forward,
the dispatch switches, the int8 mapping, torch.compile / opcheck, autograd, and Triton being optional."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dicompress.kernels import (
    gemm_mode,
    int8_grid,
    int8_mapped_weight,
    ops,
    reference,
    signed_levels,
)
from dicompress.nn.act import ActTransform
from dicompress.nn.qlinear import QuantLinear
from dicompress.quant.activation import quantize_per_token
from dicompress.quant.tlq import tlq_quantize
from dicompress.quant.uniform import rtn_quantize


@pytest.fixture(autouse=True)
def _decode_by_default(monkeypatch):
    """These tests compare against the exact decode path; the default, auto, picks int8 for 8-bit activation
    codes on a CPU whose int8 GEMM is faster (AVX-512 VNNI), so they name decode (test_gemm_mode.py tests auto)."""
    monkeypatch.setenv("DICOMPRESS_GEMM_MODE", "decode")


K, N = 48, 20          # 48 = 12 x 4: a Hadamard order with a dense Paley factor


def layer(codec="tlq", bits=4, group=None, smooth=False, rotation=None, act_bits=None, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=bias)
    quantize = tlq_quantize if codec == "tlq" else rtn_quantize
    kw = {"etas": (0.0, 0.02), "percentiles": (0.99, 1.0), "bottoms": (0.0,)} if codec == "tlq" else {}
    codes, buffers, _ = quantize(lin.weight.detach(), bits, group, **kw)
    act = None
    if smooth or rotation or act_bits:
        act = ActTransform(K, smooth=smooth, rotation=rotation, act_bits=act_bits)
        if smooth:
            act.smooth.uniform_(0.5, 2)
        if rotation == "hadamard":
            act.signs.copy_(torch.randint(0, 2, (K,)) * 2 - 1)
        if rotation == "dense":
            act.rotation.copy_(torch.linalg.qr(torch.randn(K, K))[0])
    return QuantLinear.from_linear_codes(lin, codes, buffers, codec, bits, group, act=act).eval()


def old_act(a, x):
    """ActTransform.forward as it was before the kernel ops."""
    if a.has_smooth:
        x = x / a.smooth.to(x.dtype)
    x = a.rotate(x)
    return x if a.act_bits is None else quantize_per_token(x, a.act_bits)


def old_forward(q, x):
    """QuantLinear.forward as it was before the kernel ops (the contract the reference keeps bit for bit)."""
    if q.act is not None:
        x = old_act(q.act, x)
    return F.linear(x, q.dequantize().to(x.dtype), None if q.bias is None else q.bias.to(x.dtype))


LAYERS = [{}, {"act_bits": 8}, {"smooth": True, "rotation": "hadamard", "act_bits": 8},
          {"smooth": True, "rotation": "dense", "act_bits": 4}, {"smooth": True, "rotation": "hadamard"},
          {"codec": "uniform", "bits": 3, "group": 16, "act_bits": 6, "bias": False},
          {"rotation": "hadamard", "act_bits": 12}, {"bits": 3, "group": 16, "smooth": True, "act_bits": 8}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", LAYERS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_reference_is_bit_identical_to_the_old_forward(cfg, dtype):
    q = layer(**cfg)
    x = (torch.randn(2, 7, K) * 3).to(dtype)
    x[0, 0] = 0
    with torch.no_grad():
        assert torch.equal(q(x), old_forward(q, x))
        if q.act is not None:
            assert torch.equal(q.act(x), old_act(q.act, x))


def test_gradients_flow_as_before():
    q = layer(smooth=True, rotation="hadamard")
    x = torch.randn(3, K, requires_grad=True)
    q(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    old_forward(q, x2).square().sum().backward()
    assert torch.equal(x.grad, x2.grad)


# -- dispatch --------------------------------------------------------------------------------------
def _op_args(q, x):
    codes, steps = ops.quantize_act(x, None, None, None, 8)
    return (codes, steps, q.qweight, q.scales, q.grid, q.eta, q.bias, "tlq", 4, 0, "decode", torch.float32)


def test_cuda_kernel_is_registered_and_honours_the_env(monkeypatch):
    """The CUDA implementation (called here on CPU tensors) runs Triton unless DICOMPRESS_KERNELS=reference."""
    from dicompress.kernels import dispatch
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dicompress::qlinear", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dicompress::quantize_act", "CUDA")
    q = layer()
    args = _op_args(q, torch.randn(4, K))

    class Called(Exception):
        pass

    def boom(*a, **k):
        raise Called
    monkeypatch.setattr("dicompress.kernels.triton_gemm.qlinear_triton", boom)
    monkeypatch.setattr(dispatch, "has_triton", lambda: True)
    monkeypatch.setattr("dicompress.kernels.ops.has_triton", lambda: True)
    assert torch.equal(ops.qlinear_cuda(*args), reference.qlinear(*args))   # not a CUDA device of 8.0+
    monkeypatch.setattr("dicompress.kernels.ops.triton_supported", lambda device: True)
    with pytest.raises(Called):
        ops.qlinear_cuda(*args)
    monkeypatch.setenv("DICOMPRESS_KERNELS", "reference")
    assert torch.equal(ops.qlinear_cuda(*args), reference.qlinear(*args))
    monkeypatch.setenv("DICOMPRESS_KERNELS", "fastest")
    with pytest.raises(ValueError, match="DICOMPRESS_KERNELS"):
        ops.qlinear_cuda(*args)


def test_triton_needs_ampere_and_tiles_follow_the_generation(monkeypatch):
    from types import SimpleNamespace

    from dicompress.kernels import dispatch
    from dicompress.kernels.triton_gemm import _blocks
    caps = {0: (7, 5), 1: (8, 6), 2: (9, 0)}
    monkeypatch.setattr(dispatch, "_capability", lambda index: caps[index])
    gpu = [SimpleNamespace(type="cuda", index=i) for i in range(3)]
    assert [dispatch.triton_supported(d) for d in gpu] == [False, True, True]
    assert not dispatch.triton_supported(torch.device("cpu"))
    # int8 tiles: BLOCK_K 128 spills before Hopper (compiled for sm_86), so 64 there
    for kind in ("int8", "int8_unpacked"):
        assert _blocks(4096, 0, kind, (8, 6))["BLOCK_K"] == 64 and _blocks(4096, 0, kind, (9, 0))["BLOCK_K"] == 128
    assert _blocks(4096, 0, "float", (8, 6))["BLOCK_K"] == _blocks(4096, 0, "float", (9, 0))["BLOCK_K"] == 64
    with pytest.raises(ValueError, match="GEMM class"):
        _blocks(4096, 0, True)


def test_gemm_mode_switches_to_int8_mapped_weights(monkeypatch):
    q = layer(act_bits=8)
    x = torch.randn(5, K)
    with torch.no_grad():
        exact = q(x)
        with gemm_mode("int8"):
            mapped = q(x)
        monkeypatch.setenv("DICOMPRESS_GEMM_MODE", "int8")
        assert torch.equal(q(x), mapped)
        monkeypatch.setenv("DICOMPRESS_GEMM_MODE", "decode")
        assert torch.equal(q(x), exact)
        with gemm_mode("int8_unpacked"):                  # the same values; only where the GPU keeps them differs
            assert torch.equal(q(x), mapped)
    w8 = int8_mapped_weight(q.codes(), "tlq", q.scales, q.grid, q.eta, 4, None)
    expected = F.linear(quantize_per_token(x, 8), w8, q.bias)
    # on CPU the int8 modes sum in int32 (torch._int_mm, kernels/int8_mm.py): the reference's values up to fp32
    # rounding; the reference itself computes them exactly as the fake-quantized float linear
    torch.testing.assert_close(mapped, expected, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("DICOMPRESS_KERNELS", "reference")
    with torch.no_grad(), gemm_mode("int8"):
        assert torch.equal(q(x), expected)
    assert not torch.equal(mapped, exact) and (mapped - exact).norm() < 0.02 * exact.norm()
    with pytest.raises(ValueError, match="GEMM mode"), gemm_mode("int4"):
        pass


# -- the int8 mapping ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group", [(3, None), (4, 16), (7, None)])
def test_int8_mapping_is_exact_for_uniform_codes(bits, group):
    q = layer(codec="uniform", bits=bits, group=group)
    w8 = int8_mapped_weight(q.codes(), "uniform", q.scales, q.zeros, None, bits, group)
    assert torch.equal(w8, q.dequantize())


def test_int8_mapping_of_tlq_levels_is_nearest_on_a_row_grid():
    q = layer(bits=4)
    lev = signed_levels("tlq", q.scales, q.grid, q.eta, 4)
    q8, t = int8_grid(lev)
    assert q8.dtype == torch.int8 and q8.abs().max() <= 127
    assert ((q8.float() * t[:, None, None] - lev).abs() <= t[:, None, None] / 2 + 1e-7).all()
    assert torch.allclose(q8.abs().amax((1, 2)).float(), torch.full((N,), 127.0))   # the row max is on the grid


# -- torch.compile / opcheck / optional triton -----------------------------------------------------
def test_opcheck_passes():
    q = layer()
    x = torch.randn(2, 3, K)
    signs = (torch.randint(0, 2, (K,)) * 2 - 1).to(torch.int8)
    torch.library.opcheck(ops.quantize_act, (x, torch.rand(K) + 0.5, signs, None, 8))
    torch.library.opcheck(ops.qlinear, _op_args(q, x))
    torch.library.opcheck(ops.qlinear, (x, None, q.qweight, q.scales, q.grid, q.eta, None, "tlq", 4, 0, "int8",
                                        torch.float32))


def test_torch_compile_through_the_ops():
    model = torch.nn.Sequential(layer(smooth=True, rotation="hadamard", act_bits=8), torch.nn.GELU(),
                                torch.nn.Linear(N, K), layer(codec="uniform", bits=4, act_bits=8, seed=1))
    x = torch.randn(2, 5, K)
    with torch.no_grad():
        assert torch.equal(torch.compile(model, backend="eager")(x), model(x))


def test_compiled_siblings_make_one_graph_and_follow_the_gemm_mode():
    """q/k/v-like siblings reading one tensor trace into one graph (fullgraph: no break at the mode lookup
    or the shared activation codes), and gemm_mode recompiles: each mode gives the eager result."""
    class Siblings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = layer(smooth=True, rotation="hadamard", act_bits=8), layer(act_bits=8, seed=1)

        def forward(self, x):
            return self.q(x) + self.k(x)

    torch._dynamo.reset()
    model = Siblings()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, K)
    with torch.no_grad():
        decode = compiled(x)
        assert torch.equal(decode, model(x))
        with gemm_mode("int8"):
            int8 = compiled(x)
            assert torch.equal(int8, model(x)) and not torch.equal(int8, decode)


def test_import_and_forward_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, dicompress\n"
            "from dicompress.kernels import has_triton\n"
            "from dicompress.nn.qlinear import QuantLinear\n"
            "assert not has_triton()\n"
            "q = QuantLinear(16, 8, True, 'tlq', 4, device='cpu')\n"
            "q.qweight.zero_(); q.scales.fill_(1); q.grid.zero_(); q.eta.zero_(); q.bias.zero_()\n"
            "print(q(torch.randn(2, 16)).shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([2, 8])" in out.stdout
