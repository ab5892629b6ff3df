"""What the Dense2MoE split reads from calibration, per block: each FFN's Taylor neuron scores and a uniform
sample of its input tokens (for the partition's co-activation profiles and the router fit).

Taylor score of neuron j: |sum over the tokens of a chunk of a_j(x) dL/da_j(x)|, summed over chunks and probes,
where a_j is the GELU output and L the block's output loss. At the teacher's own weights the loss against the
teacher is zero with a zero gradient, so, as width_importance does, L = <block outputs, r> with r ~ N(0, I) drawn
per probe (a random direction in output space): the first-order change of the block's output along r if the
neuron were removed. Only the activations' gradients are computed (torch.autograd.grad), never the weights'.
"""
from __future__ import annotations

import torch
from torch import nn

from ..calib.encoding import to_module
from .single import hooks_of


class _Reservoir:
    """A uniform sample of at most `size` rows from a stream of [n, dim] batches (random keys, smallest kept)."""

    def __init__(self, size: int, gen: torch.Generator):
        self.size, self.gen = size, gen
        self.keys = torch.empty(0)
        self.rows: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).float().cpu()
        keys = torch.cat([self.keys, torch.rand(rows.shape[0], generator=self.gen)])
        rows = rows if self.rows is None else torch.cat([self.rows, rows])
        if keys.numel() > self.size:
            keep = keys.topk(self.size, largest=False).indices
            keys, rows = keys[keep], rows[keep]
        self.keys, self.rows = keys, rows


def ffn_statistics(block: nn.Module, adapter, chunks, ffns: list[str], *, probes: int = 2, tokens: int = 4096,
                   seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """{ffn path relative to the block: {"scores": [N] Taylor scores, "inputs": [<= tokens, dim] sampled FFN
    inputs}} from running `block` (a dense teacher block) on the calibration `chunks` (block-input dicts). `ffns`:
    FeedForward paths, or "mlp" for a FLUX single block's MLP (moe/single.py)."""
    gen = torch.Generator().manual_seed(seed)
    sites = {rel: hooks_of(block, rel) for rel in ffns}      # (input module, activation module, width)
    seen: dict[str, list[torch.Tensor]] = {rel: [] for rel in ffns}
    res = {rel: _Reservoir(tokens, gen) for rel in ffns}
    scores = {rel: torch.zeros(width) for rel, (_, _, width) in sites.items()}

    def keep_act(rel):
        def hook(mod, args, out):
            leaf = out.detach().requires_grad_(True)
            seen[rel].append(leaf)
            return leaf
        return hook

    def keep_in(rel):
        return lambda mod, args: res[rel].add(args[0])

    hooks = [act.register_forward_hook(keep_act(rel)) for rel, (_, act, _) in sites.items()]
    hooks += [inp.register_forward_pre_hook(keep_in(rel)) for rel, (inp, _, _) in sites.items()]
    p = next(block.parameters())
    try:
        for chunk in chunks:
            for v in seen.values():
                v.clear()
            with torch.enable_grad():
                out = adapter.run_block(block, to_module(chunk, p.device, p.dtype))
                outs = [o for o in out.values() if torch.is_tensor(o) and o.is_floating_point()]
                leaves = [seen[rel][0] for rel in ffns]
                for k in range(probes):
                    loss = sum((o * torch.randn(o.shape, generator=gen).to(o.device, o.dtype)).sum() for o in outs)
                    grads = torch.autograd.grad(loss, leaves, retain_graph=k + 1 < probes, allow_unused=True)
                    for rel, a, g in zip(ffns, leaves, grads):
                        if g is not None:
                            s = (a.detach() * g).reshape(-1, a.shape[-1]).sum(0)
                            scores[rel] += s.abs().float().cpu()
    finally:
        for h in hooks:
            h.remove()
    return {rel: {"scores": scores[rel], "inputs": res[rel].rows} for rel in ffns}
