"""A pipeline directory as the model gives a complete pipeline as the output (`output_layout`): model_index.json, the
artifact as transformer/, the other components hard-linked (or copied); `FluxPipeline.from_pretrained(output)` and
`DiffusionPipeline.from_pretrained(output)` load it after `import dicompress`, and every reader and the writer's
promises (atomic, refused while unfinished, removed by the next write) hold for the whole directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import dicompress
from dicompress.cli import main
from dicompress.errors import ArtifactError, ModelError
from dicompress.models import resolve_model
from dicompress.nn.qlinear import QuantLinear
from tests.test_streaming import assert_same_artifact

RTN = [{"rtn": {"bits": 4}}]                     # needs no calibration: cheap, and both paths take it
COMPONENTS = ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"]


def _recipe(d: Path, name: str, model, **keys) -> Path:
    path = d / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"model": str(model), "output": str(d / "out" / name), "passes": RTN,
                                    "eval": {"enabled": False}, **keys}))
    return path


def _run(d: Path, name: str, model, **keys) -> Path:
    dicompress.run(_recipe(d, name, model, **keys), progress=False)
    return d / "out" / name


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def outs(tiny_flux_pipeline_dir, tmp_path_factory):
    """The same recipe on the tiny FLUX pipeline directory: streamed, whole-model, with copies, transformer-only."""
    d = tmp_path_factory.mktemp("pipeline_output")
    src = tiny_flux_pipeline_dir
    return {"src": src, "d": d,
            "st": _run(d, "st", src, streaming={"enabled": True}),
            "mem": _run(d, "mem", src, streaming={"enabled": False}),
            "copy": _run(d, "copy", src, streaming={"enabled": False}, copy_components=True),
            "alone": _run(d, "alone", src, output_layout="transformer")}


@pytest.mark.parametrize("name", ["st", "mem", "copy"])
def test_layout_is_the_source_pipeline_with_the_artifact_as_transformer(outs, name):
    src, out = outs["src"], outs[name]
    assert sorted(p.name for p in out.iterdir()) == sorted(["model_index.json", "transformer", *COMPONENTS])
    assert (out / "model_index.json").read_bytes() == (src / "model_index.json").read_bytes()
    for comp in COMPONENTS:
        assert _files(out / comp) == _files(src / comp)
        assert all((out / comp / f).read_bytes() == (src / comp / f).read_bytes() for f in _files(src / comp))
    config = json.loads((out / "transformer" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "dicompress" and "incomplete" not in qc and qc["source"]["model"] == str(src)
    report = json.loads((out / "transformer" / "report.json").read_text())
    placed = report["pipeline_output"]
    assert placed["components"] == {c: len(_files(src / c)) for c in COMPONENTS}
    assert placed["linked" if name != "copy" else "copied"] == sum(placed["components"].values())
    assert not list(out.rglob(".dicompress-incomplete"))
    # nothing else left beside the outputs: no temp dir, lock or work directory
    assert sorted(p.name for p in out.parent.iterdir()) == ["alone", "copy", "mem", "st"]


def test_components_are_hard_links_by_default_and_copies_on_request(outs):
    src = outs["src"]
    for comp in COMPONENTS:
        for f in _files(src / comp):
            s = os.stat(src / comp / f)
            linked, copied = os.stat(outs["mem"] / comp / f), os.stat(outs["copy"] / comp / f)
            assert (linked.st_dev, linked.st_ino) == (s.st_dev, s.st_ino), f
            assert copied.st_ino != s.st_ino and copied.st_size == s.st_size, f
    # the transformer is never a link to the source's
    assert os.stat(outs["mem"] / "transformer" / "config.json").st_nlink == 1


def test_streamed_and_whole_model_pipelines_have_bit_equal_transformers(outs):
    assert_same_artifact(outs["st"] / "transformer", outs["mem"] / "transformer")
    assert_same_artifact(outs["alone"], outs["mem"] / "transformer")


def test_transformer_layout_is_the_artifact_alone(outs):
    alone = outs["alone"]
    assert (alone / "config.json").is_file() and not (alone / "model_index.json").exists()
    assert not (alone / "transformer").exists()


FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    import dicompress
    from diffusers import DiffusionPipeline, FluxPipeline, FluxTransformer2DModel
    from dicompress.nn.qlinear import QuantLinear
    src, outs = sys.argv[1], sys.argv[2:]
    kw = dict(prompt=["a red cat", "two dogs"], num_inference_steps=2, height=64, width=64, output_type="latent")

    def latents(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(**kw, generator=torch.Generator().manual_seed(0)).images

    # runs in fp32: with no torch_dtype transformers loads the text encoders in their bf16 and diffusers the rest in
    # fp32, which the source pipeline cannot run either
    f32 = dict(torch_dtype=torch.float32)
    plain = latents(FluxPipeline.from_pretrained(src, **f32))
    for out in outs:
        for cls in (FluxPipeline, DiffusionPipeline):      # loads with no other argument
            bare = cls.from_pretrained(out)
            assert type(bare).__name__ == "FluxPipeline", out
            assert any(isinstance(m, QuantLinear) for m in bare.transformer.modules()), out
        a = latents(FluxPipeline.from_pretrained(out, **f32))
        auto = DiffusionPipeline.from_pretrained(out, **f32)
        assert type(auto).__name__ == "FluxPipeline"
        b = latents(auto)
        ref = FluxPipeline.from_pretrained(src, transformer=FluxTransformer2DModel.from_pretrained(out + "/transformer",
                                                                                                **f32), **f32)
        c = latents(ref)
        assert a.shape == (2, 16, 64) and torch.isfinite(a).all(), out
        assert torch.equal(a, b) and torch.equal(a, c), out
        assert not torch.equal(a, plain), out                # the compressed transformer, not the source's
    print("OK", len(outs))
""")


