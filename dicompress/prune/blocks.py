"""Rebuilding blocks for depth pruning: local weight averaging, and the teacher's input/output of a group."""
from __future__ import annotations

import torch
from torch import nn

STREAMS = ("hidden_states", "encoder_hidden_states")


@torch.no_grad()
def average_parameters_(block: nn.Module, others: list[nn.Module]) -> nn.Module:
    """Amber-Image's local weight averaging, in place: every parameter of `block` becomes the mean of its
    own and the same parameter of each block in `others` (blocks of one list share shapes)."""
    if not others:
        return block
    peers = [dict(o.named_parameters()) for o in others]
    for name, p in block.named_parameters():
        stack = [p.data] + [q[name].data.to(p.device, p.dtype) for q in peers]
        p.data.copy_(torch.stack(stack).mean(0))
    return block


def teacher_io(store, names: list[str], start: int, end: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """The teacher's captured inputs of block `start` and its outputs after block `end` (the inputs of block
    end+1, or the final outputs after the last block), per stream."""
    inputs = store.block_inputs(names[start])
    if end + 1 < len(names):
        nxt = store.block_inputs(names[end + 1], keys=list(STREAMS))
        targets = {k: nxt[k] for k in STREAMS if k in nxt}
    else:
        final = store.final_outputs()
        targets = {k: final[k] for k in STREAMS if k in final}
    return inputs, targets
