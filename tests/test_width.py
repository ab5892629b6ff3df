"""Width pruning (prune/width.py, width_plan.py, width_importance.py, passes/width_prune.py): whole heads and FFN
neurons removed physically, recorded per block, rebuilt at load time."""
import copy
import json
import subprocess
import sys

import pytest
import torch
import yaml

import dicompress
from dicompress.arch import adapter_for
from dicompress.errors import RecipeError
from dicompress.io.manifest import replay
from dicompress.passes import PASSES
from dicompress.prune.width import BlockKeep, block_shape, layout_for, prune_width
from dicompress.prune.width_groups import unit_groups
from dicompress.prune.width_importance import unit_scores
from dicompress.prune.width_plan import WidthBudgetError, plan_global, plan_uniform, uniform_counts
from dicompress.recipe import build_passes

FLUX = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=3, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(4, 6, 6))
QWEN = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
# The pruned model computes the zeroed model's function with smaller GEMMs: equal up to fp32 summation order.
# Measured max |difference| 2.4e-7 on outputs of magnitude ~1.5; asserted: 1e-5 x the output's max magnitude.
RTOL = 1e-5


def _flux():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX).eval()


def _qwen():
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**QWEN).eval()


def _inputs(model, batch=2):
    return adapter_for(model).synthetic_inputs(model, batch, torch.Generator().manual_seed(1))


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _keep_pattern(model):
    """Drop head 1 everywhere and every third neuron of every FFN (some blocks keep everything of one kind)."""
    a = adapter_for(model)
    keep = {}
    for i, r in enumerate(a.blocks(model)):
        lay = layout_for(a, r.stream)
        s = block_shape(model.get_submodule(r.name), lay)
        keep[r.name] = BlockKeep([0, 2] if i != 1 else None,
                                 {k: [j for j in range(n) if j % 3 != 1] for k, n in s.ffn.items()})
    return keep


@torch.no_grad()
def _zero_removed(model, keep):
    """Zero every weight and bias of the units `keep` drops: the function the pruned model must compute."""
    a = adapter_for(model)
    for r in a.blocks(model):
        b, lay = model.get_submodule(r.name), layout_for(a, r.stream)
        s = block_shape(b, lay)
        hd, k = s.head_dim, keep[r.name]
        for h in set(range(s.heads)) - set(k.heads if k.heads is not None else range(s.heads)):
            for n in lay.qkv:
                b.get_submodule(n).weight[h * hd:(h + 1) * hd] = 0
                b.get_submodule(n).bias[h * hd:(h + 1) * hd] = 0
            for n in lay.out:
                b.get_submodule(n).weight[:, h * hd:(h + 1) * hd] = 0
        for f in lay.ffns:
            off = s.heads * hd if f.after_heads else 0
            for j in set(range(s.ffn[f.key])) - set(k.ffn.get(f.key, range(s.ffn[f.key]))):
                b.get_submodule(f.up).weight[j] = 0
                b.get_submodule(f.up).bias[j] = 0
                b.get_submodule(f.down).weight[:, off + j] = 0


@pytest.mark.parametrize("make", [_flux, _qwen], ids=["flux", "qwenimage"])
def test_pruned_model_equals_the_zeroed_model(make):
    model = make()
    keep = _keep_pattern(model)
    _zero_removed(model, keep)
    inputs = _inputs(model)
    ref = _out(model, inputs)
    before = sum(p.numel() for p in model.parameters())
    a = adapter_for(model)
    shapes = {r.name: block_shape(model.get_submodule(r.name), layout_for(a, r.stream)) for r in a.blocks(model)}
    entries = prune_width(model, a, keep)
    out = _out(model, inputs)
    assert (out - ref).abs().max() <= RTOL * ref.abs().max()
    # parameter count as computed from the units' costs
    removed = sum((s.heads - len(keep[n].heads or range(s.heads))) * s.head_params +
                  sum((s.ffn[k] - len(v)) * s.neuron_params[k] for k, v in keep[n].ffn.items())
                  for n, s in shapes.items())
    assert sum(p.numel() for p in model.parameters()) == before - removed
    # attributes the attention processors read follow; qk-norms keep head_dim
    for e in entries:
        attn = model.get_submodule(e["module"]).attn
        assert attn.heads == e["heads"] and attn.inner_dim == e["heads"] * e["head_dim"]
        assert attn.norm_q.weight.shape == (e["head_dim"],)
    single = [e for e in entries if e["module"].startswith("single")]
    for e in single:
        b = model.get_submodule(e["module"])
        assert b.mlp_hidden_dim == e["ffn"]["mlp"] == b.proj_mlp.out_features
        assert b.proj_out.in_features == e["heads"] * e["head_dim"] + e["ffn"]["mlp"]
    # the manifest replayed on a fresh meta model gives exactly these shapes
    meta = copy.deepcopy(make()).to("meta")
    replay(meta, entries)
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_dependency_graph_supplies_the_dual_stream_ffn_groups():
    model = _flux()
    a = adapter_for(model)
    for r in a.blocks(model):
        groups = unit_groups(model.get_submodule(r.name), a, r.stream)
        traced = sorted(k for k, g in groups.items() if g._DG is not None)
        assert traced == (["ff", "ff_context"] if r.stream == "double" else [])


