"""Mixture of Blocks: a per-block router that decides, per sample (and so per timestep), whether a FLUX block runs.

The router reads the block's `temb` (the timestep + pooled-condition embedding every FLUX block receives, one row
per sample) through SiLU, as the block's own AdaLN modulation does, and maps it to one logit: the block runs for
a sample iff the logit is > 0. A linear router on temb because the decision should depend on the timestep and the
condition only: temb is the same in the teacher and the student (computed before the blocks), so a router trained
on the teacher's captured temb decides the same way at inference.

The block keeps its state-dict keys: instead of wrapping it (which would prefix every key), its class is swapped
for a subclass whose forward gates the parent's forward (`gate_block`), and the router is added as the submodule
`mob_router` (new keys `<block>.mob_router.weight` / `.bias`). The router is not an nn.Linear on purpose: the
quantization passes rewrite nn.Linear modules, and rounding the router would change which blocks run.

Execution: the samples whose logit is > 0 are gathered (index_select), the block runs on them alone and its outputs
are scattered back (index_copy); the other samples' hidden states pass through unchanged (double block: both
streams; single block: the image and text halves it returns). At batch 1 a skip is a plain return of the inputs.
No multiply by a zero gate at inference.

Training (`relax(tau)`): every sample runs the block, and the output is x + g (block(x) - x) with g a
straight-through Gumbel-sigmoid sample (hard 0/1 forward, the sigmoid's gradient backward); `p_run` keeps the
router's run probabilities of the last forward for the budget loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BlockRouter(nn.Module):
    """One logit per sample from the block's temb: w . silu(temb) + b (run iff > 0)."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(temb), self.weight, self.bias).squeeze(-1)


def gumbel_sigmoid(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Straight-through relaxed Bernoulli(sigmoid(logits)): hard 0/1 values forward, sigmoid((l + logistic noise)
    / tau)'s gradient backward."""
    u = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(logits.device, logits.dtype)
    return _Hard.apply(torch.sigmoid((logits + u.log() - (-u).log1p()) / tau))


class _Hard(torch.autograd.Function):
    """Rounds to 0/1 forward, identity backward (exact 0/1 values: hard + soft - soft.detach() is 1 - 1 ulp)."""

    @staticmethod
    def forward(ctx, soft):
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def skip_threshold(logits: torch.Tensor, skips: int) -> float:
    """A threshold t such that at least `skips` of the logits are below it (skip iff logit < t), and no more than
    equal logits force (samples with the same temb, e.g. the same class and timestep, decide together): halfway
    between the skips-th smallest logit and the next larger one, so float rounding of a folded bias cannot flip
    a decision."""
    flat = logits.reshape(-1).float().sort().values
    if not 0 <= skips <= flat.numel():
        raise ValueError(f"cannot skip {skips} of {flat.numel()} executions")
    if skips == 0:
        return float(flat[0]) - 1.0
    v = flat[skips - 1]
    above = flat[flat > v]
    return float((v + above[0]) / 2) if above.numel() else float(v) + 1.0


def initial_bias(run_rate: float) -> float:
    """The router bias whose sigmoid is `run_rate` (a zero weight then runs each block at that rate)."""
    run_rate = min(max(run_rate, 1e-3), 1 - 1e-3)
    return math.log(run_rate / (1 - run_rate))


class GatedBlock:
    """Mixin put in front of a FLUX block class (FluxTransformerBlock, FluxSingleTransformerBlock): both take
    (hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs) and return
    (encoder_hidden_states, hidden_states)."""

    mob_router: BlockRouter

    def _mob_init(self) -> None:
        self.mob_tau: float | None = None        # set: relaxed (training) gates
        self.mob_generator: torch.Generator | None = None
        self.p_run: torch.Tensor | None = None
        self.mob_track = False
        self.mob_seen = 0                         # samples routed while tracking
        self.mob_skipped = 0

    def relax(self, tau: float | None, generator: torch.Generator | None = None) -> None:
        """Relaxed straight-through gates at temperature `tau` (training); None: hard gates (inference)."""
        self.mob_tau, self.mob_generator = tau, generator
        if tau is None:
            self.p_run = None

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        parent = super().forward
        logits = self.mob_router(temb)
        if self.mob_tau is not None:
            self.p_run = torch.sigmoid(logits.float())
            g = gumbel_sigmoid(logits.float(), self.mob_tau, self.mob_generator).to(hidden_states.dtype)
            enc, hid = parent(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
            g = g[:, None, None]
            return encoder_hidden_states + g * (enc - encoder_hidden_states), hidden_states + g * (hid - hidden_states)
        run = logits > 0
        if self.mob_track:
            self.mob_seen += run.numel()
            self.mob_skipped += int((~run).sum())
        if bool(run.all()):
            return parent(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
        if not bool(run.any()):
            return encoder_hidden_states, hidden_states
        idx = run.nonzero().squeeze(1)
        enc, hid = parent(hidden_states.index_select(0, idx), encoder_hidden_states.index_select(0, idx),
                          temb.index_select(0, idx), image_rotary_emb, joint_attention_kwargs)
        return encoder_hidden_states.index_copy(0, idx, enc), hidden_states.index_copy(0, idx, hid)


_GATED: dict[type, type] = {}


def gated_class(cls: type) -> type:
    """The gated subclass of a block class (one per class, registered in this module so pickle finds it)."""
    if issubclass(cls, GatedBlock):
        return cls
    if cls not in _GATED:
        name = f"MoB{cls.__name__}"
        sub = type(name, (GatedBlock, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = sub
        _GATED[cls] = sub
    return _GATED[cls]


def is_gated(block: nn.Module) -> bool:
    return isinstance(block, GatedBlock)


def base_class(block: nn.Module) -> type:
    """The block class under the gating (the block's own class if it is not gated)."""
    return next(c for c in type(block).__mro__ if not issubclass(c, GatedBlock))


def gate_block(block: nn.Module, dim: int, device=None, dtype=None) -> nn.Module:
    """Make `block` (in place) a gated block with a fresh router (zero weight and bias: runs every sample)."""
    if is_gated(block):
        raise ValueError(f"{type(block).__name__} is already gated")
    block.__class__ = gated_class(type(block))
    block.mob_router = BlockRouter(dim, device=device, dtype=dtype)
    block._mob_init()
    return block
