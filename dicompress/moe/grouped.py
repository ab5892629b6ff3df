"""The routed experts of a MoEFFN as one Triton grouped GEMM per projection (kernels/triton_moe.py), where it
applies; None elsewhere, and the caller (MoEFFN.forward) runs its torch loop.

Packing: the kernels read every expert's weight from one [E, N, K] tensor. The experts keep their own
nn.Linear parameters (quantization passes, state_dict and checkpoints see them as before); `pack_experts` copies
them once into contiguous [E, width, dim] / [E, width] / [E, dim, width] buffers and re-points each parameter's
`.data` at its slice, so the weights are held once. `packed_experts` rebuilds the [E, ...] views from the
parameters themselves (as_strided over expert 0's storage) whenever they still lie back to back in one storage;
nothing else is cached, so a `.to()`, a `load_state_dict(..., assign=True)` or a replaced parameter (which break
that layout; a plain load_state_dict copies in place and keeps it) only cost one re-pack at the next call, and
no stale copy outlives the parameters.

Where the Triton path applies (`applies`): CUDA tensors on a GPU the Triton kernels support (dispatch.py), or
the CPU inside `interpreted()` with TRITON_INTERPRET=1 (tests); DICOMPRESS_KERNELS not `reference`; every
expert's up / down exactly an nn.Linear (a QuantLinear runs its own kernels: the torch loop) of one dtype
(fp16, bf16, fp32) matching x, without forward hooks (calibration captures read the linears' inputs; the loop
runs them); no gradient needed (the kernels have no backward); no autocast (the loop's F.linear casts).
Idle experts are skipped here: the loop's one-token run of an idle expert only feeds such hooks.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules import module as _mod

from ..kernels.dispatch import force_reference, has_triton, triton_supported

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_interpreter: list[bool] = [False]      # set by interpreted(): the CPU path through Triton's interpreter


@contextmanager
def interpreted():
    """Run grouped_routed_ffn on CPU tensors through Triton's interpreter inside the block (tests; needs
    TRITON_INTERPRET=1 before triton is first imported, as tests/conftest.py sets it without a GPU)."""
    before, _interpreter[0] = _interpreter[0], True
    try:
        yield
    finally:
        _interpreter[0] = before


def _experts(moe) -> tuple[list[nn.Module], list[nn.Module]]:
    """The routed experts' up and down linears, read from the module dicts (this runs on every call and
    nn.Module.__getattr__ costs a few microseconds per attribute)."""
    experts = list(moe._modules["experts"]._modules.values())
    return [ex._modules["up"] for ex in experts], [ex._modules["down"] for ex in experts]


def _groups(ups: list[nn.Module], downs: list[nn.Module]) -> list[list[torch.Tensor] | None]:
    """[up weights, up biases (None without), down weights]: what is packed, one buffer each."""
    w1 = [lin._parameters["weight"] for lin in ups]
    b1 = [lin._parameters["bias"] for lin in ups]
    return [w1, None if b1[0] is None else b1, [lin._parameters["weight"] for lin in downs]]


def _device_ok(device: torch.device) -> bool:
    if not has_triton():
        return False
    if device.type == "cuda":
        return triton_supported(device)
    return device.type == "cpu" and _interpreter[0] and os.environ.get("TRITON_INTERPRET") == "1"


def applies(moe, x: torch.Tensor, gates: torch.Tensor) -> bool:
    """Whether grouped_routed_ffn runs the Triton path for this call (see the module docstring)."""
    if force_reference() or x.dim() != 2 or x.dtype not in DTYPES or not _device_ok(x.device):
        return False
    if torch.is_autocast_enabled(x.device.type) or _mod._global_forward_hooks or _mod._global_forward_pre_hooks:
        return False
    ups, downs = _experts(moe)
    if any(type(lin) is not nn.Linear or lin._forward_hooks or lin._forward_pre_hooks for lin in ups + downs):
        return False
    params = [p for group in _groups(ups, downs) if group is not None for p in group]
    if any(p is None or p.dtype != x.dtype or p.device != x.device for p in params):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or gates.requires_grad
                                             or any(p.requires_grad for p in params)))


def _stacked_view(params: list[torch.Tensor]) -> torch.Tensor | None:
    """[E, *shape] over the parameters' memory if they lie back to back in one allocation, else None. Runs on
    every call, so it reads pointers only: parameter i must start where i slices past parameter 0 start, and
    as_strided checks the whole [E, ...] extent against parameter 0's storage, so every slice lies in that one
    allocation (live allocations never overlap), i.e. is the memory its parameter views."""
    first = params[0]
    step = first.numel() * first.element_size()
    base = first.data_ptr()
    if not first.is_contiguous() or any(p.data_ptr() != base + i * step for i, p in enumerate(params)):
        return None
    try:
        return first.detach().as_strided((len(params), *first.shape), (first.numel(), *first.stride()),
                                         first.storage_offset())
    except RuntimeError:                    # the extent runs past parameter 0's storage: separate tensors
        return None


def packed_experts(moe) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """(up weight [E, width, dim], up bias [E, width] or None, down weight [E, dim, width]) as views of the
    experts' own parameters, or None when they are not packed (never packed, or the layout was broken since)."""
    views = [None if group is None else _stacked_view(group) for group in _groups(*_experts(moe))]
    w1, b1, w2 = views
    if w1 is None or w2 is None or (b1 is None) != (moe.experts[0].up.bias is None):
        return None
    return w1, b1, w2


