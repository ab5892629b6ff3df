"""GPU benchmark of the fused quantized linears (needs CUDA; refuses without it).

    python tools/bench_kernels.py --out bench/kernels.json      # also writes bench/kernels.md

0. Tile sweep: the GEMM alone at 4096x3072x3072 with each of triton_gemm.TILE_CANDIDATES (both operand
   orders, a few tile sizes) per GEMM class (int8 and fp16 dots on table-decoded codes, int8 dots on the
   unpacked int8 weight); the fastest of each class is used for the rest of the run and named in the output
   (`tiles_chosen`, rows `sweep_*` with their `tile`). --skip-sweep keeps the defaults.
1. Layers at FLUX shapes (M tokens x K in x N out; M = 1024 and 4096, (K, N) the FLUX.1 projections):
   a W4A8 TLQ layer (per-channel scales, smoothing + randomised Hadamard on its input, 8-bit per-token
   activations, random codes and grids: timing does not depend on values) timed as
     bf16             torch bf16 matmul (F.linear) of the same shape: the baseline
     dequant_matmul   the layer's pure-torch reference on the GPU (fake-quant activations, decode, bf16 matmul)
     fused_decode     Triton act prep + GEMM, TLQ levels decoded to fp16, fp16 tensor cores   (path a)
     fused_int8       Triton act prep + GEMM, levels mapped to int8, int8 tensor cores       (path b)
     fused_int8_unpacked  path (b) on the int8 weight unpacked once per layer (no table; +1 byte/weight)
     gemm_<mode>      the GEMM kernel alone (activation codes precomputed)
     int8_mm_ceiling  torch._int_mm (cuBLAS int8) of the same int8 operands, no scales or bias: what the
                      hardware's int8 GEMM does at this shape, the ceiling for the int8 paths
   CUDA events around each call, the calls queued back to back after a warmup, median; TFLOPS = 2·M·K·N / time.
   The fused rows include everything a call does on the host (the layer's decode tables are built once and
   cached, kernels/cache.py): a layer-by-layer view of a model's forward, not the kernel alone.
2. End to end: a stack of random FLUX-width blocks (diffusers FluxTransformer2DModel, hidden 3072 = 24 x 128,
   2 double + 4 single blocks) in bf16, one forward at 1024x1024 (4096 image + 512 text tokens), before and
   after the project's W4A8 passes (smooth -> ars -> tlq 4 -> act_quant 8, synthetic calibration), in each
   GEMM mode, with the GPU memory each mode's cached per-layer tensors take (`cached_mib`).
Rows carry `shape` ("MxKxN", or the model name), `ms`, `tflops` and `speedup_vs_bf16`.

    python tools/bench_kernels.py --smoke --out /tmp/k.json    # no GPU: every section at toy sizes on the CPU

--smoke runs the same code paths on the CPU (Triton's interpreter, fp32, toy shapes, wall-clock timing) so
the script can be checked before a lent GPU's minutes are spent on it; its numbers mean nothing.
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
from contextlib import contextmanager
from functools import partial
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:                                   # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dicompress  # noqa: E402
from dicompress.kernels import cache, gemm_mode, reference  # noqa: E402
from dicompress.kernels.linear import forget_act_codes  # noqa: E402
from dicompress.nn.act import ActTransform  # noqa: E402
from dicompress.nn.qlinear import QuantLinear  # noqa: E402

SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072)]
TOKENS = (1024, 4096)
FLUX_WIDTH = {"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 4, "attention_head_dim": 128,
              "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
              "axes_dims_rope": (16, 56, 56)}
SWEEP_SHAPE = (4096, 3072, 3072)
DEV, DT = "cuda", torch.bfloat16
if SMOKE:                                   # the interpreter has no bfloat16
    SHAPES, TOKENS, SWEEP_SHAPE, DEV, DT = [(256, 256), (256, 384)], (64,), (64, 256, 256), "cpu", torch.float32
    FLUX_WIDTH = dict(FLUX_WIDTH, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
                      joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
MODES = ("decode", "int8", "int8_unpacked")
W4A8 = [{"smooth": {"alpha": 0.5}}, {"ars": {"threshold": 1.0}}, {"tlq": {"bits": 4}}, {"act_quant": {"bits": 8}}]


def cuda_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    """Median milliseconds of fn() over `iters` calls, each between two CUDA events, after `warmup` calls.
    The calls are queued back to back (one synchronisation at the end), as in a model's forward: a call's
    time is its GPU time, or its host-side launch time where that is longer."""
    if DEV == "cpu":
        return _wall_ms(fn, min(warmup, 1), min(iters, 2))
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _wall_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def random_w4a8_layer(k: int, n: int, seed: int = 0) -> QuantLinear:
    """A TLQ 4-bit per-channel layer with smoothing, Hadamard and 8-bit activations; random contents."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    act = ActTransform(k, smooth=True, rotation="hadamard", act_bits=8, device=DEV)
    q = QuantLinear(k, n, True, "tlq", 4, device=DEV, bias_dtype=DT, act=act)
    with torch.no_grad():
        q.qweight.copy_(torch.randint(0, 256, q.qweight.shape, generator=g, device=DEV, dtype=torch.int32))
        q.scales.copy_(torch.rand(q.scales.shape, generator=g, device=DEV) * 0.05 + 0.01)
        q.grid.copy_(torch.tensor([-6.0, 0.8, -6.0, 0.8], device=DEV).expand_as(q.grid))
        q.eta.fill_(0.01)
        q.bias.normal_(0, 0.01, generator=g)
        act.smooth.uniform_(0.5, 2.0, generator=g)
        act.signs.copy_(torch.randint(0, 2, (k,), generator=g, device=DEV) * 2 - 1)
    return q.eval()


