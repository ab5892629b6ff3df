"""Recovery distillation: losses, the training engine (resume, keys, many processes), layer-wise and
end-to-end distillation on a real tiny FLUX, model inputs in the calibration store, the `distill` pass."""
import copy
import math
import os
import socket
import time

import pytest
import torch
import yaml
from diffusers import FluxTransformer2DModel
from torch import nn

import dicompress
from dicompress.arch import adapter_for
from dicompress.calib import CalibrationStore, capture
from dicompress.distill import (
    DistillConfig,
    distill_block,
    distill_end_to_end,
    mse,
    normalized_l2,
    train,
)
from dicompress.distill.engine import checkpoint_path
from dicompress.errors import CalibrationError, DistillError
from dicompress.models import load_transformer, resolve_model
from dicompress.recipe import CalibrationConfig

FLUX = {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6)}
DIST_RTOL = 1e-4   # 2 processes vs 1: the same update up to float summation order


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: with 2 OpenMP threads on a busy shared CPU a step took ~300x longer than with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- losses --------------------------------------------------------------------------------------
def test_losses():
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 16, generator=g)
    base = normalized_l2(p, t)
    torch.testing.assert_close(normalized_l2(p * 7.5, t), base)
    torch.testing.assert_close(normalized_l2(p * torch.rand(3, 5, 1, generator=g) + 0, t), base)  # per token
    assert float(normalized_l2(t, t)) == pytest.approx(0.0, abs=1e-6)
    e = torch.eye(4)   # orthogonal unit tokens: |a - b|^2 = 2 each; opposite tokens: 4
    assert float(normalized_l2(e[:2], e[2:])) == pytest.approx(2.0)
    assert float(normalized_l2(e[:1], -e[:1])) == pytest.approx(4.0)
    assert float(mse(p, p)) == 0.0 and float(mse(torch.zeros(2), torch.ones(2) * 2)) == pytest.approx(4.0)


# -- the engine ----------------------------------------------------------------------------------
def regression(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.randn(8, 4, generator=g) + 0.1 * torch.randn(n, 4, generator=g)
    torch.manual_seed(seed + 1)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)), x, y


def mse_rows(module, x, y):
    return lambda idx: mse(module(x[idx]), y[idx])


