"""What QuantLinear.forward and ActTransform.forward run: the modules' buffers handed to the kernel ops.

    A8 (act_bits <= 8)  quantize_act -> int8 codes + per-token steps -> qlinear on the codes (fused path)
    asymmetric A8/A4    quantize_act_zp -> centred codes, steps, offsets -> qlinear on the codes, minus
                        offset ⊗ (row sums of the weight the GEMM used): one rank-1 update per call
    A16 / wider acts    the float transform (smooth, rotation, fake quantization) -> qlinear on floats
With autograd recording and any tensor the ops would take requiring grad (the input, the bias, a codec or
transform tensor a user made trainable), the differentiable torch composition runs instead (the same reference
math through the same codec, so the values are the same; activation rounding is straight-through there).
The layer's codec says which of its buffers the ops take (quant/codecs.py: Codec.kernel_args); a codec
that is not registered is an error, never a silent dequantize-then-matmul.

Linears that read one tensor through one transform (q/k/v, FLUX's single-block proj_mlp with q/k/v: ARS and
smoothing give an input group one transform) quantize it once: the last activation codes are kept with the
input's identity and version counter and a digest of the transform's values, and a sibling asking for the
same ones gets them back. Inference tensors (no version counter) and torch.compile tracing always recompute.
"""
from __future__ import annotations

import hashlib
import threading
import weakref

import torch

from ..quant.activation import quantize_per_token
from ..quant.codecs import get_codec
from . import ops, reference
from .cache import derived
from .dispatch import current_mode

_last_codes = threading.local()

MAX_CODE_BITS = 8                      # integer activation codes are held in int8


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _layer_needs_grad(q, x: torch.Tensor) -> bool:
    """Whether a QuantLinear call must record autograd: the input, the bias, a codec tensor or a transform
    tensor requires grad (the ops have no backward, so any of them must take the composition)."""
    if not torch.is_grad_enabled():
        return False
    codec = get_codec(q.codec).kernel_args.of(q)
    return _needs_grad(x, q.bias, *codec, *(_act_args(q.act) if q.act is not None else ()))


def _act_args(act) -> tuple:
    """(smooth, signs, rotation) of an ActTransform; absent ones are None."""
    kind = act.rotation_kind
    return (act.smooth if act.has_smooth else None, act.signs if kind == "hadamard" else None,
            act.rotation if kind == "dense" else None)


def _fused(act) -> bool:
    return act is not None and act.act_bits is not None and act.act_bits <= MAX_CODE_BITS


def _digest(tensors: tuple) -> str:
    h = hashlib.blake2b(digest_size=16)
    for i, t in tensors:
        h.update(f"{i}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def _transform_key(act) -> tuple:
    """(digest of the transform's values, act_bits, zero_point): equal for linears sharing one transform. The
    digest is computed once per layer (a host copy of its transform tensors) and cached against them."""
    present = tuple((i, t) for i, t in enumerate(_act_args(act)) if t is not None)
    if not present:
        return ("identity", act.act_bits, act.zero_point)
    tensors = tuple(t for _, t in present)
    return derived(tensors[0], tensors, "act_digest", lambda: _digest(present)), act.act_bits, act.zero_point


def _quantize_op(act):
    """The activation op of `act`'s format: (codes, steps), or (codes, steps, offsets) with a zero point."""
    return ops.quantize_act_zp if act.zero_point else ops.quantize_act


def _input_stamp(x: torch.Tensor) -> tuple | None:
    try:
        return (x.data_ptr(), x._version, x.shape, x.stride(), x.dtype, x.device)
    except RuntimeError:                # an inference tensor: no version counter, so no reuse
        return None


def act_codes(act, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """quantize_act(x) (or quantize_act_zp) through `act`'s transform, reusing the previous call's codes when a
    sibling linear asked for exactly these (same input object and version, same transform values, bits and
    format)."""
    args = (x, *_act_args(act), act.act_bits)
    stamp = None if torch.compiler.is_compiling() else _input_stamp(x)
    if stamp is None:
        return _quantize_op(act)(*args)
    key = _transform_key(act)
    last = getattr(_last_codes, "entry", None)
    if last is not None and last[0]() is x and last[1] == stamp and last[2] == key:
        return last[3]
    value = _quantize_op(act)(*args)
    _last_codes.entry = (weakref.ref(x), stamp, key, value)
    return value


def forget_act_codes() -> None:
    """Drop the kept activation codes (benchmarks timing one layer on one input call this every time)."""
    _last_codes.entry = None


def act_forward(act, x: torch.Tensor) -> torch.Tensor:
    """ActTransform.forward: x / smooth -> rotation -> per-token fake quantization, in x's dtype."""
    if _fused(act) and not _needs_grad(x, *_act_args(act)):
        codes, steps, *offsets = _quantize_op(act)(x, *_act_args(act), act.act_bits)
        return reference.dequantize_act(codes, steps, x.dtype, *offsets)
    x = reference.transform_act(x, *_act_args(act))
    return x if act.act_bits is None else quantize_per_token(x, act.act_bits, act.zero_point)


def weight_row_sums(in_features: int, qweight, scales, aux, eta, bias, codec, bits, group_size, mode) -> torch.Tensor:
    """Σ_k w[n, k] (fp32 [N]) of the weight the GEMM `mode` computes with (the ops' weight arguments, as
    `_weight_args` gives them), built once per layer and mode (kernels/cache.py): what an activation offset
    multiplies (x_hat = codes · step - offset)."""
    def build():
        return reference.decode_weight(qweight, in_features, codec, scales, aux, eta, bits, group_size or None,
                                       mode).sum(1)
    if torch.compiler.is_compiling():           # traced into the graph: no Python-side cache there
        return build()
    return derived(qweight, (qweight, scales, aux, eta), ("row_sums", mode), build)


def _weight_args(q, int8_gemm: bool) -> tuple:
    """The ops' weight arguments from a QuantLinear; get_codec raises for an unregistered codec. The mode is
    resolved for the layer's device and for whether this call can take the int8 GEMM: the ops never see
    "auto"."""
    scales, aux, eta = get_codec(q.codec).kernel_args.of(q)
    return (q.qweight, scales, aux, eta, q.bias, q.codec, q.bits, q.group_size or 0,
            current_mode(q.qweight.device, int8_gemm))


def quant_linear_forward(q, x: torch.Tensor) -> torch.Tensor:
    """QuantLinear.forward: y = act(x) · decode(qweight)ᵀ + bias, in x's dtype."""
    if _layer_needs_grad(q, x):                  # the differentiable torch composition
        if q.act is not None:
            x = act_forward(q.act, x)
        return reference.qlinear(x, None, *_weight_args(q, False), x.dtype)
    if _fused(q.act):
        codes, steps, *offsets = act_codes(q.act, x)
        args = _weight_args(q, not q.group_size)
        y = ops.qlinear(codes, steps, *args, x.dtype)
        if not offsets:
            return y
        # x_hat · Wᵀ = (codes · step) · Wᵀ - offset ⊗ Σ_k W[:, k]
        return (y.float() - offsets[0][..., None] * weight_row_sums(q.in_features, *args)).to(x.dtype)
    if q.act is not None:
        x = act_forward(q.act, x)
    return ops.qlinear(x, None, *_weight_args(q, False), x.dtype)
