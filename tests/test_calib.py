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


def _rows_by_sample(store, name):
    """A block's captured rows as {(class row, timestep): hidden_states row}-like sortable keys: rows in
    order of (timestep, first values) so two captures of the same samples compare whatever their order."""
    x = store.block_inputs(name)
    key = torch.stack([x["timestep"], x["hidden_states"].flatten(1)[:, 0]], 1)
    order = sorted(range(key.shape[0]), key=lambda i: tuple(key[i].tolist()))
    return {k: (v[order] if torch.is_tensor(v) and v.shape[:1] == key.shape[:1] else v) for k, v in x.items()}


def test_block_batch_runs_blocks_in_pieces_and_stores_the_same_rows(tiny_zoo_dir, tmp_path):
    """batch_size 6 with block_batch 2: one pipeline call per step instead of three, every block run two
    samples at a time, chunks of two rows; the captured rows are those of the batch-2 capture."""
    from dicompress.calib.store import CalibrationStore as Store
    base = dict(source="classes", classes=[0, 1, 2, 3, 4, 5], seeds=[0], steps=3)
    _, small = _capture(tiny_zoo_dir, tmp_path / "a", CalibrationConfig(**base, batch_size=2))
    model, big = _capture(tiny_zoo_dir, tmp_path / "b", CalibrationConfig(**base, batch_size=6, block_batch=2))
    assert isinstance(big, Store) and big.meta["rows"] == small.meta["rows"] == 18
    for name in big.block_names:
        files, _ = big.block_files(name)
        assert len(files) == 9                               # 3 model calls x 3 chunks of 2 rows
        a, b = _rows_by_sample(small, name), _rows_by_sample(big, name)
        for k in ("hidden_states", "encoder_hidden_states", "temb", "timestep"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    for name, s in small.linear_stats().items():
        t = big.linear_stats()[name]
        assert t["count"] == s["count"]
        torch.testing.assert_close(t["absmax"], s["absmax"], rtol=1e-4, atol=1e-5)
    assert big.final_outputs()["hidden_states"].shape[0] == 18
    assert "forward" not in model.transformer_blocks[0].__dict__    # the class's forward is back


def test_chunked_blocks_split_per_sample_inputs_only(tiny_zoo_dir):
    from dicompress.calib.capture import chunked_blocks
    model = load_transformer(resolve_model(str(tiny_zoo_dir)))
    adapter = adapter_for(model)
    kw = adapter.synthetic_inputs(model, 5, torch.Generator().manual_seed(0))
    seen = []
    hook = model.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, k: seen.append(k["hidden_states"].shape[0]), with_kwargs=True)
    sizes = []
    inner = model.transformer_blocks[1].attn.register_forward_pre_hook(
        lambda m, a, k: sizes.append(k["hidden_states"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        ref = model(**kw).sample
        seen.clear(), sizes.clear()
        with chunked_blocks(model, adapter, 2):
            out = model(**kw).sample
    hook.remove(), inner.remove()
    assert seen == [5] and sizes == [2, 2, 1]                # hooks see the batch, the block runs pieces
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_calls_per_step_of_each_source(tmp_path, tiny_zoo_dir):
    from safetensors.torch import save_file

    from dicompress.calib.sources import calls_per_step
    (tmp_path / "p.txt").write_text("a cat\n# a comment\n\na dog\na fox\na hen\na cow\n")
    cfg = CalibrationConfig(source="prompts", prompts=str(tmp_path / "p.txt"), seeds=[0, 1], batch_size=2)
    assert calls_per_step(cfg, {}) == (6, 10)                  # 3 calls per seed, each seed on its own
    save_file({"prompt_embeds": torch.zeros(7, 2, 4), "pooled_prompt_embeds": torch.zeros(7, 4)},
              str(tmp_path / "e.safetensors"))
    cfg = CalibrationConfig(source="embeddings", embeddings=str(tmp_path / "e.safetensors"), seeds=[0, 1, 2],
                            batch_size=7, block_batch=2)
    assert calls_per_step(cfg, {}) == (3, 21)
    cfg = CalibrationConfig(source="classes", classes=[1, 2], seeds=[0], batch_size=20)
    assert calls_per_step(cfg, {"path": tiny_zoo_dir}) == (1, 2)
    assert calls_per_step(CalibrationConfig(source="synthetic"), {}) is None


def test_block_batch_on_qwenimage_blocks(tiny_qwen_dir, tmp_path):
    """Qwen-Image blocks (per-sample text mask, modulation from temb) run in pieces give the whole batch's
    rows."""
    base = dict(source="synthetic", seeds=[0], steps=2, batch_size=4)
    _, whole = _capture(tiny_qwen_dir, tmp_path / "a", CalibrationConfig(**base))
    _, pieces = _capture(tiny_qwen_dir, tmp_path / "b", CalibrationConfig(**base, block_batch=2))
    for name in whole.block_names:
        a, b = whole.block_inputs(name), pieces.block_inputs(name)
        assert len(pieces.block_files(name)[0]) == 2 * len(whole.block_files(name)[0])
        for k in ("hidden_states", "encoder_hidden_states", "temb"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
