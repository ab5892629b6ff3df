"""Dense2MoE (dicompress/moe, passes/dense2moe.py): the split and router math on plain tensors, the MoE FFN against
the dense FFN and a per-token reference, the pass, its artifact (also quantized) and its bad inputs."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from dicompress.moe import (AttnOutPlusMLP, MoEFFN, balanced_assign, expert_mass, fit_router, moe_from_dense, partition_cluster,
                            partition_importance, partition_random, router_recall, split_widths,
                            switch_balance_loss, topk_coverage)

# The MoE FFN at top_k = experts under a uniform router computes the dense FFN with the neurons summed in another
# order (per expert, then added): measured max |difference| ~1e-7 on outputs of magnitude ~1; asserted 1e-5 x max.
RTOL = 1e-5


def _dense(dim=16, hidden=64, seed=0):
    from diffusers.models.attention import FeedForward
    torch.manual_seed(seed)
    ffn = FeedForward(dim, dim_out=dim, inner_dim=hidden, activation_fn="gelu-approximate", bias=True).eval()
    with torch.no_grad():
        ffn.net[2].bias.normal_()
    return ffn


def _per_token(moe: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """Reference: every token on its own, its experts in a Python loop (what the grouped execution must equal)."""
    out = []
    for t in x.reshape(-1, x.shape[-1]):
        idx, gates, _ = moe.route(t[None])
        y = moe.bias.clone() + (moe.shared(t) if moe.shared is not None else 0)
        for e, g in zip(idx[0].tolist(), gates[0]):
            y = y + g * moe.experts[e](t)
        out.append(y)
    return torch.stack(out).reshape(x.shape)


def test_split_widths_and_the_remainder_rule():
    assert split_widths(12288, 7, 0.125) == (1536, 1536)        # FLUX: 3 of 8 equal slices with top-2
    assert split_widths(512, 7, 0.125) == (64, 64)
    assert split_widths(100, 7, 0.1) == (16, 12)                # 10 shared + 6 left over join the shared expert
    assert split_widths(64, 4, shared_width=0) == (0, 16)
    with pytest.raises(ValueError, match="does not fit"):
        split_widths(64, 4, shared_width=64)
    with pytest.raises(ValueError, match="do not fit"):
        split_widths(64, 70, shared_width=0)


def test_partitions_cover_every_neuron_once():
    scores = torch.rand(64, generator=torch.Generator().manual_seed(0))
    act = torch.randn(50, 64, generator=torch.Generator().manual_seed(1))
    for shared, experts in [partition_importance(scores, 8, 7, 8), partition_random(64, 8, 7, 8, seed=3),
                            partition_cluster(act, scores, 8, 7, 8)]:
        assert sorted(torch.cat([shared, *experts]).tolist()) == list(range(64))
        assert len(shared) == 8 and [len(e) for e in experts] == [8] * 7
    shared, experts = partition_importance(scores, 8, 7, 8)
    assert set(shared.tolist()) == set(scores.topk(8).indices.tolist())
    assert scores[experts[0]].min() > scores[experts[1]].max()     # contiguous chunks in score order
    assert not torch.equal(partition_random(64, 8, 7, 8, seed=3)[0], partition_random(64, 8, 7, 8, seed=4)[0])


def test_balanced_assign_fills_every_column_to_width():
    sim = torch.zeros(6, 3)
    sim[:, 0] = 1                                   # everyone prefers column 0
    sim[5, 0] = 2
    got = balanced_assign(sim, 2)
    assert torch.bincount(got, minlength=3).tolist() == [2, 2, 2] and got[5] == 0


def test_cluster_groups_neurons_that_fire_together():
    """Four groups of 8 neurons each fire on their own quarter of the tokens; importance order interleaves them.
    Clustering recovers the groups, so one expert carries each token's whole routed mass."""
    g = torch.Generator().manual_seed(0)
    n, t = 32, 400
    group = torch.arange(n) % 4                      # interleaved: importance chunks mix the groups
    token_group = torch.arange(t) % 4
    act = (token_group[:, None] == group[None]).float() * (1 + torch.rand(t, n, generator=g))
    scores = torch.linspace(2, 1, n)
    _, chunks = partition_importance(scores, 0, 4, 8)
    _, clusters = partition_cluster(act, scores, 0, 4, 8)
    assert sorted(sorted(group[c].tolist()) for c in clusters) == [[k] * 8 for k in range(4)]
    norms = torch.ones(n)
    assert topk_coverage(expert_mass(act, norms, clusters), 1) == pytest.approx(1.0)
    assert topk_coverage(expert_mass(act, norms, chunks), 1) < 0.5


