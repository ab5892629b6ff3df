"""TLQ: twin-log weight quantization (LRQ-DiT), as pure functions, plus the `"tlq"` codec (TLQ_CODEC).

Format (the loader depends on it). A b-bit code is a sign bit (bit b-1; 1 = negative) above a
(b-1)-bit magnitude index m in 0..M-1, M = 2^(b-1). Each output row r has one log-domain grid per sign
σ, and each (row, group) an absmax scale:

    level_σ,r(m) = 2^(B_σ,r + m·D_σ,r) - eta          (magnitude in the normalised domain)
    w[r, c]      = ±level_σ,r(m) · scale[r, group(c)]

Buffers: `scales` fp16 [out, n_groups], `grid` fp16 [out, 4] = (B_pos, D_pos, B_neg, D_neg),
`eta` fp32 [1] (one per layer). The kernel ops take `grid` as their `aux`; the decode table is one per row,
code = sign·M + m indexing [level_pos | -level_neg] (tlq_signed_levels).

Quantizer. Each group is divided by its absmax (so u is in [-1, 1]); per row and sign,
L = log2(|u| + eta), bottom = a low quantile of L (the minimum in the paper; here searched among
DEFAULT_BOTTOMS), top = the p-quantile of L (the clip), D = (top - bottom)/(M - 1). eta is searched per
layer; the bottom and top quantiles per row and sign (the grid is stored per row and sign anyway).
The released LRQ-DiT code fills the other sign's positions with 0 in the log domain before the
min/percentile, which pins the top of the grid at log2(1) = 0 whenever |w| + eta < 1 (METHODS.md);
here each row is normalised first and the statistics are taken over that sign's entries only (masked),
so the grid always spans that sign's own range. Grid parameters and scales are rounded to fp16 *before*
codes are assigned, and codes are the nearest decoded level in the value domain, so the stored model is
exactly the one whose error was measured. eta and p are searched per layer by weight MSE; the error of
every candidate is computed exactly from per-row sorted magnitudes and prefix sums (one sort per layer,
then O(rows·M·log in) per candidate), so even 4096x4096 layers are searched on all rows.

Zeros. Exact zeros (and rows or groups that are all zero) take the positive sign. With eta > 0 their
L = log2(eta) is the row's minimum, so B_pos = log2(eta) and level(0) = 2^fp16(log2 eta) - eta: zero up
to the fp16 rounding of B (|error| < 0.003·eta·scale). With eta = 0, log2(0) = -inf is left out of the
statistics and zeros decode to the smallest level 2^B_pos (the row's smallest positive magnitude). A sign
with no entries gets B = log2(eta) (or -24 when eta = 0) and D = 0; an all-zero group has scale 0 and
decodes to exactly 0.
"""
from __future__ import annotations

import math

import torch

from .codecs import KernelArgs, register_codec
from .groups import expand_groups, group_view, num_groups

