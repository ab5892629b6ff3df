"""Representation similarity on token matrices (rows = tokens, columns = channels). Pure math, float64 inside.

- linear_cka: centred linear CKA (Kornblith et al. 2019), ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on
  column-centred X, Y. 1 for identical inputs, invariant to orthogonal maps and isotropic scaling of either.
- probe_error: how far Y is from an affine map of X: the relative residual of a (slightly ridged) least
  squares fit, ||Y - [X, 1] W||_F^2 / ||Y - mean(Y)||_F^2. 0 = exactly affine, 1 = no better than the mean.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected token matrices [n, c1] and [n, c2] with the same n; got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError("need at least 2 rows (tokens)")
    return x.detach().double(), y.detach().double()


def _centred(t: Tensor) -> Tensor:
    t = t - t.mean(0, keepdim=True)
    norm = t.norm()
    return t / norm if norm > 0 else t   # CKA is scale-invariant: normalise first so squares cannot overflow


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Centred linear CKA between x [n, c1] and y [n, c2]; 0.0 when either has no variance."""
    x, y = _check_pair(x, y)
    x, y = _centred(x), _centred(y)
    # feature-space form: c x c Gram matrices, cheaper than n x n when tokens outnumber channels
    cross = (y.T @ x).pow(2).sum()
    den = (x.T @ x).norm() * (y.T @ y).norm()
    return float(cross / den) if den > 0 else 0.0


def probe_error(x: Tensor, y: Tensor, ridge: float = 1e-4, holdout: float = 0.0, seed: int = 0) -> float:
    """Relative residual of the least-squares affine fit y ~ [x, 1] W.

    The bias column is handled by centring (the same fit as a ones column left out of the ridge penalty).
    `ridge` is relative to the mean input energy (ridge * tr(XᵀX) / c1 on the diagonal), so the error does not
    depend on the scale of x. `holdout` > 0 fits on a seeded random (1 - holdout) share of the rows and
    measures the residual on the rest: with about as many tokens as channels an in-sample fit is exact
    whatever the map, a held-out one is not.
    """
    x, y = _check_pair(x, y)
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    n = x.shape[0]
    if holdout > 0:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_eval = max(1, min(n - 2, round(n * holdout)))
        fit, ev = perm[n_eval:], perm[:n_eval]
    else:
        fit = ev = torch.arange(n)
    x_mean, y_mean = x[fit].mean(0, keepdim=True), y[fit].mean(0, keepdim=True)
    xf, yf = x[fit] - x_mean, y[fit] - y_mean
    gram = xf.T @ xf
    lam = ridge * gram.diagonal().mean().clamp_min(1e-300)
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xf.T @ yf)
    y_ev = y[ev]
    resid = (y_ev - y_mean - (x[ev] - x_mean) @ w).pow(2).sum()
    total = (y_ev - y_ev.mean(0, keepdim=True)).pow(2).sum()
    if total <= 0:                      # constant target: any affine map with the right bias fits it
        return 0.0 if resid <= 1e-12 * max(1.0, float(y_ev.pow(2).sum())) else float("inf")
    return float(resid / total)
