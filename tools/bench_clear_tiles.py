"""CLEAR cpu-local path: query tile side and key-chunk size, against dense SDPA, interleaved in one process.

    OMP_NUM_THREADS=1 python tools/bench_clear_tiles.py --out bench/clear_tiles.json   # + .md (~10 CPU-minutes)

Why the defaults (`cpu_local.tile_side` = 8, `cpu_local.CHUNK_ROWS` = 4096) are what they are. One thread, fp32,
batch 1, `--heads` heads x 128 dims, 512 text tokens, random q / k / v. Per (grid, radius): dense SDPA, CLEAR at tile
sides 4, 6, 8 (default chunk) and at chunk rows 2048, 8192, 16384 (default tile), each after one warm-up call, then
`--rounds` interleaved rounds; `cpu_ms` = median process CPU time of one call, `speedup` = dense / this.
`parts` rows: where one default call's time goes at 64x64, r = 8 and 128x128, r = 16 (the three phases of
cpu_clear_attention on every head's contiguous copy, timed alone: text queries x all keys, image queries x text keys,
image queries x their local windows with gathers). `layout` rows: the two global kernel calls on the processors'
(B, N, H, D) layout vs per-head contiguous copies, 24 heads. `rates` rows: aten's CPU flash kernel's time per
(query, key) pair at the shapes the phases use; `attainable`: the speedup if each phase ran at that rate and
nothing else ran (what bounds the speedup on this kernel: see the README's CLEAR section).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dicompress.clear.cpu_local as cl

CASES = ((64, 8.0), (96, 16.0), (128, 16.0), (128, 8.0))
TILES, CHUNKS = (4, 6, 8), (2048, 8192, 16384)
N_TEXT, HEAD_DIM = 512, 128


def variants(q, k, v, grid, radius) -> dict:
    def clear(tile=None, chunk=cl.CHUNK_ROWS):
        def call():
            default, cl.CHUNK_ROWS = cl.CHUNK_ROWS, chunk
            try:
                return cl.cpu_clear_attention(q, k, v, n_text=N_TEXT, grid=grid, radius=radius, tile=tile)
            finally:
                cl.CHUNK_ROWS = default
        return call
    out = {"dense": lambda: F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))}
    out.update({f"tile={t}": clear(tile=t) for t in TILES})
    out.update({f"chunk={c}": clear(chunk=c) for c in CHUNKS})
    return out


def measure(grid_side: int, radius: float, heads: int, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    n = N_TEXT + grid_side * grid_side
    q, k, v = (torch.randn(1, n, heads, HEAD_DIM) for _ in range(3))
    times = _timed(variants(q, k, v, (grid_side, grid_side), radius), rounds)
    return [{"grid": f"{grid_side}x{grid_side}", "radius": radius, "heads": heads, "variant": name,
             "cpu_ms": round(sec * 1e3, 1), "speedup": round(times["dense"] / sec, 3),
             "loadavg": round(os.getloadavg()[0], 2)} for name, sec in times.items()]


def _timed(calls: dict, rounds: int) -> dict:
    """Median process CPU seconds of each call, after one warm-up call each, rounds interleaved."""
    times = {name: [] for name in calls}
    for f in calls.values():
        f()
    for _ in range(rounds):
        for name, f in calls.items():
            t = time.process_time()
            f()
            times[name].append(time.process_time() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def parts(heads: int, rounds: int, grid_side: int = 64, radius: float = 8.0) -> list[dict]:
    """The phases of cpu_clear_attention on every head's contiguous copy (the copies made outside the timing)."""
    torch.manual_seed(0)
    n, n_img = N_TEXT + grid_side * grid_side, grid_side * grid_side
    qs, ks, vs = (torch.randn(1, n, heads, HEAD_DIM) for _ in range(3))
    plan = cl.local_plan((grid_side, grid_side), radius, (cl.tile_side(radius),) * 2)
    local = cl.LocalWindows(plan, n_img, HEAD_DIM, torch.float32)
    qh = [qs[0, :, i].contiguous() for i in range(heads)]
    kv = [torch.stack([ks[0, :, i], vs[0, :, i]]) for i in range(heads)]
    o_img = torch.empty(n_img + 1, HEAD_DIM)

    def each_head(f):
        return lambda: [f(qh[i], kv[i]) for i in range(heads)]
    glob = (lambda q, x: cl._FLASH(q[None, None, N_TEXT:], x[0, :N_TEXT][None, None], x[1, :N_TEXT][None, None]))
    calls = {"text queries x all keys": each_head(lambda q, x: cl.text_queries(q[:N_TEXT], x)),
             "image queries x text keys": each_head(glob),
             "image queries x local windows": each_head(lambda q, x: local(q[N_TEXT:], x[0, N_TEXT:],
                                                                           x[1, N_TEXT:], o_img)),
             "whole call": lambda: cl.cpu_clear_attention(qs, ks, vs, n_text=N_TEXT, grid=(grid_side, grid_side),
                                                          radius=radius)}
    return [{"kind": "parts", "grid": f"{grid_side}x{grid_side}", "radius": radius, "heads": heads, "part": name,
             "cpu_ms": round(sec * 1e3, 1)} for name, sec in _timed(calls, rounds).items()]


