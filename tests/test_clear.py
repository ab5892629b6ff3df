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
from dicompress.clear.processor import ClearContext, FluxClearAttnProcessor, ids_layout, install_clear
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