def _scale_unit(model, name, stream, kind, index, factor):
    a = adapter_for(model)
    b, lay = model.get_submodule(name), layout_for(a, stream)
    s = block_shape(b, lay)
    with torch.no_grad():
        if kind == "heads":
            hd = s.head_dim
            for n in lay.qkv:
                b.get_submodule(n).weight[index * hd:(index + 1) * hd] *= factor
            for n in lay.out:
                b.get_submodule(n).weight[:, index * hd:(index + 1) * hd] *= factor
        else:
            f = lay.ffn(kind)
            off = s.heads * s.head_dim if f.after_heads else 0
            b.get_submodule(f.up).weight[index] *= factor
            b.get_submodule(f.down).weight[:, off + index] *= factor


def test_magnitude_picks_the_smallest_norm_units():
    model = _flux()
    a = adapter_for(model)
    refs = a.blocks(model)
    _scale_unit(model, "transformer_blocks.0", "double", "heads", 2, 0.01)
    _scale_unit(model, "single_transformer_blocks.1", "single", "heads", 0, 0.01)
    _scale_unit(model, "transformer_blocks.1", "double", "ff_context", 7, 0.01)
    _scale_unit(model, "single_transformer_blocks.0", "single", "mlp", 100, 0.01)
    scores, _ = unit_scores(model, a, refs, "magnitude")
    assert int(scores["transformer_blocks.0"]["heads"].argmin()) == 2
    assert int(scores["single_transformer_blocks.1"]["heads"].argmin()) == 0
    assert int(scores["transformer_blocks.1"]["ff_context"].argmin()) == 7
    assert int(scores["single_transformer_blocks.0"]["mlp"].argmin()) == 100
    # the score is the unit's squared L2 norm (weights, no biases), as torch-pruning's group magnitude with sum
    b = model.transformer_blocks[0]
    lay, hd = layout_for(a, "double"), 16
    want = sum(b.get_submodule(n).weight[hd:2 * hd].pow(2).sum() for n in lay.qkv) + \
        sum(b.get_submodule(n).weight[:, hd:2 * hd].pow(2).sum() for n in lay.out)
    assert torch.allclose(scores["transformer_blocks.0"]["heads"][1], want.detach(), rtol=1e-5)
    # the uniform plan then removes exactly those
    shapes = {r.name: block_shape(model.get_submodule(r.name), layout_for(a, r.stream)) for r in refs}
    keep = plan_uniform({"transformer_blocks.0": shapes["transformer_blocks.0"]}, scores, 0.3, True,
                        ("ff", "ff_context"))
    assert keep["transformer_blocks.0"].heads == [0, 1]


def test_taylor_scores_a_head_the_output_ignores_zero():
    model = _flux()
    a = adapter_for(model)
    b = model.single_transformer_blocks[1]
    with torch.no_grad():     # head 1 of the last single block writes nothing: proj_out's columns are zero
        b.proj_out.weight[:, 16:32] = 0
    inputs = _inputs(model, batch=4)
    refs = [r for r in a.blocks(model) if r.name == "single_transformer_blocks.1"]
    scores, info = unit_scores(model, a, refs, "taylor", model_inputs=inputs, batch=4, probes=2)
    heads = scores["single_transformer_blocks.1"]["heads"]
    assert heads[1] == 0 and (heads[[0, 2]] > 0).all() and info["probes"] == 2
    assert all(p.grad is None for p in model.parameters())      # gradients cleaned up
    again, _ = unit_scores(model, a, refs, "taylor", model_inputs=inputs, batch=4, probes=2)
    assert torch.equal(again["single_transformer_blocks.1"]["heads"], heads)      # seeded


