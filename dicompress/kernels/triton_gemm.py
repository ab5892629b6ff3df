"""Triton quantized GEMM: y = x_hat · wᵀ (+ b), the weight decoded from its packed codes inside the kernel.

Per K-block the kernel unpacks a [BLOCK_N, BLOCK_K] tile of b-bit codes from the dense packing
(quant/packing.py: code i of a run of 8 at bits [i·b, (i+1)·b) of b little-endian bytes, so a code spans at
most two bytes; 4-bit rows are read as K-contiguous bytes and split into interleaved nibbles, 8-bit rows
directly), looks every code up in its row's table (tables.signed_levels / int8_grid) and feeds tl.dot,
as x · Wᵀ or, with SWAP_AB, as (W · xᵀ)ᵀ (the decoded weight as the left operand). What the dot consumes:
  activations int8 codes, mode "decode": codes -> fp16 (exact), levels -> fp16, fp32 accumulation
  activations int8 codes, mode "int8":   int8 codes x int8 levels, int32 accumulation
  float activations (A16):               levels cast to x's dtype (fp32 dots in IEEE, no TF32)
With W_UNPACKED (mode "int8_unpacked") the weight operand is instead an int8 matrix [N, K] of the mapped
levels, decoded once per layer and cached (kernels/cache.py): no codes, no table, both operands stream into
shared memory the way a plain int8 GEMM's do (the decode is register work between a load and the dot, which
keeps the weight operand out of the asynchronous-copy pipeline), for 1 byte per weight of GPU memory.
Scales: a per-channel scale (and int8 mode's row factor t) is one fp32 multiply per output column in the
epilogue; group scales (64 / 128) multiply each K-block's partial sum (BLOCK_K divides the group), so the
dot itself never sees them. The epilogue applies the per-token step, the row scale and the bias in fp32
and stores in the output dtype.

Tolerance against the reference (tests/test_kernels_*.py): fp32 A16 and the int8 path (integer dots, the
same mapped levels) agree to ~1e-6 relative, the summation order being the only difference; decode mode on
int8 activations rounds the levels to fp16 (2^-11 relative), and 16-bit outputs round once more: within
2e-3 relative (Frobenius norm) of the fp32 reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cache import derived
from .dispatch import INT8_MODES, capability
from .int8_mm import unpacked_operands
from .tables import weight_tables


@triton.jit
def _codes_tile(qw_ptr, rn, n_ok, k0, NB, stride_qn, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The b-bit codes of output rows rn at inputs k0 .. k0 + BLOCK_K, as int32 [BLOCK_N, BLOCK_K]. Codes past
    K are the row's zero padding or a masked 0: finite levels that meet zero activations."""
    L: tl.constexpr = 1 << BITS
    row = qw_ptr + rn[:, None] * stride_qn
    if BITS == 8:                                       # one code per byte
        kb = k0 + tl.arange(0, BLOCK_K)
        return tl.load(row + kb[None, :], mask=n_ok[:, None] & (kb < NB)[None, :], other=0).to(tl.int32)
    elif BITS == 4:                                     # K-contiguous bytes, low nibble first
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(row + kb[None, :], mask=n_ok[:, None] & (kb < NB)[None, :], other=0).to(tl.int32)
        return tl.interleave(byte & 15, byte >> 4)
    else:                                               # any width: code k at bits [(k%8)·b, +b) of its run
        k = k0 + tl.arange(0, BLOCK_K)
        bit = (k % 8) * BITS
        byte = (k // 8) * BITS + bit // 8
        shift = (bit % 8)[None, :]
        word = tl.load(row + byte[None, :], mask=n_ok[:, None] & (byte < NB)[None, :], other=0).to(tl.int32)
        if 8 % BITS != 0:                               # 3, 5, 6, 7 bits: a code may straddle two bytes
            hi = tl.load(row + byte[None, :] + 1, mask=n_ok[:, None] & ((byte + 1 < NB)[None, :]) &
                         (shift + BITS > 8), other=0).to(tl.int32)
            word = word | (hi << 8)
        return (word >> shift) & (L - 1)


@triton.jit
def _qgemm_kernel(a_ptr, a_scale_ptr, qw_ptr, lut_ptr, gscale_ptr, rscale_ptr, bias_ptr, out_ptr,
                  M, N, K, NB, n_groups, stride_am, stride_qn, stride_om,
                  BITS: tl.constexpr, GROUP: tl.constexpr, LUT_GROUPED: tl.constexpr,
                  A_INT8: tl.constexpr, W_INT8: tl.constexpr, A_FP32: tl.constexpr, HAS_BIAS: tl.constexpr,
                  W_UNPACKED: tl.constexpr, SWAP_AB: tl.constexpr, REG_LUT: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped launch order: GROUP_M row-blocks share each weight tile while it is in L2
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm = pid_m * BLOCK_M + offs_m
    rn = pid_n * BLOCK_N + offs_n
    m_ok = rm < M
    n_ok = rn < N
    L: tl.constexpr = 1 << BITS
    INT_DOT: tl.constexpr = A_INT8 and W_INT8
    ACC_INT: tl.constexpr = INT_DOT and GROUP == 0
    # SWAP_AB computes the transposed tile, outᵀ = W · xᵀ: the decoded weight is then the left operand,
    # which Hopper's wgmma may take from registers (the right one must come from shared memory)
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32 if ACC_INT else tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32 if ACC_INT else tl.float32)
    # 64-bit arithmetic only in each program's base pointers; in-tile offsets are int32 (registers)
    lut_stride = n_groups * L if LUT_GROUPED else L
    qw_base = qw_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_qn
    lut_rows = lut_ptr + (pid_n * BLOCK_N).to(tl.int64) * lut_stride + offs_n[:, None] * lut_stride
    # REG_LUT: the rows' tables [BLOCK_N, 2^b] are held in registers and indexed with tl.gather; otherwise
    # each code is a load from the table in memory (L1-resident: 2^b entries per row). Per-group tables
    # (uniform zero points) change with the K-block.
    levels = tl.arange(0, L)[None, :]
    if REG_LUT and not LUT_GROUPED and not W_UNPACKED:
        table = tl.load(lut_rows + levels, mask=n_ok[:, None], other=0)
    a_ptrs = a_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_am + offs_m[:, None] * stride_am + rk[None, :]
    w_ptrs = qw_base + offs_n[:, None] * stride_qn + rk[None, :]        # W_UNPACKED: the int8 matrix's rows
    for k0 in range(0, K, BLOCK_K):
        k_ok = (rk < K - k0)[None, :]
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok, other=0)
        a_ptrs += BLOCK_K
        if W_UNPACKED:                                  # the mapped levels themselves, int8
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok, other=0)
            w_ptrs += BLOCK_K
        else:
            code = _codes_tile(qw_base, offs_n, n_ok, k0, NB, stride_qn, BITS, BLOCK_K)
            group_row = lut_rows + (k0 // GROUP) * L if LUT_GROUPED else lut_rows   # BLOCK_K divides GROUP
            if REG_LUT:
                if LUT_GROUPED:
                    table = tl.load(group_row + levels, mask=n_ok[:, None], other=0)
                w = tl.gather(table, code, 1)           # [BLOCK_N, BLOCK_K] levels
            else:
                w = tl.load(group_row + code, mask=n_ok[:, None], other=0)
        if INT_DOT:
            pass                                        # int8 x int8, int32 accumulation
        elif A_INT8:
            a = a.to(tl.float16)                        # codes are exact in fp16
            w = w.to(tl.float16)
        elif A_FP32:
            w = w.to(tl.float32)
        else:
            w = w.to(a.dtype)
        if SWAP_AB:
            lhs, rhs = w, tl.trans(a)
        else:
            lhs, rhs = a, tl.trans(w)
        if GROUP > 0:                                   # this block's partial sum times its group scale
            if INT_DOT:
                part = tl.dot(lhs, rhs, out_dtype=tl.int32)
            elif A_FP32:
                part = tl.dot(lhs, rhs, input_precision="ieee")
            else:
                part = tl.dot(lhs, rhs)
            gs = tl.load(gscale_ptr + rn * n_groups + k0 // GROUP, mask=n_ok, other=0.0)
            if SWAP_AB:
                acc += part.to(tl.float32) * gs[:, None]
            else:
                acc += part.to(tl.float32) * gs[None, :]
        # accumulating inside the dot (not acc += dot) leaves the MMA in flight across iterations
        elif INT_DOT:
            acc = tl.dot(lhs, rhs, acc, out_dtype=tl.int32)
        elif A_FP32:
            acc = tl.dot(lhs, rhs, acc, input_precision="ieee")
        else:
            acc = tl.dot(lhs, rhs, acc)
    acc = acc.to(tl.float32)
    if SWAP_AB:
        acc = tl.trans(acc)
    if A_INT8:
        acc = acc * tl.load(a_scale_ptr + rm, mask=m_ok, other=0.0)[:, None]
    acc = acc * tl.load(rscale_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_rows = out_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_om + offs_m[:, None] * stride_om
    tl.store(out_rows + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# GEMM classes: "int8" (int8 x int8 dots on table-decoded codes), "float" (fp16 / float dots on decoded
# levels: mode decode, and A16), "int8_unpacked" (int8 x int8 dots on the unpacked int8 weight). KIND_MODE is
# the GEMM mode that exercises each with int8 activation codes (the sweep, the tests).
KIND_MODE = {"int8": "int8", "float": "decode", "int8_unpacked": "int8_unpacked"}


def gemm_kind(a8: bool, mode: str) -> str:
    """The tile class of a call: int8 activation codes in an int8 mode dot in int8; float dots otherwise."""
    if not a8 or mode not in INT8_MODES:
        return "float"
    return mode


# Tile overrides per GEMM class, merged over the defaults below when M > 64. Empty in the library;
# tools/bench_kernels.py fills it with the winner of its tile sweep for the rest of its run, and records the
# sweep so the defaults can follow the measurements.
TILE_OVERRIDES: dict[str, dict] = {}
# What that sweep tries (the first of each is the default); tests/test_kernels_gpu.py checks each one's
# results, which also puts their compiled kernels in Triton's cache before the bench times them. Each one
# compiles for sm_90 without register spills (tools/aot_kernels.py; larger tiles spilled or overflowed
# shared memory there and were left out).
TILE_CANDIDATES: dict[str, list[dict]] = {
    "int8": [{}, {"SWAP_AB": True},
             {"BLOCK_K": 64},
             {"BLOCK_K": 64, "SWAP_AB": True},
             {"num_stages": 4},
             {"BLOCK_K": 64, "REG_LUT": True}],
    "float": [{}, {"SWAP_AB": True},
              {"REG_LUT": True},
              {"BLOCK_K": 32, "num_stages": 4},
              {"num_stages": 4},
              {"BLOCK_M": 64, "num_warps": 4, "num_stages": 4, "SWAP_AB": True}],
    "int8_unpacked": [{}, {"BLOCK_N": 128},
                      {"num_stages": 4},
                      {"BLOCK_K": 64, "num_stages": 5},
                      {"SWAP_AB": True},
                      {"BLOCK_M": 256, "BLOCK_N": 128}],
}


def _blocks(m: int, group_size: int, kind: str, capability: tuple[int, int] = (9, 0)) -> dict:
    """A fixed tile per GEMM class and GPU generation (no autotuning: compile time counts on a lent GPU).
    The int8 tiles take BLOCK_K 128 on Hopper and 64 before it: compiled for sm_86/89, 128 spills
    (tools/aot_kernels.py --arch 86)."""
    if kind not in KIND_MODE:
        raise ValueError(f"GEMM class {kind!r} is not one of {tuple(KIND_MODE)}")
    hopper = capability >= (9, 0)
    bm = 128 if m > 64 else max(16, triton.next_power_of_2(m))
    bk = (128 if hopper else 64) if kind != "float" else 64
    cfg = {"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": bk, "GROUP_M": 8, "SWAP_AB": False, "REG_LUT": False,
           "num_warps": 8 if bm >= 128 else 4, "num_stages": 3}
    if kind == "int8_unpacked" and m > 64 and hopper and not group_size:
        # a plain int8 GEMM's tile (nothing is decoded in registers); with group scales the second (fp32)
        # accumulator next to the int32 partial sum spills at 256 columns (tools/aot_kernels.py)
        cfg["BLOCK_N"] = 256
    if m > 64:
        cfg.update(TILE_OVERRIDES.get(kind, {}))
    if group_size:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group_size)
    return cfg


def qlinear_triton(x, x_scale, qweight, scales, aux, eta, bias, codec, bits, group_size, mode, out_dtype,
                   blocks: dict | None = None):
    """Same contract as reference.qlinear. `blocks` overrides the tile (tests use small ones). The decode
    tables (and mode int8_unpacked's int8 weight) are built once per layer and mode (kernels/cache.py), not on
    every call."""
    k = x.shape[-1]
    n = qweight.shape[0]
    lead = x.shape[:-1]
    a = x.reshape(-1, k)
    a = a if a.stride(-1) == 1 else a.contiguous()
    m = a.shape[0]
    a8 = x_scale is not None
    unpacked = mode == "int8_unpacked"
    if unpacked:
        w, rscale, gscale = unpacked_operands(qweight, scales, aux, eta, codec, bits, group_size, k)
        lut = w                                         # unused by the kernel
    else:
        # the table in the dtype the dot consumes: int8 (int8 x int8), fp16 (int8 codes x decoded levels: half
        # the gathered bytes, the rounding the dot applied anyway), fp32 (float activations: cast to x's dtype)
        lut_dtype = (torch.int8 if mode in INT8_MODES else torch.float16) if a8 else torch.float32

        def build():
            lut, rscale, gscale = weight_tables(codec, scales, aux, eta, bits, group_size, mode)
            return lut.to(lut_dtype), rscale, gscale

        w = qweight
        lut, rscale, gscale = derived(scales, (scales, aux, eta), ("qgemm", codec, bits, group_size, mode, lut_dtype),
                                      build)
    cfg = dict(_blocks(m, group_size, gemm_kind(a8, mode), capability(x.device)), **(blocks or {}))
    if group_size and group_size % cfg["BLOCK_K"]:
        raise ValueError(f"BLOCK_K={cfg['BLOCK_K']} must divide the group size {group_size}")
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _qgemm_kernel[grid](
            a, x_scale.reshape(-1) if a8 else rscale, w, lut,
            gscale if gscale is not None else rscale, rscale, bias if bias is not None else rscale, out,
            m, n, k, w.shape[1], gscale.shape[1] if gscale is not None else 1,
            a.stride(0), w.stride(0), out.stride(0),
            BITS=bits, GROUP=group_size, LUT_GROUPED=lut.shape[1] > 1 and not unpacked, A_INT8=a8,
            W_INT8=lut.dtype == torch.int8, A_FP32=a.dtype == torch.float32, HAS_BIAS=bias is not None,
            W_UNPACKED=unpacked, **cfg)
    return out.view(*lead, n)