def layout(heads: int, rounds: int, grid_side: int = 64) -> list[dict]:
    """The two global kernel calls on (B, N, H, D) as processors hand it over (a head's rows H x D apart) vs on
    per-head contiguous copies (what cpu_clear_attention runs on), and the copies' own cost."""
    torch.manual_seed(0)
    n = N_TEXT + grid_side * grid_side
    qs, ks, vs = (torch.randn(1, n, heads, HEAD_DIM) for _ in range(3))
    q, k, v = (x.transpose(1, 2) for x in (qs, ks, vs))                     # (B, H, N, D) strided views
    qc, kc, vc = (x.contiguous() for x in (q, k, v))

    def kernels(q, k, v):
        return lambda: (cl._FLASH(q[:, :, :N_TEXT], k, v), cl._FLASH(q[:, :, N_TEXT:], k[:, :, :N_TEXT],
                                                                        v[:, :, :N_TEXT]))
    calls = {"strided (B, N, H, D)": kernels(q, k, v), "contiguous per head": kernels(qc, kc, vc),
             "copying q, k, v per head": lambda: [x.contiguous() for x in (q, k, v)]}
    return [{"kind": "layout", "grid": f"{grid_side}x{grid_side}", "heads": heads, "variant": name,
             "cpu_ms": round(sec * 1e3, 1)} for name, sec in _timed(calls, rounds).items()]


