"""The Dense2MoE split as pure functions on tensors: widths, neuron partitions, router initialisation, measures.

Neuron scores are Taylor importances |sum over tokens a_j(x) dL/da_j(x)| (the pass computes them). The
`shared` most important neurons form the shared expert; the rest are partitioned into equal routed experts:
- `importance`: in score order, contiguous chunks (expert 0 holds the most important routed neurons);
- `cluster`: co-activation clustering: each neuron's |activation| profile over calibration tokens (unit L2), a
  balanced spherical k-means (equal sizes, greedy capacity-constrained assignment, farthest-point seeds):
  neurons that fire on the same tokens land in the same expert, so a token's activation mass sits in
  few experts and top-k routing keeps more of it (`topk_coverage` measures that);
- `random`: a seeded random partition (the `random_partition` baseline).

Router initialisation (`fit_router`): per calibration token, each routed expert's activation mass
m_e(x) = sum_{j in e} |a_j(x)| * ||W2[:, j]|| (how much the expert would write), as shares of the token's routed
mass; a ridge least-squares fit of the shares on [x, 1] gives the router. Least squares rather than centroids of
the tokens each expert wins: it uses every expert's share on every token (not only the argmax), is closed form,
and its logits are shares (differences well below 1), so the initial k * softmax gates are close to 1, the weight
the split neurons were trained with; distillation then sharpens them.
"""
from __future__ import annotations

import torch

PARTITIONS = ("importance", "cluster", "random")


def split_widths(hidden: int, experts: int, shared_fraction: float = 0.125,
                 shared_width: int | None = None) -> tuple[int, int]:
    """(shared width, routed expert width) for an FFN of `hidden` neurons. Rule for remainders: the routed width
    is floor((hidden - shared) / experts) and the neurons left over join the shared expert (the most important
    ones), so any expert count up to the routed width works. ValueError when the split is impossible."""
    shared = shared_width if shared_width is not None else round(shared_fraction * hidden)
    if not 0 <= shared < hidden:
        raise ValueError(f"a shared expert of {shared} neurons does not fit an FFN of {hidden} (need 0 <= shared < "
                         f"{hidden})")
    width = (hidden - shared) // experts
    if width < 1:
        raise ValueError(f"{experts} routed experts do not fit the {hidden - shared} neurons left after the shared "
                         f"expert of {shared}")
    return hidden - experts * width, width


def partition_importance(scores: torch.Tensor, shared: int, experts: int, width: int
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Shared = the `shared` highest scores; routed experts = contiguous chunks of the rest in score order.
    Indices within an expert are sorted (memory order of the dense weights)."""
    if shared + experts * width != scores.numel():
        raise ValueError(f"{shared} + {experts} x {width} neurons != {scores.numel()}")
    order = scores.argsort(descending=True, stable=True)
    routed = order[shared:]
    return order[:shared].sort().values, [routed[i * width:(i + 1) * width].sort().values for i in range(experts)]


def partition_random(n: int, shared: int, experts: int, width: int, seed: int = 0
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A random partition of n neurons (shared included), seeded."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return partition_importance(-perm.argsort().float(), shared, experts, width)   # perm order as scores


def balanced_assign(sim: torch.Tensor, width: int) -> torch.Tensor:
    """Assign each row of `sim` [N, E] (N = E * width) to a column, every column taking `width` rows: pairs taken
    greedily by decreasing similarity. Returns the column of each row [N]."""
    n, e = sim.shape
    if n != e * width:
        raise ValueError(f"{n} rows cannot fill {e} columns of {width}")
    flat = sim.reshape(-1).argsort(descending=True, stable=True)
    assign = torch.full((n,), -1, dtype=torch.long)
    room = [width] * e
    left = n
    for p in flat.tolist():
        r, c = divmod(p, e)
        if assign[r] < 0 and room[c]:
            assign[r] = c
            room[c] -= 1
            left -= 1
            if not left:
                break
    return assign


def partition_cluster(act: torch.Tensor, scores: torch.Tensor, shared: int, experts: int, width: int,
                      iters: int = 20) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Shared by score; the routed neurons clustered by co-activation: `act` [T, N] activations on calibration
    tokens. Balanced spherical k-means on |act| profiles, seeded by farthest points (the most important routed
    neuron, then each time the neuron least similar to every seed so far): deterministic, and not stuck where
    the importance chunks would start it when each chunk mixes every co-activation group alike."""
    shared_idx, start = partition_importance(scores, shared, experts, width)
    routed = torch.cat(start)                                       # routed neurons, most important first
    prof = act[:, routed].abs().double().T                          # [R, T]
    prof = prof / prof.norm(dim=1, keepdim=True).clamp_min(1e-12)
    seeds = [0]
    closest = prof @ prof[0]
    for _ in range(experts - 1):
        seeds.append(int(closest.argmin()))
        closest = torch.maximum(closest, prof @ prof[seeds[-1]])
    cent = prof[seeds]
    assign = None
    for _ in range(iters):
        new = balanced_assign(prof @ cent.T, width)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        cent = torch.zeros_like(cent).index_add_(0, assign, prof)
        cent = cent / cent.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return shared_idx, [routed[assign == e].sort().values for e in range(experts)]


def expert_mass(act: torch.Tensor, w2_norms: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """[T, E]: per token, what each routed expert would write: sum over its neurons of |a_j| * ||W2[:, j]||."""
    contrib = act.abs() * w2_norms
    return torch.stack([contrib[:, e].sum(1) for e in experts], dim=1)


def fit_router(x: torch.Tensor, mass: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Router (weight [E, dim], bias [E]) whose logits are the least-squares prediction, from x [T, dim], of each
    expert's share of the token's routed mass [T, E]. `ridge` is relative to the mean diagonal of [x, 1]'s Gram."""
    share = (mass / mass.sum(1, keepdim=True).clamp_min(1e-12)).double()
    a = torch.cat([x.double(), x.new_ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    gram = a.T @ a
    lam = ridge * float(gram.diagonal().mean())
    sol = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=torch.float64), a.T @ share)
    return sol[:-1].T.to(x.dtype).contiguous(), sol[-1].to(x.dtype).clone()


def topk_coverage(mass: torch.Tensor, k: int, chosen: torch.Tensor | None = None) -> float:
    """Mean over tokens of the routed mass in the k experts `chosen` [T, k] (default: the k largest, the best any
    router can do with this partition) over the token's whole routed mass."""
    if chosen is None:
        chosen = mass.topk(k, dim=1).indices
    total = mass.sum(1).clamp_min(1e-12)
    return float((mass.gather(1, chosen).sum(1) / total).mean())


def router_recall(logits: torch.Tensor, mass: torch.Tensor, k: int) -> float:
    """Fraction of each token's k highest-mass experts that the router's top-k picks, averaged over tokens."""
    want = torch.zeros_like(mass, dtype=torch.bool).scatter_(1, mass.topk(k, dim=1).indices, True)
    got = want.gather(1, logits.topk(k, dim=1).indices)
    return float(got.float().mean())


def switch_balance_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's load-balancing loss E * sum_i f_i P_i: f_i = counts_i / sum(counts), the fraction of the
    (token, expert) assignments going to expert i, P_i the mean router probability of i over the tokens `probs`
    [T, E]. 1 at perfect balance (uniform f and P); E when one expert takes everything."""
    f = counts.to(probs.dtype) / counts.sum().clamp_min(1)
    return probs.shape[1] * (f * probs.mean(0)).sum()