def test_train_reduces_loss():
    m, x, y = regression()
    losses = train(m, mse_rows(m, x, y), len(x), DistillConfig(steps=60, lr=0.03, batch_size=16), key="k",
                   progress=False)
    assert len(losses) == 60 and losses[-1] < 0.2 * losses[0]
    assert all(p.grad is None for p in m.parameters())


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    cfg = DistillConfig(steps=20, lr=0.02, batch_size=8, checkpoint_every=5, warmup_steps=3)
    ref, x, y = regression()
    ref_losses = train(ref, mse_rows(ref, x, y), len(x), cfg, key="r:0:e2e", progress=False)

    m, _, _ = regression()
    calls = {"n": 0}

    def dies_at_step_12(idx):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt   # the process is killed mid-run
        return mse(m(x[idx]), y[idx])

    with pytest.raises(KeyboardInterrupt):
        train(m, dies_at_step_12, len(x), cfg, key="r:0:e2e", checkpoint_dir=tmp_path, progress=False)
    path = checkpoint_path(tmp_path, "r:0:e2e")
    assert torch.load(path, weights_only=True)["step"] == 10 and os.listdir(tmp_path) == [path.name]

    fresh, _, _ = regression(seed=5)   # other initial weights: the checkpoint's must win
    losses = train(fresh, mse_rows(fresh, x, y), len(x), cfg, key="r:0:e2e", checkpoint_dir=tmp_path,
                   progress=False)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for a, b in zip(fresh.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # a finished run is not repeated: the final checkpoint is restored as is
    again, _, _ = regression(seed=7)
    assert train(again, lambda idx: 1 / 0, len(x), cfg, key="r:0:e2e", checkpoint_dir=tmp_path,
                 progress=False) == losses
    torch.testing.assert_close(again[0].weight, ref[0].weight, rtol=1e-6, atol=1e-7)


def test_checkpoint_of_another_recipe_raises(tmp_path):
    m, x, y = regression()
    cfg = DistillConfig(steps=2, checkpoint_every=1)
    train(m, mse_rows(m, x, y), len(x), cfg, key="hashA:1:e2e", checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(DistillError, match="another recipe or pass") as e:
        train(m, mse_rows(m, x, y), len(x), cfg, key="hashB:1:e2e", checkpoint_dir=tmp_path, progress=False)
    assert str(tmp_path) in e.value.hint and DistillError.exit_code == 2


def test_nothing_to_train_and_non_finite_loss():
    m, x, y = regression()
    m.requires_grad_(False)
    with pytest.raises(DistillError, match="nothing to train"):
        train(m, mse_rows(m, x, y), len(x), DistillConfig(steps=1), key="k", progress=False)
    m.requires_grad_(True)
    with pytest.raises(DistillError, match="lower `lr`"):
        train(m, lambda idx: m(x[idx]).sum() * float("nan"), len(x), DistillConfig(steps=1), key="k", progress=False)


# -- many processes -----------------------------------------------------------------------------
DIST_CFG = {"steps": 12, "lr": 0.02, "batch_size": 7, "grad_clip": 0.5, "micro_batch_size": 2}   # 7: uneven shards


def _dist_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m, x, y = regression()
        losses = train(m, mse_rows(m, x, y), len(x), DistillConfig(**DIST_CFG), key="d:0:x",
                       checkpoint_dir=out_dir / "ckpt", progress=False)
        torch.save({"losses": losses, "params": [p.detach() for p in m.parameters()]}, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_matches_single_process(tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.start_processes(_dist_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=False,
                             start_method="fork")   # inherits the imports: seconds, not tens
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process training did not finish in 120 s")
    ref, x, y = regression()
    ref_losses = train(ref, mse_rows(ref, x, y), len(x), DistillConfig(**DIST_CFG), key="d:0:x", progress=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        worst = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref_losses))
        pdiff = max(float((a - b.detach()).abs().max()) for a, b in zip(got["params"], ref.parameters()))
        print(f"rank {rank}: max relative loss difference {worst:.2e}, max parameter difference {pdiff:.2e}")
        assert len(got["losses"]) == 12 and worst < DIST_RTOL, worst
        for a, b in zip(got["params"], ref.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=DIST_RTOL, atol=1e-6)
    assert os.listdir(tmp_path / "ckpt") == ["0_x.pt"]   # rank 0 alone wrote it


# -- layer-wise and end-to-end on a tiny FLUX ----------------------------------------------------
def tiny_flux(seed=0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**FLUX).eval()


def block_io(model, n=8, seed=0):
    """The inputs of transformer_blocks.0 (a calibration-store-like dict) on synthetic model inputs."""
    a = adapter_for(model)
    kw = a.synthetic_inputs(model, n, torch.Generator().manual_seed(seed))
    seen = {}
    h = model.transformer_blocks[0].register_forward_pre_hook(lambda m, args, k: seen.update(k), with_kwargs=True)
    with torch.no_grad():
        model(**kw)
    h.remove()
    inputs = {k: seen[k] for k in (*a.per_sample_inputs, *a.shared_inputs)}
    inputs["timestep"] = kw["timestep"]
    return a, kw, inputs


def test_distill_block_lowers_loss():
    model, other = tiny_flux(0), tiny_flux(1)
    a, _, inputs = block_io(model)
    chain = nn.ModuleList([other.transformer_blocks[0], other.single_transformer_blocks[0]])
    with torch.no_grad():   # targets: another model's double + single blocks
        from dicompress.distill.layerwise import run_chain
        out = run_chain(list(chain), a, inputs)
    targets = {k: out[k] for k in ("hidden_states", "encoder_hidden_states")}
    student = copy.deepcopy(model.transformer_blocks[0])
    cfg = DistillConfig(steps=30, lr=3e-3, batch_size=4, schedule="constant")
    losses = distill_block(student, a, inputs, targets, cfg, key="t:0:block", progress=False)
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(student.ff.net[2].weight, model.transformer_blocks[0].ff.net[2].weight)
    # a chain (double then single block) trains too, here only its attention, on the image stream alone
    chain = nn.ModuleList(copy.deepcopy([model.transformer_blocks[0], model.single_transformer_blocks[0]]))
    frozen = chain[0].ff.net[2].weight.clone()
    losses = distill_block(chain, a, inputs, targets, cfg.model_copy(update={"steps": 10}), streams=("hidden_states",),
                           trainable=["*attn*"], key="t:0:chain", progress=False)
    assert losses[-1] < losses[0] and torch.equal(chain[0].ff.net[2].weight, frozen)
    assert all(p.requires_grad for p in chain.parameters())   # flags restored


def test_distill_end_to_end_lowers_loss():
    teacher = tiny_flux(0).requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():
        for p in student.transformer_blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a = adapter_for(teacher)
    inputs = a.synthetic_inputs(teacher, 8, torch.Generator().manual_seed(0))   # a plain dict works too
    cfg = DistillConfig(steps=15, lr=2e-3, batch_size=4, schedule="constant")
    losses = distill_end_to_end(student, teacher, inputs, cfg, feature_weight=0.5,
                                feature_pairs=[("single_transformer_blocks.0", "single_transformer_blocks.0")],
                                trainable=["transformer_blocks.*"], key="t:0:e2e", progress=False)
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in student.parameters())


# -- model inputs in the calibration store ---------------------------------------------------------
@pytest.fixture(scope="module")
def zoo_store(tiny_zoo_dir, tmp_path_factory):
    info = resolve_model(str(tiny_zoo_dir))
    model = load_transformer(info)
    cfg = CalibrationConfig(source="classes", classes=[1, 7, 3], seeds=[0], steps=2, batch_size=2)
    return capture(model, adapter_for(model), cfg, {"name": info.name, "path": info.path},
                   tmp_path_factory.mktemp("store"), block_inputs=True, progress=False)


def test_capture_records_model_inputs(zoo_store, tiny_zoo_dir):
    mi = zoo_store.model_inputs()
    rows = 3 * 2
    assert mi.rows == rows and {"hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"} <= \
        mi.per_sample
    assert mi["hidden_states"].shape == (rows, 64, 4) and mi["img_ids"].shape == (64, 3) and \
        "img_ids" not in mi.per_sample and "return_dict" not in mi
    # replaying the model on stored rows reproduces the stored block inputs, row for row
    model = load_transformer(resolve_model(str(tiny_zoo_dir)))
    seen = {}
    h = model.transformer_blocks[0].register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    idx = torch.tensor([4, 1])
    with torch.no_grad():
        model(**mi.select(idx), return_dict=False)
    h.remove()
    block = zoo_store.block_inputs("transformer_blocks.0")
    torch.testing.assert_close(seen["hidden_states"], block["hidden_states"][idx])
    torch.testing.assert_close(seen["temb"], block["temb"][idx])


def test_qwenimage_model_inputs_round_trip(tiny_qwen_dir, tmp_path):
    info = resolve_model(str(tiny_qwen_dir))
    model = load_transformer(info)
    cfg = CalibrationConfig(source="synthetic", seeds=[0], steps=2, batch_size=2)
    store = capture(model, adapter_for(model), cfg, {"name": info.name, "path": info.path}, tmp_path / "s",
                    block_inputs=True, progress=False)
    mi = store.model_inputs()
    assert mi.rows == 4 and {"img_shapes", "encoder_hidden_states_mask"} <= mi.per_sample
    assert mi["img_shapes"][0] == (1, 8, 8) and mi["encoder_hidden_states_mask"].dtype == torch.long
    idx = torch.tensor([3, 0])
    with torch.no_grad():
        out = model(**mi.select(idx), return_dict=False)[0]
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_store_without_model_inputs_says_what_to_do(tmp_path):
    from dicompress.calib import StoreWriter
    store = StoreWriter(tmp_path / "old", {"block_inputs": True}).finish()
    with pytest.raises(CalibrationError, match="no model-level inputs") as e:
        store.model_inputs()
    assert "delete" in e.value.hint
    assert isinstance(CalibrationStore(tmp_path / "old"), CalibrationStore)


# -- the pass --------------------------------------------------------------------------------------
def test_distill_pass_recovers_a_perturbed_model(zoo_store, tiny_zoo_dir, tmp_path):
    info = resolve_model(str(tiny_zoo_dir))
    model = load_transformer(info)
    with torch.no_grad():
        for p in model.single_transformer_blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    spec = {"distill": {"steps": 12, "lr": 2e-3, "batch_size": 3, "schedule": "constant",
                        "trainable": ["single_transformer_blocks.*"], "checkpoint_every": 5}}
    state = dicompress.compress(model, [spec], calibration=zoo_store, teacher=lambda: load_transformer(info),
                                progress=False, work_dir=tmp_path / "work")
    rep = state.report["passes"][0]
    assert rep["pass"] == "distill" and rep["steps"] == 12 and rep["loss_last"] < 0.5 * rep["loss_first"]
    assert rep["tensors_trained"] == len(list(model.single_transformer_blocks.parameters()))
    assert len(rep["loss_curve"]) == 12 and rep["rows"] == 6
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["0_end_to_end.pt"]


def test_distill_after_quantization_trains_floats_only(zoo_store, tiny_zoo_dir):
    info = resolve_model(str(tiny_zoo_dir))
    model = load_transformer(info)
    with pytest.raises(DistillError, match="no floating-point parameter"):
        dicompress.compress(model, [{"tlq": {"bits": 4}}, {"distill": {"steps": 1, "trainable": ["*.to_q.weight"]}}],
                            calibration=zoo_store, teacher=lambda: load_transformer(info), progress=False)
    model = load_transformer(info)
    state = dicompress.compress(model, [{"tlq": {"bits": 4}}, {"distill": {"steps": 2, "batch_size": 2}}],
                                calibration=zoo_store, teacher=lambda: load_transformer(info), progress=False)
    rep = state.report["passes"][1]
    assert rep["steps"] == 2 and rep["tensors_trained"] > 0 and math.isfinite(rep["loss_last"])


def test_recipe_run_resumes_and_refuses_a_changed_recipe(tiny_zoo_dir, tmp_path, monkeypatch):
    from dicompress import paths, pipeline
    data = {"model": str(tiny_zoo_dir), "output": str(tmp_path / "art"), "eval": {"enabled": False},
            "calibration": {"source": "classes", "classes": [0, 5], "seeds": [0], "steps": 2},
            "passes": [{"distill": {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "lr": 1e-3}}]}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    work = tmp_path / "art.work"

    def broken_writer(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(paths, "write_artifact", broken_writer)
    with pytest.raises(OSError):
        pipeline.run(recipe, progress=False)
    assert (work / "0_end_to_end.pt").exists() and not (tmp_path / "art").exists()   # kept for the rerun
    first = torch.load(work / "0_end_to_end.pt", weights_only=True)["losses"]
    monkeypatch.undo()

    data["passes"][0]["distill"]["lr"] = 2e-3   # another recipe: its checkpoint is not resumed silently
    changed = tmp_path / "r2.yaml"
    changed.write_text(yaml.safe_dump(data))
    with pytest.raises(DistillError, match="another recipe"):
        pipeline.run(changed, progress=False)

    rep = pipeline.run(recipe, progress=False)   # resumes: the finished distillation is not redone
    assert rep["passes"][0]["loss_curve"] == [[i, round(v, 6)] for i, v in enumerate(first)]
    assert (tmp_path / "art" / "config.json").exists() and not work.exists()


def test_student_trajectories_add_the_students_own_rows(zoo_store, tiny_zoo_dir, tmp_path):
    """Two rounds: each captures the (perturbed, training) student's sampling loop from the same noise: the first
    step's latents equal the teacher's, later ones are the student's own; a rerun reuses the captures."""
    from dicompress.calib.sources import capture_trajectories
    info = resolve_model(str(tiny_zoo_dir))
    model = load_transformer(info)
    with torch.no_grad():
        for p in model.single_transformer_blocks.parameters():
            p.add_(0.2 * torch.randn_like(p))
    spec = {"distill": {"steps": 6, "lr": 1e-3, "batch_size": 3, "student_trajectories": 2,
                        "trainable": ["single_transformer_blocks.*"]}}
    state = dicompress.compress(model, [spec], calibration=zoo_store, teacher=lambda: load_transformer(info),
                                progress=False, work_dir=tmp_path / "work")
    rep = state.report["passes"][0]
    assert rep["rows_per_round"] == [6, 6, 6] and rep["steps"] == 6
    rounds = sorted((tmp_path / "work").glob("trajectories_*/round_*"))
    assert [r.name for r in rounds] == ["round_1", "round_2"]
    teacher_rows = zoo_store.model_inputs()["hidden_states"]
    for r in rounds:
        own = CalibrationStore(r).model_inputs()["hidden_states"]
        first = zoo_store.model_inputs()["timestep"] == zoo_store.model_inputs()["timestep"].max()
        assert torch.equal(own[first], teacher_rows[first])           # the same initial noise
        assert not torch.allclose(own[~first], teacher_rows[~first])  # then the student's own latents
    import dicompress.calib.sources as sources

    def no_capture(*a, **k):
        raise AssertionError("captured again")
    real, sources.capture = sources.capture, no_capture
    try:                       # the rerun resumes from the final checkpoint and reads the rounds from disk
        again = dicompress.compress(load_transformer(info), [spec], calibration=zoo_store,
                                    teacher=lambda: load_transformer(info), progress=False, work_dir=tmp_path / "work")
    finally:
        sources.capture = real
    assert again.report["passes"][0]["rows_per_round"] == [6, 6, 6]
    with pytest.raises(CalibrationError, match="synthetic"):
        capture_trajectories(model, adapter_for(model), {**zoo_store.meta, "config": {
            **zoo_store.meta["config"], "source": "synthetic"}}, tmp_path / "x", progress=False)


def test_student_trajectories_with_synthetic_calibration_is_a_recipe_error(tmp_path):
    from dicompress.errors import RecipeError
    from dicompress.recipe import parse_recipe
    data = {"model": "zoo:tiny-flux-digits", "output": str(tmp_path / "o"),
            "calibration": {"source": "synthetic"},
            "passes": [{"ppcl_depth": {"remove_blocks": 2, "end_to_end": {"steps": 5, "student_trajectories": 1}}}]}
    with pytest.raises(RecipeError, match="synthetic") as e:
        parse_recipe(data, "r.yaml")
    assert "passes[0].ppcl_depth.end_to_end.student_trajectories" in str(e.value)
