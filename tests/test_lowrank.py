"""SVDQuant's low-rank branch (`lowrank_rank` of tlq / rtn): the split, the layer's forward, composition with
smoothing / rotation / GPTQ / activation quantization, the artifact (fresh-process load) and the bytes."""
import subprocess
import sys

import pytest
import torch
from diffusers import FluxTransformer2DModel

import dicompress
from conftest import small_flux
from dicompress.arch import adapter_for
from dicompress.errors import RecipeError
from dicompress.io.on_load import check_on_load_passes
from dicompress.kernels.linear import act_forward
from dicompress.nn.qlinear import QuantLinear
from dicompress.quant.lowrank import lowrank_split

W4A4 = [{"smooth": {"alpha": 0.5}}, {"ars": {"transform": "hadamard"}}, None, {"act_quant": {"bits": 4}}]


@pytest.fixture
def store(small_flux_store):
    return small_flux_store


def run(model, seed=5):
    kw = adapter_for(model).synthetic_inputs(model, 2, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(**kw).sample, kw


def compress(store, tlq: dict):
    model = small_flux()
    passes = [p if p is not None else {"tlq": tlq} for p in W4A4]
    return model, dicompress.compress(model, passes, calibration=store, progress=False)


def test_split_is_the_best_rank_r_part_and_the_residual_of_the_rounded_factors():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 5, generator=g) @ torch.randn(5, 40, generator=g) * 3 + 0.01 * torch.randn(48, 40, generator=g)
    up, down, res = lowrank_split(w, 5)
    assert (up.dtype, down.dtype, up.shape, down.shape) == (torch.bfloat16, torch.bfloat16, (48, 5), (5, 40))
    assert torch.equal(res, w - up.float() @ down.float())                  # what the branch does not reproduce
    tail = torch.linalg.svdvals(w)[5:].pow(2).sum().sqrt()
    assert float(res.norm()) < 1.5 * float(tail) + 0.01 * float(w.norm())   # Eckart-Young, up to bf16 rounding
    assert float(res.norm()) < 0.05 * float(w.norm())
    with pytest.raises(ValueError, match="rank 40"):
        lowrank_split(w, 40)


def test_w4a4_branch_reads_the_unquantized_transformed_input_and_round_trips(store, tmp_path):
    ref, kw = run(small_flux())
    model, state = compress(store, {"bits": 4, "gptq": True, "lowrank_rank": 4})
    out, _ = run(model)
    qs = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert qs and all(m.lowrank_rank == 4 and m.lowrank_up.dtype == torch.bfloat16 for m in qs.values())
    entries = [e for e in state.manifest if e["op"] == "quantize"]
    assert entries and all(e["lowrank_rank"] == 4 for e in entries)
    # the layer: Q(T(x))·Q(R)ᵀ + T(x)·(up·down)ᵀ, T = smoothing + rotation, the branch before quantization
    q = model.transformer_blocks[0].ff.net[2]
    assert q.act.describe() == "smooth+hadamard+a4"
    x = torch.randn(3, q.in_features, generator=torch.Generator().manual_seed(1))
    tx = q.act.rotate(x / q.act.smooth)
    branch = q.lowrank_up.float() @ q.lowrank_down.float()
    want = act_forward(q.act, x) @ (q.dequantize() - branch).t() + tx @ branch.t() + q.bias
    torch.testing.assert_close(q(x), want, atol=1e-4, rtol=1e-4)
    rows = [r for r in state.report["layers"] if r["method"] == "tlq"]
    assert all(r["lowrank_rank"] == 4 and 0 < r["lowrank_residual_rel"] < 1 and r["output_sqnr_db"] for r in rows)
    # bytes: the branch at bf16 on top of the codes
    assert q.weight_bytes - 2 * 4 * (q.in_features + q.out_features) == \
        q.qweight.numel() + sum(t.numel() * t.element_size() for t in [*q.codec_buffers().values()]) \
        + q.act.storage_bytes
    dicompress.save(state, tmp_path / "a")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**kw).sample, out)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


