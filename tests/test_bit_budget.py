"""bits: auto: the multiple-choice knapsack on plain numbers, byte accounting, and the tlq pass under a budget."""
import itertools
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from pydantic import ValidationError

import dicompress
from dicompress.arch import adapter_for
from dicompress.calib import capture
from dicompress.errors import RecipeError
from dicompress.nn.qlinear import QuantLinear
from dicompress.passes._bit_budget import BitBudget, budget_bytes, budget_shapes, layer_bytes
from dicompress.passes.tlq import TLQ, TLQConfig
from dicompress.quant.bit_budget import allocate, feasible_range
from dicompress.quant.tlq import tlq_dequantize, tlq_quantize
from dicompress.recipe import CalibrationConfig

FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


FAST = {"etas": [0.0, 0.05], "percentiles": [0.99, 1.0]}   # a small grid search: the test times the allocation


def brute_force(costs, errors, budget):
    best = None
    for choice in itertools.product(*[range(len(r)) for r in costs]):
        c = sum(costs[i][k] for i, k in enumerate(choice))
        e = sum(errors[i][k] for i, k in enumerate(choice))
        if c <= budget and (best is None or e < best):
            best = e
    return best


def instance(seed, layers=5, options=4):
    """Random costs rising and errors falling with the option (as bytes and error do with bits), not convex."""
    rng = np.random.default_rng(seed)
    costs = np.cumsum(rng.integers(1, 9, (layers, options)), 1)
    errors = np.cumsum(rng.exponential(1.0, (layers, options))[:, ::-1], 1)[:, ::-1]
    return costs, errors


