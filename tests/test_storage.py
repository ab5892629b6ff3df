"""save_dtype: kept parameters stored in the checkpoint's dtype; what is evaluated is what loads back."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dicompress
from dicompress.io.safetensors_file import read_safetensors_header
from dicompress.io.storage import parameters_stored_as, round_parameters, stored_dtype, stored_state_dict
from test_streaming import W4A8, _recipe, _tensors, assert_same_artifact


def test_stored_dtype_is_the_dtype_of_most_bytes(tmp_path):
    save_file({"w": torch.zeros(64, 64, dtype=torch.bfloat16), "b": torch.zeros(64),
               "i": torch.zeros(9999, dtype=torch.int64)},
              str(tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    save_file({"c": torch.zeros(999, 64)}, str(tmp_path / "classifier.safetensors"))    # not the checkpoint's
    assert stored_dtype(tmp_path) == torch.bfloat16
    save_file({"w2": torch.zeros(128, 64)},                                            # shards count together
              str(tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors"))
    assert stored_dtype(tmp_path) == torch.float32


def test_round_parameters_rounds_params_only_and_is_exact_on_representable_values():
    lin = nn.Linear(8, 4)
    lin.register_buffer("smooth", torch.full((8,), 1 / 3))
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 8).to(torch.bfloat16).float())         # as read from a bf16 checkpoint
        lin.bias.copy_(torch.tensor([1 / 3, 0.1, 0.2, 0.3]))                  # changed by a pass: not representable
    w = lin.weight.detach().clone()
    round_parameters(lin, torch.bfloat16)
    assert lin.weight.dtype == torch.float32 and torch.equal(lin.weight, w)
    assert torch.equal(lin.bias, lin.bias.to(torch.bfloat16).float()) and lin.bias[0] != 1 / 3
    assert lin.smooth[0] == torch.tensor(1 / 3)                                 # codec buffers keep their format
    sd = stored_state_dict(lin, torch.bfloat16, prefix="l.")
    assert sd["l.weight"].dtype == torch.bfloat16 and sd["l.smooth"].dtype == torch.float32
    with parameters_stored_as(lin, torch.bfloat16):
        assert lin.weight.dtype == torch.bfloat16 and lin.smooth.dtype == torch.float32
    assert lin.weight.dtype == torch.float32 and torch.equal(lin.weight, w)


@pytest.fixture(scope="module")
def bf16_zoo_dir(tiny_zoo_dir, tmp_path_factory):
    """The tiny zoo model with its transformer checkpoint in bf16 (as hub checkpoints are)."""
    d = tmp_path_factory.mktemp("bf16_zoo")
    for f in tiny_zoo_dir.iterdir():
        shutil.copy(f, d / f.name)
    w = d / "diffusion_pytorch_model.safetensors"
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(w)).items()}, str(w))
    return d


def test_bf16_checkpoint_gives_bf16_kept_weights_identical_on_both_paths(bf16_zoo_dir, tmp_path):
    """auto -> bf16: kept parameters are stored in bf16, codec tensors keep their formats, the streamed and
    in-memory artifacts are bit-equal, and the in-memory run's evaluation (of its rounded model) equals the
    streamed run's (of the artifact loaded back)."""
    cal = {"source": "classes", "classes": [0, 1, 2], "seeds": [0], "steps": 3, "batch_size": 3}
    ev = {"enabled": True, "samples_per_class": 1, "steps": 3, "grid": False}
    reports = {}
    for name, enabled in (("mem", False), ("st", True)):
        recipe = _recipe(tmp_path / f"{name}.yaml", bf16_zoo_dir, tmp_path / name, calibration=cal,
                         streaming={"enabled": enabled})
        reports[name] = dicompress.run(recipe, progress=False, eval=ev)
    assert_same_artifact(tmp_path / "mem", tmp_path / "st")
    stored = {k: v for f in (tmp_path / "st").glob("*.safetensors") for k, v in read_safetensors_header(f).items()}
    assert stored["transformer_blocks.0.norm1.linear.weight"][0] == "BF16"     # AdaLN modulation: kept
    assert stored["transformer_blocks.0.attn.to_q.qweight"][0] == "U8"
    assert stored["transformer_blocks.0.attn.to_q.scales"][0] == "F16"
    quality = lambda r: {k: v for k, v in r["metrics"].items() if "latency" not in k}  # noqa: E731
    assert quality(reports["mem"]) == quality(reports["st"]) and "psnr_db" in quality(reports["mem"])
    loaded = dicompress.load(tmp_path / "st")
    assert loaded.transformer_blocks[0].norm1.linear.weight.dtype == torch.float32     # default: fp32 compute

    # save_dtype float32 keeps everything wide: same codes, larger file
    f32 = _recipe(tmp_path / "f32.yaml", bf16_zoo_dir, tmp_path / "f32", calibration=cal, save_dtype="float32")
    dicompress.run(f32, progress=False)
    a, b = _tensors(tmp_path / "st"), _tensors(tmp_path / "f32")
    assert torch.equal(a["transformer_blocks.0.attn.to_q.qweight"], b["transformer_blocks.0.attn.to_q.qweight"])
    assert b["transformer_blocks.0.norm1.linear.weight"].dtype == torch.float32
    size = lambda d: sum(f.stat().st_size for f in d.glob("diffusion_pytorch_model*.safetensors"))  # noqa: E731
    assert size(tmp_path / "st") < 0.8 * size(tmp_path / "f32")


def test_save_dtype_is_validated(tiny_zoo_dir, tmp_path):
    with pytest.raises(dicompress.RecipeError, match="save_dtype"):
        dicompress.run(_recipe(tmp_path / "r.yaml", tiny_zoo_dir, tmp_path / "o", passes=W4A8, save_dtype="int8"),
                       progress=False)