DEFAULT_ETAS = (0.0, 0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_PERCENTILES = (0.98, 0.99, 0.999, 0.9999, 0.99999, 1.0)
# Bottom of each sign's grid: a low quantile of log2(|u| + eta) rather than always the minimum, so a
# sign's lowest level need not sit at ~0 (with both signs starting at ~0, 2 of 2^b levels are spent on
# zero); searched per row and sign like the top, at no storage cost (the grid is stored per row and sign).
# A sign that holds exact zeros keeps the minimum, so exact zeros still decode to ~0 (see Zeros above).
DEFAULT_BOTTOMS = (0.0, 0.01, 0.03, 0.06, 0.1, 0.15)
_EMPTY_LOG = -24.0          # bottom of an empty sign's grid when eta = 0 (2^-24 ~ 0)
_CHUNK_ELEMS = 1 << 20      # rows per search chunk ≈ this / in_features (bounds the float64 prefix sums)


# -- scales ------------------------------------------------------------------------------------------
def absmax_scales(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Per-(row, group) absmax, rounded to its fp16 storage: [out, G] fp16."""
    return group_view(w, group_size).abs().amax(-1).to(torch.float16)


def normalise(w: torch.Tensor, scales16: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """u = w / scale with the stored fp16 scale; an all-zero group (scale 0) gives u = 0."""
    s = expand_groups(scales16.float(), w.shape[1], group_size)
    return torch.where(s > 0, w / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(w))


# -- decoding -----------------------------------------------------------------------------------------
def tlq_levels(grid: torch.Tensor, eta: torch.Tensor | float, bits: int) -> torch.Tensor:
    """grid [..., 4] (B_pos, D_pos, B_neg, D_neg) -> magnitudes [..., 2, M] (sign 0 = pos, 1 = neg), fp32.

    The single place levels are computed: the search, the code assignment and the decoder all call it,
    so what was measured is what is decoded."""
    g = grid.float().unflatten(-1, (2, 2))                                    # [..., sign, (B, D)]
    m = torch.arange(1 << (bits - 1), device=grid.device, dtype=torch.float32)
    eta = torch.as_tensor(eta, dtype=torch.float32, device=grid.device)
    return torch.exp2(g[..., :1] + m * g[..., 1:]) - eta


def tlq_signed_levels(grid: torch.Tensor, eta: torch.Tensor | float, bits: int) -> torch.Tensor:
    """grid [out, 4] -> the signed level of every code, fp32 [out, 2^bits]: code = sign·M + m indexes
    [pos | -neg] (the decoder's and the kernels' table)."""
    levels = tlq_levels(grid, eta, bits)
    return torch.cat([levels[:, 0], -levels[:, 1]], 1)


def tlq_dequantize(codes: torch.Tensor, buffers: dict[str, torch.Tensor], bits: int,
                   group_size: int | None) -> torch.Tensor:
    """codes int64 [out, in] + {scales, grid, eta} -> fp32 weight [out, in]."""
    n = codes.shape[1]
    signed = tlq_signed_levels(buffers["grid"], buffers["eta"].float().reshape(()), bits)
    return signed.gather(1, codes) * expand_groups(buffers["scales"].float(), n, group_size)


def tlq_assign(u: torch.Tensor, grid16: torch.Tensor, eta: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest-level codes for normalised weights u [out, in] under the stored grid [out, 4]."""
    return _assign(u, tlq_levels(grid16, eta, bits), bits)


def _assign(u: torch.Tensor, lev: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest-level codes for u [out, k] under magnitudes lev [out, 2, M]."""
    mids = (lev[..., 1:] + lev[..., :-1]) / 2                                 # non-decreasing (D >= 0)
    a, neg = u.abs(), u < 0
    m_pos = torch.searchsorted(mids[:, 0].contiguous(), a, right=True)
    m_neg = torch.searchsorted(mids[:, 1].contiguous(), a, right=True)
    return torch.where(neg, m_neg + (1 << (bits - 1)), m_pos)


def tlq_column_quantizer(buffers: dict[str, torch.Tensor], bits: int, group_size: int | None):
    """For GPTQ (gptq.py): a function (column values [out], column index) -> (codes, decoded values) that
    rounds one column to the nearest level of the fixed grid and scales in `buffers`."""
    eta = buffers["eta"].float().reshape(())
    lev = tlq_levels(buffers["grid"], eta, bits)                             # [out, 2, M]
    signed = tlq_signed_levels(buffers["grid"], eta, bits)                  # code -> signed magnitude
    scales = buffers["scales"].float()

    def quantize_column(col: torch.Tensor, i: int):
        s = scales[:, i // group_size if group_size else 0]
        u = torch.where(s > 0, col / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(col))
        c = _assign(u[:, None], lev, bits)[:, 0]
        return c, signed.gather(1, c[:, None])[:, 0] * s
    return quantize_column


# -- the search -----------------------------------------------------------------------------------------
class _SignStats:
    """Per row and sign: magnitudes sorted ascending (other sign's positions = +inf, masked out), counts,
    and float64 prefix sums of s², s²a, s²a² (s = the weight's group scale), which give any candidate
    grid's weight-domain squared error from M-1 binary searches per row and sign."""

    def __init__(self, u: torch.Tensor, s: torch.Tensor):
        a = u.abs()
        member = torch.stack([u >= 0, u < 0], dim=1)                          # [R, 2, N]
        inf = torch.tensor(float("inf"), device=u.device)
        self.sorted, order = torch.where(member, a[:, None], inf).sort(dim=-1)
        self.n = member.sum(-1)                                               # [R, 2]
        self.zeros = (member & (a[:, None] == 0)).sum(-1)                     # exact zeros per sign
        valid = torch.arange(a.shape[1], device=u.device) < self.n[..., None]
        a_s = torch.where(valid, self.sorted, torch.zeros_like(self.sorted)).double()
        s2 = torch.where(valid, (s.double() ** 2)[:, None].expand_as(order).gather(-1, order), 0.0)
        zero = torch.zeros(*a_s.shape[:-1], 1, dtype=torch.float64, device=u.device)
        self.prefix = [torch.cat([zero, t.cumsum(-1)], -1) for t in (s2, s2 * a_s, s2 * a_s * a_s)]

    def grids(self, eta: float, percentiles: torch.Tensor, bits: int, bottoms: torch.Tensor) -> torch.Tensor:
        """Candidate grids for one eta: every (bottom quantile, top percentile) pair, rounded to fp16:
        [C, R, 2, 2] (C = len(bottoms) * len(percentiles); last dim (B, D) per sign)."""
        start = self.zeros if eta == 0 else torch.zeros_like(self.zeros)      # log2(0) = -inf is left out
        cnt = self.n - start
        last = (self.n - 1).clamp(min=0)

        def log_q(q):   # log2(a + eta) at quantile q [C] of each (row, sign), linear interpolation
            pos = start + q[:, None, None] * (cnt - 1).clamp(min=0)           # [C, R, 2]
            lo = pos.floor().long().clamp(max=last)
            hi = (lo + 1).clamp(max=last)
            frac = (pos - lo).float()
            sorted_ = self.sorted.expand(lo.shape[0], *self.sorted.shape)
            at = lambda i: torch.log2(sorted_.gather(-1, i[..., None])[..., 0] + eta)  # noqa: E731
            return at(lo) + frac * (at(hi) - at(lo))

        qb = bottoms.repeat_interleave(len(percentiles))
        qt = percentiles.repeat(len(bottoms))
        bottom, top = log_q(qb), log_q(qt)
        # a sign holding exact zeros keeps its bottom at the minimum (log2(eta), or the smallest magnitude
        # when eta = 0), so zeros decode to ~0 (or to the smallest level) as documented above
        bottom = torch.where(self.zeros[None] > 0, log_q(torch.zeros_like(qb)), bottom)
        empty = cnt[None].expand_as(bottom) == 0
        b_empty = math.log2(eta) if eta > 0 else _EMPTY_LOG
        bottom = torch.where(empty, torch.full_like(bottom, b_empty), bottom)
        step = torch.where(empty, torch.zeros_like(top), (top - bottom).clamp(min=0) / ((1 << (bits - 1)) - 1))
        return torch.stack([bottom, step], -1).to(torch.float16)               # [C, R, 2, 2]

    def errors(self, grids16: torch.Tensor, eta: torch.Tensor, bits: int) -> torch.Tensor:
        """Exact sum of s²(a - level)² per candidate, row and sign for grids [C, R, 2, 2]: [C, R, 2] float64."""
        C, R = grids16.shape[:2]
        lev = tlq_levels(grids16.flatten(-2), eta, bits).permute(1, 2, 0, 3)  # [R, 2, C, M]
        mids = ((lev[..., 1:] + lev[..., :-1]) / 2).flatten(-2)               # [R, 2, C*(M-1)]
        idx = torch.searchsorted(self.sorted, mids.contiguous(), side="left").view(R, 2, C, -1)
        zero = torch.zeros_like(idx[..., :1])
        edges = torch.cat([zero, idx, self.n[:, :, None, None].expand(R, 2, C, 1)], -1)  # [R, 2, C, M+1]
        flat = edges.flatten(-2)
        s0, s1, s2 = (p.gather(-1, flat).view_as(edges).diff(dim=-1) for p in self.prefix)
        lev = lev.double()
        return (s2 - 2 * lev * s1 + lev * lev * s0).sum(-1).permute(2, 0, 1)  # [C, R, 2]


def _search(u, s, bits, etas, percentiles, bottoms):
    """Per eta: the best (bottom, top) candidate of every (row, sign) — errors separate by row and
    sign, and the grid is stored per row and sign, so each picks its own — and the eta whose total
    error is lowest (eta is one per layer). Returns (errors [E], grids [E, R, 4] fp16, chosen [E, R, 2])."""
    R, N = u.shape
    pct = torch.tensor(percentiles, dtype=torch.float64, device=u.device)
    bot = torch.tensor(bottoms, dtype=torch.float64, device=u.device)
    err = torch.zeros(len(etas), dtype=torch.float64, device=u.device)
    grids = torch.empty(len(etas), R, 4, dtype=torch.float16, device=u.device)
    chosen = torch.empty(len(etas), R, 2, dtype=torch.long, device=u.device)
    rows = max(1, _CHUNK_ELEMS // max(N, 1))
    for r0 in range(0, R, rows):
        st = _SignStats(u[r0:r0 + rows], s[r0:r0 + rows])
        for e, eta in enumerate(etas):
            g = st.grids(eta, pct, bits, bot)                                  # [C, r, 2, 2]
            ce = st.errors(g, torch.tensor(eta, dtype=torch.float32), bits)    # [C, r, 2]
            best, arg = ce.min(0)                                              # [r, 2]
            err[e] += best.sum()
            pick = g.gather(0, arg[None, ..., None].expand(1, *arg.shape, 2))[0]        # [r, 2, 2]
            grids[e, r0:r0 + rows] = pick.flatten(-2)
            chosen[e, r0:r0 + rows] = arg
    return err, grids, chosen


def tlq_quantize(w: torch.Tensor, bits: int, group_size: int | None = None,
                 etas=DEFAULT_ETAS, percentiles=DEFAULT_PERCENTILES, bottoms=DEFAULT_BOTTOMS):
    """Quantize w [out, in] with TLQ, searching eta (per layer) and the grid's top clip percentile and
    bottom quantile (per row and sign) by weight MSE.

    Returns (codes int64 [out, in], buffers {scales, grid, eta}, info {eta, percentile, mse, sqnr_db})."""
    if not 2 <= bits <= 8:
        raise ValueError(f"TLQ needs 2..8 bits (a sign bit plus a magnitude index), got {bits}")
    if w.dim() != 2 or not torch.isfinite(w).all():
        raise ValueError("tlq_quantize expects a finite 2-D weight [out, in]")
    if not etas or not percentiles or min(etas) < 0 or not all(0 < p <= 1 for p in percentiles):
        raise ValueError("etas must be >= 0 and percentiles in (0, 1], both non-empty")
    w = w.detach().float()
    scales = absmax_scales(w, group_size)
    u = normalise(w, scales, group_size)
    s = expand_groups(scales.float(), w.shape[1], group_size)
    err, grids, chosen = _search(u, s, bits, tuple(float(e) for e in etas), tuple(float(p) for p in percentiles),
                                 tuple(float(b) for b in bottoms))
    e = int(err.argmin())
    eta = torch.tensor([etas[e]], dtype=torch.float32, device=w.device)
    buffers = {"scales": scales, "grid": grids[e].clone(), "eta": eta}
    codes = torch.empty(w.shape, dtype=torch.long, device=w.device)
    noise = signal = 0.0
    rows = max(1, _CHUNK_ELEMS // max(w.shape[1], 1))   # row chunks: whole-matrix temporaries are ~1 GB at 12288x3072
    for r0 in range(0, w.shape[0], rows):
        part = {"scales": scales[r0:r0 + rows], "grid": buffers["grid"][r0:r0 + rows], "eta": eta}
        codes[r0:r0 + rows] = tlq_assign(u[r0:r0 + rows], part["grid"], eta[0], bits)
        wr = w[r0:r0 + rows].double()
        noise += float((wr - tlq_dequantize(codes[r0:r0 + rows], part, bits, group_size).double()).pow(2).sum())
        signal += float(wr.pow(2).sum())
    top = torch.bincount(chosen[e].flatten() % len(percentiles), minlength=len(percentiles))
    bot = torch.bincount(chosen[e].flatten() // len(percentiles), minlength=len(bottoms))
    return codes, buffers, {"eta": float(etas[e]),
                            "percentile": float(percentiles[int(top.argmax())]),   # the most chosen per row
                            "bottom_quantile": float(bottoms[int(bot.argmax())]),
                            **_error(noise, signal, w.numel())}


def weight_error(w: torch.Tensor, w_hat: torch.Tensor) -> dict:
    """MSE and SQNR (dB) of a reconstruction."""
    noise = signal = 0.0
    rows = max(1, _CHUNK_ELEMS // max(w.shape[-1], 1))      # row blocks: no float64 copy of a whole weight
    for r0 in range(0, w.shape[0], rows):
        wr = w[r0:r0 + rows].double()
        noise += float((wr - w_hat[r0:r0 + rows].double()).pow(2).sum())
        signal += float(wr.pow(2).sum())
    return _error(noise, signal, w.numel())


def _error(noise: float, signal: float, n: int) -> dict:
    sqnr = float("inf") if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)
    return {"mse": noise / max(n, 1), "sqnr_db": sqnr}


class TLQCodec:
    name = "tlq"
    kernel_args = KernelArgs(scales="scales", aux="grid", eta="eta")

    def buffer_specs(self, out_features, in_features, bits, group_size):
        return {"scales": ((out_features, num_groups(in_features, group_size)), torch.float16),
                "grid": ((out_features, 4), torch.float16),
                "eta": ((1,), torch.float32)}

    def dequantize(self, codes, buffers, bits, group_size):
        return tlq_dequantize(codes, buffers, bits, group_size)

    def signed_levels(self, buffers, bits):
        """One table per row: [out, 1, 2^bits]."""
        return tlq_signed_levels(buffers["grid"], buffers["eta"].float().reshape(()), bits)[:, None]


TLQ_CODEC = register_codec(TLQCodec())
