"""Per-linear input second moments H = E[xᵀx] of one block, from its captured calibration inputs.

GPTQ needs H of each linear's input *in the basis its weight is stored in*: a linear that `smooth` /
`ars` transformed reads x' = (x / s)·Q, so H is accumulated on x'. The block is run on the teacher's
captured inputs (not on the outputs of already-quantized blocks), one captured model call at a time, so
memory holds one call's activations plus the [in, in] matrices being accumulated. `hessian_phases` splits a
block's linears so that those matrices stay under a byte budget (FLUX's 12288- and 15360-wide inputs take
0.6 and 0.9 GB each in float32): one block forward per phase.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .encoding import to_module

# bytes of Hessians accumulated at once (a linear wider than this gets a phase of its own)
PHASE_BYTES = 512 << 20


def weight_basis(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x as the stored weight sees it: smoothed and rotated when the linear carries an input transform,
    never activation-quantized (GPTQ compensates weight error on the float inputs)."""
    act = getattr(linear, "act", None)
    if act is None:
        return x
    if act.has_smooth:
        x = x / act.smooth.to(x.dtype)
    return act.rotate(x)


def hessian_bytes(linear: nn.Module) -> int:
    return linear.in_features ** 2 * 4


def hessian_phases(linears: dict[str, nn.Module], budget: int = PHASE_BYTES) -> list[list[str]]:
    """Groups of linear names whose float32 Hessians together fit `budget` (first fit, widest first; a linear
    over budget alone). Each phase's names keep the block's order."""
    order = {n: i for i, n in enumerate(linears)}
    bins: list[tuple[int, list[str]]] = []
    for name in sorted(linears, key=lambda n: -hessian_bytes(linears[n])):
        size = hessian_bytes(linears[name])
        for i, (used, names) in enumerate(bins):
            if used + size <= budget:
                bins[i] = (used + size, names + [name])
                break
        else:
            bins.append((size, [name]))
    return sorted((sorted(names, key=order.get) for _, names in bins), key=lambda p: order[p[0]])


@torch.no_grad()
def run_block_hooked(module: nn.Module, adapter, batches: Iterable[dict], hooks: dict, linears: dict) -> None:
    """Run the block on each calibration batch with `hooks[name]` as a forward pre-hook on `linears[name]`."""
    handles = [linears[name].register_forward_pre_hook(h) for name, h in hooks.items()]
    try:
        p = next(module.parameters())
        for batch in batches:
            adapter.run_block(module, to_module(batch, p.device, p.dtype))
    finally:
        for h in handles:
            h.remove()


def block_hessians(module: nn.Module, adapter, batches: Iterable[dict],
                   linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """{linear name: H [in, in] float32} for `linears` (submodules of the block `module`), averaged over every
    token of every batch of captured block inputs in `batches` (one dict per captured model call)."""
    acc = {name: torch.zeros(lin.in_features, lin.in_features) for name, lin in linears.items()}
    count = dict.fromkeys(linears, 0)

    def hook(name):
        def pre(mod, args):
            x = weight_basis(mod, args[0]).reshape(-1, mod.in_features).float()
            if x.device == acc[name].device:
                acc[name].addmm_(x.T, x)                  # in place: no second [in, in] matrix
            else:                                         # GPU: multiply there, accumulate on the CPU
                acc[name].add_((x.T @ x).cpu())
            count[name] += x.shape[0]
        return pre

    run_block_hooked(module, adapter, batches, {name: hook(name) for name in linears}, linears)
    missing = [k for k, c in count.items() if c == 0]
    if missing:
        raise RuntimeError(f"the block never called {missing} on its calibration inputs")
    return {k: acc[k].div_(count[k]) for k in linears}
