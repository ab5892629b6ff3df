"""Compile the Triton kernels ahead of time for a GPU architecture, without a GPU, and report what the
compiler made of them: registers, spills, shared memory, which tensor-core instructions, whether loads are
pipelined. A kernel that spills or serialises its loads is slow before any timing says so.

    python tools/aot_kernels.py --out bench/aot_kernels.json      # also bench/aot_kernels.md (~1 min)
    python tools/aot_kernels.py --arch 80                         # Ampere (mma.sync) instead of Hopper

Triton's own compiler (its bundled ptxas) builds each GEMM variant of triton_gemm.TILE_CANDIDATES (W4, int8
activation codes; the int8 and the fp16 decode paths) and the activation kernel at FLUX widths for the
target `sm_<arch>`; cuobjdump (bundled too) reads the registers and the stack (spill) bytes per thread from
the cubin. Nothing runs: these are static facts of the machine code, not speeds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)      # compiled code, not the interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dicompress.kernels import triton_act, triton_gemm  # noqa: E402

_INTS = ("M", "N", "K", "NB", "n_groups", "stride_am", "stride_bn", "stride_qn", "stride_om", "stride_x", "stride_c",
         "ROW", "BASE")
_FLOATS = ("norm", "qmax")
SHAPE = (4096, 3072, 3072)                      # M x K x N the GEMM variants are specialised for


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(cubin: bytes) -> dict:
    """REG and STACK (bytes per thread) of the kernel in a cubin, read by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+):(\d+)", text.split("Function", 1)[-1]))
    return {"registers": int(fields.get("REG", -1)), "stack_bytes": int(fields.get("STACK", -1)),
            "local_bytes": int(fields.get("LOCAL", -1))}


def compile_kernel(fn, pointer_types: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int,
                   ints: dict | None = None) -> dict:
    """Compile `fn` as a launch with these arguments would: pointers 16-byte aligned and integer arguments
    (`ints`: their values at the shape of interest) marked divisible by 16 where they are, an integer equal
    to 1 made a constant, as Triton's launcher specialises them."""
    ints = ints or {}
    sig, attrs, const = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in pointer_types:
            sig[name] = pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _INTS:
            if ints.get(name) == 1:
                sig[name], const[name] = "constexpr", 1
                continue
            sig[name] = "i32"
            if ints.get(name, 1) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    t = time.perf_counter()
    k = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    return {"seconds": round(time.perf_counter() - t, 2), "shared_bytes": k.metadata.shared,
            **resource_usage(k.asm["cubin"]),
            "wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx,
            # asynchronous global -> shared copies (prologue and loop): the pipeliner took those loads
            "async_copies": len(re.findall(r"async_copy_global_to_local|async_tma_copy", ttgir)),
            # register -> shared stores (a decoded operand the dot reads from shared memory)
            "local_allocs": len(re.findall(r"ttg\.local_alloc", ttgir)),
            # the most wgmma groups left in flight at a wait: 0 = every iteration waits for its MMA to finish
            "wgmma_in_flight": max(map(int, re.findall(r"warp_group_dot_wait[^{]*\{pendings = (\d+)", ttgir)),
                                   default=None)}


