"""CLEAR's scaling curve: attention time and FLOPs vs the image token grid, dense SDPA vs CLEAR, in one run.

    OMP_NUM_THREADS=1 python tools/bench_clear_scaling.py --out bench/clear_scaling.json   # + .md and .png

Attention rows (kind "attention"): FLUX's 24 heads x 128 dims, 512 text tokens, batch 1, fp32, grids 16x16 ..
128x128; method "dense" = F.scaled_dot_product_attention over all N = 512 + h*w tokens (the unmasked model), method
"clear" = dicompress.clear.clear_attention at radius r (8, 16, 32), no pooled keys. attn_flops = the FLOPs the path
computes for Q K^T and P V (2 per multiply-add; CLEAR: padding and the square tile windows included),
attn_flops_ideal = the exact count the CLEAR mask allows (circle clipped at the grid border).
Block rows (kind "block"): one FLUX-width double block and one single block (diffusers FluxTransformerBlock /
FluxSingleTransformerBlock, dim 3072, 24 heads x 128, random weights, rotary embeddings as FLUX builds them), dense
processor vs a CLEAR processor written here (the same projections, clear_attention in place of SDPA) at r = 16.
Timing: one thread unless told. The paths of one grid (dense and each radius; the dense and CLEAR processor of one
block) run interleaved in one process (dense, r=8, r=16, r=32, dense, ...), each after one untimed warm-up call when
a call is estimated under ~3 s; `repeats` rounds, 1 for calls estimated over ~20 s (dense at 96x96 and 128x128, the
128x128 blocks). Each row reports the median wall time (`ms`) and the median CPU time of the process (`cpu_ms`,
which on a shared machine leaves out the time the process waited for a core), and speedup_vs_dense /
speedup_vs_dense_cpu = dense / this at the same grid (and block). `loadavg` = the 1-minute load average when the
row was measured (also at start and end in `meta`). `--quick`: 16x16 .. 64x64, r = 8 and 16, no blocks (~1 min).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dicompress.clear import clear_attention
from dicompress.clear.attention import clear_path, path_flops

GRIDS = (16, 32, 64, 96, 128)
RADII = (8, 16, 32)
BLOCK_GRIDS = (64, 128)
HEADS, HEAD_DIM, N_TEXT = 24, 128, 512


def dense_flops(n: int, heads: int = HEADS, head_dim: int = HEAD_DIM, batch: int = 1) -> int:
    return 4 * batch * heads * head_dim * n * n


def ideal_flops(n_text: int, grid: tuple[int, int], radius: float, heads: int = HEADS, head_dim: int = HEAD_DIM,
                batch: int = 1) -> int:
    """Exact (query, key) pairs the CLEAR mask allows: text rows see all N keys; image rows see the text and the
    image keys inside the circle, clipped at the grid border (sum over offsets of the pairs having it)."""
    h, w = grid
    n = n_text + h * w
    r = math.ceil(radius)
    local = sum((h - abs(dy)) * (w - abs(dx)) for dy in range(-r, r + 1) for dx in range(-r, r + 1)
                if dy * dy + dx * dx < radius * radius and abs(dy) < h and abs(dx) < w)
    return 4 * batch * heads * head_dim * (n_text * n + h * w * n_text + local)


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def _interleaved(fns: dict, est_s: dict, repeats: int) -> dict:
    """{name: (median wall ms, median CPU ms, calls timed)}: the calls of one round run back to back, in order;
    warm-up for calls estimated under ~3 s, one call for those over ~20 s."""
    reps = {k: 1 if est_s[k] > 20 else repeats for k in fns}
    for k, fn in fns.items():
        if est_s[k] < 3:
            fn()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for i in range(max(reps.values())):
        for k, fn in fns.items():
            if i < reps[k]:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]) * 1e3, statistics.median(cpu[k]) * 1e3, reps[k]) for k in fns}


def attention_rows(grids=GRIDS, radii=RADII, repeats: int = 3, gflops_s: float = 40.0, log=print,
                   methods=("dense", "clear")) -> list[dict]:
    rows = []
    for g in grids:
        grid, n = (g, g), N_TEXT + g * g
        gen = torch.Generator().manual_seed(g)
        q, k, v = (torch.randn(1, n, HEADS, HEAD_DIM, generator=gen) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        fns, est, flops = {}, {}, {}
        if "dense" in methods:
            fns["dense"] = lambda: F.scaled_dot_product_attention(qt, kt, vt)
            flops["dense"] = dense_flops(n)
        for r in (radii if "clear" in methods else ()):
            fns[r] = (lambda r=r: clear_attention(q, k, v, n_text=N_TEXT, grid=grid, radius=r))
            flops[r] = path_flops(N_TEXT, grid, r, 0, HEADS, HEAD_DIM)
        est = {key: f / gflops_s / 1e9 for key, f in flops.items()}
        with torch.no_grad():
            timed = _interleaved(fns, est, repeats)
        for key, (ms, cpu_ms, reps) in timed.items():
            row = dict(kind="attention", grid=f"{g}x{g}", tokens=n, method="dense" if key == "dense" else "clear",
                       radius=None if key == "dense" else key, ms=round(ms, 1), cpu_ms=round(cpu_ms, 1),
                       repeats=reps, attn_flops=flops[key], loadavg=_loadavg())
            if key == "dense":
                row.update(attn_flops_ideal=flops[key], path="sdpa")
            else:
                row.update(attn_flops_ideal=ideal_flops(N_TEXT, grid, key), path=clear_path(N_TEXT, grid, key, 0))
            rows.append(row)
            log(row)
    return rows


class ClearFluxProcessor:
    """FluxAttnProcessor with clear_attention in place of SDPA (double blocks: text from encoder_hidden_states;
    single blocks: the first n_text tokens of hidden_states are the text)."""

    def __init__(self, n_text: int, grid: tuple[int, int], radius: float):
        self.n_text, self.grid, self.radius = n_text, grid, radius

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections
        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.added_kv_proj_dim is not None:
            eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = clear_attention(q, k, v, n_text=self.n_text, grid=self.grid, radius=self.radius).flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        enc, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]],
                                        dim=1)
        return attn.to_out[1](attn.to_out[0](out.contiguous())), attn.to_add_out(enc.contiguous())


def _flux_blocks():
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    torch.manual_seed(0)
    dims = dict(dim=HEADS * HEAD_DIM, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)
    return {"double": FluxTransformerBlock(**dims).eval(), "single": FluxSingleTransformerBlock(**dims).eval()}


def _rotary(grid: tuple[int, int]):
    from diffusers.models.embeddings import FluxPosEmbed
    h, w = grid
    img = torch.zeros(h * w, 3)
    img[:, 1], img[:, 2] = torch.arange(h * w) // w, torch.arange(h * w) % w
    return FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(torch.cat([torch.zeros(N_TEXT, 3), img]))


def block_rows(grids=BLOCK_GRIDS, radius: float = 16, repeats: int = 2, gflops_s: float = 40.0,
               log=print, methods=("dense", "clear")) -> list[dict]:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    rows, blocks = [], _flux_blocks()
    dim = HEADS * HEAD_DIM
    for g in grids:
        grid, n = (g, g), N_TEXT + g * g
        gen = torch.Generator().manual_seed(g)
        x, enc, temb = torch.randn(1, g * g, dim, generator=gen), torch.randn(1, N_TEXT, dim, generator=gen), \
            torch.randn(1, dim, generator=gen)
        rope = _rotary(grid)
        for name, block in blocks.items():
            linear = 2 * n * sum(p.numel() for p in block.parameters() if p.dim() == 2)   # rough, for repeats only
            procs = {m: FluxAttnProcessor() if m == "dense" else ClearFluxProcessor(N_TEXT, grid, radius)
                     for m in methods}
            attn = {m: dense_flops(n) if m == "dense" else path_flops(N_TEXT, grid, radius, 0, HEADS, HEAD_DIM)
                    for m in methods}

            def call(m, block=block):
                block.attn.set_processor(procs[m])
                return block(x, enc, temb, image_rotary_emb=rope)
            with torch.no_grad():
                timed = _interleaved({m: (lambda m=m: call(m)) for m in methods},
                                     {m: (linear + attn[m]) / gflops_s / 1e9 for m in methods}, repeats)
            for m, (ms, cpu_ms, reps) in timed.items():
                rows.append(dict(kind="block", block=name, grid=f"{g}x{g}", tokens=n, method=m,
                                 radius=None if m == "dense" else radius, ms=round(ms, 1), cpu_ms=round(cpu_ms, 1),
                                 repeats=reps, attn_flops=attn[m], loadavg=_loadavg()))
                log(rows[-1])
    return rows


def scaling_rows(grids=GRIDS, radii=RADII, block_grids=BLOCK_GRIDS, block_radius: float = 16, repeats: int = 3,
                 log=print) -> list[dict]:
    """Every scaling row (attention, then blocks); tools/bench_clear.py imports this for its `scaling` rows."""
    return add_speedups(attention_rows(grids, radii, repeats, log=log) + block_rows(block_grids, block_radius, log=log))


def add_speedups(rows: list[dict]) -> list[dict]:
    """speedup_vs_dense(_cpu) = the dense row's ms (cpu_ms) / this row's, same kind, grid (and block)."""
    for field, out in (("ms", "speedup_vs_dense"), ("cpu_ms", "speedup_vs_dense_cpu")):
        dense = {(r["kind"], r["grid"], r.get("block")): r.get(field) for r in rows if r["method"] == "dense"}
        for r in rows:
            d = dense.get((r["kind"], r["grid"], r.get("block")))
            r[out] = round(d / r[field], 2) if d and r.get(field) else None
    return rows


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# CLEAR scaling ({meta['device']}, {meta['threads']} thread(s), {meta['dtype']}, batch 1, "
             f"{HEADS} heads x {HEAD_DIM}, {N_TEXT} text tokens)", "",
             f"Command: `{meta['command']}`", "",
             f"Load average (1 min) at start / end: {meta.get('loadavg_start')} / {meta.get('loadavg_end')}. "
             "ms / CPU ms: medians of the interleaved calls; speedups: dense / this (wall, CPU).", "",
             "| grid | tokens | method | radius | path | ms | CPU ms | repeats | load | attn GFLOP | ideal GFLOP "
             "| speedup vs dense (wall) | (CPU) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "attention":
            lines.append(f"| {r['grid']} | {r['tokens']} | {r['method']} | {r['radius'] or ''} | "
                         f"{r.get('path', 'sdpa')} | {r['ms']:.0f} | {r.get('cpu_ms') or 0:.0f} | {r['repeats']} | "
                         f"{r.get('loadavg', '')} | "
                         f"{r['attn_flops'] / 1e9:.1f} | {r['attn_flops_ideal'] / 1e9:.1f} | "
                         f"{r['speedup_vs_dense'] or 0:.2f}x | {r.get('speedup_vs_dense_cpu') or 0:.2f}x |")
    lines += ["", "FLUX-width blocks (random weights), dense processor vs CLEAR processor:", "",
              "| block | grid | tokens | method | radius | ms | CPU ms | repeats | load | attn GFLOP "
              "| speedup vs dense (wall) | (CPU) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "block":
            lines.append(f"| {r['block']} | {r['grid']} | {r['tokens']} | {r['method']} | {r['radius'] or ''} | "
                         f"{r['ms']:.0f} | {r.get('cpu_ms') or 0:.0f} | {r['repeats']} | {r.get('loadavg', '')} | "
                         f"{r['attn_flops'] / 1e9:.1f} | {r['speedup_vs_dense'] or 0:.2f}x | "
                         f"{r.get('speedup_vs_dense_cpu') or 0:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    att = [r for r in rows if r["kind"] == "attention"]
    series = [("dense", None)] + sorted({("clear", r["radius"]) for r in att if r["method"] == "clear"})
    for method, radius in series:
        pts = sorted((r["tokens"], r.get("cpu_ms") or r["ms"]) for r in att
                     if r["method"] == method and r["radius"] == radius)
        ax.loglog(*zip(*pts), marker="o", label="dense SDPA" if method == "dense" else f"CLEAR r={radius}")
    ax.set_xlabel("tokens (512 text + h x w image)")
    ax.set_ylabel("attention CPU ms (median)")
    ax.set_title(f"CLEAR vs dense attention, {meta['threads']} CPU thread, fp32, 24x128")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/clear_scaling.json")
    ap.add_argument("--grids", type=int, nargs="*", default=list(GRIDS))
    ap.add_argument("--radii", type=float, nargs="+", default=list(RADII))
    ap.add_argument("--block-grids", type=int, nargs="*", default=list(BLOCK_GRIDS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--est-gflops", type=float, default=40.0,
                    help="GFLOP/s assumed to decide warm-up and repeats (calls estimated over 20 s run once, cold)")
    ap.add_argument("--quick", action="store_true", help="grids 16 32 64, radii 8 16, no blocks (about a minute)")
    ap.add_argument("--methods", nargs="+", default=["dense", "clear"], choices=["dense", "clear"])
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of --out this run does not measure (same kind, grid, method, radius, block)")
    args = ap.parse_args(argv)
    if args.quick:
        args.grids, args.radii, args.block_grids = [16, 32, 64], [8, 16], []
    torch.set_num_threads(args.threads)
    radii = [int(r) if float(r).is_integer() else r for r in args.radii]
    out = Path(args.out)
    meta = dict(device=platform.processor() or platform.machine(), threads=torch.get_num_threads(), dtype="fp32",
                torch=torch.__version__, loadavg_start=_loadavg(),
                command="OMP_NUM_THREADS=1 python tools/bench_clear_scaling.py "
                + " ".join(argv if argv is not None else __import__("sys").argv[1:]))

    def log(row):
        print(json.dumps(row), flush=True)

    rows = (attention_rows(args.grids, radii, args.repeats, args.est_gflops, log=log, methods=args.methods)
            + block_rows(args.block_grids, 16, 2, args.est_gflops, log=log, methods=args.methods))
    if args.merge and out.exists():
        done = {(r["kind"], r["grid"], r["method"], r["radius"], r.get("block")) for r in rows}
        old = json.loads(out.read_text())
        rows = [r for r in old["rows"]
                if (r["kind"], r["grid"], r["method"], r["radius"], r.get("block")) not in done] + rows
        rows.sort(key=lambda r: (r["kind"], r.get("block") or "", r["tokens"], r["method"] != "dense",
                                 r["radius"] or 0))
        meta["command"] = old["meta"]["command"] + " ; " + meta["command"]
    rows = add_speedups(rows)
    meta["loadavg_end"] = _loadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(to_markdown(rows, meta))
    plot(rows, out.with_suffix(".png"), meta)


if __name__ == "__main__":
    main()
