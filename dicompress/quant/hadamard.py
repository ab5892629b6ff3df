"""Exact Hadamard matrices for the widths DiTs use, and a fast transform that never builds them.

An order-n Hadamard matrix has entries ±1 and H Hᵀ = n I; every function here returns the
orthonormal H/√n. Orders are built as H_n = H_p ⊗ S_{2^k} (Kronecker product, in that order), where
S is Sylvester's matrix and the base H_p is one of
  - 1 (n a power of two: pure Sylvester),
  - Paley I,  p = q + 1     for q prime, q ≡ 3 (mod 4)   (12, 20, 24, 32, 44, 48, 60, 68, 72, 80, ...),
  - Paley II, p = 2(q + 1)  for q prime, q ≡ 1 (mod 4)   (12, 28, 36, 60, 76, 108, 124, ...).
For n = m·2^k (m odd) the smallest base p = m·2^j (j ≤ k) that one of these gives is used, so the dense
part stays small. Covered widths include every power of two and the FLUX / Qwen-Image ones:
3072 = 12·256, 9216 = 36·256 (fused QKV), 12288 = 12·1024 (FFN), 15360 = 60·256 (FLUX single-block
proj_out input), 3584 = 28·128 (Qwen2.5-VL text width), 2304, 4608, 6144, 1536, 1152 ...
Not built: n ≠ 1, 2 not divisible by 4 (no Hadamard matrix exists), and orders whose odd part m has no
prime of the forms above (only prime q, not prime powers: 28 from GF(27) is covered by Paley II anyway).
The first odd parts left out are listed by `unsupported_odd_parts()`; e.g. 92 = 23·4 (it exists, by
Williamson's construction, which is not implemented).

Index convention: row/column i = a·2^k + b with a indexing H_p and b indexing S, so for a row vector x,
x @ H_n = (FWHT along b) then (H_p applied along a) — that is what `apply_hadamard` computes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..compile_hints import assume_constant_result


@dataclass(frozen=True)
class HadamardPlan:
    """How order n is built: H_n = H_base ⊗ S_pow2, base made by `kind` ("sylvester", "paley1", "paley2")."""
    n: int
    base: int
    kind: str
    pow2: int


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, math.isqrt(q) + 1, 2))


def _base_kind(p: int) -> str | None:
    """Which construction gives a Hadamard matrix of order p directly, if any."""
    if p == 1:
        return "sylvester"
    if p % 4 == 0 and _is_prime(p - 1) and (p - 1) % 4 == 3:
        return "paley1"
    if p % 8 == 4 and _is_prime(p // 2 - 1) and (p // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def _plan_or_none(n: int) -> HadamardPlan | None:
    if not isinstance(n, int) or n < 1:
        return None
    k = (n & -n).bit_length() - 1                      # n = m·2^k, m odd
    m = n >> k
    if m == 1:
        return HadamardPlan(n, 1, "sylvester", n)
    for j in range(k + 1):                              # smallest base: least dense work
        kind = _base_kind(m << j)
        if kind is not None:
            return HadamardPlan(n, m << j, kind, 1 << (k - j))
    return None


def unsupported_odd_parts(limit: int = 200) -> list[int]:
    """Odd m < limit for which no m·2^k (any k ≤ 12) is buildable here."""
    return [m for m in range(3, limit, 2) if _plan_or_none(m << 12) is None]


def _unsupported_message(n) -> str:
    why = ("no Hadamard matrix exists unless n is 1, 2 or a multiple of 4"
           if isinstance(n, int) and n > 2 and n % 4 else "not a product of the implemented constructions")
    return (f"no Hadamard matrix of order {n} ({why}). Supported: powers of two, and p·2^k where p = q+1 "
            f"(q prime ≡ 3 mod 4, Paley I) or p = 2(q+1) (q prime ≡ 1 mod 4, Paley II), e.g. 12, 20, 28, 36, "
            f"44, 60 times 2^k: 3072, 9216, 12288, 15360. Odd parts never buildable here (below 200): "
            f"{unsupported_odd_parts()}")


def hadamard_plan(n: int) -> HadamardPlan:
    plan = _plan_or_none(n)
    if plan is None:
        raise ValueError(_unsupported_message(n))
    return plan


def can_hadamard(n: int) -> bool:
    return _plan_or_none(n) is not None


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j - i), χ the quadratic character mod the prime q."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[[(x * x) % q for x in range(1, q)]] = 1.0
    chi[0] = 0.0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _sylvester(m: int, dtype=torch.float64) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@assume_constant_result
def _base_matrix(p: int) -> torch.Tensor:
    """Unnormalised ±1 Hadamard matrix of a base order (float64; do not modify in place). torch.compile calls
    this at trace time and keeps the tensor as a constant: tracing into the cached build would break the graph
    at its data-dependent check (torch.equal) on every call, as it does with gradients on."""
    return _build_base_matrix(p)


@lru_cache(maxsize=32)
def _build_base_matrix(p: int) -> torch.Tensor:
    kind = _base_kind(p)
    if kind == "sylvester":
        h = torch.ones(1, 1, dtype=torch.float64)
    elif kind == "paley1":
        q = p - 1                                       # Q antisymmetric: H = I + [[0, 1ᵀ], [-1, Q]]
        s = torch.zeros(p, p, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        h = torch.eye(p, dtype=torch.float64) + s
    elif kind == "paley2":
        q = p // 2 - 1                                  # symmetric conference matrix C, then double it
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        h = torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    else:
        raise ValueError(_unsupported_message(p))
    if not torch.equal(h @ h.T, p * torch.eye(p, dtype=torch.float64)):   # cheap: bases are small
        raise AssertionError(f"{kind} construction of order {p} is not Hadamard")
    return h


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal H_n / √n, [n, n], in the Kronecker order H_p ⊗ S_2^k. ValueError if n is not buildable."""
    plan = hadamard_plan(n)
    wd = _work_dtype(dtype)
    h = torch.kron(_base_matrix(plan.base).to(wd), _sylvester(plan.pow2, wd))
    return h.mul_(1.0 / math.sqrt(n)).to(dtype)


