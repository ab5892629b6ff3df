"""The orthogonal transforms LRQ-DiT's Adaptive Rotation Scheme (ARS) chooses between, as pure functions.

Convention: activations are rows, X [tokens, C]; a Linear weight is W [out, C] acting as X @ Wᵀ. For an
orthogonal R, X·R is what gets quantized and W·R is the folded weight: (X R)(W R)ᵀ = X R Rᵀ Wᵀ = X Wᵀ.

ARS picks per layer from J = ||X||_F / sqrt(B·N·C), the RMS of the calibration inputs: J < 1 → a
(randomised) Hadamard (see `hadamard.py`); J ≥ 1 → DuQuant's outlier-aware R = R1·P·R2.

Outlier-aware transform from the per-channel absmax a only (what the calibration store keeps). A rotated
channel is y_j = Σ_i x_i R_ij; its absmax is estimated by a two-part model:
  - salient channels (a_i > `salient`·median a) sit in the same channels for every prompt and fire
    together (METHODS.md), so in the worst case they add coherently: Σ_{i salient} a_i |R_ij|;
  - the bulk is noise-like and adds in quadrature: sqrt(Σ_{i bulk} a_i² R_ij²).
The salient part is tracked exactly (one row per salient channel); the bulk part is propagated as if
the current channels were independent. Under this model a plain Hadamard is not optimal: it adds every
salient channel into every output channel, while keeping outliers on separate channels and spreading
each over its own share of the channels gives a lower peak. (If outliers fire independently instead,
a full-width Hadamard spreads them further than 128-channel blocks can: it is then the better choice.)

Greedy block rotation (DuQuant): in every block of `block` channels, repeatedly take the channel d with
the largest estimate and apply a Householder reflection G that maps the dominating content (e_d for a
fresh outlier) to a flat vector w (|w_j| = 1/√t on t channels, random signs each step so steps do not
undo each other): that content is spread evenly while what is orthogonal to it moves little. A step is
kept only when it lowers the block's estimated max. Blocks are processed in parallel; each kept step is
a rank-1 update of the block's rotation, accumulated in float64 so R stays orthogonal.
"""
from __future__ import annotations

import math

import torch


def rms_J(sumsq_per_channel: torch.Tensor, count: float) -> float:
    """J = ||X||_F / sqrt(B·N·C) from per-input-channel sums of squares over `count` rows (B·N tokens).

    With the store's per-channel `rms` instead, rms_J(rms**2, 1) gives the same J.
    """
    ssq = sumsq_per_channel.detach().double()
    if count <= 0 or ssq.numel() == 0:
        raise ValueError("rms_J needs count > 0 and at least one channel")
    return math.sqrt(float(ssq.sum()) / (float(count) * ssq.numel()))


def choose_rotation(J: float, threshold: float = 1.0) -> str:
    """ARS's rule: small-RMS layers get a Hadamard, the others the outlier-aware transform."""
    return "hadamard" if J < threshold else "outlier_aware"