def test_router_fit_picks_the_experts_with_the_most_mass():
    """Masses that are a linear function of the input: the least-squares router recovers their ranking."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 12, generator=g)
    a = torch.randn(4, 12, generator=g)
    mass = (x @ a.T).exp()                           # positive, ranking = ranking of x @ a.T
    w, b = fit_router(x, mass)
    assert w.shape == (4, 12) and b.shape == (4,)
    logits = x @ w.T + b
    assert router_recall(logits, mass, 1) > 0.8
    assert router_recall(torch.randn(2000, 4, generator=g), mass, 1) < 0.4     # chance is 0.25
    assert topk_coverage(mass, 4) == pytest.approx(1.0)


def test_switch_balance_loss():
    uniform = torch.full((10, 4), 0.25)
    assert float(switch_balance_loss(uniform, torch.tensor([5, 5, 5, 5]))) == pytest.approx(1.0)
    one = torch.tensor([[1.0, 0, 0, 0]] * 10)
    assert float(switch_balance_loss(one, torch.tensor([20, 0, 0, 0]))) == pytest.approx(4.0)


def test_all_experts_and_a_uniform_router_give_the_dense_ffn():
    ffn = _dense()
    scores = torch.rand(64, generator=torch.Generator().manual_seed(2))
    shared, experts = partition_importance(scores, 8, 7, 8)
    moe = moe_from_dense(ffn, shared, experts, top_k=7)
    x = torch.randn(2, 30, 16)
    with torch.no_grad():
        ref, out = ffn(x), moe(x)
    assert (out - ref).abs().max() <= RTOL * ref.abs().max()
    # a top-2 MoE drops neurons: it differs
    moe2 = moe_from_dense(ffn, shared, experts, top_k=2)
    with torch.no_grad():
        assert (moe2(x) - ref).abs().max() > 100 * RTOL * ref.abs().max()
    # every expert holds plain linears the quantization passes find; the router is not one of them
    from dicompress.nn.surgery import iter_linears
    names = [n for n, _ in iter_linears(moe, ["*"])]
    assert len(names) == 16 and "router" not in " ".join(names)
    assert moe2.activated_params() == sum(p.numel() for p in moe2.parameters()) - 5 * (16 * 8 + 8 + 8 * 16)


@pytest.mark.parametrize("shared", [8, 0])
def test_grouped_execution_equals_the_per_token_reference(shared):
    ffn = _dense()
    g = torch.Generator().manual_seed(5)
    _, experts = partition_random(64, shared, 7, 8, seed=1) if shared else partition_random(64, 8, 7, 8, seed=1)
    rest = torch.cat(experts)
    if not shared:       # 7 x 8 of the 64 neurons, no shared expert
        experts = [rest[i * 8:(i + 1) * 8] for i in range(7)]
    router = (torch.randn(7, 16, generator=g), torch.randn(7, generator=g))
    moe = moe_from_dense(ffn, torch.arange(shared), experts, top_k=3, router=router)
    x = torch.randn(3, 20, 16, generator=g, requires_grad=True)
    out = moe(x)
    ref = _per_token(moe, x)
    assert (out - ref).abs().max() <= RTOL * ref.abs().max()
    assert moe.aux_loss is not None and float(moe.aux_loss.detach()) > 0
    # the same gradients (through gather / in-place scatter and the gates) as the per-token reference
    r = torch.randn(out.shape, generator=g)
    wrt = [x, moe.router.weight, moe.experts[2].up.weight, moe.experts[5].down.weight]
    got = torch.autograd.grad((out * r).sum(), wrt)
    want = torch.autograd.grad((ref * r).sum(), wrt)
    for a, b in zip(got, want):
        assert b.abs().max() > 0 and (a - b).abs().max() <= 1e-4 * b.abs().max()


# -- the pass -----------------------------------------------------------------------------------------------
import textwrap  # noqa: E402

import yaml  # noqa: E402
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel  # noqa: E402
from diffusers.models.attention import FeedForward  # noqa: E402

import dicompress  # noqa: E402
from dicompress.arch import adapter_for  # noqa: E402
from dicompress.calib import capture  # noqa: E402
from dicompress.distill.losses import normalized_l2  # noqa: E402
from dicompress.errors import RecipeError  # noqa: E402
from dicompress.prune import teacher_io  # noqa: E402
from dicompress.recipe import CalibrationConfig, build_passes  # noqa: E402

FLUX = {"patch_size": 1, "in_channels": 4, "num_layers": 2, "num_single_layers": 1, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6)}
QWEN = {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 1, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 16, "axes_dims_rope": (8, 4, 4)}
FAST = {"steps": 30, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 0}
QUIET = {"progress": False}
FFNS = ("transformer_blocks.0.ff", "transformer_blocks.0.ff_context", "transformer_blocks.1.ff",
        "transformer_blocks.1.ff_context")


def build(cls=FluxTransformer2DModel, cfg=FLUX):
    torch.manual_seed(0)
    return cls(**cfg).eval()


def make_store(model, root):
    cfg = CalibrationConfig(source="synthetic", seeds=[0, 1], steps=2, batch_size=2)
    return capture(model, adapter_for(model), cfg, {"name": "t", "path": root}, root / "s", block_inputs=True,
                   progress=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(build(), tmp_path_factory.mktemp("moe"))


def block_error(model, store, name):
    a = adapter_for(model)
    names = [r.name for r in a.blocks(model)]
    inputs, targets = teacher_io(store, names, names.index(name), names.index(name))
    with torch.no_grad():
        out = a.run_block(model.get_submodule(name), inputs)
    return sum(normalized_l2(out[k], targets[k]).item() for k in ("hidden_states", "encoder_hidden_states"))


def test_split_then_distillation_approach_the_teacher(store):
    split, dist, rand = build(), build(), build()
    s0 = dicompress.compress(split, [{"dense2moe": {"distill": {"steps": 0}}}], calibration=store, **QUIET)
    s1 = dicompress.compress(dist, [{"dense2moe": {"distill": FAST, "balance_weight": 0.05}}], calibration=store,
                             **QUIET)
    dicompress.compress(rand, [{"dense2moe": {"distill": {"steps": 0}, "partition": "random"}}], calibration=store,
                        **QUIET)
    for m in (split, dist):
        assert all(isinstance(b.ff, MoEFFN) and isinstance(b.ff_context, MoEFFN) for b in m.transformer_blocks)
        single = m.single_transformer_blocks[0]                    # the MLP of proj_mlp / proj_out's columns
        assert isinstance(single.proj_mlp, MoEFFN) and isinstance(single.proj_out, AttnOutPlusMLP)
    rep = s1.report["passes"][-1]
    # FFN 32 -> 128: shared 16 + 7 x 16, top-2: 3 of 8 slices plus the router (7 x 33) and the output bias (a
    # single block's MLP: proj_mlp, proj_out's MLP columns and its bias, which the MoE takes over: the same count)
    ffn = 32 * 128 + 128 + 128 * 32 + 32
    active = 16 * 33 + 16 * 32 + 2 * (16 * 33 + 16 * 32) + 7 * 33 + 32
    assert rep["ffns_converted"] == 5 and rep["activated_ffn_param_fraction"] == round(active / ffn, 4)
    assert rep["activated_param_fraction"] < 1 and rep["activated_ffn_param_fraction_model"] == \
        rep["activated_ffn_param_fraction"]                              # every FFN of the model converted
    rows = [r for r in s1.report["layers"] if r["method"] == "dense2moe"]
    assert tuple(r["module"] for r in rows) == FFNS + ("single_transformer_blocks.0.mlp",)
    assert all(len(r["load"]) == 7 and abs(sum(r["load"]) - 1) < 1e-3 for r in rows)
    assert all(r["loss_last"] < r["loss_first"] for r in rows if "loss_first" in r)
    # the fitted router picks better than chance (2 of 7) the experts holding the most mass
    assert s0.report["passes"][-1]["router_recall"] > 2 / 7
    zero = build()                                     # the blocks without FFNs: what any split must beat
    for b in zero.transformer_blocks:
        for f in (b.ff, b.ff_context):
            f.net[2].weight.data.zero_(), f.net[2].bias.data.zero_()
    zero.single_transformer_blocks[0].proj_out.weight.data[:, 32:] = 0
    for name in ("transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0"):
        e_dist, e_split, e_zero = (block_error(m, store, name) for m in (dist, split, zero))
        assert e_dist < e_split < e_zero, (name, e_dist, e_split, e_zero)


def test_a_single_blocks_mlp_split_whole_is_the_dense_block():
    """FLUX single block: all experts routed (top_k = experts) under a uniform router compute the dense block; the
    attention columns of proj_out stay a plain linear."""
    from dicompress.moe.single import install_single_moe, single_mlp_parts
    model = build()
    block = model.single_transformer_blocks[0]
    with torch.no_grad():
        block.proj_out.bias.normal_()
    kw = {"hidden_states": torch.randn(2, 6, 32), "encoder_hidden_states": torch.randn(2, 3, 32),
          "temb": torch.randn(2, 32)}
    with torch.no_grad():
        want = block(**kw)
        shared, experts = partition_random(128, 16, 7, 16, seed=1)
        install_single_moe(block, moe_from_dense(single_mlp_parts(block), shared, experts, top_k=7))
        got = block(**kw)
    assert type(block.proj_out.attn) is nn.Linear and block.proj_out.attn.bias is None
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= RTOL * b.abs().max()


def test_cluster_partition_and_include_keep(store):
    model = build()
    state = dicompress.compress(model, [{"dense2moe": {"include": ["transformer_blocks.*"], "keep": ["*.1"],
                                                       "text_stream": False, "partition": "cluster", "experts": 3,
                                                       "top_k": 1, "shared_width": 32, "distill": {"steps": 0}}}],
                                calibration=store, **QUIET)
    b0, b1 = model.transformer_blocks
    assert isinstance(b0.ff, MoEFFN) and isinstance(b0.ff_context, FeedForward) and isinstance(b1.ff, FeedForward)
    assert (b0.ff.shared_width, b0.ff.n_experts, b0.ff.expert_width, b0.ff.top_k) == (32, 3, 32, 1)
    assert state.report["passes"][-1]["oracle_topk_coverage"] >= state.report["passes"][-1]["router_topk_coverage"]


def test_qwenimage_ffns(tmp_path):
    model = build(QwenImageTransformer2DModel, QWEN)
    dicompress.compress(model, [{"dense2moe": {"distill": {**FAST, "steps": 2}}}],
                        calibration=make_store(model, tmp_path), **QUIET)
    assert all(isinstance(b.img_mlp, MoEFFN) and isinstance(b.txt_mlp, MoEFFN) for b in model.transformer_blocks)
    kw = adapter_for(model).synthetic_inputs(model, 2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.isfinite(model(**kw).sample).all()


LOAD = textwrap.dedent("""
    import sys, torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from dicompress.arch import adapter_for
    from dicompress.moe import MoEFFN
    art, pipe_dir, out = sys.argv[1:4]
    torch.set_num_threads(1)     # as the test process (conftest): GEMM reductions then round the same way
    t = FluxTransformer2DModel.from_pretrained(art)
    assert sum(isinstance(m, MoEFFN) for m in t.modules()) == 2 * len(t.transformer_blocks) + len(t.single_transformer_blocks)
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


