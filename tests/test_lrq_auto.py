"""lrq_auto: per-InputGroup transform chosen by the quantized output error; the error math, the choice, the artifact."""
import pytest
import torch
import yaml
from click.testing import CliRunner
from diffusers import FluxTransformer2DModel
from torch import nn

import dicompress
from conftest import small_flux
from dicompress.arch import adapter_for
from dicompress.calib.linear_inputs import block_linear_inputs
from dicompress.cli import main
from dicompress.errors import RecipeError
from dicompress.kernels.dispatch import gemm_mode
from dicompress.nn.qlinear import QuantLinear
from dicompress.passes.lrq_auto import GRIDS, expand
from dicompress.quant.hadamard import apply_hadamard, random_signs
from dicompress.quant.output_error import quantized_output_error
from dicompress.recipe import build_passes

AUTO = {"w_bits": 4, "a_bits": 4, "block": 16, "steps": 32, "alphas": [0.5]}


@pytest.fixture
def store(small_flux_store):
    return small_flux_store


def run(model, seed=5):
    kw = adapter_for(model).synthetic_inputs(model, 2, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(**kw).sample, kw


def rows(state):
    return [r for r in state.report["layers"] if r["method"] == "lrq_auto"]


# -- the error math on plain tensors ------------------------------------------------------------------------
def test_rotation_lowers_the_a4_error_of_an_outlier_channel():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 64, generator=g), torch.randn(32, 64, generator=g) / 8
    x[:, 5] *= 60                                           # one channel fires in every token, as in DiTs
    grid = GRIDS["tlq"]
    plain, signal = quantized_output_error(x, w, x, w, 4, 4, grid)
    signs = random_signs(64, 1).double()
    rot, signal_rot = quantized_output_error(x, w, apply_hadamard(x.double() * signs),
                                             apply_hadamard(w.double() * signs), 4, 4, grid)
    assert signal_rot == pytest.approx(signal)             # the reference is the float layer either way
    assert rot < plain / 2                                  # the outlier no longer sets every token's step
    exact, _ = quantized_output_error(x, w, x, w, 8, None, grid)
    assert exact < plain / 100                              # float activations, 8-bit weights: small error
    gptq, _ = quantized_output_error(x, w, x, w, 4, None, grid, gptq=True)
    rounding, _ = quantized_output_error(x, w, x, w, 4, None, grid)
    assert gptq < rounding                                  # GPTQ minimises exactly this error


def test_candidates_expand_per_alpha():
    got = expand(("none", "smooth", "hadamard", "smooth+outlier_aware"), (0.3, 0.5))
    assert got == [("none", None, None), ("smooth@0.3", 0.3, None), ("smooth@0.5", 0.5, None),
                   ("hadamard", None, "hadamard"), ("smooth+outlier_aware@0.3", 0.3, "outlier_aware"),
                   ("smooth+outlier_aware@0.5", 0.5, "outlier_aware")]


# -- the pass on a real diffusers model ---------------------------------------------------------------------
def test_choices_are_the_least_error_exact_and_applied(store):
    model = small_flux()
    ref, _ = run(model)
    auto = {**AUTO, "candidates": ["none", "smooth", "hadamard", "outlier_aware"]}
    state = dicompress.compress(model, [{"lrq_auto": auto}], calibration=store, progress=False)
    out, _ = run(model)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)      # transforms alone change nothing
    r = rows(state)
    assert len(r) == 17
    for row in r:
        tried = {k: v for k, v in row["candidates_sqnr_db"].items() if v is not None}
        assert len(tried) == 4 and row["output_sqnr_db"] == max(tried.values())
        mates = [o for o in r if o["group"] == row["group"]]
        assert {o["choice"] for o in mates} == {row["choice"]}     # one tensor, one transform
        act = getattr(model.get_submodule(row["module"]), "act", None)
        kind = {"none": None, "hadamard": "hadamard", "outlier_aware": "dense"}[row["transform"]]
        assert (act.rotation_kind if act is not None else None) == kind
        if row["alpha"] is None:
            assert act is None or not act.has_smooth
    choices = state.report["passes"][-1]["choices"]
    assert sum(choices.values()) == len({o["group"] for o in r})
    assert any(k != "none" for k in choices)                       # at A4 some group needs a transform


