"""Kernels for quantized linears: torch.library ops with a pure-torch reference (CPU, test oracle) and Triton
implementations for CUDA, picked per call from the tensors' device (see dispatch.py for the switches).

    quant_linear_forward(module, x)   what QuantLinear.forward runs
    act_forward(act, x)               what ActTransform.forward runs
    gemm_mode("int8")                 context manager: int8-mapped weights (path (b)) inside the block
                                      ("int8_unpacked": the same values, the weight unpacked once to int8)
    current_mode(device)              the concrete mode a quantized linear on `device` runs now (auto resolved)
    resolve_cpu_mode()                (mode, why) auto picks on this CPU: int8 only where the int8 GEMM is faster
    clear_cache()                     free the per-layer tensors the GPU path derived (tables, unpacked weights)
    int8_mapped_weight(...)           the fp32 weight path (b) computes with, to measure its cost
Triton is optional: without it every op runs its reference.
"""
from .cache import clear as clear_cache
from .dispatch import current_mode, force_reference, gemm_mode, has_triton, resolve_cpu_mode
from .linear import act_forward, quant_linear_forward
from .ops import qlinear, quantize_act
from .tables import int8_grid, int8_mapped_weight, signed_levels

__all__ = ["act_forward", "clear_cache", "current_mode", "force_reference", "gemm_mode", "has_triton", "int8_grid",
           "int8_mapped_weight", "qlinear", "quant_linear_forward", "quantize_act", "resolve_cpu_mode",
           "signed_levels"]
