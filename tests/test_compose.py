"""Passes compose in one recipe: after every structural pass, the passes that follow read calibration captured
again on the model as it now is, and the one artifact loads through diffusers in a fresh process."""
import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import dicompress
from dicompress.calib import capture
from dicompress.calib.config import CalibrationConfig
from dicompress.arch import adapter_for
from dicompress.errors import CalibrationError
from dicompress.eval import format_summary
from dicompress.passes import PASSES

FAST = {"steps": 2, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 0}
# one small configuration per structural pass; a structural pass registered later must add its own here
STRUCTURAL = {
    "ppcl_depth": {"intervals": [[2, 3]], "distill": FAST},
    "amber_depth": {"remove_blocks": 2, "distill": FAST},
    "hybrid_stream": {"convert": 1, "distill": FAST},
    "width_prune": {"ratio": 0.2},
    "mask_prune": {"ratio": 0.2, "steps": 2, "batch": 1},
    "ppcl_width": {"include": ["transformer_blocks.*"], "distill": FAST},
    "dense2moe": {"experts": 3, "top_k": 1, "distill": FAST},
    "mob": {"skip": 0.2, "group_size": 1, "distill": FAST, "recovery": FAST},
    "clear": {"radius": 2, "distill": FAST},
}
CALIBRATION = {"source": "classes", "classes": [0, 5], "seeds": [0], "steps": 2, "batch_size": 2}


def _run(tmp_path, model, passes, name, **extra):
    data = {"model": str(model), "output": str(tmp_path / name), "calibration": dict(CALIBRATION),
            "passes": passes, "eval": {"samples_per_class": 1, "steps": 2, "grid": False}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return dicompress.run(path, progress=False, echo=lambda *a, **k: None)


LOAD_BOTH = """
import sys, json, torch
import dicompress
from diffusers import FluxTransformer2DModel
from dicompress.nn.qlinear import QuantLinear
a = FluxTransformer2DModel.from_pretrained(sys.argv[1])
b = dicompress.load(sys.argv[1])
print(json.dumps({"quantized": sum(isinstance(m, QuantLinear) for m in a.modules()),
                  "double": len(a.transformer_blocks), "single": len(a.single_transformer_blocks),
                  "same": all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))}))
"""


def _load_in_fresh_process(path) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_BOTH, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _weights(artifact) -> dict:
    return {k: v for f in sorted(artifact.glob("diffusion_pytorch_model*.safetensors")) for k, v in load_file(str(f)).items()}


def test_the_registry_test_covers_every_structural_pass():
    assert {n for n, cls in PASSES.items() if cls.changes_structure} == set(STRUCTURAL)


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
def test_structural_pass_then_quantization_is_one_loadable_artifact(name, tiny_zoo_dir, tmp_path):
    report = _run(tmp_path, tiny_zoo_dir, [{name: STRUCTURAL[name]}, {"tlq": {"bits": 4, "gptq": True}}], name)
    recaptured = report["calibration"]["recaptured"]
    assert [r["stage"] for r in recaptured] == [1] and recaptured[0]["before"] == "passes[1].tlq"
    assert recaptured[0]["rows"] == report["calibration"]["rows"]      # the same set, on the changed model
    assert [s["after"] for s in report["stages"]] == [f"passes[0].{name}", "passes[1].tlq"]
    assert all("psnr_db" in s["metrics"] for s in report["stages"])   # quality after each stage
    assert f"passes[0].{name}" in format_summary(report).split("quality after each stage")[1]
    loaded = _load_in_fresh_process(tmp_path / name)
    src = json.loads((tiny_zoo_dir / "config.json").read_text())     # passes that keep the depth may not say it
    blocks_left = report["passes"][0].get("blocks_left") or {"transformer_blocks": src["num_layers"],
                                                             "single_transformer_blocks": src["num_single_layers"]}
    assert (loaded["double"], loaded["single"]) == (blocks_left["transformer_blocks"],
                                                    blocks_left["single_transformer_blocks"])
    assert loaded["quantized"] == report["footprint"]["quantized_linears"] > 0 and loaded["same"]
    # GPTQ read Hessians of the pruned model's own blocks: every quantized layer of it has a row
    assert {r["module"] for r in report["layers"] if r.get("method", "").endswith("tlq")} == \
        {e["module"] for e in json.loads((tmp_path / name / "config.json").read_text())
         ["quantization_config"]["manifest"] if e["op"] == "quantize"}


def test_one_recipe_equals_two_chained_recipes(tiny_zoo_dir, tmp_path):
    prune = {"ppcl_depth": STRUCTURAL["ppcl_depth"]}
    quant = {"tlq": {"bits": 4, "gptq": True}}
    one = _run(tmp_path, tiny_zoo_dir, [prune, quant], "one")
    _run(tmp_path, tiny_zoo_dir, [prune], "first")
    two = _run(tmp_path, tmp_path / "first", [quant], "two")        # the pruned artifact is the model
    a, b = (_weights(tmp_path / d) for d in ("one", "two"))   # in memory vs streamed: shards differ, tensors not
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]["manifest"]
                for d in ("one", "two")]
    assert manifest[0] == manifest[1]                                # the chained run keeps the pruning's entries
    assert one["stages"][0]["metrics"]["psnr_db"] > 0 and two["metrics"]["samples"] == one["metrics"]["samples"]


