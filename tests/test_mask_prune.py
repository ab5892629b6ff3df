"""Differentiable-mask width pruning (prune/masks.py, prune/trajectory.py, passes/mask_prune.py): hard-concrete
gates, masks that equal width pruning, the captured trajectories replayed, time-step gradient checkpointing equal
to plain backpropagation at one step's activation memory, the pass end to end."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import dicompress
from dicompress.arch import adapter_for
from dicompress.calib import capture
from dicompress.errors import CalibrationError, RecipeError
from dicompress.models import load_transformer, resolve_model
from dicompress.passes import PASSES
from dicompress.prune.masks import (MaskSet, deterministic_gate, hard_concrete, prob_nonzero, uniform_noise)
from dicompress.prune.trajectory import (Trajectories, activation_peaks, check_replay, checkpointed_grad, full_grad,
                                         model_velocity, peak_memory_by_steps, replay_error, trajectories_from_rows)
from dicompress.prune.width import BlockKeep, layout_for, prune_width
from dicompress.recipe import CalibrationConfig, build_passes

ROOT = Path(__file__).resolve().parents[1]
FLUX = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=3, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(4, 6, 6))
QWEN = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
QUIET = dict(progress=False, echo=lambda *a, **k: None)


def _flux(dtype=torch.float32):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX).eval().to(dtype)


def _qwen():
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**QWEN).eval()


def _all_units(model):
    a = adapter_for(model)
    refs = a.blocks(model)
    return a, refs, {r.name: tuple(f.key for f in layout_for(a, r.stream).ffns) for r in refs}


# -- hard concrete -----------------------------------------------------------------------------------------

def test_hard_concrete_gates():
    la = torch.tensor([-4.0, -1.0, 0.0, 1.0, 3.0])
    # log_alpha 3 (the initialisation) opens the deterministic gate fully; -4 closes it
    g = deterministic_gate(la)
    assert g[-1] == 1 and g[0] == 0 and ((g >= 0) & (g <= 1)).all()
    # the formula at fixed noise: s = clamp(sigmoid((log u - log(1 - u) + la) / 0.83) * 1.2 - 0.1, 0, 1)
    u = torch.tensor([0.3, 0.5, 0.7, 0.2, 0.9])
    ref = (torch.sigmoid((u.log() - (1 - u).log() + la) / 0.83) * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(hard_concrete(la, u), ref)
    # P(gate != 0) against sampling frequency (200k draws per unit: standard error < 0.0012)
    n = 200_000
    draws = hard_concrete(la.expand(n, -1), uniform_noise((n, 5), torch.Generator().manual_seed(0)))
    torch.testing.assert_close((draws > 0).float().mean(0), prob_nonzero(la), atol=0.006, rtol=0)
    assert ((draws == 0).any(0) & (draws == 1).any(0))[1:4].all()     # exact 0 and 1 both occur
    # differentiable in log_alpha where the gate is strictly inside (0, 1)
    x = la.clone().requires_grad_(True)
    hard_concrete(x, torch.full((5,), 0.5)).sum().backward()
    assert x.grad[2] > 0


# -- masks equal width pruning ------------------------------------------------------------------------------

def _keep_pattern(masks):
    """Drop head 1 of every block but the second and every third neuron of every FFN."""
    keep, gates = {}, {}
    for i, r in enumerate(masks.refs):
        s = masks.shapes[r.name]
        k = BlockKeep([0, 2] if i != 1 else None, {})
        gates[(r.name, "heads")] = torch.tensor([1.0, 0.0 if i != 1 else 1.0, 1.0])
        for key, n in s.ffn.items():
            k.ffn[key] = [j for j in range(n) if j % 3 != 1]
            gates[(r.name, key)] = torch.tensor([0.0 if j % 3 == 1 else 1.0 for j in range(n)])
        keep[r.name] = k
    return keep, gates


@pytest.mark.parametrize("make", [_flux, _qwen], ids=["flux", "qwenimage"])
def test_a_binary_mask_computes_the_pruned_model(make):
    model = make()
    a, refs, ffns = _all_units(model)
    masks = MaskSet(model, a, refs, True, ffns)
    inputs = a.synthetic_inputs(model, 2, torch.Generator().manual_seed(1))
    keep, gates = _keep_pattern(masks)
    with torch.no_grad():
        with masks.applied(model):
            masks.gates = gates
            masked = model(**inputs, return_dict=False)[0]
            masks.gates = None
            whole = model(**inputs, return_dict=False)[0]
        prune_width(model, a, keep)
        pruned = model(**inputs, return_dict=False)[0]
    # same function, smaller GEMMs: equal up to fp32 summation order (as tests/test_width.py)
    assert (masked - pruned).abs().max() <= 1e-5 * pruned.abs().max()
    assert (whole - pruned).abs().max() > 1e-3 * pruned.abs().max()      # the mask did something
    assert not any(h for b in model.modules() for h in b._forward_pre_hooks.values())   # hooks removed


def test_expected_kept_fraction_counts_parameters():
    model = _flux()
    a, refs, ffns = _all_units(model)
    masks = MaskSet(model, a, refs, True, ffns)
    with torch.no_grad():
        for la in masks.log_alpha:
            la.fill_(50.0)
        assert abs(float(masks.expected_kept_fraction()) - 1) < 1e-6
        for la, u in zip(masks.log_alpha, masks.units):
            la.fill_(-50.0 if u.kind != "heads" else 50.0)
    every = sum(s.params for s in masks.shapes.values())
    ffn_params = sum(n * s.neuron_params[k] for s in masks.shapes.values() for k, n in s.ffn.items())
    assert abs(float(masks.expected_kept_fraction().detach()) - (1 - ffn_params / every)) < 1e-6


# -- trajectories ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo_store(tiny_zoo_dir, tmp_path_factory):
    """3 samples in chunks of 2 and 1 (two chunk sizes), 4 steps."""
    info = resolve_model(str(tiny_zoo_dir))
    model = load_transformer(info)
    cfg = CalibrationConfig(source="classes", classes=[1, 7, 3], seeds=[0], steps=4, batch_size=2)
    store = capture(model, adapter_for(model), cfg, {"name": info.name, "path": info.path},
                    tmp_path_factory.mktemp("mask_calib") / "store", block_inputs=True, progress=False)
    return model, store


def test_replaying_the_teacher_reproduces_the_captured_rows(zoo_store):
    model, store = zoo_store
    mi = store.model_inputs()
    traj = trajectories_from_rows(mi, store.meta)
    assert traj.samples == 3 and traj.steps == 4
    assert traj.rows.tolist() == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 9, 10, 11]]
    assert (traj.sigmas[:, 0] == 1).all() and (traj.sigmas[:, -1] == 0).all()
    assert (traj.sigmas[:, 1:] < traj.sigmas[:, :-1]).all()
    # the flow-matching Euler loop rebuilt here is the pipeline's: every captured latent, all 3 samples
    err = replay_error(model, traj, mi, torch.arange(3))
    assert err < 1e-5, err
    # ...and a pipeline that does not step with the model's output is refused (velocity scaled: guidance-like)
    bad = {k: v for k, v in mi.items()}
    bad["hidden_states"] = mi["hidden_states"] * 1.1
    with pytest.raises(CalibrationError, match="not the model's flow-matching Euler trajectories"):
        check_replay(model, traj, type(mi)(bad, mi.per_sample))
    with pytest.raises(CalibrationError, match="synthetic"):
        trajectories_from_rows(mi, {"source": "synthetic"})
    # the benchmark's meter on these trajectories (mask training as the pass does it); parameters left as found
    before = [p.requires_grad for p in model.parameters()]
    mem = peak_memory_by_steps(model, adapter_for(model), mi, steps=(2, 4))
    assert mem["checkpointed"][2] == mem["checkpointed"][4] < mem["plain"][2] < mem["plain"][4]
    assert [p.requires_grad for p in model.parameters()] == before


def _synthetic_traj(model, samples=2, steps=4):
    a = adapter_for(model)
    kw = a.synthetic_inputs(model, samples, torch.Generator().manual_seed(3))
    p = next(model.parameters())
    per = {k: kw[k].to(p.dtype) for k in ("encoder_hidden_states", "pooled_projections")}
    t = Trajectories(kw["hidden_states"].to(p.dtype), torch.zeros(samples, 1), per,
                     {"img_ids": kw["img_ids"], "txt_ids": kw["txt_ids"]}, torch.empty(samples, 0))
    return t.with_steps(steps)


def _masked(model, dtype=torch.float32):
    a, refs, ffns = _all_units(model)
    masks = MaskSet(model, a, refs, True, ffns)
    with torch.no_grad():
        for la in masks.log_alpha:
            la.copy_(torch.randn(la.shape, generator=torch.Generator().manual_seed(la.numel())))
    for p in model.parameters():
        p.requires_grad_(False)
    return masks


def test_checkpointed_gradient_equals_plain_backpropagation():
    """fp64, 6 steps, masks of every head and neuron with random logits and one hard-concrete draw: the two ways
    agree to 1e-10 of the gradient's magnitude (they compute the same products in a different order)."""
    model = _flux(torch.float64)
    masks = _masked(model)
    traj = _synthetic_traj(model, steps=6)
    idx = torch.arange(2)
    u = [x.double() for x in masks.noise(torch.Generator().manual_seed(0))]
    target = torch.randn(traj.z0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    params = list(masks.log_alpha)
    with masks.applied(model):
        v0 = model_velocity(model, traj, idx)

        def vel(z, s):
            masks.gates = masks.sampled(u)
            return v0(z, s)
        loss_fn = lambda z: (z - target).square().mean()   # noqa: E731
        l1, g1 = checkpointed_grad(vel, traj.z0, traj.sigmas, loss_fn, params)
        l2, g2 = full_grad(vel, traj.z0, traj.sigmas, loss_fn, params)
    scale = max(float(g.abs().max()) for g in g2)
    assert scale > 0 and torch.equal(l1, l2)
    assert max(float((a - b).abs().max()) for a, b in zip(g1, g2)) <= 1e-10 * scale


def test_checkpointed_activation_memory_is_flat_in_the_steps():
    model = _flux()
    masks = _masked(model)
    traj = _synthetic_traj(model, samples=1)
    u = masks.noise(torch.Generator().manual_seed(0))
    idx = torch.arange(1)
    with masks.applied(model):
        def make():
            v0 = model_velocity(model, traj, idx)

            def vel(z, s):
                masks.gates = masks.sampled(u)
                return v0(z, s)
            return vel
        mem = activation_peaks(model, make, traj, idx, list(masks.log_alpha), steps=(4, 8, 16, 32))
    ck, plain = mem["checkpointed"], mem["plain"]
    assert max(ck.values()) <= 1.1 * min(ck.values()), ck          # flat within 10%
    assert plain[32] > 6 * plain[4] and plain[8] > 1.5 * plain[4], plain   # grows with T
    assert ck[4] < plain[4]


# -- the pass -----------------------------------------------------------------------------------------------

def _recipe(tmp_path, model_dir, passes, name, calibration=None, **extra):
    data = {"model": str(model_dir), "output": str(tmp_path / name), "passes": passes,
            "calibration": calibration or {"source": "classes", "classes": [0, 5], "seeds": [0], "steps": 3,
                                           "batch_size": 2},
            "eval": {"samples_per_class": 1, "steps": 3, "grid": False}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


LOAD = """
import sys, json, torch
from diffusers import FluxTransformer2DModel
import dicompress
from dicompress.zoo import load_conditioning
from dicompress.zoo.sampler import sample
a = FluxTransformer2DModel.from_pretrained(sys.argv[1])
b = dicompress.load(sys.argv[1])
x = sample(a, load_conditioning(sys.argv[1]), [0, 5], [7, 8], steps=3)     # in diffusers' FluxPipeline
y = sample(b, load_conditioning(sys.argv[1]), [0, 5], [7, 8], steps=3)
print(json.dumps({"ffn": [blk.ff.net[0].proj.out_features for blk in a.transformer_blocks],
                  "mlp": [blk.proj_mlp.out_features for blk in a.single_transformer_blocks],
                  "finite": bool(torch.isfinite(x).all()), "same": bool(torch.equal(x, y))}))
"""


def test_the_pass_writes_an_artifact_diffusers_loads_and_samples(tiny_zoo_dir, tmp_path):
    cfg = {"ratio": 0.2, "heads": False, "steps": 3, "batch": 2}
    report = dicompress.run(_recipe(tmp_path, tiny_zoo_dir, [{"mask_prune": cfg}], "m", eval={"enabled": False}),
                            **QUIET)
    p = report["passes"][0]
    assert p["pass"] == "mask_prune" and 0.18 < p["removed_fraction"] < 0.22 and p["heads_removed"] == 0
    assert p["trajectories"] == 2 and p["sampling_steps"] == 3 and len(p["loss_curve"]) == 3
    assert all(pr["bit_exact"] for pr in report["load_check"]["probes"])
    out = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "m")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["finite"] and got["same"]
    assert all(w < 128 for w in got["ffn"] + got["mlp"])          # every FFN narrower than its 4 x 32
    rows = [r for r in report["layers"] if r.get("method") == "mask_prune"]
    assert len(rows) == 4


def test_mask_prune_then_w4a8_writes_one_artifact(tiny_zoo_dir, tmp_path):
    passes = [{"mask_prune": {"ratio": 0.25, "steps": 2, "batch": 1, "loss": "onestep", "allocation": "global"}},
              {"tlq": {"bits": 4, "gptq": True}}, {"act_quant": {"bits": 8}}]
    report = dicompress.run(_recipe(tmp_path, tiny_zoo_dir, passes, "q", eval={"enabled": False}), **QUIET)
    assert [p["pass"] for p in report["passes"]] == ["mask_prune", "tlq", "act_quant"]
    assert report["passes"][0]["loss"] == "onestep"
    manifest = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["manifest"]
    assert [e["op"] for e in manifest].count("width") == 4
    assert all(pr["bit_exact"] for pr in report["load_check"]["probes"])
    assert len(list((tmp_path / "q").glob("diffusion_pytorch_model*.safetensors"))) == 1


# -- bad input ----------------------------------------------------------------------------------------------

def test_bad_config_and_order_before_any_work():
    for ratio, msg in ((0, "greater than 0"), (1, "less than 1")):
        with pytest.raises(RecipeError, match=msg):
            build_passes([{"mask_prune": {"ratio": ratio}}])
    with pytest.raises(RecipeError, match="nothing to prune"):
        build_passes([{"mask_prune": {"ratio": 0.2, "heads": False, "ffn": False}}])
    with pytest.raises(RecipeError, match="loss"):
        build_passes([{"mask_prune": {"ratio": 0.2, "loss": "final"}}])
    for before in ({"tlq": {"bits": 4}}, {"smooth": {}}, {"ars": {}}, {"act_quant": {"bits": 8}}):
        with pytest.raises(RecipeError, match="before quantization"):
            build_passes([before, {"mask_prune": {"ratio": 0.2}}])
    p = build_passes([{"mask_prune": {"ratio": 0.2}}])[0]
    assert p.changes_structure and p.needs_calibration and p.needs_model_inputs and not p.needs_block_inputs
    assert PASSES["mask_prune"].streamable is False


@pytest.mark.parametrize("cfg,match", [
    ({"ratio": 0.6, "heads": True, "ffn": False}, r"mask_prune.ratio.*at least one head must stay"),   # heads only
    ({"ratio": 0.95, "heads": False}, r"mask_prune.ratio.*at least one neuron"),          # above what FFNs hold
    ({"ratio": 0.9, "heads": False, "allocation": "global"}, r"mask_prune.ratio.*only"),
])
def test_unreachable_budgets_are_refused_before_any_work(tiny_zoo_dir, tmp_path, monkeypatch, cfg, match):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DICOMPRESS_CACHE", str(cache))
    path = _recipe(tmp_path, tiny_zoo_dir, [{"mask_prune": cfg}], "bad")
    with pytest.raises(RecipeError, match=match):
        dicompress.run(path, **QUIET)
    assert not (tmp_path / "bad").exists() and not list(cache.rglob("meta.json"))   # nothing captured or written


def test_synthetic_calibration_is_refused_before_capture(tiny_zoo_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DICOMPRESS_CACHE", str(cache))
    path = _recipe(tmp_path, tiny_zoo_dir, [{"mask_prune": {"ratio": 0.2, "steps": 1}}], "syn",
                   calibration={"source": "synthetic", "seeds": [0], "steps": 2, "batch_size": 2},
                   eval={"enabled": False})
    with pytest.raises(RecipeError, match=r"passes\[0\].mask_prune.*synthetic"):
        dicompress.run(path, **QUIET)
    assert not (tmp_path / "syn").exists() and not list(cache.rglob("meta.json"))   # nothing captured or written


def test_rotation_after_mask_prune_needs_hadamard_widths():
    with pytest.raises(RecipeError, match=r"widths: hadamard.*mask_prune"):
        build_passes([{"mask_prune": {"ratio": 0.2}}, {"ars": {}}])
    assert build_passes([{"mask_prune": {"ratio": 0.2, "widths": "hadamard"}}, {"ars": {}}])


def test_threshold_binarisation_must_reach_the_budget(tiny_zoo_dir, tmp_path):
    """Two steps leave every gate open: a threshold removes nothing, far from the 20% asked, and says so (plain
    backpropagation here, the other way's run)."""
    cfg = {"ratio": 0.2, "steps": 2, "batch": 1, "binarize": "threshold", "checkpointing": False}
    path = _recipe(tmp_path, tiny_zoo_dir, [{"mask_prune": cfg}], "thr", eval={"enabled": False})
    with pytest.raises(RecipeError, match=r"remove 0.000 .* not 0.2"):
        dicompress.run(path, **QUIET)
    assert not (tmp_path / "thr").exists()


def test_flux_dev_recipe_validates_and_fails_fast_without_weights(tmp_path):
    from dicompress.recipe import load_recipe
    r = load_recipe(ROOT / "recipes/flux_dev_mask20.yaml")
    assert [p.name for p in r.pass_objects()] == ["mask_prune"]
    assert [p.name for p in load_recipe(ROOT / "recipes/tiny_flux_mask20.yaml").pass_objects()] == \
        ["mask_prune", "smooth", "ars", "tlq", "act_quant"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "dicompress.cli", "run", "recipes/flux_dev_mask20.yaml"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert time.time() - t0 < 60
    assert p.returncode == 2, p.stderr
    assert "FLUX.1-dev" in p.stderr and "--model" in p.stderr and "Traceback" not in p.stderr
