"""The write-time check is the user's load (io/load_check.py): the temp directory is loaded with diffusers'
from_pretrained and must reproduce probes of the model in memory; a temp directory never loads as complete."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import FluxTransformer2DModel

import dicompress
from dicompress.arch import adapter_for
from dicompress.errors import ArtifactError
from dicompress.io import write_artifact
from dicompress.io.load_check import LoadCheck, Probe, check_as_loaded, load_probes, save_probes
from dicompress.probes import model_probes

from conftest import TINY_FLUX


@pytest.fixture()
def quantized(tmp_path):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_FLUX).eval()
    return dicompress.compress(model, [dicompress.TLQ(bits=4), dicompress.ActQuant(bits=8)])


def _write(state, out, **kw):
    return write_artifact(state.model, out, manifest=state.manifest, report={}, source={}, **kw)


def test_probes_keep_structure_through_disk(tmp_path):
    p = Probe("blk", (torch.randn(2, 3),), {"a": (torch.ones(1), None), "flag": True, "n": [1, 2.5]},
              (torch.zeros(2), {"x": torch.arange(3)}))
    save_probes(tmp_path / "p.safetensors", [p])
    (q,) = load_probes(tmp_path / "p.safetensors")
    assert q.module == "blk" and torch.equal(q.args[0], p.args[0]) and isinstance(q.args, tuple)
    assert q.kwargs["flag"] is True and q.kwargs["n"] == [1, 2.5] and q.kwargs["a"][1] is None
    assert torch.equal(q.output[1]["x"], torch.arange(3))


def test_written_artifact_reproduces_the_model_in_memory(quantized, tmp_path):
    check = LoadCheck(model_probes(quantized.model, quantized.adapter))
    _write(quantized, tmp_path / "a", check=check)
    rows = {r["module"]: r for r in check.result["probes"]}
    assert list(rows) == ["transformer_blocks.0", "single_transformer_blocks.1", "(whole model)"]
    assert all(r["bit_exact"] for r in rows.values())
    assert json.loads((tmp_path / "a" / "report.json").read_text())["load_check"] == check.result


def test_large_artifacts_are_checked_one_block_at_a_time(quantized, tmp_path):
    check = LoadCheck(model_probes(quantized.model, quantized.adapter), whole_load_bytes=0)
    _write(quantized, tmp_path / "a", check=check)
    assert check.result["loaded"] == "one block at a time"
    assert check.result["skipped"] == ["(whole model)"]
    assert [r["module"] for r in check.result["probes"]] == ["transformer_blocks.0", "single_transformer_blocks.1"]
    assert all(r["bit_exact"] for r in check.result["probes"])


@pytest.mark.parametrize("whole_load_bytes", [2**40, 0])
def test_a_model_that_does_not_load_back_is_not_written(quantized, tmp_path, whole_load_bytes):
    """A probe the loaded artifact cannot reproduce (here: the in-memory block was changed after the probe, as a
    manifest op missing from the loader would) fails the write: nothing at the output, no temp directory."""
    probes = model_probes(quantized.model, quantized.adapter)
    with torch.no_grad():
        quantized.model.single_transformer_blocks[1].proj_out.bias.add_(1.0)
    with pytest.raises(ArtifactError, match="single_transformer_blocks.1 differs"):
        _write(quantized, tmp_path / "a", check=LoadCheck(probes, whole_load_bytes=whole_load_bytes))
    assert list(tmp_path.iterdir()) == []


def test_a_temp_directory_is_refused_by_diffusers_itself(quantized, tmp_path):
    """Opened while (or after) a write runs, a temp directory is refused by dicompress.load (marker file) and by
    diffusers' own from_pretrained (its config still says it is unfinished), also once copied elsewhere."""
    seen = {}

    class Snapshot(LoadCheck):
        def run(self, root):
            shutil.copytree(root, tmp_path / "copy")
            seen["root"] = root
            return {}

    _write(quantized, tmp_path / "a", check=Snapshot([]))
    copy = tmp_path / "copy"
    with pytest.raises(ArtifactError, match="incomplete artifact"):
        dicompress.load(copy)
    with pytest.raises(ArtifactError, match="marked unfinished"):
        FluxTransformer2DModel.from_pretrained(copy)
    (copy / ".dicompress-incomplete").unlink()
    with pytest.raises(ArtifactError, match="marked unfinished"):
        dicompress.verify_artifact(copy)
    # the finished artifact carries no such mark
    assert "incomplete" not in json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    FluxTransformer2DModel.from_pretrained(tmp_path / "a")


def test_check_as_loaded_names_a_shape_mismatch(quantized, tmp_path):
    _write(quantized, tmp_path / "a")
    blk = "transformer_blocks.0"
    (probe,) = [p for p in model_probes(quantized.model, quantized.adapter) if p.module == blk]
    wrong = Probe(blk, probe.args, probe.kwargs, (probe.output[0][:, :1], probe.output[1]))
    with pytest.raises(ArtifactError, match=f"{blk} returns"):
        check_as_loaded(tmp_path / "a", [wrong])


def test_save_checks_by_default(quantized, tmp_path):
    dicompress.save(quantized, tmp_path / "a")
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["load_check"]["loaded"] == "whole model" and len(rep["load_check"]["probes"]) == 3
    assert adapter_for(dicompress.load(tmp_path / "a")) is not None
