"""calibration.store_dtype: block inputs stored in bfloat16 (half the disk of the capture store and of
streaming's work directory), read back in the compute dtype; float32 stays the default and keeps old cache keys."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import dicompress
from dicompress.arch import adapter_for
from dicompress.calibrate import _calib_key
from dicompress.eval.metrics import sqnr_db
from dicompress.models import load_transformer, resolve_model
from dicompress.pipeline import run
from dicompress.recipe import load_recipe
from tests.test_streaming import _recipe

CAL = {"source": "classes", "classes": [0, 1, 2], "seeds": [0], "steps": 3, "batch_size": 3}


def stored_dtypes(cache: Path) -> dict[str, set]:
    """{stored key: dtypes} over every block-input chunk of every capture in `cache`."""
    out: dict[str, set] = {}
    for f in cache.glob("calib/*/blocks/*/chunk_*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out.setdefault(k, set()).add(h.get_slice(k).get_dtype())
    return out


@pytest.mark.parametrize("streaming", [True, False])
def test_bfloat16_block_inputs_are_stored_and_the_artifact_stays_close(tiny_zoo_dir, tmp_path, streaming):
    arts = {}
    for dtype in ("float32", "bfloat16"):
        d = tmp_path / dtype
        d.mkdir()
        recipe = _recipe(d / "r.yaml", tiny_zoo_dir, d / "art", calibration={**CAL, "store_dtype": dtype},
                         streaming={"enabled": streaming})
        run(recipe, progress=False, echo=lambda *a, **k: None)
        stored = stored_dtypes(d / "cache")
        assert stored["hidden_states"] == {"F32" if dtype == "float32" else "BF16"}, stored
        assert stored["timestep"] == {"F32"}                # not a block input: kept exact
        arts[dtype] = d / "art"
    # GPTQ sees Hessians of bf16-rounded inputs (and, streamed, statistics of them): codes move, the error does not
    teacher = load_transformer(resolve_model(str(tiny_zoo_dir)))
    kwargs = adapter_for(teacher).synthetic_inputs(teacher, 4, torch.Generator().manual_seed(0))
    kwargs["timestep"] = torch.full((4,), 0.5)
    with torch.no_grad():
        ref = teacher(**kwargs, return_dict=False)[0]
        sqnr = {k: sqnr_db(ref, dicompress.load(v, verify=True)(**kwargs, return_dict=False)[0])
                for k, v in arts.items()}
    assert abs(sqnr["bfloat16"] - sqnr["float32"]) < 1.0, sqnr


def test_the_default_keeps_cache_keys_and_bfloat16_changes_them(tiny_zoo_dir, tmp_path):
    info = resolve_model(str(tiny_zoo_dir))
    keys = {}
    for name, cal in (("plain", CAL), ("f32", {**CAL, "store_dtype": "float32"}),
                      ("bf16", {**CAL, "store_dtype": "bfloat16"})):
        recipe = load_recipe(_recipe(tmp_path / f"{name}.yaml", tiny_zoo_dir, tmp_path / "art", calibration=cal))
        keys[name] = _calib_key(info, recipe, True, torch.float32)
    assert keys["plain"] == keys["f32"] != keys["bf16"]
    blob = json.dumps(load_recipe(tmp_path / "plain.yaml").calibration.model_dump(mode="json",
                                                                                 exclude={"max_sequence_length",
                                                                                          "store_dtype"}))
    assert "store_dtype" not in blob
