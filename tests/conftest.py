"""Shared fixtures: small random models in the layouts dicompress reads (built in code, never downloaded)."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

if not torch.cuda.is_available():   # before triton is imported: kernel tests run in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")



def _interpreter_broken() -> str | None:
    """Triton < 3.8's interpreter calls int() on one-element numpy arrays, which numpy >= 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"): seen with triton 3.6 + numpy 2.5."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    ver = lambda v: tuple(int(p) for p in v.split("+")[0].split(".")[:2])  # noqa: E731
    if ver(triton.__version__) < (3, 8) and ver(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__}: use triton >= 3.8 "
                "or numpy < 2.4 for the interpreter tests")
    return None


def pytest_collection_modifyitems(config, items):
    reason = _interpreter_broken()
    if reason:
        for item in items:
            if item.get_closest_marker("triton"):
                item.add_marker(pytest.mark.skip(reason=reason))


TINY_FLUX = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(4, 6, 6))
TINY_QWEN = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                 num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))


# one double + one single block, 32 wide: the quantization tests' model (tests/test_lowrank.py, test_lrq_auto.py)
SMALL_FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def small_flux():
    """SMALL_FLUX with seed-0 weights: every call gives the same model (the store below was captured on it)."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(**SMALL_FLUX).eval()


@pytest.fixture(scope="session")
def small_flux_store(tmp_path_factory):
    """A synthetic calibration store of small_flux() with block inputs (GPTQ Hessians, lrq_auto's inputs)."""
    from dicompress.arch import adapter_for
    from dicompress.calib import capture
    from dicompress.recipe import CalibrationConfig
    root = tmp_path_factory.mktemp("small_flux_calib")
    model = small_flux()
    return capture(model, adapter_for(model), CalibrationConfig(source="synthetic", seeds=[0], steps=2, batch_size=2),
                   {"name": "tiny", "path": root}, root / "store", block_inputs=True, progress=False)


@pytest.fixture(autouse=True)
def _threads_and_cache(tmp_path_factory, monkeypatch):
    torch.set_num_threads(1)   # 2 threads on a loaded 2-core machine can be 100x slower (oversubscription)
    monkeypatch.setenv("DICOMPRESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_zoo_dir(tmp_path_factory):
    """A random FLUX in the zoo layout: transformer + per-class conditioning + digit classifier."""
    from diffusers import FluxTransformer2DModel
    from dicompress.zoo.classifier import DigitClassifier
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_zoo")
    FluxTransformer2DModel(**TINY_FLUX).save_pretrained(d)
    save_file({"prompt_embeds": torch.randn(10, 4, 64), "pooled_prompt_embeds": torch.randn(10, 64)},
              str(d / "conditioning.safetensors"))
    save_file({k: v.contiguous() for k, v in DigitClassifier().state_dict().items()},
              str(d / "classifier.safetensors"))
    return d


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_qwen")
    QwenImageTransformer2DModel(**TINY_QWEN).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_flux_pipeline_dir(tmp_path_factory):
    """A random FLUX.1-dev-shaped pipeline directory (model_index.json, CLIP + T5, VAE, bf16 weights)."""
    from dicompress.zoo.pipelines import make_tiny_flux_pipeline
    return make_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux_pipeline"))


@pytest.fixture(scope="session")
def tiny_qwenimage_pipeline_dir(tmp_path_factory):
    """A random Qwen-Image-shaped pipeline directory (model_index.json, Qwen2.5-VL, Qwen VAE, bf16 weights)."""
    from dicompress.zoo.pipelines import make_tiny_qwenimage_pipeline
    return make_tiny_qwenimage_pipeline(tmp_path_factory.mktemp("tiny_qwenimage_pipeline"))