@torch.no_grad()
def pack_experts(moe) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Copy the routed experts' parameters into one buffer per kind and re-point each parameter at its slice
    (values, Parameter objects and state_dict keys unchanged); returns packed_experts(moe). A no-op when they
    are packed already."""
    done = packed_experts(moe)
    if done is not None:
        return done
    # ordinary tensors even inside inference_mode: a parameter holding an inference tensor could not be
    # updated in place afterwards (load_state_dict, an optimizer step)
    with torch.inference_mode(False):
        for params in _groups(*_experts(moe)):
            if params is None:
                continue
            buf = torch.stack([p.detach() for p in params])
            for p, row in zip(params, buf):
                p.data = row
    return packed_experts(moe)


def grouped_routed_ffn(moe, x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor,
                       blocks: dict | None = None) -> torch.Tensor | None:
    """The routed experts' summed, gated output [T, dim] for x [T, dim] and moe.route's idx / gates [T, k]
    through the Triton grouped GEMM, or None where it does not apply (the caller runs its torch loop). Not for
    traced code: MoEFFN calls it only outside torch.compile (a module-level torch.compiler.disable would import
    torch._dynamo, seconds, on every `import dicompress`)."""
    if not applies(moe, x, gates):
        return None
    from ..kernels.triton_moe import grouped_gemm   # lazy: triton is optional and heavy
    w1, b1, w2 = pack_experts(moe)
    t, k = idx.shape
    n_experts = w1.shape[0]
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)           # sorted row r is assignment order[r] = token · k + slot
    token = (order // k).to(torch.int32)
    gate = gates.reshape(-1)[order].contiguous()
    counts = torch.bincount(flat, minlength=n_experts).to(torch.int32)
    starts = (torch.cumsum(counts, 0, dtype=torch.int32) - counts).contiguous()
    x = x if x.stride(-1) == 1 else x.contiguous()
    approximate = "tanh" if moe.approximate == "tanh" else "erf"
    h = grouped_gemm(x, w1, b1, starts, counts, t * k, a_rows=token, activation=approximate, blocks=blocks)
    y = grouped_gemm(h, w2, None, starts, counts, t * k, gate=gate, out_rows=order.to(torch.int32),
                     blocks=blocks)
    return y if k == 1 else y.view(t, k, -1).sum(1)
