"""Smoothing and the adaptive rotation scheme: pure functions, exactness on FLUX / Qwen-Image, artifacts, errors."""
import math

import pytest
import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel
from torch import nn

import dicompress
from dicompress.arch import adapter_for
from dicompress.calib import capture
from dicompress.errors import CalibrationError, ModelError, RecipeError
from dicompress.nn.act import TransformedLinear
from dicompress.nn.qlinear import QuantLinear
from dicompress.passes import ARS, Smooth
from dicompress.quant.smooth import (column_absmax, fold_into_modulated_norm_, fold_into_rows_, scale_columns_,
                                     smooth_factors)
from dicompress.recipe import CalibrationConfig, build_passes
from dicompress.state import CompressionState

FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
QWEN = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
# 3 heads of 6: hidden width 18, which is not a multiple of 4, so no Hadamard matrix of that order exists
FLUX_18 = {**FLUX, "attention_head_dim": 6, "num_attention_heads": 3, "axes_dims_rope": (2, 2, 2)}
CALIB = CalibrationConfig(source="synthetic", seeds=[0], steps=2, batch_size=2)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def build(cls, config):
    torch.manual_seed(0)
    return cls(**config).eval()


def store_for(model, root):
    """Synthetic calibration statistics of `model` (a fresh `build` of the same config has the same weights)."""
    return capture(model, adapter_for(model), CALIB, {"name": "tiny", "path": root}, root / "store",
                   block_inputs=False, progress=False)


@pytest.fixture(scope="module")
def flux_store(tmp_path_factory):
    return store_for(build(FluxTransformer2DModel, FLUX), tmp_path_factory.mktemp("flux_calib"))


@pytest.fixture(scope="module")
def qwen_store(tmp_path_factory):
    return store_for(build(QwenImageTransformer2DModel, QWEN), tmp_path_factory.mktemp("qwen_calib"))


def run(model, seed=5):
    kw = adapter_for(model).synthetic_inputs(model, 2, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(**kw).sample, kw


def cosine(a, b):
    return float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def rows(state, method):
    return [r for r in state.report["layers"] if r["method"] == method]


# -- pure functions ----------------------------------------------------------------------------------
def test_smooth_factors_formula_and_guards():
    a = torch.tensor([4.0, 1.0, 0.0, 9.0, 1e12])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0, 1e-12])
    s = smooth_factors(a, w, alpha=0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))                 # sqrt(a / w)
    assert s[2] == 1 and s[3] == 1                                         # dead channel / zero column: no-op
    assert s[4] == 1e4                                                     # clamped
    assert torch.allclose(smooth_factors(a[:2], w[:2], alpha=1.0), a[:2])   # alpha 1: all onto the weights
    with pytest.raises(ValueError, match="alpha"):
        smooth_factors(a, w, alpha=1.5)
    with pytest.raises(ValueError, match="one in_features"):
        column_absmax([torch.ones(3, 4), torch.ones(3, 5)])
    assert torch.equal(column_absmax([torch.tensor([[1.0, -3.0]]), torch.tensor([[-2.0, 1.0]])]),
                       torch.tensor([2.0, 3.0]))


def test_folds_are_exact_on_plain_tensors():
    torch.manual_seed(0)
    c, d, chunks = 8, 5, 3
    s = torch.rand(c) * 10 + 0.1
    x, e = torch.randn(4, c), torch.randn(4, d)
    w, b = torch.randn(c + 2, c), torch.randn(c + 2)
    y = x @ w.T + b
    w2 = w.clone()
    scale_columns_(w2, s)                                                  # consumer: x / s meets W·diag(s)
    torch.testing.assert_close((x / s) @ w2.T + b, y)

    v_w, v_b = torch.randn(c, d), torch.randn(c)                           # producer rows: out / s
    v = e @ v_w.T + v_b
    fold_into_rows_(v_w, v_b, s)
    torch.testing.assert_close(e @ v_w.T + v_b, v / s)

    mod_w, mod_b = torch.randn(chunks * c, d), torch.randn(chunks * c)    # AdaLN: LN(h)·γ·(1 + scale) + shift
    h, gamma = torch.randn(4, c), torch.ones(c)

    def modulated():
        shift, scale, _ = (e @ mod_w.T + mod_b).chunk(chunks, dim=1)
        return nn.functional.layer_norm(h, (c,)) * gamma * (1 + scale) + shift
    before = modulated()
    fold_into_modulated_norm_(gamma, None, mod_w[:c], mod_b[:c], s)
    torch.testing.assert_close(modulated(), before / s)


