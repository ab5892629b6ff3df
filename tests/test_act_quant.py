"""Per-token activation quantization: the pure function, the input transform module, the `act_quant` pass."""
import pytest
import torch
from diffusers import FluxTransformer2DModel
from pydantic import ValidationError
from torch import nn

import dicompress
from dicompress.errors import RecipeError
from dicompress.nn.act import ActTransform, TransformedLinear
from dicompress.nn.qlinear import QuantLinear
from dicompress.passes import PASSES, ActQuant, get_pass
from dicompress.quant.activation import check_act_bits, per_token_step, quantize_per_token
from dicompress.quant.hadamard import hadamard_matrix
from dicompress.recipe import build_passes

FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
LINEARS = 17   # quantized by default in that model: 12 in the double block, 5 in the single block


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tiny_flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX).eval()


def inputs(model, seed=1):
    from dicompress.arch import adapter_for
    return adapter_for(model).synthetic_inputs(model, 2, torch.Generator().manual_seed(seed))


def cosine(a, b):
    return float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


# -- the pure function ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 6, 8, 16])
def test_per_token_error_is_at_most_half_a_step(bits):
    x = torch.randn(3, 7, 64) * torch.logspace(-2, 2, 7)[None, :, None]    # tokens of very different scale
    x[0, 0] = 0.0
    xq = quantize_per_token(x, bits)
    step = per_token_step(x, bits)
    assert xq.shape == x.shape and xq.dtype == x.dtype
    fp32_slack = 4 * torch.finfo(torch.float32).eps * x.abs().amax(-1, keepdim=True)   # matters at 16 bits
    assert ((xq - x).abs() <= step / 2 + fp32_slack).all()
    assert torch.equal(xq[0, 0], torch.zeros(64))                         # an all-zero token stays zero
    levels = (xq / torch.where(step > 0, step, 1)).round()
    assert levels.abs().max() <= 2 ** (bits - 1) - 1                       # symmetric grid, no -2^(b-1)
    assert torch.allclose(xq.abs().amax(-1), x.abs().amax(-1), rtol=1e-6)   # the token's max is on the grid


def test_per_token_keeps_low_precision_dtype():
    x = torch.randn(4, 32).to(torch.bfloat16)
    xq = quantize_per_token(x, 8)
    assert xq.dtype == torch.bfloat16
    assert (xq.float() - x.float()).abs().max() <= per_token_step(x, 8).max()


@pytest.mark.parametrize("bad", [1, 17, 0, 8.0, True, "8"])
def test_act_bits_out_of_range(bad):
    with pytest.raises(ValueError, match="2..16"):
        check_act_bits(bad)
    with pytest.raises(ValueError, match="2..16"):
        quantize_per_token(torch.ones(2, 4), bad)


# -- the input transform ---------------------------------------------------------------------------
def filled_transform(n=24):
    t = ActTransform(n)
    t.set_smooth(torch.rand(n) + 0.5)
    t.set_hadamard(torch.randint(0, 2, (n,)) * 2 - 1)
    t.set_act_bits(6)
    return t


def test_transform_math_matches_its_definition():
    t = filled_transform()
    x = torch.randn(5, 24)
    q = t.signs.float()[:, None] * hadamard_matrix(24)                    # Q = diag(signs) H
    want = quantize_per_token((x / t.smooth) @ q, 6)
    torch.testing.assert_close(t(x), want, atol=1e-5, rtol=1e-5)
    dense = ActTransform(24)
    dense.set_dense(torch.linalg.qr(torch.randn(24, 24))[0])
    torch.testing.assert_close(dense(x), x @ dense.rotation)
    assert ActTransform(24)(x) is x                                        # identity costs nothing


def test_spec_rebuilds_empty_module_of_the_same_format():
    t = filled_transform()
    spec = t.spec()
    assert spec == {"smooth": True, "rotation": "hadamard", "act_bits": 6, "granularity": "token"}
    empty = ActTransform.from_spec(spec, 24, device="meta")
    assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == \
           {k: (v.shape, v.dtype) for k, v in t.state_dict().items()} == \
           {"smooth": ((24,), torch.float32), "signs": ((24,), torch.int8)}
    assert empty.act_bits == 6 and empty.describe() == t.describe() == "smooth+hadamard+a6"
    dense = ActTransform.from_spec({"rotation": "dense"}, 8, device="cpu")
    assert dense.rotation.shape == (8, 8) and dense.rotation.dtype == torch.float32


