"""TLQ grid chosen by output error after GPTQ (quant/tlq_output.py, tlq grid_search: output)."""
import pytest
import torch
from diffusers import FluxTransformer2DModel

import dicompress
from dicompress.arch import adapter_for
from dicompress.calib import capture
from dicompress.errors import RecipeError
from dicompress.quant.gptq import gptq_codes
from dicompress.quant.tlq import tlq_assign, tlq_column_quantizer, tlq_dequantize, tlq_quantize
from dicompress.quant.tlq_output import gptq_candidate_errors, row_output_errors, tlq_output_quantize
from dicompress.recipe import CalibrationConfig, parse_recipe

FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
ETAS = (0.0, 0.05, 0.3, 2.0)
PCTS = (0.99, 1.0)
BOTS = (0.0, 0.1)


def correlated_hessian(n: int, rank: int = 6, seed: int = 0) -> torch.Tensor:
    """H = XᵀX/m of inputs near a low-rank subspace with uneven channel energy: strong correlations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, rank, generator=g) @ torch.randn(rank, n, generator=g)
    x = (x + 0.05 * torch.randn(1024, n, generator=g)) * torch.rand(n, generator=g).add(0.2)
    return x.T @ x / x.shape[0]


def output_error(w, codes, buffers, bits, h):
    return float(row_output_errors(w, tlq_dequantize(codes, buffers, bits, None), h).sum())


@pytest.mark.parametrize("bits", [3, 4])
def test_output_search_beats_weight_mse_choice_after_gptq(bits):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g) * 0.02
    w[:, :4] *= 6                                               # outlier input channels: clipping trade-offs
    h = correlated_hessian(64)
    _, wb, _ = tlq_quantize(w, bits, None, etas=ETAS, percentiles=PCTS, bottoms=BOTS)
    by_weight = output_error(w, gptq_codes(w, h, tlq_column_quantizer(wb, bits, None)), wb, bits, h)
    codes, ob, info = tlq_output_quantize(w, bits, None, h, etas=ETAS, percentiles=PCTS, bottoms=BOTS)
    by_output = output_error(w, gptq_codes(w, h, tlq_column_quantizer(ob, bits, None)), ob, bits, h)
    assert by_output < 0.95 * by_weight
    # the report's numbers are those same errors (every row scored here)
    rep = info["report"]
    assert rep["output_error_weight_mse_grid"] == pytest.approx(by_weight, rel=1e-6)
    assert rep["output_error_chosen_grid"] == pytest.approx(by_output, rel=1e-6)
    assert rep["grid_search_gain_db"] > 0.2
    # tlq's format: nearest-rounding codes on the returned grid, eta one of the candidates
    assert info["eta"] in ETAS and ob["grid"].dtype == torch.float16 and ob["grid"].shape == (48, 4)
    assert torch.equal(codes, tlq_assign(w / ob["scales"].float(), ob["grid"], ob["eta"][0], bits))


def test_stacked_candidates_equal_separate_gptq_runs():
    """GPTQ is row-independent given H: candidates run as extra rows give each one's own GPTQ codes."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 32, generator=g) * 0.05
    h = correlated_hessian(32, seed=3)
    grids = []
    for eta_p in (0.99, 1.0):
        _, b, _ = tlq_quantize(w, 3, None, etas=(0.1,), percentiles=(eta_p,), bottoms=(0.0,))
        grids.append(b["grid"])
    scales, eta = b["scales"], b["eta"]
    err, codes = gptq_candidate_errors(w, h, torch.stack(grids), scales, eta, 3, None)
    for c, grid in enumerate(grids):
        buf = {"scales": scales, "grid": grid, "eta": eta}
        alone = gptq_codes(w, h, tlq_column_quantizer(buf, 3, None))
        assert torch.equal(codes[c], alone)
        torch.testing.assert_close(err[c], row_output_errors(w, tlq_dequantize(alone, buf, 3, None), h))


def test_row_subsample_and_shortlist():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(40, 32, generator=g) * 0.03
    h = correlated_hessian(32, seed=5)
    for shortlist in (1, 2):
        codes, buf, info = tlq_output_quantize(w, 3, None, h, etas=ETAS, percentiles=PCTS, bottoms=BOTS,
                                               sample_rows=16, shortlist=shortlist)
        rep = info["report"]
        assert rep["grid_search_rows_scored"] == 16
        assert rep["output_error_chosen_grid"] <= rep["output_error_weight_mse_grid"] * (1 + 1e-9)
        # whichever grid is kept (the search's, or the weight-MSE one when the shortlist loses), the codes are
        # its nearest rounding
        assert torch.equal(codes, tlq_assign(w / buf["scales"].float(), buf["grid"], buf["eta"][0], 3))


def test_recipe_needs_gptq():
    base = {"model": "zoo:tiny-flux-digits", "output": "out/x", "calibration": {"source": "synthetic"}}
    with pytest.raises(RecipeError, match="gptq: true"):
        parse_recipe({**base, "passes": [{"tlq": {"bits": 4, "grid_search": "output"}}]}, "r.yaml")
    with pytest.raises(RecipeError, match="grid_search"):
        parse_recipe({**base, "passes": [{"tlq": {"bits": 4, "gptq": True, "grid_search": "mse"}}]}, "r.yaml")


def test_pass_reports_both_choices(tmp_path):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX).eval()
    cfg = CalibrationConfig(source="synthetic", seeds=[0], steps=1, batch_size=1)
    store = capture(model, adapter_for(model), cfg, {"name": "t", "path": tmp_path}, tmp_path / "s",
                    block_inputs=True, progress=False)
    state = dicompress.compress(model, [{"tlq": {"bits": 3, "gptq": True, "grid_search": "output",
                                                 "etas": [0.05, 2.0], "percentiles": [0.99, 1.0]}}],
                                calibration=store, progress=False)
    rows = [r for r in state.report["layers"] if "output_sqnr_db" in r]
    assert rows and all(r["eta"] in (0.05, 2.0) and r["output_error_chosen_grid"]
                        <= r["output_error_weight_mse_grid"] * (1 + 1e-9) for r in rows)
