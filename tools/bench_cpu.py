"""CPU speed of the quantized linears: the pure-torch reference vs the int8 modes' torch._int_mm path
(kernels/int8_mm.py), against the uncompressed fp32 linear, on this machine's cores.

    python tools/bench_cpu.py --out bench/cpu.json          # also writes bench/cpu.md (~5 min on 2 cores)

1. Layers at FLUX shapes (M tokens x K in x N out, the FLUX.1 projections), a W4A8 TLQ layer (per-channel
   scales, smoothing + randomised Hadamard, 8-bit per-token activations; random codes and grids: timing
   does not depend on values), one call each:
     fp32             F.linear with the layer's decoded weight in fp32: the uncompressed model's linear
     reference_decode the layer in mode decode (the CPU default): act prep, decode the weight, fp32 matmul
     reference_int8   mode int8 forced onto the reference (DICOMPRESS_KERNELS=reference)
     int8_mm          mode int8: act prep, torch._int_mm on the cached unpacked int8 weight, fp32 epilogue
     int8_mm_gemm     its GEMM alone (activation codes precomputed); act_prep: the CPU activation prep
                      alone (the reference in row blocks, kernels/ops.py); act_prep_whole: the reference
                      on the whole tensor at once (the same bits)
   with rel_err of each against reference_decode's output (the int8 rows: the mapping's error).
2. End to end: a FLUX-width stack (diffusers FluxTransformer2DModel, hidden 3072, 1 double + 1 single block)
   in fp32, one forward at --tokens image + 256 text tokens, before and after the W4A8 passes (synthetic
   calibration), in mode decode and mode int8.
Median of --repeats calls after one warmup, wall clock, torch.get_num_threads() threads.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402  (its layer builder, FLUX inputs and W4A8 passes, run on the CPU)

import dicompress  # noqa: E402
from dicompress.kernels import cache, gemm_mode, int8_mm, ops, reference  # noqa: E402

bk.DEV, bk.DT = "cpu", torch.float32
SHAPES = bk.SHAPES
fresh = bk._fresh_call            # q(x) with its own activation quantization (no codes kept from a sibling)


def wall_ms(fn, repeats: int) -> float:
    return bk._wall_ms(fn, 1, repeats)


def row(shape, method, ms, flops, fp32_ms, **extra) -> dict:
    return {"shape": shape, "method": method, "ms": round(ms, 3),
            "gflops": round(flops / ms / 1e6, 1) if flops else None, "speedup_vs_fp32": round(fp32_ms / ms, 3),
            **extra}


@torch.no_grad()
def bench_layers(tokens: int, repeats: int) -> list[dict]:
    rows = []
    for k, n in SHAPES:
        q = bk.random_w4a8_layer(k, n)
        x = torch.randn(tokens, k)
        w = q.dequantize()
        shape, flops = f"{tokens}x{k}x{n}", 2.0 * tokens * k * n
        fp32 = wall_ms(partial(F.linear, x, w, q.bias), repeats)
        rows.append(row(shape, "fp32", fp32, flops, fp32))
        with bk.reference_backend():
            ref = fresh(q, x)

        def err(y):
            return round(float((y - ref).norm() / ref.norm()), 6)

        with bk.reference_backend():
            ms = wall_ms(partial(fresh, q, x), repeats)
        rows.append(row(shape, "reference_decode", ms, flops, fp32, rel_err=0.0))
        with gemm_mode("int8"):
            with bk.reference_backend():
                y = fresh(q, x)
                ms = wall_ms(partial(fresh, q, x), repeats)
            rows.append(row(shape, "reference_int8", ms, flops, fp32, rel_err=err(y)))
            y = fresh(q, x)
            rows.append(row(shape, "int8_mm", wall_ms(partial(fresh, q, x), repeats), flops, fp32, rel_err=err(y)))
        act = (q.act.smooth, q.act.signs, None, 8)
        codes, steps = ops.quantize_act(x, *act)
        gemm = partial(int8_mm.qlinear_int_mm, codes, steps, q.qweight, q.scales, q.grid, q.eta, q.bias, "tlq", 4, 0,
                       "int8", torch.float32)
        rows.append(row(shape, "int8_mm_gemm", wall_ms(gemm, repeats), flops, fp32))
        rows.append(row(shape, "act_prep", wall_ms(partial(ops.quantize_act, x, *act), repeats), None, fp32))
        rows.append(row(shape, "act_prep_whole", wall_ms(partial(reference.quantize_act, x, *act), repeats), None,
                        fp32))
        cache.clear()
        for r in rows[-7:]:
            print(f"{r['shape']:>16s} {r['method']:17s} {r['ms']:9.2f} ms  x{r['speedup_vs_fp32']:.2f} vs fp32"
                  + (f"  rel_err {r['rel_err']}" if "rel_err" in r else ""), flush=True)
    return rows


@torch.no_grad()
def bench_stack(image_tokens: int, repeats: int) -> list[dict]:
    from diffusers import FluxTransformer2DModel

    from dicompress.arch import adapter_for
    from dicompress.calib import capture
    from dicompress.recipe import CalibrationConfig
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**dict(bk.FLUX_WIDTH, num_layers=1, num_single_layers=1)).eval()
    inputs = bk.flux_inputs(model.config, image_tokens, 256)
    name = f"flux-width-1d1s@{image_tokens + 256}tok"
    fp32 = wall_ms(lambda: model(**inputs), repeats)
    ref_out = model(**inputs)[0]
    rows = [row(name, "fp32", fp32, None, fp32)]
    t = time.perf_counter()
    cal = CalibrationConfig(source="synthetic", seeds=[0], steps=2, batch_size=1)
    with tempfile.TemporaryDirectory(prefix="dicompress-cpu-") as work:     # the calibration store goes with it
        store = capture(model, adapter_for(model), cal, {"name": name}, Path(work), block_inputs=False,
                        progress=False)
        dicompress.compress(model, bk.W4A8, calibration=store, progress=False)
    quantize_s = round(time.perf_counter() - t, 1)
    for mode in ("decode", "int8"):
        with gemm_mode(mode):
            y = model(**inputs)[0]
            ms = wall_ms(lambda: model(**inputs), repeats)
        rows.append(row(name, f"w4a8_{mode}", ms, None, fp32, quantize_seconds=quantize_s,
                        rel_err_vs_fp32=round(float((y - ref_out).norm() / ref_out.norm()), 4)))
    for r in rows:
        print(f"{r['shape']} {r['method']:12s} {r['ms']:9.1f} ms  x{r['speedup_vs_fp32']:.2f} vs fp32", flush=True)
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(res: dict) -> str:
    lines = [f"{res['cpu']}, {res['threads']} threads, torch {res['torch']} (wall clock, median of "
             f"{res['repeats']})", "", "| shape (MxKxN) | method | ms | GFLOPS | speedup vs fp32 | rel. error |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        err = r.get("rel_err", r.get("rel_err_vs_fp32"))
        lines.append(f"| {r['shape']} | {r['method']} | {r['ms']:.2f} | {r['gflops'] or '-'} | "
                     f"{r['speedup_vs_fp32']:.2f}x | {'-' if err is None else err} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/cpu.json")
    ap.add_argument("--tokens", type=int, default=1024, help="M of the layer rows and image tokens of the stack")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-stack", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = bench_layers(args.tokens, args.repeats)
    if not args.skip_stack:
        rows += bench_stack(args.tokens, args.repeats)
    res = {"rows": rows, "cpu": cpu_name(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "repeats": args.repeats, "command": "python " + " ".join(sys.argv),
           "seconds": round(time.perf_counter() - t0, 1), "platform": platform.platform()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
