"""PPCL width step (prune/projector.py, passes/ppcl_width.py): FFNs replaced by residual linear projectors fitted by
least squares and distilled on the teacher's block data; artifacts that load through diffusers and unplug to the
teacher's FFNs; composition with quantization; the bad inputs."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel
from diffusers.models.attention import FeedForward

import dicompress
from dicompress.arch import adapter_for
from dicompress.calib import capture
from dicompress.distill.losses import normalized_l1
from dicompress.errors import ArtifactError, RecipeError
from dicompress.prune import teacher_io
from dicompress.prune.projector import NormalEquations, ResidualProjector, fit_residual
from dicompress.recipe import CalibrationConfig, build_passes

FLUX = {"patch_size": 1, "in_channels": 4, "num_layers": 2, "num_single_layers": 1, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6)}
QWEN = {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
        "num_attention_heads": 3, "joint_attention_dim": 16, "axes_dims_rope": (8, 4, 4)}
FAST = {"steps": 30, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 0}
QUIET = {"progress": False}


def build(cls=FluxTransformer2DModel, cfg=FLUX):
    torch.manual_seed(0)
    return cls(**cfg).eval()


def make_store(model, root):
    cfg = CalibrationConfig(source="synthetic", seeds=[0, 1], steps=2, batch_size=2)
    return capture(model, adapter_for(model), cfg, {"name": "t", "path": root}, root / "s", block_inputs=True,
                   progress=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppcl_width")
    return make_store(build(), root)


def predict(model, seed=3):
    kw = adapter_for(model).synthetic_inputs(model, 2, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(**kw).sample


# -- least squares on plain tensors -----------------------------------------------------------------------
def test_least_squares_recovers_an_exactly_linear_map():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64)
    w, b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64) * 3
    target = a + a @ w.T + b                          # x + Wx + b: a residual projector maps A onto it exactly
    w_hat, b_hat = fit_residual(a, target, ridge=0)
    torch.testing.assert_close(w_hat, w, atol=1e-9, rtol=0)
    torch.testing.assert_close(b_hat, b, atol=1e-9, rtol=0)   # the ones column carries the bias
    # the same sums over batches (how the pass accumulates calibration tokens), fp32 rows in, fp64 inside
    eq = NormalEquations(6)
    for rows in a.float().split(128):
        eq.add(rows[None], (rows.double() + rows.double() @ w.T + b).float()[None])   # [1, tokens, dim] like a block
    w2, b2 = eq.solve(ridge=0)
    assert eq.rows == 500
    torch.testing.assert_close(w2, w, atol=1e-4, rtol=0)
    assert eq.relative_error(w2, b2) < 1e-6
    # on a map that is not linear, relative_error equals the directly computed one
    bent = target + 0.3 * torch.tanh(a)
    eq = NormalEquations(6)
    eq.add(a, bent)
    w3, b3 = eq.solve(ridge=0)
    direct = ((a + a @ w3.T + b3 - bent).norm() / bent.norm()).item()
    assert direct > 0.01 and eq.relative_error(w3, b3) == pytest.approx(direct, rel=1e-6)
    # without the ones column the bias could not be fitted: the solution with b forced to 0 is worse
    w0 = torch.linalg.lstsq(a, target - a).solution.T
    assert ((a + a @ w0.T - target).norm() / target.norm()).item() > 0.1


def test_projector_is_x_plus_linear():
    p = ResidualProjector(5)
    x = torch.randn(2, 3, 5)
    torch.testing.assert_close(p(x), x + p.proj(x))
    assert type(p.proj) is torch.nn.Linear


# -- the pass -----------------------------------------------------------------------------------------------
def block_error(model, store, name):
    """normalized L1 of one block's outputs against the teacher's, on the captured teacher inputs."""
    a = adapter_for(model)
    names = [r.name for r in a.blocks(model)]
    inputs, targets = teacher_io(store, names, names.index(name), names.index(name))
    with torch.no_grad():
        out = a.run_block(model.get_submodule(name), inputs)
    return sum(normalized_l1(out[k], targets[k]).item() for k in ("hidden_states", "encoder_hidden_states"))


BLOCKS = ("transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0")
FFNS = ("transformer_blocks.0.ff", "transformer_blocks.0.ff_context", "transformer_blocks.1.ff",
        "transformer_blocks.1.ff_context", "single_transformer_blocks.0.mlp")


def test_least_squares_then_distillation_approach_the_teacher(store):
    lsq, dist = build(), build()
    s0 = dicompress.compress(lsq, [{"ppcl_width": {"distill": {"steps": 0}}}], calibration=store, **QUIET)
    s1 = dicompress.compress(dist, [{"ppcl_width": {"distill": FAST}}], calibration=store, **QUIET)
    for m in (lsq, dist):
        assert all(isinstance(b.ff, ResidualProjector) and isinstance(b.ff_context, ResidualProjector)
                   for b in m.transformer_blocks)
        single = m.single_transformer_blocks[0]      # the projector folded into proj_mlp (identity) and proj_out
        assert isinstance(single.act_mlp, torch.nn.Identity) and single.mlp_hidden_dim == 32
        torch.testing.assert_close(single.proj_mlp.weight, torch.eye(32)) and single.proj_mlp.bias is None
    rep = s1.report["passes"][-1]
    assert rep["ffns_replaced"] == 5 and rep["blocks"] == 3
    assert rep["removed_params"] == sum(p.numel() for p in build().parameters()) - \
        sum(p.numel() for p in dist.parameters())
    assert 0 < rep["removed_fraction"] < 1 and rep["block_param_fraction"] == pytest.approx(1 - rep["removed_fraction"])
    rows = [r for r in s1.report["layers"] if r["method"] == "ppcl_width"]
    assert tuple(r["module"] for r in rows) == FFNS
    assert all(r["loss_last"] < r["loss_first"] and 0 < r["fit_rel_error"] < 1 for r in rows)
    # distillation trains the single block's MLP columns of proj_out only, never its attention columns
    inner = 32
    torch.testing.assert_close(dist.single_transformer_blocks[0].proj_out.weight[:, :inner],
                               build().single_transformer_blocks[0].proj_out.weight[:, :inner], rtol=0, atol=0)
    zero = build()                                     # the blocks without their FFNs at all: what a projector beats
    for b in zero.transformer_blocks:
        b.ff.net[2].weight.data.zero_(), b.ff.net[2].bias.data.zero_()
        b.ff_context.net[2].weight.data.zero_(), b.ff_context.net[2].bias.data.zero_()
    zero.single_transformer_blocks[0].proj_out.weight.data[:, inner:] = 0
    for name in BLOCKS:
        e0, e1, ez = (block_error(m, store, name) for m in (lsq, dist, zero))
        assert e1 < e0 < ez, (name, e1, e0, ez)
    assert s0.report["passes"][-1]["removed_params"] == rep["removed_params"]


def test_single_block_projector_is_x_plus_linear():
    """The fold computes exactly x + W x + b where the MLP's output was (the attention columns untouched)."""
    from dicompress.prune.projector import fold_single_projector
    block = build().single_transformer_blocks[0]
    x = torch.randn(2, 5, 32)
    attn_part = torch.randn(2, 5, 32)                  # what the attention would give
    w, b = torch.randn(32, 32) * 0.1, torch.randn(32)
    ref_attn = attn_part @ block.proj_out.weight[:, :32].T + block.proj_out.bias
    fold_single_projector(block, w, b)
    with torch.no_grad():
        out = block.proj_out(torch.cat([attn_part, block.act_mlp(block.proj_mlp(x))], dim=-1))
    torch.testing.assert_close(out, ref_attn + x + x @ w.T + b, atol=1e-5, rtol=1e-5)