def test_random_is_seeded():
    model = _flux()
    a = adapter_for(model)
    refs = a.blocks(model)
    s0, _ = unit_scores(model, a, refs, "random", seed=0)
    s0b, _ = unit_scores(model, a, refs, "random", seed=0)
    s1, _ = unit_scores(model, a, refs, "random", seed=1)
    assert torch.equal(s0["transformer_blocks.0"]["ff"], s0b["transformer_blocks.0"]["ff"])
    assert not torch.equal(s0["transformer_blocks.0"]["ff"], s1["transformer_blocks.0"]["ff"])


def test_allocations_meet_the_budget():
    model = _flux()
    a = adapter_for(model)
    refs = a.blocks(model)
    shapes = {r.name: block_shape(model.get_submodule(r.name), layout_for(a, r.stream)) for r in refs}
    scores, _ = unit_scores(model, a, refs, "magnitude")
    ffns = ("ff", "ff_context", "mlp")
    for plan in (plan_uniform, plan_global):
        m = copy.deepcopy(model)
        keep = plan(shapes, scores, 0.2, True, ffns)
        before = sum(s.params for s in shapes.values())
        prune_width(m, a, keep)
        after = sum(p.numel() for r in refs for p in m.get_submodule(r.name).parameters())
        biggest = max(max(s.head_params, *s.neuron_params.values()) for s in shapes.values())
        if plan is plan_global:       # stops at the first unit that meets the budget
            assert 0 <= (before - after) - 0.2 * before < biggest
        else:                         # per block: heads rounded, neurons absorb the rounding
            assert abs((before - after) - 0.2 * before) <= len(refs) * 2 * biggest
        assert all(k.heads and all(k.ffn.values()) for k in keep.values())


def test_budgets_that_cannot_be_met():
    model = _flux()
    a = adapter_for(model)
    s = block_shape(model.transformer_blocks[0], layout_for(a, "double"))
    with pytest.raises(WidthBudgetError, match="at least one head must stay"):
        uniform_counts("transformer_blocks.0", s, 0.6, True, ())       # heads alone: 60% of the block > its heads
    with pytest.raises(WidthBudgetError, match="at least one"):
        uniform_counts("transformer_blocks.0", s, 0.95, True, ("ff", "ff_context"))
    counts = uniform_counts("transformer_blocks.0", s, 0.2, True, ("ff", "ff_context"))
    assert 0 < counts["heads"] < 3 and counts["ff"] > 0


def test_config_and_order_errors_before_any_work():
    with pytest.raises(RecipeError, match="greater than 0"):
        build_passes([{"width_prune": {"ratio": 0}}])
    with pytest.raises(RecipeError, match="less than 1"):
        build_passes([{"width_prune": {"ratio": 1}}])
    with pytest.raises(RecipeError, match="nothing to prune"):
        build_passes([{"width_prune": {"ratio": 0.2, "heads": False, "ffn": False}}])
    with pytest.raises(RecipeError, match="before quantization"):
        build_passes([{"tlq": {"bits": 4}}, {"width_prune": {"ratio": 0.2}}])
    with pytest.raises(RecipeError, match="before quantization"):
        build_passes([{"smooth": {}}, {"width_prune": {"ratio": 0.2}}])
    # a depth pass after width pruning is refused by the depth pass (it trains on the captured blocks)
    with pytest.raises(RecipeError, match="depth passes first"):
        build_passes([{"width_prune": {"ratio": 0.2}}, {"amber_depth": {"remove_blocks": 1}}])
    # ARS needs Hadamard orders; arbitrary kept widths would fail only after the pruning ran
    with pytest.raises(RecipeError, match="widths: hadamard"):
        build_passes([{"width_prune": {"ratio": 0.2}}, {"ars": {}}])
    assert build_passes([{"width_prune": {"ratio": 0.2, "widths": "hadamard"}}, {"ars": {}}])
    ok = build_passes([{"width_prune": {"ratio": 0.2}}, {"tlq": {"bits": 4}}])
    assert ok[0].changes_structure and not ok[0].needs_calibration
    assert build_passes([{"width_prune": {"ratio": 0.2, "importance": "taylor"}}])[0].needs_model_inputs
    assert PASSES["width_prune"].streamable is False


