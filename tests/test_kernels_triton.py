"""Triton kernels against the pure-torch reference, at small shapes. Without a GPU they run in Triton's
CPU interpreter (TRITON_INTERPRET=1, set in conftest.py before triton is imported); on a CUDA machine they
run compiled on the GPU. The oracle is the reference on fp32 inputs: the kernels compute in fp32 inside."""
import pytest
import torch

from dicompress.kernels import reference
from dicompress.quant.packing import pack_codes
from dicompress.quant.tlq import tlq_quantize
from dicompress.quant.uniform import rtn_quantize

triton = pytest.importorskip("triton")
TILE_CANDIDATES = pytest.importorskip("dicompress.kernels.triton_gemm").TILE_CANDIDATES
pytestmark = pytest.mark.triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}   # shapes below are not multiples of these
SWAPPED = dict(SMALL, SWAP_AB=True)                        # the transposed tile, outᵀ = W · xᵀ
REG_LUT = dict(SMALL, REG_LUT=True)                        # tables held in registers, tl.gather


def quantized(codec, bits, group, n, k, seed=0):
    """(qweight, scales, aux, eta) of a random [n, k] weight, as QuantLinear stores them."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.2, 2, k)
    if codec == "tlq":
        codes, b, _ = tlq_quantize(w, bits, group, etas=(0.0, 0.05), percentiles=(0.99, 1.0), bottoms=(0.0,))
        aux, eta = b["grid"], b["eta"]
    else:
        codes, b, _ = rtn_quantize(w, bits, group)
        aux, eta = b["zeros"], None
    return tuple(t if t is None else t.to(DEV) for t in (pack_codes(codes, bits), b["scales"], aux, eta))


# -- activation preparation -------------------------------------------------------------------------
ACT_CASES = [  # (K, rotation, smooth, bits, dtype)
    (72, None, False, 8, torch.float32),          # plain per-token, K not a power of two
    (50, None, True, 4, torch.float16),           # smoothing only, 4-bit codes
    (64, "hadamard", True, 8, torch.float32),     # power-of-two FWHT
    (48, "hadamard", False, 6, torch.float16),    # 12 x 4: Paley I base as a dense factor
    (40, "hadamard", True, 8, torch.float32),     # 20 x 2
    (28, "hadamard", True, 8, torch.float32),     # 28 x 1: Paley II base only, no butterflies
    (30, "dense", True, 8, torch.float32),        # dense rotation (torch fp32 matmul first)
    (24, "dense", False, 4, torch.float16),
]


@pytest.mark.parametrize("k,rotation,smooth,bits,dtype", ACT_CASES)
def test_quantize_act_matches_reference(k, rotation, smooth, bits, dtype):
    from dicompress.kernels.triton_act import quantize_act_triton
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(2, 5, k, generator=g) * torch.logspace(-1, 1, k)).to(dtype)
    x[0, 1] = 0                                                          # an all-zero token
    sm = torch.rand(k, generator=g) + 0.5 if smooth else None
    signs = (torch.randint(0, 2, (k,), generator=g) * 2 - 1).to(torch.int8) if rotation == "hadamard" else None
    rot = torch.linalg.qr(torch.randn(k, k, generator=g))[0] if rotation == "dense" else None
    args = [t if t is None else t.to(DEV) for t in (x, sm, signs, rot)]
    codes, steps = quantize_act_triton(*args, bits)
    ref_codes, ref_steps = reference.quantize_act(x.float(), sm, signs, rot, bits)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and steps.shape == x.shape[:-1]
    diff = (codes.cpu().int() - ref_codes.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01                # only ties at rounding can flip
    torch.testing.assert_close(steps.cpu(), ref_steps, rtol=1e-5, atol=0)
    assert codes[0, 1].eq(0).all() and steps[0, 1] == 0


@pytest.mark.parametrize("k,rotation,smooth,bits,dtype", [c for c in ACT_CASES if c[1] != "dense"][:5])
def test_quantize_act_zero_point_matches_reference(k, rotation, smooth, bits, dtype):
    """The asymmetric codes (centred to int8), steps and offsets, on inputs shifted off centre."""
    from dicompress.kernels.triton_act import quantize_act_triton
    g = torch.Generator().manual_seed(k + 1)
    x = (torch.randn(2, 5, k, generator=g) * torch.logspace(-1, 1, k) + 0.5).to(dtype)
    x[0, 1] = 0
    x[1, 2] = x[1, 2].abs()                                              # one-sided: zero point 0
    sm = torch.rand(k, generator=g) + 0.5 if smooth else None
    signs = (torch.randint(0, 2, (k,), generator=g) * 2 - 1).to(torch.int8) if rotation == "hadamard" else None
    args = [t if t is None else t.to(DEV) for t in (x, sm, signs, None)]
    codes, steps, offsets = quantize_act_triton(*args, bits, zero_point=True)
    ref = reference.quantize_act_zp(x.float(), sm, signs, None, bits)
    diff = (codes.cpu().int() - ref[0].int()).abs()
    assert codes.dtype == torch.int8 and diff.max() <= 1 and diff.float().mean() < 0.01
    torch.testing.assert_close(steps.cpu(), ref[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(offsets.cpu(), ref[2], rtol=1e-5, atol=1e-6)
    assert codes.min() >= -2 ** (bits - 1) and codes.max() <= 2 ** (bits - 1) - 1
    assert steps[0, 1] == 0 and offsets[0, 1] == 0


# -- the quantized GEMM -----------------------------------------------------------------------------
GEMM_CASES = [  # (codec, bits, group, M, N, K, a8, mode, dtype, bias)
    ("tlq", 4, None, 19, 40, 72, True, "decode", torch.float32, True),
    ("tlq", 4, None, 19, 40, 72, True, "int8", torch.float32, False),
    ("tlq", 3, 64, 7, 33, 150, True, "decode", torch.float16, True),
    ("tlq", 3, 64, 7, 33, 150, True, "int8", torch.float16, False),
    ("tlq", 4, 128, 5, 40, 200, False, "decode", torch.float32, True),
    ("tlq", 4, None, 1, 33, 72, False, "decode", torch.float16, False),
    ("tlq", 4, None, 5, 33, 72, False, "int8", torch.float32, True),
    ("tlq", 8, None, 7, 20, 40, True, "decode", torch.float32, True),
    ("uniform", 4, 64, 7, 33, 100, True, "int8", torch.float32, True),
    ("uniform", 3, None, 7, 33, 100, False, "decode", torch.float32, True),
    ("uniform", 8, None, 19, 33, 100, True, "int8", torch.float32, False),
    ("uniform", 8, None, 19, 33, 100, True, "decode", torch.float16, True),
    ("uniform", 2, None, 19, 33, 100, True, "int8", torch.float32, True),   # 2 bits: the generic unpacking
    # the other TLQ widths `bits: auto` may give a layer (2..8 in all)
    ("tlq", 2, None, 7, 20, 40, True, "int8", torch.float32, True),
    ("tlq", 5, None, 7, 20, 40, False, "decode", torch.float32, True),
    ("tlq", 6, 64, 7, 20, 130, True, "decode", torch.float16, False),
    ("tlq", 7, None, 7, 20, 40, True, "int8", torch.float32, True),
    # the int8 weight unpacked once per layer (no table in the kernel)
    ("tlq", 4, None, 19, 40, 72, True, "int8_unpacked", torch.float32, True),
    ("tlq", 3, 64, 7, 33, 150, True, "int8_unpacked", torch.float16, False),
    ("uniform", 4, 64, 7, 33, 100, True, "int8_unpacked", torch.float32, True),
    ("tlq", 4, None, 5, 33, 72, False, "int8_unpacked", torch.float32, True),
]


@pytest.mark.parametrize("tile", [SMALL, SWAPPED, REG_LUT], ids=["xw", "swap_ab", "reg_lut"])
@pytest.mark.parametrize("codec,bits,group,m,n,k,a8,mode,dtype,bias", GEMM_CASES)
def test_qlinear_matches_reference(codec, bits, group, m, n, k, a8, mode, dtype, bias, tile):
    from dicompress.kernels.triton_gemm import qlinear_triton
    qweight, scales, aux, eta = quantized(codec, bits, group, n, k)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(DEV) if bias else None
    xs = None
    if a8:
        x, xs = reference.quantize_codes(x, 8)
    gs = group or 0
    y = qlinear_triton(x.to(DEV), None if xs is None else xs.to(DEV), qweight, scales, aux, eta, b, codec, bits, gs,
                       mode, dtype, blocks=tile)
    cpu = [None if t is None else t.cpu() for t in (qweight, scales, aux, eta, b)]
    ref = reference.qlinear(x if a8 else x.float(), xs, *cpu[:4], cpu[4], codec, bits, gs, mode, torch.float32)
    assert y.dtype == dtype and y.shape == (m, n)
    # fp32 sums differ only in order; fp16 enters through decode-mode levels (A8) and fp16 outputs
    exact = dtype == torch.float32 and (mode.startswith("int8") or not a8)
    tol = 1e-5 if exact else 2e-3
    err = (y.cpu().float() - ref)
    assert err.norm() <= tol * ref.norm()
    assert err.abs().max() <= 4 * tol * ref.abs().max()


@pytest.mark.parametrize("codec,bits,group", [("tlq", 4, None), ("tlq", 3, 64), ("uniform", 4, 64)])
def test_unpacked_int8_weight_gives_the_table_path_bit_for_bit(codec, bits, group):
    """int8_unpacked only moves the decode out of the kernel: int32 sums are exact and the epilogue is the same,
    so its outputs equal mode int8's exactly."""
    from dicompress.kernels.triton_gemm import qlinear_triton
    qweight, scales, aux, eta = quantized(codec, bits, group, 40, 130, seed=3)
    x, xs = reference.quantize_codes(torch.randn(9, 130, generator=torch.Generator().manual_seed(3)), 8)
    args = (x.to(DEV), xs.to(DEV), qweight, scales, aux, eta, None, codec, bits, group or 0)
    y = {mode: qlinear_triton(*args, mode, torch.float32, blocks=SMALL) for mode in ("int8", "int8_unpacked")}
    assert torch.equal(y["int8"], y["int8_unpacked"])


