"""The tiny random FLUX.1-dev / Qwen-Image pipeline directories (dicompress.zoo.pipelines): real layout and
classes, loadable by diffusers, runnable end to end, deterministic, bf16 on disk, accepted by dicompress."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dicompress.zoo.pipelines import make_tiny_flux_pipeline, make_tiny_qwenimage_pipeline

ROOT = Path(__file__).resolve().parents[1]
LONG_PROMPT = "a red cat sitting on a blue house under the night sky, " * 60   # > 77 CLIP, > 512 T5, > 1024 Qwen


def _family(request, name):
    """(directory, pipeline class name, transformer class name) for a parametrized family."""
    if name == "flux":
        return request.getfixturevalue("tiny_flux_pipeline_dir"), "FluxPipeline", "FluxTransformer2DModel"
    return request.getfixturevalue("tiny_qwenimage_pipeline_dir"), "QwenImagePipeline", "QwenImageTransformer2DModel"


def _load(d, cls_name, dtype=torch.float32):
    import diffusers
    pipe = getattr(diffusers, cls_name).from_pretrained(d, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux_pipe(tiny_flux_pipeline_dir):
    return _load(tiny_flux_pipeline_dir, "FluxPipeline")


@pytest.fixture(scope="module")
def qwen_pipe(tiny_qwenimage_pipeline_dir):
    return _load(tiny_qwenimage_pipeline_dir, "QwenImagePipeline")


def _safetensors(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*.safetensors"))}


def _stored_dtypes(d: Path) -> set[torch.dtype]:
    out = set()
    for p in d.rglob("*.safetensors"):
        with safe_open(str(p), "pt") as f:
            out |= {f.get_tensor(k).dtype for k in f.keys()}
    return out


def test_flux_layout_is_flux1_dev(tiny_flux_pipeline_dir):
    import transformers
    index = json.loads((tiny_flux_pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    # transformers 5 makes T5TokenizerFast an alias of T5Tokenizer, and diffusers records the class's own name
    assert getattr(transformers, index["tokenizer_2"][1]) is transformers.T5TokenizerFast
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_flux_pipeline_dir / sub).is_dir(), sub


def test_qwenimage_layout_is_qwen_image(tiny_qwenimage_pipeline_dir):
    index = json.loads((tiny_qwenimage_pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage"]
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert index["tokenizer"][1] in ("Qwen2Tokenizer", "Qwen2TokenizerFast")


@pytest.mark.parametrize("family", ["flux", "qwenimage"])
def test_diffusion_pipeline_picks_the_family_class(request, family):
    from diffusers import DiffusionPipeline
    d, cls_name, tcls = _family(request, family)
    pipe = DiffusionPipeline.from_pretrained(d, torch_dtype=torch.float32)
    assert type(pipe).__name__ == cls_name
    assert type(pipe.transformer).__name__ == tcls
    assert pipe.transformer.dtype == torch.float32


def test_flux_runs_two_steps(flux_pipe):
    kw = dict(prompt=["a red cat", "two dogs"], num_inference_steps=2, height=64, width=64, guidance_scale=3.5)
    lat = flux_pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert lat.shape == (2, (64 // 16) ** 2, 64)          # 8x VAE, 2x2 packing of 16 latent channels
    assert torch.isfinite(lat).all()
    again = flux_pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(lat, again)
    img = flux_pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (2, 64, 64, 3) and (img >= 0).all() and (img <= 1).all()


def test_qwenimage_runs_two_steps(qwen_pipe):
    kw = dict(prompt=["a red cat", "two dogs"], num_inference_steps=2, height=64, width=64)
    lat = qwen_pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert lat.shape == (2, (64 // 16) ** 2, 64) and torch.isfinite(lat).all()
    # true CFG (the default true_cfg_scale 4.0) runs only with a negative prompt
    cfg = qwen_pipe(prompt="a red cat", negative_prompt=" ", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="pil").images
    assert cfg[0].size == (64, 64)


def test_qwen_template_prefix_is_dropped_exactly(qwen_pipe):
    prefix = qwen_pipe.prompt_template_encode.split("{}")[0]
    assert len(qwen_pipe.tokenizer(prefix).input_ids) == qwen_pipe.prompt_template_encode_start_idx == 34
    embeds, mask = qwen_pipe.encode_prompt(["a red cat"])
    n_prompt = len(qwen_pipe.tokenizer(qwen_pipe.prompt_template_encode.format("a red cat")).input_ids) - 34
    assert embeds.shape == (1, n_prompt, qwen_pipe.text_encoder.config.text_config.hidden_size) and mask is None


def test_tokenizers_take_any_prompt(flux_pipe, qwen_pipe):
    odd = "Ünïcödé café ☕ 🐈 {x} naïve — 東京"
    clip, qwen = flux_pipe.tokenizer, qwen_pipe.tokenizer
    assert clip.model_max_length == 77 and flux_pipe.tokenizer_2.model_max_length == 512
    assert clip.unk_token_id not in clip(odd, add_special_tokens=False).input_ids   # byte-level: nothing unknown
    assert qwen.decode(qwen(odd).input_ids) == odd
    assert flux_pipe.tokenizer_2(odd).input_ids[-1] == flux_pipe.tokenizer_2.eos_token_id


def _diffusers_log(caplog):
    """diffusers' loggers do not propagate to the root logger that caplog listens on."""
    logger = logging.getLogger("diffusers")
    logger.addHandler(caplog.handler)
    return logger