def test_width_pruning_refuses_ffns_another_pass_replaced():
    """ppcl_width / dense2moe swap FFN modules: width pruning after them is refused in the recipe, and a model
    (e.g. an artifact) whose FFN is a projector is refused by the pass's model check, naming the module."""
    from dicompress.prune.projector import ResidualProjector
    for first in ({"ppcl_width": {}}, {"dense2moe": {}}):
        for width in ("width_prune", "mask_prune"):
            with pytest.raises(RecipeError, match="replaces FFN modules"):
                build_passes([first, {width: {"ratio": 0.2}}])
    assert build_passes([{"width_prune": {"ratio": 0.2}}, {"ppcl_width": {}}])     # the other order is fine
    model = _flux()
    model.transformer_blocks[0].ff = ResidualProjector(model.config.num_attention_heads *
                                                       model.config.attention_head_dim)
    problems = build_passes([{"width_prune": {"ratio": 0.2}}])[0].check_model(model, adapter_for(model))
    assert problems and "ff.net.0.proj" in problems[0][1] and "ResidualProjector" in problems[0][1]


def _recipe(tmp_path, model_dir, passes, name, **extra):
    data = {"model": str(model_dir), "output": str(tmp_path / name), "passes": passes,
            "calibration": {"source": "classes", "classes": [0, 5], "seeds": [0], "steps": 2, "batch_size": 2},
            "eval": {"samples_per_class": 1, "steps": 2, "grid": False}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_refuses_a_ratio_that_empties_a_block_before_any_work(tiny_zoo_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DICOMPRESS_CACHE", str(cache))
    path = _recipe(tmp_path, tiny_zoo_dir, [{"width_prune": {"ratio": 0.6, "ffn": False}}], "bad")
    with pytest.raises(RecipeError, match=r"passes\[0\].width_prune.ratio.*at least one head") as e:
        dicompress.run(path, progress=False, echo=lambda *a, **k: None)
    assert str(path) in str(e.value)
    assert not (tmp_path / "bad").exists() and not list(cache.rglob("meta.json"))   # nothing captured or written
    path = _recipe(tmp_path, tiny_zoo_dir, [{"width_prune": {"ratio": 0.2, "importance": "taylor"}}], "nocal")
    data = yaml.safe_load(path.read_text())
    del data["calibration"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="needs calibration"):
        dicompress.run(path, progress=False, echo=lambda *a, **k: None)


LOAD = """
import sys, json, torch
import diffusers
import dicompress
from dicompress.arch import adapter_for
cls = getattr(diffusers, json.load(open(sys.argv[1] + "/config.json"))["_class_name"])
a = cls.from_pretrained(sys.argv[1])
b = dicompress.load(sys.argv[1])
inputs = adapter_for(a).synthetic_inputs(a, 2, torch.Generator().manual_seed(1))
with torch.no_grad():
    out = a(**inputs, return_dict=False)[0]
torch.save(out, sys.argv[2])
print(json.dumps({"heads": [blk.attn.heads for blk in a.transformer_blocks] +
                            [blk.attn.heads for blk in getattr(a, "single_transformer_blocks", [])],
                  "params": sum(p.numel() for p in a.parameters()),
                  "same": all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))}))
"""


@pytest.mark.parametrize("make", [_flux, _qwen], ids=["flux", "qwenimage"])
def test_artifact_loads_in_a_fresh_process_as_the_pruned_model(make, tmp_path):
    model = make()
    model.register_to_config(_name_or_path="random")
    state = dicompress.compress(model, [{"width_prune": {"ratio": 0.25, "allocation": "global"}}], progress=False)
    dicompress.save(state, tmp_path / "art")
    inputs = _inputs(model)
    ref = _out(model, inputs)
    out = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "art"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["same"] and got["params"] == sum(p.numel() for p in model.parameters())
    assert got["heads"] == [blk.attn.heads for blk in model.transformer_blocks] + \
        [blk.attn.heads for blk in getattr(model, "single_transformer_blocks", [])]
    assert min(got["heads"]) < 3                     # something was pruned (global: not every block alike)
    assert torch.equal(torch.load(tmp_path / "out.pt"), ref)
    n = len(adapter_for(model).blocks(model))
    rows = [r for r in state.report["layers"] if r.get("method") == "width_prune"]
    assert len(rows) == n and all({"kept_heads", "heads", "removed_fraction"} <= set(r) for r in rows)
    manifest = json.loads((tmp_path / "art" / "config.json").read_text())["quantization_config"]["manifest"]
    assert [e["op"] for e in manifest] == ["width"] * n


def test_hadamard_widths_let_rotation_follow():
    from dicompress.quant.hadamard import can_hadamard
    model = _flux()
    state = dicompress.compress(model, [{"width_prune": {"ratio": 0.2, "widths": "hadamard"}}], progress=False)
    inputs_of = [m.in_features for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.endswith(("to_out.0", "to_add_out", "net.2", "proj_out"))
                 and "blocks" in n]
    assert inputs_of and all(can_hadamard(n) for n in inputs_of)
    assert 0.15 < state.report["passes"][0]["removed_fraction"] < 0.25
    with pytest.raises(RecipeError, match="widths"):
        build_passes([{"width_prune": {"ratio": 0.2, "widths": "pow2"}}])


def test_the_run_writes_what_it_pruned_bit_for_bit(tiny_zoo_dir, tmp_path):
    """The write-time check loads the artifact as users do: the pruned model in memory and the loaded one agree
    bit for bit on the probes (the pass realigns the mmapped tensors from_pretrained handed it)."""
    path = _recipe(tmp_path, tiny_zoo_dir, [{"width_prune": {"ratio": 0.2}}, {"act_quant": {"bits": 8}}], "w",
                   eval={"enabled": False})
    report = dicompress.run(path, progress=False, echo=lambda *a, **k: None)
    probes = report["load_check"]["probes"]
    assert len(probes) == 3 and all(p["bit_exact"] for p in probes), probes
    width = report["passes"][0]
    assert width["pass"] == "width_prune" and 0.15 < width["removed_fraction"] < 0.25


def test_pass_realigns_mmapped_parameters():
    """from_pretrained hands out views into the mmapped file at unaligned offsets, where CPU GEMMs round 1 ulp
    differently from the loaded artifact's realigned copies; the pass leaves every CPU tensor 64-byte aligned."""
    model = _flux()
    with torch.no_grad():
        for p in list(model.parameters())[:8]:      # embedders and the first block: unaligned views, as mmapped
            buf = torch.empty(p.numel() + 1)
            buf[1:] = p.detach().reshape(-1)
            p.data = buf[1:].view(p.shape)
    assert any(p.data_ptr() % 64 for p in model.parameters())
    dicompress.compress(model, [{"width_prune": {"ratio": 0.2}}], progress=False)
    assert not any(p.data_ptr() % 64 for p in model.parameters())


def test_a_width_pruned_artifact_is_the_next_recipes_model(tiny_zoo_dir, tmp_path):
    """prune -> quantize as one recipe or as two chained recipes: equal tensors and manifests."""
    from safetensors.torch import load_file
    prune, quant = {"width_prune": {"ratio": 0.2}}, {"tlq": {"bits": 4, "gptq": True}}
    off = {"eval": {"enabled": False}}
    dicompress.run(_recipe(tmp_path, tiny_zoo_dir, [prune, quant], "one", **off), progress=False,
                   echo=lambda *a, **k: None)
    dicompress.run(_recipe(tmp_path, tiny_zoo_dir, [prune], "first", **off), progress=False, echo=lambda *a, **k: None)
    dicompress.run(_recipe(tmp_path, tmp_path / "first", [quant], "two", **off), progress=False,
                   echo=lambda *a, **k: None)
    a, b = ({k: v for f in sorted((tmp_path / d).glob("*.safetensors")) if f.name.startswith("diffusion")
             for k, v in load_file(str(f)).items()} for d in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifests = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]["manifest"]
                 for d in ("one", "two")]
    assert manifests[0] == manifests[1] and [e["op"] for e in manifests[0]].count("width") == 4
