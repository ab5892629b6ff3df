"""GPTQ error feedback on fixed TLQ / RTN grids: the math on plain tensors, the Hessians, the pass option."""
import pytest
import torch
from diffusers import FluxTransformer2DModel

import dicompress
from dicompress.arch import adapter_for
from dicompress.calib import capture
from dicompress.calib.hessian import block_hessians, hessian_phases, weight_basis
from dicompress.errors import CalibrationError, RecipeError
from dicompress.quant.gptq import gptq_codes, output_sqnr_db
from dicompress.quant.tlq import tlq_column_quantizer, tlq_dequantize, tlq_quantize
from dicompress.quant.uniform import rtn_column_quantizer, rtn_dequantize, rtn_quantize
from dicompress.recipe import CalibrationConfig, parse_recipe

FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
CODECS = {"tlq": (tlq_quantize, tlq_column_quantizer, tlq_dequantize),
          "rtn": (rtn_quantize, rtn_column_quantizer, rtn_dequantize)}


def correlated_inputs(n_in: int, rows: int = 2048, rank: int = 8, seed: int = 0) -> torch.Tensor:
    """Inputs that live near a low-rank subspace, as DiT activations do (GPTQ has room to compensate)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, n_in, generator=g)
    return torch.randn(rows, rank, generator=g) @ basis + 0.05 * torch.randn(rows, n_in, generator=g)


@pytest.mark.parametrize("codec", ["tlq", "rtn"])
@pytest.mark.parametrize("group_size", [None, 64])
def test_column_quantizer_is_nearest_rounding(codec, group_size):
    quantize, column, decode = CODECS[codec]
    w = torch.randn(24, 128) * 0.05
    codes, buffers, _ = quantize(w, 4, group_size)
    q = column(buffers, 4, group_size)
    for i in (0, 63, 64, 127):
        c, v = q(w[:, i], i)
        assert torch.equal(c, codes[:, i])
        assert torch.allclose(v, decode(codes, buffers, 4, group_size)[:, i])


@pytest.mark.parametrize("codec", ["tlq", "rtn"])
def test_identity_hessian_gives_rounding(codec):
    """With H = I no column's error can be compensated by another: GPTQ must equal plain rounding."""
    quantize, column, _ = CODECS[codec]
    w = torch.randn(16, 96) * 0.1
    codes, buffers, _ = quantize(w, 4, None)
    assert torch.equal(gptq_codes(w, torch.eye(96), column(buffers, 4, None), act_order=False), codes)


@pytest.mark.parametrize("codec,bits,group_size", [("tlq", 4, None), ("tlq", 3, 64), ("rtn", 4, None)])
def test_gptq_lowers_output_error_on_correlated_inputs(codec, bits, group_size):
    quantize, column, decode = CODECS[codec]
    torch.manual_seed(1)
    w = torch.randn(64, 128) * 0.02
    x = correlated_inputs(128)
    h = x.T @ x / x.shape[0]
    codes, buffers, _ = quantize(w, bits, group_size)
    plain = output_sqnr_db(w, decode(codes, buffers, bits, group_size), h)
    g = gptq_codes(w, h, column(buffers, bits, group_size))
    assert g.min() >= 0 and g.max() < 1 << bits                 # same code space, same decoder
    better = output_sqnr_db(w, decode(g, buffers, bits, group_size), h)
    assert better > plain + 3.0, (plain, better)


def test_dead_inputs_and_bad_hessian():
    w = torch.randn(8, 32)
    _, buffers, _ = tlq_quantize(w, 4)
    h = torch.eye(32)
    h[5, 5] = 0.0                                                 # an input that was always zero
    g = gptq_codes(w, h, tlq_column_quantizer(buffers, 4, None))
    assert g.shape == w.shape
    with pytest.raises(ValueError, match="does not match"):
        gptq_codes(w, torch.eye(31), tlq_column_quantizer(buffers, 4, None))


