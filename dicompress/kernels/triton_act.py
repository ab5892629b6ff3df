"""Triton activation preparation: x / smooth -> randomised Hadamard -> per-token int8 codes, one token per
program, the whole row in registers (K <= 16384 at FLUX widths).

The rotation follows quant/hadamard.py's plan exactly: with n = base · 2^k, the row is held as a tile
[2^k (padded), base (padded)] (channel a·2^k + b at [b, a]); the FWHT runs along b as log2(2^k) butterfly
stages (reshape / split / join, the same pairing as `_fwht_unnormalised`), the base factor H_base is a
small dense tl.dot (IEEE fp32), and 1/√n is applied last, as `apply_hadamard` does. A dense rotation is a
real GEMM, so it runs as a torch fp32 matmul before the kernel. Everything inside is fp32, whatever the
input dtype; codes are rounded half-to-even like torch.round. With ZERO_POINT the same kernel writes the
asymmetric codes (centred to int8) and each token's offset, as reference.quantize_codes_zp does.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ..quant.hadamard import _base_matrix, hadamard_plan
from .cache import derived

_RNE = tl.constexpr(12582912.0)   # 1.5 · 2^23: (v + c) - c rounds fp32 v half-to-even for |v| < 2^22
_DOT_MIN = 16              # tl.dot needs every dimension >= 16


@triton.jit
def _butterfly(x, P: tl.constexpr, BB: tl.constexpr, H: tl.constexpr):
    """One FWHT stage along axis 0 of x [P, BB]: rows (i, i + H) in blocks of 2H -> (u + v, u - v)."""
    y = tl.permute(tl.reshape(x, [P // (2 * H), 2, H, BB]), [0, 2, 3, 1])
    u, v = tl.split(y)
    y = tl.permute(tl.join(u + v, u - v), [0, 3, 1, 2])
    return tl.reshape(y, [P, BB])


@triton.jit
def _act_quant_kernel(x_ptr, smooth_ptr, signs_ptr, hp_ptr, codes_ptr, steps_ptr, offsets_ptr,
                      stride_x, stride_c, ROW, BASE, norm, qmax,
                      HAS_SMOOTH: tl.constexpr, HAS_SIGNS: tl.constexpr, STAGES: tl.constexpr,
                      P: tl.constexpr, BB: tl.constexpr, ZERO_POINT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, P)[:, None]
    a = tl.arange(0, BB)[None, :]
    col = a * ROW + b
    mask = (b < ROW) & (a < BASE)
    x = tl.load(x_ptr + row * stride_x + col, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = x / tl.load(smooth_ptr + col, mask=mask, other=1.0)
    if HAS_SIGNS:
        x = x * tl.load(signs_ptr + col, mask=mask, other=0).to(tl.float32)
        for s in tl.static_range(STAGES):
            x = _butterfly(x, P, BB, 1 << s)
        if BB > 1:
            i = tl.arange(0, BB)
            hp = tl.load(hp_ptr + i[:, None] * BB + i[None, :])
            x = tl.dot(x, hp, input_precision="ieee")
        x = x * norm
    if ZERO_POINT:      # qmax = 2^(b-1) - 1: the grid has 2·qmax + 1 steps; padding (0) is inside [lo, hi]
        lo = tl.minimum(tl.min(tl.min(x, axis=1), axis=0), 0.0)
        hi = tl.maximum(tl.max(tl.max(x, axis=1), axis=0), 0.0)
        step = (hi - lo) / (2 * qmax + 1)
        safe = tl.where(step > 0, step, 1.0)
        zero = ((-lo / safe + _RNE) - _RNE)
        zero = tl.minimum(tl.maximum(zero, 0.0), 2 * qmax + 1)
        q = ((x / safe + _RNE) - _RNE) + zero
        q = tl.minimum(tl.maximum(q, 0.0), 2 * qmax + 1) - (qmax + 1)
        tl.store(offsets_ptr + row, (zero - (qmax + 1)) * step)
    else:
        step = tl.max(tl.max(tl.abs(x), axis=1), axis=0) / qmax
        safe = tl.where(step > 0, step, 1.0)
        q = (x / safe + _RNE) - _RNE
        q = tl.minimum(tl.maximum(q, -qmax), qmax)
    tl.store(codes_ptr + row * stride_c + col, q.to(tl.int8), mask=mask)
    tl.store(steps_ptr + row, step)


def _rotation_layout(k: int, hadamard: bool) -> dict:
    """Tile geometry: ROW (stride of the base index), BASE, STAGES (butterflies), P x BB (padded tile)."""
    if not hadamard:
        return {"ROW": k, "BASE": 1, "STAGES": 0, "P": triton.next_power_of_2(k), "BB": 1}
    plan = hadamard_plan(k)
    if plan.base == 1:
        return {"ROW": k, "BASE": 1, "STAGES": k.bit_length() - 1, "P": k, "BB": 1}
    return {"ROW": plan.pow2, "BASE": plan.base, "STAGES": plan.pow2.bit_length() - 1,
            "P": max(_DOT_MIN, plan.pow2), "BB": max(_DOT_MIN, triton.next_power_of_2(plan.base))}


def act_warps(tile: int) -> int:
    """Warps for one row's tile of `tile` elements. Rows past 8192 elements take 32: compiled for sm_90, the
    FLUX widths 12288 and 15360 (a 256 x 64 tile: base 60) then keep to registers with Triton 3.9 and spill
    least with 3.6 (976 B per thread at 32 warps, 2024 B at 16; tools/aot_kernels.py)."""
    return 4 if tile <= 4096 else 8 if tile <= 8192 else 32


@lru_cache(maxsize=64)
def _padded_base(base: int, bb: int, device: torch.device) -> torch.Tensor:
    """H_base zero-padded to [bb, bb] fp32 on `device`: built and copied there once, not on every call."""
    hp = torch.zeros(bb, bb, dtype=torch.float32)
    hp[:base, :base] = _base_matrix(base)
    return hp.to(device)


def quantize_act_triton(x: torch.Tensor, smooth: torch.Tensor | None, signs: torch.Tensor | None,
                        rotation: torch.Tensor | None, bits: int, zero_point: bool = False) -> tuple:
    """Same contract as reference.quantize_act: int8 codes [..., K] and fp32 steps [...]; with `zero_point`,
    reference.quantize_act_zp's: (codes, steps, offsets)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"integer activation codes hold 2..8 bits, got {bits}")
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if rotation is not None:       # a dense rotation is a GEMM: cuBLAS, fp32, then quantize the result
        x2 = (x2.float() if smooth is None else x2.float() / smooth.float()) @ rotation.float()
        smooth = None
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    m = x2.shape[0]
    codes = torch.empty(m, k, dtype=torch.int8, device=x.device)
    steps = torch.empty(m, dtype=torch.float32, device=x.device)
    offsets = torch.empty(m if zero_point else 0, dtype=torch.float32, device=x.device)
    geo = _rotation_layout(k, signs is not None)
    hp = _padded_base(geo["BASE"], geo["BB"], x.device) if geo["BB"] > 1 else x2    # x2: an unused pointer
    if smooth is not None:       # fp32 once per layer, not a cast kernel per call
        smooth = derived(smooth, (smooth,), "smooth_fp32", smooth.float)
    if m:
        tile = geo["P"] * geo["BB"]
        _act_quant_kernel[(m,)](
            x2, smooth if smooth is not None else x2, signs if signs is not None else x2, hp, codes, steps,
            offsets if zero_point else steps,
            x2.stride(0), codes.stride(0), geo["ROW"], geo["BASE"], 1.0 / math.sqrt(k), float((1 << (bits - 1)) - 1),
            HAS_SMOOTH=smooth is not None, HAS_SIGNS=signs is not None, STAGES=geo["STAGES"], P=geo["P"],
            BB=geo["BB"], ZERO_POINT=zero_point, num_warps=act_warps(tile))
    if zero_point:
        return codes.view(*lead, k), steps.view(lead), offsets.view(lead)
    return codes.view(*lead, k), steps.view(lead)
