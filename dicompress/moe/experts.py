"""`MoEFFN`: a dense diffusers FeedForward (net.0.proj -> GELU -> net.2) split into a shared expert that every
token runs and `experts` routed experts of equal width, `top_k` of them per token.

Each expert keeps its up- and down-projection as its own plain nn.Linear (`shared.up`, `experts.3.down`, ...), so
the quantization passes (rtn, tlq, smooth, act_quant: `nn.surgery.iter_linears`) find and rewrite each expert
like any other linear of the block. The router is NOT an nn.Linear (`Router`, same math): it stays in full
precision, since rounding its few weights to 4 bits would change which experts tokens go to.

Gates: the router's logits l = W_r x + b_r; the k largest are selected; gate_i = k * softmax over the selected
logits (the renormalised top-k softmax, scaled by k so that equal gates are 1). Splitting a trained FFN gives
experts whose neurons were trained with weight 1; at a uniform router, with top_k = experts, the MoE FFN is the
dense FFN exactly (up to summation order). The dense down-projection's bias is `bias`, added once per token.

Execution groups tokens by expert: the (token, expert) assignments are sorted by expert, each expert gathers its
tokens (index_select), runs one matmul pair over them, scales by the gate and scatters back (index_add). No loop
over tokens; one Python iteration per expert. On CUDA, in inference, the routed experts run instead as one Triton
grouped GEMM per projection (moe/grouped.py: grouped_routed_ffn, kernels/triton_moe.py). Each forward with
gradients enabled leaves `aux_loss` (the Switch load-balancing loss E * sum_i f_i P_i: f_i the fraction of
assignments to expert i, P_i its mean router probability) and, while `track_load` is set, adds each expert's
assignment count to `load`.

An expert no token chose in a forward still runs one token (the one its router probability is highest for) and
its output is dropped: every expert's linears then see inputs in every forward, so calibration captured on the
MoE model has statistics for all of them (smoothing and GPTQ need them; an expert left without tokens by a small
calibration set would otherwise stop the recipe). The cost is one row per idle expert.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .grouped import grouped_routed_ffn
from .partition import switch_balance_loss


class Router(nn.Module):
    """A linear map from the token's features to one logit per expert (not an nn.Linear on purpose: see above)."""

    def __init__(self, dim: int, experts: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(experts, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Expert(nn.Module):
    """One slice of the FFN: up (dim -> width, with the up-projection's bias rows), GELU, down (width -> dim)."""

    def __init__(self, dim: int, width: int, bias: bool = True, approximate: str = "tanh", device=None, dtype=None):
        super().__init__()
        self.up = nn.Linear(dim, width, bias=bias, device=device, dtype=dtype)
        self.down = nn.Linear(width, dim, bias=False, device=device, dtype=dtype)
        self.approximate = approximate

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.up(x), approximate=self.approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hidden(x))


class MoEFFN(nn.Module):
    """Shared expert (width `shared`, may be 0) + `experts` routed experts of width `expert_width`, top-k routed."""

    def __init__(self, dim: int, shared: int, expert_width: int, experts: int, top_k: int, bias: bool = True,
                 approximate: str = "tanh", device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be in 1..{experts} (the number of routed experts), got {top_k}")
        if expert_width < 1 or shared < 0:
            raise ValueError(f"expert width {expert_width} and shared width {shared}: need >= 1 and >= 0")
        kw = dict(bias=bias, approximate=approximate, device=device, dtype=dtype)
        self.dim, self.top_k, self.approximate = dim, top_k, approximate
        self.shared = Expert(dim, shared, **kw) if shared else None
        self.experts = nn.ModuleList(Expert(dim, expert_width, **kw) for _ in range(experts))
        self.router = Router(dim, experts, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype)) if bias else None
        self.aux_loss: torch.Tensor | None = None
        self.track_load = False
        self.load = torch.zeros(experts, dtype=torch.long)

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @property
    def shared_width(self) -> int:
        return self.shared.up.out_features if self.shared is not None else 0

    @property
    def expert_width(self) -> int:
        return self.experts[0].up.out_features

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, dim] -> (expert indices [T, k], gates [T, k], router probabilities [T, E])."""
        logits = self.router(x)
        probs = logits.float().softmax(-1)
        top, idx = logits.topk(self.top_k, dim=-1)
        gates = (top.float().softmax(-1) * self.top_k).to(x.dtype)
        return idx, gates, probs

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        idx, gates, probs = self.route(x)
        # in place from here on: index_add (out of place) would copy the whole [T, dim] output once per expert;
        # autograd allows it, since neither the linear's nor index_add's backward reads this output
        out = self.shared(x) if self.shared is not None else x.new_zeros(x.shape)
        if self.bias is not None:
            out.add_(self.bias)
        flat = idx.reshape(-1)
        counts = torch.bincount(flat, minlength=self.n_experts)
        # the Triton grouped GEMM where it applies (CUDA, plain nn.Linear experts, no gradient: moe/grouped.py),
        # else (and inside torch.compile, which traces the loop) the torch loop
        routed = None if torch.compiler.is_compiling() else grouped_routed_ffn(self, x, idx, gates)
        if routed is not None:
            out.add_(routed)
        else:
            self._routed_loop(x, flat, gates, probs, counts, out)
        # only while training: a stored graph would hold memory and make the module impossible to deepcopy
        self.aux_loss = switch_balance_loss(probs, counts) if torch.is_grad_enabled() else None
        if self.track_load:
            self.load += counts.detach().cpu()
        return out.reshape(shape)

    def _routed_loop(self, x, flat, gates, probs, counts, out) -> None:
        """Adds the routed experts' gated outputs to `out`: the (token, expert) assignments grouped by expert, one
        gather / matmul pair / scatter per expert."""
        order = flat.argsort(stable=True)
        token = order // self.top_k
        gate = gates.reshape(-1)[order]
        starts = counts.cumsum(0) - counts
        for e, (s, n) in enumerate(zip(starts.tolist(), counts.tolist())):
            if n == 0:       # idle: its best-scoring token, output dropped (see the module docstring)
                with torch.no_grad():
                    expert = self.experts[e]
                    expert(x[probs[:, e].argmax()].reshape(1, -1))
                continue
            t = token[s:s + n]
            expert = self.experts[e]
            h = expert.hidden(x.index_select(0, t)).mul_(gate[s:s + n, None])   # GELU's backward reads its input
            out.index_add_(0, t, expert.down(h))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, shared={self.shared_width}, experts={self.n_experts}x{self.expert_width}, "
                f"top_k={self.top_k}")

    def spec(self) -> dict:
        """What rebuilds this module (the manifest entry's fields, less op and module)."""
        return {"dim": self.dim, "shared": self.shared_width, "expert_width": self.expert_width,
                "experts": self.n_experts, "top_k": self.top_k, "bias": self.bias is not None,
                "approximate": self.approximate}

    def activated_params(self) -> int:
        """Parameters one token reads: shared, top_k routed experts, router, output bias."""
        one = sum(p.numel() for p in self.experts[0].parameters())
        rest = sum(p.numel() for p in self.parameters()) - one * self.n_experts
        return rest + one * self.top_k


def dense_parts(ffn: nn.Module) -> dict:
    """The weights of a diffusers FeedForward with a GELU (net = [GELU with .proj, Dropout, Linear]) as
    {w1 [N, dim], b1 [N] | None, w2 [dim, N], b2 [dim] | None, approximate}; ValueError for anything else."""
    net = getattr(ffn, "net", None)
    if type(ffn).__name__ != "FeedForward" or net is None or len(net) != 3:
        raise ValueError(f"a {type(ffn).__name__}, not a diffusers FeedForward of [activation, dropout, linear]")
    act, down = net[0], net[2]
    up = getattr(act, "proj", None)
    if type(act).__name__ != "GELU":
        raise ValueError(f"its activation is {type(act).__name__}; the MoE split supports GELU FFNs")
    if type(up) is not nn.Linear or type(down) is not nn.Linear:
        raise ValueError(f"its linears are {type(up).__name__} / {type(down).__name__}, not plain nn.Linear "
                         "(convert FFNs before passes that rewrite linears)")
    if (up.bias is None) != (down.bias is None):
        raise ValueError("one of its linears has a bias and the other none")
    return {"w1": up.weight, "b1": up.bias, "w2": down.weight, "b2": down.bias,
            "approximate": getattr(act, "approximate", "none")}


@torch.no_grad()
def moe_from_dense(ffn: nn.Module | dict, shared: torch.Tensor, experts: list[torch.Tensor], top_k: int,
                   router: tuple[torch.Tensor, torch.Tensor] | None = None) -> MoEFFN:
    """An MoEFFN holding exactly the dense FFN's neurons: `shared` (neuron indices) and `experts` (one index tensor
    per routed expert, equal lengths); `router` = (weight [E, dim], bias [E]) or a zero (uniform) router.
    `ffn`: a FeedForward, or its parts as dense_parts returns them (a FLUX single block's MLP: moe/single.py)."""
    d = ffn if isinstance(ffn, dict) else dense_parts(ffn)
    w1, b1, w2, b2 = d["w1"], d["b1"], d["w2"], d["b2"]
    widths = {len(e) for e in experts}
    if len(widths) != 1:
        raise ValueError(f"routed experts must have equal widths, got {sorted(widths)}")
    moe = MoEFFN(w1.shape[1], len(shared), widths.pop(), len(experts), top_k, bias=b1 is not None,
                 approximate=d["approximate"], device=w1.device, dtype=w1.dtype)
    for module, neurons in ([(moe.shared, shared)] if len(shared) else []) + list(zip(moe.experts, experts)):
        neurons = torch.as_tensor(neurons, dtype=torch.long, device=w1.device)
        module.up.weight.copy_(w1[neurons])
        if b1 is not None:
            module.up.bias.copy_(b1[neurons])
        module.down.weight.copy_(w2[:, neurons])
    if b2 is not None:
        moe.bias.copy_(b2)
    if router is not None:
        moe.router.weight.copy_(router[0])
        moe.router.bias.copy_(router[1])
    return moe
