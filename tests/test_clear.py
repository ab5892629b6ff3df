"""CLEAR (dicompress/clear, passes/clear.py): the processors against diffusers' own, the window and the pooling on
plain tensors, the pass (only attention trains, distillation lowers the loss), its artifact in a fresh process at two
resolutions (also quantized), and its bad inputs."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

import dicompress
from dicompress.arch import adapter_for
from dicompress.calib import capture
from dicompress.clear.pooling import KVPool, pool_tokens
from dicompress.clear.processor import (ClearContext, FluxClearAttnProcessor, QwenClearAttnProcessor, ids_layout,
                                       install_clear, shapes_layout)
from dicompress.errors import RecipeError
from dicompress.models import load_transformer, resolve_model
from dicompress.recipe import CalibrationConfig, build_passes

FLUX = {"patch_size": 1, "in_channels": 4, "num_layers": 2, "num_single_layers": 1, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6)}
QUIET = {"progress": False}


def build():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX).eval()


def attn_names(model):
    return [n for n, m in model.named_modules() if type(m).__name__ == "FluxAttention"]


def flux_inputs(model, grid, txt=8, batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    cfg = model.config
    return dict(hidden_states=torch.randn(batch, h * w, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, txt, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                timestep=torch.rand(batch, generator=g), img_ids=ids.view(-1, 3), txt_ids=torch.zeros(txt, 3))


# -- processors, window, pooling ----------------------------------------------------------------------------

def test_a_radius_covering_the_grid_gives_the_stock_processors_output():
    model = build()
    kw = flux_inputs(model, (6, 5))
    with torch.no_grad():
        stock = model(**kw).sample
        install_clear(model, attn_names(model), radius=100.0, pooling=None)
        assert all(isinstance(model.get_submodule(n).processor, FluxClearAttnProcessor) for n in attn_names(model))
        ours = model(**kw).sample
        install_clear(model, attn_names(model), radius=1.5, pooling=None)
        local = model(**kw).sample
    # same SDPA on the same q/k/v with an all-true mask: float rounding only (measured ~1e-7 of ~1)
    assert (ours - stock).abs().max() <= 1e-5 * stock.abs().max()
    assert (local - stock).abs().max() > 1e-2 * stock.abs().max()   # a small window changes the output


@pytest.mark.parametrize("pooling", [None, 2])
def test_an_image_query_sees_only_its_window_text_and_pooled_keys(pooling):
    """Perturbing an image token outside a query's circle leaves that query's output unchanged (bit for bit without
    pooling; with pooling the token reaches the query through its pooled cell); inside the circle it changes it.
    Text queries see everything."""
    from diffusers.models.transformers.transformer_flux import FluxAttention
    torch.manual_seed(0)
    attn = FluxAttention(query_dim=32, heads=2, dim_head=16, added_kv_proj_dim=32).eval()
    ctx = ClearContext()
    ctx.n_text, ctx.grid = 3, (6, 7)
    attn.set_processor(FluxClearAttnProcessor(2.0, ctx, KVPool(2, pooling) if pooling else None))
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(1, 42, 32, generator=g), torch.randn(1, 3, 32, generator=g)
    q = 2 * 7 + 2                                   # image token at (2, 2)
    far, near = 5 * 7 + 6, 3 * 7 + 3                # (5, 6): dy^2+dx^2 = 25 >= 4; (3, 3): 2 < 4
    with torch.no_grad():
        base_img, base_txt = attn(img, txt)
        for tok, inside in ((far, False), (near, True)):
            x = img.clone()
            x[0, tok] += 3.0
            out_img, out_txt = attn(x, txt)
            changed = (out_img[0, q] - base_img[0, q]).abs().max()
            if inside or pooling:
                assert changed > 1e-3
            else:
                assert changed == 0
            assert (out_txt - base_txt).abs().max() > 1e-3          # text queries see every image token
            if not inside and not pooling:
                assert torch.equal(out_img[0, :q], base_img[0, :q])  # (0,0)..(2,1) are > 2 away from (5, 6)


def test_pooling_at_initialisation_averages_cells_and_padded_border_cells_their_real_tokens():
    x = torch.randn(2, 5 * 3, 2, 4)
    pool = KVPool(2, 2)
    pk, pv = pool(x, x, (5, 3))
    assert pk.shape == (2, 3 * 2, 2, 4) and torch.equal(pk, pv)
    grid = x.view(2, 5, 3, 2, 4)
    torch.testing.assert_close(pk[:, 0], grid[:, 0:2, 0:2].mean(dim=(1, 2)))
    torch.testing.assert_close(pk[:, 1], grid[:, 0:2, 2:3].mean(dim=(1, 2)))     # one padded column
    torch.testing.assert_close(pk[:, 5], grid[:, 4:5, 2:3].mean(dim=(1, 2)))     # the corner: one real token
    w = torch.rand(2, 4)
    manual = torch.einsum("bhd,h->bhd", grid[:, 2, 0], w[:, 0]) + torch.einsum("bhd,h->bhd", grid[:, 2, 1], w[:, 1]) \
        + torch.einsum("bhd,h->bhd", grid[:, 3, 0], w[:, 2]) + torch.einsum("bhd,h->bhd", grid[:, 3, 1], w[:, 3])
    torch.testing.assert_close(pool_tokens(x, (5, 3), 2, w)[:, 2], manual)      # weights by head and position


def test_grid_from_ids_and_a_clear_error_for_other_layouts():
    ids = flux_inputs(build(), (3, 4))["img_ids"]
    assert ids_layout(torch.zeros(5, 3), ids) == (5, (3, 4))
    assert ids_layout(torch.zeros(1, 5, 3), ids[None]) == (5, (3, 4))          # deprecated batched ids
    with pytest.raises(ValueError, match="row-major"):
        ids_layout(torch.zeros(5, 3), ids.view(3, 4, 3).transpose(0, 1).reshape(-1, 3))   # column-major
    two = torch.cat([ids, ids.clone().index_fill_(1, torch.tensor([0]), 1.0)])            # Kontext: two images
    with pytest.raises(ValueError, match="row-major"):
        ids_layout(torch.zeros(5, 3), two)


def qwen_inputs(model, grid, txt=5, batch=2, mask=None, seed=3):
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    cfg = model.config
    return dict(hidden_states=torch.randn(batch, h * w, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, txt, cfg.joint_attention_dim, generator=g),
                encoder_hidden_states_mask=torch.ones(batch, txt, dtype=torch.long) if mask is None else mask,
                timestep=torch.rand(batch, generator=g), img_shapes=[[(1, h, w)]] * batch)


def test_qwen_processor_is_the_stock_one_with_a_local_window_and_keeps_the_text_mask(tiny_qwen_dir):
    """Qwen-Image: a radius covering the grid gives the stock processor's output, with an all-true and with a
    padded text mask (padded text stays out of every key set); a small radius changes it; and the padded text
    tokens' values do not reach any image output."""
    model = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_dir).eval()
    names = [n for n, m in model.named_modules() if n.endswith(".attn")]
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    plain, padded = qwen_inputs(model, (6, 5)), qwen_inputs(model, (6, 5), mask=mask)
    with torch.no_grad():
        stock = [model(**kw).sample for kw in (plain, padded)]
        install_clear(model, names, radius=100.0, pooling=None)
        assert all(isinstance(model.get_submodule(n).processor, QwenClearAttnProcessor) for n in names)
        ours = [model(**kw).sample for kw in (plain, padded)]
        for a, b in zip(ours, stock):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
        install_clear(model, names, radius=1.5, pooling=None)
        local = model(**padded).sample
        assert (local - stock[1]).abs().max() > 1e-2 * stock[1].abs().max()
        noisy = dict(padded, encoder_hidden_states=padded["encoder_hidden_states"].clone())
        noisy["encoder_hidden_states"][1, 3:] += 5.0                   # only the padded tokens of sample 1
        assert torch.equal(model(**noisy).sample[1], local[1])
        assert model._clear_context.grid is None