def _row(shape: str, method: str, ms: float, flops: float | None, bf16_ms: float, **extra) -> dict:
    return {"shape": shape, "method": method, "ms": round(ms, 4),
            "tflops": round(flops / ms / 1e9, 2) if flops else None,
            "speedup_vs_bf16": round(bf16_ms / ms, 3), **extra}


@contextmanager
def reference_backend():
    """DICOMPRESS_KERNELS=reference inside the block (the ops read it at call time)."""
    before = os.environ.get("DICOMPRESS_KERNELS")
    os.environ["DICOMPRESS_KERNELS"] = "reference"
    try:
        yield
    finally:
        if before is None:
            del os.environ["DICOMPRESS_KERNELS"]
        else:
            os.environ["DICOMPRESS_KERNELS"] = before


def _reference_ms(q: QuantLinear, x: torch.Tensor) -> float:
    """The layer's time on the pure-torch reference path."""
    with reference_backend():
        return cuda_ms(partial(_fresh_call, q, x))


@torch.no_grad()
def sweep_tiles(m: int, k: int, n: int) -> tuple[list[dict], dict]:
    """Time the GEMM alone with each of triton_gemm.TILE_CANDIDATES at one shape; the fastest of each kind
    goes into TILE_OVERRIDES for the rest of the run. Returns (rows, {kind: chosen tile})."""
    from dicompress.kernels import triton_gemm
    from dicompress.kernels.triton_act import quantize_act_triton
    q = random_w4a8_layer(k, n)
    x = torch.randn(m, k, device=DEV, dtype=DT)
    codes, steps = quantize_act_triton(x, q.act.smooth, q.act.signs, None, 8)
    bf16 = cuda_ms(partial(F.linear, x, q.dequantize().to(DT), q.bias))
    shape, flops = f"{m}x{k}x{n}", 2.0 * m * k * n
    rows, chosen = [], {}
    for kind, candidates in triton_gemm.TILE_CANDIDATES.items():
        mode = triton_gemm.KIND_MODE[kind]
        best = None
        for extra in candidates:
            tile = dict(triton_gemm._blocks(m, 0, kind), **extra)
            call = partial(triton_gemm.qlinear_triton, codes, steps, q.qweight, q.scales, q.grid, q.eta, q.bias,
                           "tlq", 4, 0, mode, DT, blocks=tile)
            try:
                ms = cuda_ms(call)
            except Exception as e:  # noqa: BLE001  (a tile the GPU cannot hold, say: recorded, the sweep goes on)
                rows.append({"shape": shape, "method": f"sweep_{mode}", "tile": tile, "candidate": extra,
                             "error": f"{type(e).__name__}: {e}"})
                print(f"sweep {mode} {tile}: {type(e).__name__}", flush=True)
                continue
            rows.append(_row(shape, f"sweep_{mode}", ms, flops, bf16, tile=tile, candidate=extra))
            print(f"sweep {mode:13s} {ms:8.4f} ms x{bf16 / ms:.2f} vs bf16  {extra or 'default'}", flush=True)
            if best is None or ms < best[0]:
                best = (ms, extra)
        if best is not None:
            chosen[kind] = best[1]
            triton_gemm.TILE_OVERRIDES[kind] = dict(best[1])
    return rows, chosen


