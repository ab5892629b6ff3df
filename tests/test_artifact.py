"""Artifacts: write -> verify -> load through diffusers, bit-exact; damaged artifacts are refused."""
from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel
from safetensors.torch import load_file, save_file

import dicompress  # noqa: F401  (registers the "dicompress" quant method with diffusers)
from dicompress.errors import ArtifactError, ModelError
from dicompress.io import FORMAT_VERSION, load, register_manifest_op, register_with_diffusers, replay, \
    verify_artifact, write_artifact
from dicompress.io import writer as writer_mod
from dicompress.io.manifest import MANIFEST_OPS
from dicompress.nn.qlinear import QuantLinear
from dicompress.nn.surgery import set_module
from dicompress.quant.codecs import KernelArgs, register_codec
from dicompress.quant.packing import pack_codes

torch.set_num_threads(1)
register_with_diffusers()  # idempotent; also done by `import dicompress`

WEIGHTS = "diffusion_pytorch_model.safetensors"
FLUX_CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
FLUX_QUANTIZED = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2",
                  "single_transformer_blocks.0.proj_mlp", "proj_out"]
QWEN_CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                   num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
QWEN_QUANTIZED = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_v_proj",
                  "transformer_blocks.1.img_mlp.net.2", "img_in"]


class AffineTestCodec:
    """w = (code - 2^(b-1)) * scale, one fp16 scale per output row: independent of the real codecs."""

    name = "test-affine"
    kernel_args = KernelArgs(scales="scales", aux="scales")      # no tensor besides the scales

    def buffer_specs(self, out_features, in_features, bits, group_size):
        return {"scales": ((out_features, 1), torch.float16)}

    def dequantize(self, codes, buffers, bits, group_size):
        return (codes - 2 ** (bits - 1)).float() * buffers["scales"].float()

    def signed_levels(self, buffers, bits):
        q = torch.arange(1 << bits, dtype=torch.float32, device=buffers["scales"].device) - 2 ** (bits - 1)
        return q.repeat(buffers["scales"].shape[0], 1, 1)


register_codec(AffineTestCodec())


def quantize_some(model, names, bits=4, seed=0):
    """Replace `names` by QuantLinear with random codes/scales; returns the manifest."""
    g = torch.Generator().manual_seed(seed)
    manifest = []
    for name in names:
        lin = model.get_submodule(name)
        q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, "test-affine", bits)
        codes = torch.randint(0, 2 ** bits, (lin.out_features, lin.in_features), generator=g)
        q.qweight.copy_(pack_codes(codes, bits))
        q.scales.copy_((torch.rand(lin.out_features, 1, generator=g) * 0.05 + 0.01).half())
        if lin.bias is not None:
            q.bias.data.copy_(lin.bias.data)
        set_module(model, name, q)
        manifest.append(q.manifest_entry(name))
    return manifest


def flux_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 16, 4, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.randn(16, 3, generator=g), txt_ids=torch.zeros(8, 3))


def qwen_inputs():
    g = torch.Generator().manual_seed(2)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 7, 16, generator=g),
                encoder_hidden_states_mask=torch.ones(1, 7), timestep=torch.tensor([0.7]),
                img_shapes=[(1, 4, 4)], **_QWEN_TXT_LENS)


# Older diffusers (0.35) takes the text lengths explicitly; newer ones derive them from the mask.
_QWEN_TXT_LENS = {"txt_seq_lens": [7]} if "txt_seq_lens" in inspect.signature(
    QwenImageTransformer2DModel.forward).parameters else {}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX_CONFIG).eval()
    manifest = quantize_some(model, FLUX_QUANTIZED)
    out = tmp_path_factory.mktemp("flux") / "art"
    write_artifact(model, out, manifest=manifest, report={"passes": [{"pass": "test", "sqnr_db": 12.5}]},
                   source={"model": "random tiny flux"}, files={"samples.png": b"\x89PNG fake"})
    return model, out, manifest