def test_artifact_loads_in_a_fresh_process_and_runs_in_the_pipeline(tiny_flux_pipeline_dir, tmp_path):
    src = str(tiny_flux_pipeline_dir / "transformer")
    model = FluxTransformer2DModel.from_pretrained(src, torch_dtype=torch.float32)
    state = dicompress.compress(model, [{"dense2moe": {"distill": {**FAST, "steps": 3}}}],
                                calibration=make_store(model, tmp_path), **QUIET)
    kw = adapter_for(model).synthetic_inputs(model, 2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(**kw).sample
    art = dicompress.save(state, tmp_path / "art")
    run = subprocess.run([sys.executable, "-c", LOAD, str(art), str(tiny_flux_pipeline_dir), str(tmp_path / "o.pt")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "o.pt"), ours)
    manifest = json.loads((art / "config.json").read_text())["quantization_config"]["manifest"]
    assert [e["op"] for e in manifest] == ["moe_ffn"] * (4 + len(model.single_transformer_blocks))
    assert [e["module"] for e in manifest if e.get("ffn") == "mlp"] == [
        f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))]
    assert manifest[0]["experts"] == 7 and manifest[0]["top_k"] == 2 and manifest[0]["shared"] + 7 * \
        manifest[0]["expert_width"] == manifest[0]["hidden"]
    assert torch.equal(dicompress.load(art)(**kw).sample, ours)


