"""Per-linear input second moments H = E[xᵀx] of one block, from its captured calibration inputs.

GPTQ needs H of each linear's input *in the basis its weight is stored in*: a linear that `smooth` /
`ars` transformed reads x' = (x / s)·Q, so H is accumulated on x'. The block is run on the teacher's
captured inputs (not on the outputs of already-quantized blocks), batch by batch, so memory holds one
batch of activations plus one [in, in] matrix per linear of the block.
"""
from __future__ import annotations

import torch
from torch import nn

from .store import to_module


def weight_basis(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x as the stored weight sees it: smoothed and rotated when the linear carries an input transform,
    never activation-quantized (GPTQ compensates weight error on the float inputs)."""
    act = getattr(linear, "act", None)
    if act is None:
        return x
    if act.has_smooth:
        x = x / act.smooth.to(x.dtype)
    return act.rotate(x)


def slice_rows(inputs: dict, per_sample: tuple[str, ...], rows: slice) -> dict:
    """The calibration rows `rows` of a block's captured inputs (shared inputs kept whole)."""
    return {k: (v[rows] if k in per_sample else v) for k, v in inputs.items() if k != "timestep"}


@torch.no_grad()
def block_hessians(model: nn.Module, adapter, store, block: str, linears: dict[str, nn.Module],
                   batch_rows: int = 32) -> dict[str, torch.Tensor]:
    """{linear name: H [in, in] float64} for `linears` (full names, all inside `block`), averaged over
    every token of every captured row."""
    module = model.get_submodule(block)
    inputs = store.block_inputs(block)
    n = next(v.shape[0] for k, v in inputs.items() if k in adapter.per_sample_inputs)
    acc = {name: torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64) for name, lin in linears.items()}
    count = dict.fromkeys(linears, 0)

    def hook(name):
        def pre(mod, args):
            x = weight_basis(mod, args[0]).reshape(-1, mod.in_features).float()
            acc[name] += (x.T @ x).double().cpu()
            count[name] += x.shape[0]
        return pre

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
    try:
        p = next(module.parameters())
        for r0 in range(0, n, batch_rows):
            batch = slice_rows(inputs, adapter.per_sample_inputs, slice(r0, r0 + batch_rows))
            adapter.run_block(module, to_module(batch, p.device, p.dtype))
    finally:
        for h in handles:
            h.remove()
    missing = [k for k, c in count.items() if c == 0]
    if missing:
        raise RuntimeError(f"block {block} never called {missing} on its calibration inputs")
    return {k: acc[k] / count[k] for k in linears}