@pytest.mark.slow   # a fresh interpreter importing diffusers: many seconds on a loaded machine
def test_artifact_loads_in_a_fresh_process(store, tmp_path):
    model, state = compress(store, {"bits": 4, "lowrank_rank": 4})
    out, kw = run(model)
    dicompress.save(state, tmp_path / "a")
    torch.save({"kw": kw, "out": out}, tmp_path / "io.pt")
    child = ("import sys, torch; torch.set_num_threads(1)\n"
             "import dicompress\n"
             "from diffusers import FluxTransformer2DModel\n"
             "m = FluxTransformer2DModel.from_pretrained(sys.argv[1]).eval(); io = torch.load(sys.argv[2])\n"
             "with torch.no_grad(): print(torch.equal(m(**io['kw']).sample, io['out']), "
             "m.transformer_blocks[0].ff.net[2].lowrank_rank)")
    res = subprocess.run([sys.executable, "-c", child, str(tmp_path / "a"), str(tmp_path / "io.pt")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == ["True", "4"]


def test_branch_lowers_the_weight_error_of_every_layer(store):
    errs = {}
    for r in (0, 8):
        _, state = compress(store, {"bits": 4, "lowrank_rank": r})
        errs[r] = {x["module"]: x["sqnr_db"] for x in state.report["layers"] if x["method"] == "tlq"}
    # the branch's part is exact and the residual has a smaller range: SQNR against the whole weight rises
    assert errs[0].keys() == errs[8].keys()
    assert all(errs[8][n] > errs[0][n] for n in errs[0])


def test_rank_too_large_is_a_recipe_error_before_any_change(store):
    model = small_flux()
    with pytest.raises(RecipeError, match="lowrank_rank 32") as e:
        dicompress.compress(model, [{"rtn": {"bits": 4, "lowrank_rank": 32}}], progress=False)
    assert e.value.key == "rtn.lowrank_rank"
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with pytest.raises(RecipeError, match="not applied while loading"):
        check_on_load_passes([{"tlq": {"bits": 4, "lowrank_rank": 8}}])


def test_without_the_branch_the_manifest_and_layers_are_as_before():
    model = small_flux()
    state = dicompress.compress(model, [{"rtn": {"bits": 4}}], progress=False)
    assert all("lowrank_rank" not in e for e in state.manifest)
    q = model.transformer_blocks[0].ff.net[2]
    assert q.lowrank_rank == 0 and "lowrank_up" not in dict(q.named_buffers())
    assert all("lowrank_rank" not in r for r in state.report["layers"])


@pytest.mark.parametrize("mode", ["decode", "int8"])
def test_branch_is_added_to_every_gemm_mode(mode):
    """The codes' GEMM (decode, int8 int_mm, Triton on CUDA) is untouched: the branch is a plain matmul after it."""
    from dicompress.kernels import gemm_mode, quant_linear_forward
    from dicompress.nn.act import ActTransform
    from dicompress.quant.tlq import tlq_quantize
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    up, down, res = lowrank_split(lin.weight.detach(), 4)
    codes, buffers, _ = tlq_quantize(res, 4, None)
    act = ActTransform(64, smooth=True, rotation="hadamard", act_bits=8)
    with torch.no_grad():
        act.smooth.uniform_(0.5, 2.0)
        act.signs.copy_(torch.where(torch.rand(64) < 0.5, -1, 1))
    q = QuantLinear.from_linear_codes(lin, codes, buffers, "tlq", 4, act=act, lowrank=(up, down)).eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad(), gemm_mode(mode):
        y, codes_only = q(x), quant_linear_forward(q, x)
    torch.testing.assert_close(y - codes_only, act.rotate(x / act.smooth) @ (up.float() @ down.float()).t(),
                               atol=1e-5, rtol=1e-5)
