import json
import time

import pytest

from dicompress.errors import ModelError
from dicompress.models import meta_model, resolve_model


def test_zoo_model_resolves():
    info = resolve_model("zoo:tiny-flux-digits")
    assert info.class_name == "FluxTransformer2DModel" and info.is_zoo


def test_unknown_zoo_name():
    with pytest.raises(ModelError, match="tiny-flux-digits"):
        resolve_model("zoo:nope")


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist") as e:
        resolve_model(str(tmp_path / "absent"))
    assert "--model" in str(e.value)


def test_dir_that_is_not_diffusers(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a diffusers model"):
        resolve_model(str(tmp_path))


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelError) as e:
        resolve_model(str(tmp_path))
    assert "UNet2DConditionModel" in str(e.value)
    assert "FluxTransformer2DModel" in str(e.value) and "QwenImageTransformer2DModel" in str(e.value)


def test_absent_hub_id_fails_fast_with_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    t0 = time.time()
    with pytest.raises(ModelError) as e:
        resolve_model("black-forest-labs/FLUX.1-dev")
    assert time.time() - t0 < 10
    assert "never downloads" in str(e.value) and "--model" in str(e.value)


def test_pipeline_dir_and_meta_model(tiny_qwen_dir, tmp_path):
    root = tmp_path / "pipe"
    root.mkdir()
    (root / "model_index.json").write_text("{}")
    (root / "transformer").symlink_to(tiny_qwen_dir)
    info = resolve_model(str(root))
    assert info.pipeline_root == root and info.class_name == "QwenImageTransformer2DModel"
    m = meta_model(info)
    assert next(m.parameters()).is_meta
