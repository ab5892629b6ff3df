"""Asymmetric (zero-point) per-token activations: the pure function, the codes the GEMM takes, the QuantLinear
forward in every GEMM mode, the spec and artifact, `act_quant` and `lrq_auto` choosing the grid per input."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dicompress
from conftest import small_flux
from dicompress.arch import adapter_for
from dicompress.errors import RecipeError
from dicompress.kernels import gemm_mode, ops, reference
from dicompress.kernels.linear import _act_args
from dicompress.nn.act import ActTransform, TransformedLinear
from dicompress.nn.qlinear import QuantLinear
from dicompress.quant.activation import asymmetric_step_zero, quantize_per_token
from dicompress.quant.tlq import tlq_quantize
from dicompress.recipe import build_passes

K, N = 48, 20


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tokens(seed=0, shape=(3, 7, 64)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-2, 2, shape[-2])[:, None]
    return x


# -- the pure function ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8, 12])
def test_zero_point_grid_error_and_exact_zero(bits):
    x = tokens()
    x[0, 0] = 0.0
    x[1, 2] = x[1, 2].abs() + 1.0                    # a one-sided token: the grid must not reach below 0
    xq = quantize_per_token(x, bits, zero_point=True)
    step, zero = asymmetric_step_zero(x, bits)
    assert xq.shape == x.shape and xq.dtype == x.dtype
    slack = 8 * torch.finfo(torch.float32).eps * x.abs().amax(-1, keepdim=True)
    assert ((xq - x).abs() <= step / 2 + slack).all()
    assert torch.equal(xq[0, 0], torch.zeros(64))
    assert ((zero >= 0) & (zero <= 2 ** bits - 1) & (zero == zero.round())).all()
    levels = (xq / torch.where(step > 0, step, 1) + zero).round()
    assert levels.min() >= 0 and levels.max() <= 2 ** bits - 1
    assert zero[1, 2] == 0                           # lo = min(x, 0) = 0: the whole grid is above zero
    y = x.clone()
    y[..., 5] = 0.0
    assert (quantize_per_token(y, bits, zero_point=True)[..., 5] == 0).all()   # zero is on every token's grid


def test_zero_point_halves_the_error_of_one_sided_tokens():
    """After a GELU the tokens are one-sided: the symmetric grid wastes its negative half, the asymmetric one
    spans [min, max]; at 4 bits its step is about half the symmetric one's (15 steps over max vs 7)."""
    x = F.gelu(tokens(1, (4, 32, 256)))
    sym = (quantize_per_token(x, 4) - x).pow(2).mean()
    asym = (quantize_per_token(x, 4, zero_point=True) - x).pow(2).mean()
    assert asym < 0.4 * sym
    z = torch.randn(4, 32, 256)                      # symmetric data: no gain to speak of, but no loss either
    assert (quantize_per_token(z, 4, zero_point=True) - z).pow(2).mean() < 1.05 * (quantize_per_token(z, 4) - z).pow(2).mean()


def test_straight_through_gradient():
    x = tokens().requires_grad_()
    quantize_per_token(x, 4, zero_point=True).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# -- the codes the GEMM takes -----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_centred_codes_reconstruct_the_fake_quantized_tokens(bits):
    x = tokens(2)
    x[1, 3] = 0
    codes, steps, offsets = reference.quantize_codes_zp(x, bits)
    assert codes.dtype == torch.int8 and steps.shape == offsets.shape == x.shape[:-1]
    assert codes.min() >= -2 ** (bits - 1) and codes.max() <= 2 ** (bits - 1) - 1
    want = quantize_per_token(x, bits, zero_point=True)
    got = reference.dequantize_act(codes, steps, torch.float32, offsets)
    torch.testing.assert_close(got, want, rtol=0, atol=4e-6 * float(x.abs().max()))
    assert steps[1, 3] == 0 and offsets[1, 3] == 0 and torch.equal(got[1, 3], torch.zeros(64))
    with pytest.raises(ValueError, match="at most 8 bits"):
        reference.quantize_codes_zp(x, 12)