@pytest.fixture(scope="module")
def zero_point(outs):
    """W4 weights and asymmetric 4-bit activations (act_quant zero_point), streamed from the pipeline directory."""
    return _run(outs["d"], "zp", outs["src"], passes=[*RTN, {"act_quant": {"bits": 4, "zero_point": True}}])


def test_zero_point_grid_is_read_back_from_the_pipeline_output(zero_point):
    from diffusers import FluxTransformer2DModel
    model = FluxTransformer2DModel.from_pretrained(zero_point / "transformer")
    acts = [m.act for m in model.modules() if isinstance(m, QuantLinear)]
    assert acts and all(a is not None and a.act_bits == 4 and a.zero_point for a in acts)


def test_from_pretrained_output_runs_in_a_fresh_process(outs, chain, zero_point):
    targets = [outs["st"], outs["mem"], outs["copy"], chain, zero_point]
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(outs["src"]), *map(str, targets)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"OK {len(targets)}" in proc.stdout


def test_readers_take_the_pipeline_directory(outs):
    out = outs["st"]
    model = dicompress.load(out, verify=True)
    assert type(model).__name__ == "FluxTransformer2DModel"
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    res = cli("verify", out)
    assert res.exit_code == 0 and res.output.startswith(f"OK {out / 'transformer'}: "), res.output
    res = cli("inspect", "--verify", out)
    assert res.exit_code == 0 and f"artifact: {out / 'transformer'}" in res.output and "verified: OK" in res.output
    res = cli("inspect", outs["src"])            # an uncompressed pipeline is still described as a model
    assert res.exit_code == 0 and res.output.startswith(f"model: {outs['src']} ")
    res = cli("eval", out)                       # not a digits model: no metric without --pipeline, said (issue 20)
    assert res.exit_code == 2 and "no quality metric" in res.output and f"--pipeline {outs['src']}" in res.output


def test_rot_in_the_pipeline_transformer_is_named(outs, tmp_path):
    out = tmp_path / "rotten"
    _copytree(outs["mem"], out)
    shard = out / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    res = cli("verify", out)
    assert res.exit_code == 3 and "diffusion_pytorch_model.safetensors" in res.output, res.output


def _copytree(src: Path, dst: Path) -> None:
    import shutil
    shutil.copytree(src, dst)


@pytest.fixture(scope="module")
def chain(outs):
    """A pipeline-layout output as another recipe's model: pruned (amber_depth), then quantized."""
    d, src = outs["d"] / "chain", outs["src"]
    d.mkdir()
    pruned = _run(d, "pruned", src, calibration={"source": "synthetic", "seeds": [0], "steps": 2, "batch_size": 2},
                  passes=[{"amber_depth": {"remove_blocks": 1, "distill": {"steps": 1, "batch_size": 2}}}])
    info = resolve_model(str(pruned))
    assert (info.path, info.pipeline_root, info.class_name) == (pruned / "transformer", pruned,
                                                                "FluxTransformer2DModel")
    return _run(d, "chained", pruned)


def test_a_pipeline_output_is_another_recipes_model(outs, chain):
    config = json.loads((chain / "transformer" / "config.json").read_text())
    ops = [e["op"] for e in config["quantization_config"]["manifest"]]
    assert ops[0] == "remove_block" and "quantize" in ops and config["num_layers"] + config["num_single_layers"] == 3
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert os.stat(chain / vae).st_ino == os.stat(outs["src"] / vae).st_ino     # linked through the first output
    # a quantized pipeline output as the model is refused, as a quantized artifact is
    res = cli("run", _recipe(chain.parent.parent, "again", outs["mem"]))
    assert res.exit_code == 2 and "already rewritten" in res.output, res.output