def rates(rounds: int) -> list[dict]:
    """ns of process CPU time per (query, key) pair of aten's CPU flash kernel (one head, 128 dims) at the shapes of
    cpu_clear_attention's phases and of dense SDPA, for the two target cases. The kernel splits its queries into
    blocks of 32 below 192 queries, 64 below 768 and 256 above; a query tile computes its whole window."""
    out = []
    for side, radius in ((64, 8.0), (128, 16.0)):
        n_img = side * side
        n = N_TEXT + n_img
        t = cl.tile_side(radius)
        t_k = cl.local_plan((side, side), radius, (t, t)).index.shape[1]
        shapes = {"dense": (1, n, n, False), "text queries": (1, N_TEXT, n, False),
                  "image queries x text keys": (1, n_img, N_TEXT, False),
                  "local windows": (min(64, n_img // (t * t)), t * t, t_k, True)}
        for phase, (b, t_q, keys, masked) in shapes.items():
            torch.manual_seed(0)
            q, k, v = (torch.randn(b, 1, m, HEAD_DIM) for m in (t_q, keys, keys))
            mask = torch.zeros(t_q, keys).expand(b, 1, t_q, keys) if masked else None
            sec = _timed({phase: lambda: cl._FLASH(q, k, v, attn_mask=mask)}, 1 if phase == "dense" and side > 64
                         else rounds)[phase]
            # the phase's (query, key) pairs in one head of the whole call (tile padding included)
            pairs = {"dense": n * n, "text queries": N_TEXT * n, "image queries x text keys": n_img * N_TEXT,
                     "local windows": n_img * t_k}[phase]
            out.append({"kind": "rates", "grid": f"{side}x{side}", "radius": radius, "phase": phase, "batch": b,
                        "queries": t_q, "keys": keys, "pairs_per_head": pairs,
                        "ns_per_pair": round(sec / (b * t_q * keys) * 1e9, 2)})
    return out


def attainable(rates_rows: list[dict]) -> list[dict]:
    """The speedup over dense if every phase ran at its kernel's own rate with nothing else (no gathers, copies or
    merge): dense pairs x dense rate / sum over phases of pairs x rate, per case."""
    out = []
    for case in dict.fromkeys((r["grid"], r["radius"]) for r in rates_rows):
        rows = {r["phase"]: r for r in rates_rows if (r["grid"], r["radius"]) == case}
        cost = {p: r["pairs_per_head"] * r["ns_per_pair"] for p, r in rows.items()}
        clear = sum(c for p, c in cost.items() if p != "dense")
        out.append({"grid": case[0], "radius": case[1], "speedup_bound": round(cost["dense"] / clear, 2),
                    "flop_ratio": round(rows["dense"]["pairs_per_head"] / sum(
                        r["pairs_per_head"] for p, r in rows.items() if p != "dense"), 2)})
    return out


def markdown(rows: list[dict]) -> str:
    names = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["| grid | radius | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for key in dict.fromkeys((r["grid"], r["radius"]) for r in rows):
        cells = {r["variant"]: r for r in rows if (r["grid"], r["radius"]) == key}
        lines.append(f"| {key[0]} | {key[1]:g} | " + " | ".join(
            f"{cells[n]['cpu_ms']:.0f}" + ("" if n == "dense" else f" ({cells[n]['speedup']:.2f}x)") for n in names)
            + " |")
    return ("CPU ms per call (speedup vs dense SDPA); tile=T uses the default chunk, chunk=C the default tile "
            f"({cl.tile_side(8)}), default chunk {cl.CHUNK_ROWS}.\n\n" + "\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/clear_tiles.json"))
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for side, radius in CASES:
        rows += measure(side, radius, args.heads, args.rounds)
        print(json.dumps(rows[-1]), flush=True)
    split = parts(args.heads, args.rounds) + parts(args.heads, args.rounds, 128, 16.0)
    lay = layout(24, args.rounds)
    rate = rates(args.rounds)
    bound = attainable(rate)
    res = {"rows": rows, "parts": split, "layout": lay, "rates": rate, "attainable": bound, "command": "OMP_NUM_THREADS=1 python tools/bench_clear_tiles.py --out " + str(args.out),
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(rows) + f"\nWhere one default call goes ({args.heads} heads, CPU ms):\n\n" + "\n".join(
        f"- {p['grid']}, r = {p['radius']:g}: {p['part']}: {p['cpu_ms']:.0f}" for p in split)
    md += "\n\nHead layout of the two global kernel calls (64x64, 24 heads, CPU ms):\n\n" + "\n".join(
        f"- {r['variant']}: {r['cpu_ms']:.0f}" for r in lay)
    md += "\n\nKernel time per (query, key) pair (ns; queries x keys per call):\n\n" + "\n".join(
        f"- {r['grid']}, r = {r['radius']:g}, {r['phase']} ({r['queries']} x {r['keys']}): {r['ns_per_pair']:.2f}"
        for r in rate)
    md += "\n\nSpeedup over dense if every phase ran at its kernel rate and nothing else ran:\n\n" + "\n".join(
        f"- {b['grid']}, r = {b['radius']:g}: {b['speedup_bound']:.2f}x (pair ratio {b['flop_ratio']:.2f}x)"
        for b in bound) + "\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
