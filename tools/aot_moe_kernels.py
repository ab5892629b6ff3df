"""Compile the MoE grouped GEMM (dicompress/kernels/triton_moe.py) ahead of time for a GPU architecture, without a
GPU, as grouped_routed_ffn launches it at FLUX width (3072 -> 1536-wide experts, 7 routed, top-2, 4096 tokens), and
report what the compiler made of it: registers, spills, shared memory, tensor-core instructions, pipelined loads.

    python tools/aot_moe_kernels.py --arch 90 86 --out bench/aot_moe.json     # every variant + the sweep tiles
    python tools/aot_moe_kernels.py --arch 90 --quick                         # the two bf16 FLUX launches

Triton's interpreter runs code its GPU compiler refuses; this is the check that the kernel compiles, done by
Triton's own compiler and bundled ptxas (cuobjdump, bundled too, reads the cubin). Nothing runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)      # compiled code, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load_kernel_module():
    """kernels/triton_moe.py by its path: it needs torch and triton alone, and `import dicompress` (diffusers and
    all) would cost most of this tool's time."""
    spec = importlib.util.spec_from_file_location("triton_moe", ROOT / "dicompress/kernels/triton_moe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


triton_moe = _load_kernel_module()
DIM, WIDTH, EXPERTS, ROWS = 3072, 1536, 7, 4096 * 2
_INTS = ("N", "K", "n_experts", "grid_m", "stride_am", "stride_we", "stride_wn", "stride_be", "stride_om")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (name, dtype, N, K, activation, up: gather + bias / down: gate + scatter, sorted rows): the launches of one
# grouped_routed_ffn call, at the FLUX load (128-row tiles) and a small one (64-row tiles for 16-bit)
VARIANTS = [("up tanh", "bf16", WIDTH, DIM, "tanh", True, ROWS), ("down", "bf16", DIM, WIDTH, "none", False, ROWS),
            ("up erf", "bf16", WIDTH, DIM, "erf", True, ROWS), ("up tanh small", "bf16", WIDTH, DIM, "tanh", True, 64),
            ("down small", "bf16", DIM, WIDTH, "none", False, 64), ("up tanh", "fp16", WIDTH, DIM, "tanh", True, ROWS),
            ("up tanh", "fp32", WIDTH, DIM, "tanh", True, ROWS), ("down", "fp32", DIM, WIDTH, "none", False, ROWS)]
QUICK = VARIANTS[:2]


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack (spill) bytes per thread of the kernel in a cubin, as cuobjdump reports them."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(\w+):(\d+)", text.split("Function", 1)[-1]))
    return {"registers": int(fields.get("REG", -1)), "stack_bytes": int(fields.get("STACK", -1))}


def compile_variant(dtype: str, n: int, k: int, activation: str, up: bool, rows: int, arch: int,
                    extra: dict | None = None) -> dict:
    """The kernel compiled as grouped_gemm would launch it: pointers 16-byte aligned, integer arguments marked
    divisible by 16 where they are (Triton's launcher specialises them so)."""
    fn = triton_moe._grouped_gemm_kernel
    cfg = dict(triton_moe.tile(rows, EXPERTS, _DTYPES[dtype]), **(extra or {}))
    t = "*" + dtype
    ptrs = {"a_ptr": t, "a_rows_ptr": "*i32", "w_ptr": t, "bias_ptr": t, "gate_ptr": t, "out_ptr": t,
            "out_rows_ptr": "*i32", "block_ends_ptr": "*i32", "starts_ptr": "*i32", "counts_ptr": "*i32"}
    ints = {"N": n, "K": k, "n_experts": EXPERTS, "grid_m": triton.cdiv(rows, cfg["BLOCK_M"]) + EXPERTS,
            "stride_am": k, "stride_we": n * k, "stride_wn": k, "stride_be": n, "stride_om": n}
    const = {"E_P": triton.next_power_of_2(EXPERTS), "GATHER": up, "SCATTER": not up, "HAS_BIAS": up,
             "ACT": triton_moe.ACTIVATIONS[activation], "HAS_GATE": not up, "IEEE": dtype == "fp32",
             "INTERP_BF16": False, **{a: b for a, b in cfg.items() if a not in ("num_warps", "num_stages")}}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in ptrs:
            sig[name], attrs[(i,)] = ptrs[name], [["tt.divisibility", 16]]
        elif name in _INTS:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "constexpr"
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    return {"seconds": round(time.perf_counter() - start, 2), "tile": cfg, "shared_bytes": kernel.metadata.shared,
            **resource_usage(kernel.asm["cubin"]), "wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx,
            "async_copies": len(re.findall(r"async_copy_global_to_local|async_tma_copy", ttgir))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--quick", action="store_true", help="only the two bf16 launches at the FLUX load")
    ap.add_argument("--out", type=Path, default=Path("bench/aot_moe.json"))
    args = ap.parse_args(argv)
    rows = []
    for arch in args.arch:
        # the sweep's tiles are Hopper's (up to 192 KiB of shared memory: more than Ampere's 99 KiB per block)
        sweep = [] if args.quick or arch < 90 else [(f"{name} sweep", *rest, extra) for name, *rest in QUICK
                                                    for extra in triton_moe.TILE_CANDIDATES[1:]]
        for name, dtype, n, k, activation, up, m, *extra in (QUICK if args.quick else VARIANTS) + sweep:
            try:
                row = compile_variant(dtype, n, k, activation, up, m, arch, *extra)
            except Exception as e:  # noqa: BLE001  (recorded: a variant the compiler refuses)
                row = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            rows.append({"arch": arch, "kernel": f"{name} {dtype}", "rows": m, "N": n, "K": k, **row})
            print(json.dumps(rows[-1]), flush=True)
    res = {"triton": triton.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
