"""Passes that read only the transformer's own inputs (distill, mask_prune, width_prune with Taylor scores) get a
capture of the model inputs alone, not every block's inputs; a capture with block inputs still serves them."""
import json

import pytest
import torch

import dicompress
from dicompress import pipeline
from dicompress.arch import adapter_for
from dicompress.calib import capture
from dicompress.calibrate import BLOCK_AND_MODEL_INPUTS, MODEL_INPUTS, _calib_key, capture_what, original_readers
from dicompress.models import load_transformer, resolve_model
from dicompress.recipe import CalibrationConfig, build_passes, parse_recipe

DISTILL = {"distill": {"steps": 2, "batch_size": 2, "lr": 1e-4, "checkpoint_every": 0}}
FAST = {"steps": 2, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 0}


def _what(passes, block_inputs="auto"):
    return capture_what(CalibrationConfig(block_inputs=block_inputs), original_readers(build_passes(passes)))


def test_capture_what_follows_the_passes_that_read_the_capture():
    assert _what([DISTILL]) == MODEL_INPUTS
    assert _what([{"mask_prune": {"ratio": 0.2}}]) == MODEL_INPUTS
    assert _what([{"width_prune": {"ratio": 0.2, "importance": "taylor"}}]) == MODEL_INPUTS
    assert _what([{"width_prune": {"ratio": 0.2}}]) is False             # magnitude scores: weights only
    assert _what([{"tlq": {"bits": 4}}, DISTILL]) == MODEL_INPUTS       # statistics + model inputs
    assert _what([{"tlq": {"bits": 4, "gptq": True}}, DISTILL]) == BLOCK_AND_MODEL_INPUTS
    assert _what([{"ppcl_depth": {"ratio": 0.3}}, DISTILL]) == BLOCK_AND_MODEL_INPUTS
    # GPTQ after a structural pass reads the capture of the pruned model, not the recipe's own
    assert _what([{"mask_prune": {"ratio": 0.2}}, {"tlq": {"bits": 4, "gptq": True}}]) == MODEL_INPUTS
    # distillation after a depth pass keeps reading the recipe's capture (the teacher's trajectories)
    assert _what([{"amber_depth": {"ratio": 0.3}}, {"tlq": {"bits": 4}}, DISTILL]) == BLOCK_AND_MODEL_INPUTS
    assert _what([DISTILL], block_inputs=True) == BLOCK_AND_MODEL_INPUTS
    assert _what([DISTILL], block_inputs=False) == MODEL_INPUTS          # no block inputs, the model's still
    assert _what([{"ppcl_depth": {"ratio": 0.3}}], block_inputs=False) is False


def test_cache_keys_differ(tiny_zoo_dir, tmp_path):
    info = resolve_model(str(tiny_zoo_dir))
    recipe = parse_recipe({"model": str(tiny_zoo_dir), "output": str(tmp_path / "o"), "passes": [DISTILL],
                           "calibration": {"source": "classes", "cache_dir": str(tmp_path)}})
    keys = {w: _calib_key(info, recipe, w, torch.float32)
            for w in (MODEL_INPUTS, BLOCK_AND_MODEL_INPUTS, True, False, "first_block+model_inputs")}
    assert keys[True] == keys[BLOCK_AND_MODEL_INPUTS]                    # older block-input stores stay valid
    assert len({keys[w] for w in (MODEL_INPUTS, True, False, "first_block+model_inputs")}) == 4


def _run(tiny_zoo_dir, tmp_path, name, passes, cache):
    data = {"model": str(tiny_zoo_dir), "output": str(tmp_path / name), "eval": {"enabled": False},
            "calibration": {"source": "classes", "classes": [0, 5], "seeds": [0], "steps": 2, "batch_size": 2,
                            "cache_dir": str(cache)}, "passes": passes}
    return pipeline.run(parse_recipe(data), progress=False, echo=lambda *a: None)


def _entries(cache):
    return sorted(p for p in (cache / "calib").iterdir() if (p / "meta.json").exists())


def test_recipe_captures_model_inputs_alone_or_reuses_block_inputs(tiny_zoo_dir, tmp_path):
    alone = tmp_path / "cache_alone"
    rep = _run(tiny_zoo_dir, tmp_path, "a", [DISTILL], alone)
    [entry] = _entries(alone)
    meta = json.loads((entry / "meta.json").read_text())
    assert not (entry / "blocks").exists() and not (entry / "final").exists()
    assert (entry / "model_inputs").is_dir() and (entry / "linear_stats.safetensors").exists()
    assert meta["model_inputs"] and not meta["block_inputs"]
    assert rep["passes"][0]["pass"] == "distill" and rep["passes"][0]["rows"] == 2 * 2

    # a depth pass reads every block's inputs: one capture with both, which distillation reads too
    mixed = tmp_path / "cache_mixed"
    rep = _run(tiny_zoo_dir, tmp_path, "b", [{"ppcl_depth": {"intervals": [[2, 3]], "distill": FAST}}, DISTILL],
               mixed)
    [entry] = _entries(mixed)
    assert (entry / "blocks").is_dir() and (entry / "model_inputs").is_dir()
    assert [p["pass"] for p in rep["passes"]] == ["ppcl_depth", "distill"] and rep["passes"][1]["rows"] == 4
    assert not rep["calibration"].get("recaptured")

    # the same calibration for a distill-only recipe: the finished block-input capture is reused
    _run(tiny_zoo_dir, tmp_path, "c", [DISTILL], mixed)
    assert _entries(mixed) == [entry]


def test_compress_refuses_a_store_without_model_inputs(tiny_zoo_dir, tmp_path):
    info = resolve_model(str(tiny_zoo_dir))
    model = load_transformer(info)
    cfg = CalibrationConfig(source="classes", classes=[1], seeds=[0], steps=1, batch_size=1)
    stats_only = capture(model, adapter_for(model), cfg, {"name": info.name, "path": info.path}, tmp_path / "s",
                         block_inputs=False, progress=False)
    with pytest.raises(ValueError, match="holds none"):
        dicompress.compress(model, [DISTILL], calibration=stats_only, teacher=lambda: load_transformer(info),
                            progress=False)
    only = capture(model, adapter_for(model), cfg, {"name": info.name, "path": info.path}, tmp_path / "m",
                   block_inputs=False, model_inputs=True, progress=False)
    assert only.model_inputs().rows == 1 and not only.has_block_inputs
    state = dicompress.compress(model, [DISTILL], calibration=only, teacher=lambda: load_transformer(info),
                                progress=False)
    assert state.report["passes"][0]["steps"] == 2