@pytest.mark.parametrize("spec,match", [
    ({"smooth": True, "colour": 1}, "colour"),
    ({"rotation": "givens"}, "givens"),
    ({"act_bits": 17}, "2..16"),
    ({"granularity": "tensor"}, "granularity"),
])
def test_bad_spec(spec, match):
    with pytest.raises(ValueError, match=match):
        ActTransform.from_spec(spec, 8)


def test_hadamard_on_a_width_without_one():
    with pytest.raises(ValueError, match="no Hadamard matrix of order 18"):
        ActTransform(18).set_hadamard(torch.ones(18))


def test_smoothing_after_rotation_is_refused():
    t = ActTransform(8)
    t.set_hadamard(torch.ones(8))
    with pytest.raises(ValueError, match="before any rotation"):
        t.set_smooth(torch.ones(8))


# -- the pass ----------------------------------------------------------------------------------------
def test_registered_and_validated():
    assert PASSES["act_quant"] is ActQuant and get_pass("act_quant") is ActQuant
    assert ActQuant(bits=8).config.granularity == "token"
    for kwargs, match in [({"bits": 1}, "bits"), ({"bits": 17}, "bits"), ({"bits": 8, "granularity": "tensor"},
                          "granularity"), ({"bits": 8, "colour": 1}, "colour")]:
        with pytest.raises(ValidationError, match=match):
            ActQuant(**kwargs)
    with pytest.raises(RecipeError, match=r"passes\[0\].act_quant.bits"):
        build_passes([{"act_quant": {"bits": 17}}])


def test_w16a8_round_trips_through_diffusers(tmp_path):
    model = tiny_flux()
    kw = inputs(model)
    with torch.no_grad():
        ref = model(**kw).sample
    state = dicompress.compress(model, [ActQuant(bits=8)], progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, TransformedLinear)}
    assert len(layers) == LINEARS and all(m.act.describe() == "a8" for m in layers.values())
    assert type(model.transformer_blocks[0].norm1.linear) is nn.Linear and type(model.proj_out) is nn.Linear
    assert [e["op"] for e in state.manifest] == ["act"] * LINEARS
    assert state.report["passes"][-1]["layers_act_quantized"] == LINEARS
    with torch.no_grad():
        out = model(**kw).sample
    assert 0.99 < cosine(out, ref) < 1.0
    dicompress.save(state, tmp_path / "a")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "a")
    assert isinstance(loaded.transformer_blocks[0].attn.to_q, TransformedLinear)
    with torch.no_grad():
        assert torch.equal(loaded(**kw).sample, out)


def test_after_the_weight_quantizer(tmp_path):
    model = tiny_flux()
    kw = inputs(model)
    state = dicompress.compress(model, [{"rtn": {"bits": 8}}, {"act_quant": {"bits": 6, "keep": ["*norm*", "*ff*"]}}],
                                progress=False)
    q = model.transformer_blocks[0].attn.to_q
    assert isinstance(q, QuantLinear) and q.act.act_bits == 6
    assert model.transformer_blocks[0].ff.net[2].act is None                # kept by `*ff*`
    assert [e["op"] for e in state.manifest].count("act") == LINEARS - 4
    dicompress.save(state, tmp_path / "a")
    with torch.no_grad():
        out = model(**kw).sample
        assert torch.equal(dicompress.load(tmp_path / "a")(**kw).sample, out)


def test_order_rules():
    with pytest.raises(RecipeError, match=r"passes\[1\].act_quant.*already quantized"):
        build_passes([{"act_quant": {"bits": 8}}, {"act_quant": {"bits": 4}}])
    with pytest.raises(RecipeError, match=r"passes\[1\].ars.*before passes\[0\].act_quant"):
        build_passes([{"act_quant": {"bits": 8}}, {"ars": {}}])
    assert [p.name for p in build_passes([{"tlq": {"bits": 4}}, {"act_quant": {"bits": 8}}])] == ["tlq", "act_quant"]