@pytest.mark.parametrize("seed", range(6))
def test_allocate_is_the_brute_force_optimum(seed):
    costs, errors = instance(seed)
    lo, hi = feasible_range(costs)
    for budget in np.linspace(lo, hi, 9).astype(int):
        a = allocate(costs, errors, int(budget))
        assert a.cost <= budget and a.cost == sum(costs[i][k] for i, k in enumerate(a.choice))
        assert a.error == pytest.approx(brute_force(costs, errors, budget), rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_coarse_units_always_meet_the_budget(seed):
    costs, errors = instance(seed, layers=6)
    costs = costs * 997 + 13                    # large, uneven byte counts
    lo, hi = feasible_range(costs)
    for budget in np.linspace(lo, hi, 7).astype(int):
        a = allocate(costs, errors, int(budget), resolution=8)
        assert a.cost <= budget
        assert a.error >= brute_force(costs, errors, budget) - 1e-9


def test_allocate_bounds_and_forbidden_options():
    costs, errors = instance(0)
    lo, hi = feasible_range(costs)
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate(costs, errors, lo - 1)
    assert allocate(costs, errors, lo).choice == [0] * len(costs)
    assert allocate(costs, errors, hi).choice == [costs.shape[1] - 1] * len(costs)   # errors fall with cost
    errors = errors.copy()
    errors[:, 0] = np.inf                   # option 0 forbidden: the next cheapest is taken at the minimum
    assert 0 not in allocate(costs, errors, hi).choice


@pytest.mark.parametrize("group_size", [None, 64])
def test_layer_bytes_and_every_width_run(group_size):
    lin = torch.nn.Linear(136, 24)
    x = torch.randn(5, 136, generator=torch.Generator().manual_seed(0))
    for bits in range(2, 9):
        codes, buffers, _ = tlq_quantize(lin.weight.detach(), bits, group_size, **FAST)
        q = QuantLinear.from_linear_codes(lin, codes, buffers, "tlq", bits, group_size)
        assert q.weight_bytes == layer_bytes("tlq", 24, 136, bits, group_size)
        assert torch.equal(q.codes(), codes)
        w = tlq_dequantize(codes, buffers, bits, group_size)
        torch.testing.assert_close(q(x), x @ w.T + lin.bias, rtol=1e-5, atol=1e-5)
    shapes = [(24, 136), (40, 64)]
    for bits in (2, 3, 5):   # avg_bits: b is the bytes of uniform b bits
        assert budget_bytes(BitBudget(avg_bits=bits), shapes, "tlq", group_size) == \
            sum(layer_bytes("tlq", o, i, bits, group_size) for o, i in shapes)


def test_config_rules():
    assert TLQConfig(bits="auto", budget={"avg_bits": 3.5}).budget.weighting == "relative"
    for bad in [{"bits": "auto"}, {"bits": 4, "budget": {"avg_bits": 3}},
                {"bits": "auto", "budget": {"avg_bits": 3, "bytes_fraction": 0.2}},
                {"bits": "auto", "budget": {"avg_bits": 9}}, {"bits": "auto", "budget": {"bytes_fraction": 1.5}},
                {"bits": "auto", "budget": {"avg_bits": 3, "candidates": [3, 4, 9]}},
                {"bits": "auto", "budget": {"avg_bits": 3, "candidates": [4, 5]}}, {"bits": 1}]:
        with pytest.raises(ValidationError):
            TLQConfig(**bad)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("budget")
    model = FluxTransformer2DModel(**FLUX).eval()
    cfg = CalibrationConfig(source="synthetic", seeds=[0, 1], steps=2, batch_size=2)
    store = capture(model, adapter_for(model), cfg, {"name": "t", "path": root}, root / "s", block_inputs=True,
                    progress=False)
    return model.state_dict(), store


def fresh(sd):
    model = FluxTransformer2DModel(**FLUX).eval()
    model.load_state_dict(sd)
    return model


def test_infeasible_budgets_name_the_key_and_the_range(tiny):
    sd, store = tiny
    model = fresh(sd)
    shapes = budget_shapes(model, adapter_for(model), None, None)
    dense = sum(o * i * 2 for o, i in shapes)
    lo, hi = (sum(layer_bytes("tlq", o, i, b, None) for o, i in shapes) / dense for b in (2, 8))
    feasible = f"must lie in [{lo:.4f}, {hi:.4f}]"
    for frac, side in [(lo - 0.01, "below"), (hi + 0.01, "above")]:
        p = TLQ(bits="auto", gptq=True, budget={"bytes_fraction": frac})
        (key, msg), = p.check_model(model, adapter_for(model))
        assert key == "budget.bytes_fraction" and side in msg and feasible in msg
        with pytest.raises(RecipeError, match=re.escape(feasible)) as e:
            dicompress.compress(model, [p], calibration=store, progress=False)
        assert e.value.key == "tlq.budget.bytes_fraction"
    assert all(type(m) is not QuantLinear for m in model.modules())     # nothing was quantized
    assert TLQ(bits="auto", budget={"bytes_fraction": (lo + hi) / 2}).check_model(model, adapter_for(model)) == []


LOAD = """
import sys, torch
torch.set_num_threads(1)
import dicompress  # noqa: F401  (registers the quantizer diffusers loads the artifact with)
from diffusers import FluxTransformer2DModel
m = FluxTransformer2DModel.from_pretrained(sys.argv[1]).eval()
kw = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(m(**kw).sample, sys.argv[3])
print("OK")
"""


def test_pass_meets_the_budget_with_least_error_and_loads(tiny, tmp_path):
    sd, store = tiny
    model = fresh(sd)
    budget = {"avg_bits": 3.5, "weighting": "output", "candidates": [2, 3, 5]}
    state = dicompress.compress(model, [{"tlq": {"bits": "auto", "gptq": True, "budget": budget, **FAST}}],
                                calibration=store, progress=False)
    rows = [r for r in state.report["layers"] if r["method"] == "tlq"]
    summary = state.report["passes"][-1]
    packed = sum(m.weight_bytes for m in model.modules() if isinstance(m, QuantLinear))
    assert packed == summary["achieved_bytes"] <= summary["budget_bytes"]
    assert len({r["bits"] for r in rows}) > 1                       # a mixed assignment
    # the chosen total error is at most that of the feasible uniform-3-bit assignment (the optimum is lower)
    err = {r["module"]: {int(b): v for b, v in r["budget_output_error"].items()} for r in rows}
    assert summary["total_error"] <= sum(e[3] for e in err.values())
    assert summary["total_error"] == pytest.approx(sum(err[r["module"]][r["bits"]] for r in rows))
    # the final GPTQ is the measured one: each layer's output SQNR is its measured error at its width
    for r in rows:
        measured = 10 * np.log10(r["budget_output_energy"] / err[r["module"]][r["bits"]])
        assert r["output_sqnr_db"] == pytest.approx(measured, abs=1e-3)
    # more output error at fewer bits, layer by layer
    assert all(e[2] > e[3] > e[5] for e in err.values())
    kw = adapter_for(model).synthetic_inputs(model, 2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(**kw).sample
    art = dicompress.save(state, tmp_path / "art")
    torch.save(kw, tmp_path / "kw.pt")
    run = subprocess.run([sys.executable, "-c", LOAD, str(art), str(tmp_path / "kw.pt"), str(tmp_path / "o.pt")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "o.pt"), ours)


def test_lowrank_branch_counts_in_the_budget_and_the_residual_is_measured(tiny):
    """With lowrank_rank R the branch's bf16 bytes are a fixed cost inside the budget (feasibility, allocation,
    achieved bytes) and each width's error is measured on the residual the pass quantizes."""
    sd, store = tiny
    rank, include = 4, ["transformer_blocks.0.ff.*", "single_transformer_blocks.0.proj_mlp"]
    model = fresh(sd)
    shapes = budget_shapes(model, adapter_for(model), include, None)
    branch = sum(rank * (o + i) * 2 for o, i in shapes)
    assert budget_bytes(BitBudget(avg_bits=3), shapes, "tlq", None, rank) == \
        sum(layer_bytes("tlq", o, i, 3, None, rank) for o, i in shapes)
    # a fraction the codes alone meet at 2 bits, but not once the branches are paid for
    dense = sum(o * i * 2 for o, i in shapes)
    frac = (sum(layer_bytes("tlq", o, i, 2, None) for o, i in shapes) + branch / 2) / dense
    assert TLQ(bits="auto", budget={"bytes_fraction": frac}).check_model(model, adapter_for(model)) == []
    (key, msg), = TLQ(bits="auto", budget={"bytes_fraction": frac}, lowrank_rank=rank,
                      include=include).check_model(model, adapter_for(model))
    assert key == "budget.bytes_fraction" and "below" in msg and f"rank-{rank} low-rank branch" in msg

    budget = {"avg_bits": 3.5, "weighting": "output", "candidates": [2, 3, 5]}
    state = dicompress.compress(model, [{"tlq": {"bits": "auto", "gptq": True, "budget": budget, "include": include,
                                                 "lowrank_rank": rank, **FAST}}], calibration=store, progress=False)
    rows = [r for r in state.report["layers"] if r["method"] == "tlq"]
    summary = state.report["passes"][-1]
    qs = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qs) == len(shapes) and all(m.lowrank_rank == rank for m in qs)
    packed = sum(m.weight_bytes for m in qs)                        # codes, scales, grid and the branch
    assert packed == summary["achieved_bytes"] <= summary["budget_bytes"]
    assert summary["lowrank_branch_bytes"] == branch and len({r["bits"] for r in rows}) > 1
    for r in rows:       # the measured error at the chosen width is the quantized residual's, as the pass made it
        measured = 10 * np.log10(r["budget_output_energy"] / r["budget_output_error"][str(r["bits"])])
        assert r["output_sqnr_db"] == pytest.approx(measured, abs=1e-3)