def test_reported_error_is_the_quantized_layers_error(store, tmp_path):
    """With nearest-rounding TLQ after it, the error lrq_auto reported for a linear is the error the quantized
    layer makes on the same calibration tokens (every token sampled: rows_per_call above any call's size)."""
    name = "transformer_blocks.0.ff.net.2"                             # a group of its own
    original = small_flux()
    block = original.transformer_blocks[0]
    lin = block.ff.net[2]
    x = block_linear_inputs(block, adapter_for(original), store.iter_block_inputs("transformer_blocks.0"),
                            {name: lin}, rows_per_call=10 ** 6)[name]
    model = small_flux()
    state = dicompress.compress(model, [{"lrq_auto": {**AUTO, "rows_per_call": 10 ** 6,
                                                      "candidates": ["none", "smooth+hadamard"]}}, {"tlq": {"bits": 4}},
                                        {"act_quant": {"bits": 4}}], calibration=store, progress=False)
    q = model.get_submodule(name)
    assert isinstance(q, QuantLinear)
    with torch.no_grad(), gemm_mode("decode"):          # the codec's exact weights (not the CPU's int8 mapping)
        ref, got = lin(x), q(x)
        signal = (ref - lin.bias).double().pow(2).sum()       # the error is reported against x·Wᵀ (no bias)
    sqnr = 10 * torch.log10(signal / (ref - got).double().pow(2).sum())
    row = next(r for r in rows(state) if r["module"] == name)
    assert float(sqnr) == pytest.approx(row["output_sqnr_db"], abs=0.01)

    dicompress.save(state, tmp_path / "a")
    out, kw = run(model)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(**kw).sample, out)


def test_weight_rows_sample_output_channels(store):
    one = {**AUTO, "include": ["transformer_blocks.0.ff.net.2"], "candidates": ["none", "hadamard"]}

    def errors(**kw):
        state = dicompress.compress(small_flux(), [{"lrq_auto": {**one, **kw}}], calibration=store, progress=False)
        return rows(state)[0]["candidates_sqnr_db"]
    assert errors(weight_rows=32) == errors()                     # 32 = every output channel of ff.net.2
    assert errors(weight_rows=8) != errors()


@pytest.mark.parametrize("passes,match", [
    ([{"tlq": {"bits": 4}}, {"lrq_auto": {"w_bits": 4, "a_bits": 8}}], r"passes\[1\].lrq_auto.*before passes\[0\]"),
    ([{"lrq_auto": {"w_bits": 4, "a_bits": 8}}, {"smooth": {}}], r"passes\[1\].smooth.*before passes\[0\]"),
    ([{"lrq_auto": {"w_bits": 4, "a_bits": 8}}, {"ars": {}}], r"passes\[1\].ars.*before passes\[0\]"),
    ([{"smooth": {}}, {"lrq_auto": {"w_bits": 4, "a_bits": 8}}], r"passes\[1\].lrq_auto"),
    ([{"lrq_auto": {"w_bits": 4}}], r"passes\[0\].lrq_auto.a_bits"),
    ([{"lrq_auto": {"w_bits": 4, "a_bits": 8, "candidates": ["rotate"]}}], r"passes\[0\].lrq_auto.candidates"),
    ([{"lrq_auto": {"w_bits": 4, "a_bits": 8, "alphas": [1.5]}}], r"passes\[0\].lrq_auto.alphas"),
])
def test_order_and_config_rules(passes, match):
    with pytest.raises(RecipeError, match=match):
        build_passes(passes)


W4A4 = {"w_bits": 4, "a_bits": 4}


