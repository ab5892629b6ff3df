"""Streaming (block-by-block) compression: same artifact as the in-memory run, one block in memory, resumable."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import dicompress
from dicompress.errors import ModelError, RecipeError
from dicompress.models import load_transformer, resolve_model
from dicompress.passes.base import PASSES, Pass
from dicompress.stream import Checkpoint, Sweep, offloaded, skeleton

W4A8 = [{"smooth": {"alpha": 0.5}}, {"ars": {"threshold": 1.0}}, {"tlq": {"bits": 4, "gptq": True}},
        {"act_quant": {"bits": 8}}]


def _recipe(path: Path, model, out, passes=W4A8, calibration=None, **extra) -> Path:
    cal = calibration or {"source": "classes", "classes": [0, 1, 2], "seeds": [0], "steps": 3, "batch_size": 3}
    path.write_text(yaml.safe_dump({"model": str(model), "output": str(out), "passes": passes,
                                    "calibration": {**cal, "cache_dir": str(path.parent / "cache")},
                                    "eval": {"enabled": False}, **extra}))
    return path


def _tensors(artifact: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(artifact.glob("diffusion_pytorch_model*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _config(artifact: Path) -> dict:
    return json.loads((artifact / "config.json").read_text())


def assert_same_artifact(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    ca, cb = _config(a), _config(b)
    assert ca["quantization_config"]["manifest"] == cb["quantization_config"]["manifest"]
    for c in (ca, cb):
        c["quantization_config"].pop("dicompress_version")
        c["quantization_config"].pop("checksums")             # the two paths lay the same tensors out differently
        c["quantization_config"]["source"].pop("recipe")      # the recipe files' paths differ
    assert ca == cb


@pytest.fixture(scope="module")
def runs(tiny_zoo_dir, tmp_path_factory):
    """The W4A8 recipe run in memory and streamed (propagate: original)."""
    d = tmp_path_factory.mktemp("streaming")
    mem = dicompress.run(_recipe(d / "mem.yaml", tiny_zoo_dir, d / "mem", streaming={"enabled": False}),
                         progress=False)
    streamed = dicompress.run(_recipe(d / "st.yaml", tiny_zoo_dir, d / "st", streaming={"enabled": True}),
                              progress=False)
    return d, mem, streamed


def test_streamed_artifact_equals_in_memory_bit_for_bit(runs):
    d, mem, streamed = runs
    assert "streaming" not in mem and streamed["streaming"]["enabled"] is True
    assert streamed["streaming"]["resumed_blocks"] == 0 and len(streamed["streaming"]["blocks"]) == 4
    assert_same_artifact(d / "mem", d / "st")
    # the report's per-layer facts (GPTQ output SQNR, J, input statistics ...) are the same numbers too
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(mem["layers"]) == strip(streamed["layers"])
    assert [p["pass"] for p in streamed["passes"]] == ["smooth", "ars", "tlq", "act_quant"]
    assert [{k: v for k, v in p.items() if k != "seconds"} for p in mem["passes"]] == \
        [{k: v for k, v in p.items() if k != "seconds"} for p in streamed["passes"]]
    assert not (d / "st.work").exists()
    loaded = dicompress.load(d / "st")
    assert type(loaded.transformer_blocks[0].attn.to_q).__name__ == "QuantLinear"


def _kill_at_block(monkeypatch, killed: int):
    """Make the sweep stop (as Ctrl-C would) when it reaches block `killed`; returns the real `_compress`."""
    real = Sweep._compress

    def compress(self, b, ref, store):
        if b == killed:
            raise KeyboardInterrupt
        return real(self, b, ref, store)

    monkeypatch.setattr(Sweep, "_compress", compress)
    return real


def test_killed_run_resumes_from_finished_blocks(runs, tiny_zoo_dir, tmp_path, monkeypatch):
    d, _, _ = runs
    recipe = _recipe(tmp_path / "r.yaml", tiny_zoo_dir, tmp_path / "out", streaming={"enabled": True})
    real = _kill_at_block(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        dicompress.run(recipe, progress=False)
    assert not (tmp_path / "out").exists()                      # nothing that could load as complete
    assert not list(tmp_path.glob(".out.tmp-*"))
    records = sorted(p.name for p in (tmp_path / "out.work" / "stream" / "records").iterdir())
    assert records == ["transformer_blocks.0.json", "transformer_blocks.1.json"]
    compressed = []
    monkeypatch.setattr(Sweep, "_compress", lambda self, b, ref, store: compressed.append(ref.name)
                        or real(self, b, ref, store))
    report = dicompress.run(recipe, progress=False)
    assert compressed == ["single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert report["streaming"]["resumed_blocks"] == 2
    assert_same_artifact(d / "st", tmp_path / "out")
    assert not (tmp_path / "out.work").exists()


def test_work_dir_of_another_recipe_is_refused(tiny_zoo_dir, tmp_path, monkeypatch):
    _kill_at_block(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        dicompress.run(_recipe(tmp_path / "a.yaml", tiny_zoo_dir, tmp_path / "out"), progress=False)
    other = W4A8[:2] + [{"tlq": {"bits": 3, "gptq": True}}] + W4A8[3:]
    with pytest.raises(RecipeError, match="different recipe") as err:       # a finished block of recipe a
        dicompress.run(_recipe(tmp_path / "b.yaml", tiny_zoo_dir, tmp_path / "out", passes=other), progress=False)
    assert err.value.exit_code == 2
    assert (tmp_path / "out.work" / "stream" / "records" / "transformer_blocks.0.json").exists()   # kept


def test_failure_before_a_finished_block_leaves_no_work_dir(tiny_zoo_dir, tmp_path, monkeypatch):
    """Nothing finished: the run removes the work directory it made, so a corrected recipe starts clean."""
    monkeypatch.setattr(Sweep, "_compress", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        dicompress.run(_recipe(tmp_path / "a.yaml", tiny_zoo_dir, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out.work").exists() and not (tmp_path / "out.lock").exists()


def test_work_dir_without_a_finished_block_is_reset(tmp_path):
    """A leftover of another recipe with no finished block (a run killed too hard to clean up) is reset."""
    from dicompress.stream.journal import Journal
    root = tmp_path / "out.work" / "stream"
    (root / "shards").mkdir(parents=True)
    (root / "key.json").write_text('{"key": "old"}\n')
    (root / "shards" / "_root.safetensors").write_text("stale")
    j = Journal(root, "new")
    assert not (root / "key.json").exists() and not (root / "shards" / "_root.safetensors").exists()
    j.finish_block("b0", {"w": torch.zeros(2)}, {"block": "b0"})
    assert json.loads((root / "key.json").read_text())["key"] == "new" and j.record("b0") == {"block": "b0"}


def test_propagating_compressed_outputs_changes_later_blocks_only(runs, tiny_zoo_dir, tmp_path):
    d, _, _ = runs
    dicompress.run(_recipe(tmp_path / "r.yaml", tiny_zoo_dir, tmp_path / "seq",
                           streaming={"enabled": True, "propagate": "compressed"}), progress=False)
    a, b = _tensors(d / "st"), _tensors(tmp_path / "seq")
    differ = {k.split(".")[0] + "." + k.split(".")[1] for k in a if not torch.equal(a[k], b[k])}
    assert "transformer_blocks.0" not in differ                       # same inputs: same block
    assert "single_transformer_blocks.1" in differ                    # inputs from the compressed blocks before


def test_streaming_with_a_pass_that_needs_the_whole_model_is_a_recipe_error(tiny_zoo_dir, tmp_path):
    recipe = _recipe(tmp_path / "r.yaml", tiny_zoo_dir, tmp_path / "o", streaming={"enabled": True},
                     passes=[{"amber_depth": {"remove_blocks": 1}}])
    with pytest.raises(RecipeError, match="streaming.enabled.*amber_depth"):
        dicompress.run(recipe, progress=False)


class _OneBlockProbe(Pass):
    """Test pass: records which blocks have real weights while the passes run."""
    name = "_one_block_probe"
    streamable = True
    seen: list = []

    def apply(self, state):
        real = [ref.name for ref in state.adapter.blocks(state.model)
                if not next(state.model.get_submodule(ref.name).parameters()).is_meta]
        type(self).seen.append((state.scope, real))
        state.add_pass_report(self.name, {}, [{"module": state.scope[0], "method": self.name}])

    def summarize(self, rows):
        return {"blocks": len(rows)}


@pytest.fixture
def probe():
    PASSES[_OneBlockProbe.name] = _OneBlockProbe
    _OneBlockProbe.seen.clear()
    yield _OneBlockProbe
    PASSES.pop(_OneBlockProbe.name)


def test_only_the_block_being_compressed_is_in_memory(tiny_zoo_dir, tmp_path, probe):
    report = dicompress.run(_recipe(tmp_path / "r.yaml", tiny_zoo_dir, tmp_path / "o",
                                    passes=[{"_one_block_probe": {}}, {"tlq": {"bits": 4}}]), progress=False)
    assert report["streaming"]["enabled"] is True                    # auto: every pass can stream
    assert [real for _, real in _OneBlockProbe.seen] == [[scope[0]] for scope, _ in _OneBlockProbe.seen]
    assert len(_OneBlockProbe.seen) == 4 and report["passes"][0]["blocks"] == 4


def test_offloaded_forward_equals_the_loaded_model_and_releases_blocks(tiny_zoo_dir):
    info = resolve_model(str(tiny_zoo_dir))
    ref = load_transformer(info)
    ckpt = Checkpoint(info.path)
    model = skeleton(info.class_name, info.path)
    blocks = [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(2)]
    ckpt.load_root(model, blocks, torch.float32, "cpu")
    from dicompress.arch import adapter_for
    kw = adapter_for(ref).synthetic_inputs(ref, 2, torch.Generator().manual_seed(0))
    with torch.no_grad(), offloaded(model, blocks, ckpt, torch.float32, "cpu"):
        out = model(**kw).sample
    assert torch.equal(out, ref(**kw).sample)
    assert all(p.is_meta for b in blocks for p in model.get_submodule(b).parameters())


def test_checkpoint_reads_shards_and_refuses_a_mismatch(tiny_zoo_dir, tmp_path):
    info = resolve_model(str(tiny_zoo_dir))
    model = load_transformer(info)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ckpt = Checkpoint(tmp_path / "sharded")
    sk = skeleton(info.class_name, tmp_path / "sharded")
    block = ckpt.load_module(sk, "transformer_blocks.1", torch.float32, "cpu")
    for k, v in model.transformer_blocks[1].state_dict().items():
        assert torch.equal(block.state_dict()[k], v)
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "sharded", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_attention_heads"] = 4
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="does not match"):
        Checkpoint(other).load_module(skeleton(info.class_name, other), "transformer_blocks.0", torch.float32, "cpu")
    (tmp_path / "sharded" / sorted((tmp_path / "sharded").glob("*-00002-*"))[0].name).unlink()
    with pytest.raises(ModelError, match="missing"):
        Checkpoint(tmp_path / "sharded")


def test_data_free_recipe_streams_without_calibration(tiny_zoo_dir, tmp_path):
    passes = [{"rtn": {"bits": 4, "granularity": "group", "group_size": 64}}]
    for name, enabled in (("mem", False), ("st", True)):
        recipe = _recipe(tmp_path / f"{name}.yaml", tiny_zoo_dir, tmp_path / name, passes=passes,
                         streaming={"enabled": enabled})
        data = yaml.safe_load(recipe.read_text())
        del data["calibration"]
        recipe.write_text(yaml.safe_dump(data))
        report = dicompress.run(recipe, progress=False)
    assert report["streaming"]["enabled"] and "calibration" not in report
    assert_same_artifact(tmp_path / "mem", tmp_path / "st")


def test_synthetic_qwenimage_streams_like_in_memory(tiny_qwen_dir, tmp_path):
    """Data-free calibration stops each forward after the first block's inputs; GPTQ sees the same data."""
    cal = {"source": "synthetic", "seeds": [0], "steps": 2, "batch_size": 2}
    passes = [{"tlq": {"bits": 4, "gptq": True}}]
    for name, enabled in (("mem", False), ("st", True)):
        dicompress.run(_recipe(tmp_path / f"{name}.yaml", tiny_qwen_dir, tmp_path / name, passes=passes,
                               calibration=cal, streaming={"enabled": enabled}), progress=False)
    assert_same_artifact(tmp_path / "mem", tmp_path / "st")