def _fresh_call(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """q(x) with its activation quantization: the codes kept from the previous call on this same input
    (shared by sibling linears, kernels/linear.py) are dropped first."""
    forget_act_codes()
    return q(x)


def sweep_rows(chosen: dict) -> list[dict]:
    rows, picked = sweep_tiles(*SWEEP_SHAPE)
    chosen.update(picked)
    return rows


@torch.no_grad()
def bench_layers(tokens, shapes) -> list[dict]:
    from dicompress.kernels.triton_act import quantize_act_triton
    from dicompress.kernels.triton_gemm import qlinear_triton
    rows = []
    for k, n in shapes:
        q = random_w4a8_layer(k, n)
        w_bf16 = q.dequantize().to(DT)
        b = q.bias
        act_args = (q.act.smooth, q.act.signs, None, 8)
        for m in tokens:
            shape, flops = f"{m}x{k}x{n}", 2.0 * m * k * n
            x = torch.randn(m, k, device=DEV, dtype=DT)
            bf16 = cuda_ms(partial(F.linear, x, w_bf16, b))
            rows.append(_row(shape, "bf16", bf16, flops, bf16))
            rows.append(_row(shape, "dequant_matmul", _reference_ms(q, x), flops, bf16))
            codes, steps = quantize_act_triton(x, *act_args)
            ref = reference.qlinear(codes, steps, q.qweight, q.scales, q.grid, q.eta, b, "tlq", 4, 0, "decode",
                                    torch.float32)
            for mode in MODES:
                with gemm_mode(mode):
                    y = q(x)
                    ms = cuda_ms(partial(_fresh_call, q, x))
                err = float((y.float() - ref).norm() / ref.norm())
                rows.append(_row(shape, f"fused_{mode}", ms, flops, bf16, rel_err_vs_decode_reference=round(err, 5)))
                gemm = cuda_ms(partial(qlinear_triton, codes, steps, q.qweight, q.scales, q.grid, q.eta, b, "tlq", 4, 0,
                                       mode, DT))
                rows.append(_row(shape, f"gemm_{mode}", gemm, flops, bf16))
            rows.append(_row(shape, "act_prep", cuda_ms(partial(quantize_act_triton, x, *act_args)), None, bf16))
            ceiling = _int_mm_ms(codes, q)
            if ceiling is not None:
                rows.append(_row(shape, "int8_mm_ceiling", ceiling, flops, bf16))
            for r in rows[-(len(MODES) * 2 + 3 + (ceiling is not None)):]:
                print(f"{r['shape']:>16s} {r['method']:15s} {r['ms']:9.4f} ms  {r['tflops'] or '-':>8} TFLOPS  "
                      f"x{r['speedup_vs_bf16']:.2f} vs bf16", flush=True)
    return rows


def _int_mm_ms(codes: torch.Tensor, q: QuantLinear) -> float | None:
    """torch._int_mm (cuBLAS int8 GEMM, int32 out) on the layer's activation codes and its unpacked int8
    weight: no scales, no bias, no activation prep; None where this torch has no int8 GEMM for the device."""
    from dicompress.kernels.tables import unpacked_weight
    w8 = unpacked_weight(q.qweight, q.scales, q.grid, q.eta, "tlq", 4, 0, q.in_features)[0]
    w8t = w8.t()                                        # [K, N] column-major: the layout cuBLAS wants
    try:
        torch._int_mm(codes, w8t)
    except RuntimeError as e:
        print(f"int8_mm_ceiling skipped: {e}", flush=True)
        return None
    return cuda_ms(partial(torch._int_mm, codes, w8t))


def flux_inputs(cfg, image_tokens: int = 4096, text_tokens: int = 512) -> dict:
    """One 1024x1024 FLUX forward's inputs (64x64 latent patches + 512 text tokens) for model config `cfg`."""
    side = int(image_tokens ** 0.5)
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    kw = {"device": DEV, "dtype": DT}
    return {"hidden_states": torch.randn(1, image_tokens, cfg.in_channels, **kw),
            "encoder_hidden_states": torch.randn(1, text_tokens, cfg.joint_attention_dim, **kw),
            "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, **kw),
            "timestep": torch.full((1,), 0.5, **kw), "img_ids": ids.view(-1, 3).to(DEV),
            "txt_ids": torch.zeros(text_tokens, 3, device=DEV), "return_dict": False}


@torch.no_grad()
def bench_model() -> list[dict]:
    from diffusers import FluxTransformer2DModel

    from dicompress.arch import adapter_for
    from dicompress.calib import capture
    from dicompress.recipe import CalibrationConfig
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX_WIDTH).to(DEV, DT).eval()
    inputs = flux_inputs(model.config, *((64, 16) if SMOKE else ()))
    c, tokens = model.config, inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]
    name = f"flux-width-{c.num_layers}d{c.num_single_layers}s@{tokens}tok"
    bf16 = cuda_ms(lambda: model(**inputs), warmup=2, iters=5)
    rows = [_row(name, "bf16", bf16, None, bf16)]
    t = time.perf_counter()
    cal = CalibrationConfig(source="synthetic", seeds=[0], steps=2, batch_size=1)
    with tempfile.TemporaryDirectory(prefix="dicompress-kb-") as work:     # the calibration store goes with it
        store = capture(model, adapter_for(model), cal, {"name": name}, Path(work), block_inputs=False,
                        progress=False)
        dicompress.compress(model, W4A8, calibration=store, progress=False)
    quantize_s = round(time.perf_counter() - t, 1)
    for mode in MODES:
        cache.clear()                                   # each mode's cached per-layer tensors measured alone
        before = torch.cuda.memory_allocated() if DEV == "cuda" else 0
        with gemm_mode(mode):
            model(**inputs)
            cached = (torch.cuda.memory_allocated() - before) / 2**20 if DEV == "cuda" else None
            rows.append(_row(name, f"w4a8_{mode}", cuda_ms(lambda: model(**inputs), warmup=2, iters=5), None, bf16,
                             quantize_seconds=quantize_s, cached_mib=cached and round(cached, 1)))
    cache.clear()
    for r in rows:
        print(f"{r['shape']} {r['method']:12s} {r['ms']:9.2f} ms  x{r['speedup_vs_bf16']:.2f} vs bf16", flush=True)
    return rows