def test_weight_basis_is_the_stored_weights_basis(tmp_path):
    """After smooth + ars, x' = weight_basis(x) must satisfy x'·Wᵀ = linear(x): H is taken in that basis."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX).eval()
    store = capture(model, adapter_for(model), CalibrationConfig(source="synthetic", seeds=[0], steps=2, batch_size=2),
                    {"name": "t", "path": tmp_path}, tmp_path / "s", block_inputs=False, progress=False)
    dicompress.compress(model, [{"smooth": {}}, {"ars": {"transform": "hadamard"}}], calibration=store, progress=False)
    lin = model.get_submodule("transformer_blocks.0.attn.to_q")
    x = torch.randn(5, lin.in_features)
    torch.testing.assert_close(weight_basis(lin, x) @ lin.weight.T + lin.bias, lin(x), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_with_inputs(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("gptq")
    model = FluxTransformer2DModel(**FLUX).eval()
    cfg = CalibrationConfig(source="synthetic", seeds=[0, 1], steps=2, batch_size=2)
    store = capture(model, adapter_for(model), cfg, {"name": "t", "path": root}, root / "s", block_inputs=True,
                    progress=False)
    return model.state_dict(), store


def test_block_hessians_match_direct_computation(tiny_with_inputs):
    sd, store = tiny_with_inputs
    model = FluxTransformer2DModel(**FLUX).eval()
    model.load_state_dict(sd)
    lin = model.get_submodule("transformer_blocks.0.attn.to_q")
    seen = []
    h = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, m.in_features)))
    got = block_hessians(model.get_submodule("transformer_blocks.0"), adapter_for(model),
                         store.iter_block_inputs("transformer_blocks.0"),
                         {"transformer_blocks.0.attn.to_q": lin})["transformer_blocks.0.attn.to_q"]
    h.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(got.double(), (x.T.double() @ x.double()) / x.shape[0], rtol=1e-5, atol=1e-6)


def test_hessian_phases_keep_wide_layers_apart_and_cover_all():
    class L:
        def __init__(self, n):
            self.in_features = n
    lins = {"a": L(3072), "b": L(12288), "c": L(3072), "d": L(12288), "e": L(3072)}
    phases = hessian_phases(lins, budget=512 << 20)
    assert sorted(n for p in phases for n in p) == sorted(lins)
    assert ["b"] in phases and ["d"] in phases and ["a", "c", "e"] in phases
    assert hessian_phases(lins, budget=10 << 30) == [["a", "b", "c", "d", "e"]]


def test_tlq_gptq_pass_reports_output_gain(tiny_with_inputs):
    sd, store = tiny_with_inputs
    model = FluxTransformer2DModel(**FLUX).eval()
    model.load_state_dict(sd)
    state = dicompress.compress(model, [{"tlq": {"bits": 3, "gptq": True}}], calibration=store, progress=False)
    rows = [r for r in state.report["layers"] if r["method"] == "tlq"]
    assert rows and all("output_sqnr_db" in r for r in rows)
    summary = state.report["passes"][-1]
    assert summary["gptq_mean_output_gain_db"] > 0


def test_gptq_needs_block_inputs(tmp_path):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX).eval()
    stats_only = capture(model, adapter_for(model), CalibrationConfig(source="synthetic", seeds=[0], steps=1,
                                                                      batch_size=1),
                         {"name": "t", "path": tmp_path}, tmp_path / "s", block_inputs=False, progress=False)
    with pytest.raises(CalibrationError, match="block inputs"):
        dicompress.compress(model, [{"tlq": {"bits": 4, "gptq": True}}], calibration=stats_only, progress=False)
    with pytest.raises(ValueError, match="needs calibration"):
        dicompress.compress(model, [{"tlq": {"bits": 4, "gptq": True}}], progress=False)


def test_recipe_errors_name_the_key():
    base = {"model": "zoo:tiny-flux-digits", "output": "out/x"}
    with pytest.raises(RecipeError, match="calibration"):
        parse_recipe({**base, "passes": [{"tlq": {"bits": 4, "gptq": True}}]}, "r.yaml")
    with pytest.raises(RecipeError, match="gptq_damp"):
        parse_recipe({**base, "passes": [{"tlq": {"bits": 4, "gptq_damp": 0.1}}]}, "r.yaml")


def test_permute_symmetric_in_place_equals_indexing():
    from dicompress.quant.gptq import permute_symmetric_
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 37, generator=g)
    h = a @ a.T
    perm = torch.randperm(37, generator=g)
    want = h[perm][:, perm]
    got = permute_symmetric_(h, perm)
    assert got.data_ptr() == h.data_ptr() and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inverse_hessian_factor_in_place_matches_torch(dtype):
    from dicompress.quant.gptq import inverse_hessian_factor
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 48, generator=g, dtype=torch.float64)
    h = (x.T @ x / 200).to(dtype)
    d = torch.arange(48)
    damped = h.double().clone()
    damped[d, d] += 0.01 * float(damped.diagonal().mean())
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    work = h.clone()
    u = inverse_hessian_factor(work, 0.01)
    assert u.data_ptr() == work.data_ptr() and u.dtype == dtype
    torch.testing.assert_close(u.double(), want, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-5)
    assert torch.equal(u.tril(-1), torch.zeros_like(u))      # upper triangular