def test_aligned_safetensors_round_trip_with_aligned_offsets(tmp_path):
    from dicompress.io.safetensors_file import read_safetensors_header, save_aligned_safetensors
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(48, 32, generator=g), "eta": torch.tensor([0.5]),
               "codes": torch.arange(77, dtype=torch.uint8),
               "h": torch.randn(16, 16, generator=g).to(torch.bfloat16), "mask": torch.tensor([True, False, True]),
               "empty": torch.zeros(0, 3)}
    save_aligned_safetensors(tensors, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    raw = (tmp_path / "a.safetensors").read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:start])
    assert start % 64 == 0 and set(read_safetensors_header(tmp_path / "a.safetensors")) == set(tensors)
    assert header["w"]["data_offsets"][0] % 64 == 0 and header["h"]["data_offsets"][0] % 64 == 0


def test_block_batch_reads_each_block_once_per_sampling_step(tiny_zoo_dir, tmp_path, monkeypatch):
    """Streaming calibration reads every block from the checkpoint at every model call: with batch_size 6 and
    block_batch 2 the 3-step loop makes 3 calls, not 9 (batch_size 2), and stores the same first-block rows."""
    from dicompress.arch import adapter_for
    from dicompress.calib import capture
    from dicompress.recipe import CalibrationConfig
    info = resolve_model(str(tiny_zoo_dir))
    blocks = [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(2)]
    reads = []
    real = Checkpoint.load_module
    monkeypatch.setattr(Checkpoint, "load_module", lambda self, model, name, *a: reads.append(name)
                        or real(self, model, name, *a))
    stores = {}
    for label, extra in {"batch2": {"batch_size": 2}, "block_batch2": {"batch_size": 6, "block_batch": 2}}.items():
        ckpt = Checkpoint(info.path)
        model = skeleton(info.class_name, info.path)
        ckpt.load_root(model, blocks, torch.float32, "cpu")
        cfg = CalibrationConfig(source="classes", classes=[0, 1, 2, 3, 4, 5], seeds=[0], steps=3, **extra)
        reads.clear()
        with offloaded(model, blocks, ckpt, torch.float32, "cpu"):
            stores[label] = capture(model, adapter_for(model), cfg, {"name": info.name, "path": info.path},
                                    tmp_path / label, block_inputs=False, progress=False, first_block_only=True)
        assert reads.count(blocks[0]) == (9 if label == "batch2" else 3) and len(set(reads)) == 4
    a, b = (stores[k].block_inputs(blocks[0]) for k in ("batch2", "block_batch2"))
    for k in ("hidden_states", "temb"):
        assert a[k].shape == b[k].shape == (18, *a[k].shape[1:])
        torch.testing.assert_close(a[k].sum(0), b[k].sum(0), rtol=1e-4, atol=1e-4)   # same rows, other order


