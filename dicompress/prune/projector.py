"""PPCL's width step: an FFN replaced by a residual linear projector x + Linear(x), fitted by least squares.

`ResidualProjector(dim)` keeps its linear as `.proj` (a plain nn.Linear), so the passes that follow (smooth,
ars, tlq, act_quant) find it like any other linear of the block and rewrite it in place; the residual x is
added outside the linear, so an input transform they give `.proj` (smoothing, rotation) stays exact.

The least-squares fit is pure: given the FFN's inputs A and outputs B (captured from the teacher), find W, b
with A W^T + b ~= B - A (the projector learns the FFN's deviation from the identity). The bias enters through a
ones column appended to A; the normal equations are accumulated in fp64 batch by batch (`NormalEquations`), so
any number of calibration tokens fits in memory, and solved with a ridge term relative to their mean diagonal.
"""
from __future__ import annotations

import torch
from torch import nn


class ResidualProjector(nn.Module):
    """x + proj(x): PPCL's stand-in for an FFN (same input and output width)."""

    def __init__(self, dim: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # diffusers' FeedForward accepts (and ignores) extra positional args; so does this
        return x + self.proj(x)

    def extra_repr(self) -> str:
        return f"dim={self.proj.in_features}"


class NormalEquations:
    """Running sums of [A, 1]^T [A, 1] and [A, 1]^T (B - A) in fp64, over batches of rows (on the device of the
    first rows added: a GPU model's features are summed where they are)."""

    def __init__(self, dim: int):
        self.gram = torch.zeros(dim + 1, dim + 1, dtype=torch.float64)
        self.cross = torch.zeros(dim + 1, dim, dtype=torch.float64)
        self.rows = 0
        self.sq_target = 0.0    # sum of ||B - A||^2 and of ||B||^2: the fit's residual from the sums alone
        self.sq_out = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a = a.reshape(-1, a.shape[-1]).to(torch.float64)
        b = b.reshape(-1, b.shape[-1]).to(torch.float64)
        if a.shape != b.shape:
            raise ValueError(f"inputs {tuple(a.shape)} and outputs {tuple(b.shape)} differ: a residual projector "
                             "maps a width onto itself")
        if self.rows == 0:
            self.gram, self.cross = self.gram.to(a.device), self.cross.to(a.device)
        x = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        self.gram += x.T @ x
        self.cross += x.T @ (b - a)
        self.rows += a.shape[0]
        self.sq_target += float((b - a).pow(2).sum())
        self.sq_out += float(b.pow(2).sum())

    def solve(self, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [dim, dim], b [dim]) in fp64. `ridge` is relative to the Gram matrix's mean diagonal."""
        if self.rows == 0:
            raise ValueError("no rows to fit")
        n = self.gram.shape[0]
        lam = ridge * float(self.gram.diagonal().mean())
        eye = torch.eye(n, dtype=torch.float64, device=self.gram.device)
        sol = torch.linalg.solve(self.gram + lam * eye, self.cross)  # [dim+1, dim]
        return sol[:-1].T.contiguous(), sol[-1].clone()

    def relative_error(self, w: torch.Tensor, b: torch.Tensor) -> float:
        """||A + A W^T + b - B|| / ||B|| over every row added, from the sums: with S = [W^T; b] and T = B - A,
        ||X S - T||^2 = tr(S^T G S) - 2 tr(S^T C) + ||T||^2."""
        s = torch.cat([w.to(torch.float64).T, b.to(torch.float64)[None]], dim=0)
        sq = float((s * (self.gram @ s)).sum() - 2 * (s * self.cross).sum()) + self.sq_target
        return (max(sq, 0.0) / self.sq_out) ** 0.5 if self.sq_out > 0 else 0.0


def fit_residual(a: torch.Tensor, b: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """W, b minimising ||A W^T + b - (B - A)||^2 (+ ridge): the residual projector closest to the map A -> B."""
    eq = NormalEquations(a.shape[-1])
    eq.add(a, b)
    return eq.solve(ridge)


@torch.no_grad()
def init_projector(proj: ResidualProjector, w: torch.Tensor, b: torch.Tensor) -> ResidualProjector:
    """Load a least-squares solution into the projector's linear (in its dtype and device)."""
    lin = proj.proj
    lin.weight.copy_(w.to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_(b.to(lin.bias.dtype))
    return proj


# diffusers' FeedForward activations this module can rebuild (the first layer's class and `approximate`)
_ACTIVATIONS = {("GELU", "tanh"): "gelu-approximate", ("GELU", "none"): "gelu"}


def ffn_spec(module: nn.Module) -> dict:
    """What rebuilds a diffusers FeedForward (net = [activation with .proj, Dropout, Linear]): the manifest's
    description of the FFN a projector replaced. ValueError for anything else."""
    net = getattr(module, "net", None)
    if type(module).__name__ != "FeedForward" or net is None or len(net) != 3:
        raise ValueError(f"a {type(module).__name__}, not a diffusers FeedForward of [activation, dropout, linear]")
    act, down = net[0], net[2]
    up = getattr(act, "proj", None)
    kind = _ACTIVATIONS.get((type(act).__name__, getattr(act, "approximate", None)))
    if kind is None:
        raise ValueError(f"its activation {type(act).__name__} is not one of {sorted(_ACTIVATIONS.values())}")
    if type(up) is not nn.Linear or type(down) is not nn.Linear:
        raise ValueError(f"its linears are {type(up).__name__} / {type(down).__name__}, not plain nn.Linear "
                         "(replace FFNs before passes that rewrite linears)")
    if up.in_features != down.out_features:
        raise ValueError(f"it maps width {up.in_features} to {down.out_features}; a residual projector keeps it")
    return {"dim": up.in_features, "hidden": up.out_features, "activation_fn": kind,
            "bias": up.bias is not None and down.bias is not None}


def teacher_ffn(spec: dict, device=None, dtype=None) -> nn.Module:
    """An empty diffusers FeedForward of the shape `spec` (ffn_spec's) describes, to load the teacher's FFN into."""
    from diffusers.models.attention import FeedForward   # lazy: diffusers' model modules take seconds to import
    ffn = FeedForward(spec["dim"], dim_out=spec["dim"], inner_dim=spec["hidden"], activation_fn=spec["activation_fn"],
                      bias=spec["bias"])
    return ffn.to(device=device, dtype=dtype)


# -- FLUX single blocks: the MLP has no module of its own ------------------------------------------------------
# proj_out reads [attention output | GELU(proj_mlp(x))]. Its projector x + W x + b becomes proj_mlp = identity
# (dim x dim, no bias), act_mlp = Identity, proj_out's MLP columns = I + W, b added to proj_out's bias. proj_mlp
# stays a plain linear reading the normalised x beside to_q/k/v, so smoothing's fold into the norm and a rotation
# of its input stay exact (and an identity row quantizes exactly per channel); the residual lives in I + W.

def single_mlp_spec(block: nn.Module) -> dict:
    """The single block's MLP as the manifest describes it; ValueError if it is not the stock one."""
    up, act, down = getattr(block, "proj_mlp", None), getattr(block, "act_mlp", None), getattr(block, "proj_out", None)
    if type(up) is not nn.Linear or type(down) is not nn.Linear:
        raise ValueError(f"proj_mlp / proj_out are {type(up).__name__} / {type(down).__name__}, not plain nn.Linear "
                         "(replace FFNs before passes that rewrite linears)")
    if type(act) is not nn.GELU or act.approximate != "tanh":
        raise ValueError(f"act_mlp is {act!r}, not the stock GELU(approximate='tanh') (already replaced?)")
    inner = down.in_features - up.out_features
    if up.in_features != down.out_features or inner <= 0:
        raise ValueError(f"proj_mlp {up.in_features}->{up.out_features} and proj_out {down.in_features}->"
                         f"{down.out_features} are not a single block's [attention | MLP] layout")
    return {"dim": up.in_features, "hidden": up.out_features, "inner": inner, "activation_fn": "gelu-approximate",
            "bias": True}


def _single_shapes(block: nn.Module, dim: int, inner: int, hidden: int | None, device, dtype) -> None:
    """Give the block an MLP of `hidden` neurons (None: the projector's dim-wide identity path), uninitialised."""
    width = dim if hidden is None else hidden
    block.proj_mlp = nn.Linear(dim, width, bias=hidden is not None, device=device, dtype=dtype)
    block.act_mlp = nn.Identity() if hidden is None else nn.GELU(approximate="tanh")
    block.proj_out = nn.Linear(inner + width, dim, device=device, dtype=dtype)
    block.proj_out._tp_packed_row_blocks = [inner, width]    # diffusers' tensor-parallel plan reads it
    block.mlp_hidden_dim = width


@torch.no_grad()
def fold_single_projector(block: nn.Module, w: torch.Tensor, b: torch.Tensor) -> None:
    """Replace the single block's MLP, in place, by the projector x + W x + b (see above)."""
    spec = single_mlp_spec(block)
    dim, inner = spec["dim"], spec["inner"]
    old = block.proj_out
    _single_shapes(block, dim, inner, None, old.weight.device, old.weight.dtype)
    block.proj_mlp.weight.copy_(torch.eye(dim))
    new = block.proj_out
    new.weight[:, :inner].copy_(old.weight[:, :inner])
    new.weight[:, inner:].copy_(torch.eye(dim, dtype=torch.float64, device=w.device) + w.to(torch.float64))
    new.bias.copy_(old.bias.to(torch.float64) + b.to(old.bias.device, torch.float64))


def rebuild_single_projector(block: nn.Module, entry: dict, device) -> None:
    """Manifest op ppcl_width on a single block: the projector's shapes (weights are read afterwards)."""
    spec = single_mlp_spec(block)
    if (spec["dim"], spec["hidden"], spec["inner"]) != (entry["dim"], entry["hidden"], entry["inner"]):
        raise ValueError(f"the block's MLP is {spec}, the manifest says {entry}")
    _single_shapes(block, spec["dim"], spec["inner"], None, device, block.proj_out.weight.dtype)


def restore_single_mlp(block: nn.Module, entry: dict, weights: dict) -> None:
    """Unplug: the teacher's proj_mlp, GELU and proj_out back (`weights`: their state, keys relative to the
    block). ValueError when the block no longer holds the projector ppcl_width wrote."""
    up, down = block.proj_mlp, block.proj_out
    if type(up) is not nn.Linear or type(down) is not nn.Linear or not isinstance(block.act_mlp, nn.Identity):
        raise ValueError(f"proj_mlp / proj_out are {type(up).__name__} / {type(down).__name__}: no longer the plain "
                         "projector ppcl_width wrote (a later pass quantized or rewrote it)")
    _single_shapes(block, entry["dim"], entry["inner"], entry["hidden"], down.weight.device, down.weight.dtype)
    block.proj_mlp.load_state_dict({k[9:]: v for k, v in weights.items() if k.startswith("proj_mlp.")})
    block.proj_out.load_state_dict({k[9:]: v for k, v in weights.items() if k.startswith("proj_out.")})
