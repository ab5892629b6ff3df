"""CLEAR inference on CPU: torch's fused CPU flash-attention kernel on gathered windows, merged by log-sum-exp.

The attention of an image query splits into two softmaxes over disjoint key sets, merged exactly by log-sum-exp:
- global: the text (+ pooled) keys, the same for every image query: ONE flash call over all image queries (a large,
  cache-friendly kernel; the global keys are never copied per tile);
- local: the image keys inside the circle. Queries go in ty x tx tiles; a tile's keys are the union of its queries'
  circles (the square window with the corners no query reaches cut off), gathered from the image keys by one
  precomputed index list per (grid, radius) (window positions off the grid point at key 0 and are masked), with an
  additive mask for the circle of each query and the grid border. The flash kernel fuses scores, softmax and the
  value product per tile in cache and returns the log-sum-exp needed for the merge.
Text queries see every key: one flash call. Cost per image query: (union of circles) + n_global keys.

Inference only: the kernel's log-sum-exp output carries no gradient, so with autograd clear_attention takes the
tiled path (tiled.py). CPU only (the kernel is aten's CPU flash attention); fp64/fp32/bf16/fp16 inputs (bf16/fp16
accumulate in fp32 inside the kernel; the merge runs in fp32).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from .tiled import halo, window_mask
from .window import check_clear_shapes

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

# Query tile side. Smaller tiles compute fewer keys per query (every query of a tile computes the tile's whole union
# of circles, ~t^2 + 4 t r + pi r^2 keys) but give the kernel smaller matmuls. Measured (1 thread, fp32, 128 dims,
# 512 text, CPU time, median of 5 interleaved; a loaded 2-core machine): 64x64 r = 8, 4 heads: t = 4 218-228 ms,
# t = 6 223, t = 8 221; 128x128 r = 16, 2 heads: t = 4 766-798 ms, t = 6 779, t = 8 720. 8 for every radius.
def tile_side(radius: float) -> int:
    return 8


# Gathered key rows per kernel call (a chunk of tiles of one head; 2 MB of keys + values at 128 dims fp32), so they
# stay in cache between the gather and the kernel. Measured 1024 / 2048 / 4096 rows: 241 / 228 / 218 ms (64x64 r=8).
CHUNK_ROWS = 4096


def available(x: torch.Tensor) -> bool:
    return _FLASH is not None and x.device.type == "cpu" and x.dtype in (torch.float64, torch.float32,
                                                                         torch.bfloat16, torch.float16)


class LocalPlan(NamedTuple):
    tile: tuple[int, int]
    index: torch.Tensor             # (n_tiles, Tk) image key of each window position (0 where off the grid: masked)
    queries: torch.Tensor           # (n_tiles, Tq) image query of each tile position (h*w for tile padding)
    circle: torch.Tensor            # (Tq, Tk) bool: query may see key (the same for every tile)
    key_inside: torch.Tensor        # (n_tiles, Tk) bool: key on the real grid
    query_real: torch.Tensor        # (n_tiles, Tq) bool: query on the real grid (not tile padding)
    variant: torch.Tensor           # (n_tiles,) ascending: the tile's border pattern (tiles sorted by it)
    allowed: torch.Tensor           # (n_variants, Tq, Tk) bool: the mask of each pattern (circle, grid border;
                                    # tile-padding queries see every key, so no softmax row is empty)


@functools.lru_cache(maxsize=32)
def local_plan(grid: tuple[int, int], radius: float, tile: tuple[int, int]) -> LocalPlan:
    """Index lists and masks for (grid, radius, tile); pure, cached (the shapes repeat every call)."""
    (h, w), (ty, tx) = grid, tile
    hy, hx = halo(radius, h), halo(radius, w)
    nty, ntx = math.ceil(h / ty), math.ceil(w / tx)
    wx = tx + 2 * hx
    full = window_mask(tile, (hy, hx), radius)                       # (Tq, wy*wx), row-major window
    keep = full.any(0).nonzero().squeeze(1)                          # the union of the tile's circles
    oy, ox = torch.arange(nty) * ty, torch.arange(ntx) * tx
    ky = (oy[:, None, None] + (keep // wx - hy)[None, None, :]).expand(nty, ntx, -1).reshape(nty * ntx, -1)
    kx = (ox[None, :, None] + (keep % wx - hx)[None, None, :]).expand(nty, ntx, -1).reshape(nty * ntx, -1)
    key_inside = (ky >= 0) & (ky < h) & (kx >= 0) & (kx < w)
    index = torch.where(key_inside, ky * w + kx, 0)
    qy = (oy[:, None, None] + torch.arange(ty).repeat_interleave(tx)[None, None, :]).expand(nty, ntx, -1)
    qx = (ox[None, :, None] + torch.arange(tx).repeat(ty)[None, None, :]).expand(nty, ntx, -1)
    query_real = ((qy < h) & (qx < w)).reshape(nty * ntx, ty * tx)
    queries = torch.where(query_real, (qy * w + qx).reshape(nty * ntx, -1), h * w)
    circle = full[:, keep]
    # tiles differ only in which keys fall off the grid and which queries are padding: a handful of patterns (the
    # interior, the sides, the corners). Tiles sorted by pattern let a chunk of one pattern share one mask, built
    # here once instead of per chunk and call (it took ~4% of the time at 128x128, r = 16)
    patterns, variant = torch.unique(torch.cat([key_inside, query_real], 1), dim=0, return_inverse=True)
    order = torch.argsort(variant, stable=True)
    inside, real = patterns[:, :key_inside.shape[1]], patterns[:, key_inside.shape[1]:]
    allowed = (circle & inside[:, None, :]) | ~real[:, :, None]
    return LocalPlan(tile, index[order], queries[order], circle, key_inside[order], query_real[order],
                     variant[order], allowed)


def local_flops(n_text: int, grid: tuple[int, int], radius: float, n_pooled: int, heads: int, head_dim: int,
                batch: int = 1) -> int:
    """FLOPs (Q K^T and P V, 2 per multiply-add) of cpu_clear_attention, tile padding included."""
    t = tile_side(radius)
    plan = local_plan(tuple(grid), radius, (min(t, grid[0]), min(t, grid[1])))
    n = n_text + grid[0] * grid[1]
    n_tiles, t_k = plan.index.shape
    n_img_padded = n_tiles * plan.tile[0] * plan.tile[1]
    global_pairs = grid[0] * grid[1] * (n_text + n_pooled)
    pairs = n_text * (n + n_pooled) + global_pairs + n_img_padded * t_k
    return 4 * batch * heads * head_dim * pairs


def cpu_clear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, n_text: int,
                        grid: tuple[int, int], radius: float, pooled_key: torch.Tensor | None = None,
                        pooled_value: torch.Tensor | None = None, tile: int | None = None) -> torch.Tensor:
    """clear_attention's contract, (B, N, H, D) in [text | image] order -> (B, N, H, D); no autograd."""
    b, n, heads, d = query.shape
    h, w = grid
    check_clear_shapes(n, n_text, grid, radius)
    t = tile or tile_side(radius)
    plan = local_plan((h, w), radius, (min(t, h), min(t, w)))
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))                 # (B, H, N, D) views
    gk, gv = k[:, :, :n_text], v[:, :, :n_text]
    k_all, v_all = k, v
    if pooled_key is not None:
        pk, pv = pooled_key.transpose(1, 2), pooled_value.transpose(1, 2)
        gk, gv = torch.cat([gk, pk], 2), torch.cat([gv, pv], 2)
        k_all, v_all = torch.cat([k, pk], 2), torch.cat([v, pv], 2)
    # one spare row after the sequence: tile-padding queries write their (discarded) output there
    buf = torch.empty(b, n + 1, heads, d, dtype=query.dtype, device=query.device)
    out = buf[:, :n]
    if n_text:
        out[:, :n_text] = _FLASH(q[:, :, :n_text], k_all, v_all)[0].transpose(1, 2)
    qi = q[:, :, n_text:]
    img = buf[:, n_text:].transpose(1, 2)                                        # (B, H, h*w + 1, D) view
    lse_loc = _local(qi, k[:, :, n_text:], v[:, :, n_text:], plan, img)
    img = img[:, :, :h * w]
    if gk.shape[2]:
        o_glob, lse_glob = _FLASH(qi, gk, gv)
        # softmax over [global | local] = convex mix of the two partial softmaxes, weight sigmoid(lse_g - lse_l)
        wgt = torch.sigmoid(lse_glob - lse_loc).unsqueeze(-1)
        if query.dtype in (torch.bfloat16, torch.float16):
            img.copy_(torch.lerp(img.float(), o_glob.float(), wgt))
        else:
            img.lerp_(o_glob, wgt)
    return out


