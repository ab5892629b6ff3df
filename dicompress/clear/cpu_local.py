"""CLEAR inference on CPU: torch's fused CPU flash-attention kernel on gathered windows, merged by log-sum-exp.

Heads run one at a time on a contiguous copy of the head (the kernel reads the (B, N, H, D) layout's rows, H x D
apart, more slowly). The attention of an image query splits into two softmaxes over disjoint key sets, merged exactly by
log-sum-exp:
- global: the text (+ pooled) keys, the same for every image query: ONE flash call over the head's image queries
  (a large, cache-friendly kernel; the global keys are never copied per tile);
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
    """clear_attention's contract, (B, N, H, D) in [text | image] order -> (B, N, H, D); no autograd.

    Runs head by head on one contiguous copy of the head's queries, keys and values. The local windows' gathers
    need that copy anyway; the two global kernel calls now read it too instead of the processors' (B, N, H, D)
    layout, whose rows of one head lie H x D apart: 64x64, 24 heads, 744 vs 801 ms for those two calls
    (bench/clear_tiles.json `layout`)."""
    b, n, heads, d = query.shape
    h, w = grid
    check_clear_shapes(n, n_text, grid, radius)
    t = tile or tile_side(radius)
    local = LocalWindows(local_plan((h, w), radius, (min(t, h), min(t, w))), h * w, d, query.dtype)
    n_pooled = 0 if pooled_key is None else pooled_key.shape[1]
    n_glob, n_img = n_pooled + n_text, h * w
    out = torch.empty_like(query)
    # one head's keys and values as [pooled | text | image]: the global keys (pooled + text) and all keys are
    # then both contiguous ranges
    qh = torch.empty(n, d, dtype=query.dtype)
    kv = torch.empty(2, n_pooled + n, d, dtype=query.dtype)
    o_img = torch.empty(n_img + 1, d, dtype=query.dtype)         # + one row that tile padding writes into
    for bi in range(b):
        for hi in range(heads):
            qh.copy_(query[bi, :, hi])
            for j, (x, px) in enumerate(((key, pooled_key), (value, pooled_value))):
                kv[j, n_pooled:].copy_(x[bi, :, hi])
                if n_pooled:
                    kv[j, :n_pooled].copy_(px[bi, :, hi])
            if n_text:
                out[bi, :n_text, hi] = text_queries(qh[:n_text], kv)
            out[bi, n_text:, hi] = image_queries(qh[n_text:], kv, n_glob, local, o_img)
    return out


def text_queries(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Text queries (n_text, D) see every key: one kernel call over kv (2, L, D)."""
    return _FLASH(q[None, None], kv[0][None, None], kv[1][None, None])[0][0, 0]


def image_queries(q: torch.Tensor, kv: torch.Tensor, n_glob: int, local: "LocalWindows",
                  o_img: torch.Tensor) -> torch.Tensor:
    """One head's image queries (h*w, D): local windows and the n_glob global keys (kv's first rows), merged."""
    n_img = q.shape[0]
    lse_loc = local(q, kv[0, n_glob:], kv[1, n_glob:], o_img)
    img = o_img[:n_img]
    if n_glob:
        o_glob, lse_glob = (x[0, 0] for x in _FLASH(q[None, None], kv[0, :n_glob][None, None],
                                                    kv[1, :n_glob][None, None]))
        # softmax over [global | local] = convex mix of the two partial softmaxes, weight sigmoid(lse_g - lse_l)
        wgt = torch.sigmoid(lse_glob - lse_loc).unsqueeze(-1)
        if q.dtype in (torch.bfloat16, torch.float16):
            return torch.lerp(img.float(), o_glob.float(), wgt).to(q.dtype)
        img.lerp_(o_glob, wgt)
    return img


class LocalWindows:
    """Image queries against the image keys in their circles, for one head at a time: the plan's tiles in chunks
    of one border pattern, each chunk's queries, keys and values gathered and run in one kernel call with the
    pattern's shared mask. Holds the masks, the chunk list and buffers reused across heads and chunks (fresh
    multi-MB tensors per call cost page faults that took longer than the gathers themselves: a 4 MB index_select
    took 10 ms into a new tensor)."""

    def __init__(self, plan: LocalPlan, n_img: int, head_dim: int, dtype: torch.dtype):
        self.t_k = plan.index.shape[1]
        self.t_q = plan.queries.shape[1]
        self.lse_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # the kernel's
        masks = torch.zeros(plan.allowed.shape, dtype=self.lse_dtype).masked_fill_(~plan.allowed, -math.inf)
        self.n_img = n_img
        q_src = plan.queries.clamp(max=n_img - 1)
        chunk = max(1, CHUNK_ROWS // self.t_k)
        self.chunks = []
        starts = torch.searchsorted(plan.variant, torch.arange(masks.shape[0] + 1)).tolist()
        for pat in range(masks.shape[0]):            # chunks within one border pattern: one shared mask each
            for c0 in range(starts[pat], starts[pat + 1], chunk):
                c1 = min(starts[pat + 1], c0 + chunk)
                self.chunks.append((c1 - c0, masks[pat].expand(c1 - c0, 1, self.t_q, self.t_k),
                                    plan.index[c0:c1].reshape(-1), q_src[c0:c1].reshape(-1),
                                    plan.queries[c0:c1].reshape(-1)))
        self.gq = torch.empty(chunk * self.t_q, head_dim, dtype=dtype)
        self.gkv = torch.empty(2, chunk * self.t_k, head_dim, dtype=dtype)
        self.lse = torch.empty(n_img + 1, dtype=self.lse_dtype)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """q, k, v (h*w, D) contiguous; outputs written into out (h*w + 1, D; row h*w takes tile padding); the
        log-sum-exp (h*w,) returned (fp32; fp64 for fp64)."""
        d, t_q, t_k, gq, gkv = q.shape[-1], self.t_q, self.t_k, self.gq, self.gkv
        for c, mask, kidx, qsrc, qdst in self.chunks:
            qc = torch.index_select(q, 0, qsrc, out=gq[:c * t_q]).view(c, 1, t_q, d)
            kc = torch.index_select(k, 0, kidx, out=gkv[0, :c * t_k]).view(c, 1, t_k, d)
            vc = torch.index_select(v, 0, kidx, out=gkv[1, :c * t_k]).view(c, 1, t_k, d)
            oc, lc = _FLASH(qc, kc, vc, attn_mask=mask)
            out.index_copy_(0, qdst, oc.reshape(-1, d))
            self.lse.index_copy_(0, qdst, lc.reshape(-1))
        return self.lse[:self.n_img]