@pytest.mark.parametrize("passes,match", [
    ([{"lrq_auto": W4A4}, {"tlq": {"bits": 3}}, {"act_quant": {"bits": 4}}],
     r"passes\[1\].tlq.bits: 3, but passes\[0\].lrq_auto chose its transforms for w_bits: 4"),
    ([{"lrq_auto": W4A4}, {"act_quant": {"bits": 4}}, {"rtn": {"bits": 8}}], r"passes\[2\].rtn: .*the tlq grid"),
    ([{"lrq_auto": {**W4A4, "weight_quantizer": "rtn"}}, {"rtn": {"bits": 3}}, {"act_quant": {"bits": 4}}],
     r"passes\[1\].rtn.bits: 3.*w_bits: 4"),
    ([{"lrq_auto": W4A4}, {"tlq": {"bits": 4}}, {"act_quant": {"bits": 8}}],
     r"passes\[2\].act_quant.bits: 8, but .*a_bits: 4; .*lrq_auto.a_bits: 8 or act_quant.bits: 4"),
    ([{"lrq_auto": {**W4A4, "a_bits": None}}, {"tlq": {"bits": 4}}, {"act_quant": {"bits": 8}}],
     r"passes\[2\].act_quant.bits: 8, but .*float activations \(a_bits: null\)"),
    ([{"lrq_auto": W4A4}, {"tlq": {"bits": 4, "gptq": True}}],
     r"passes\[0\].lrq_auto.a_bits: 4 .* no act_quant follows"),
])
def test_later_passes_must_use_the_bits_and_grid_lrq_auto_chose_for(passes, match):
    with pytest.raises(RecipeError, match=match):
        build_passes(passes)


def test_recipes_that_agree_with_lrq_auto_small_flux():
    for passes in ([{"lrq_auto": W4A4}, {"tlq": {"bits": 4}}, {"act_quant": {"bits": 4}}],
                   [{"lrq_auto": W4A4}, {"act_quant": {"bits": 4}}, {"tlq": {"bits": 4, "gptq": True}}],
                   [{"lrq_auto": {**W4A4, "a_bits": None, "weight_quantizer": "rtn"}}, {"rtn": {"bits": 4}}],
                   [{"lrq_auto": W4A4}, {"tlq": {"bits": "auto", "budget": {"avg_bits": 3.5}}},   # widths later
                    {"act_quant": {"bits": 4}}],
                   [{"lrq_auto": W4A4}],                      # transforms alone (an analysis or a first stage)
                   [{"tlq": {"bits": 3}}, {"act_quant": {"bits": 8}}]):     # no lrq_auto: nothing to agree with
        assert [next(iter(p)) for p in passes] == [p.name for p in build_passes(passes)]


def test_dry_run_names_the_disagreeing_keys(tmp_path):
    recipe = {"model": "zoo:tiny-flux-digits", "output": str(tmp_path / "art"),
              "calibration": {"source": "classes", "classes": [0], "seeds": [0], "steps": 2},
              "passes": [{"lrq_auto": W4A4}, {"tlq": {"bits": 3, "gptq": True}}, {"act_quant": {"bits": 8}}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = CliRunner().invoke(main, ["run", str(path), "--dry-run"], catch_exceptions=False)
    assert r.exit_code == 2 and "2 problems" in r.output
    assert "r.yaml:passes[1].tlq.bits: 3, but passes[0].lrq_auto chose its transforms for w_bits: 4" in r.output
    assert "r.yaml:passes[2].act_quant.bits: 8, but passes[0].lrq_auto chose its transforms for a_bits: 4" in r.output


def test_a_width_no_candidate_fits_is_an_error_before_any_change(store):
    model = small_flux()
    with pytest.raises(RecipeError, match="no candidate fits"):
        dicompress.compress(model, [{"lrq_auto": {**AUTO, "block": 48, "candidates": ["outlier_aware"]}}],
                            calibration=store, progress=False)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("to_q"))
