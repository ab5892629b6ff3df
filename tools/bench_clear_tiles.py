"""CLEAR cpu-local path: query tile side and key-chunk size, against dense SDPA, interleaved in one process.

    OMP_NUM_THREADS=1 python tools/bench_clear_tiles.py --out bench/clear_tiles.json   # + .md (~10 CPU-minutes)

Why the defaults (`cpu_local.tile_side` = 8, `cpu_local.CHUNK_ROWS` = 4096) are what they are. One thread, fp32,
batch 1, `--heads` heads x 128 dims, 512 text tokens, random q / k / v. Per (grid, radius): dense SDPA, CLEAR at tile
sides 4, 6, 8 (default chunk) and at chunk rows 2048, 8192, 16384 (default tile), each after one warm-up call, then
`--rounds` interleaved rounds; `cpu_ms` = median process CPU time of one call, `speedup` = dense / this.
`parts` rows: where one default call's time goes at 64x64, r = 8 (the three kernel calls of cpu_clear_attention,
timed alone: text queries x all keys, image queries x text keys, image queries x their local windows with gathers).
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
    calls = variants(q, k, v, (grid_side, grid_side), radius)
    times = {name: [] for name in calls}
    for f in calls.values():
        f()
    for _ in range(rounds):
        for name, f in calls.items():
            t = time.process_time()
            f()
            times[name].append(time.process_time() - t)
    dense = statistics.median(times["dense"])
    return [{"grid": f"{grid_side}x{grid_side}", "radius": radius, "heads": heads, "variant": name,
             "cpu_ms": round(statistics.median(ts) * 1e3, 1), "speedup": round(dense / statistics.median(ts), 3),
             "loadavg": round(os.getloadavg()[0], 2)} for name, ts in times.items()]


def parts(heads: int, rounds: int, grid_side: int = 64, radius: float = 8.0) -> list[dict]:
    torch.manual_seed(0)
    n, n_img = N_TEXT + grid_side * grid_side, grid_side * grid_side
    q, k, v = (torch.randn(1, heads, n, HEAD_DIM) for _ in range(3))
    plan = cl.local_plan((grid_side, grid_side), radius, (cl.tile_side(radius),) * 2)
    buf = torch.empty(1, heads, n_img + 1, HEAD_DIM)
    calls = {"text queries x all keys": lambda: cl._FLASH(q[:, :, :N_TEXT], k, v),
             "image queries x text keys": lambda: cl._FLASH(q[:, :, N_TEXT:], k[:, :, :N_TEXT], v[:, :, :N_TEXT]),
             "image queries x local windows": lambda: cl._local(q[:, :, N_TEXT:], k[:, :, N_TEXT:],
                                                                v[:, :, N_TEXT:], plan, buf),
             "whole call": lambda: cl.cpu_clear_attention(*(x.transpose(1, 2) for x in (q, k, v)), n_text=N_TEXT,
                                                          grid=(grid_side, grid_side), radius=radius)}
    times = {name: [] for name in calls}
    for f in calls.values():
        f()
    for _ in range(rounds):
        for name, f in calls.items():
            t = time.process_time()
            f()
            times[name].append(time.process_time() - t)
    return [{"kind": "parts", "grid": f"{grid_side}x{grid_side}", "radius": radius, "heads": heads, "part": name,
             "cpu_ms": round(statistics.median(ts) * 1e3, 1)} for name, ts in times.items()]


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
    split = parts(args.heads, args.rounds)
    res = {"rows": rows, "parts": split, "command": "OMP_NUM_THREADS=1 python tools/bench_clear_tiles.py --out " + str(args.out),
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(rows) + "\nWhere one default call goes (64x64, r = 8, CPU ms):\n\n" + "\n".join(
        f"- {p['part']}: {p['cpu_ms']:.0f}" for p in split) + "\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
