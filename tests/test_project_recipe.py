"""tools/project_recipe.py counts what a streamed run stores the way the streaming code stores it: the per-row
block-input bytes and the model inputs of its projection equal the capture store a real run writes (the recipe
as shipped, on the tiny FLUX pipeline, with only size overrides), in both store dtypes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dicompress.recipe import load_recipe
from tests.test_prompt_calibration import ROOT, _overrides, _run

sys.path.insert(0, str(ROOT / "tools"))
import project_recipe  # noqa: E402

# the shipped setting's artifact (bf16 block inputs, streamed) as users load it: a whole pipeline, fresh process
RUN_OUTPUT = textwrap.dedent("""
    import sys, torch
    import dicompress
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
    out = pipe("a red cat", height=64, width=64, num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out).all() and type(pipe.transformer.transformer_blocks[0].attn.to_q).__name__ != "Linear"
    print("ok", tuple(out.shape))
""")

RATES = {"cpu_gemm_flops": 1e11, "cpu_sdpa_flops": 1e11, "cpu_solve_flops": 1e11, "gpu_flops": 4e14,
         "disk_bytes_per_s": 2e9}


def _bytes(files) -> int:
    return sum(f.stat().st_size for f in files)


@pytest.mark.parametrize("store_dtype", ["float32", "bfloat16"])
def test_projected_store_matches_a_real_streamed_capture(tiny_flux_pipeline_dir, tmp_path, store_dtype):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat on a blue house\ntwo dogs in the city at night\n")
    overrides = _overrides(prompts, tmp_path / "cache", f"calibration.store_dtype={store_dtype}")
    report, _ = _run("flux", tiny_flux_pipeline_dir, tmp_path / "out", overrides)
    assert report["streaming"]["enabled"] is True
    if store_dtype == "bfloat16":
        r = subprocess.run([sys.executable, "-c", RUN_OUTPUT, str(tmp_path / "out")], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]
    store = next(p.parent for p in (tmp_path / "cache" / "calib").glob("*/meta.json"))
    first = json.loads((store / "meta.json").read_text())["blocks"][0]
    stored_inputs = _bytes((store / "blocks" / first).glob("chunk_*.safetensors"))
    stored_model = _bytes((store / "model_inputs").glob("chunk_*.safetensors"))

    recipe = load_recipe(ROOT / "recipes/flux_w4a8.yaml", overrides)
    cfg = json.loads((tiny_flux_pipeline_dir / "transformer" / "config.json").read_text())
    family = {**project_recipe.FAMILIES["black-forest-labs/FLUX.1-dev"], "class": cfg["_class_name"],
              "config": {k: v for k, v in cfg.items() if not k.startswith("_")}}
    model = project_recipe.meta_model(family["class"], family["config"])
    res = project_recipe.project(recipe, family, model, RATES)
    rows = res["calibration"]["rows"]
    assert rows == 2 * 2                                         # prompts x steps
    projected_inputs = rows * res["calibration"]["row_block_input_mib"] * 2 ** 20
    # the store adds a per-row timestep and safetensors headers: a few percent at these tiny sizes
    assert projected_inputs <= stored_inputs <= 1.1 * projected_inputs, (projected_inputs, stored_inputs)
    projected_total = res["phases"]["capture"]["store_gib"] * 2 ** 30
    assert 0.8 * (stored_inputs + stored_model) <= projected_total <= 1.25 * (stored_inputs + stored_model)