def gemm_variant(kind: str, extra: dict, arch: int, bits: int = 4, group: int = 0, act: str = "i8") -> dict:
    """The quantized GEMM as triton_gemm.qlinear_triton launches it at SHAPE: `kind` int8 (int8 x int8 dots)
    or float; `act` the activation dtype (i8 codes, or bf16 / fp32 for A16); `group` uniform-codec scale
    groups (per-group tables)."""
    m, k, n = SHAPE
    unpacked = kind == "int8_unpacked"
    int8_levels = kind != "float"
    tile_kind = triton_gemm.gemm_kind(act == "i8", triton_gemm.KIND_MODE[kind])
    cfg = dict(triton_gemm._blocks(m, group, tile_kind, (arch // 10, arch % 10)), **extra)
    # what qlinear_triton passes: the int8 table (int8 dots), fp16 (codes x decoded levels) or fp32 (A16)
    lut = "*i8" if int8_levels and (act == "i8" or unpacked) else "*fp16" if act == "i8" else "*fp32"
    ptrs = {"a_ptr": "*" + act, "a_scale_ptr": "*fp32", "qw_ptr": "*i8" if unpacked else "*u8", "lut_ptr": lut,
            "gscale_ptr": "*fp32", "rscale_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16"}
    const = {"BITS": bits, "GROUP": group, "LUT_GROUPED": bool(group) and not unpacked, "A_INT8": act == "i8",
             "W_INT8": lut == "*i8", "A_FP32": act == "fp32", "HAS_BIAS": True, "W_UNPACKED": unpacked,
             **{key: v for key, v in cfg.items() if key not in ("num_warps", "num_stages")}}
    packed = k if unpacked else (k + 7) // 8 * bits
    ints = {"M": m, "N": n, "K": k, "NB": packed, "n_groups": k // group if group else 1, "stride_am": k,
            "stride_qn": packed, "stride_om": n}
    return compile_kernel(triton_gemm._qgemm_kernel, ptrs, const, cfg["num_warps"], cfg["num_stages"], arch, ints)


# other code paths, compiled to catch what only the GPU compiler refuses (the interpreter runs anything)
COVERAGE = [("int8", {}, {"bits": 3}), ("float", {}, {"bits": 3}), ("int8", {}, {"bits": 8}),
            ("int8", {}, {"bits": 2}), ("int8", {}, {"group": 64}), ("float", {"REG_LUT": True}, {"group": 128}),
            ("float", {}, {"act": "bf16"}), ("float", {}, {"act": "fp32"}), ("int8", {}, {"act": "bf16"}),
            ("int8_unpacked", {}, {"group": 64}), ("int8_unpacked", {}, {"act": "bf16"})]


@triton.jit
def _plain_matmul(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_om, INT8: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A plain x · Wᵀ with both operands loaded straight into the dot: the reference point for what the
    compiler makes of a GEMM with nothing decoded in it (not used by the library)."""
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    rm = (pid // grid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % grid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rn[:, None] * stride_bn + rk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32 if INT8 else tl.float32)
    for _ in range(0, tl.cdiv(K, BLOCK_K)):
        acc = tl.dot(tl.load(a_ptrs), tl.trans(tl.load(b_ptrs)), acc, out_dtype=acc.dtype)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    tl.store(c_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(tl.bfloat16))


def plain_variant(int8: bool, arch: int) -> dict:
    m, k, n = SHAPE
    dtype = "*i8" if int8 else "*fp16"
    ptrs = {"a_ptr": dtype, "b_ptr": dtype, "c_ptr": "*bf16"}
    const = {"INT8": int8, "BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128 if int8 else 64}
    ints = {"M": m, "N": n, "K": k, "stride_am": k, "stride_bn": k, "stride_om": n}
    return compile_kernel(_plain_matmul, ptrs, const, 8, 3, arch, ints)


def act_variant(k: int, arch: int, zero_point: bool = False) -> dict:
    geo = triton_act._rotation_layout(k, True)
    ptrs = {"x_ptr": "*bf16", "smooth_ptr": "*fp32", "signs_ptr": "*i8", "hp_ptr": "*fp32", "codes_ptr": "*i8",
            "steps_ptr": "*fp32", "offsets_ptr": "*fp32"}
    tile = geo["P"] * geo["BB"]
    const = {"HAS_SMOOTH": True, "HAS_SIGNS": True, "STAGES": geo["STAGES"], "P": geo["P"], "BB": geo["BB"],
             "ZERO_POINT": zero_point}
    warps = triton_act.act_warps(tile)
    ints = {"stride_x": k, "stride_c": k, "ROW": geo["ROW"], "BASE": geo["BASE"]}
    return compile_kernel(triton_act._act_quant_kernel, ptrs, const, warps, 1, arch, ints)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/aot_kernels.json")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    args = ap.parse_args()
    rows = []
    for kind, candidates in triton_gemm.TILE_CANDIDATES.items():
        for extra in candidates:
            try:
                row = gemm_variant(kind, extra, args.arch)
            except Exception as e:  # noqa: BLE001  (recorded: a variant the compiler refuses)
                row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append({"kernel": f"qgemm {kind}", "variant": extra or "default", **row})
            print(json.dumps(rows[-1]), flush=True)
    for kind, extra, kw in COVERAGE:
        try:
            row = gemm_variant(kind, extra, args.arch, **kw)
        except Exception as e:  # noqa: BLE001
            row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append({"kernel": f"qgemm {kind} {' '.join(f'{a}={b}' for a, b in kw.items())}", "variant": extra or
                     "default", "coverage": True, **row})
        print(json.dumps(rows[-1]), flush=True)
    for int8 in (False, True):
        try:
            row = plain_variant(int8, args.arch)
        except Exception as e:  # noqa: BLE001
            row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append({"kernel": f"plain matmul {'int8' if int8 else 'fp16'} (reference point)",
                     "variant": "128x256 tile", **row})
        print(json.dumps(rows[-1]), flush=True)
    for k, zp in ((3072, False), (12288, False), (15360, False), (3072, True), (15360, True)):
        try:
            row = act_variant(k, args.arch, zp)
        except Exception as e:  # noqa: BLE001
            row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append({"kernel": "quantize_act_zp" if zp else "quantize_act", "variant": f"K={k}", **row})
        print(json.dumps(rows[-1]), flush=True)
    res = {"arch": f"sm_{args.arch}", "triton": triton.__version__, "rows": rows,
           "command": "python " + " ".join(sys.argv)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"Triton {triton.__version__}, compiled for sm_{args.arch} without a GPU (static facts, not speeds)", "",
             "| kernel | variant | registers | stack (spill) B | shared B | tensor cores | async copies | "
             "local allocs | wgmma in flight |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {json.dumps(r['variant'])} | failed: {r['error'][:60]} | | | | | | |")
            continue
        tc = "wgmma" if r["wgmma"] else "mma.sync" if r["mma_sync"] else "none"
        lines.append(f"| {r['kernel']} | {json.dumps(r['variant'])} | {r['registers']} | {r['stack_bytes']} | "
                     f"{r['shared_bytes']} | {tc} | {r['async_copies']} | {r['local_allocs']} | "
                     f"{'-' if r['wgmma_in_flight'] is None else r['wgmma_in_flight']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