def _local(q, k, v, plan: LocalPlan, out):
    """Image queries q (B, H, h*w, D) against the image keys in their circles: the outputs written into out
    (B, H, h*w + 1, D; row h*w takes tile padding), the log-sum-exp (B, H, h*w) returned (fp32; fp64 for fp64)."""
    b, heads, n_img, d = q.shape
    n_tiles, t_k = plan.index.shape
    t_q = plan.queries.shape[1]
    mdtype = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype   # the kernel's lse dtype
    lse = torch.empty(b, heads, n_img + 1, dtype=mdtype, device=q.device)
    masks = torch.zeros(plan.allowed.shape, dtype=mdtype).masked_fill_(~plan.allowed, -math.inf)
    q_src = plan.queries.clamp(max=n_img - 1)
    chunk = max(1, CHUNK_ROWS // t_k)
    chunks = []
    starts = torch.searchsorted(plan.variant, torch.arange(masks.shape[0] + 1)).tolist()
    for pat in range(masks.shape[0]):            # chunks within one border pattern: one shared mask each
        for c0 in range(starts[pat], starts[pat + 1], chunk):
            c1 = min(starts[pat + 1], c0 + chunk)
            chunks.append((c1 - c0, masks[pat].expand(c1 - c0, 1, t_q, t_k), plan.index[c0:c1].reshape(-1),
                           q_src[c0:c1].reshape(-1), plan.queries[c0:c1].reshape(-1)))
    # buffers reused across heads and chunks: fresh multi-MB tensors per call cost page faults that took longer
    # than the gathers themselves (measured: a 4 MB index_select 10 ms into a new tensor)
    kq = torch.empty(3, n_img, d, dtype=q.dtype, device=q.device)
    gk = torch.empty(2, chunk * t_k, d, dtype=q.dtype, device=q.device)
    gq = torch.empty(chunk * t_q, d, dtype=q.dtype, device=q.device)
    for bi in range(b):
        for hi in range(heads):
            # one head's rows made contiguous first (index_select on the strided (B, N, H, D) layout is far
            # slower); the copy stays in cache for the gathers that follow
            for j, x in enumerate((q, k, v)):
                kq[j].copy_(x[bi, hi])
            for c, mask, kidx, qsrc, qdst in chunks:
                qc = torch.index_select(kq[0], 0, qsrc, out=gq[:c * t_q]).view(c, 1, t_q, d)
                kc = torch.index_select(kq[1], 0, kidx, out=gk[0, :c * t_k]).view(c, 1, t_k, d)
                vc = torch.index_select(kq[2], 0, kidx, out=gk[1, :c * t_k]).view(c, 1, t_k, d)
                oc, lc = _FLASH(qc, kc, vc, attn_mask=mask)
                out[bi, hi].index_copy_(0, qdst, oc.reshape(-1, d))
                lse[bi, hi].index_copy_(0, qdst, lc.reshape(-1))
    return lse[:, :, :n_img]