def test_text_stream_false_and_include_keep(store):
    model = build()
    dicompress.compress(model, [{"ppcl_width": {"include": ["transformer_blocks.*"], "keep": ["*.1"],
                                                "text_stream": False, "distill": {"steps": 0}}}],
                        calibration=store, **QUIET)
    b0, b1 = model.transformer_blocks
    assert isinstance(b0.ff, ResidualProjector) and isinstance(b0.ff_context, FeedForward)
    assert isinstance(b1.ff, FeedForward)


LOAD = textwrap.dedent("""
    import sys, torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from dicompress.arch import adapter_for
    from dicompress.prune.projector import ResidualProjector
    art, pipe_dir, out = sys.argv[1:4]
    t = FluxTransformer2DModel.from_pretrained(art)
    assert sum(isinstance(m, ResidualProjector) for m in t.modules()) == 4
    assert all(isinstance(b.act_mlp, torch.nn.Identity) for b in t.single_transformer_blocks)
    kw = adapter_for(t).synthetic_inputs(t, 2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.save(t(**kw).sample, out)
    pipe = FluxPipeline.from_pretrained(pipe_dir, transformer=t, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    lat = pipe(prompt=["a red cat"], num_inference_steps=2, height=64, width=64, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert lat.shape == (1, 16, 64) and torch.isfinite(lat).all()
    print("OK")
""")