def _estimate(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Absmax estimate per channel: coherent salient part + quadrature bulk part. m [s, ..., b], v [..., b]."""
    return m.abs().sum(0) + v.clamp(min=0).sqrt()


def _reflect(mb: torch.Tensor, vb: torch.Tensor, z: torch.Tensor, w: torch.Tensor):
    """The model after the Householder G = I - 2uuᵀ mapping unit z to unit w, in every block at once.

    mb [s, nb, b] (salient rows, exact: m·G), vb [nb, b] (bulk, as independent channels: v·(G∘G)).
    """
    w = w * torch.where((z * w).sum(1, keepdim=True) > 0, -1.0, 1.0)   # sign keeps ||z - w|| ≥ √2
    u = z - w
    u = u / u.norm(dim=1, keepdim=True)
    m = mb - 2 * torch.einsum("snb,nb->sn", mb, u)[..., None] * u
    u2 = u * u                                          # (G∘G)_kj = δ_kj(1 - 4u_j²) + 4u_k²u_j²
    v = vb * (1 - 4 * u2) + 4 * u2 * (vb * u2).sum(1, keepdim=True)
    return u, m, v, _estimate(m, v)


def _greedy_blocks(m: torch.Tensor, v: torch.Tensor, block: int, steps: int, gen: torch.Generator):
    """Greedy Householder rotations inside each block. m [s, C], v [C] in the current channel basis.

    Each step spreads what dominates the block's largest channel d: the dominating salient row's
    content in the block (for a fresh outlier that is e_d itself, as in DuQuant; after the zigzag it is
    the share of that outlier the block received), else e_d. The flat target w covers the t channels
    with the least other load, t in (block, block/2, block/4, block/8): spreading two outliers over
    disjoint channels avoids stacking them (under the coherent model). The best t is tried; the step
    is kept only if it lowers the block's max. Returns (rotations [nb, block, block] float64, m, v, kept [nb]).
    """
    s, c = m.shape
    nb = c // block
    mb, vb = m.reshape(s, nb, block).clone(), v.reshape(nb, block).clone()
    rot = torch.eye(block, dtype=torch.float64).repeat(nb, 1, 1)
    kept = torch.zeros(nb, dtype=torch.long)
    est = _estimate(mb, vb)
    rows = torch.arange(nb)
    sizes = [t for t in (block, block // 2, block // 4, block // 8) if t >= 2]
    for _ in range(steps):
        d = est.argmax(1)
        z = torch.zeros(nb, block, dtype=torch.float64)
        z[rows, d] = 1.0
        moved = torch.zeros(nb, block, dtype=torch.float64)
        moved[rows, d] = est[rows, d]
        if s:
            top = mb[:, rows, d].abs().argmax(0)        # salient row dominating channel d
            zs = mb[top, rows]
            use = (mb[top, rows, d].abs() > vb[rows, d].clamp(min=0).sqrt())[:, None]
            z = torch.where(use, zs / zs.norm(dim=1, keepdim=True).clamp(min=1e-300), z)
            moved = torch.where(use, zs.abs(), moved)
        order = torch.argsort((est - moved).clamp(min=0), dim=1)   # least loaded channels first
        best = None
        for t in sizes:
            sgn = (torch.randint(0, 2, (nb, t), generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(t)
            cand = _reflect(mb, vb, z, torch.zeros(nb, block, dtype=torch.float64).scatter(1, order[:, :t], sgn))
            if best is None:
                best = cand
            else:
                better = cand[3].amax(1) < best[3].amax(1)
                best = tuple(torch.where(better[None, :, None] if x.dim() == 3 else better[:, None], x, y)
                             for x, y in zip(cand, best))
        u, m_new, v_new, est_new = best
        ok = est_new.amax(1) < est.amax(1) * (1 - 1e-6)
        if not ok.any():
            continue
        mb = torch.where(ok[:, None], m_new, mb)
        vb = torch.where(ok[:, None], v_new, vb)
        est = torch.where(ok[:, None], est_new, est)
        ru = torch.einsum("nij,nj->ni", rot, u)         # rot ← rot·G, as a rank-1 update
        rot = torch.where(ok[:, None, None], rot - 2 * ru[..., None] * u[:, None, :], rot)
        kept += ok.long()
    return rot, mb.reshape(s, c), vb.reshape(c), kept


def zigzag_permutation(est: torch.Tensor, block: int) -> torch.Tensor:
    """perm [C] with (X·P)[:, new] = X[:, perm[new]]: channels sorted by est, dealt to the blocks
    0, 1, ..., nb-1, nb-1, ..., 0, 0, 1, ... so every block gets a balanced share of the large ones."""
    c = est.numel()
    nb = c // block
    order = torch.argsort(est, descending=True, stable=True)
    t = torch.arange(c)
    rnd, i = t // nb, t % nb
    blk = torch.where(rnd % 2 == 0, i, nb - 1 - i)
    perm = torch.empty(c, dtype=torch.long)
    perm[blk * block + rnd] = order
    return perm


def outlier_aware_rotation(absmax_per_channel: torch.Tensor, block: int = 128, steps: int = 256, seed: int = 0,
                           salient: float = 4.0, max_salient: int = 64,
                           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict]:
    """DuQuant's R = R1·P·R2 from per-channel absmax, as one dense orthogonal [C, C] matrix.

    R1, R2: greedy block rotations (blocks of `block`, up to `steps` kept-or-rejected tries each);
    P: zigzag permutation on the estimates after R1. C must be a multiple of `block` (the block-diagonal
    rotations need whole blocks; pad the layer or choose a divisor of C as `block`). Channels above
    `salient`·median are modelled as coherent outliers (the `max_salient` largest; the rest join the
    bulk: each step costs O(4·max_salient·C)).
    info: max/mean of the absmax (before) and of the model's estimate (after), steps kept, salient count.
    """
    a = absmax_per_channel.detach().double().flatten().abs()
    c = a.numel()
    if block < 2 or c % block:
        raise ValueError(f"outlier_aware_rotation: C={c} is not a multiple of block={block} (block >= 2)")
    if not torch.isfinite(a).all():
        raise ValueError("outlier_aware_rotation: absmax has non-finite entries")
    ref = a.median()
    ref = ref if ref > 0 else a.mean()
    cand = torch.nonzero(a > salient * ref).flatten()
    sal = cand[torch.argsort(a[cand], descending=True)[:max_salient]]
    m = torch.zeros(sal.numel(), c, dtype=torch.float64)
    m[torch.arange(sal.numel()), sal] = a[sal]
    v = a * a
    v[sal] = 0.0
    gen = torch.Generator().manual_seed(int(seed))

    r1, m, v, kept1 = _greedy_blocks(m, v, block, steps, gen)
    perm = zigzag_permutation(_estimate(m, v), block)
    r2, m, v, kept2 = _greedy_blocks(m[:, perm], v[perm], block, steps, gen)

    rot = _assemble(r1, perm, r2, dtype)
    est = _estimate(m, v)
    info = {"ratio_before": _peak_ratio(a), "ratio_after": _peak_ratio(est), "absmax_before": float(a.max()),
            "absmax_after_est": float(est.max()), "salient": int(sal.numel()),
            "steps_kept": (int(kept1.sum()), int(kept2.sum())), "block": block}
    return rot, info


def _peak_ratio(a: torch.Tensor) -> float:
    """max/mean of a per-channel absmax: 1 is perfectly flat."""
    return float(a.max() / a.mean()) if a.mean() > 0 else 1.0


def _assemble(r1: torch.Tensor, perm: torch.Tensor, r2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dense blockdiag(r1) · P · blockdiag(r2) without dense products: row i of R1 has `block` non-zeros
    (its block), and R1 column j lands, through P, in R2's block perm⁻¹(j) // block, so each row of R is
    a sum of `block` scaled rows of one R2 block each: O(C·block²) work."""
    nb, b, _ = r1.shape
    c = nb * b
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(c)
    tb, ts = inv // b, inv % b                          # where R1's output channel j goes: block, slot
    r1, r2 = r1.to(dtype), r2.to(dtype)
    out = torch.zeros(c, nb, b, dtype=dtype)
    rows = torch.arange(c)
    blk_of_row = rows // b
    for jl in range(b):                                 # each row meets one j per pass: no index clashes
        j = blk_of_row * b + jl
        coef = r1[blk_of_row, rows % b, jl]
        out[rows, tb[j]] += coef[:, None] * r2[tb[j], ts[j]]
    return out.reshape(c, c)
