"""CLEAR attention at linear cost, in pure torch: block-sparse tiling of the image token grid.

Image queries are split into ty x tx tiles. A tile's keys are the global keys (text + pooled, shared by every tile,
so never copied per tile) and the (ty + 2*hy) x (tx + 2*hx) image window around it, hy/hx = the largest grid offset
inside the circle (ceil(r) - 1, clamped to the grid). Windows come from a padded, transposed strip of key rows as
strided views (no per-tile gather), are masked to the circle and to the real grid, and ONE softmax runs over
[global scores | window scores] per query, so the split needs no log-sum-exp merge. Work is one tile row of one head
at a time (batched matmuls over the row's tiles), which bounds the score memory and keeps it in cache.
Text queries attend to everything (text, image, pooled): one SDPA call, linear in N for a fixed text length.
Cost per image query: (ty + 2*hy)(tx + 2*hx) + n_global keys, independent of the grid size.

Two code paths, the same math: with autograd (the distillation trains q/k/v through it) a masked two-part softmax
(_tile_row); without (inference off the CPU) scores written in place into one buffer and an in-place softmax
(_tile_row_inference). CPU inference takes clear/cpu_local.py instead (a fused kernel on gathered circles; faster).
fp32/fp64 compute in the input dtype; bf16/fp16 inputs run the matmuls in the input dtype and the softmax in fp32,
the probabilities cast back for the value matmuls (as SDPA's math path does).
Works on any device torch runs on; on CUDA it is correct but launch-bound (many small matmuls): a fused kernel
(FlexAttention or Triton) is the better CUDA path and is not written yet.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .window import check_clear_shapes

# Tile side. Smaller tiles compute fewer keys per query ((t + 2*halo)^2) but run smaller matmuls and more Python
# calls; measured on this CPU (1 thread, 4 heads x 128, 512 text; min of 3; the first, all-autograd revision): 64x64 r=8: t=4 888 ms, t=8 877 ms,
# t=16 1148 ms; 64x64 r=16: 1615 / 1651 / 2057 ms; 96x96 r=32: 10132 / 9394 / 12023 ms.
TILE = 8


def halo(radius: float, size: int) -> int:
    """Largest |offset| along one axis that the circle (dy^2 + dx^2) < r^2 admits, clamped to the grid."""
    return max(0, min(math.ceil(radius) - 1, size - 1))


def tile_shape(grid: tuple[int, int], radius: float, tile: int | None = None) -> tuple[int, int]:
    """(ty, tx): the query tile, TILE x TILE unless given, never larger than the grid."""
    h, w = grid
    t = tile if tile is not None else TILE
    return min(t, h), min(t, w)


def window_mask(tile: tuple[int, int], halos: tuple[int, int], radius: float, device=None) -> torch.Tensor:
    """(ty*tx, wy*wx) bool: query (a, b) of a tile may see window key (c, d) when
    (c - hy - a)^2 + (d - hx - b)^2 < r^2. The same for every tile (offsets are tile-relative)."""
    (ty, tx), (hy, hx) = tile, halos
    wy, wx = ty + 2 * hy, tx + 2 * hx
    dy = torch.arange(wy, device=device)[None, :] - hy - torch.arange(ty, device=device)[:, None]   # (ty, wy)
    dx = torch.arange(wx, device=device)[None, :] - hx - torch.arange(tx, device=device)[:, None]   # (tx, wx)
    d2 = dy[:, None, :, None] ** 2 + dx[None, :, None, :] ** 2                                       # (ty,tx,wy,wx)
    return (d2 < radius * radius).reshape(ty * tx, wy * wx)


def _inside(n_tiles: int, t: int, halo_: int, size: int, device) -> torch.Tensor:
    """(n_tiles, t + 2*halo) bool: which window positions along one axis fall on the real grid."""
    pos = torch.arange(n_tiles, device=device)[:, None] * t + torch.arange(t + 2 * halo_, device=device) - halo_
    return (pos >= 0) & (pos < size)


def tiled_flops(n_text: int, grid: tuple[int, int], radius: float, n_pooled: int, heads: int, head_dim: int,
                batch: int = 1, tile: int | None = None) -> int:
    """FLOPs this path computes for Q K^T and P V (2 per multiply-add each), padding included."""
    h, w = grid
    ty, tx = tile_shape(grid, radius, tile)
    hy, hx = halo(radius, h), halo(radius, w)
    n_img_padded = math.ceil(h / ty) * ty * math.ceil(w / tx) * tx
    n = n_text + h * w
    pairs = n_text * (n + n_pooled) + n_img_padded * ((ty + 2 * hy) * (tx + 2 * hx) + n_text + n_pooled)
    return 4 * batch * heads * head_dim * pairs


def tiled_clear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, n_text: int,
                          grid: tuple[int, int], radius: float, pooled_key: torch.Tensor | None = None,
                          pooled_value: torch.Tensor | None = None, tile: int | None = None) -> torch.Tensor:
    """clear_attention's contract: (B, N, H, D) in [text | image] order -> (B, N, H, D); differentiable."""
    b, n, heads, d = query.shape
    h, w = grid
    check_clear_shapes(n, n_text, grid, radius)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))                 # (B, H, N, D)
    gk, gv = k[:, :, :n_text], v[:, :, :n_text]                                  # global keys: text + pooled
    if pooled_key is not None:
        pk, pv = pooled_key.transpose(1, 2), pooled_value.transpose(1, 2)
        gk, gv = torch.cat([gk, pk], 2), torch.cat([gv, pv], 2)
        k_all, v_all = torch.cat([k, pk], 2), torch.cat([v, pv], 2)
    else:
        k_all, v_all = k, v
    outs = []
    if n_text:
        outs.append(F.scaled_dot_product_attention(q[:, :, :n_text], k_all, v_all))
    outs.append(_image_queries(q[:, :, n_text:], k[:, :, n_text:], v[:, :, n_text:], gk, gv, grid, radius,
                               tile_shape(grid, radius, tile)))
    return torch.cat(outs, 2).transpose(1, 2)


