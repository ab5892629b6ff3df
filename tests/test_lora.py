"""LoRA on compressed models through diffusers' own API: a FLUX LoRA made with peft on the uncompressed model
changes a W4 / W4A8 artifact's output as it changes the original's (the branch sees the original input:
smoothing folded into norms and producers is undone for it), adapters combine and unload, fuse is refused."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import dicompress
from dicompress.arch import adapter_for
from dicompress.errors import ModelError
from dicompress.io.diffusers_plugin import DicompressConfig
from dicompress.lora.folds import fold_scales
from dicompress.lora.hooks import attach_folds
from dicompress.lora.layer import CompressedLoraLinear, FuseRefused
from dicompress.nn.qlinear import QuantLinear

# every linear FLUX LoRAs train, the AdaLN modulation linears included (their shift rows carry folded smoothing)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
           "norm1.linear", "norm1_context.linear", "norm.linear"]
CALIBRATION = {"source": "classes", "classes": [0, 5], "seeds": [0], "steps": 2, "batch_size": 2}
# W4 needs no calibration: quantized on load (RTN: TLQ's grid search would add seconds; the LoRA branch does not
# depend on the codec) and saved with save_pretrained. W4A8 is the LRQ-DiT recipe, run as `dicompress run` does.
W4 = [{"rtn": {"bits": 4}}]
W4A8 = [{"smooth": {"alpha": 0.5}}, {"ars": {"threshold": 1.0, "block": 32}}, {"tlq": {"bits": 4}},
        {"act_quant": {"bits": 8}}]
ARTIFACTS = ("w4", "w4a8")


def _lora(src, out, seed, rank=4):
    """A random (B != 0) peft LoRA on the uncompressed model, saved as diffusers' FLUX LoRA file."""
    model = FluxTransformer2DModel.from_pretrained(src)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False))
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(model))
    return out


@pytest.fixture(scope="module")
def made(tiny_zoo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    FluxTransformer2DModel.from_pretrained(tiny_zoo_dir, quantization_config=DicompressConfig(passes=W4)) \
        .save_pretrained(root / "w4")
    recipe = {"model": str(tiny_zoo_dir), "output": str(root / "w4a8"), "calibration": CALIBRATION, "passes": W4A8,
              "eval": {"enabled": False}}
    (root / "w4a8.yaml").write_text(yaml.safe_dump(recipe))
    dicompress.run(root / "w4a8.yaml", progress=False, echo=lambda *a, **k: None)
    return {"root": root, "a": _lora(tiny_zoo_dir, root / "lora_a", 1), "b": _lora(tiny_zoo_dir, root / "lora_b", 2)}


def _pipe(model) -> FluxPipeline:
    # the transformer is all a LoRA of this file touches; the other components may be absent
    return FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model.eval())


def _inputs(model):
    return adapter_for(model).synthetic_inputs(model, 2, torch.Generator().manual_seed(3))


def _out(model, kw):
    with torch.no_grad():
        return model(**kw).sample


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _effects(model, made, weights=None):
    """Output change of `model` by LoRA a (and b, with `weights`), loaded with pipe.load_lora_weights."""
    pipe, kw = _pipe(model), _inputs(model)
    base = _out(model, kw)
    pipe.load_lora_weights(made["a"], adapter_name="a")
    one = _out(model, kw) - base
    pipe.load_lora_weights(made["b"], adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=weights or [1.0, 1.0])
    both = _out(model, kw) - base
    return one, both, pipe, base, kw


@pytest.fixture(scope="module")
def reference(made, tiny_zoo_dir):
    one, both, *_ = _effects(FluxTransformer2DModel.from_pretrained(tiny_zoo_dir), made, [0.5, -1.0])
    return one, both


@pytest.mark.parametrize("name", ARTIFACTS)
def test_lora_effect_matches_the_uncompressed_model(name, made, reference):
    model = FluxTransformer2DModel.from_pretrained(made["root"] / name)
    one, both, pipe, base, kw = _effects(model, made, [0.5, -1.0])
    wrapped = [m for m in model.modules() if isinstance(m, CompressedLoraLinear)]
    assert any(isinstance(m.get_base_layer(), QuantLinear) for m in wrapped)
    assert _rel(one, reference[0]) < 0.05              # one adapter
    assert _rel(both, reference[1]) < 0.05             # two, weighted 0.5 and -1 with set_adapters
    assert one.norm() > 0.2 * base.norm()              # the LoRA changes the output: the check has teeth
    with pytest.raises(FuseRefused, match="re-quantize"):
        pipe.fuse_lora()                               # refused, before any layer changed
    torch.testing.assert_close(_out(model, kw) - base, both, rtol=0, atol=0)
    pipe.unload_lora_weights()
    assert not any(isinstance(m, CompressedLoraLinear) for m in model.modules())
    assert torch.equal(_out(model, kw), base)


