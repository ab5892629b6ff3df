"""Triton grouped GEMM for a mixture-of-experts FFN: the rows of all experts in one launch per projection.

The (token, expert) assignments are sorted by expert (moe/grouped.py), so expert e owns sorted rows
starts[e] .. starts[e] + counts[e]. A work item is (expert, block of BLOCK_M of its rows) x (block of BLOCK_N
output columns): the grid's row axis has an upper bound of cdiv(T·k, BLOCK_M) + E items (each expert wastes
at most one partial block), each program finds its expert from the inclusive cumulative block counts
(`block_ends`, read on the device: no host synchronisation), and programs past the last item return at once.
Each program computes its tile from the expert's slice of one packed weight [E, N, K]:

    up:   h[r]          = GELU(x[token[r]] · W_up[e]ᵀ + b_up[e])    rows gathered from x, GELU fused
    down: y[slot[r]]    = gate[r] · (h[r] · W_down[e]ᵀ)             the gate fused, rows scattered back

The down kernel stores each row at its unsorted position (token · k + slot), so the k routed outputs of a token
are summed afterwards in one torch reduction (deterministic: no atomics). GELU: tanh (x · sigmoid(2u), the same
function as 0.5 x (1 + tanh u)) or exact erf. Accumulation is fp32 for every input dtype (fp32 dots in IEEE,
no TF32); bias, GELU and gate are applied to the fp32 accumulator and the result is rounded once to the
input's dtype.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ACTIVATIONS = {"none": 0, "tanh": 1, "erf": 2}     # 0: no activation (the down-projection)


@triton.jit
def _grouped_gemm_kernel(a_ptr, a_rows_ptr, w_ptr, bias_ptr, gate_ptr, out_ptr, out_rows_ptr,
                         block_ends_ptr, starts_ptr, counts_ptr,
                         N, K, n_experts, grid_m, stride_am, stride_we, stride_wn, stride_be, stride_om,
                         E_P: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr, HAS_BIAS: tl.constexpr,
                         ACT: tl.constexpr, HAS_GATE: tl.constexpr, IEEE: tl.constexpr, INTERP_BF16: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    # grouped launch order: GROUP_M row blocks (mostly one expert's) share each weight tile while it is in L2
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    # which expert owns row block pid_m: the number of experts whose blocks all come before it
    ex = tl.arange(0, E_P)
    ends = tl.load(block_ends_ptr + ex, mask=ex < n_experts, other=2147483647)
    e = tl.sum((ends <= pid_m).to(tl.int32), axis=0)
    if e >= n_experts:                                  # past the last work item (the grid is an upper bound)
        return
    count = tl.load(counts_ptr + e)
    local = pid_m - (tl.load(block_ends_ptr + e) - tl.cdiv(count, BLOCK_M))    # the block's index in expert e
    offs_m = local * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < count
    rows = tl.load(starts_ptr + e) + offs_m                                    # sorted row indices
    if GATHER:
        a_rows = tl.load(a_rows_ptr + rows, mask=m_ok, other=0)
    else:
        a_rows = rows
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    # 64-bit row offsets: T·k rows of K elements pass 2^31 at FLUX widths
    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + rn[:, None] * stride_wn + rk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (rk < K - k0)[None, :]
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok, other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok, other=0.0)
        if INTERP_BF16:                                      # see _interp_bf16
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        # accumulating inside the dot (not acc += dot) leaves the MMA in flight across iterations
        if IEEE or INTERP_BF16:
            acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e.to(tl.int64) * stride_be + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # GELU tanh: 0.5 x (1 + tanh u) = x · sigmoid(2u) with u = √(2/π) (x + 0.044715 x³); 2√(2/π) = 1.59576...
    if ACT == 1:
        acc = acc / (1.0 + tl.exp(-1.5957691216057308 * (acc + 0.044715 * acc * acc * acc)))
    elif ACT == 2:      # GELU erf: 0.5 x (1 + erf(x / √2))
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    if HAS_GATE:
        acc = acc * tl.load(gate_ptr + rows, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    if SCATTER:
        o_rows = tl.load(out_rows_ptr + rows, mask=m_ok, other=0)
    else:
        o_rows = rows
    out_ptrs = out_ptr + o_rows.to(tl.int64)[:, None] * stride_om + rn[None, :]
    if INTERP_BF16:     # round to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates
        bits = acc.to(tl.uint32, bitcast=True)
        acc = (bits + 0x7FFF + ((bits >> 16) & 1)).to(tl.float32, bitcast=True)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _interp_bf16(a: torch.Tensor) -> bool:
    """bf16 in Triton's interpreter (3.9), which multiplies bf16 tiles as their raw uint16 bits (np.matmul on
    the storage type) and truncates fp32 -> bf16 casts: there the operands are cast to fp32 first (the exact
    products and fp32 sums a GPU's bf16 MMA computes) and the result is rounded to nearest even by hand before
    the store's cast. Compiled kernels never take this branch."""
    return a.dtype == torch.bfloat16 and a.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


# What tools/bench_moe_gpu.py --sweep times for 16-bit inputs at the FLUX load (the first is tile()'s default);
# each compiles for sm_90 with no spills and both operands in the async-copy pipeline (tools/aot_moe_kernels.py)
TILE_CANDIDATES: list[dict] = [{}, {"num_stages": 4}, {"BLOCK_N": 256}, {"BLOCK_N": 256, "num_stages": 4},
                               {"BLOCK_K": 128, "num_stages": 2}, {"BLOCK_M": 64, "num_warps": 4}]


def tile(rows: int, n_experts: int, dtype: torch.dtype) -> dict:
    """A fixed tile per dtype and load (no autotuning: compile time counts on a lent GPU). 16-bit inputs take
    128 x 128 x 64 (a bf16 GEMM's usual tile: 96 KiB of shared memory at 3 stages) once the experts average more
    than 64 rows each, 64-row blocks below that (fewer padded rows); fp32 (IEEE dots on the FMA units) 64 x 64 x 32
    at 8 warps, which compiles without spills for sm_90 and sm_86 (4 warps spilled 16 B per thread on sm_90:
    tools/aot_moe_kernels.py)."""
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    bm = 128 if rows > 64 * n_experts else 64
    return {"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8 if bm == 128 else 4,
            "num_stages": 3}


def grouped_gemm(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, starts: torch.Tensor,
                 counts: torch.Tensor, rows: int, *, a_rows: torch.Tensor | None = None,
                 gate: torch.Tensor | None = None, out_rows: torch.Tensor | None = None, out_len: int | None = None,
                 activation: str = "none", blocks: dict | None = None) -> torch.Tensor:
    """out[o(r)] = act(a[i(r)] · weight[e(r)]ᵀ + bias[e(r)]) · gate[r] for the `rows` sorted rows r, expert e
    owning rows starts[e] .. starts[e] + counts[e]; i(r) = a_rows[r] (or r), o(r) = out_rows[r] (or r).

    a [*, K] (rows contiguous), weight [E, N, K] and bias [E, N] with unit stride along their last axis, starts and
    counts int32 [E] on a's device, gate [rows]; out [out_len or rows, N] in a's dtype (rows no item writes are
    left uninitialised). `blocks` overrides the tile (tests use small ones)."""
    n_experts, n, k = weight.shape
    if a.stride(-1) != 1 or weight.stride(-1) != 1 or (bias is not None and bias.stride(-1) != 1):
        raise ValueError("a, weight and bias need unit stride along their last axis")
    if a.shape[-1] != k or weight.dtype != a.dtype:
        raise ValueError(f"a {tuple(a.shape)} {a.dtype} does not match the weight {tuple(weight.shape)} {weight.dtype}")
    cfg = dict(tile(rows, n_experts, a.dtype), **(blocks or {}))
    bm = cfg["BLOCK_M"]
    out = torch.empty(out_len if out_len is not None else rows, n, dtype=a.dtype, device=a.device)
    if rows == 0 or n == 0:
        return out
    block_ends = torch.cumsum((counts + (bm - 1)) // bm, 0, dtype=torch.int32)
    grid_m = triton.cdiv(rows, bm) + n_experts           # sum over experts of cdiv(count, BLOCK_M) is at most this
    grid = (grid_m * triton.cdiv(n, cfg["BLOCK_N"]),)
    _grouped_gemm_kernel[grid](
        a, a_rows if a_rows is not None else starts, weight, bias if bias is not None else weight,
        gate if gate is not None else a, out, out_rows if out_rows is not None else starts,
        block_ends, starts, counts,
        n, k, n_experts, grid_m, a.stride(0), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0, out.stride(0),
        E_P=triton.next_power_of_2(max(n_experts, 2)), GATHER=a_rows is not None, SCATTER=out_rows is not None,
        HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation], HAS_GATE=gate is not None,
        IEEE=a.dtype == torch.float32, INTERP_BF16=_interp_bf16(a), **cfg)
    return out
