"""The CPU kernels of the ops: the int8 modes' torch._int_mm on the cached unpacked int8 weight
(kernels/int8_mm.py) against the reference (the same mapped levels summed in fp32) and which calls take it;
activation prep in row blocks, bit for bit the reference."""
import pytest
import torch

from dicompress.kernels import cache, gemm_mode, int8_mm, ops, reference
from dicompress.quant.packing import pack_codes
from dicompress.quant.tlq import tlq_quantize
from dicompress.quant.uniform import rtn_quantize


@pytest.fixture(autouse=True)
def _fresh_cache():
    cache.clear()
    yield
    cache.clear()


def weights(codec, bits, group, n, k, seed=0):
    """(qweight, scales, aux, eta) of a random [n, k] weight as QuantLinear stores them."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.2, 2, k)
    if codec == "tlq":
        codes, b, _ = tlq_quantize(w, bits, group, etas=(0.0, 0.05), percentiles=(0.99, 1.0), bottoms=(0.0,))
        return pack_codes(codes, bits), b["scales"], b["grid"], b["eta"]
    codes, b, _ = rtn_quantize(w, bits, group)
    return pack_codes(codes, bits), b["scales"], b["zeros"], None


def codes_of(shape, seed=1):
    return reference.quantize_codes(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3, 8)


CASES = [  # (codec, bits, lead shape of x, N, K, bias, out dtype)
    ("tlq", 4, (19,), 40, 72, True, torch.float32),
    ("tlq", 3, (2, 7), 33, 150, False, torch.float32),
    ("tlq", 4, (1,), 33, 50, True, torch.bfloat16),
    ("uniform", 4, (5,), 24, 100, True, torch.float32),
    ("uniform", 8, (3, 3), 17, 33, False, torch.float32),
    ("tlq", 4, (0,), 16, 32, True, torch.float32),                 # no tokens
]


@pytest.mark.parametrize("mode", ["int8", "int8_unpacked"])
@pytest.mark.parametrize("codec,bits,lead,n,k,bias,dtype", CASES)
def test_int_mm_matches_the_reference(codec, bits, lead, n, k, bias, dtype, mode):
    qweight, scales, aux, eta = weights(codec, bits, None, n, k)
    x, xs = codes_of((*lead, k))
    b = torch.randn(n) if bias else None
    args = (x, xs, qweight, scales, aux, eta, b, codec, bits, 0, mode, dtype)
    assert int8_mm.applies(x, xs, 0, mode)
    y = int8_mm.qlinear_int_mm(*args)
    ref = reference.qlinear(*args[:-1], torch.float32)
    assert y.shape == (*lead, n) and y.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 4e-3                 # int32 sums vs fp32 sums; bf16 output
    assert (y.float() - ref).norm() <= tol * ref.norm() + 1e-12
    assert torch.equal(ops.qlinear(*args), y)                      # what the op runs on CPU


def test_other_calls_keep_the_reference(monkeypatch):
    """decode mode, group scales, float activations and DICOMPRESS_KERNELS=reference: the reference, bit for bit."""
    x, xs = codes_of((6, 128))
    per_channel = weights("tlq", 4, None, 24, 128)
    grouped = weights("uniform", 4, 64, 24, 128)
    calls = [(x, xs, *per_channel, None, "tlq", 4, 0, "decode", torch.float32),
             (x, xs, *grouped, None, "uniform", 4, 64, "int8", torch.float32),
             (torch.randn(6, 128), None, *per_channel, None, "tlq", 4, 0, "int8", torch.float32)]
    for args in calls:
        assert not int8_mm.applies(args[0], args[1], args[8], args[10])
        assert torch.equal(ops.qlinear(*args), reference.qlinear(*args))
    args = (x, xs, *per_channel, None, "tlq", 4, 0, "int8", torch.float32)
    assert not torch.equal(ops.qlinear(*args), reference.qlinear(*args))       # summed in int32 here
    monkeypatch.setenv("DICOMPRESS_KERNELS", "reference")
    assert torch.equal(ops.qlinear(*args), reference.qlinear(*args))


def test_unpacked_weight_is_built_once_per_layer(monkeypatch):
    built = []
    real = int8_mm.unpacked_weight
    monkeypatch.setattr(int8_mm, "unpacked_weight", lambda *a: built.append(1) or real(*a))
    qweight, scales, aux, eta = weights("tlq", 4, None, 24, 64)
    x, xs = codes_of((4, 64))
    run = lambda mode: ops.qlinear(x, xs, qweight, scales, aux, eta, None, "tlq", 4, 0, mode, torch.float32)  # noqa: E731
    y = run("int8")
    assert torch.equal(run("int8_unpacked"), y) and len(built) == 1         # both int8 modes share the matrix
    with torch.no_grad():
        scales.mul_(2)
    torch.testing.assert_close(run("int8"), 2 * y, rtol=1e-6, atol=0)
    assert len(built) == 2


def test_module_forward_in_int8_mode_runs_int_mm(monkeypatch):
    from test_kernels_reference import layer
    q = layer(act_bits=8, smooth=True, rotation="hadamard")
    seen = []
    real = int8_mm.qlinear_int_mm
    monkeypatch.setattr(int8_mm, "qlinear_int_mm", lambda *a: seen.append(1) or real(*a))
    x = torch.randn(2, 5, q.in_features)
    with torch.no_grad(), gemm_mode("int8"):
        y = q(x)
        monkeypatch.setenv("DICOMPRESS_KERNELS", "reference")
        ref = q(x)
    assert seen == [1] and y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rotation", ["hadamard", "dense", None])
def test_act_prep_in_row_blocks_is_the_reference_bit_for_bit(monkeypatch, rotation):
    k = 48
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, k, generator=g) * torch.logspace(-1, 1, k)
    smooth = torch.rand(k, generator=g) + 0.5
    signs = (torch.randint(0, 2, (k,), generator=g) * 2 - 1).to(torch.int8) if rotation == "hadamard" else None
    rot = torch.linalg.qr(torch.randn(k, k, generator=g))[0] if rotation == "dense" else None
    monkeypatch.setattr(ops, "CPU_BLOCK_BYTES", 7 * k * 4)            # blocks of 7 rows; 150 rows in all
    codes, steps = ops.quantize_act(x, smooth, signs, rot, 8)
    ref_codes, ref_steps = reference.quantize_act(x, smooth, signs, rot, 8)
    assert codes.shape == x.shape and steps.shape == x.shape[:-1]
    assert torch.equal(codes, ref_codes) and torch.equal(steps, ref_steps)


def test_int8_gemm_layers_counts_what_the_int8_modes_run_as_int8_gemms():
    from test_kernels_reference import layer
    model = torch.nn.Sequential(layer(act_bits=8), layer(act_bits=4, seed=1), layer(act_bits=16, seed=2),
                                layer(seed=3), layer("uniform", group=16, act_bits=8, seed=4), torch.nn.Linear(4, 4))
    assert int8_mm.int8_gemm_layers(model) == 2                     # A8 and A4 per-channel; not A16, A-float, groups
