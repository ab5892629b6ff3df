"""Depth pruning: the index logic, PPCL / Amber / hybrid-stream passes on a real FluxTransformer2DModel,
artifacts that load through diffusers (and unplug PPCL intervals), and the bad inputs."""
import pytest
import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

import dicompress
from dicompress.arch import adapter_for
from dicompress.calib import capture
from dicompress.errors import DistillError, ModelError, RecipeError
from dicompress.prune import amber_groups, average_parameters_, check_intervals, random_intervals
from dicompress.recipe import CalibrationConfig, parse_recipe

FLUX = {"patch_size": 1, "in_channels": 4, "num_layers": 2, "num_single_layers": 3, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6)}
QWEN = {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
        "num_attention_heads": 3, "joint_attention_dim": 16, "axes_dims_rope": (8, 4, 4)}
FAST = {"steps": 6, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 0}


def build():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX).eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth")
    model = build()
    cfg = CalibrationConfig(source="synthetic", seeds=[0, 1], steps=2, batch_size=2)
    return capture(model, adapter_for(model), cfg, {"name": "t", "path": root}, root / "s", block_inputs=True,
                   progress=False)


def refs():
    return adapter_for(build()).blocks(build())


def predict(model, seed=3):
    kw = adapter_for(model).synthetic_inputs(model, 2, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(**kw).sample


# -- index logic ---------------------------------------------------------------------------------------
def test_check_intervals():
    r = refs()                                   # 0, 1 double; 2, 3, 4 single
    assert check_intervals([[3, 4], [0, 1]], r) == [(0, 1), (3, 4)]
    for bad, msg in [([[1, 2]], "crosses"), ([[2, 5]], "0 <= start"), ([[2, 3], [3, 4]], "overlap"),
                     ([[3, 3]], "removes nothing")]:
        with pytest.raises(ValueError, match=msg):
            check_intervals(bad, r)


def test_amber_groups_join_the_previous_kept_block():
    r = refs()
    assert amber_groups(r, {3}) == [(2, 2, 3)]
    assert amber_groups(r, {2, 3}) == [(4, 2, 4)]          # a run opening its list joins the block after it
    assert amber_groups(r, {0, 1, 4}) == [(3, 3, 4)]       # the double list lost every block: no partner
    assert amber_groups(r, set()) == []


def test_random_intervals_remove_exactly():
    r = refs()
    for seed in range(5):
        ivs = random_intervals(r, 2, max_len=3, seed=seed)
        check_intervals(ivs, r)
        assert sum(e - s for s, e in ivs) == 2


def test_average_parameters():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    want = (a.weight.detach() + b.weight.detach()) / 2
    average_parameters_(a, [b])
    torch.testing.assert_close(a.weight.detach(), want)


# -- passes ----------------------------------------------------------------------------------------------
def test_ppcl_artifact_loads_and_unplugs_to_the_teacher(store, tmp_path):
    model = build()
    teacher_out = predict(model)
    state = dicompress.compress(model, [{"ppcl_depth": {"intervals": [[2, 4]], "distill": FAST}}],
                                calibration=store, progress=False)
    assert model.config.num_single_layers == 1 and len(model.single_transformer_blocks) == 1
    rep = state.report["passes"][-1]
    assert rep["removed_blocks"] == 2
    assert rep["blocks_left"] == {"transformer_blocks": 2, "single_transformer_blocks": 1}
    row = state.report["layers"][-1]
    assert row["loss_last"] < row["loss_first"]
    out = dicompress.save(state, tmp_path / "a")
    pruned = FluxTransformer2DModel.from_pretrained(out)       # diffusers' own loader builds the pruned depth
    assert len(pruned.single_transformer_blocks) == 1
    torch.testing.assert_close(predict(pruned), predict(model))
    restored = dicompress.load(out, plug=[])                   # every interval unplugged: the teacher again
    assert len(restored.single_transformer_blocks) == 3 and restored.config.num_single_layers == 3
    torch.testing.assert_close(predict(restored), teacher_out)
    with pytest.raises(dicompress.ArtifactError, match="intervals"):
        dicompress.load(out, plug=[7])


def test_ppcl_auto_uses_the_analysis(store):
    model = build()
    state = dicompress.compress(model, [{"depth_analysis": {"plot": False}},
                                        {"ppcl_depth": {"ratio": 0.4, "max_interval": 3, "distill": FAST}}],
                                calibration=store, progress=False)
    assert state.report["passes"][-1]["removed_blocks"] == 2
    assert len(model.transformer_blocks) + len(model.single_transformer_blocks) == 3


def test_amber_removes_least_important_and_averages(store):
    model = build()
    state = dicompress.compress(model, [{"amber_depth": {"remove_blocks": 2, "distill": FAST}}],
                                calibration=store, progress=False)
    rep = state.report["passes"][-1]
    assert rep["removed_blocks"] == 2
    assert len(model.transformer_blocks) + len(model.single_transformer_blocks) == 3
    assert [e["op"] for e in state.manifest] == ["remove_block", "remove_block"]
    assert torch.isfinite(predict(model)).all()


def test_hybrid_stream_makes_real_single_blocks(store, tmp_path):
    model = build()
    state = dicompress.compress(model, [{"hybrid_stream": {"convert": 1, "distill": FAST}}], calibration=store,
                                progress=False)
    assert (model.config.num_layers, model.config.num_single_layers) == (1, 4)
    assert isinstance(model.single_transformer_blocks[0], FluxSingleTransformerBlock)
    out = dicompress.save(state, tmp_path / "h")
    loaded = FluxTransformer2DModel.from_pretrained(out)
    torch.testing.assert_close(predict(loaded), predict(model))


def test_single_from_double_keeps_the_image_branch():
    model = build()
    double = model.transformer_blocks[1]
    single = adapter_for(model).single_from_double(model, double)
    torch.testing.assert_close(single.attn.to_q.weight, double.attn.to_q.weight)
    torch.testing.assert_close(single.proj_out.weight[:, :32], double.attn.to_out[0].weight)
    torch.testing.assert_close(single.proj_out.weight[:, 32:], double.ff.net[2].weight)


# -- bad input -------------------------------------------------------------------------------------------
def test_bad_depth_inputs(store):
    cases = [({"ppcl_depth": {"intervals": [[2, 3], [3, 4]], "distill": FAST}}, RecipeError, "overlap"),
             ({"ppcl_depth": {"intervals": [[3, 9]], "distill": FAST}}, RecipeError, "start < end"),
             ({"amber_depth": {"remove_blocks": 5, "distill": FAST}}, RecipeError, "leaves no block"),
             ({"amber_depth": {"ratio": 0.5, "distill": FAST, "end_to_end": FAST}}, DistillError, "teacher")]
    for p, err, msg in cases:
        with pytest.raises(err, match=msg):
            dicompress.compress(build(), [p], calibration=store, progress=False)
    with pytest.raises(ModelError, match="single-stream"):
        torch.manual_seed(0)
        qwen = QwenImageTransformer2DModel(**QWEN)
        from dicompress.passes import get_pass
        from dicompress.state import CompressionState
        get_pass("hybrid_stream")(convert=1).apply(CompressionState(model=qwen, adapter=adapter_for(qwen),
                                                                    calibration=store, progress=False))


def test_depth_recipe_rules():
    base = {"model": "zoo:tiny-flux-digits", "output": "out/x", "calibration": {"source": "classes"}}
    with pytest.raises(RecipeError, match="depth passes first"):
        parse_recipe({**base, "passes": [{"tlq": {"bits": 4}}, {"ppcl_depth": {"ratio": 0.5}}]}, "r.yaml")
    with pytest.raises(RecipeError, match="one depth pass"):
        parse_recipe({**base, "passes": [{"amber_depth": {"ratio": 0.3}}, {"hybrid_stream": {"convert": 1}}]}, "r.yaml")
    # passes that read block data after a depth pass are fine: the run captures again on the pruned model
    parse_recipe({**base, "passes": [{"ppcl_depth": {"ratio": 0.3}}, {"smooth": {}}]}, "r.yaml")
    parse_recipe({**base, "passes": [{"ppcl_depth": {"ratio": 0.3}}, {"tlq": {"bits": 4}}, {"distill": {}}]}, "r.yaml")
    with pytest.raises(RecipeError, match="exactly one of remove_blocks or ratio"):
        parse_recipe({**base, "passes": [{"ppcl_depth": {}}]}, "r.yaml")
