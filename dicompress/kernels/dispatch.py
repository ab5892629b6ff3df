"""Which implementation a kernel op runs, and which weight path the quantized GEMM takes.

    DICOMPRESS_KERNELS   auto (default): Triton on CUDA tensors of an Ampere or newer GPU, the pure-torch
                         reference elsewhere (older GPUs too: compiled for sm_75 the int8 GEMM fails), except
                         the int8 modes on CPU, which run torch._int_mm (int8_mm.py)
                         reference: the reference everywhere (debugging, bit-exact comparisons)
    DICOMPRESS_GEMM_MODE decode (default): the stored levels exactly (fp16 tensor cores on CUDA)
                         int8: levels mapped per row onto an int8 grid, int8 tensor cores with int32
                         accumulation on CUDA (slightly lossy, see tables.int8_grid)
                         int8_unpacked: int8's values; on CUDA each layer's codes are decoded once into an
                         int8 weight matrix kept on the GPU (1 byte per weight more memory), which the GEMM
                         reads with no table, as a plain W8A8 GEMM (the speed-for-memory option)

Both are read at call time, so they can be changed without re-importing; `gemm_mode(...)` overrides the
mode for a block of code (process-wide; torch.compile guards on it and recompiles for a new mode).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache

import torch

BACKENDS = ("auto", "reference")
MODES = ("decode", "int8", "int8_unpacked")
INT8_MODES = ("int8", "int8_unpacked")      # modes computing with the int8-mapped levels
# gemm_mode's override: a plain process-wide global, not a ContextVar, because torch.compile traces a global
# read (and guards on its value: a new mode recompiles) but breaks the graph at ContextVar.get, once per linear
_mode_override: list[str | None] = [None]


def _choice(var: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(var, allowed[0]).strip().lower() or allowed[0]
    if value not in allowed:
        raise ValueError(f"{var}={value!r} is not one of {allowed}; unset it or pick one of those")
    return value


def check_settings() -> None:
    """Both variables' values (ValueError naming the variable when one is unknown): a run checks them first,
    so a typo fails before the compression work rather than when the first quantized linear runs."""
    _choice("DICOMPRESS_KERNELS", BACKENDS)
    _choice("DICOMPRESS_GEMM_MODE", MODES)


def force_reference() -> bool:
    return _choice("DICOMPRESS_KERNELS", BACKENDS) == "reference"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"GEMM mode {mode!r} is not one of {MODES}")
    return mode


def current_mode() -> str:
    override = _mode_override[0]
    return override if override is not None else _choice("DICOMPRESS_GEMM_MODE", MODES)


@contextmanager
def gemm_mode(mode: str):
    """Run the quantized linears inside the block with `mode` (one of MODES); process-wide while the block
    runs (threads share it)."""
    before, _mode_override[0] = _mode_override[0], check_mode(mode)
    try:
        yield
    finally:
        _mode_override[0] = before


MIN_CAPABILITY = (8, 0)       # Triton's kernels need Ampere or newer (compiled for sm_75, the int8 GEMM fails)


@lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def capability(device) -> tuple[int, int]:
    """Compute capability of a CUDA device; (9, 0) for anything else (the interpreter on the CPU)."""
    if getattr(device, "type", None) != "cuda":
        return (9, 0)
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def triton_supported(device) -> bool:
    """Whether the Triton kernels run on `device` (a CUDA GPU of compute capability 8.0 or newer); older GPUs
    get the reference."""
    return getattr(device, "type", None) == "cuda" and capability(device) >= MIN_CAPABILITY


@lru_cache(maxsize=1)
def has_triton() -> bool:
    """Triton is optional: without it every op runs its reference implementation."""
    try:
        import triton  # noqa: F401  (optional dependency: this import is the probe)
    except ImportError:
        return False
    return True


def describe() -> str:
    """Which implementation the quantized linears run on this machine, and why (`dicompress kernels`)."""
    force_reference()                         # both settings checked first: a bad value is the answer
    lines = [f"torch {torch.__version__}; triton {_triton_version() or 'not installed'}",
             f"DICOMPRESS_KERNELS={os.environ.get('DICOMPRESS_KERNELS', 'auto')} "
             f"DICOMPRESS_GEMM_MODE={os.environ.get('DICOMPRESS_GEMM_MODE', 'decode')} (mode now: {current_mode()})",
             "cpu: pure-torch reference (DICOMPRESS_KERNELS=reference)" if force_reference() else
             "cpu: mode decode: the pure-torch reference (decode the weight, then matmul in the input's dtype); "
             "int8 modes on 8-bit activation codes: torch._int_mm on the unpacked int8 weight (the reference "
             "for group-scaled layers)"]
    if not torch.cuda.is_available():
        lines.append("cuda: no device visible")
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        dev = torch.device("cuda", i)
        cap = capability(dev)
        if force_reference():
            why = "reference (DICOMPRESS_KERNELS=reference)"
        elif not has_triton():
            why = "reference (triton is not installed)"
        elif not triton_supported(dev):
            why = f"reference (compute capability {cap[0]}.{cap[1]} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]})"
        else:
            why = "Triton kernels: fused activation quantization + quantized GEMM"
        lines.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}): {why}")
    if not torch.cuda.is_available() and not force_reference() and current_mode() == "decode":
        lines.append("hint: on this CPU, DICOMPRESS_GEMM_MODE=int8 runs the linears of models with 8-bit activation "
                     "codes (W4A8) on an int8 GEMM: 7x mode decode's reference per layer, 5x on FLUX-width blocks, "
                     "at equal measured quality (README, Kernels: On CPU)")
    return "\n".join(lines)


def _triton_version() -> str | None:
    if not has_triton():
        return None
    import triton  # optional and heavy: only once has_triton() has found it
    return triton.__version__
