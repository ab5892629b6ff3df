"""Published peers run here for comparison: bitsandbytes NF4 (weight-only, as diffusers' `load_in_4bit`),
optimum-quanto W4A8 (`apply_quanto_w4a8`) and SD.Next's sdnq (`apply_sdnq`).

`bitsandbytes.nn.Linear4bit` runs on this CPU with compute_dtype=float32 and gives bitsandbytes' own NF4
numerics (its forward equals x @ dequantize_4bit(W).T + b exactly), so the real module is used, not a
re-implementation: the peer is measured as users would get it.
"""
from __future__ import annotations

from typing import Iterable

import bitsandbytes as bnb
import torch
from torch import nn

from dicompress.nn.surgery import iter_linears, set_module


def nf4_linear(linear: nn.Linear, blocksize: int = 64, double_quant: bool = False) -> bnb.nn.Linear4bit:
    """`linear` as an NF4 Linear4bit (fp32 compute) on the same device; quantized on `.to(device)`."""
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4",
                          device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.detach().float().cpu(), requires_grad=False, quant_type="nf4",
                                 blocksize=blocksize, compress_statistics=double_quant)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().float().cpu(), requires_grad=False)
    return q.to(linear.weight.device)


def nf4_bytes(q: bnb.nn.Linear4bit) -> int:
    """Packed bytes of the weight: 4-bit codes + block absmax (+ the second-level absmax when nested)."""
    qs = q.weight.quant_state
    parts = [q.weight.data, qs.absmax]
    if qs.nested:
        parts += [qs.state2.absmax, qs.offset]
    return sum(t.numel() * t.element_size() for t in parts)


def apply_bnb_nf4(model: nn.Module, include: Iterable[str], keep: Iterable[str] = (), blocksize: int = 64,
                  double_quant: bool = False) -> dict:
    """Replace the matching nn.Linear modules of `model` by NF4 Linear4bit in place."""
    targets = list(iter_linears(model, include, keep))
    if not targets:
        raise ValueError(f"no nn.Linear matches include {list(include)} minus keep {list(keep)}")
    total = bf16 = 0
    for name, linear in targets:
        bf16 += linear.weight.numel() * 2
        q = nf4_linear(linear, blocksize, double_quant)
        set_module(model, name, q)
        total += nf4_bytes(q)
    return {"bytes": total, "bf16_bytes": bf16, "layers": len(targets)}


# ---------------------------------------------------------------------------------------------------------------
# optimum-quanto W4A8 and SD.Next's sdnq: the two other published post-training quantizers for diffusers DiTs.
# ---------------------------------------------------------------------------------------------------------------

def _storage_bytes(t: torch.Tensor) -> int:
    """Bytes actually held by `t`: tensor subclasses (quanto QTensor / PackedTensor) are opened to their
    inner plain tensors, so a 4-bit weight counts its packed uint8 codes, not its logical shape."""
    if t is None:
        return 0
    if type(t) is not torch.Tensor and type(t) is not nn.Parameter and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_storage_bytes(getattr(t, n)) for n in names)
    if isinstance(t, nn.Parameter) and type(t.data) is not torch.Tensor:
        return _storage_bytes(t.data)
    return t.numel() * t.element_size()


def calibration_runner(model_path, classes=range(10), seeds=(0, 1), steps: int = 16, batch_size: int = 100):
    """`calibrate(model)` running dicompress' calibration set (classes x seeds, `steps` sampler steps, the
    model's real FluxPipeline loop) through `model`; what activation peers are calibrated on."""
    from dicompress.zoo import load_conditioning
    from dicompress.zoo.sampler import sample

    cond = load_conditioning(model_path)
    pairs = [(c, s) for s in seeds for c in classes]       # same order as dicompress.calib.sources

    def calibrate(model):
        with torch.no_grad():
            for i in range(0, len(pairs), batch_size):
                chunk = pairs[i:i + batch_size]
                sample(model, cond, [c for c, _ in chunk], [s for _, s in chunk], steps=steps,
                       batch_size=len(chunk))
    return calibrate


def apply_quanto_w4a8(model: nn.Module, include: Iterable[str], keep: Iterable[str] = (), calibrate=None,
                      weights: str = "qint4", activations: str | None = "qint8") -> dict:
    """optimum-quanto W4A8 on the matching nn.Linear modules of `model`, in place.

    Layer selection: quanto's `quantize(include=, exclude=)` fnmatches *every* module name (and would also
    take LayerNorms matching the include patterns), so our include/keep selection is translated to the exact
    list of selected linear names (a literal fnmatch pattern matches only itself) -- the quantized modules
    are then exactly those of `iter_linears(model, include, keep)`, checked after quantization.

    Calibration (quanto's documented recipe): `quantize(...)`, then `with Calibration(): calibrate(model)`
    (absmax input/output scales per module, momentum 0.9 across forward calls, `streamline` drops output
    quantization where the consumer is not a quantized module), then `freeze(model)`.
    `calibrate(model)` must run the calibration set through the model, e.g. `calibration_runner(path)`.

    CPU / fp32: works as is, nothing adapted. qint4 weights are a WeightQBitsTensor (uint8-packed codes,
    group size 128 where in_features > 128 divides, else per output channel; float scale + float shift in
    the weight dtype); the AWQ/Marlin/TinyGemm kernels are CUDA-only and not selected on CPU, so the linear
    is `matmul(quantized input, dequantized weight)`: the input is a static per-tensor symmetric int8
    ActivationQBytesTensor (scale from calibration), i.e. exactly `round(x/s).clamp(-127,127)*s @ Wq^T + b`
    (verified against that fake-quant formula to 0.0), computed in fp32.

    `bytes`: real storage of the frozen weights (packed codes + scales + shifts), from the module tensors.
    """
    from optimum.quanto import Calibration, QModuleMixin, freeze, quantize

    targets = list(iter_linears(model, include, keep))
    if not targets:
        raise ValueError(f"no nn.Linear matches include {list(include)} minus keep {list(keep)}")
    names = [n for n, _ in targets]
    bf16 = sum(lin.weight.numel() * 2 for _, lin in targets)
    quantize(model, weights=weights, activations=activations, include=names)
    got = [n for n, m in model.named_modules() if isinstance(m, QModuleMixin)]
    if sorted(got) != sorted(names):
        raise RuntimeError(f"quanto quantized {len(got)} modules, expected the {len(names)} selected linears")
    if activations is not None:
        if calibrate is None:
            raise ValueError("activation quantization needs `calibrate(model)` (e.g. calibration_runner(path))")
        with Calibration():
            calibrate(model)
    freeze(model)
    total = sum(_storage_bytes(model.get_submodule(n).weight) for n in names)
    return {"bytes": total, "bf16_bytes": bf16, "layers": len(names)}


