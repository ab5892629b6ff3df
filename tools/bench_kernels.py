"""GPU benchmark of the fused quantized linears (needs CUDA; refuses without it).

    python tools/bench_kernels.py --out bench/kernels.json      # also writes bench/kernels.md

1. Layers at FLUX shapes (M tokens x K in x N out; M = 1024 and 4096, (K, N) the FLUX.1 projections):
   a W4A8 TLQ layer (per-channel scales, smoothing + randomised Hadamard on its input, 8-bit per-token
   activations, random codes and grids: timing does not depend on values) timed as
     bf16             torch bf16 matmul (F.linear) of the same shape: the baseline
     dequant_matmul   the layer's pure-torch reference on the GPU (fake-quant activations, decode, bf16 matmul)
     fused_decode     Triton act prep + GEMM, TLQ levels decoded to fp16, fp16 tensor cores   (path a)
     fused_int8       Triton act prep + GEMM, levels mapped to int8, int8 tensor cores       (path b)
     gemm_decode / gemm_int8   the GEMM kernel alone (activation codes precomputed)
   CUDA events, warmup, median of the timed calls; TFLOPS = 2·M·K·N / time.
2. End to end: a stack of random FLUX-width blocks (diffusers FluxTransformer2DModel, hidden 3072 = 24 x 128,
   2 double + 4 single blocks) in bf16, one forward at 1024x1024 (4096 image + 512 text tokens), before and
   after the project's W4A8 passes (smooth -> ars -> tlq 4 -> act_quant 8, synthetic calibration).
Rows carry `shape` ("MxKxN", or the model name), `ms`, `tflops` and `speedup_vs_bf16`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import dicompress
from dicompress.kernels import gemm_mode, reference
from dicompress.nn.act import ActTransform
from dicompress.nn.qlinear import QuantLinear

SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072)]
TOKENS = (1024, 4096)
FLUX_WIDTH = {"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 4, "attention_head_dim": 128,
              "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
              "axes_dims_rope": (16, 56, 56)}
W4A8 = [{"smooth": {"alpha": 0.5}}, {"ars": {"threshold": 1.0}}, {"tlq": {"bits": 4}}, {"act_quant": {"bits": 8}}]


def cuda_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    """Median milliseconds of fn() over `iters` timed calls (CUDA events), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def random_w4a8_layer(k: int, n: int, seed: int = 0) -> QuantLinear:
    """A TLQ 4-bit per-channel layer with smoothing, Hadamard and 8-bit activations; random contents."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    act = ActTransform(k, smooth=True, rotation="hadamard", act_bits=8, device="cuda")
    q = QuantLinear(k, n, True, "tlq", 4, device="cuda", bias_dtype=torch.bfloat16, act=act)
    with torch.no_grad():
        q.qweight.copy_(torch.randint(0, 256, q.qweight.shape, generator=g, device="cuda", dtype=torch.int32))
        q.scales.copy_(torch.rand(q.scales.shape, generator=g, device="cuda") * 0.05 + 0.01)
        q.grid.copy_(torch.tensor([-6.0, 0.8, -6.0, 0.8], device="cuda").expand_as(q.grid))
        q.eta.fill_(0.01)
        q.bias.normal_(0, 0.01, generator=g)
        act.smooth.uniform_(0.5, 2.0, generator=g)
        act.signs.copy_(torch.randint(0, 2, (k,), generator=g, device="cuda") * 2 - 1)
    return q.eval()


def _row(shape: str, method: str, ms: float, flops: float | None, bf16_ms: float, **extra) -> dict:
    return {"shape": shape, "method": method, "ms": round(ms, 4),
            "tflops": round(flops / ms / 1e9, 2) if flops else None,
            "speedup_vs_bf16": round(bf16_ms / ms, 3), **extra}


def _reference_ms(q: QuantLinear, x: torch.Tensor) -> float:
    """The layer's time on the pure-torch reference path (DICOMPRESS_KERNELS=reference for the call)."""
    before = os.environ.get("DICOMPRESS_KERNELS")
    os.environ["DICOMPRESS_KERNELS"] = "reference"
    try:
        return cuda_ms(partial(q, x))
    finally:
        if before is None:
            del os.environ["DICOMPRESS_KERNELS"]
        else:
            os.environ["DICOMPRESS_KERNELS"] = before


