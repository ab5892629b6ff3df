"""A sample of the rows (tokens) each linear of one block reads on its captured calibration inputs.

The block runs on the teacher's captured inputs one captured call at a time, as for GPTQ's Hessians
(calib/hessian.py); a forward pre-hook keeps up to `rows_per_call` random tokens of every call, so a wide
layer's sample stays small (rows · in_features floats) whatever the calibration's size. Tokens are whole rows:
the per-token activation quantizer needs every channel of a token.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .hessian import run_block_hooked


@torch.no_grad()
def block_linear_inputs(module: nn.Module, adapter, batches: Iterable[dict], linears: dict[str, nn.Module],
                        rows_per_call: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """{linear name: x [rows, in_features] float32 on the CPU}: each call's rows sampled without replacement
    (all of them when a call has fewer), by a generator seeded with `seed` (the same rows for every rerun)."""
    gen = torch.Generator().manual_seed(seed)
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in linears}

    def hook(name):
        def pre(mod, args):
            x = args[0].detach().reshape(-1, mod.in_features)
            if x.shape[0] > rows_per_call:
                x = x[torch.randperm(x.shape[0], generator=gen)[:rows_per_call].to(x.device)]
            kept[name].append(x.float().cpu())
        return pre

    run_block_hooked(module, adapter, batches, {name: hook(name) for name in linears}, linears)
    missing = [n for n, xs in kept.items() if not xs]
    if missing:
        raise RuntimeError(f"the block never called {missing} on its calibration inputs")
    return {n: torch.cat(xs) for n, xs in kept.items()}