def _recipe(tmp_path, model_dir, passes, name, **extra):
    data = {"model": str(model_dir), "output": str(tmp_path / name), "passes": passes,
            "calibration": {"source": "classes", "classes": [0, 5], "seeds": [0], "steps": 2, "batch_size": 2},
            "eval": {"enabled": False}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_dense2moe_then_w4a8_writes_one_artifact_that_loads(tiny_zoo_dir, tmp_path):
    """Each expert's linears are quantized like any linear (the routers stay fp32); the write-time load check
    finds the artifact computing what the model in memory did."""
    from dicompress.nn.qlinear import QuantLinear
    passes = [{"dense2moe": {"distill": {**FAST, "steps": 2}}}, {"smooth": {"alpha": 0.5}},
              {"tlq": {"bits": 4, "granularity": "channel"}}, {"act_quant": {"bits": 8}}]
    report = dicompress.run(_recipe(tmp_path, tiny_zoo_dir, passes, "w"), progress=False, echo=lambda *a, **k: None)
    assert all(p["bit_exact"] for p in report["load_check"]["probes"])
    art = tmp_path / "w"
    manifest = json.loads((art / "config.json").read_text())["quantization_config"]["manifest"]
    ops = [(e["op"], e["module"]) for e in manifest]
    assert ops[:4] == [("moe_ffn", f"transformer_blocks.{i}.{f}") for i in (0, 1) for f in ("ff", "ff_context")]
    quantized = {m for op, m in ops if op == "quantize"}
    assert {"transformer_blocks.0.ff.shared.up", "transformer_blocks.0.ff.experts.6.down",
            "transformer_blocks.1.ff_context.experts.0.up"} <= quantized
    assert {"single_transformer_blocks.0.proj_mlp.shared.up", "single_transformer_blocks.0.proj_mlp.experts.2.down",
            "single_transformer_blocks.0.proj_out.attn"} <= quantized
    assert not any("router" in m for m in quantized)
    model = FluxTransformer2DModel.from_pretrained(art)
    ff = model.transformer_blocks[0].ff
    assert isinstance(ff, MoEFFN) and isinstance(ff.experts[3].up, QuantLinear) and ff.router.weight.dtype == \
        torch.float32


def test_bad_inputs_before_any_work(store, tiny_zoo_dir, tmp_path):
    with pytest.raises(RecipeError, match=r"top_k \(8\) is larger than the number of routed experts \(7\)"):
        build_passes([{"dense2moe": {"top_k": 8}}])
    with pytest.raises(RecipeError, match="before quantization"):
        build_passes([{"tlq": {"bits": 4}}, {"dense2moe": {}}])
    with pytest.raises(RecipeError, match="shared_fraction"):
        build_passes([{"dense2moe": {"shared_fraction": 1.0}}])
    ok = build_passes([{"dense2moe": {}}, {"tlq": {"bits": 4}}])
    assert ok[0].changes_structure and ok[0].needs_block_inputs and not ok[0].needs_teacher
    assert build_passes([{"dense2moe": {"end_to_end": {"steps": 1}}}])[0].needs_teacher
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for cfg, msg in [({"include": ["nothing.*"]}, "no FFN selected"),
                     ({"keep": ["*"]}, "no FFN selected"),
                     ({"shared_width": 128}, r"shared expert of 128 neurons does not fit an FFN of 128"),
                     ({"experts": 200}, "200 routed experts do not fit the 112 neurons")]:
        with pytest.raises(RecipeError, match=msg):
            dicompress.compress(model, [{"dense2moe": cfg}], calibration=store, **QUIET)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # in a recipe: refused before calibration is captured or anything is written
    cache = tmp_path / "cache"
    path = _recipe(tmp_path, tiny_zoo_dir, [{"dense2moe": {"experts": 500}}], "bad")
    with pytest.raises(RecipeError, match=r"passes\[0\].dense2moe.experts"):
        dicompress.run(path, progress=False, echo=lambda *a, **k: None)
    assert not (tmp_path / "bad").exists() and not list(cache.rglob("meta.json"))


def test_taylor_scores_and_token_sample(store):
    """A neuron the block's output never reads (its down column zero) scores 0; the token sample is bounded."""
    from dicompress.moe.calibrate import ffn_statistics
    model = build()
    block = model.transformer_blocks[0]
    with torch.no_grad():
        block.ff.net[2].weight[:, 5] = 0
    stats = ffn_statistics(block, adapter_for(model), store.iter_block_inputs("transformer_blocks.0"),
                           ["ff", "ff_context"], probes=2, tokens=100)
    s = stats["ff"]["scores"]
    assert s.shape == (128,) and s[5] == 0 and (s[torch.arange(128) != 5] > 0).all()
    assert stats["ff"]["inputs"].shape == (100, 32) and stats["ff_context"]["scores"].gt(0).all()
    assert all(p.grad is None for p in model.parameters())          # only the activations' gradients


def test_an_idle_expert_still_sees_one_token_and_adds_nothing():
    """Calibration hooks on every expert linear get inputs even when the router sends no token to an expert."""
    ffn = _dense()
    shared, experts = partition_importance(torch.rand(64, generator=torch.Generator().manual_seed(0)), 8, 7, 8)
    bias = torch.zeros(7)
    bias[6] = -1e4                                   # expert 6 never wins
    moe = moe_from_dense(ffn, shared, experts, top_k=2, router=(torch.randn(7, 16) * 0.1, bias))
    seen = []
    moe.experts[6].down.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    x = torch.randn(2, 10, 16)
    with torch.no_grad():
        out = moe(x)
        ref = _per_token(moe, x)
    assert seen[0] == 1 and (out - ref).abs().max() <= RTOL * ref.abs().max()


def test_a_dense2moe_artifact_can_be_the_next_recipes_model(tmp_path):
    """MoE FFNs restructure, they do not rewrite linears: a chained recipe (dense2moe -> quantize) may start from
    the artifact; an artifact with quantized linears may not."""
    import json as _json
    from dicompress.errors import ModelError
    from dicompress.job import source_manifest

    def artifact(ops):
        d = tmp_path / "_".join(ops)
        d.mkdir()
        (d / "config.json").write_text(_json.dumps({"_class_name": "FluxTransformer2DModel", "quantization_config": {
            "quant_method": "dicompress", "manifest": [{"op": op, "module": "transformer_blocks.0.ff"} for op in ops]}}))
        return d
    assert [e["op"] for e in source_manifest(artifact(["moe_ffn", "width"]))] == ["moe_ffn", "width"]
    with pytest.raises(ModelError, match="already rewritten"):
        source_manifest(artifact(["moe_ffn", "tlq"]))