def _image_queries(q, k, v, gk, gv, grid, radius, tile):
    """(B, H, h*w, D) image queries/keys/values, (B, H, G, D) global keys/values -> (B, H, h*w, D)."""
    b, heads, _, d = q.shape
    (h, w), (ty, tx) = grid, tile
    hy, hx = halo(radius, h), halo(radius, w)
    nty, ntx = math.ceil(h / ty), math.ceil(w / tx)
    wy, wx = ty + 2 * hy, tx + 2 * hx
    t_q = ty * tx
    dev = q.device
    # queries into tiles (B, H, nty, ntx, ty*tx, D), pre-scaled; keys/values padded by the halo and the tile rest
    qg = F.pad((q * d ** -0.5).reshape(b, heads, h, w, d), (0, 0, 0, ntx * tx - w, 0, nty * ty - h))
    qg = qg.reshape(b, heads, nty, ty, ntx, tx, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, heads, nty, ntx, t_q, d)
    pad = (0, 0, hx, hx + ntx * tx - w, hy, hy + nty * ty - h)
    kp, vp = (F.pad(x.reshape(b, heads, h, w, d), pad) for x in (k, v))
    # window keys in column-major order (x outer, y inner), so a tile's window is one contiguous block of a strip
    allowed = window_mask((ty, tx), (hy, hx), radius, dev).reshape(t_q, wy, wx).transpose(1, 2)
    allowed = (allowed[None, None] & _inside(nty, ty, hy, h, dev)[:, None, None, None, :]
               & _inside(ntx, tx, hx, w, dev)[None, :, None, :, None])               # (nty, ntx, Tq, wx, wy)
    # padding queries (the grid rest of the last tile row/column) may see every key: no row is fully masked
    real_q = (_inside(nty, ty, 0, h, dev)[:, None, :, None] & _inside(ntx, tx, 0, w, dev)[None, :, None, :])
    blocked = ~(allowed | ~real_q.reshape(nty, ntx, t_q, 1, 1)).reshape(nty, ntx, t_q, wx * wy)
    fast = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, gk, gv)))
    out = []
    for i in range(nty):
        bias = None
        if fast:   # additive mask shared by every head of this tile row
            bias = torch.zeros(blocked[i].shape, dtype=q.dtype, device=dev).masked_fill_(blocked[i], -math.inf)
        rows = [torch.stack([_head_row(qg[bi, hi, i], kp[bi, hi, i * ty:i * ty + wy], vp[bi, hi, i * ty:i * ty + wy],
                                       gk[bi, hi], gv[bi, hi], blocked[i], bias, (wx, tx, ntx))
                             for hi in range(heads)]) for bi in range(b)]
        out.append(torch.stack(rows))
    o = torch.stack(out, 2).reshape(b, heads, nty, ntx, ty, tx, d).permute(0, 1, 2, 4, 3, 5, 6)
    return o.reshape(b, heads, nty * ty, ntx * tx, d)[:, :, :h, :w].reshape(b, heads, h * w, d)