def test_streamed_run_with_block_batch_matches_the_small_batch_run(runs, tiny_zoo_dir, tmp_path):
    """The whole streamed W4A8 recipe on block_batch-sized chunks: the same samples as batch_size 3 (the
    `runs` fixture's), so the same codes up to summation order; the artifact loads and runs."""
    cal = {"source": "classes", "classes": [0, 1, 2], "seeds": [0], "steps": 3, "batch_size": 3, "block_batch": 1}
    report = dicompress.run(_recipe(tmp_path / "r.yaml", tiny_zoo_dir, tmp_path / "o", calibration=cal,
                                    streaming={"enabled": True}), progress=False)
    assert report["streaming"]["enabled"] is True
    d, _, _ = runs
    a, b = _tensors(d / "st"), _tensors(tmp_path / "o")
    assert set(a) == set(b)
    codes = [k for k in a if k.endswith(".qweight")]
    same = sum(torch.equal(a[k], b[k]) for k in codes)
    assert same >= 0.9 * len(codes), f"only {same} of {len(codes)} layers kept their codes"
    loaded = dicompress.load(tmp_path / "o")
    assert type(loaded.transformer_blocks[0].attn.to_q).__name__ == "QuantLinear"


def test_streamed_capture_says_when_fewer_model_calls_would_do(tiny_zoo_dir, tmp_path):
    said = []
    cal = {"source": "classes", "classes": [0, 1, 2, 3, 4, 5], "seeds": [0], "steps": 2, "batch_size": 2}
    dicompress.run(_recipe(tmp_path / "r.yaml", tiny_zoo_dir, tmp_path / "o", passes=[{"tlq": {"bits": 4}}],
                           calibration=cal, streaming={"enabled": True}), progress=False, echo=said.append)
    hint = [s for s in said if "model calls per sampling step" in s]
    assert hint and "3 model calls" in hint[0] and "`batch_size: 6, block_batch: 2` would make 1" in hint[0]
    said.clear()
    dicompress.run(_recipe(tmp_path / "r2.yaml", tiny_zoo_dir, tmp_path / "o2", passes=[{"tlq": {"bits": 4}}],
                           calibration={**cal, "batch_size": 6, "block_batch": 2}, streaming={"enabled": True}),
                   progress=False, echo=said.append)
    assert not [s for s in said if "model calls per sampling step" in s]
    said.clear()                                      # the first capture again, from the cache: nothing to read
    dicompress.run(tmp_path / "r.yaml", progress=False, echo=said.append, output=str(tmp_path / "o3"))
    assert any("calibration: reusing" in s for s in said)
    assert not [s for s in said if "model calls per sampling step" in s]


def test_both_paths_check_the_artifact_as_users_load_it(runs):
    """The write-time check loads the temp directory with from_pretrained and reruns probes taken in memory: the
    whole model and its first and last blocks (in memory), the first and last blocks on a calibration row
    (streamed); all reproduce the model in memory bit for bit."""
    d, mem, streamed = runs
    names = {"(whole model)", "transformer_blocks.0", "single_transformer_blocks.1"}
    assert {p["module"] for p in mem["load_check"]["probes"]} == names
    assert {p["module"] for p in streamed["load_check"]["probes"]} == names - {"(whole model)"}
    for rep in (mem, streamed):
        assert rep["load_check"]["loaded"] == "whole model"
        assert all(p["bit_exact"] and p["max_abs_diff"] == 0 for p in rep["load_check"]["probes"])
    assert json.loads((d / "st" / "report.json").read_text())["load_check"] == streamed["load_check"]