def test_artifact_loads_in_a_fresh_process_runs_in_the_pipeline_and_unplugs(tiny_flux_pipeline_dir, tmp_path):
    src = str(tiny_flux_pipeline_dir / "transformer")
    teacher = FluxTransformer2DModel.from_pretrained(src, torch_dtype=torch.float32)
    model = FluxTransformer2DModel.from_pretrained(src, torch_dtype=torch.float32)
    store = make_store(model, tmp_path)
    teacher_out = predict(teacher)
    state = dicompress.compress(model, [{"ppcl_width": {"distill": {**FAST, "steps": 5}}}], calibration=store,
                                **QUIET)
    ours = predict(model)
    art = dicompress.save(state, tmp_path / "art")
    run = subprocess.run([sys.executable, "-c", LOAD, str(art), str(tiny_flux_pipeline_dir), str(tmp_path / "o.pt")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "o.pt"), ours)
    manifest = json.loads((art / "config.json").read_text())["quantization_config"]["manifest"]
    assert [e["op"] for e in manifest] == ["ppcl_width"] * 6
    # every projector unplugged: the teacher, exactly; one kept: only that one is a projector
    restored = dicompress.load(art, plug_ffns=[])
    assert not any(isinstance(m, ResidualProjector) for m in restored.modules())
    assert torch.equal(predict(restored), teacher_out)
    one = dicompress.load(art, plug_ffns=["transformer_blocks.0.ff", "single_transformer_blocks.1.mlp"])
    assert [type(m).__name__ for n, m in one.named_modules() if n.endswith(("ff", "ff_context", "act_mlp"))] == \
        ["ResidualProjector", "FeedForward", "FeedForward", "FeedForward", "GELU", "Identity"]
    assert torch.equal(predict(dicompress.load(art)), ours)
    with pytest.raises(ArtifactError, match="not projectors"):
        dicompress.load(art, plug_ffns=["transformer_blocks.0.attn"])


def test_without_teacher_ffns_unplugging_is_refused(store, tmp_path):
    model = build()
    state = dicompress.compress(model, [{"ppcl_width": {"distill": {"steps": 0}, "keep_teacher_ffns": False}}],
                                calibration=store, **QUIET)
    art = dicompress.save(state, tmp_path / "a")
    assert not (art / "ppcl_width_ffns.safetensors").exists()
    dicompress.load(art, plug_ffns=list(FFNS))
    with pytest.raises(ArtifactError, match="keep_teacher_ffns"):
        dicompress.load(art, plug_ffns=[])


def test_qwenimage_ffns(tmp_path):
    model = build(QwenImageTransformer2DModel, QWEN)
    teacher_out = predict(model)
    store = make_store(model, tmp_path)
    state = dicompress.compress(model, [{"ppcl_width": {"distill": {**FAST, "steps": 3}}}], calibration=store,
                                **QUIET)
    assert all(isinstance(b.img_mlp, ResidualProjector) and isinstance(b.txt_mlp, ResidualProjector)
               for b in model.transformer_blocks)
    art = dicompress.save(state, tmp_path / "q")
    assert torch.equal(predict(QwenImageTransformer2DModel.from_pretrained(str(art))), predict(model))
    assert torch.equal(predict(dicompress.load(art, plug_ffns=[])), teacher_out)