# -- the passes on real diffusers models ---------------------------------------------------------------
def test_flux_smooth_and_ars_change_nothing_without_quantization(flux_store):
    model = build(FluxTransformer2DModel, FLUX)
    ref, _ = run(model)
    dry = dicompress.compress(build(FluxTransformer2DModel, FLUX), [Smooth(), ARS(block=16)], calibration=flux_store,
                              progress=False)
    js = sorted(r["J"] for r in rows(dry, "ars"))
    threshold = (js[0] + js[-1]) / 2                                        # so both transforms are exercised
    state = dicompress.compress(model, [Smooth(), ARS(threshold=threshold, block=16)], calibration=flux_store,
                                progress=False)
    out, _ = run(model)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)

    smooth = {r["module"]: r["smoothing"] for r in rows(state, "smooth")}
    assert len(smooth) == 17
    b = "transformer_blocks.0."
    assert smooth[b + "attn.to_q"] == smooth[b + "attn.to_v"] == "fold:norm1.norm+norm1.linear[shift 0/6]"
    assert smooth[b + "ff.net.0.proj"] == "fold:norm2+norm1.linear[shift 3/6]"
    assert smooth[b + "attn.to_out.0"] == smooth[b + "attn.to_add_out"] == "fold:rows of attn.to_v+attn.add_v_proj"
    assert smooth[b + "ff.net.2"] == smooth["single_transformer_blocks.0.proj_out"] == "online"
    assert sum(v == "online" for v in smooth.values()) == 3
    norm2 = model.transformer_blocks[0].norm2
    assert type(norm2) is nn.LayerNorm and norm2.weight is not None

    ars = rows(state, "ars")
    assert len(ars) == 17 and {r["transform"] for r in ars} == {"hadamard", "outlier_aware"}
    assert all(r["transform"] == ("hadamard" if r["J"] < threshold else "outlier_aware") for r in ars)
    assert all(isinstance(m, TransformedLinear) for n, m in model.named_modules() if n in {r["module"] for r in ars})
    summary = state.report["passes"][-1]
    assert summary["hadamard"] + summary["outlier_aware"] == 17 and summary["threshold"] == threshold


def test_J_is_measured_on_the_smoothed_inputs(flux_store):
    name = "transformer_blocks.0.ff.net.2"
    raw = flux_store.linear_stats()[name]["rms"].double()
    state = dicompress.compress(build(FluxTransformer2DModel, FLUX), [ARS(block=16)], calibration=flux_store,
                                progress=False)
    assert next(r["J"] for r in rows(state, "ars") if r["module"] == name) == round(math.sqrt(raw.pow(2).mean()), 5)
    model = build(FluxTransformer2DModel, FLUX)
    state = dicompress.compress(model, [Smooth(), ARS(block=16)], calibration=flux_store, progress=False)
    s = model.get_submodule(name).act.smooth.double()                      # ff.net.2 is smoothed online
    j = next(r["J"] for r in rows(state, "ars") if r["module"] == name)
    assert j == round(math.sqrt((raw / s).pow(2).mean()), 5)


def test_flux_w4a8_round_trips_through_diffusers(flux_store, tmp_path):
    model = build(FluxTransformer2DModel, FLUX)
    ref, kw = run(model)
    state = dicompress.compress(model, [{"smooth": {"alpha": 0.5}}, {"ars": {"threshold": 0.2, "block": 16}},
                                        {"tlq": {"bits": 4}}, {"act_quant": {"bits": 8}}],
                                calibration=flux_store, progress=False)
    out, _ = run(model)
    assert cosine(out, ref) > 0.99
    q = model.transformer_blocks[0].ff.net[2]
    assert isinstance(q, QuantLinear) and q.act.describe() == "smooth+hadamard+a8"            # J 0.10 after smoothing
    assert model.transformer_blocks[0].attn.to_q.act.describe() == "dense+a8"          # J 0.29, folded smoothing
    dicompress.save(state, tmp_path / "a")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(**kw).sample, out)
    low = FluxTransformer2DModel.from_pretrained(tmp_path / "a", torch_dtype=torch.bfloat16)
    act = low.transformer_blocks[0].ff.net[2].act                           # format tensors keep their dtypes
    assert (act.smooth.dtype, act.signs.dtype) == (torch.float32, torch.int8)
    assert low.transformer_blocks[0].attn.to_q.act.rotation.dtype == torch.float32
    assert low.transformer_blocks[0].norm2.weight.dtype == torch.bfloat16   # a parameter: follows torch_dtype


def test_act_quant_after_rotation_stays_close(flux_store):
    model = build(FluxTransformer2DModel, FLUX)
    ref, _ = run(model)
    dicompress.compress(model, [Smooth(), ARS(block=16), {"act_quant": {"bits": 8}}], calibration=flux_store,
                        progress=False)
    out, _ = run(model)
    assert 0.99 < cosine(out, ref) < 1.0


def test_fold_off_keeps_every_factor_online(flux_store):
    model = build(FluxTransformer2DModel, FLUX)
    ref, _ = run(model)
    state = dicompress.compress(model, [Smooth(fold=False)], calibration=flux_store, progress=False)
    assert {r["smoothing"] for r in rows(state, "smooth")} == {"online"}
    assert [e["op"] for e in state.manifest] == ["act"] * 17
    torch.testing.assert_close(run(model)[0], ref, atol=1e-4, rtol=0)