def _head_row(qc, kr, vr, gk, gv, blocked, bias, dims):
    """One tile row of one head. kr/vr (wy, Wp + 2hx, D): the key/value rows this row's windows span, transposed
    here to (Wp + 2hx, wy, D) so tile j's window is the contiguous block at column j*tx: a strided view, each key
    copied wy/ty times (a per-tile gather copies (wy*wx)/(ty*tx) times). One head at a time keeps the strip in
    cache between its copy and its matmuls (all heads at once measured ~1.5x slower at 24 heads)."""
    wx, tx, ntx = dims
    wy, _, d = kr.shape
    kw, vw = (x.transpose(0, 1).contiguous().unfold(0, wx, tx).permute(0, 3, 1, 2).reshape(ntx, wx * wy, d)
              for x in (kr, vr))
    if bias is not None:
        return _tile_row_inference(qc, kw, vw, gk, gv, bias)
    return _tile_row(qc, kw, vw, gk, gv, blocked)


def _tile_row(qc, kw, vw, gk, gv, blocked):
    """One row of tiles of one head: qc (ntx, Tq, D) scaled queries, kw/vw (ntx, Tk, D) window keys/values,
    gk/gv (G, D) global keys/values, blocked (ntx, Tq, Tk) -> (ntx, Tq, D). Softmax over [global | window]
    scores without concatenating them: one row max, one normaliser."""
    ntx, t_q, d = qc.shape
    n_glob = gk.shape[0]
    s_loc = torch.bmm(qc, kw.transpose(1, 2))                                  # (ntx, Tq, Tk)
    s_loc.masked_fill_(blocked, -math.inf)     # -inf, not a large finite value: exp() of those is far slower
    up = s_loc.dtype in (torch.float16, torch.bfloat16)
    if up:
        s_loc = s_loc.float()
    m = s_loc.detach().amax(-1, keepdim=True)  # any row max stabilises; its gradient would cancel exactly
    if n_glob:
        s_glob = torch.mm(qc.reshape(ntx * t_q, d), gk.t()).reshape(ntx, t_q, n_glob)
        if up:
            s_glob = s_glob.float()
        m = torch.maximum(m, s_glob.detach().amax(-1, keepdim=True))
    e_loc = s_loc.sub_(m).exp_()
    z = e_loc.sum(-1, keepdim=True)
    o = torch.bmm(e_loc.to(qc.dtype), vw)
    if n_glob:
        e_glob = s_glob.sub_(m).exp_()
        z = z + e_glob.sum(-1, keepdim=True)
        o = o + torch.mm(e_glob.to(qc.dtype).reshape(ntx * t_q, n_glob), gv).reshape(o.shape)
    return (o / z.to(o.dtype)) if not up else (o.float() / z).to(qc.dtype)


def _tile_row_inference(qc, kw, vw, gk, gv, bias):
    """_tile_row without autograd, in fewer passes over the scores (they dominate the time outside the matmuls):
    [global | window] scores written by the matmuls straight into one buffer, the mask added inside the window
    matmul (bias = 0 / -inf, shared by all heads), one in-place softmax, the value matmuls reading its slices."""
    ntx, t_q, d = qc.shape
    n_glob, t_k = gk.shape[0], kw.shape[1]
    s = torch.empty(ntx, t_q, n_glob + t_k, dtype=qc.dtype, device=qc.device)
    if n_glob:
        torch.mm(qc.reshape(ntx * t_q, d), gk.t(), out=s[..., :n_glob].view(ntx * t_q, n_glob))
    torch.baddbmm(bias, qc, kw.transpose(1, 2), out=s[..., n_glob:])
    if s.dtype in (torch.float16, torch.bfloat16):
        p = torch.softmax(s.float(), -1).to(s.dtype)
    else:
        p = torch._softmax(s, -1, False, out=s)
    o = torch.bmm(p[..., n_glob:], vw)
    if n_glob:
        o.view(ntx * t_q, d).addmm_(p[..., :n_glob].reshape(ntx * t_q, n_glob), gv)
    return o
