"""The Triton wrappers' per-layer cache (kernels/cache.py): tables are built once, rebuilt when a source
buffer changes in place or is replaced, and never keep a layer's tensors alive; and the activation codes
sibling linears share (kernels/linear.py)."""
import gc
import weakref

import pytest
import torch

from dicompress.kernels import cache, reference

from test_kernels_triton import DEV, SMALL, quantized


@pytest.fixture(autouse=True)
def _fresh_cache():
    cache.clear()
    yield
    cache.clear()


def test_derived_reuses_until_a_source_changes():
    a, b = torch.ones(4), torch.zeros(2)
    calls = []

    def build():
        calls.append(1)
        return a * 2 + b.sum()

    first = cache.derived(a, (a, b), "k", build)
    assert cache.derived(a, (a, b), "k", build) is first and len(calls) == 1
    cache.derived(a, (a, b), "other-key", build)
    assert len(calls) == 2
    b.add_(1)                                             # an in-place update of a source, not the anchor
    assert torch.equal(cache.derived(a, (a, b), "k", build), torch.full((4,), 4.0)) and len(calls) == 3


def test_entries_do_not_keep_their_anchor_alive():
    a = torch.ones(3)                                      # fp32: a.float() is `a` itself
    value = cache.derived(a, (a,), "f", a.float)
    assert value is not a and value.data_ptr() == a.data_ptr()
    ref = weakref.ref(a)
    del a, value
    gc.collect()
    assert ref() is None and len(cache._entries) == 0


def test_inference_tensors_are_stamped_by_pointer():
    with torch.inference_mode():
        a = torch.ones(2)
    calls = []
    for _ in range(2):
        cache.derived(a, (a,), "k", lambda: calls.append(1) or a + 1)
    assert len(calls) == 1


@pytest.mark.triton
def test_qlinear_tables_built_once_and_rebuilt_after_an_update(monkeypatch):
    from dicompress.kernels import triton_gemm
    built = []
    real = triton_gemm.weight_tables
    monkeypatch.setattr(triton_gemm, "weight_tables", lambda *a: built.append(a[-1]) or real(*a))
    qweight, scales, aux, eta = quantized("tlq", 4, None, 24, 40)
    x, xs = reference.quantize_codes(torch.randn(5, 40, generator=torch.Generator().manual_seed(1)), 8)
    x, xs = x.to(DEV), xs.to(DEV)

    def run(mode):
        y = triton_gemm.qlinear_triton(x, xs, qweight, scales, aux, eta, None, "tlq", 4, 0, mode, torch.float32,
                                       blocks=SMALL)
        ref = reference.qlinear(x.cpu(), xs.cpu(), qweight.cpu(), scales.cpu(), aux.cpu(), eta.cpu(), None, "tlq",
                                4, 0, mode, torch.float32)
        assert (y.cpu() - ref).norm() <= 2e-3 * ref.norm()
        return y

    y0 = run("int8")
    run("int8")
    assert built == ["int8"]                              # the second call reused the tables
    run("decode")
    assert built == ["int8", "decode"]                    # one entry per mode
    with torch.no_grad():
        scales.mul_(2)                                    # e.g. a load_state_dict copy into the buffer
        y1 = run("int8")
    assert built == ["int8", "decode", "int8"]
    torch.testing.assert_close(y1, 2 * y0, rtol=1e-5, atol=1e-6)


@pytest.mark.triton
def test_act_smoothing_follows_an_in_place_update():
    from dicompress.kernels.triton_act import quantize_act_triton
    k = 48
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, k, generator=g).to(DEV)
    smooth = (torch.rand(k, generator=g) + 0.5).half().to(DEV)   # fp16: the cast is cached
    signs = (torch.randint(0, 2, (k,), generator=g) * 2 - 1).to(torch.int8).to(DEV)
    for _ in range(2):                                    # the second call runs on the cached fp32 vector
        codes, steps = quantize_act_triton(x, smooth, signs, None, 8)
        ref_codes, ref_steps = reference.quantize_act(x.cpu(), smooth.cpu().float(), signs.cpu(), None, 8)
        torch.testing.assert_close(steps.cpu(), ref_steps, rtol=1e-5, atol=0)
        assert (codes.cpu().int() - ref_codes.int()).abs().max() <= 1
        smooth.mul_(3)