def test_qwen_grid_from_img_shapes_and_a_clear_error_for_edit_inputs():
    assert shapes_layout([[(1, 6, 5)]] * 2, 7) == (7, (6, 5))
    assert shapes_layout([(1, 6, 5)] * 2, 7) == (7, (6, 5))           # the flat form the model also reads
    with pytest.raises(ValueError, match="one image of one frame"):
        shapes_layout([[(1, 6, 5), (1, 4, 4)]], 7)                    # Qwen-Image-Edit: a reference image
    with pytest.raises(ValueError, match="one image of one frame"):
        shapes_layout([[(2, 6, 5)]], 7)


# -- the pass ---------------------------------------------------------------------------------------------

def _classes_store(model, info, root, steps=3):
    cfg = CalibrationConfig(source="classes", classes=[0, 5, 7], seeds=[0], steps=steps, batch_size=3)
    return capture(model, adapter_for(model), cfg, {"name": info.name, "path": info.path}, root, block_inputs=False,
                   model_inputs=True, progress=False)


def test_only_attention_trains_and_distillation_lowers_the_loss(tiny_zoo_dir, tmp_path):
    info = resolve_model(str(tiny_zoo_dir))
    model = load_transformer(info)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    store = _classes_store(model, info, tmp_path / "s")
    state = dicompress.compress(model, [{"clear": {"radius": 2, "pooling": 2, "include": ["transformer_blocks.*",
                                                                                          "single_transformer_blocks.1"],
                                                   "distill": {"steps": 12, "batch_size": 3, "lr": 3e-3,
                                                               "checkpoint_every": 0}}}],
                                calibration=store, teacher=lambda: load_transformer(info), **QUIET)
    trained = ("transformer_blocks.0.attn.", "transformer_blocks.1.attn.", "single_transformer_blocks.1.attn.")
    after = dict(model.named_parameters())
    for n, p in before.items():
        if not n.startswith(trained):
            assert torch.equal(after[n], p), f"{n} is no CLEAR attention parameter but changed"
    for n in ("transformer_blocks.0.attn.to_q.weight", "transformer_blocks.1.attn.add_v_proj.weight",
              "transformer_blocks.0.attn.to_add_out.weight", "single_transformer_blocks.1.attn.to_k.weight"):
        assert not torch.equal(after[n], before[n]), f"{n} did not train"
    pooled = sorted(set(after) - set(before))
    assert len(pooled) == 6 and all(".attn.processor.pool." in n for n in pooled)
    assert all(not torch.equal(after[n], torch.full_like(after[n], 0.25)) for n in pooled)
    assert not isinstance(model.single_transformer_blocks[0].attn.processor, FluxClearAttnProcessor)
    summary = state.report["passes"][-1]
    assert summary["modules"] == 3 and summary["grid"] == [8, 8] and summary["steps"] == 12
    assert summary["loss_last"] < summary["loss_first"]