BAR_SHAPE = f"{TOKENS[-1]}x{SHAPES[0][0]}x{SHAPES[0][1]}"      # 4096x3072x3072 (toy in --smoke)


def bars(rows: list[dict]) -> list[dict]:
    """Issue 4's speed bars, read off the rows: the fused W4A8 linear at BAR_SHAPE at least 1.5x bf16 and 2x
    dequantize-then-matmul (the fastest of the GEMM modes), and the block stack faster than bf16."""
    ms = {(r["shape"], r["method"]): r["ms"] for r in rows if "ms" in r}
    out = []
    fused = [(m, ms[(BAR_SHAPE, m)]) for m in (f"fused_{mode}" for mode in MODES) if (BAR_SHAPE, m) in ms]
    if fused and (BAR_SHAPE, "bf16") in ms:
        method, t = min(fused, key=lambda x: x[1])
        out.append({"bar": f"W4A8 linear {BAR_SHAPE} vs bf16 matmul", "method": method,
                    "ratio": round(ms[(BAR_SHAPE, "bf16")] / t, 3), "need": 1.5})
        if (BAR_SHAPE, "dequant_matmul") in ms:
            out.append({"bar": f"W4A8 linear {BAR_SHAPE} vs dequantize-then-matmul", "method": method,
                        "ratio": round(ms[(BAR_SHAPE, "dequant_matmul")] / t, 3), "need": 2.0})
    stack = [r for r in rows if r["method"].startswith("w4a8_") and "ms" in r]
    if stack:
        best = max(stack, key=lambda r: r["speedup_vs_bf16"])
        out.append({"bar": f"block stack {best['shape']} vs bf16", "method": best["method"],
                    "ratio": best["speedup_vs_bf16"], "need": 1.0, "strict": True})
    for b in out:
        b["met"] = b["ratio"] > b["need"] if b.get("strict") else b["ratio"] >= b["need"]
    return out