@torch.no_grad()
def bench_layers(tokens, shapes) -> list[dict]:
    from dicompress.kernels.triton_act import quantize_act_triton
    from dicompress.kernels.triton_gemm import qlinear_triton
    rows = []
    for k, n in shapes:
        q = random_w4a8_layer(k, n)
        w_bf16 = q.dequantize().to(torch.bfloat16)
        b = q.bias
        act_args = (q.act.smooth, q.act.signs, None, 8)
        for m in tokens:
            shape, flops = f"{m}x{k}x{n}", 2.0 * m * k * n
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16 = cuda_ms(partial(F.linear, x, w_bf16, b))
            rows.append(_row(shape, "bf16", bf16, flops, bf16))
            rows.append(_row(shape, "dequant_matmul", _reference_ms(q, x), flops, bf16))
            codes, steps = quantize_act_triton(x, *act_args)
            ref = reference.qlinear(codes, steps, q.qweight, q.scales, q.grid, q.eta, b, "tlq", 4, 0, "decode",
                                    torch.float32)
            for mode in ("decode", "int8"):
                with gemm_mode(mode):
                    y = q(x)
                    ms = cuda_ms(partial(q, x))
                err = float((y.float() - ref).norm() / ref.norm())
                rows.append(_row(shape, f"fused_{mode}", ms, flops, bf16, rel_err_vs_decode_reference=round(err, 5)))
                gemm = cuda_ms(partial(qlinear_triton, codes, steps, q.qweight, q.scales, q.grid, q.eta, b, "tlq", 4, 0,
                                       mode, torch.bfloat16))
                rows.append(_row(shape, f"gemm_{mode}", gemm, flops, bf16))
            rows.append(_row(shape, "act_prep", cuda_ms(partial(quantize_act_triton, x, *act_args)), None, bf16))
            for r in rows[-7:]:
                print(f"{r['shape']:>16s} {r['method']:15s} {r['ms']:9.4f} ms  {r['tflops'] or '-':>8} TFLOPS  "
                      f"x{r['speedup_vs_bf16']:.2f} vs bf16", flush=True)
    return rows


def flux_inputs(cfg, image_tokens: int = 4096, text_tokens: int = 512) -> dict:
    """One 1024x1024 FLUX forward's inputs (64x64 latent patches + 512 text tokens) for model config `cfg`."""
    side = int(image_tokens ** 0.5)
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    kw = {"device": "cuda", "dtype": torch.bfloat16}
    return {"hidden_states": torch.randn(1, image_tokens, cfg.in_channels, **kw),
            "encoder_hidden_states": torch.randn(1, text_tokens, cfg.joint_attention_dim, **kw),
            "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, **kw),
            "timestep": torch.full((1,), 0.5, **kw), "img_ids": ids.view(-1, 3).cuda(),
            "txt_ids": torch.zeros(text_tokens, 3, device="cuda"), "return_dict": False}


@torch.no_grad()
def bench_model() -> list[dict]:
    from diffusers import FluxTransformer2DModel

    from dicompress.arch import adapter_for
    from dicompress.calib import capture
    from dicompress.recipe import CalibrationConfig
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX_WIDTH).to("cuda", torch.bfloat16).eval()
    inputs = flux_inputs(model.config)
    name = "flux-width-2d4s@4608tok"
    bf16 = cuda_ms(lambda: model(**inputs), warmup=2, iters=5)
    rows = [_row(name, "bf16", bf16, None, bf16)]
    t = time.perf_counter()
    cal = CalibrationConfig(source="synthetic", seeds=[0], steps=2, batch_size=1)
    store = capture(model, adapter_for(model), cal, {"name": name}, Path(tempfile.mkdtemp(prefix="dicompress-kb-")),
                    block_inputs=False, progress=False)
    dicompress.compress(model, W4A8, calibration=store, progress=False)
    quantize_s = round(time.perf_counter() - t, 1)
    for mode in ("decode", "int8"):
        with gemm_mode(mode):
            rows.append(_row(name, f"w4a8_{mode}", cuda_ms(lambda: model(**inputs), warmup=2, iters=5), None, bf16,
                             quantize_seconds=quantize_s))
    for r in rows:
        print(f"{r['shape']} {r['method']:12s} {r['ms']:9.2f} ms  x{r['speedup_vs_bf16']:.2f} vs bf16", flush=True)
    return rows


def markdown(res: dict) -> str:
    lines = [f"{res['device']}, torch {res['torch']}, triton {res['triton']}", "",
             "| shape (MxKxN) | method | ms | TFLOPS | speedup vs bf16 |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['shape']} | {r['method']} | {r['ms']:.4f} | {r['tflops'] if r['tflops'] else '-'} | "
                     f"{r['speedup_vs_bf16']:.2f}x |")
    for e in res["errors"]:
        lines.append(f"\nerror in {e['section']}: {e['error']}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/kernels.json")
    ap.add_argument("--skip-model", action="store_true", help="layers only, no end-to-end stack")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py measures the Triton kernels and needs a CUDA GPU; none is visible here "
                 "(torch.cuda.is_available() is False). On CPU the layers run the pure-torch reference: see "
                 "tools/bench_quant.py for CPU figures.")
    import triton
    t0 = time.perf_counter()
    rows, errors = [], []
    sections = [("layers", lambda: bench_layers(TOKENS, SHAPES))] + ([] if args.skip_model else [("model", bench_model)])
    for section, fn in sections:     # one failing section still leaves the other's rows
        try:
            rows += fn()
        except Exception as e:  # noqa: BLE001  (recorded in the output, the run goes on)
            traceback.print_exc()
            errors.append({"section": section, "error": f"{type(e).__name__}: {e}"})
    res = {"rows": rows, "errors": errors, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "command": "python " + " ".join(sys.argv),
           "seconds": round(time.perf_counter() - t0, 1), "platform": platform.platform()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