@pytest.mark.parametrize("rotation", ["hadamard", None])
def test_fused_layer_matches_module_forward(rotation):
    """A QuantLinear's whole A8 path through the two Triton kernels vs its (reference) forward on CPU."""
    from dicompress.kernels.triton_act import quantize_act_triton
    from dicompress.kernels.triton_gemm import qlinear_triton
    from dicompress.nn.act import ActTransform
    from dicompress.nn.qlinear import QuantLinear
    k, n = 48, 36
    lin = torch.nn.Linear(k, n)
    codes, b, _ = tlq_quantize(lin.weight.detach(), 4, None, etas=(0.01,), percentiles=(1.0,), bottoms=(0.0,))
    act = ActTransform(k, smooth=True, rotation=rotation, act_bits=8)
    act.smooth.uniform_(0.5, 2)
    if rotation:
        act.signs.copy_(torch.randint(0, 2, (k,)) * 2 - 1)
    q = QuantLinear.from_linear_codes(lin, codes, b, "tlq", 4, act=act).eval()
    x = torch.randn(3, 9, k)
    with torch.no_grad():
        ref = q(x)
        q.to(DEV)
        c, s = quantize_act_triton(x.to(DEV), q.act.smooth, q.act.signs if rotation else None, None, 8)
        y = qlinear_triton(c, s, q.qweight, q.scales, q.grid, q.eta, q.bias, "tlq", 4, 0, "decode", torch.float32,
                           blocks=SMALL)
    assert y.shape == ref.shape
    assert (y.cpu() - ref).norm() <= 2e-3 * ref.norm()


@pytest.mark.parametrize("kind,i", [(kind, i) for kind, c in TILE_CANDIDATES.items() for i in range(len(c))])
def test_bench_tile_candidates(kind, i):
    """The full-size tiles tools/bench_kernels.py sweeps on a GPU, at a shape none of them divides."""
    from dicompress.kernels.triton_gemm import KIND_MODE, _blocks, qlinear_triton
    mode = KIND_MODE[kind]
    qweight, scales, aux, eta = quantized("tlq", 4, None, 140, 300, seed=i)
    x, xs = reference.quantize_codes(torch.randn(70, 300, generator=torch.Generator().manual_seed(i)), 8)
    tile = dict(_blocks(70, 0, kind), **TILE_CANDIDATES[kind][i])
    y = qlinear_triton(x.to(DEV), xs.to(DEV), qweight, scales, aux, eta, None, "tlq", 4, 0, mode, torch.float32,
                       blocks=tile)
    ref = reference.qlinear(x, xs, *(t.cpu() for t in (qweight, scales, aux, eta)), None, "tlq", 4, 0, mode,
                            torch.float32)
    assert (y.cpu() - ref).norm() <= 2e-3 * ref.norm()
