from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxTransformer2DModel
from pydantic import ValidationError
from torch import nn

from dicompress.errors import RecipeError
from dicompress.nn.qlinear import QuantLinear
from dicompress.passes import PASSES, RTN, TLQ, get_pass
from dicompress.state import CompressionState

ADAPTER = SimpleNamespace(quant_include=("transformer_blocks.*", "single_transformer_blocks.*"),
                          quant_keep=("*norm*",))
# 12 linears in the double block and 5 in the single block, minus the AdaLN `norm*.linear`s
EXPECTED = 17


def tiny_flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()


def run(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(hidden_states=torch.randn(2, 16, 4, generator=g),
                     encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                     pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.3, 0.8]),
                     img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), return_dict=False)[0]


def cosine(a, b):
    return float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("cls,codec", [(TLQ, "tlq"), (RTN, "uniform")])
def test_pass_replaces_records_and_keeps_the_model_working(cls, codec):
    model = tiny_flux()
    ref = run(model)
    bias_before = model.transformer_blocks[0].attn.to_q.bias.detach().clone()
    state = CompressionState(model=model, adapter=ADAPTER, progress=False)
    cls(bits=8).apply(state)

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == EXPECTED
    assert "transformer_blocks.0.attn.to_q" in quantized and "single_transformer_blocks.0.proj_out" in quantized
    assert type(model.transformer_blocks[0].norm1.linear) is nn.Linear            # kept by `*norm*`
    assert type(model.proj_out) is nn.Linear and type(model.x_embedder) is nn.Linear   # not included
    assert torch.equal(quantized["transformer_blocks.0.attn.to_q"].bias, bias_before)

    assert [e["module"] for e in state.manifest] == list(quantized)
    e = state.manifest[0]
    assert e["op"] == "quantize" and e["codec"] == codec and e["bits"] == 8 and e["group_size"] is None

    report = state.report["passes"][-1]
    assert report["pass"] == cls.name and report["layers_quantized"] == EXPECTED
    assert report["min_sqnr_db"] > 35 and report["mean_sqnr_db"] >= report["min_sqnr_db"]
    rows = state.report["layers"]
    assert len(rows) == EXPECTED and set(rows[0]) == {"module", "method", "bits", "group_size", "eta",
                                                      "percentile", "sqnr_db", "shape"}
    assert rows[0]["method"] == cls.name and (rows[0]["eta"] is not None) == (cls is TLQ)
    assert cosine(run(model), ref) > 0.99


def test_group_granularity_and_include_keep_overrides():
    model = tiny_flux()
    ref = run(model)
    state = CompressionState(model=model, adapter=ADAPTER, progress=False)
    TLQ(bits=4, granularity="group", group_size=64, include=["*proj_out", "*ff.net.2"],
        keep=["proj_out"]).apply(state)
    names = [e["module"] for e in state.manifest]
    assert names == ["transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_out"]
    q = model.single_transformer_blocks[0].proj_out                       # in_features 160 -> 3 groups of 64
    assert q.group_size == 64 and q.scales.shape == (32, 3) and state.manifest[1]["group_size"] == 64
    assert state.report["layers"][1]["shape"] == [32, 160]
    assert cosine(run(model), ref) > 0.95


def test_no_match_names_the_keys():
    state = CompressionState(model=tiny_flux(), adapter=ADAPTER, progress=False)
    with pytest.raises(RecipeError, match="include") as e:
        RTN(bits=4, include=["nothing.*"]).apply(state)
    assert "keep" in str(e.value)
    assert state.manifest == []


def test_registered_by_name():
    assert PASSES["tlq"] is TLQ and get_pass("rtn") is RTN
    assert TLQ(bits=4).config.granularity == "channel"
    assert RTN({"bits": 3, "granularity": "group"}).config.effective_group_size == 128


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 9}, "bits"),
    ({"bits": 1}, "bits"),
    ({"bits": 4, "colour": "red"}, "colour"),
    ({"bits": 4, "granularity": "group", "group_size": 32}, "group_size"),
    ({"bits": 4, "group_size": 64}, "granularity: group"),
    ({"bits": 4, "granularity": "tensor"}, "granularity"),
    ({"bits": 4, "percentiles": [0.5, 1.2]}, "percentiles"),
    ({"bits": 4, "etas": [-0.1]}, "etas"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        TLQ(**kwargs)


def test_rtn_has_no_tlq_keys():
    with pytest.raises(ValidationError, match="etas"):
        RTN(bits=4, etas=[0.1])