def test_pipeline_layout_needs_a_pipeline_directory(tmp_path):
    recipe = _recipe(tmp_path, "zoo", "zoo:tiny-flux-digits", output_layout="pipeline")
    res = cli("run", recipe, "--quiet")
    assert res.exit_code == 2, res.output
    assert "output_layout: `pipeline` writes a complete pipeline directory" in res.output
    assert list((tmp_path / "out").iterdir()) == []                  # nothing written, no lock, no work dir
    recipe = _recipe(tmp_path, "bad", "zoo:tiny-flux-digits", output_layout="transformer", copy_components=True)
    res = cli("run", recipe, "--quiet")
    assert res.exit_code == 2 and "bad.yaml:copy_components:" in res.output, res.output


def test_the_transformer_folder_as_model_writes_the_artifact_alone(outs, tmp_path):
    out = _run(tmp_path, "sub", outs["src"] / "transformer")
    assert (out / "config.json").is_file() and not (out / "model_index.json").exists()
    out = _run(tmp_path, "asked", outs["src"] / "transformer", output_layout="pipeline")   # asked: its pipeline
    assert (out / "model_index.json").is_file() and (out / "transformer" / "config.json").is_file()


KILLED_RUN = textwrap.dedent("""
    import os, sys
    import dicompress
    from dicompress.io import pipeline_output, writer
    name, nth = sys.argv[2], int(sys.argv[3])
    owner = pipeline_output if name == "_link_or_copy_file" else writer
    real, calls = getattr(owner, name), []
    def killed(*a, **k):
        calls.append(1)
        if len(calls) == nth:
            os._exit(9)
        return real(*a, **k)
    setattr(owner, name, killed)
    dicompress.run(sys.argv[1], progress=False)
""")


@pytest.mark.parametrize("where,nth,streaming", [("_swap_into_place", 1, True), ("_link_or_copy_file", 3, False)])
def test_a_killed_write_leaves_nothing_that_loads_and_the_next_write_cleans_up(outs, tmp_path, where, nth,
                                                                              streaming):
    from diffusers import FluxPipeline, FluxTransformer2DModel
    recipe = _recipe(tmp_path, "k", outs["src"], streaming={"enabled": streaming})
    out = tmp_path / "out" / "k"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(recipe), where, str(nth)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert not out.exists()
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(".k.tmp-incomplete-")]
    assert len(leftovers) == 1 and (leftovers[0] / "transformer").is_dir()
    left = leftovers[0]
    with pytest.raises(ArtifactError, match="directory missing"):
        dicompress.load(out)
    with pytest.raises(Exception):
        FluxPipeline.from_pretrained(out)
    for path in (left, left / "transformer"):         # both levels, marked or (killed at the rename) by name
        with pytest.raises(ArtifactError, match="interrupted|temp directory"):
            dicompress.load(path)
        assert cli("verify", path).exit_code == 3 and cli("inspect", path).exit_code == 3
    if where == "_link_or_copy_file":                 # still marked: diffusers' own loaders refuse it too
        assert (left / ".dicompress-incomplete").is_file() and (left / "transformer" / ".dicompress-incomplete").is_file()
        with pytest.raises(ArtifactError, match="marked unfinished"):
            FluxTransformer2DModel.from_pretrained(left / "transformer")
        with pytest.raises(Exception):
            FluxPipeline.from_pretrained(left)            # no model_index.json yet
    with pytest.raises((ModelError, ArtifactError)):   # nor is it a model for another recipe
        dicompress.run(_recipe(tmp_path, "other", left), progress=False)
    dicompress.run(recipe, progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["k"]      # the dead write's temp dir is gone
    assert_same_artifact(out / "transformer", outs["mem"] / "transformer")


def test_a_hub_snapshot_is_linked_through_its_symlinks(outs, tmp_path):
    """A hub cache snapshot holds symlinks into its blob store: the output links the blobs, never the symlinks."""
    src, blobs, snap = outs["src"], tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    for i, f in enumerate(_files(src)):
        (blobs / f"b{i}").write_bytes((src / f).read_bytes())
        (snap / f).parent.mkdir(parents=True, exist_ok=True)
        (snap / f).symlink_to(os.path.relpath(blobs / f"b{i}", (snap / f).parent))
    out = _run(tmp_path, "hub", snap)
    for comp in COMPONENTS:
        for f in _files(snap / comp):
            assert not (out / comp / f).is_symlink()
            assert os.stat(out / comp / f).st_ino == os.stat((snap / comp / f).resolve()).st_ino
    assert not (out / "model_index.json").is_symlink()