def test_qwenimage(qwen_store):
    model = build(QwenImageTransformer2DModel, QWEN)
    ref, kw = run(model)
    state = dicompress.compress(model, [Smooth(), ARS(threshold=0.3, block=16)], calibration=qwen_store,
                                progress=False)
    torch.testing.assert_close(run(model)[0], ref, atol=1e-4, rtol=0)
    smooth = {r["module"]: r["smoothing"] for r in rows(state, "smooth")}
    assert len(smooth) == 24 and sum(v == "online" for v in smooth.values()) == 4      # the two net.2 per block
    assert smooth["transformer_blocks.1.attn.add_k_proj"] == "fold:txt_norm1+txt_mod.1[shift 0/6]"
    dicompress.compress(model, [{"tlq": {"bits": 4}}, {"act_quant": {"bits": 8}}], progress=False)
    out, _ = run(model)
    assert cosine(out, ref) > 0.98


def test_qwenimage_round_trip(qwen_store, tmp_path):
    model = build(QwenImageTransformer2DModel, QWEN)
    state = dicompress.compress(model, [Smooth(), ARS(threshold=0.3, block=16), {"tlq": {"bits": 4}},
                                        {"act_quant": {"bits": 6}}], calibration=qwen_store, progress=False)
    out, kw = run(model)
    dicompress.save(state, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(QwenImageTransformer2DModel.from_pretrained(tmp_path / "q")(**kw).sample, out)


# -- bad input -----------------------------------------------------------------------------------------
def test_rotation_on_a_width_without_hadamard_fails_before_any_change(tmp_path):
    model = build(FluxTransformer2DModel, FLUX_18)
    store = store_for(model, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = CompressionState(model=model, adapter=adapter_for(model), calibration=store, progress=False)
    with pytest.raises(RecipeError, match="no Hadamard matrix of order 18") as e:
        ARS(transform="hadamard").apply(state)
    assert "ars.keep" in str(e.value) and "single_transformer_blocks.0.proj_mlp" in str(e.value)
    with pytest.raises(RecipeError, match="not a multiple of ars.block = 128"):
        ARS(transform="outlier_aware").apply(state)
    assert state.manifest == [] and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    ARS(transform="outlier_aware", block=6, keep=["*norm*", "*ff.net.2", "*ff_context.net.2", "*proj_out"]).apply(state)
    assert {r["transform"] for r in rows(state, "ars")} == {"outlier_aware"}


def test_missing_calibration(tmp_path):
    model = build(FluxTransformer2DModel, FLUX)
    for p in (Smooth(), ARS()):
        with pytest.raises(ValueError, match="needs calibration"):
            dicompress.compress(model, [p], progress=False)
        with pytest.raises(CalibrationError, match="calibration"):
            p.apply(CompressionState(model=model, adapter=adapter_for(model), progress=False))
    from dicompress.recipe import parse_recipe
    with pytest.raises(RecipeError, match=r"passes\[0\].smooth.*calibration"):
        parse_recipe({"model": "zoo:tiny-flux-digits", "output": str(tmp_path / "o"), "passes": [{"smooth": {}}]})


def test_stats_of_another_model_are_refused(flux_store):
    model = build(QwenImageTransformer2DModel, QWEN)
    with pytest.raises(CalibrationError, match="no input statistics"):
        dicompress.compress(model, [Smooth()], calibration=flux_store, progress=False)


@pytest.mark.parametrize("passes,match", [
    ([{"tlq": {"bits": 4}}, {"smooth": {}}], r"passes\[1\].smooth.*before passes\[0\].tlq"),
    ([{"ars": {}}, {"smooth": {}}], r"passes\[1\].smooth.*before passes\[0\].ars"),
    ([{"rtn": {"bits": 8}}, {"ars": {}}], r"passes\[1\].ars.*before passes\[0\].rtn"),
    ([{"ars": {}}, {"ars": {}}], r"passes\[1\].ars"),
    ([{"ars": {"transform": "hadamard", "threshold": 2}}], "threshold applies only to transform: auto"),
    ([{"smooth": {"alpha": 2}}], r"passes\[0\].smooth.alpha"),
])
def test_order_and_config_rules(passes, match):
    with pytest.raises(RecipeError, match=match):
        build_passes(passes)


def test_declared_fold_site_that_does_not_fit_is_an_error(flux_store):
    model = build(FluxTransformer2DModel, FLUX)
    model.transformer_blocks[0].norm2 = nn.Identity()                      # not what the adapter declares
    with pytest.raises(ModelError, match="fold: false"):
        dicompress.compress(model, [Smooth()], calibration=flux_store, progress=False)