# -- composition and bad input ----------------------------------------------------------------------------
def _recipe(tmp_path, model_dir, passes, name, **extra):
    data = {"model": str(model_dir), "output": str(tmp_path / name), "passes": passes,
            "calibration": {"source": "classes", "classes": [0, 5], "seeds": [0], "steps": 2, "batch_size": 2},
            "eval": {"enabled": False}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_ppcl_width_then_w4a8_writes_one_artifact_that_loads(tiny_zoo_dir, tmp_path):
    from dicompress.nn.qlinear import QuantLinear
    passes = [{"ppcl_width": {"distill": {**FAST, "steps": 3}}}, {"smooth": {"alpha": 0.5}}, {"ars": {}},
              {"tlq": {"bits": 4, "granularity": "channel"}}, {"act_quant": {"bits": 8}}]
    report = dicompress.run(_recipe(tmp_path, tiny_zoo_dir, passes, "w"), progress=False, echo=lambda *a, **k: None)
    assert all(p["bit_exact"] for p in report["load_check"]["probes"])
    art = tmp_path / "w"
    manifest = json.loads((art / "config.json").read_text())["quantization_config"]["manifest"]
    ops = [(e["op"], e["module"]) for e in manifest]
    assert ops[:6] == [("ppcl_width", f"transformer_blocks.{i}.{f}") for i in (0, 1) for f in ("ff", "ff_context")] \
        + [("ppcl_width", f"single_transformer_blocks.{i}") for i in (0, 1)]
    assert {("quantize", "transformer_blocks.0.ff.proj"), ("quantize", "single_transformer_blocks.0.proj_mlp"),
            ("quantize", "single_transformer_blocks.0.proj_out")} <= set(ops)
    model = FluxTransformer2DModel.from_pretrained(art)
    assert isinstance(model.transformer_blocks[0].ff, ResidualProjector)
    assert isinstance(model.transformer_blocks[0].ff.proj, QuantLinear)
    assert isinstance(model.single_transformer_blocks[0].proj_mlp, QuantLinear)
    # the projectors were smoothed and rotated like any linear; the single block's identity proj_mlp shares the
    # smoothing fold into the norm with to_q/k/v (exact: the load check above is bit for bit)
    rows = {r["module"]: r for r in report["layers"] if "tlq" in r.get("method", "")}
    assert all(rows[m]["transform"] for m in ("transformer_blocks.0.ff.proj", "single_transformer_blocks.0.proj_out"))
    assert rows["single_transformer_blocks.0.proj_mlp"]["smoothing"].startswith("fold:norm")
    with pytest.raises(ArtifactError, match="quantized or rewrote"):
        dicompress.load(art, plug_ffns=[])
    # an artifact of projectors is the next recipe's model; its projectors cannot be replaced again
    first = _recipe(tmp_path, tiny_zoo_dir, [{"ppcl_width": {"distill": {"steps": 0}, "keep": ["*.1"]}}], "first")
    dicompress.run(first, progress=False, echo=lambda *a, **k: None)
    again = _recipe(tmp_path, tmp_path / "first", [{"ppcl_width": {"distill": {"steps": 0}}}], "again")
    with pytest.raises(RecipeError, match="already a residual projector"):
        dicompress.run(again, progress=False, echo=lambda *a, **k: None)
    assert not (tmp_path / "again").exists()


def test_bad_inputs_before_any_work(store):
    with pytest.raises(RecipeError, match="before quantization"):
        build_passes([{"tlq": {"bits": 4}}, {"ppcl_width": {}}])
    with pytest.raises(RecipeError, match="before quantization"):
        build_passes([{"smooth": {}}, {"ppcl_width": {}}])
    with pytest.raises(RecipeError, match="ridge"):
        build_passes([{"ppcl_width": {"ridge": -1}}])
    ok = build_passes([{"ppcl_width": {}}, {"tlq": {"bits": 4}}])
    assert ok[0].changes_structure and ok[0].needs_block_inputs
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for cfg, msg in [({"include": ["nothing.*"]}, "no block matches"),
                     ({"keep": ["*"]}, "no block matches")]:
        with pytest.raises(RecipeError, match=msg):
            dicompress.compress(model, [{"ppcl_width": cfg}], calibration=store, **QUIET)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # an FFN that is not a diffusers FeedForward of plain linears; a single block whose MLP was already replaced
    model.transformer_blocks[0].ff = torch.nn.Sequential(torch.nn.Linear(32, 32))
    with pytest.raises(RecipeError, match="transformer_blocks.0.ff: a Sequential, not a diffusers FeedForward"):
        dicompress.compress(model, [{"ppcl_width": {}}], calibration=store, **QUIET)
    model.single_transformer_blocks[0].act_mlp = torch.nn.Identity()
    with pytest.raises(RecipeError, match=r"single_transformer_blocks.0.mlp: act_mlp is Identity\(\)"):
        dicompress.compress(model, [{"ppcl_width": {"include": ["single_*"]}}], calibration=store, **QUIET)
