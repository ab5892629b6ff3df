"""Which implementation a kernel op runs, and which weight path the quantized GEMM takes.

    DICOMPRESS_KERNELS   auto (default): Triton on CUDA tensors of an Ampere or newer GPU, the pure-torch
                         reference elsewhere (older GPUs too: compiled for sm_75 the int8 GEMM fails), except
                         the int8 modes on CPU, which run torch._int_mm (int8_mm.py)
                         reference: the reference everywhere (debugging, bit-exact comparisons)
    DICOMPRESS_GEMM_MODE auto (default): decode on CUDA (and any other non-CPU device) and with
                         DICOMPRESS_KERNELS=reference; on CPU int8 only where the int8 GEMM is faster than
                         the fp32 matmul (resolve_cpu_mode: the CPU capability, then a one-off probe)
                         decode: the stored levels exactly (fp16 tensor cores on CUDA)
                         int8: levels mapped per row onto an int8 grid, int8 tensor cores with int32
                         accumulation on CUDA (slightly lossy, see tables.int8_grid)
                         int8_unpacked: int8's values; on CUDA each layer's codes are decoded once into an
                         int8 weight matrix kept on the GPU (1 byte per weight more memory), which the GEMM
                         reads with no table, as a plain W8A8 GEMM (the speed-for-memory option)

Why auto is not simply int8 on CPU: torch._int_mm is fast only where the CPU has int8 dot instructions. On
AVX-512 VNNI (the CPU of bench/cpu.md) it is 5-9x an fp32 matmul at FLUX shapes; on an AVX2-only AMD
EPYC it is 29x slower (256x3072 @ 3072x3072, one thread, median: 1.95 s with the weight laid out as
int8_mm.py passes it, 8.75 s with a contiguous [K, N] weight, vs 0.067 s fp32). x86 CPUs below AVX-512
therefore get decode without a probe; every other CPU times both GEMMs once on a small shape (PROBE_SHAPE, a few ms,
cached per process and thread count) and takes int8 when it is at least MIN_INT8_SPEEDUP faster.

Both variables are read at call time, so they can be changed without re-importing; `gemm_mode(...)`
overrides the setting for a block of code (process-wide; torch.compile guards on it and recompiles for a new
mode). current_mode(device) resolves auto, so the ops never receive it.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from functools import lru_cache

import torch

from ..compile_hints import assume_constant_result

BACKENDS = ("auto", "reference")
MODES = ("decode", "int8", "int8_unpacked")  # what the ops compute with (never "auto")
SETTINGS = ("auto", *MODES)                  # what DICOMPRESS_GEMM_MODE and gemm_mode accept
INT8_MODES = ("int8", "int8_unpacked")      # modes computing with the int8-mapped levels
# gemm_mode's override: a plain process-wide global, not a ContextVar, because torch.compile traces a global
# read (and guards on its value: a new mode recompiles) but breaks the graph at ContextVar.get, once per linear
_mode_override: list[str | None] = [None]

# x86 dispatch levels below AVX-512 (torch.backends.cpu.get_cpu_capability, which names no VNNI / AMX level:
# those come from torch.cpu's feature queries): torch._int_mm measured 29x slower than the fp32 matmul on
# AVX2, so these skip the probe
SLOW_INT8_CAPABILITIES = ("DEFAULT", "NO AVX", "AVX2")
PROBE_SHAPE = (128, 512, 512)               # M, K, N: ~1 ms of fp32 matmul, large enough for the GEMM kernels
MIN_INT8_SPEEDUP = 1.25                     # margin over probe noise; measured cases: 5-9x (VNNI), <0.05x (AVX2)
PROBE_REPEATS = 5


def _choice(var: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(var, allowed[0]).strip().lower() or allowed[0]
    if value not in allowed:
        raise ValueError(f"{var}={value!r} is not one of {allowed}; unset it or pick one of those")
    return value


def check_settings() -> None:
    """Both variables' values (ValueError naming the variable when one is unknown): a run checks them first,
    so a typo fails before the compression work rather than when the first quantized linear runs."""
    _choice("DICOMPRESS_KERNELS", BACKENDS)
    _choice("DICOMPRESS_GEMM_MODE", SETTINGS)


def force_reference() -> bool:
    return _choice("DICOMPRESS_KERNELS", BACKENDS) == "reference"


def check_mode(mode: str) -> str:
    """A concrete mode, as the ops take it: "auto" is resolved by current_mode before it reaches them."""
    if mode not in MODES:
        raise ValueError(f"GEMM mode {mode!r} is not one of {MODES}"
                         + ("; resolve it with current_mode(device)" if mode == "auto" else ""))
    return mode


def mode_setting() -> str:
    """The mode asked for (gemm_mode's override, else DICOMPRESS_GEMM_MODE): one of SETTINGS, maybe "auto"."""
    override = _mode_override[0]
    return override if override is not None else _choice("DICOMPRESS_GEMM_MODE", SETTINGS)


def current_mode(device="cpu", int8_gemm: bool = True) -> str:
    """The concrete GEMM mode (one of MODES) a quantized linear on `device` runs now: the setting, with "auto"
    resolved. `int8_gemm` says whether the call is one the CPU int8 GEMM computes (8-bit activation codes,
    per-channel scales, no gradient: int8_mm.applies); auto gives the others decode, because on CPU the int8
    mapping only buys speed through torch._int_mm (elsewhere it is the lossy reference)."""
    mode = mode_setting()
    return _auto_mode(getattr(device, "type", device), int8_gemm) if mode == "auto" else mode


def _auto_mode(device_type: str, int8_gemm: bool) -> str:
    # CUDA keeps decode until the GPU benchmark says otherwise; the reference has no fast int8 path
    if device_type != "cpu" or not int8_gemm or force_reference():
        return "decode"
    return _cpu_auto_mode()


@assume_constant_result   # not torch.compiler's: that imports torch._dynamo when this module loads
def _cpu_auto_mode() -> str:
    # torch.compile calls this at trace time and keeps the string: the probe never enters a graph (a graph
    # compiled before a change of thread count keeps the earlier choice)
    return resolve_cpu_mode()[0]


def resolve_cpu_mode() -> tuple[str, str]:
    """(mode, why) that auto picks on this CPU at the current thread count: "int8" where torch._int_mm beats
    the fp32 matmul, else "decode". Cached per process and thread count (threads change the ratio: the two
    GEMMs need not scale alike)."""
    return _resolve_cpu_mode(torch.get_num_threads())


@lru_cache(maxsize=8)
def _resolve_cpu_mode(threads: int) -> tuple[str, str]:
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in SLOW_INT8_CAPABILITIES:
        return "decode", (f"cpu capability {cap}: below AVX-512 torch._int_mm has no fast kernel (29x slower "
                          "than the fp32 matmul on an AVX2 EPYC, README: Kernels), so no probe")
    where = f"cpu capability {cap}{_int8_features()}"
    try:
        speedup = probe_int8_speedup()
    except RuntimeError as e:               # an int8 GEMM this build of torch lacks is a slow one
        return "decode", f"{where}; the int8 GEMM probe failed ({e}): decode"
    m, k, n = PROBE_SHAPE
    verdict = "int8" if speedup >= MIN_INT8_SPEEDUP else "decode"
    return verdict, (f"{where}; probe {m}x{k}x{n} at {threads} thread(s): torch._int_mm {speedup:.2f}x the fp32 "
                     f"matmul ({'>=' if verdict == 'int8' else '<'} {MIN_INT8_SPEEDUP}x): {verdict}")


def _int8_features() -> str:
    """" (VNNI yes, AMX no)" where this torch can tell (torch.cpu's private feature queries)."""
    flags = [(name, getattr(torch.cpu, fn, None)) for name, fn in
             (("VNNI", "_is_vnni_supported"), ("AMX", "_is_amx_tile_supported"))]
    known = [f"{name} {'yes' if fn() else 'no'}" for name, fn in flags if fn is not None]
    return f" ({', '.join(known)})" if known else ""


def probe_int8_speedup() -> float:
    """fp32 matmul time / torch._int_mm time on PROBE_SHAPE, with the weight laid out as int8_mm.py passes it
    (> 1: the int8 GEMM is faster). Best of PROBE_REPEATS each; stops early when one int8 call already takes
    several fp32 calls' time (the slow case needs no precision, and would cost the most)."""
    m, k, n = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    a8 = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    af, wf = a8.float(), w8.float()
    fp32 = _best_ms(lambda: af @ wf.t(), PROBE_REPEATS)
    first = _best_ms(lambda: torch._int_mm(a8, w8.t()), 1)
    if first > 4 * fp32:
        return fp32 / first
    return fp32 / min(first, _best_ms(lambda: torch._int_mm(a8, w8.t()), PROBE_REPEATS - 1))


def _best_ms(fn, repeats: int) -> float:
    fn()                                    # warm-up: first-call allocation and kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return min(times)                       # the best is the machine's speed; slower calls are the shared CPU


@contextmanager
def gemm_mode(mode: str):
    """Run the quantized linears inside the block with `mode` (one of SETTINGS; "auto" resolves per device);
    process-wide while the block runs (threads share it)."""
    if mode not in SETTINGS:
        raise ValueError(f"GEMM mode {mode!r} is not one of {SETTINGS}")
    before, _mode_override[0] = _mode_override[0], mode
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
    mode_setting()
    cuda = torch.cuda.is_available()
    now = f"{current_mode('cpu')} on CPU" + (f", {current_mode('cuda')} on CUDA" if cuda else "")
    lines = [f"torch {torch.__version__}; triton {_triton_version() or 'not installed'}",
             f"DICOMPRESS_KERNELS={os.environ.get('DICOMPRESS_KERNELS', 'auto')} "
             f"DICOMPRESS_GEMM_MODE={os.environ.get('DICOMPRESS_GEMM_MODE', 'auto')} (mode now: {now})",
             *_cpu_lines()]
    if not cuda:
        lines.append("cuda: no device visible")
    lines += [_gpu_line(i) for i in range(torch.cuda.device_count() if cuda else 0)]
    hint = None if cuda or force_reference() else _cpu_hint()
    return "\n".join(lines + ([hint] if hint else []))


def _cpu_lines() -> list[str]:
    if force_reference():
        return ["cpu: pure-torch reference (DICOMPRESS_KERNELS=reference)"]
    mode, why = resolve_cpu_mode()
    return ["cpu: mode decode: the pure-torch reference (decode the weight, then matmul in the input's dtype); "
            "int8 modes on 8-bit activation codes: torch._int_mm on the unpacked int8 weight (the reference "
            "for group-scaled layers)",
            f"cpu: auto picks {mode}: {why}"]


def _cpu_hint() -> str | None:
    """Advice only where it changes something: int8 where auto found it faster but decode is forced, and a
    warning where int8 is forced on a CPU whose int8 GEMM is the slower one."""
    auto, now = resolve_cpu_mode()[0], current_mode("cpu")
    if auto == "int8" and now == "decode":
        return ("hint: on this CPU, DICOMPRESS_GEMM_MODE=int8 (or auto, the default) runs the linears of models "
                "with 8-bit activation codes (W4A8) on the int8 GEMM, faster here (above) at equal measured "
                "quality (README, Kernels: On CPU)")
    if auto == "decode" and now in INT8_MODES:
        return (f"warning: DICOMPRESS_GEMM_MODE={now} on this CPU runs torch._int_mm, slower than decode here "
                "(above); unset it to let auto pick")
    return None


def _gpu_line(i: int) -> str:
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
    return f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}): {why}"


def _triton_version() -> str | None:
    if not has_triton():
        return None
    import triton  # optional and heavy: only once has_triton() has found it
    return triton.__version__
