"""TLQ's grid chosen by the layer's output error after GPTQ ("GPTQ-aware" grid search), as pure functions.

tlq_quantize picks eta (per layer) and each row and sign's (bottom, top) quantiles by weight MSE under
nearest rounding; GPTQ then chooses codes on that fixed grid. The grid that rounds best is not the one
GPTQ does best on: clipping the top of a row saves rounding error, but a clipped weight's error is large
and GPTQ can only spread it, while a wider grid's extra rounding error is what GPTQ compensates. Here each
candidate grid is scored by what is finally stored: the output error tr(ΔW H ΔWᵀ) with ΔW the error of
GPTQ's codes on that grid (H = the layer's calibration input second moment).

Cheap because GPTQ is row-independent given H (each row's feedback uses only its own errors and the
shared inverse-Hessian factor): candidates are run as extra rows of one GPTQ call, each row's output error
Δw H Δwᵀ is its own, and so the grid can be chosen per row (the format stores one grid per row anyway)
at the cost of one GPTQ over C·R rows. eta is one per layer (a stored scalar), so:

1. on a subsample of rows, for every eta: GPTQ on every (bottom, top) pair plus the weight-MSE grid of
   that eta; the eta whose rows' best candidates sum lowest wins, and the pairs that rows choose most
   often are the shortlist;
2. on all rows, the chosen eta's shortlist (always with its weight-MSE grid), each row taking its best.

The weight-MSE choice (tlq_quantize's eta and grid) is always a candidate, so on the rows scored the
search can never do worse than it. Large etas (1, 2, 4) make the log grid near-uniform (2^(B + mD) - eta
is nearly linear in m when the normalised range is small against eta), so a row can take the shape
uniform GPTQ uses; the grid is rounded to fp16 before scoring, which is what bounds eta (a larger eta's
fp16 B loses the precision the levels need).
"""
from __future__ import annotations

import math

import torch

from .gptq import gptq_codes, gptq_dtype
from .groups import expand_groups
from .tlq import (DEFAULT_BOTTOMS, DEFAULT_ETAS, DEFAULT_PERCENTILES, _SignStats, absmax_scales, normalise,
                  tlq_assign, tlq_column_quantizer, tlq_dequantize, tlq_quantize, weight_error)

OUTPUT_ETAS = DEFAULT_ETAS + (1.0, 2.0, 4.0)   # + near-uniform shapes
SAMPLE_ROWS = 128      # rows scored for every (eta, pair) in step 1
SHORTLIST = 6          # (bottom, top) pairs carried to all rows in step 2, besides the weight-MSE grid