def _siblings(k=32, n=24, seed=0):
    """Three quantized linears with equal (but separately stored) input transforms, as ARS and smoothing
    give q/k/v, and a fourth whose smoothing differs."""
    from dicompress.nn.act import ActTransform
    from dicompress.nn.qlinear import QuantLinear
    from dicompress.quant.tlq import tlq_quantize
    g = torch.Generator().manual_seed(seed)
    smooth = torch.rand(k, generator=g) + 0.5
    signs = torch.randint(0, 2, (k,), generator=g) * 2 - 1
    layers = []
    for i in range(4):
        lin = torch.nn.Linear(k, n)
        codes, b, _ = tlq_quantize(lin.weight.detach(), 4, None, etas=(0.01,), percentiles=(1.0,), bottoms=(0.0,))
        act = ActTransform(k, smooth=True, rotation="hadamard", act_bits=8)
        act.smooth.copy_(smooth * (2 if i == 3 else 1))
        act.signs.copy_(signs)
        layers.append(QuantLinear.from_linear_codes(lin, codes, b, "tlq", 4, act=act).eval())
    return layers


def test_siblings_reading_one_tensor_quantize_it_once(monkeypatch):
    from dicompress.kernels import ops
    layers = _siblings()
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = [q(x.clone()) for q in layers]          # a fresh input each: nothing to share
    calls = []
    real = ops.quantize_act
    monkeypatch.setattr(ops, "quantize_act", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        got = [q(x) for q in layers[:3]]
        assert len(calls) == 1                            # q, k, v: one quantization of x
        got.append(layers[3](x))
        assert len(calls) == 2                            # other smoothing values: its own codes
        for y, ref in zip(got, expected):
            assert torch.equal(y, ref)
        x.mul_(3)                                         # changed in place: the version counter moves
        y = layers[0](x)
        assert len(calls) == 3 and torch.equal(y, layers[0](x.clone()))
        layers[1].act.smooth.mul_(1.5)                    # a transform changed in place: a new digest
        layers[0](x)
        calls.clear()
        layers[1](x)
        assert len(calls) == 1
    with torch.inference_mode():                          # no version counter: never reused
        xi = torch.randn(5, 32)
        calls.clear()
        layers[0](xi)
        layers[1](xi)
        assert len(calls) == 2


@pytest.mark.triton
def test_unpacked_int8_weight_built_once_and_rebuilt_after_an_update(monkeypatch):
    from dicompress.kernels import int8_mm, triton_gemm
    built = []
    real = int8_mm.unpacked_weight
    monkeypatch.setattr(int8_mm, "unpacked_weight", lambda *a: built.append(1) or real(*a))
    qweight, scales, aux, eta = quantized("tlq", 4, None, 24, 40)
    x, xs = reference.quantize_codes(torch.randn(5, 40, generator=torch.Generator().manual_seed(2)), 8)
    x, xs = x.to(DEV), xs.to(DEV)

    def run():
        y = triton_gemm.qlinear_triton(x, xs, qweight, scales, aux, eta, None, "tlq", 4, 0, "int8_unpacked",
                                       torch.float32, blocks=SMALL)
        ref = reference.qlinear(x.cpu(), xs.cpu(), qweight.cpu(), scales.cpu(), aux.cpu(), eta.cpu(), None, "tlq",
                                4, 0, "int8_unpacked", torch.float32)
        torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-5)
        return y

    run()
    run()
    assert len(built) == 1
    with torch.no_grad():
        qweight.copy_(qweight.flip(0))                    # new codes in the same buffer: the matrix follows
    y = run()
    assert len(built) == 2
    with torch.no_grad():
        scales.mul_(2)
    torch.testing.assert_close(run(), 2 * y, rtol=1e-5, atol=1e-5)
    assert len(built) == 3