# W4 default, chosen on zoo:tiny-flux-digits (sample PSNR vs the fp32 teacher, 10 classes x 3 seeds, 16 steps;
# bytes of the quantized linears / bf16): int4 auto group (=64) 38.13 dB @0.281 (bnb-NF4-b64 bytes) | group 32
# 38.34 @0.313 | group 16 39.21 @0.375 | uint4+codebook 38.62 @0.427 | +SVD r8 g32 38.04 @0.495 | +Hadamard g32
# 35.80 @0.313 | uint4+Hadamard 36.71 @0.313 | float4_e2m1fn 33.25 @0.281 (12-sample run). Smaller groups buy
# PSNR only with bytes; Hadamard, SVD and fp4 do not help here, so sdnq's own int4 default is kept.
SDNQ_W4_DEFAULT = {"weights_dtype": "int4", "group_size": 0, "use_hadamard": False, "use_svd": False}


def _sdnq_dtype(bits: int, options: dict) -> str:
    if "weights_dtype" in options:
        return options.pop("weights_dtype")
    return "int8" if bits == 8 else f"int{bits}"


def apply_sdnq(model: nn.Module, include: Iterable[str], keep: Iterable[str] = (), w_bits: int = 4,
               a_bits: int | None = None, **options) -> dict:
    """SD.Next's sdnq quantization of the matching nn.Linear modules of `model`, in place.

    Each selected linear goes through `sdnq.sdnq_quantize_layer` with an `SDNQConfig` (so sdnq's own
    quantizer, packing and SDNQLinear forward are used); sdnq's size floors (`minimum_allowed_numel`,
    `minimum_allowed_channel_size`) and model-specific skip keys are switched off so exactly our selection is
    quantized. `options` are SDNQConfig fields (weights_dtype, group_size, use_hadamard, hadamard_group_size,
    use_svd, svd_rank, use_codebook, scale_dtype ...); w_bits picks `int{w_bits}` unless weights_dtype is given.
    W4 defaults: SDNQ_W4_DEFAULT (chosen on zoo:tiny-flux-digits, see the tools/peers.py notes).

    a_bits=8: sdnq's quantized matmul (`use_quantized_matmul=True`, int8): activations are quantized
    dynamically per token (symmetric int8) and multiplied with the int8 (re-quantized per row when grouped)
    weight by `torch._int_mm`, which runs on CPU. Layers sdnq refuses for it (a dim < 32 or not a multiple
    of 16) stay on the dequantized-weight path: `a8_layers` counts the ones set up for int8. sdnq also falls
    back to the dequantized weight at run time for inputs of fewer than 32 rows (tokens x batch).

    torch.compile: sdnq compiles its dequantizers by default; here SDNQ_USE_TORCH_COMPILE defaults to 0 (set
    before sdnq is first imported; numerics are the same, eager avoids Inductor compiles on this CPU).

    `bytes`: every sdnq tensor of the quantized linears but the bias (packed codes, scales, zero points,
    SVD factors), measured from the modules.
    """
    import os
    os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")
    from sdnq import SDNQConfig, sdnq_quantize_layer

    if a_bits not in (None, 8):
        raise NotImplementedError(f"sdnq quantized matmul is int8 / fp8 / fp16 only; a_bits={a_bits} unsupported")
    targets = list(iter_linears(model, include, keep))
    if not targets:
        raise ValueError(f"no nn.Linear matches include {list(include)} minus keep {list(keep)}")
    opts = dict(SDNQ_W4_DEFAULT) if w_bits == 4 else {}
    opts.update(options)
    dtype = _sdnq_dtype(w_bits, opts)
    if a_bits == 8:
        opts.update(use_quantized_matmul=True, quantized_matmul_dtype="int8")
    total = bf16 = a8 = 0
    for name, linear in targets:
        bf16 += linear.weight.numel() * 2
        cfg = SDNQConfig(weights_dtype=dtype, minimum_allowed_numel=0, minimum_allowed_channel_size=0,
                         add_skip_keys=False, **opts)
        q, _ = sdnq_quantize_layer(linear, cfg, param_name=name + ".weight")
        if not hasattr(q, "sdnq_dequantizer"):
            raise RuntimeError(f"sdnq left {name} unquantized")
        set_module(model, name, q)
        a8 += bool(q.sdnq_dequantizer.use_quantized_matmul)
        total += sum(_storage_bytes(p) for n, p in q.named_parameters(recurse=False) if n != "bias")
        total += sum(_storage_bytes(b) for b in q.buffers(recurse=False))
    out = {"bytes": total, "bf16_bytes": bf16, "layers": len(targets), "weights_dtype": dtype,
           "options": {k: v for k, v in opts.items()}}
    if a_bits == 8:
        out["a8_layers"] = a8
    return out
