"""The Python API end to end: compress -> save -> load through diffusers, exactly."""
import json

import pytest
import torch
import yaml

import dicompress
from dicompress.models import load_transformer, resolve_model
from dicompress.nn.qlinear import QuantLinear


def _inputs(model, batch=2, seed=0):
    from dicompress.arch import adapter_for
    return adapter_for(model).synthetic_inputs(model, batch, torch.Generator().manual_seed(seed))


def test_compress_save_load_exact_flux(tiny_zoo_dir, tmp_path):
    from diffusers import FluxTransformer2DModel
    model = load_transformer(resolve_model(str(tiny_zoo_dir)))
    state = dicompress.compress(model, [dicompress.TLQ(bits=4),
                                        {"rtn": {"bits": 8, "include": ["time_text_embed.*"], "keep": []}}],
                                progress=False)
    codecs = [e["codec"] for e in state.manifest]
    assert codecs.count("tlq") == 34 and codecs.count("uniform") == 4      # 4 embedder linears
    assert [p["pass"] for p in state.report["passes"]] == ["tlq", "rtn"]
    dicompress.save(state, tmp_path / "a")
    kw = _inputs(model)
    with torch.no_grad():
        ref = model(**kw).sample
        for loaded in (FluxTransformer2DModel.from_pretrained(tmp_path / "a"), dicompress.load(tmp_path / "a")):
            assert isinstance(loaded.transformer_blocks[0].attn.to_q, QuantLinear)
            assert torch.equal(loaded(**kw).sample, ref)


def test_compress_rejects_bad_pass_config(tiny_zoo_dir):
    model = load_transformer(resolve_model(str(tiny_zoo_dir)))
    with pytest.raises(dicompress.RecipeError, match="bits"):
        dicompress.compress(model, [{"tlq": {"bits": 1}}], progress=False)


def test_synthetic_qwenimage_run_loads_in_diffusers(tiny_qwen_dir, tmp_path):
    """Data-free W4 on a random tiny Qwen-Image, written by `run`, loaded by diffusers' own class."""
    from diffusers import QwenImageTransformer2DModel
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_qwen_dir), "output": str(tmp_path / "q"),
        "calibration": {"source": "synthetic", "seeds": [0], "steps": 2, "batch_size": 2},
        "passes": [{"tlq": {"bits": 4, "granularity": "group", "group_size": 64}}]}))
    report = dicompress.run(recipe, progress=False)
    assert "metrics" not in report and report["footprint"]["quantized_linears"] == 2 * 12
    assert all("act_rms" in row for row in report["layers"])   # calibration statistics reached the report
    loaded = QwenImageTransformer2DModel.from_pretrained(tmp_path / "q")
    teacher = load_transformer(resolve_model(str(tiny_qwen_dir)))
    kw = _inputs(teacher)
    with torch.no_grad():
        a, b = loaded(**kw).sample, teacher(**kw).sample
    assert isinstance(loaded.transformer_blocks[1].img_mlp.net[2], QuantLinear)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.95
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["source"]["model"] == str(tiny_qwen_dir)