# -- artifacts ------------------------------------------------------------------------------------------------

def _synthetic_store(model, root):
    cfg = CalibrationConfig(source="synthetic", seeds=[0, 1], steps=2, batch_size=2)
    return capture(model, adapter_for(model), cfg, {"name": "t", "path": root}, root / "s", block_inputs=False,
                   model_inputs=True, progress=False)


LOAD = textwrap.dedent("""
    import sys, torch
    from diffusers import FluxTransformer2DModel
    from dicompress.clear.processor import FluxClearAttnProcessor
    art, inputs, out = sys.argv[1:4]
    torch.set_num_threads(1)     # as the test process (conftest): reductions then round the same way
    t = FluxTransformer2DModel.from_pretrained(art)
    procs = [m.processor for n, m in t.named_modules() if type(m).__name__ == "FluxAttention"]
    assert all(isinstance(p, FluxClearAttnProcessor) and p.radius == 3.0 and p.pool.factor == 2 for p in procs)
    with torch.no_grad():
        torch.save([t(**kw).sample for kw in torch.load(inputs)], out)
    print("OK")
""")


def test_artifact_loads_in_a_fresh_process_and_runs_at_two_resolutions(tiny_flux_pipeline_dir, tmp_path):
    src = str(tiny_flux_pipeline_dir / "transformer")
    model = FluxTransformer2DModel.from_pretrained(src, torch_dtype=torch.float32)
    state = dicompress.compress(model, [{"clear": {"radius": 3, "pooling": 2, "distill": {"steps": 0}}}],
                                calibration=_synthetic_store(model, tmp_path), **QUIET)
    with torch.no_grad():     # stand-in for trained pooling weights: the artifact must carry them
        for n, p in model.named_parameters():
            if ".processor.pool." in n:
                p.uniform_(0.1, 0.4)
    kws = [flux_inputs(model, grid, batch=1) for grid in ((8, 8), (5, 9))]    # the calibration's grid and another
    for kw in kws:
        kw["encoder_hidden_states"] = torch.randn(1, 8, model.config.joint_attention_dim)
        kw["pooled_projections"] = torch.randn(1, model.config.pooled_projection_dim)
        kw["guidance"] = torch.full((1,), 3.5)
        kw["hidden_states"] = torch.randn(1, kw["hidden_states"].shape[1], model.config.in_channels)
    with torch.no_grad():
        ours = [model(**kw).sample for kw in kws]
    art = dicompress.save(state, tmp_path / "art")
    torch.save(kws, tmp_path / "in.pt")
    run = subprocess.run([sys.executable, "-c", LOAD, str(art), str(tmp_path / "in.pt"), str(tmp_path / "o.pt")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]
    for a, b in zip(torch.load(tmp_path / "o.pt"), ours):
        assert torch.equal(a, b)
    # the model's own pipeline at two resolutions, neither the calibration's: 4x4 and 6x6 token grids
    from diffusers import FluxPipeline
    loaded = FluxTransformer2DModel.from_pretrained(art)
    pipe = FluxPipeline.from_pretrained(tiny_flux_pipeline_dir, transformer=loaded, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for size, tokens in ((64, 16), (96, 36)):
        lat = pipe(prompt=["a red cat"], num_inference_steps=2, height=size, width=size, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
        assert lat.shape == (1, tokens, 64) and torch.isfinite(lat).all()
        assert loaded._clear_context.grid is None                  # cleared after each call
    manifest = json.loads((art / "config.json").read_text())["quantization_config"]["manifest"]
    n_attn = model.config.num_layers + model.config.num_single_layers
    assert [e["op"] for e in manifest] == ["clear_attention"] * n_attn
    assert manifest[0] == {"op": "clear_attention", "module": "transformer_blocks.0.attn", "radius": 3.0,
                           "pooling": 2, "heads": model.config.num_attention_heads, "grid": [8, 8]}


PIPE_LOAD = textwrap.dedent("""
    import sys, torch
    import diffusers
    from dicompress.clear import processor
    out, pipe_cls, proc_cls = sys.argv[1:4]
    torch.set_num_threads(1)
    pipe = getattr(diffusers, pipe_cls).from_pretrained(out, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    procs = [m.processor for n, m in pipe.transformer.named_modules() if n.endswith(".attn")]
    assert procs and all(isinstance(p, getattr(processor, proc_cls)) and p.radius == 2.0 and p.pool.factor == 2
                         for p in procs)
    for size, tokens in ((64, 16), (96, 36)):    # the calibration's 4x4 token grid and a 6x6 one
        lat = pipe(prompt=["a red cat"], num_inference_steps=2, height=size, width=size, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
        assert lat.shape[1] == tokens and torch.isfinite(lat).all(), lat.shape
        assert pipe.transformer._clear_context.grid is None
    print("OK")
""")
PIPES = {"flux": ("tiny_flux_pipeline_dir", "FluxPipeline", "FluxClearAttnProcessor", 4),
         "qwenimage": ("tiny_qwenimage_pipeline_dir", "QwenImagePipeline", "QwenClearAttnProcessor", 2)}


@pytest.mark.parametrize("family", list(PIPES))
def test_recipe_on_a_pipeline_distils_and_loads_in_a_fresh_process(family, request, tmp_path):
    """The way users run it: a recipe on the pipeline directory, prompt calibration over its sampling loop at 64 px
    (a 4x4 token grid: the write-time load check's probes must use it, not the synthetic 8x8), CLEAR distilled
    (flow matching included: the trajectories are real), the output pipeline loaded by its pipeline class's
    from_pretrained in a fresh process and sampled at two resolutions."""
    fixture, pipe_cls, proc_cls, n_attn = PIPES[family]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat on a blue house\ntwo dogs in the city at night\n")
    calibration = {"source": "prompts", "prompts": str(prompts), "seeds": [0], "steps": 2, "height": 64,
                   "width": 64, "batch_size": 2}
    passes = [{"clear": {"radius": 2, "pooling": 2, "distill": {"steps": 3, "batch_size": 2, "lr": 1e-3,
                                                                "checkpoint_every": 0}}}]
    report = dicompress.run(_recipe(tmp_path, request.getfixturevalue(fixture), passes, "pc", calibration),
                            progress=False, echo=lambda *a, **k: None)
    summary = next(p for p in report["passes"] if p["pass"] == "clear")
    assert summary["grid"] == [4, 4] and summary["steps"] == 3 and summary["modules"] == n_attn
    assert all(p["bit_exact"] for p in report["load_check"]["probes"])
    out = tmp_path / "pc"
    manifest = json.loads((out / "transformer" / "config.json").read_text())["quantization_config"]["manifest"]
    assert [e["op"] for e in manifest] == ["clear_attention"] * n_attn and manifest[0]["grid"] == [4, 4]
    run = subprocess.run([sys.executable, "-c", PIPE_LOAD, str(out), pipe_cls, proc_cls], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]


def _recipe(tmp_path, model_dir, passes, name, calibration=None):
    data = {"model": str(model_dir), "output": str(tmp_path / name), "passes": passes,
            "calibration": calibration or {"source": "classes", "classes": [0, 5], "seeds": [0], "steps": 2,
                                           "batch_size": 2},
            "eval": {"enabled": False}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_clear_then_w4a8_writes_one_artifact_that_loads(tiny_zoo_dir, tmp_path):
    """The quantization after CLEAR calibrates on the CLEAR model; its linears (attention's included) are quantized
    and the artifact, loaded as users load it, computes what the model in memory did."""
    from dicompress.nn.qlinear import QuantLinear
    passes = [{"clear": {"radius": 3, "distill": {"steps": 2, "batch_size": 2, "checkpoint_every": 0}}},
              {"smooth": {"alpha": 0.5}}, {"tlq": {"bits": 4, "granularity": "channel"}}, {"act_quant": {"bits": 8}}]
    report = dicompress.run(_recipe(tmp_path, tiny_zoo_dir, passes, "w"), progress=False, echo=lambda *a, **k: None)
    assert all(p["bit_exact"] for p in report["load_check"]["probes"])
    manifest = json.loads((tmp_path / "w" / "config.json").read_text())["quantization_config"]["manifest"]
    ops = [e["op"] for e in manifest]
    assert ops[:4] == ["clear_attention"] * 4 and "quantize" in ops and "clear_attention" not in ops[4:]
    model = FluxTransformer2DModel.from_pretrained(tmp_path / "w")
    attn = model.transformer_blocks[0].attn
    assert isinstance(attn.processor, FluxClearAttnProcessor) and isinstance(attn.to_q, QuantLinear)
    with torch.no_grad():
        for grid in ((8, 8), (6, 4)):
            kw = flux_inputs(model, grid, txt=4)
            kw["encoder_hidden_states"] = torch.randn(2, 4, model.config.joint_attention_dim)
            assert torch.isfinite(model(**kw).sample).all()


def test_bad_inputs_before_any_work(tiny_zoo_dir, tiny_qwen_dir, tmp_path):
    with pytest.raises(RecipeError, match="radius"):
        build_passes([{"clear": {"radius": 0}}])
    with pytest.raises(RecipeError, match="pooling"):
        build_passes([{"clear": {"radius": 2, "pooling": 1}}])
    with pytest.raises(RecipeError, match="before quantization"):
        build_passes([{"tlq": {"bits": 4}}, {"clear": {"radius": 2}}])
    build_passes([{"clear": {"radius": 2}}, {"tlq": {"bits": 4}}])
    model = build()
    store = _synthetic_store(model, tmp_path)                      # an 8x8 token grid
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for cfg, key, msg in (({"radius": 9}, "clear.radius", "larger than the calibration's 8x8"),
                          ({"radius": 2, "pooling": 9}, "clear.pooling", "larger than the calibration's 8x8"),
                          ({"radius": 2, "include": ["nothing.*"]}, "clear.include", "no block matches")):
        with pytest.raises(RecipeError, match=msg) as e:
            dicompress.compress(model, [{"clear": {**cfg, "distill": {"steps": 0}}}], calibration=store, **QUIET)
        assert e.value.key == key
    assert not any(isinstance(m.processor, FluxClearAttnProcessor) for m in model.modules() if hasattr(m, "processor"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the same values in a recipe: refused when it loads, from the grid its calibration will capture at (the digits
    # model's 8x8; prompts at 256 x 512 px: 16x32), before any capture, output or work directory
    for cal, cfg, key in (({"source": "classes", "classes": [0], "seeds": [0], "steps": 2}, {"radius": 9}, "radius"),
                          ({"source": "prompts", "prompts": str(tmp_path / "p.txt"), "height": 256, "width": 512},
                           {"radius": 20, "pooling": 17}, "pooling")):
        (tmp_path / "p.txt").write_text("a cat\n")
        path = _recipe(tmp_path, tiny_zoo_dir, [{"clear": cfg}], "g", calibration=cal)
        with pytest.raises(RecipeError, match=f"passes\\[0\\]\\.clear\\.{key}: .*larger than the calibration's") as e:
            dicompress.run(path, progress=False, echo=lambda *a, **k: None)
        assert "8x8" in str(e.value) or "16x32" in str(e.value)
        assert not (tmp_path / "g").exists() and not (tmp_path / "g.work").exists()
    build_passes([{"clear": {"radius": 16}}])                      # no calibration set: nothing to check yet
    # attention the pass cannot replace (a user's own processor): refused by the recipe check, before any capture
    qwen = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_dir)
    from diffusers.models.attention_processor import AttnProcessor2_0
    qwen.transformer_blocks[1].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(RecipeError, match="transformer_blocks.1 .* stock attention processor only") as e:
        dicompress.compress(qwen, [{"clear": {"radius": 2, "distill": {"steps": 0}}}], calibration=store, **QUIET)
    assert e.value.key == "clear.include"
    assert not any(isinstance(m.processor, QwenClearAttnProcessor) for m in qwen.modules() if hasattr(m, "processor"))


def test_recipes_validate_and_flux_dev_fails_fast_without_weights(tmp_path, monkeypatch):
    from pathlib import Path

    from dicompress.errors import DicompressError
    from dicompress.recipe import load_recipe
    root = Path(__file__).resolve().parents[1]
    tiny = load_recipe(root / "recipes/tiny_flux_clear.yaml").pass_objects()
    assert [(p.name, p.config.radius) for p in tiny] == [("clear", 3.0)] and tiny[0].config.distill.steps > 0
    dev = load_recipe(root / "recipes/flux_dev_clear.yaml")
    assert [(p.name, p.config.radius) for p in dev.pass_objects()] == [("clear", 16.0)]
    assert dev.calibration.height == dev.calibration.width == 1024          # 64x64 tokens: r = 16 fits
    qwen = load_recipe(root / "recipes/qwenimage_clear.yaml")
    assert [(p.name, p.config.radius) for p in qwen.pass_objects()] == [("clear", 16.0)]
    assert qwen.calibration.height == qwen.calibration.width == 1024
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DicompressError, match="FLUX.1-dev") as e:
        dicompress.run(root / "recipes/flux_dev_clear.yaml", progress=False, echo=lambda *a, **k: None,
                       output=str(tmp_path / "o"))
    assert "--model" in str(e.value) + str(getattr(e.value, "hint", ""))
