"""The int8 GEMM modes without Triton: torch._int_mm (int8 x int8, int32 accumulation) on the layer's int8
weight, unpacked once and cached, with the per-token step, the row scale and the bias applied in fp32.

This is what CPU tensors run in the int8 modes with int8 activation codes (ops.qlinear's CPU kernel): the
same mapped levels as the reference, summed exactly in int32 where the reference sums fp32 products, so
the two differ by fp32 rounding (~1e-7 relative). Where the CPU has AVX-512 VNNI or AMX (one of this project's
machines), the int8 GEMM alone is 5-9x an fp32 matmul at FLUX shapes, and the whole W4A8 layer about 4-5x the
fp32 linear where the reference, decoding the weight on every call, is about 0.6x (tools/bench_cpu.py,
bench/cpu.md). On an AVX2-only CPU (another of them) torch._int_mm is ~30x *slower* than the fp32 matmul, so
GEMM mode `auto` (dispatch.resolve_cpu_mode) takes these modes only where the CPU can gain. Group scales
multiply partial sums inside K, which one int GEMM cannot: those layers keep the reference.
"""
from __future__ import annotations

from functools import partial

import torch

from .cache import derived
from .dispatch import INT8_MODES
from .tables import unpacked_weight


def unpacked_operands(qweight, scales, aux, eta, codec, bits, group_size, k):
    """(int8 weight [N, K], row scale [N] fp32, group scales [N, G] fp32 or None), built once per layer and
    kept while the layer's buffers are unchanged (kernels/cache.py); 1 byte per weight."""
    return derived(qweight, (qweight, scales, aux, eta), ("unpacked", codec, bits, group_size, k),
                   partial(unpacked_weight, qweight, scales, aux, eta, codec, bits, group_size, k))


def applies(x: torch.Tensor, x_scale, group_size: int, mode: str) -> bool:
    """Whether a qlinear call is one this path computes: int8 activation codes, an int8 mode, per-channel."""
    return x_scale is not None and x.dtype == torch.int8 and mode in INT8_MODES and not group_size


def int8_gemm_layers(model: torch.nn.Module) -> int:
    """How many of `model`'s quantized linears (modules with a weight `codec`: every registered codec has a
    kernel table) the int8 modes run as an int8 GEMM (8-bit or narrower activation codes, per-channel scales)."""
    from .linear import MAX_CODE_BITS           # here, not at the top: linear imports ops, which imports this
    return sum(1 for m in model.modules() if getattr(m, "codec", None) is not None and not m.group_size
               and getattr(getattr(m, "act", None), "act_bits", None) is not None and m.act.act_bits <= MAX_CODE_BITS)


def qlinear_int_mm(x, x_scale, qweight, scales, aux, eta, bias, codec, bits, group_size, mode, out_dtype):
    """Same contract as reference.qlinear, for the calls `applies` accepts."""
    k = x.shape[-1]
    w8, rscale, _ = unpacked_operands(qweight, scales, aux, eta, codec, bits, group_size, k)
    a = x.reshape(-1, k)
    acc = torch._int_mm(a, w8.t())                      # [M, N] int32, exact
    y = acc.float().mul_(x_scale.reshape(-1, 1)).mul_(rscale)
    if bias is not None:
        y.add_(bias.float())
    return y.to(out_dtype).view(*x.shape[:-1], w8.shape[0])