def test_compress_api_refuses_block_data_of_the_old_structure(tiny_zoo_dir, tmp_path):
    from dicompress.models import load_transformer, resolve_model
    model = load_transformer(resolve_model(str(tiny_zoo_dir)))
    store = capture(model, adapter_for(model), CalibrationConfig(**CALIBRATION), {"name": "t", "path": tiny_zoo_dir},
                    tmp_path / "s", block_inputs=True, progress=False)
    with pytest.raises(CalibrationError, match="changed its structure"):
        dicompress.compress(model, [{"ppcl_depth": STRUCTURAL["ppcl_depth"]}, {"tlq": {"bits": 4, "gptq": True}}],
                            calibration=store, progress=False)


# one small configuration per other pass, run alone (act_quant after the weight quantizer it usually follows is
# covered by the W4A8 recipes; here it runs alone, on plain linears)
EVERY_OTHER = {
    "smooth": {"alpha": 0.5},
    "ars": {"threshold": 1.0, "block": 32},
    "lrq_auto": {"w_bits": 4, "a_bits": 8, "candidates": ["smooth", "hadamard"], "alphas": [0.5]},
    "tlq": {"bits": 4},
    "rtn": {"bits": 4},
    "act_quant": {"bits": 8},
    "depth_analysis": {},
    "distill": FAST,
}

LOAD_MANY = """
import sys, json, torch
import dicompress
from diffusers import FluxTransformer2DModel
rows = {}
for path in sys.argv[1:]:
    a = FluxTransformer2DModel.from_pretrained(path)
    b = dicompress.load(path)
    rows[path] = all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
print(json.dumps(rows))
"""


def test_the_registry_test_covers_every_pass():
    assert set(PASSES) == set(STRUCTURAL) | set(EVERY_OTHER)


def test_every_pass_alone_writes_an_artifact_that_loads_both_ways(tiny_zoo_dir, tmp_path):
    """Each pass's artifact passed the write-time check (loaded with from_pretrained, the probes of the model in
    memory reproduced bit for bit), and loads in a fresh process through from_pretrained and dicompress.load."""
    paths = []
    for name, cfg in sorted(EVERY_OTHER.items()):
        report = _run(tmp_path, tiny_zoo_dir, [{name: cfg}], name, eval={"enabled": False})
        check = report["load_check"]        # streamed (the streamable passes): the first and last blocks only
        assert check["loaded"] == "whole model" and len(check["probes"]) == (2 if "streaming" in report else 3)
        assert all(p["bit_exact"] for p in check["probes"]), (name, check)
        paths.append(str(tmp_path / name))
    out = subprocess.run([sys.executable, "-c", LOAD_MANY, *paths], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {p: True for p in paths}
