"""The kernel ops as torch.library custom ops: one schema each, the pure-torch reference as the default
implementation (any device without a kernel), Triton for CUDA (the reference there too when Triton is not
installed, on GPUs older than Ampere, or with DICOMPRESS_KERNELS=reference), on CPU torch._int_mm for
qlinear in the int8 modes (int8_mm.py; the reference otherwise, and with DICOMPRESS_KERNELS=reference) and
the reference quantize_act in cache-sized row blocks, and fake implementations (shapes and dtypes only) so
torch.compile traces through them.

    dicompress::quantize_act(x [..., K], smooth?, signs?, rotation?, bits) -> (codes int8 [..., K], steps fp32 [...])
    dicompress::quantize_act_zp(x, smooth?, signs?, rotation?, bits) -> (codes, steps, offsets fp32 [...]):
        asymmetric (zero-point) codes, centred to int8; x_hat = codes · step - offset (quant/activation.py)
    dicompress::qlinear(x, x_scale?, qweight, scales, aux, eta?, bias?, codec, bits, group_size, mode, out_dtype)
        -> y [..., N]:  x int8 codes with x_scale [...] (A8), or float x with x_scale None (A16);
        scales, aux, eta = the buffers the codec names in its kernel_args (quant/codecs.py; e.g. TLQ's
        scales, grid and eta), its decode table built from them; group_size 0 = per output channel.
No autograd formula is registered: they are inference kernels (nn/ callers fall back to the differentiable
torch composition when a gradient is needed).
"""

import torch
from torch import Tensor

from . import int8_mm, reference
from .dispatch import check_mode, force_reference, has_triton, triton_supported


@torch.library.custom_op("dicompress::quantize_act", mutates_args=())
def quantize_act(x: Tensor, smooth: Tensor | None, signs: Tensor | None, rotation: Tensor | None,
                 bits: int) -> tuple[Tensor, Tensor]:
    return reference.quantize_act(x, smooth, signs, rotation, bits)


@quantize_act.register_fake
def _(x, smooth, signs, rotation, bits):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("dicompress::quantize_act_zp", mutates_args=())
def quantize_act_zp(x: Tensor, smooth: Tensor | None, signs: Tensor | None, rotation: Tensor | None,
                    bits: int) -> tuple[Tensor, Tensor, Tensor]:
    return reference.quantize_act_zp(x, smooth, signs, rotation, bits)


@quantize_act_zp.register_fake
def _(x, smooth, signs, rotation, bits):
    lead = x.shape[:-1]
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(lead, dtype=torch.float32),
            x.new_empty(lead, dtype=torch.float32))


@torch.library.custom_op("dicompress::qlinear", mutates_args=())
def qlinear(x: Tensor, x_scale: Tensor | None, qweight: Tensor, scales: Tensor, aux: Tensor,
            eta: Tensor | None, bias: Tensor | None, codec: str, bits: int, group_size: int, mode: str,
            out_dtype: torch.dtype) -> Tensor:
    return reference.qlinear(x, x_scale, qweight, scales, aux, eta, bias, codec, bits, group_size,
                             check_mode(mode), out_dtype)


@qlinear.register_fake
def _(x, x_scale, qweight, scales, aux, eta, bias, codec, bits, group_size, mode, out_dtype):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]), dtype=out_dtype)


CPU_BLOCK_BYTES = 2 << 20


def _in_row_blocks(quantize, x, smooth, signs, rotation, bits) -> tuple:
    """`quantize` (a reference activation quantizer) in row blocks that stay in cache through the transform's
    and the quantizer's passes (tools/bench_cpu.py: rows act_prep vs act_prep_whole). Every op is per row, so
    the blocks give the reference's bits; a dense rotation is a matmul, whose kernel may depend on the row
    count, so it runs whole."""
    k = x.shape[-1]
    step = max(1, CPU_BLOCK_BYTES // max(1, k * x.element_size()))
    if rotation is not None or x.dim() < 2 or x.numel() <= step * k:
        return quantize(x, smooth, signs, rotation, bits)
    parts = [quantize(rows, smooth, signs, None, bits) for rows in x.reshape(-1, k).split(step)]
    codes, *per_token = zip(*parts)
    return (torch.cat(codes).view(x.shape), *(torch.cat(t).view(x.shape[:-1]) for t in per_token))


@quantize_act.register_kernel("cpu")
def quantize_act_cpu(x, smooth, signs, rotation, bits):
    return _in_row_blocks(reference.quantize_act, x, smooth, signs, rotation, bits)


@quantize_act_zp.register_kernel("cpu")
def quantize_act_zp_cpu(x, smooth, signs, rotation, bits):
    return _in_row_blocks(reference.quantize_act_zp, x, smooth, signs, rotation, bits)


@quantize_act.register_kernel("cuda")
def quantize_act_cuda(x, smooth, signs, rotation, bits):
    if force_reference() or not has_triton() or not triton_supported(x.device):
        return reference.quantize_act(x, smooth, signs, rotation, bits)
    from .triton_act import quantize_act_triton  # lazy: imports triton (optional, heavy), on CUDA only
    return quantize_act_triton(x, smooth, signs, rotation, bits)


@quantize_act_zp.register_kernel("cuda")
def quantize_act_zp_cuda(x, smooth, signs, rotation, bits):
    if force_reference() or not has_triton() or not triton_supported(x.device):
        return reference.quantize_act_zp(x, smooth, signs, rotation, bits)
    from .triton_act import quantize_act_triton
    return quantize_act_triton(x, smooth, signs, rotation, bits, zero_point=True)


@qlinear.register_kernel("cpu")
def qlinear_cpu(x, x_scale, qweight, scales, aux, eta, bias, codec, bits, group_size, mode, out_dtype):
    args = (x, x_scale, qweight, scales, aux, eta, bias, codec, bits, group_size, check_mode(mode), out_dtype)
    if not force_reference() and int8_mm.applies(x, x_scale, group_size, mode):
        return int8_mm.qlinear_int_mm(*args)
    return reference.qlinear(*args)


@qlinear.register_kernel("cuda")
def qlinear_cuda(x, x_scale, qweight, scales, aux, eta, bias, codec, bits, group_size, mode, out_dtype):
    args = (x, x_scale, qweight, scales, aux, eta, bias, codec, bits, group_size, check_mode(mode), out_dtype)
    if force_reference() or not has_triton() or not triton_supported(x.device):
        return reference.qlinear(*args)
    from .triton_gemm import qlinear_triton  # lazy: imports triton (optional, heavy), on CUDA only
    return qlinear_triton(*args)