def test_w4a8_branch_undoes_folded_smoothing(made, reference):
    model = FluxTransformer2DModel.from_pretrained(made["root"] / "w4a8")
    folds = fold_scales(model)
    manifest = json.loads((made["root"] / "w4a8" / "config.json").read_text())["quantization_config"]["manifest"]
    assert {"fold_scale", "affine_norm"} <= {e["op"] for e in manifest}
    # inputs of q/k/v (norm fold) and to_out (V-rows fold); outputs of to_v and the modulation's shift rows
    assert {"in"} <= set(folds["transformer_blocks.0.attn.to_out.0"])
    assert {"out"} == set(folds["transformer_blocks.0.attn.to_v"]) - {"in"}
    shift = folds["transformer_blocks.0.norm1.linear"]["out"].view(6, -1)
    assert not torch.equal(shift[0], torch.ones_like(shift[0])) and torch.equal(shift[1], torch.ones_like(shift[1]))
    pipe, kw = _pipe(model), _inputs(model)
    base = _out(model, kw)
    pipe.load_lora_weights(made["a"], adapter_name="a")
    for m in model.modules():                          # the branch on what the compressed linears see
        if isinstance(m, CompressedLoraLinear):
            m.fold_in = m.fold_out = None
    assert _rel(_out(model, kw) - base, reference[0]) > 0.05


def _added(made):
    model = FluxTransformer2DModel.from_pretrained(made["root"] / "w4a8").eval()
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_out.0", "norm1.linear"],
                                 init_lora_weights=False))
    return model


def test_add_adapter_and_compile_without_graph_breaks(made):
    model = _added(made)
    layer = model.transformer_blocks[0].attn.to_out[0]          # QuantLinear, rotated input, a8, folded input
    assert isinstance(layer, CompressedLoraLinear) and layer.fold_in is not None
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, backend="eager", fullgraph=True)(x)   # fullgraph: a graph break fails
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_whole_model_compiles_without_graph_breaks(made):
    model = _added(made)
    kw = _inputs(model)
    eager = _out(model, kw)
    with torch.no_grad():
        out = torch.compile(model, backend="eager", fullgraph=True)(**kw).sample
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_artifact_without_recorded_folds_is_refused(made):
    model = FluxTransformer2DModel.from_pretrained(made["root"] / "w4a8")
    cfg = model.config.quantization_config
    manifest = cfg["manifest"] if isinstance(cfg, dict) else cfg.manifest
    manifest[:] = [e for e in manifest if e["op"] != "fold_scale"]     # as written before folds were recorded
    with pytest.raises(ModelError, match="fold scales"):
        attach_folds(model)


QWEN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1"]


def test_qwenimage_lora_format(tiny_qwen_dir, tmp_path):
    """Qwen-Image's LoRA loader on a smoothed (folds into img_mod / txt_mod shift rows and V rows), 8-bit
    weight and activation model. (At 4 bits this 48-wide random model's own quantization error moves the LoRA's
    effect by 7-8%: tools-free numbers in the README.)"""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
    from dicompress.calib import capture
    from dicompress.recipe import CalibrationConfig
    lora = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_dir)
    torch.manual_seed(1)
    lora.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=QWEN_TARGETS, init_lora_weights=False))
    QwenImagePipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(lora))
    orig = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_dir).eval()
    store = capture(orig, adapter_for(orig), CalibrationConfig(source="synthetic", seeds=[0], steps=2, batch_size=2),
                    {"name": "tiny", "path": tiny_qwen_dir}, tmp_path / "store", block_inputs=False, progress=False)
    small = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_dir).eval()
    dicompress.compress(small, [{"smooth": {"alpha": 0.5}}, {"rtn": {"bits": 8}}, {"act_quant": {"bits": 8}}],
                        calibration=store, progress=False)
    assert fold_scales(small)
    effects = []
    for model in (orig, small):
        kw, pipe = _inputs(model), QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                                     transformer=model)
        base = _out(model, kw)
        pipe.load_lora_weights(tmp_path / "lora")
        effects.append(_out(model, kw) - base)
    assert _rel(effects[1], effects[0]) < 0.05 and effects[0].norm() > 0.02 * base.norm()


def test_narrower_lora_input_is_zero_padded_wider_refused(made):
    from dicompress.lora.hooks import _pad_lora_inputs
    model = FluxTransformer2DModel.from_pretrained(made["root"] / "w4")
    q = model.transformer_blocks[0].attn.to_q
    key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    a = torch.randn(4, q.in_features - 8)
    padded = _pad_lora_inputs(model, {key: a.clone()}, "transformer.")[key]
    assert padded.shape == (4, q.in_features) and torch.equal(padded[:, :-8], a) and not padded[:, -8:].any()
    with pytest.raises(ModelError, match="input features"):
        _pad_lora_inputs(model, {key: torch.randn(4, q.in_features + 1)}, "transformer.")
