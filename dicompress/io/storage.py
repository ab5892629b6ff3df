"""The dtype an artifact stores its kept (uncompressed) parameters in.

Compression runs in the compute dtype (fp32 on CPU), but the weights a pass does not quantize (AdaLN
modulation linears are a third of a FLUX double block; norms, embedders, head) need not be stored that wide:
stored in the checkpoint's own dtype (bf16 for hub checkpoints) they take the bytes they took in the original.
Codec tensors (codes, scales, grids, smoothing vectors) are buffers whose dtype is part of the format and are
never touched here; only `nn.Parameter`s are, which at load time follow the user's `torch_dtype` anyway.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from .names import WEIGHTS_GLOB
from .safetensors_file import CHECKPOINT_HINT, ST_DTYPE_BY_NAME, read_safetensors_header


def stored_dtype(model_dir: str | Path) -> torch.dtype:
    """The floating dtype holding most of a diffusers checkpoint's weight bytes (its
    `diffusion_pytorch_model*.safetensors` shards; headers only, no weight is read)."""
    weight: Counter = Counter()
    for file in sorted(Path(model_dir).glob(WEIGHTS_GLOB)):
        for entry in read_safetensors_header(file, error=ModelError, hint=CHECKPOINT_HINT).values():
            t = ST_DTYPE_BY_NAME.get(entry.dtype)
            if t is not None and t.is_floating_point:
                weight[t] += entry.stop - entry.start
    return weight.most_common(1)[0][0] if weight else torch.float32


def round_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    """Round every floating parameter through `dtype` in place (the values the artifact will hold), so what is
    evaluated in memory is what loads back. Exact for parameters read from a `dtype` checkpoint and not changed
    since, and for every parameter when `dtype` is at least as wide as its own."""
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.copy_(p.to(dtype))


def stored_state_dict(module: nn.Module, dtype: torch.dtype | None, prefix: str = "") -> dict[str, torch.Tensor]:
    """`module.state_dict()` with floating parameters cast to `dtype` (buffers as they are)."""
    params = {n for n, _ in module.named_parameters()}
    return {prefix + k: (v.to(dtype) if dtype is not None and k in params and v.is_floating_point() else v)
            for k, v in module.state_dict().items()}


@contextmanager
def parameters_stored_as(module: nn.Module, dtype: torch.dtype | None):
    """Hold floating parameters in `dtype` for a `save_pretrained`, then restore the compute dtype (exact after
    `round_parameters`)."""
    if dtype is None:
        yield module
        return
    changed = [(p, p.dtype) for p in module.parameters() if p.is_floating_point() and p.dtype != dtype]
    for p, _ in changed:
        p.data = p.data.to(dtype)
    try:
        yield module
    finally:
        for p, was in changed:
            p.data = p.data.to(was)