def block_hadamard(n: int, block: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Block-diagonal I_{n/block} ⊗ H_block (orthonormal): mixes channels only within each block."""
    if block < 1 or n % block:
        raise ValueError(f"block_hadamard: n={n} is not a multiple of block={block}")
    wd = _work_dtype(dtype)
    return torch.kron(torch.eye(n // block, dtype=wd), hadamard_matrix(block, wd)).to(dtype)


def _fwht_unnormalised(x: torch.Tensor) -> torch.Tensor:
    """x @ S_m along the last dim (m = x.shape[-1] a power of two), by log2(m) butterfly stages."""
    m = x.shape[-1]
    lead = x.shape[:-1]
    if torch.is_grad_enabled() and x.requires_grad:     # out= has no autograd: stack the stages (same sums)
        h = 1
        while h < m:
            y = x.reshape(*lead, m // (2 * h), 2, h)
            x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2).reshape(*lead, m)
            h *= 2
        return x
    src, dst, spare = x.contiguous(), torch.empty_like(x, memory_format=torch.contiguous_format), None
    h = 1
    while h < m:                                        # pairs (i, i+h) inside blocks of 2h: (a+b, a-b)
        y = src.view(*lead, m // (2 * h), 2, h)
        out = dst.view(*lead, m // (2 * h), 2, h)
        torch.add(y[..., 0, :], y[..., 1, :], out=out[..., 0, :])   # written in place of a stack of the two:
        torch.sub(y[..., 0, :], y[..., 1, :], out=out[..., 1, :])   # the same sums, two passes fewer
        if spare is None:                               # never write into the caller's x: a second buffer
            spare = torch.empty_like(dst)
            src, dst = dst, spare
        else:
            src, dst = dst, src
        h *= 2
    return src


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalised fast Walsh–Hadamard transform along the last dim: x @ S_n / √n in O(n log n)."""
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two last dim, got {n}")
    return _fwht_unnormalised(x) * (1.0 / math.sqrt(n))


_CPU_CHUNK_BYTES = 2 << 20


def apply_hadamard(x: torch.Tensor, n_or_plan: int | HadamardPlan | None = None,
                   transpose: bool = False) -> torch.Tensor:
    """x @ H_n (or x @ H_nᵀ) along the last dim without building H_n: FWHT on the 2^k factor, dense H_p.

    Equal to `x @ hadamard_matrix(n)` (same Kronecker order). S is symmetric, so only H_p is transposed.
    For the randomised Q = diag(s)·H use apply_hadamard(x * s); to fold into a Linear weight W [out, in]
    acting as x @ Wᵀ, the folded weight is apply_hadamard(W) (rows rotate like activations).
    """
    n = x.shape[-1]
    plan = n_or_plan if isinstance(n_or_plan, HadamardPlan) else hadamard_plan(n if n_or_plan is None else n_or_plan)
    if plan.n != n:
        raise ValueError(f"apply_hadamard: last dim {n} != planned order {plan.n}")
    lead = x.shape[:-1]
    if x.device.type == "cpu" and x.numel() * x.element_size() > 2 * _CPU_CHUNK_BYTES and x.dim() > 1:
        # row blocks that stay in cache through the log2(n) butterfly passes: the same ops per row (bit for
        # bit), 4-6x faster at FLUX's 12288 / 15360 widths than streaming every pass through memory
        rows = x.reshape(-1, n)
        step = max(1, _CPU_CHUNK_BYTES // (n * x.element_size()))
        return torch.cat([apply_hadamard(c, plan, transpose) for c in rows.split(step)]).reshape(*lead, n)
    y = _fwht_unnormalised(x.reshape(*lead, plan.base, plan.pow2))
    if plan.base > 1:
        hp = _base_matrix(plan.base).to(device=x.device, dtype=x.dtype)
        y = torch.einsum("...ab,ac->...cb", y, hp.T if transpose else hp)
    return (y * (1.0 / math.sqrt(n))).reshape(*lead, n)


def random_signs(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n independent ±1 values from a seeded generator (same seed, same signs, on any machine)."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(dtype)


def randomized_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Q = diag(s)·H_n / √n: orthonormal; the random signs break H's structure (QuaRot-style)."""
    wd = _work_dtype(dtype)
    return (random_signs(n, seed, wd)[:, None] * hadamard_matrix(n, wd)).to(dtype)
