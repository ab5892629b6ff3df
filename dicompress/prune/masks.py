"""Differentiable masks over attention heads and FFN neurons (EcoDiff): hard-concrete gates and the hooks that
apply them.

Hard concrete (Louizos et al. 2018, as EcoDiff uses it): per unit a learned log_alpha (initialised at 3, so every
gate starts fully open), a temperature beta_t = 0.83 and the stretch interval (gamma, zeta) = (-0.1, 1.1):
- sampled gate  s = clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta_t) * (zeta - gamma) + gamma, 0, 1),
  u ~ U(0, 1): exactly 0 or 1 with positive probability, differentiable in log_alpha in between;
- deterministic gate (evaluation) s = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1);
- P(s != 0) = sigmoid(log_alpha - beta_t * log(-gamma / zeta)): the L0 term's expected count, here weighted by
  the parameters each unit holds (`expected_kept_fraction`).

Masks act on the INPUT of the layers that read a unit's output, through forward pre-hooks, so a unit with gate 0
contributes exactly nothing, as if width pruning had removed it (`prune.width`): a head is head_dim input columns
of every output projection (to_out.0 and to_add_out: joint attention's heads serve both streams), an FFN neuron
one input column of its down projection; FLUX single blocks' proj_out reads [attention heads | MLP neurons],
one concatenated mask.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .width import BlockShape, block_shape, layout_for

BETA_T = 0.83                 # hard-concrete temperature
GAMMA, ZETA = -0.1, 1.1       # stretch interval
LOG_ALPHA_INIT = 3.0


def hard_concrete(log_alpha: torch.Tensor, u: torch.Tensor, beta_t: float = BETA_T) -> torch.Tensor:
    """Sampled gates for uniform noise `u` (same shape as log_alpha, in (0, 1))."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta_t)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def deterministic_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor, beta_t: float = BETA_T) -> torch.Tensor:
    """P(gate != 0) under the hard-concrete distribution."""
    return torch.sigmoid(log_alpha - beta_t * math.log(-GAMMA / ZETA))


def uniform_noise(shape, generator: torch.Generator, eps: float = 1e-6) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64).clamp(eps, 1 - eps).float()


@dataclass(frozen=True)
class Unit:
    """One kind of unit of one block: its heads ("heads") or one FFN's neurons (the FFN key)."""
    block: str
    kind: str
    n: int
    cost: int        # parameters one unit holds


class MaskSet(nn.Module):
    """One log_alpha vector per (block, kind) of the selected blocks, and the hooks that apply gates.

    `gates` (a dict (block, kind) -> tensor [n]) is what the hooks multiply in: set it with `sample`,
    `deterministic`, `ones` or by hand (e.g. 0/1 masks) before a forward."""

    def __init__(self, model: nn.Module, adapter, refs, heads: bool, ffns: dict[str, tuple[str, ...]],
                 init: float = LOG_ALPHA_INIT):
        super().__init__()
        self.adapter, self.refs = adapter, list(refs)
        self.shapes: dict[str, BlockShape] = {}
        self.units: list[Unit] = []
        for r in self.refs:
            s = block_shape(model.get_submodule(r.name), layout_for(adapter, r.stream))
            self.shapes[r.name] = s
            if heads:
                self.units.append(Unit(r.name, "heads", s.heads, s.head_params))
            self.units += [Unit(r.name, k, s.ffn[k], s.neuron_params[k]) for k in ffns[r.name]]
        p = next(model.parameters())
        self.log_alpha = nn.ParameterList(
            [nn.Parameter(torch.full((u.n,), float(init), device=p.device, dtype=p.dtype)) for u in self.units])
        self.total_params = sum(s.params for s in self.shapes.values())
        self.gates: dict[tuple[str, str], torch.Tensor] | None = None

    # -- gates ----------------------------------------------------------------------------------------------
    def key(self, i: int) -> tuple[str, str]:
        return self.units[i].block, self.units[i].kind

    def noise(self, generator: torch.Generator) -> list[torch.Tensor]:
        return [uniform_noise(u.n, generator).to(la.device, la.dtype) for u, la in zip(self.units, self.log_alpha)]

    def sampled(self, u: list[torch.Tensor]) -> dict:
        return {self.key(i): hard_concrete(la, ui) for i, (la, ui) in enumerate(zip(self.log_alpha, u))}

    def deterministic(self) -> dict:
        return {self.key(i): deterministic_gate(la) for i, la in enumerate(self.log_alpha)}

    def expected_kept_fraction(self) -> torch.Tensor:
        """The L0 term in parameters: the expected fraction of the selected blocks' parameters kept (units not
        masked count as kept), so its weight `beta` does not depend on the model's size."""
        prunable = sum(u.n * u.cost for u in self.units)
        kept = sum(u.cost * prob_nonzero(la).sum() for u, la in zip(self.units, self.log_alpha))
        return (kept + (self.total_params - prunable)) / self.total_params

    def scores(self) -> dict[str, dict[str, torch.Tensor]]:
        """{block: {kind: log_alpha}} (detached, float, CPU): the planners' unit scores."""
        out: dict[str, dict[str, torch.Tensor]] = {r.name: {} for r in self.refs}
        for u, la in zip(self.units, self.log_alpha):
            out[u.block][u.kind] = la.detach().float().cpu()
        return out

    # -- hooks ----------------------------------------------------------------------------------------------
    def _segments(self, block: str, stream: str) -> dict[str, list[tuple[str | None, int, int]]]:
        """Per layer reading units (relative name): its input columns as segments (kind or None, units, repeat)."""
        layout, s = layout_for(self.adapter, stream), self.shapes[block]
        masked = {u.kind for u in self.units if u.block == block}
        head = ("heads" if "heads" in masked else None, s.heads, s.head_dim)
        segs: dict[str, list] = {n: [head] for n in layout.out}
        for f in layout.ffns:
            seg = (f.key if f.key in masked else None, s.ffn[f.key], 1)
            if f.after_heads:
                segs[f.down] = segs.get(f.down, [head]) + [seg]
            else:
                segs[f.down] = [seg]
        return {n: sg for n, sg in segs.items() if any(k is not None for k, _, _ in sg)}

    def _column_mask(self, block: str, segs) -> torch.Tensor:
        parts = []
        for kind, n, rep in segs:
            g = self.gates.get((block, kind)) if kind is not None else None
            if g is None:
                parts.append(torch.ones(n * rep, device=self.log_alpha[0].device, dtype=self.log_alpha[0].dtype))
            else:
                parts.append(g.repeat_interleave(rep) if rep > 1 else g)
        return torch.cat(parts)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """While active, every masked layer's input is multiplied by its column mask built from `self.gates`
        (None: no masking, the model as it is)."""
        handles = []
        try:
            for r in self.refs:
                block = model.get_submodule(r.name)
                for name, segs in self._segments(r.name, r.stream).items():
                    def pre(mod, args, block_name=r.name, segs=segs):
                        if self.gates is None:
                            return None
                        m = self._column_mask(block_name, segs)
                        return (args[0] * m.to(args[0].dtype),) + tuple(args[1:])
                    handles.append(block.get_submodule(name).register_forward_pre_hook(pre))
            yield self
        finally:
            for h in handles:
                h.remove()
            self.gates = None