def markdown(res: dict) -> str:
    partial = "" if res.get("complete", True) else f" (partial: only {', '.join(res['sections_done'])} ran)"
    lines = [f"{res['device']}, torch {res['torch']}, triton {res['triton']}{partial}", "",
             "| shape (MxKxN) | method | ms | TFLOPS | speedup vs bf16 |", "|---|---|---|---|---|"]
    if res.get("tiles_chosen"):
        sweep = "x".join(map(str, SWEEP_SHAPE))
        lines[1:1] = ["", f"tiles picked by the sweep at {sweep} (merged over the defaults of "
                      f"dicompress/kernels/triton_gemm._blocks): {json.dumps(res['tiles_chosen'])}"]
    for r in res["rows"]:
        method = r["method"] + (f" {json.dumps(r['candidate']) if r['candidate'] else 'default'}"
                                if "candidate" in r else "")
        if r.get("cached_mib") is not None:
            method += f" (cached per-layer tensors: {r['cached_mib']} MiB)"
        if "error" in r:
            lines.append(f"| {r['shape']} | {method} | failed: {r['error'][:80]} | | |")
            continue
        lines.append(f"| {r['shape']} | {method} | {r['ms']:.4f} | {r['tflops'] if r['tflops'] else '-'} | "
                     f"{r['speedup_vs_bf16']:.2f}x |")
    if res.get("bars"):
        lines += ["", "| bar | path | measured | needed | met |", "|---|---|---|---|---|"]
        lines += [f"| {b['bar']} | {b['method']} | {b['ratio']:.2f}x | {'>' if b.get('strict') else '>='} "
                  f"{b['need']}x | {'yes' if b['met'] else 'no'} |" for b in res["bars"]]
    for e in res["errors"]:
        lines.append(f"\nerror in {e['section']}: {e['error']}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/kernels.json")
    ap.add_argument("--skip-model", action="store_true", help="layers only, no end-to-end stack")
    ap.add_argument("--skip-sweep", action="store_true", help="the library's default tiles, no tile sweep")
    ap.add_argument("--smoke", action="store_true", help="check the script on the CPU at toy sizes (no GPU)")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not SMOKE:
        sys.exit("bench_kernels.py measures the Triton kernels and needs a CUDA GPU; none is visible here "
                 "(torch.cuda.is_available() is False). On CPU the layers run the pure-torch reference: see "
                 "tools/bench_quant.py for CPU figures.")
    import triton
    t0 = time.perf_counter()
    rows, errors, chosen = [], [], {}

    sections = [] if args.skip_sweep else [("sweep", lambda: sweep_rows(chosen))]
    sections += [("layers", lambda: bench_layers(TOKENS, SHAPES))]
    sections += [] if args.skip_model else [("model", bench_model)]
    device = "CPU smoke run (Triton interpreter; timings mean nothing)" if SMOKE else torch.cuda.get_device_name()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(done: list[str]) -> str:
        """The results so far, after every section: a run stopped at its time limit keeps what it measured."""
        res = {"rows": rows, "errors": errors, "tiles_chosen": chosen, "bars": bars(rows), "device": device,
               "torch": torch.__version__, "triton": triton.__version__, "command": "python " + " ".join(sys.argv),
               "sections_done": done, "complete": len(done) == len(sections),
               "seconds": round(time.perf_counter() - t0, 1), "platform": platform.platform()}
        out.write_text(json.dumps(res, indent=2) + "\n")
        md = markdown(res)
        out.with_suffix(".md").write_text(md)
        return md

    done: list[str] = []
    for section, fn in sections:     # one failing section still leaves the other's rows
        try:
            rows += fn()
        except Exception as e:  # noqa: BLE001  (recorded in the output, the run goes on)
            traceback.print_exc()
            errors.append({"section": section, "error": f"{type(e).__name__}: {e}"})
        done.append(section)
        md = write(done)
    print(md)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