def test_cpu_row_blocks_give_the_reference_bits():
    x = torch.randn(4, 700, 1024)                    # > 2 MB: the CPU kernel splits it into row blocks
    smooth, signs = torch.rand(1024) + 0.5, (torch.randint(0, 2, (1024,)) * 2 - 1).to(torch.int8)
    got = ops.quantize_act_zp(x, smooth, signs, None, 4)
    want = reference.quantize_act_zp(x, smooth, signs, None, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_opcheck_and_compile():
    x = torch.randn(2, 3, K)
    signs = (torch.randint(0, 2, (K,)) * 2 - 1).to(torch.int8)
    torch.library.opcheck(ops.quantize_act_zp, (x, torch.rand(K) + 0.5, signs, None, 4))
    q = layer(act_bits=4, rotation="hadamard")
    torch._dynamo.reset()
    with torch.no_grad(), gemm_mode("decode"):
        torch.testing.assert_close(torch.compile(q, backend="aot_eager", fullgraph=True)(x), q(x))


# -- QuantLinear ----------------------------------------------------------------------------------------------
def layer(act_bits=4, rotation=None, smooth=False, bits=4, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N)
    codes, buffers, _ = tlq_quantize(lin.weight.detach(), bits, None, etas=(0.0, 0.02), percentiles=(0.99, 1.0),
                                     bottoms=(0.0,))
    act = ActTransform(K, smooth=smooth, rotation=rotation, act_bits=act_bits, zero_point=True)
    if smooth:
        act.smooth.uniform_(0.5, 2)
    if rotation == "hadamard":
        act.signs.copy_(torch.randint(0, 2, (K,)) * 2 - 1)
    return QuantLinear.from_linear_codes(lin, codes, buffers, "tlq", bits, None, act=act).eval()


def composition(q, x, w):
    """The float definition: x_hat = the transformed input fake-quantized on the zero-point grid, then x_hat·wᵀ + b."""
    xt = reference.transform_act(x, *_act_args(q.act))
    return F.linear(quantize_per_token(xt, q.act.act_bits, zero_point=True), w, q.bias)


@pytest.mark.parametrize("mode", ["decode", "int8"])
@pytest.mark.parametrize("cfg", [{}, {"rotation": "hadamard", "smooth": True}, {"act_bits": 8}],
                         ids=["a4", "smooth-hadamard-a4", "a8"])
def test_quant_linear_runs_the_integer_path_and_matches_the_definition(cfg, mode):
    """The fused path (integer codes, the GEMM on them, minus offset ⊗ row sums of the weight the mode uses)
    computes the zero-point layer's definition; the symmetric grid gives a different answer."""
    q = layer(**cfg)
    x = torch.randn(2, 9, K) + 0.7                   # not centred: the offsets are far from zero
    with torch.no_grad(), gemm_mode(mode):
        got = q(x)
        w = reference.decode_weight(q.qweight, K, "tlq", q.scales, q.grid, q.eta, q.bits, None, mode)
        want = composition(q, x, w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        q.act.zero_point = False
        sym = q(x)
        q.act.zero_point = True
    assert (sym - want).abs().max() > 10 * (got - want).abs().max()
    with gemm_mode(mode):                            # the differentiable composition gives the same values
        xg = x.clone().requires_grad_()
        torch.testing.assert_close(q(xg), got, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_row_sums_follow_the_weights():
    """The row sums are cached per layer and mode, and rebuilt when the codes change in place."""
    q = layer()
    x = torch.randn(5, K) + 1
    with torch.no_grad(), gemm_mode("decode"):
        before = q(x)
        q.qweight.copy_(layer(seed=3).qweight)
        after = q(x)
        w = reference.decode_weight(q.qweight, K, "tlq", q.scales, q.grid, q.eta, q.bits, None, "decode")
    torch.testing.assert_close(after, composition(q, x, w), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


# -- the format -------------------------------------------------------------------------------------------
def test_spec_names_the_zero_point_only_when_set():
    t = ActTransform(16, act_bits=4, zero_point=True)
    assert t.spec()["zero_point"] is True and t.describe() == "a4-asym"
    assert ActTransform.from_spec(t.spec(), 16).zero_point
    plain = ActTransform(16, act_bits=4)
    assert "zero_point" not in plain.spec()            # symmetric artifacts read by earlier versions as before
    assert not ActTransform.from_spec(plain.spec(), 16).zero_point
    with pytest.raises(ValueError, match="zero_point must be true or false"):
        ActTransform.from_spec({"act_bits": 4, "zero_point": "yes"}, 16)


FRESH = """
import sys, torch
from diffusers import FluxTransformer2DModel
from dicompress.arch import adapter_for
m = FluxTransformer2DModel.from_pretrained(sys.argv[1]).eval()
kw = adapter_for(m).synthetic_inputs(m, 2, torch.Generator().manual_seed(5))
with torch.no_grad():
    torch.save(m(**kw).sample, sys.argv[2])
n = sum(1 for x in m.modules() if getattr(getattr(x, "act", None), "zero_point", False))
print("ZP", n)
"""


def test_act_quant_zero_point_round_trips_through_from_pretrained_in_a_fresh_process(small_flux_store, tmp_path):
    model = small_flux()
    state = dicompress.compress(model, [{"ars": {"transform": "hadamard"}}, {"tlq": {"bits": 4, "gptq": True}},
                                        {"act_quant": {"bits": 4, "zero_point": True}}],
                                calibration=small_flux_store, progress=False)
    acts = [m.act for m in model.modules() if isinstance(m, QuantLinear) and m.act is not None]
    assert acts and all(a.zero_point and a.act_bits == 4 for a in acts)
    assert state.report["passes"][-1]["zero_point_layers"] == len(acts)
    dicompress.save(state, tmp_path / "a")
    kw = adapter_for(model).synthetic_inputs(model, 2, torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(**kw).sample
    proc = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "a"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ZP {len(acts)}" in proc.stdout
    assert torch.equal(torch.load(tmp_path / "y.pt"), out)


# -- choosing the grid per input --------------------------------------------------------------------------
AUTO = {"w_bits": 4, "a_bits": 4, "block": 16, "steps": 32, "alphas": [0.5], "candidates": ["none", "hadamard"]}


def test_lrq_auto_scores_both_grids_and_act_quant_keeps_the_choice(small_flux_store):
    model = small_flux()
    state = dicompress.compress(model, [{"lrq_auto": {**AUTO, "zero_points": [False, True]}},
                                        {"tlq": {"bits": 4}}, {"act_quant": {"bits": 4}}],
                                calibration=small_flux_store, progress=False)
    rows = [r for r in state.report["layers"] if r["method"] == "lrq_auto"]
    for r in rows:
        tried = r["candidates_sqnr_db"]
        assert set(tried) == {"none", "none+zp", "hadamard", "hadamard+zp"}
        assert r["output_sqnr_db"] == max(v for v in tried.values() if v is not None)
        assert r["act_zero_point"] == r["choice"].endswith("+zp")
        assert model.get_submodule(r["module"]).act.zero_point == r["act_zero_point"]
    # ff.net.2 reads a GELU output: one-sided, so its grid is the zero-point one
    assert next(r for r in rows if r["module"] == "transformer_blocks.0.ff.net.2")["act_zero_point"]
    auto = next(p for p in state.report["passes"] if p["pass"] == "lrq_auto")
    assert auto["zero_points"] == [False, True]
    # the pooled SQNR of the choices can only beat one candidate everywhere (each group takes its least error)
    assert auto["best_uniform"] in {"none", "none+zp", "hadamard", "hadamard+zp"}
    assert auto["choice_gain_db"] >= 0 and auto["output_sqnr_db"] >= auto["best_uniform_sqnr_db"]
    assert state.report["passes"][-1]["zero_point_layers"] == sum(r["act_zero_point"] for r in rows)


def test_act_quant_may_not_overwrite_lrq_autos_grid():
    with pytest.raises(RecipeError, match=r"act_quant.zero_point.*would overwrite"):
        build_passes([{"lrq_auto": {**AUTO, "zero_points": [False, True]}}, {"tlq": {"bits": 4}},
                      {"act_quant": {"bits": 4, "zero_point": False}}])
    build_passes([{"lrq_auto": AUTO}, {"tlq": {"bits": 4}}, {"act_quant": {"bits": 4, "zero_point": True}}])
    with pytest.raises(RecipeError, match="zero_points"):
        build_passes([{"lrq_auto": {**AUTO, "zero_points": []}}])


def test_transformed_linear_carries_the_grid():
    lin = TransformedLinear.wrap(torch.nn.Linear(K, N))
    lin.act.set_act_bits(4, True)
    x = torch.randn(3, K) + 2
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(quantize_per_token(x, 4, zero_point=True), lin.weight, lin.bias))
    lin.act.set_act_bits(8)                          # None keeps the grid
    assert lin.act.zero_point
