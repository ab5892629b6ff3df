"""Dense2MoE on FLUX single blocks, whose MLP is no module of its own: proj_out reads [attention | GELU(proj_mlp(x))]
and applies W = [W_a | W_m] + b, so the MLP's down-projection is W_m, a column block of proj_out.

The conversion keeps diffusers' own FluxSingleTransformerBlock.forward (joint_attention_kwargs, return
convention and all) and swaps three attributes:
- proj_mlp <- a MoEFFN of the MLP (up = proj_mlp rows, down = W_m columns, output bias = proj_out's bias), which
  already writes the MLP's contribution to the block output (dim wide, not mlp_hidden wide);
- act_mlp  <- Identity (the GELU lives inside the experts);
- proj_out <- `AttnOutPlusMLP`: the attention columns W_a as a plain bias-free nn.Linear (`proj_out.attn`, which
  quantization passes find and rewrite like any linear), plus the MoE output read from the second half of the
  concatenation. Exact: W_a a + (W_m GELU(U x + c) + b) is the dense block's proj_out output.
The manifest entry is `moe_ffn` with `module` = the block and `ffn: mlp`, as ppcl_width records single blocks.
"""
from __future__ import annotations

import torch
from torch import nn

MLP = "mlp"   # the FFN key of a single block's MLP (prune/width.py LAYOUTS, reports, manifest entries)


class AttnOutPlusMLP(nn.Module):
    """proj_out of a single block whose MLP is a MoEFFN: attn(h[..., :dim]) + h[..., dim:]."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.dim = dim
        self.attn = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        d = self.dim
        if hidden_states.shape[-1] != 2 * d:
            raise ValueError(f"expected [attention | MoE output] of width {2 * d}, got {hidden_states.shape[-1]}")
        return self.attn(hidden_states[..., :d]) + hidden_states[..., d:]


def is_dense_single(block: nn.Module) -> bool:
    return type(getattr(block, "proj_mlp", None)) is nn.Linear and type(getattr(block, "proj_out", None)) is nn.Linear


def single_mlp_parts(block: nn.Module) -> dict:
    """The single block's MLP in dense_parts' format: {w1, b1, w2, b2, approximate}; ValueError otherwise."""
    if not is_dense_single(block):
        raise ValueError(f"proj_mlp / proj_out are {type(getattr(block, 'proj_mlp', None)).__name__} / "
                         f"{type(getattr(block, 'proj_out', None)).__name__}, not plain nn.Linear (convert FFNs "
                         "before passes that rewrite linears)")
    act = block.act_mlp
    if not isinstance(act, nn.GELU):
        raise ValueError(f"its MLP activation is {type(act).__name__}; the MoE split supports GELU MLPs")
    up, out = block.proj_mlp, block.proj_out
    dim = up.in_features
    if out.in_features != dim + up.out_features or (up.bias is None) != (out.bias is None):
        raise ValueError(f"proj_out reads {out.in_features} features, not [attention {dim} | MLP {up.out_features}]"
                         " with matching biases")
    return {"w1": up.weight, "b1": up.bias, "w2": out.weight[:, dim:], "b2": out.bias,
            "approximate": act.approximate}


def hooks_of(block: nn.Module, rel: str) -> tuple[nn.Module, nn.Module, int]:
    """(module whose input is the FFN's input, module whose output is the FFN's hidden activation, hidden width) of
    a dense FFN at `rel` in `block`: a FeedForward (itself, net[0]) or a single block's MLP (proj_mlp, act_mlp)."""
    if rel == MLP:
        return block.proj_mlp, block.act_mlp, block.proj_mlp.out_features
    ffn = block.get_submodule(rel)
    return ffn, ffn.net[0], ffn.net[0].proj.out_features


@torch.no_grad()
def install_single_moe(block: nn.Module, moe: nn.Module) -> None:
    """Swap the block's dense MLP for `moe` (built from single_mlp_parts, so its bias is proj_out's)."""
    dim = block.proj_mlp.in_features
    w = block.proj_out.weight
    out = AttnOutPlusMLP(dim, device=w.device, dtype=w.dtype)
    out.attn.weight.copy_(w[:, :dim])
    block.proj_mlp, block.act_mlp, block.proj_out = moe, nn.Identity(), out


def empty_single_moe(block: nn.Module, moe: nn.Module, device, dtype) -> None:
    """The load-time structure (weights come from the checkpoint)."""
    block.proj_mlp, block.act_mlp = moe, nn.Identity()
    block.proj_out = AttnOutPlusMLP(moe.dim, device=device, dtype=dtype)
