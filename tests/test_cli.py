"""End-to-end through the command line: run, eval, inspect, and the errors a user meets first."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from dicompress.cli import main

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(tmp_path, model_dir, **over):
    data = {"model": str(model_dir),
            "calibration": {"source": "classes", "classes": [0, 3], "seeds": [0], "steps": 2},
            "passes": [{"tlq": {"bits": 4}}], "output": str(tmp_path / "art"),
            "eval": {"samples_per_class": 1, "steps": 2}}
    data.update(over)
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_run_eval_inspect_end_to_end(tmp_path, tiny_zoo_dir):
    r = invoke("run", tiny_recipe(tmp_path, tiny_zoo_dir), "--quiet")
    assert r.exit_code == 0, r.output
    art = tmp_path / "art"
    for f in ("config.json", "report.json", "samples.png", "conditioning.safetensors"):
        assert (art / f).exists(), f
    cfg = json.loads((art / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "dicompress"
    assert len(cfg["quantization_config"]["manifest"]) == 2 * 12 + 2 * 5   # attention + FFN linears
    report = json.loads((art / "report.json").read_text())
    assert report["metrics"]["samples"] == 10 and report["footprint"]["ratio_quantized_linears"] < 0.4
    assert all("sqnr_db" in row for row in report["layers"])
    assert "psnr" in r.output.lower()
    r = invoke("inspect", art)
    assert r.exit_code == 0 and "quantize tlq w4" in r.output
    r = invoke("inspect", tiny_zoo_dir)
    assert r.exit_code == 0 and "FluxTransformer2DModel" in r.output and "quantized by default: 34" in r.output
    r = invoke("eval", art, "--samples-per-class", 1, "--steps", 2, "--json", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["samples"] == 10


def test_existing_output_is_refused(tmp_path, tiny_zoo_dir):
    (tmp_path / "art").mkdir()
    r = invoke("run", tiny_recipe(tmp_path, tiny_zoo_dir), "--quiet")
    assert r.exit_code == 3 and "already exists" in r.output


def test_bad_recipe_exit_2_no_traceback(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: zoo:tiny-flux-digits\npasses:\n  - tlq: {bits: 4, colour: red}\noutput: o\n")
    r = invoke("run", p)
    assert r.exit_code == 2 and "passes[0].tlq.colour" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("model, needle", [("does/not/exist/here", "does not exist"),
                                           ("UNET", "unsupported architecture")])
def test_bad_model_override(tmp_path, model, needle):
    if model == "UNET":
        d = tmp_path / "unet"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
        model = str(d)
    r = invoke("run", ROOT / "recipes/tiny_flux_w4.yaml", "--model", model, "--output", tmp_path / "o")
    assert r.exit_code == 2 and needle in r.output


def test_flux_recipe_fails_fast_without_weights(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "dicompress.cli", "run", "recipes/flux_w4a8.yaml"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert time.time() - t0 < 60
    assert p.returncode == 2, p.stderr
    assert "FLUX.1-dev" in p.stderr and "--model" in p.stderr and "Traceback" not in p.stderr


def test_interrupted_run_leaves_no_artifact(tmp_path, tiny_zoo_dir, monkeypatch):
    from dicompress.passes import PASSES

    def boom(self, state):
        raise KeyboardInterrupt
    monkeypatch.setattr(PASSES["tlq"], "apply", boom)
    r = invoke("run", tiny_recipe(tmp_path, tiny_zoo_dir), "--quiet")
    assert r.exit_code == 130 and "no artifact" in r.output
    assert not (tmp_path / "art").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art")]


def test_kernels_command_says_what_runs_here(monkeypatch):
    from click.testing import CliRunner

    from dicompress.cli import main
    res = CliRunner().invoke(main, ["kernels"])
    assert res.exit_code == 0 and "cpu: mode decode: the pure-torch reference" in res.output and "torch " in res.output
    assert "torch._int_mm" in res.output
    assert "cpu: auto picks " in res.output
    assert "hint: on this CPU" not in res.output      # auto already takes int8 where it helps (test_gemm_mode.py)
    monkeypatch.setenv("DICOMPRESS_KERNELS", "reference")
    res = CliRunner().invoke(main, ["kernels"])
    assert res.exit_code == 0 and "cpu: pure-torch reference (DICOMPRESS_KERNELS=reference)" in res.output
    monkeypatch.setenv("DICOMPRESS_KERNELS", "fastest")
    res = CliRunner().invoke(main, ["kernels"])
    assert res.exit_code == 2 and "DICOMPRESS_KERNELS='fastest'" in res.output


def test_kernels_description_per_gpu(monkeypatch):
    import torch

    from dicompress.kernels import dispatch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: ["Tesla T4", "NVIDIA H200"][i])
    monkeypatch.setattr(dispatch, "_capability", lambda i: [(7, 5), (9, 0)][i])
    monkeypatch.setattr(dispatch, "has_triton", lambda: True)
    text = dispatch.describe()
    assert "cuda:0 Tesla T4 (sm_75): reference (compute capability 7.5 < 8.0)" in text
    assert "cuda:1 NVIDIA H200 (sm_90): Triton kernels" in text
    monkeypatch.setenv("DICOMPRESS_KERNELS", "reference")
    assert "cuda:1 NVIDIA H200 (sm_90): reference (DICOMPRESS_KERNELS=reference)" in dispatch.describe()
