import torch

from dicompress.arch import adapter_for
from dicompress.calib import CalibrationStore, capture
from dicompress.models import load_transformer, resolve_model
from dicompress.recipe import CalibrationConfig


def _capture(model_dir, tmp_path, cfg, block_inputs=True):
    info = resolve_model(str(model_dir))
    model = load_transformer(info)
    store = capture(model, adapter_for(model), cfg, {"name": info.name, "path": info.path}, tmp_path / "store",
                    block_inputs=block_inputs, progress=False)
    return model, store


def test_classes_capture_every_timestep(tiny_zoo_dir, tmp_path):
    cfg = CalibrationConfig(source="classes", classes=[1, 7, 3], seeds=[0, 1], steps=3, batch_size=4)
    model, store = _capture(tiny_zoo_dir, tmp_path, cfg)
    rows = 3 * 2 * 3
    assert store.meta["rows"] == rows and store.block_names[0] == "transformer_blocks.0"
    for name in store.block_names:
        x = store.block_inputs(name)
        assert x["hidden_states"].shape == (rows, 64, 32)
        assert x["encoder_hidden_states"].shape == (rows, 4, 32) and x["temb"].shape == (rows, 32)
        assert isinstance(x["image_rotary_emb"], tuple) and x["image_rotary_emb"][0].shape == (68, 16)
        assert len(torch.unique(x["timestep"])) == 3      # every sampling timestep captured
    # replaying a block on its captured inputs reproduces the next block's captured inputs
    a = adapter_for(model)
    x0, x1 = store.block_inputs("transformer_blocks.0"), store.block_inputs("transformer_blocks.1")
    with torch.no_grad():
        out = a.run_block(model.transformer_blocks[0], x0)
    torch.testing.assert_close(out["hidden_states"], x1["hidden_states"])
    torch.testing.assert_close(out["encoder_hidden_states"], x1["encoder_hidden_states"])
    stats = store.linear_stats()
    s = stats["transformer_blocks.0.attn.to_q"]
    assert s["absmax"].shape == (32,) and s["count"] == rows * 64 and (s["rms"] <= s["absmax"] + 1e-6).all()
    assert "single_transformer_blocks.1.proj_out" in stats
    assert store.final_outputs()["hidden_states"].shape[0] == rows


def test_stats_only_capture(tiny_zoo_dir, tmp_path):
    cfg = CalibrationConfig(source="classes", classes=[0], seeds=[0], steps=2)
    _, store = _capture(tiny_zoo_dir, tmp_path, cfg, block_inputs=False)
    assert not store.has_block_inputs and store.linear_stats()
    import pytest
    from dicompress.errors import CalibrationError
    with pytest.raises(CalibrationError, match="statistics only"):
        store.block_inputs("transformer_blocks.0")


def test_synthetic_capture_qwen(tiny_qwen_dir, tmp_path):
    cfg = CalibrationConfig(source="synthetic", seeds=[0], steps=2, batch_size=2)
    model, store = _capture(tiny_qwen_dir, tmp_path, cfg)
    x = store.block_inputs("transformer_blocks.1")
    assert x["hidden_states"].shape[0] == 4
    a = adapter_for(model)
    with torch.no_grad():
        out = a.run_block(model.transformer_blocks[0], store.block_inputs("transformer_blocks.0"))
    torch.testing.assert_close(out["hidden_states"], x["hidden_states"])


def test_interrupted_capture_is_not_a_store(tmp_path):
    import pytest
    from dicompress.calib import StoreWriter
    from dicompress.errors import CalibrationError
    w = StoreWriter(tmp_path / "s", {"source": "classes"})
    w.write_block_chunk("transformer_blocks.0", {"hidden_states": torch.zeros(2, 3)})
    with pytest.raises(CalibrationError, match="meta.json"):
        CalibrationStore(tmp_path / "s")
