"""The kernel ops on a real GPU at FLUX shapes: Triton (what CUDA tensors dispatch to) against the reference
computed in fp32 on the same device. Skipped without CUDA (run: pytest -m gpu, or tools/gpu_check.sh)."""
import pytest
import torch

from dicompress.kernels import gemm_mode, ops, reference
from dicompress.nn.act import ActTransform
from dicompress.nn.qlinear import QuantLinear

TILE_CANDIDATES = pytest.importorskip("dicompress.kernels.triton_gemm").TILE_CANDIDATES
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
FLUX_KN = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072)]
M = 512


def random_layer(k, n, codec="tlq", group=None, act_bits=8, seed=0):
    """A quantized layer with random codes and plausible codec tensors, smoothing + Hadamard on its input."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    act = ActTransform(k, smooth=True, rotation="hadamard", act_bits=act_bits, device="cuda")
    q = QuantLinear(k, n, True, codec, 4, group, device="cuda", bias_dtype=torch.bfloat16, act=act)
    with torch.no_grad():
        q.qweight.copy_(torch.randint(0, 256, q.qweight.shape, generator=g, device="cuda", dtype=torch.int32))
        q.scales.copy_(torch.rand(q.scales.shape, generator=g, device="cuda") * 0.05 + 0.01)
        if codec == "tlq":
            q.grid.copy_(torch.tensor([-6.0, 0.8, -5.5, 0.75], device="cuda").expand_as(q.grid))
            q.eta.fill_(0.01)
        else:
            q.zeros.copy_(torch.randint(0, 16, q.zeros.shape, generator=g, device="cuda"))
        q.bias.normal_(0, 0.01, generator=g)
        act.smooth.uniform_(0.5, 2.0, generator=g)
        act.signs.copy_(torch.randint(0, 2, (k,), generator=g, device="cuda") * 2 - 1)
    return q.eval()


def rel_err(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("k", [3072, 12288, 15360])
def test_act_prep_at_flux_widths(k):
    q = random_layer(k, 128)
    x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16) * 4
    codes, steps = ops.quantize_act(x, q.act.smooth, q.act.signs, None, 8)
    ref_codes, ref_steps = reference.quantize_act(x.float(), q.act.smooth, q.act.signs, None, 8)
    diff = (codes.int() - ref_codes.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01
    torch.testing.assert_close(steps, ref_steps, rtol=1e-5, atol=0)


@pytest.mark.parametrize("k", [3072, 15360])
def test_zero_point_act_prep_and_layer_at_flux_widths(k):
    """Asymmetric A4: the Triton codes / steps / offsets against the reference, and the layer's integer path
    (codes, GEMM, minus offset x row sums) against the fake-quantized fp32 definition."""
    q = random_layer(k, 3072, act_bits=4)
    q.act.zero_point = True
    x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16) * 4 + 1
    codes, steps, offsets = ops.quantize_act_zp(x, q.act.smooth, q.act.signs, None, 4)
    ref = reference.quantize_act_zp(x.float(), q.act.smooth, q.act.signs, None, 4)
    diff = (codes.int() - ref[0].int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01
    torch.testing.assert_close(steps, ref[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(offsets, ref[2], rtol=1e-4, atol=1e-5)
    for mode in ("decode", "int8"):
        with torch.no_grad(), gemm_mode(mode):
            y = q(x)
            w = reference.decode_weight(q.qweight, k, "tlq", q.scales, q.grid, q.eta, 4, None, mode)
            want = torch.nn.functional.linear(reference.dequantize_act(*ref[:2], torch.float32, ref[2]), w,
                                              q.bias.float())
        assert y.dtype == torch.bfloat16 and rel_err(y, want) < 1e-2, mode


@pytest.mark.parametrize("mode", ["decode", "int8", "int8_unpacked"])
@pytest.mark.parametrize("k,n", FLUX_KN)
def test_qlinear_at_flux_shapes(k, n, mode):
    q = random_layer(k, n)
    x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
    codes, steps = ops.quantize_act(x, q.act.smooth, q.act.signs, None, 8)
    w = (q.qweight, q.scales, q.grid, q.eta, q.bias, "tlq", 4, 0, mode)
    y = ops.qlinear(codes, steps, *w, torch.bfloat16)
    ref = reference.qlinear(codes, steps, *w, torch.float32)
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 5e-3


@pytest.mark.parametrize("codec,group", [("tlq", 128), ("tlq", 64), ("uniform", 64), ("uniform", None)])
@pytest.mark.parametrize("mode", ["decode", "int8", "int8_unpacked"])
def test_group_scales_and_uniform_codec(codec, group, mode):
    q = random_layer(3072, 3072, codec, group)
    x = torch.randn(M, 3072, device="cuda", dtype=torch.bfloat16)
    codes, steps = ops.quantize_act(x, q.act.smooth, q.act.signs, None, 8)
    aux = q.grid if codec == "tlq" else q.zeros
    w = (q.qweight, q.scales, aux, getattr(q, "eta", None), q.bias, codec, 4, group or 0, mode)
    ref = reference.qlinear(codes, steps, *w, torch.float32)
    assert rel_err(ops.qlinear(codes, steps, *w, torch.bfloat16), ref) < 5e-3


@pytest.mark.parametrize("group", [None, 64])
def test_unpacked_weight_equals_the_table_path(group):
    """Each mode's default tile on the GPU: int32 sums are exact, so int8_unpacked equals int8 bit for bit."""
    q = random_layer(3072, 9216, "tlq" if group is None else "uniform", group)
    x = torch.randn(M, 3072, device="cuda", dtype=torch.bfloat16)
    codes, steps = ops.quantize_act(x, q.act.smooth, q.act.signs, None, 8)
    aux = q.grid if group is None else q.zeros
    w = (q.qweight, q.scales, aux, getattr(q, "eta", None), q.bias, q.codec, 4, group or 0)
    assert torch.equal(ops.qlinear(codes, steps, *w, "int8", torch.bfloat16),
                       ops.qlinear(codes, steps, *w, "int8_unpacked", torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("act_bits", [8, None])
def test_module_forward_matches_reference(monkeypatch, dtype, act_bits):
    """QuantLinear on CUDA (Triton) vs the same module forced to the reference, in fp32."""
    q = random_layer(3072, 9216, act_bits=act_bits)
    x = torch.randn(2, 300, 3072, device="cuda", dtype=dtype)
    with torch.no_grad():
        y = q(x)
        monkeypatch.setenv("DICOMPRESS_KERNELS", "reference")
        ref = q(x.float())
    assert y.shape == (2, 300, 9216) and y.dtype == dtype
    assert rel_err(y, ref) < 1e-2         # bf16 rounding of x_hat and y, fp16 levels; codes may flip at ties


def test_torch_compile_on_cuda():
    model = torch.nn.Sequential(random_layer(3072, 3072), torch.nn.GELU(), random_layer(3072, 3072, seed=1))
    x = torch.randn(256, 3072, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), gemm_mode("decode"):
        assert rel_err(torch.compile(model)(x), model(x)) < 1e-3


@pytest.mark.parametrize("kind,i", [(kind, i) for kind, c in TILE_CANDIDATES.items() for i in range(len(c))])
def test_tile_candidates(kind, i):
    """Every tile tools/bench_kernels.py may pick (both operand orders) computes the same product."""
    from dicompress.kernels.triton_gemm import KIND_MODE, _blocks, qlinear_triton
    mode = KIND_MODE[kind]
    q = random_layer(3072, 3072, seed=i)
    x = torch.randn(M, 3072, device="cuda", dtype=torch.bfloat16)
    codes, steps = ops.quantize_act(x, q.act.smooth, q.act.signs, None, 8)
    w = (q.qweight, q.scales, q.grid, q.eta, q.bias, "tlq", 4, 0, mode)
    tile = dict(_blocks(M, 0, kind), **TILE_CANDIDATES[kind][i])
    y = qlinear_triton(codes, steps, *w, torch.bfloat16, blocks=tile)
    assert rel_err(y, reference.qlinear(codes, steps, *w, torch.float32)) < 5e-3