def test_long_prompts_truncate_as_diffusers_does(flux_pipe, qwen_pipe, caplog):
    logger = _diffusers_log(caplog)
    try:
        embeds, pooled, _ = flux_pipe.encode_prompt(LONG_PROMPT, prompt_2=None)
    finally:
        logger.removeHandler(caplog.handler)
    assert embeds.shape == (1, 512, 64) and pooled.shape == (1, 32)
    assert "CLIP can only handle sequences up to 77 tokens" in caplog.text
    assert "`max_sequence_length` is set to  512 tokens" in caplog.text
    embeds, _ = qwen_pipe.encode_prompt([LONG_PROMPT, "two dogs"])   # the pipeline truncates silently
    assert embeds.shape[:2] == (2, 1024) and torch.isfinite(embeds).all()


@pytest.mark.parametrize("family", ["flux", "qwenimage"])
def test_same_seed_same_bytes_and_bf16_on_disk(request, tmp_path, family):
    d, _, _ = _family(request, family)
    build = make_tiny_flux_pipeline if family == "flux" else make_tiny_qwenimage_pipeline
    assert _stored_dtypes(d) == {torch.bfloat16}
    again = _safetensors(build(tmp_path / "again", seed=0))
    assert again == _safetensors(d) and len(again) >= 3
    other = _safetensors(build(tmp_path / "other", seed=1))
    assert all(other[k] != again[k] for k in again)


def test_resolve_model_and_adapters_accept_them(request):
    from dicompress.arch import adapter_for
    from dicompress.models import load_transformer, resolve_model
    for family, blocks in (("flux", {"double": 2, "single": 2}), ("qwenimage", {"double": 2})):
        d, _, tcls = _family(request, family)
        info = resolve_model(str(d))
        assert (info.class_name, info.pipeline_root, info.path) == (tcls, d, d / "transformer")
        model = load_transformer(info)
        adapter = adapter_for(model)
        assert adapter.describe(model)["blocks"] == blocks
        for ref in adapter.blocks(model):   # every linear the adapter's smoothing groups name exists
            names = dict(model.get_submodule(ref.name).named_modules())
            for group in adapter.input_groups[ref.stream]:
                assert all(isinstance(names.get(n), torch.nn.Linear) for n in group.linears), (ref.name, group)


def test_tool_writes_fp32_on_request(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_tiny_pipeline", ROOT / "tools" / "make_tiny_pipeline.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["qwenimage", str(tmp_path / "q"), "--dtype", "fp32", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "transformer/diffusion_pytorch_model.safetensors" in out and "bytes in all" in out
    assert _stored_dtypes(tmp_path / "q") == {torch.float32}
    with pytest.raises(SystemExit):   # never writes over a directory with files in it
        tool.main(["flux", str(tmp_path / "q")])