def row_output_errors(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row output error Δw H Δwᵀ for w, ŵ [R, n] and H [n, n]: float64 [R]."""
    dtype = gptq_dtype(w.shape[1])
    e = (w - w_hat).to(dtype)
    return ((e @ hessian.to(dtype)) * e).sum(1).double()


def gptq_candidate_errors(w, hessian, grids, scales, eta, bits, group_size, damp=0.01, act_order=True):
    """GPTQ of w [R, n] on each candidate grid [C, R, 4] (fp16; scales [R, G], eta shared), run as C·R
    independent rows of one GPTQ call -> (per-row output errors [C, R] float64, codes [C, R, n])."""
    C, R = grids.shape[:2]
    W = w.repeat(C, 1)
    buffers = {"scales": scales.repeat(C, 1), "grid": grids.reshape(C * R, 4), "eta": eta}
    codes = gptq_codes(W, hessian, tlq_column_quantizer(buffers, bits, group_size), damp=damp, act_order=act_order)
    err = row_output_errors(W, tlq_dequantize(codes, buffers, bits, group_size), hessian)
    return err.view(C, R), codes.view(C, R, -1)


def tlq_output_quantize(w: torch.Tensor, bits: int, group_size: int | None, hessian: torch.Tensor, *,
                        etas=OUTPUT_ETAS, percentiles=DEFAULT_PERCENTILES, bottoms=DEFAULT_BOTTOMS,
                        sample_rows: int = SAMPLE_ROWS, shortlist: int = SHORTLIST, damp: float = 0.01,
                        act_order: bool = True, seed: int = 0):
    """TLQ grid (eta per layer; (bottom, top) quantile pair per row, both signs) chosen by output error
    after GPTQ on `hessian` [n, n]. Returns (nearest-rounding codes on the chosen grid, buffers {scales,
    grid, eta} in tlq's format, info): GPTQ is then run on the returned grid as for any TLQ grid.

    info: eta, percentile and bottom_quantile (the most chosen per row), mse / sqnr_db of the rounding, and
    `report` (per-layer fields): the weight-MSE choice's eta and percentile, and the summed output errors
    after GPTQ of the weight-MSE grid and of the chosen grids on the rows scored (all rows when
    out <= sample_rows, else the sample) with their ratio in dB."""
    w = w.detach().float()
    R = w.shape[0]
    _, base, base_info = tlq_quantize(w, bits, group_size, etas=etas, percentiles=percentiles, bottoms=bottoms)
    scales = absmax_scales(w, group_size)
    u = normalise(w, scales, group_size)
    s = expand_groups(scales.float(), w.shape[1], group_size)
    pct = torch.tensor(percentiles, dtype=torch.float64)
    bot = torch.tensor(bottoms, dtype=torch.float64)
    P = len(bottoms) * len(percentiles)
    sample = torch.arange(R) if R <= sample_rows else \
        torch.randperm(R, generator=torch.Generator().manual_seed(seed))[:sample_rows].sort().values

    def candidates(rows, eta, pairs=None):
        """[1 + len(pairs), r, 4]: the weight-MSE grid of this eta, then the (bottom, top) pairs."""
        st = _SignStats(u[rows], s[rows])
        g = st.grids(eta, pct, bits, bot).flatten(-2)                        # [P, r, 4]
        if pairs is not None:
            g = g[pairs]
        return torch.cat([_weight_mse_grid(st, eta, pct, bot, bits)[None], g])

    # step 1: every eta and pair on the sample
    scores, wins, sample_err = [], [], {}
    for eta in etas:
        g = candidates(sample, float(eta))
        err, _ = gptq_candidate_errors(w[sample], hessian, g, scales[sample], _eta(eta), bits, group_size,
                                       damp, act_order)
        sample_err[float(eta)] = err
        scores.append(float(err.min(0).values.sum()))
        wins.append(err[1:].argmin(0))
    e = min(range(len(etas)), key=scores.__getitem__)
    eta = float(etas[e])
    counts = torch.bincount(wins[e], minlength=P)
    pairs = counts.argsort(descending=True)[:min(shortlist, P)]
    weight_choice = float(sample_err[float(base_info["eta"])][0].sum())
    # step 2: the chosen eta's shortlist on every row (the sample already covered them all when R is small)
    if len(sample) == R:
        err = sample_err[eta]
        g = candidates(sample, eta)
    else:
        g = candidates(torch.arange(R), eta, pairs)
        err, _ = gptq_candidate_errors(w, hessian, g, scales, _eta(eta), bits, group_size, damp, act_order)
    pick = err.argmin(0)                                                     # [R]
    grid = g.gather(0, pick[None, :, None].expand(1, R, 4))[0].clone()
    chosen = float(err.min(0).values[sample].sum())
    eta_t = torch.tensor([eta], dtype=torch.float32)
    buffers = {"scales": scales, "grid": grid, "eta": eta_t}
    if chosen > weight_choice:   # the shortlist lost to the weight-MSE choice on the sample: keep that one
        buffers, eta, chosen, pick = base, base_info["eta"], weight_choice, torch.zeros_like(pick)
        eta_t = base["eta"]
    codes = tlq_assign(u, buffers["grid"], eta_t[0], bits)
    pair_of = torch.where(pick > 0, (pairs[pick - 1] if len(sample) < R else pick - 1), -1)
    top = pair_of[pair_of >= 0] % len(percentiles)
    bottom_ = pair_of[pair_of >= 0] // len(percentiles)
    mode = lambda t, vals, default: float(vals[int(torch.bincount(t, minlength=len(vals)).argmax())]) \
        if len(t) else default  # noqa: E731
    gain = 10 * math.log10(weight_choice / chosen) if chosen > 0 and weight_choice > 0 else 0.0
    info = {"eta": eta, "percentile": mode(top, percentiles, base_info["percentile"]),
            "bottom_quantile": mode(bottom_, bottoms, base_info["bottom_quantile"]),
            **weight_error(w, tlq_dequantize(codes, buffers, bits, group_size)),
            "report": {"weight_mse_eta": base_info["eta"], "weight_mse_percentile": base_info["percentile"],
                       "grid_search_rows_scored": len(sample),
                       "output_error_weight_mse_grid": weight_choice, "output_error_chosen_grid": chosen,
                       "grid_search_gain_db": round(gain, 4),
                       "rows_on_weight_mse_grid": int((pick == 0).sum())}}
    return codes, buffers, info


def _eta(eta: float) -> torch.Tensor:
    return torch.tensor([float(eta)], dtype=torch.float32)


def _weight_mse_grid(st: _SignStats, eta, pct, bot, bits) -> torch.Tensor:
    """tlq_quantize's grid for this eta (each row and sign's (bottom, top) by weight MSE): [r, 4] fp16."""
    g = st.grids(eta, pct, bits, bot)                                          # [P, r, 2, 2]
    err = st.errors(g, torch.tensor(eta, dtype=torch.float32), bits)           # [P, r, 2]
    arg = err.argmin(0)
    return g.gather(0, arg[None, ..., None].expand(1, *arg.shape, 2))[0].flatten(-2)
