"""Mixture of Blocks (moe/blocks.py, moe/mob_train.py, passes/mob.py): the gate math on plain tensors, the gated
execution against the plain block, the pass, its artifact (alone, after dense2moe, then quantized) and bad input."""
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
from dicompress.errors import RecipeError
from dicompress.moe.blocks import gate_block, gumbel_sigmoid, initial_bias, is_gated, skip_threshold
from dicompress.moe.mob_train import budget_loss, groups_of
from dicompress.recipe import CalibrationConfig, build_passes

FLUX = {"patch_size": 1, "in_channels": 4, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6)}
QUIET = {"progress": False}
FAST = {"distill": {"steps": 15, "lr": 1e-2, "batch_size": 4, "checkpoint_every": 0},
        "recovery": {"steps": 3, "batch_size": 4, "checkpoint_every": 0}}
BLOCKS = ("transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1")


def build():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX).eval()


def make_store(model, root):
    cfg = CalibrationConfig(source="synthetic", seeds=[0, 1, 2], steps=2, batch_size=3)
    return capture(model, adapter_for(model), cfg, {"name": "t", "path": root}, root / "s", block_inputs=True,
                   progress=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(build(), tmp_path_factory.mktemp("mob"))


def test_threshold_skips_exactly_the_asked_count():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.3], [5.0, -0.2, 0.1, 1.0]])
    want = [0, 1, 2, 3, 5, 5, 6, 7, 8]                    # the two 0.3 (same temb) are skipped together
    for k in range(9):
        t = skip_threshold(logits, k)
        assert int((logits - t <= 0).sum()) == want[k]    # folded into the bias: run iff logit - t > 0
    with pytest.raises(ValueError):
        skip_threshold(logits, 9)
    assert torch.sigmoid(torch.tensor(initial_bias(0.7))).item() == pytest.approx(0.7)


def test_gumbel_sigmoid_is_hard_forward_and_differentiable():
    logits = torch.tensor([-3.0, 0.0, 3.0]).repeat(2000).requires_grad_(True)
    g = gumbel_sigmoid(logits, 0.5, torch.Generator().manual_seed(0))
    assert set(g.detach().unique().tolist()) <= {0.0, 1.0}
    rate = g.detach().reshape(-1, 3).mean(0)               # Bernoulli(sigmoid(logit)) samples
    assert torch.allclose(rate, torch.sigmoid(torch.tensor([-3.0, 0.0, 3.0])), atol=0.04)
    (grad,) = torch.autograd.grad(g.sum(), logits)
    assert (grad >= 0).all() and (grad > 0).float().mean() > 0.9    # the sigmoid's gradient (tails underflow)
    assert float(budget_loss([torch.full((4,), 0.75), torch.full((4,), 0.25)], 0.5)) == pytest.approx(0.0)
    assert float(budget_loss([torch.ones(4)], 0.3)) == pytest.approx(0.09)


def test_groups():
    assert groups_of(12, 3) == [(0, 2), (3, 5), (6, 8), (9, 11)]
    with pytest.raises(ValueError, match="does not divide"):
        groups_of(12, 5)