def copy_of(art: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(art, dst)
    return dst


def edit_quant_config(art: Path, fn) -> None:
    cfg = json.loads((art / "config.json").read_text())
    fn(cfg["quantization_config"])
    (art / "config.json").write_text(json.dumps(cfg))


# -- (a) round trip through diffusers ---------------------------------------------------------
def test_artifact_layout(flux):
    _, art, manifest = flux
    assert sorted(os.listdir(art)) == ["config.json", WEIGHTS, "report.json", "samples.png"]
    qc = json.loads((art / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "dicompress" and qc["format_version"] == FORMAT_VERSION
    assert qc["manifest"] == manifest and qc["source"] == {"model": "random tiny flux"}
    assert json.loads((art / "report.json").read_text())["passes"][0]["sqnr_db"] == 12.5
    summary = verify_artifact(art)
    assert summary["class_name"] == "FluxTransformer2DModel" and summary["manifest_length"] == len(manifest)
    assert summary["n_tensors"] == len(load_file(art / WEIGHTS))
    assert [p.name for p in art.parent.iterdir()] == ["art"]  # no temp dir left behind


def test_flux_from_pretrained_is_exact(flux):
    model, art, _ = flux
    loaded = FluxTransformer2DModel.from_pretrained(art)
    for name in FLUX_QUANTIZED:
        q = loaded.get_submodule(name)
        assert isinstance(q, QuantLinear)
        assert q.qweight.dtype == torch.uint8 and q.scales.dtype == torch.float16
    assert loaded.x_embedder.weight.dtype == torch.float32  # fp32 on CPU by default
    assert not any(t.is_meta for t in loaded.state_dict().values())
    x = flux_inputs()
    assert torch.equal(run(loaded, x), run(model, x))


def test_flux_load_is_exact(flux):
    model, art, _ = flux
    loaded = load(art)
    assert not loaded.training and isinstance(loaded.get_submodule(FLUX_QUANTIZED[0]), QuantLinear)
    x = flux_inputs()
    assert torch.equal(run(loaded, x), run(model, x))


def test_bf16_keeps_stored_dtypes(flux):
    model, art, _ = flux
    loaded = FluxTransformer2DModel.from_pretrained(art, torch_dtype=torch.bfloat16)
    assert loaded.x_embedder.weight.dtype == torch.bfloat16
    for name in FLUX_QUANTIZED:
        q, ref = loaded.get_submodule(name), model.get_submodule(name)
        assert q.qweight.dtype == torch.uint8 and q.scales.dtype == torch.float16
        assert torch.equal(q.scales, ref.scales) and torch.equal(q.qweight, ref.qweight)  # not via bf16


def test_sharded_artifact_round_trips(flux, tmp_path):
    model, _, manifest = flux
    out = tmp_path / "sharded"
    write_artifact(model, out, manifest=manifest, report={}, source={}, max_shard_size="40KB")
    assert (out / f"{WEIGHTS}.index.json").is_file() and len(verify_artifact(out)["weight_files"]) > 1
    x = flux_inputs()
    assert torch.equal(run(FluxTransformer2DModel.from_pretrained(out), x), run(model, x))


# -- (b) another family ------------------------------------------------------------------------
def test_qwenimage_round_trips(tmp_path):
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**QWEN_CONFIG).eval()
    manifest = quantize_some(model, QWEN_QUANTIZED, bits=3)
    write_artifact(model, tmp_path / "qwen", manifest=manifest, report={}, source={"model": "random tiny qwen"})
    loaded = QwenImageTransformer2DModel.from_pretrained(tmp_path / "qwen")
    assert all(isinstance(loaded.get_submodule(n), QuantLinear) for n in QWEN_QUANTIZED)
    x = qwen_inputs()
    assert torch.equal(run(loaded, x), run(model, x))


# -- (c) bad artifacts -------------------------------------------------------------------------
def truncate_weights(art):
    f = art / WEIGHTS
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def cut_header(art):
    (art / WEIGHTS).write_bytes((art / WEIGHTS).read_bytes()[:4])


def change_bits(art):
    edit_quant_config(art, lambda qc: qc["manifest"][0].update(bits=3))


def rename_module(art):  # to_q -> to_k: same shapes, so only the tensors tell
    edit_quant_config(art, lambda qc: qc["manifest"][0].update(module="transformer_blocks.0.attn.to_k"))


def point_at_missing_module(art):
    edit_quant_config(art, lambda qc: qc["manifest"][0].update(module="transformer_blocks.0.attn.to_nothing"))


def scales_as_fp32(art):
    sd = load_file(art / WEIGHTS)
    key = f"{FLUX_QUANTIZED[0]}.scales"
    sd[key] = sd[key].float()
    save_file(sd, art / WEIGHTS, metadata={"format": "pt"})


def drop_a_tensor(art):
    sd = load_file(art / WEIGHTS)
    del sd[f"{FLUX_QUANTIZED[1]}.qweight"]
    save_file(sd, art / WEIGHTS, metadata={"format": "pt"})


def unknown_op(art):
    edit_quant_config(art, lambda qc: qc.update(
        manifest=qc["manifest"] + [{"op": "replace_with_hologram", "module": "proj_out"}],
        dicompress_version="9.9.0"))


def newer_format(art):
    edit_quant_config(art, lambda qc: qc.update(format_version=FORMAT_VERSION + 1))


def plain_diffusers(art):
    shutil.rmtree(art)
    torch.manual_seed(0)
    FluxTransformer2DModel(**FLUX_CONFIG).save_pretrained(art)


def no_config(art):
    (art / "config.json").unlink()


def no_directory(art):
    shutil.rmtree(art)


BAD = [(truncate_weights, "is truncated"), (cut_header, "unreadable safetensors header"),
       (change_bits, "manifest does not match the tensors"), (rename_module, "manifest does not match the tensors"),
       (point_at_missing_module, "to_nothing"), (scales_as_fp32, "dtype F32, expected F16"),
       (drop_a_tensor, "missing transformer_blocks.0.ff.net.2.qweight"),
       (unknown_op, "'replace_with_hologram'"), (newer_format, "newer dicompress (format 2 > 1); upgrade dicompress"),
       (plain_diffusers, "plain diffusers model, not a dicompress artifact"), (no_config, "no config.json"),
       (no_directory, "directory missing")]


@pytest.mark.parametrize("damage,reason", BAD, ids=[f.__name__ for f, _ in BAD])
def test_bad_artifact_is_refused(flux, tmp_path, damage, reason):
    art = copy_of(flux[1], tmp_path)
    damage(art)
    with pytest.raises(ArtifactError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        verify_artifact(art)
    with pytest.raises(ArtifactError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        load(art)


def test_unknown_op_names_the_version_needed(flux, tmp_path):
    art = copy_of(flux[1], tmp_path)
    unknown_op(art)
    with pytest.raises(ArtifactError) as e:
        verify_artifact(art)
    assert "dicompress>=9.9.0" in e.value.hint


@pytest.mark.parametrize("damage,reason", [(newer_format, "newer dicompress"), (change_bits, "shape"),
                                           (scales_as_fp32, "stored as torch.float32")],
                         ids=["newer_format", "change_bits", "scales_as_fp32"])
def test_from_pretrained_refuses_without_verify(flux, tmp_path, damage, reason):
    """Users who skip dicompress.load still get an ArtifactError, not a half-loaded model."""
    art = copy_of(flux[1], tmp_path)
    damage(art)
    with pytest.raises(ArtifactError, match=reason):
        FluxTransformer2DModel.from_pretrained(art)


# -- (d) interrupted writes --------------------------------------------------------------------
@pytest.mark.parametrize("step", ["_add_quantization_config", "_fsync_tree", "verify_artifact"])
def test_crash_mid_write_leaves_nothing(flux, tmp_path, monkeypatch, step):
    model, _, manifest = flux

    def crash(*a, **k):
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(writer_mod, step, crash)
    out = tmp_path / "art"
    with pytest.raises(KeyboardInterrupt):
        write_artifact(model, out, manifest=manifest, report={}, source={})
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor a temp dir


def test_crash_while_overwriting_keeps_the_old_artifact(flux, tmp_path, monkeypatch):
    model, art, manifest = flux
    out = copy_of(art, tmp_path)
    monkeypatch.setattr(writer_mod, "_fsync_tree", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(ArtifactError, match=f"cannot write the artifact {out}: disk full; nothing was written"):
        write_artifact(model, out, manifest=manifest, report={"new": True}, source={}, overwrite=True)
    assert json.loads((out / "report.json").read_text())["passes"]  # still the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
    verify_artifact(out)


KILLED_WRITER = textwrap.dedent("""
    import os, sys, torch
    from diffusers import FluxTransformer2DModel
    from dicompress.io import writer
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**{config})
    real_add = writer._add_quantization_config
    def killed(path, qc):  # weights and config are on disk; the process dies rewriting config.json
        path.write_text('{{"_class_name": "FluxTr')
        os._exit(9)
    writer._add_quantization_config = killed
    writer.write_artifact(model, sys.argv[1], manifest=[], report={{}}, source={{}})
""")


def test_killed_write_leaves_nothing_that_loads(tmp_path):
    out = tmp_path / "art"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER.format(config=FLUX_CONFIG), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name != "art.lock"]     # the lock's file names the dead pid
    assert leftovers and all(p.name.startswith(".art.tmp-incomplete-") for p in leftovers)  # a kill cannot clean up
    assert all((p / ".dicompress-incomplete").is_file() for p in leftovers)             # ... but it is marked
    with pytest.raises(ArtifactError, match="directory missing"):
        load(out)
    with pytest.raises(ArtifactError, match="interrupted write left this; delete it"):
        load(leftovers[0])
    torch.manual_seed(0)
    write_artifact(FluxTransformer2DModel(**FLUX_CONFIG), out, manifest=[], report={}, source={})
    assert [p.name for p in tmp_path.iterdir()] == ["art"]      # the dead writer's temp dir is gone


# -- (e) overwriting ---------------------------------------------------------------------------
def test_existing_dir_is_refused_without_overwrite(flux, tmp_path):
    model, art, manifest = flux
    out = copy_of(art, tmp_path)
    with pytest.raises(ArtifactError, match="already exists") as e:
        write_artifact(model, out, manifest=manifest, report={"new": True}, source={})
    assert "overwrite=True" in e.value.hint
    write_artifact(model, out, manifest=manifest, report={"new": True}, source={}, overwrite=True)
    assert json.loads((out / "report.json").read_text()) == {"new": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


# -- the manifest on its own -------------------------------------------------------------------
def test_replay_rebuilds_on_meta_and_accepts_new_ops(flux):
    _, _, manifest = flux
    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_CONFIG)

    @register_manifest_op("test-drop-norm")
    def drop(model, entry, device):
        set_module(model, entry["module"], torch.nn.Identity())

    try:
        replay(model, manifest + [{"op": "test-drop-norm", "module": "norm_out.norm"}])
    finally:
        MANIFEST_OPS.pop("test-drop-norm")
    q = model.get_submodule(FLUX_QUANTIZED[0])
    assert isinstance(q, QuantLinear) and q.qweight.is_meta
    assert isinstance(model.norm_out.norm, torch.nn.Identity)


def test_registration_is_idempotent_and_pinned(monkeypatch):
    import diffusers
    from diffusers.quantizers import auto

    register_with_diffusers()
    register_with_diffusers()
    assert auto.AUTO_QUANTIZER_MAPPING["dicompress"].__name__ == "DicompressQuantizer"
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["dicompress"].__name__ == "DicompressConfig"
    monkeypatch.setattr(diffusers, "__version__", "0.43.0")
    with pytest.raises(ModelError, match="diffusers>=0.35,<0.43"):
        register_with_diffusers()
