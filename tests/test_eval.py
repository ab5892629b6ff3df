"""dicompress.eval: metrics, footprint, latency, grid, digits evaluation and the summary."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from dicompress.eval import (bf16_bytes, class_accuracy, dir_bytes, evaluate_digits, format_summary,
                             frechet_distance, latency_ms_per_step, layer_sqnr_table, psnr_db,
                             quantized_linear_bytes, save_sample_grid, sqnr_db, tensor_bytes)
from dicompress.eval.grid import SEPARATOR
from dicompress.zoo import load_conditioning


# -- metrics ---------------------------------------------------------------------------------------
def test_psnr_identical_is_inf():
    x = torch.rand(3, 1, 16, 16)
    assert psnr_db(x, x.clone()) == float("inf")


def test_psnr_known_mse_pooled_over_batch():
    ref = torch.zeros(2, 1, 4, 4)
    assert psnr_db(ref + 0.1, ref) == pytest.approx(10 * math.log10(4 / 0.01))
    # pooled MSE: one exact image and one with MSE 0.02 give MSE 0.01, not a mean of (inf, finite)
    x = ref.clone()
    x[1] += math.sqrt(0.02)
    assert psnr_db(x, ref) == pytest.approx(10 * math.log10(4 / 0.01))
    assert psnr_db(ref + 0.1, ref, data_range=1.0) == pytest.approx(20.0)


def test_sqnr():
    s = torch.ones(100)
    assert sqnr_db(s, 0.9 * s) == pytest.approx(20.0)
    assert sqnr_db(s, s.clone()) == float("inf")
    assert sqnr_db(s, -s) == pytest.approx(10 * math.log10(100 / 400))


def test_class_accuracy():
    logits = torch.eye(4)
    assert class_accuracy(logits, torch.tensor([0, 1, 2, 3])) == 1.0
    assert class_accuracy(logits, torch.tensor([0, 1, 0, 0])) == 0.5


def test_frechet_identical_shift_scale_and_symmetry():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=g)
    assert frechet_distance(a, a.clone()) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, -2.0, 0.5, 0, 0, 0, 3.0, 0])
    # same covariance, so only the mean term remains
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # b = 2a: cov_b = 4 cov_a, sqrt(cov_a cov_b) = 2 cov_a -> |mu_a|^2 + tr(cov_a)
    mu, cov = a.double().mean(0), torch.cov(a.double().T)
    assert frechet_distance(a, 2 * a) == pytest.approx(float(mu @ mu + cov.trace()), rel=1e-6)
    b = torch.randn(200, 8, generator=g) * 1.5 + 0.3
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    assert frechet_distance(a, b) > 0.5


def test_frechet_few_samples_is_finite():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 32, generator=g), torch.randn(400, 32, generator=g)  # singular cov_a
    assert math.isfinite(frechet_distance(a, b))
    assert math.isfinite(frechet_distance(a[:1], b))  # a single sample has no covariance at all


# -- footprint -------------------------------------------------------------------------------------
class FakePacked(nn.Module):
    """Stands for a quantized linear: 4-bit codes (2 per byte) plus fp16 per-row scales."""

    def __init__(self, in_features: int, out_features: int, dense: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.codec = in_features, out_features, 4, "fake"
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.dense = dense  # a plain attribute, not a buffer: only dequantize() sees it

    @property
    def weight_bytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 2

    def dequantize(self) -> torch.Tensor:
        return self.dense


def test_footprint_dense_module():
    m = nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4))
    m.register_buffer("index", torch.arange(3))              # int64: keeps its width in bf16
    assert tensor_bytes(m) == (32 + 4 + 4 + 4) * 4 + 3 * 8
    assert bf16_bytes(m) == (32 + 4 + 4 + 4) * 2 + 3 * 8
    assert quantized_linear_bytes(m) == (0, 0, 0)
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    assert tensor_bytes(tied) == 16 * 4 and bf16_bytes(tied) == 16 * 2


def test_footprint_with_packed_module():
    m = nn.Sequential(FakePacked(8, 4), nn.LayerNorm(4))
    # packed: codes 4x4 uint8 + scales 4 fp16 + bias 4 fp32 ; norm: 8 fp32
    assert tensor_bytes(m) == 16 + 8 + 16 + 32
    # bf16 teacher: dense 4x8 weight + bias, and the norm
    assert bf16_bytes(m) == (32 + 4) * 2 + 8 * 2
    assert quantized_linear_bytes(m) == (24, 64, 1)


def test_dir_bytes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 5)
    assert dir_bytes(tmp_path) == 15
    assert dir_bytes(tmp_path / "a.bin") == 10


# -- grid ------------------------------------------------------------------------------------------
def test_grid_png_size_and_content(tmp_path):
    teacher = torch.ones(6, 1, 16, 16)          # white
    student = -torch.ones(6, 1, 16, 16)         # black
    classes = [0, 0, 1, 1, 1, 2]                # 3 rows, at most 3 pairs per row
    path = save_sample_grid(teacher, student, tmp_path / "g" / "grid.png", classes)
    img = Image.open(path).convert("RGB")
    assert img.size == (3 * 2 * 64 + 4 * 2, 3 * 64 + 4 * 2)
    assert img.getpixel((0, 0)) == SEPARATOR
    assert img.getpixel((2 + 10, 2 + 10)) == (255, 255, 255)        # first teacher tile
    assert img.getpixel((2 + 64 + 10, 2 + 10)) == (0, 0, 0)         # its student beside it
    assert img.getpixel((2 + 2 * 128 + 2 * 2 + 10, 2 + 10)) == SEPARATOR   # class 0 has only 2 pairs
    small = save_sample_grid(teacher, student, tmp_path / "s.png", classes, per_class=1, scale=2, sep=1)
    assert Image.open(small).size == (2 * 32 + 2, 3 * 32 + 4)


def test_grid_rejects_mismatch(tmp_path):
    with pytest.raises(ValueError):
        save_sample_grid(torch.zeros(2, 1, 16, 16), torch.zeros(3, 1, 16, 16), tmp_path / "x.png", [0, 1])


# -- digits evaluation on a tiny random zoo --------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    from dicompress.zoo.classifier import DigitClassifier

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_zoo")
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                   pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    model.save_pretrained(str(d))
    save_file({"prompt_embeds": torch.randn(10, 4, 64), "pooled_prompt_embeds": torch.randn(10, 64)},
              str(d / "conditioning.safetensors"))
    save_file({k: v.contiguous() for k, v in DigitClassifier().state_dict().items()}, str(d / "classifier.safetensors"))
    return d, model


def test_evaluate_digits_teacher_equals_student(tiny_zoo):
    d, model = tiny_zoo
    metrics, images = evaluate_digits(model, model, d, samples_per_class=1, steps=2, progress=False)
    assert metrics["psnr_db"] == float("inf")
    assert metrics["class_acc"] == metrics["class_acc_teacher"]
    assert 0.0 <= metrics["class_acc"] <= 1.0
    assert metrics["frechet"] == pytest.approx(metrics["frechet_teacher"]) and metrics["frechet"] > 0
    assert metrics["samples"] == 10 and metrics["steps"] == 2
    assert metrics["latency_ms_per_step"] > 0 and metrics["latency_ratio"] > 0
    assert "latency_ms_per_step_int8" not in metrics                    # no 8-bit activation codes to run
    assert images["student"].shape == images["teacher"].shape == (10, 1, 16, 16)
    assert images["labels"].tolist() == list(range(10))


def test_evaluate_digits_reuses_teacher_samples(tiny_zoo):
    d, model = tiny_zoo
    _, images = evaluate_digits(model, model, d, samples_per_class=1, steps=2, progress=False)
    student = copy.deepcopy(model)
    with torch.no_grad():
        student.proj_out.weight.add_(0.05 * torch.randn_like(student.proj_out.weight))
    metrics, again = evaluate_digits(student, model, d, samples_per_class=1, steps=2, progress=False,
                                     teacher_samples=images["teacher"])
    assert again["teacher"] is images["teacher"]
    assert math.isfinite(metrics["psnr_db"])
    assert metrics["psnr_db"] == pytest.approx(psnr_db(again["student"], images["teacher"]))
    with pytest.raises(ValueError):
        evaluate_digits(student, model, d, samples_per_class=2, steps=2, progress=False,
                        teacher_samples=images["teacher"])


def test_latency_positive(tiny_zoo):
    d, model = tiny_zoo
    ms = latency_ms_per_step(model, load_conditioning(d), batch=2, warmup=1, repeats=2)
    assert isinstance(ms, float) and ms > 0


def test_layer_sqnr_table(tiny_zoo):
    _, model = tiny_zoo
    student = copy.deepcopy(model)
    w = model.proj_out.weight.detach()
    noisy = w + 0.01 * torch.randn_like(w)
    student.proj_out = FakePacked(w.shape[1], w.shape[0], dense=noisy)
    rows = layer_sqnr_table(student, model)   # the ModelMixin's own dequantize() must not count
    assert [r["module"] for r in rows] == ["proj_out"]
    assert rows[0]["sqnr_db"] == pytest.approx(sqnr_db(w, noisy))
    assert rows[0]["shape"] == list(w.shape) and rows[0]["bits"] == 4 and rows[0]["codec"] == "fake"


# -- summary ---------------------------------------------------------------------------------------
def _full_report(n_layers: int) -> dict:
    layers = [{"module": f"blocks.{i}.attn.to_q", "method": "tlq", "bits": 4, "group_size": None, "eta": 0.01,
               "percentile": 0.999, "sqnr_db": 10.0 + i, "shape": [128, 128]} for i in range(n_layers)]
    return {"model": "zoo:tiny-flux-digits", "recipe": "recipes/tiny.yaml", "output": "out/tiny",
            "passes": [{"pass": "tlq", "layers_quantized": n_layers, "mean_sqnr_db": 20.1, "min_sqnr_db": 17.0,
                        "seconds": 3.2}],
            "layers": layers[::-1],
            "metrics": {"psnr_db": float("inf"), "class_acc": 0.95, "class_acc_teacher": 0.96, "frechet": 12.5,
                        "frechet_teacher": 11.0, "latency_ms_per_step": 5.0, "latency_ms_per_step_teacher": 4.0,
                        "latency_ratio": 1.25, "samples": 200, "steps": 16},
            "footprint": {"bytes_total": 1 << 20, "bytes_total_bf16": 3 << 20, "bytes_quantized_linears": 1 << 19,
                          "bytes_quantized_linears_bf16": 1 << 21, "ratio_quantized_linears": 0.25,
                          "bytes_on_disk": 1 << 20},
            "seconds": {"calibration": 1.0, "total": 9.5}}


def test_format_summary_full():
    assert "GEMM mode int8" not in format_summary(_full_report(3))
    report = _full_report(3)
    report["metrics"]["latency_ms_per_step_int8"] = 3.5
    line = next(line for line in format_summary(report).splitlines() if "GEMM mode int8" in line)
    assert line.split()[-2:] == ["3.50", "-"]
    text = format_summary(_full_report(50))
    for needle in ("zoo:tiny-flux-digits", "out/tiny", "tlq", "20.10", "inf", "0.950", "0.960", "1.25x",
                   "0.25x", "0.33x", "512.00 KiB", "35 more", "blocks.0.attn.to_q", "blocks.49.attn.to_q"):
        assert needle in text, needle
    assert "blocks.20.attn.to_q" not in text            # middle rows elided
    lines = text.splitlines()
    worst = next(i for i, line in enumerate(lines) if "blocks.0.attn" in line)
    assert "blocks.1.attn" in lines[worst + 1]          # sorted by SQNR, worst first
    quality = next(line for line in lines if "class accuracy" in line)
    assert quality.split()[-2:] == ["0.950", "0.960"]   # student beside teacher
    # fixed-width: the rows of the layer table have one length
    table = [line for line in lines if "attn.to_q" in line]
    assert len({len(line) for line in table}) == 1


def test_format_summary_short_and_empty():
    text = format_summary(_full_report(3))
    assert "more" not in text and all(f"blocks.{i}.attn.to_q" in text for i in range(3))
    assert "empty" in format_summary({})
    only_model = format_summary({"model": "m", "metrics": {}})
    assert "model  m" in only_model and "quality" not in only_model and "passes" not in only_model


def test_format_summary_width_rows_have_their_own_section():
    """Width-pruned blocks show their kept widths and parameters, apart from the quantized layers' SQNR table."""
    report = _full_report(2)
    report["layers"] += [{"module": f"transformer_blocks.{i}", "method": "width_prune", "stream": "double",
                          "heads": "4/4", "kept_heads": [0, 1, 2, 3], "params_before": 1000, "params_after": 800 - i,
                          "removed_fraction": 0.2, "ff": f"{300 + i}/512", "ff_context": "512/512"} for i in range(2)]
    lines = format_summary(report).splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("blocks restructured (2"))
    assert lines[head + 1].split()[:4] == ["module", "method", "stream", "heads"]
    assert "301/512" in lines[head + 3] and "799" in lines[head + 3] and "0.2" in lines[head + 3]
    sqnr = next(i for i, line in enumerate(lines) if line.startswith("layers (2,"))
    assert not any("transformer_blocks" in line for line in lines[sqnr:])
    assert not any("kept_heads" in line for line in lines)     # the index lists stay in report.json