@pytest.mark.parametrize("name", ["transformer_blocks.1", "single_transformer_blocks.0"])
def test_gated_block_runs_only_the_chosen_samples(name):
    """Samples whose router logit is > 0 get the plain block's output (computed on those rows alone); the others
    pass through untouched, and the block's attention never sees their rows. Keys of the block stay."""
    model = build()
    block = model.get_submodule(name)
    keys = set(block.state_dict())
    g = torch.Generator().manual_seed(1)
    b, dim = 5, 32
    hid, enc = torch.randn(b, 16, dim, generator=g), torch.randn(b, 4, dim, generator=g)
    temb = torch.randn(b, dim, generator=g)
    with torch.no_grad():
        ref_enc, ref_hid = block(hid, enc, temb)
    gate_block(block, dim)
    assert is_gated(block) and set(block.state_dict()) - keys == {"mob_router.weight", "mob_router.bias"}
    run = torch.tensor([True, False, True, True, False])
    with torch.no_grad():                                    # logits: +1 for run, -1 for skip
        block.mob_router.weight.zero_()
        temb[:, 0] = torch.where(run, 10.0, -10.0)            # silu(10) ~ 10, silu(-10) ~ 0
        block.mob_router.weight[0, 0] = 1.0
        block.mob_router.bias.fill_(-5.0)
        ref_enc, ref_hid = model.get_submodule(name).__class__.__mro__[2].forward(block, hid[run], enc[run], temb[run])
    rows = []
    block.attn.register_forward_pre_hook(lambda m, a, k: rows.append(k["hidden_states"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        out_enc, out_hid = block(hid, enc, temb)
    assert rows == [3]
    assert torch.equal(out_hid[run], ref_hid) and torch.equal(out_enc[run], ref_enc)
    assert torch.equal(out_hid[~run], hid[~run]) and torch.equal(out_enc[~run], enc[~run])
    with torch.no_grad():                                    # batch 1, skipped: the very inputs, no compute
        e1, h1 = block(hid[1:2], enc[1:2], temb[1:2])
    assert h1 is not None and torch.equal(h1, hid[1:2]) and torch.equal(e1, enc[1:2]) and rows == [3]


def test_pass_meets_the_budget_and_keeps_the_keys(store):
    model = build()
    keys = set(model.state_dict())
    state = dicompress.compress(model, [{"mob": {"skip": 0.25, "group_size": 2, **FAST}}], calibration=store,
                                **QUIET)
    rep = state.report["passes"][-1]
    assert rep["skippable"] == 2 and rep["groups"] == 2
    assert rep["skipped_block_fraction"] == 0.25           # 18 rows x 4 blocks: 18 executions skipped exactly
    gated = [n for n in BLOCKS if is_gated(model.get_submodule(n))]
    assert gated == ["transformer_blocks.1", "single_transformer_blocks.0"]         # not the first or the last
    assert set(model.state_dict()) - keys == {f"{n}.mob_router.{p}" for n in gated for p in ("weight", "bias")}
    assert keys <= set(model.state_dict())
    assert [e["op"] for e in state.manifest] == ["mob_gate", "mob_gate"]
    rates = {r["module"]: r["skip_rate"] for r in state.report["layers"]}
    assert rates["transformer_blocks.0"] == 0 and sum(rates.values()) == pytest.approx(1.0)
    assert rep["routers"]["steps"] == 15 and len(rep["recovery"]) == 2
    for g, (first, last) in zip(rep["recovery"], [BLOCKS[:2], BLOCKS[2:]]):      # a group without skips: untouched
        assert g["steps"] == (3 if rates[first] + rates[last] > 0 else 0)
    assert rep["activated_param_fraction"] < 1
    # the model skips on the calibration rows as binarised: run its blocks on the captured inputs
    from dicompress.moe.mob_train import router_logits
    names = list(BLOCKS)
    logits = router_logits(model, store, names, [1, 2])
    assert int((logits <= 0).sum()) == 18


def test_end_to_end_recovery_keeps_the_binarised_routers(store):
    """With `end_to_end`, every block's weights then learn the teacher's predictions through the hard gates: the
    routers (no gradient through a hard skip) and so the skip decisions stay as binarised."""
    model, teacher = build(), build()
    state = dicompress.compress(model, [{"mob": {"skip": 0.25, "group_size": 2, **FAST, "end_to_end": {
        "steps": 3, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 0}}}], calibration=store, teacher=teacher,
                                **QUIET)
    rep = state.report["passes"][-1]
    assert rep["end_to_end"]["steps"] == 3 and rep["skipped_block_fraction"] == 0.25
    plain = build()
    dicompress.compress(plain, [{"mob": {"skip": 0.25, "group_size": 2, **FAST}}], calibration=store, **QUIET)
    for name in ("transformer_blocks.1", "single_transformer_blocks.0"):
        a, b = model.get_submodule(name), plain.get_submodule(name)
        assert torch.equal(a.mob_router.weight, b.mob_router.weight)
        assert not torch.equal(a.attn.to_q.weight, b.attn.to_q.weight)
    with pytest.raises(Exception, match="needs the uncompressed teacher"):
        dicompress.compress(build(), [{"mob": {"group_size": 2, "end_to_end": {"steps": 1}}}], calibration=store,
                            **QUIET)


LOAD = textwrap.dedent("""
    import sys, torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from dicompress.arch import adapter_for
    from dicompress.moe.blocks import is_gated
    art, pipe_dir, out = sys.argv[1:4]
    torch.set_num_threads(1)
    t = FluxTransformer2DModel.from_pretrained(art)
    assert sum(is_gated(m) for m in t.modules()) == 2
    kw = adapter_for(t).synthetic_inputs(t, 3, torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.save(t(**kw).sample, out)
    pipe = FluxPipeline.from_pretrained(pipe_dir, transformer=t, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    lat = pipe(prompt=["a red cat"], num_inference_steps=2, height=64, width=64, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert lat.shape == (1, 16, 64) and torch.isfinite(lat).all()
    print("OK")
""")


def test_artifact_loads_through_from_pretrained(store, tmp_path):
    model = build()
    state = dicompress.compress(model, [{"mob": {"skip": 0.25, "group_size": 2, **FAST}}], calibration=store, **QUIET)
    kw = adapter_for(model).synthetic_inputs(model, 6, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(**kw).sample
    art = dicompress.save(state, tmp_path / "art")
    manifest = json.loads((art / "config.json").read_text())["quantization_config"]["manifest"]
    assert [(e["op"], e["block"]) for e in manifest] == [("mob_gate", "FluxTransformerBlock"),
                                                        ("mob_gate", "FluxSingleTransformerBlock")]
    loaded = FluxTransformer2DModel.from_pretrained(art)
    assert [n for n in BLOCKS if is_gated(loaded.get_submodule(n))] == ["transformer_blocks.1",
                                                                         "single_transformer_blocks.0"]
    assert torch.equal(loaded.transformer_blocks[1].mob_router.bias, model.transformer_blocks[1].mob_router.bias)
    with torch.no_grad():
        assert torch.equal(loaded(**kw).sample, ours)


@pytest.mark.slow   # a fresh interpreter importing diffusers and a pipeline run: ~60 s on the shared CPU
def test_artifact_loads_in_a_fresh_process_and_runs_in_the_pipeline(tiny_flux_pipeline_dir, tmp_path):
    src = str(tiny_flux_pipeline_dir / "transformer")
    model = FluxTransformer2DModel.from_pretrained(src, torch_dtype=torch.float32)
    state = dicompress.compress(model, [{"mob": {"skip": 0.3, "group_size": 2, **FAST}}],
                                calibration=make_store(model, tmp_path), **QUIET)
    kw = adapter_for(model).synthetic_inputs(model, 3, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(**kw).sample
    art = dicompress.save(state, tmp_path / "art")
    run = subprocess.run([sys.executable, "-c", LOAD, str(art), str(tiny_flux_pipeline_dir), str(tmp_path / "o.pt")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "o.pt"), ours)
    manifest = json.loads((art / "config.json").read_text())["quantization_config"]["manifest"]
    assert [(e["op"], e["block"]) for e in manifest] == [("mob_gate", "FluxTransformerBlock"),
                                                        ("mob_gate", "FluxSingleTransformerBlock")]


def _recipe(tmp_path, model_dir, passes, name):
    data = {"model": str(model_dir), "output": str(tmp_path / name), "passes": passes,
            "calibration": {"source": "classes", "classes": [0, 5], "seeds": [0], "steps": 2, "batch_size": 2},
            "eval": {"enabled": False}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_dense2moe_then_mob_then_w4a8_is_one_artifact(tiny_zoo_dir, tmp_path):
    """The blocks keep their linears' keys under the gating: tlq quantizes them (routers stay fp32) and the
    write-time load check finds the artifact computing what the model in memory did."""
    from dicompress.moe import MoEFFN
    from dicompress.nn.qlinear import QuantLinear
    passes = [{"dense2moe": {"distill": {"steps": 0}}},
              {"mob": {"skip": 0.25, "group_size": 2, "distill": {**FAST["distill"], "steps": 3},
                       "recovery": {"steps": 0}}},
              # the gated blocks' linears only: tlq's grid search costs ~0.15 s a linear here
              {"tlq": {"bits": 4, "granularity": "channel", "include": ["transformer_blocks.1.attn.to_*",
                                                                        "transformer_blocks.1.ff.*",
                                                                        "single_transformer_blocks.0.attn.to_*"]}},
              {"act_quant": {"bits": 8}}]
    report = dicompress.run(_recipe(tmp_path, tiny_zoo_dir, passes, "w"), progress=False, echo=lambda *a, **k: None)
    assert all(p["bit_exact"] for p in report["load_check"]["probes"])
    manifest = json.loads((tmp_path / "w" / "config.json").read_text())["quantization_config"]["manifest"]
    ops = [(e["op"], e["module"]) for e in manifest]
    gates = [i for i, (op, _) in enumerate(ops) if op == "mob_gate"]
    assert [ops[i][1] for i in gates] == ["transformer_blocks.1", "single_transformer_blocks.0"]
    assert max(i for i, (op, _) in enumerate(ops) if op == "moe_ffn") < gates[0] < min(
        i for i, (op, _) in enumerate(ops) if op == "quantize")                  # replayed in the passes' order
    quantized = {m for op, m in ops if op == "quantize"}
    assert {"transformer_blocks.1.attn.to_q", "transformer_blocks.1.ff.experts.0.up",
            "single_transformer_blocks.0.attn.to_q"} <= quantized
    assert not any("router" in m for m in quantized)
    model = FluxTransformer2DModel.from_pretrained(tmp_path / "w")
    b = model.transformer_blocks[1]
    assert is_gated(b) and isinstance(b.ff, MoEFFN) and isinstance(b.attn.to_q, QuantLinear)
    assert b.mob_router.weight.dtype == torch.float32


def test_bad_inputs_before_any_work(store, tiny_zoo_dir, tmp_path):
    for cfg, msg in [({"skip": 0}, "skip"), ({"skip": 1.0}, "skip"), ({"temperature": 0}, "temperature")]:
        with pytest.raises(RecipeError, match=msg):
            build_passes([{"mob": cfg}])
    with pytest.raises(RecipeError, match="before quantization"):
        build_passes([{"tlq": {"bits": 4}}, {"mob": {}}])
    with pytest.raises(RecipeError, match="second mob"):
        build_passes([{"mob": {}}, {"mob": {}}])
    assert build_passes([{"dense2moe": {}}, {"mob": {}}, {"tlq": {"bits": 4}}])[1].changes_structure
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for cfg, msg in [({"group_size": 3}, "group size of 3 does not divide the 4 blocks"),
                     ({"keep": ["*"], "group_size": 2}, "no skippable block"),
                     ({"include": ["nothing"], "group_size": 2}, "no skippable block"),
                     ({"skip": 0.6, "group_size": 2}, "needs more than the 2 skippable blocks")]:
        with pytest.raises(RecipeError, match=msg):
            dicompress.compress(model, [{"mob": cfg}], calibration=store, **QUIET)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(is_gated(m) for m in model.modules())
    with pytest.raises(RecipeError, match=r"passes\[1\]\.mob\.group_size"):      # in a recipe: before capture
        dicompress.run(_recipe(tmp_path, tiny_zoo_dir, [{"dense2moe": {}}, {"mob": {"group_size": 5}}], "bad"),
                       progress=False, echo=lambda *a, **k: None)
    assert not (tmp_path / "bad").exists()
    qwen = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                       axes_dims_rope=(8, 4, 4))
    from dicompress.passes.mob import MoB
    assert "FLUX" in MoB().check_model(qwen, adapter_for(qwen))[0][1]


def test_shipped_recipe_validates():
    from dicompress.recipe import load_recipe
    r = load_recipe("recipes/tiny_flux_moe_mob.yaml")
    passes = build_passes(r.passes)
    assert [p.name for p in passes] == ["dense2moe", "mob"] and passes[1].config.skip == 0.25
