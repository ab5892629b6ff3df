"""Quantize on load: from_pretrained(original, quantization_config=DicompressConfig(passes=[...])) and diffusers'
PipelineQuantizationConfig give the model the tlq / rtn pass gives in memory, bit for bit; it saves with
save_pretrained as an ordinary artifact that loads back in a fresh process; calibration passes are refused."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, \
    PipelineQuantizationConfig

import dicompress
from dicompress.arch import adapter_for
from dicompress.errors import RecipeError
from dicompress.io.diffusers_plugin import DicompressConfig
from dicompress.nn.qlinear import QuantLinear

# TLQ's grid search is the slow part: one block's attention keeps the test short (and exercises include)
PASSES = {"tlq": {"tlq": {"bits": 4, "include": ["transformer_blocks.0.attn.*"]}},
          "rtn": {"rtn": {"bits": 4, "granularity": "group", "group_size": 64}}}


def _out(model):
    kw = adapter_for(model).synthetic_inputs(model, 2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(**kw).sample


def _in_memory(src, spec):
    model = FluxTransformer2DModel.from_pretrained(src).eval()
    dicompress.compress(model, [spec], progress=False)
    return model


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", sorted(PASSES))
def test_on_load_equals_the_pass_in_memory(name, tiny_zoo_dir):
    model = FluxTransformer2DModel.from_pretrained(tiny_zoo_dir, quantization_config=DicompressConfig(
        passes=[PASSES[name]])).eval()
    ref = _in_memory(tiny_zoo_dir, PASSES[name])
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == \
        sum(isinstance(m, QuantLinear) for m in ref.modules()) > 0
    assert _same(model, ref) and torch.equal(_out(model), _out(ref))
    cfg = model.config.quantization_config
    assert not cfg.on_load and [e["module"] for e in cfg.manifest] == \
        [n for n, m in ref.named_modules() if isinstance(m, QuantLinear)]


def test_rtn_in_row_chunks_gives_the_same_codes(tiny_zoo_dir, monkeypatch):
    from dicompress.io import on_load
    monkeypatch.setattr(on_load, "RTN_CHUNK", 40 * 32 + 5)   # uneven chunks of 3..40 rows
    model = FluxTransformer2DModel.from_pretrained(tiny_zoo_dir, quantization_config=DicompressConfig(
        passes=[PASSES["rtn"]]))
    assert _same(model, _in_memory(tiny_zoo_dir, PASSES["rtn"]))


LOAD_BACK = """
import sys, json, torch
torch.set_num_threads(1)
import dicompress
from diffusers import FluxTransformer2DModel
sd = torch.load(sys.argv[2])
a = FluxTransformer2DModel.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16).state_dict()
b = dicompress.load(sys.argv[1]).state_dict()          # fp32 parameters; bf16 -> fp32 is exact
print(json.dumps({"from_pretrained": a.keys() == sd.keys() and all(torch.equal(a[k], sd[k]) for k in sd),
                  "load": b.keys() == sd.keys() and all(torch.equal(b[k], sd[k].to(b[k].dtype)) for k in sd)}))
"""


def _saved_bf16(src, out):
    model = FluxTransformer2DModel.from_pretrained(src, quantization_config=DicompressConfig(
        passes=[PASSES["rtn"]]), torch_dtype=torch.bfloat16)
    q = model.transformer_blocks[0].attn.to_q
    assert q.bias.dtype == torch.bfloat16 and q.scales.dtype == torch.float16   # codec tensors keep theirs
    model.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "passes" not in saved and saved["source"]["on_load"] == [PASSES["rtn"]]
    assert {e["op"] for e in saved["manifest"]} == {"quantize"}
    return model


def test_saves_as_an_artifact_that_loads_back(tiny_zoo_dir, tmp_path):
    model = _saved_bf16(tiny_zoo_dir, tmp_path / "art")
    assert _same(FluxTransformer2DModel.from_pretrained(tmp_path / "art", torch_dtype=torch.bfloat16), model)
    assert _same(dicompress.load(tmp_path / "art", torch_dtype=torch.bfloat16), model)


@pytest.mark.slow
def test_saved_artifact_loads_in_a_fresh_process(tiny_zoo_dir, tmp_path):
    model = _saved_bf16(tiny_zoo_dir, tmp_path / "art")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    out = subprocess.run([sys.executable, "-c", LOAD_BACK, str(tmp_path / "art"), str(tmp_path / "sd.pt")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"from_pretrained": True, "load": True}


def test_pipeline_quantization_config(tiny_zoo_dir, tmp_path):
    # a pipeline folder holding the transformer alone (the other components are absent, passed as None)
    absent = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"])
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=FluxTransformer2DModel.from_pretrained(
        tiny_zoo_dir), **absent).save_pretrained(tmp_path / "p")
    mapping = PipelineQuantizationConfig(quant_mapping={"transformer": DicompressConfig(passes=[PASSES["rtn"]])})
    pipe = FluxPipeline.from_pretrained(tmp_path / "p", quantization_config=mapping, **absent)
    ref = _in_memory(tiny_zoo_dir, PASSES["rtn"])
    assert _same(pipe.transformer, ref)
    pipe.save_pretrained(tmp_path / "q")                # the pipeline folder's transformer/ is an artifact
    assert _same(FluxTransformer2DModel.from_pretrained(tmp_path / "q" / "transformer"), ref)


@pytest.mark.parametrize("passes, key", [
    ([{"tlq": {"bits": 4, "gptq": True}}], "gptq"),
    ([{"smooth": {"alpha": 0.5}}], "smooth"),
    ([{"act_quant": {"bits": 8}}], "act_quant"),
    ([{"tlq": {"bits": 4}}, {"act_quant": {"bits": 8}}], "passes"),
])
def test_calibration_passes_are_refused_with_a_hint(passes, key):
    with pytest.raises(RecipeError, match=key) as e:
        DicompressConfig(passes=passes)
    assert "dicompress run" in str(e.value.hint)
