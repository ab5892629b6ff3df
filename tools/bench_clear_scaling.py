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
Timing: wall clock on torch.get_num_threads() threads (1 unless told), the minimum of `repeats` calls after one
warm-up call (2 calls when one takes over ~3 s); calls over ~30 s (dense at the large grids, the blocks) run once
with no warm-up (`repeats` = 1 in the row). speedup_vs_dense = dense ms / this ms at the same grid (and block).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
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


def _time(fn, est_s: float, repeats: int) -> tuple[float, int]:
    """(ms, calls timed): min of `repeats` calls after a warm-up; 2 when a call takes over ~3 s; one cold call
    when it takes over ~30 s (est_s: the FLOP estimate at gflops_s)."""
    if est_s > 30:
        repeats = 1
    else:
        repeats = min(repeats, 2) if est_s > 3 else repeats
        fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3, repeats


def attention_rows(grids=GRIDS, radii=RADII, repeats: int = 3, gflops_s: float = 10.0, log=print,
                   methods=("dense", "clear")) -> list[dict]:
    rows = []
    for g in grids:
        grid, n = (g, g), N_TEXT + g * g
        gen = torch.Generator().manual_seed(g)
        q, k, v = (torch.randn(1, n, HEADS, HEAD_DIM, generator=gen) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        flops = dense_flops(n)
        if "dense" in methods:
            with torch.no_grad():
                ms, reps = _time(lambda: F.scaled_dot_product_attention(qt, kt, vt), flops / gflops_s / 1e9, repeats)
            rows.append(dict(kind="attention", grid=f"{g}x{g}", tokens=n, method="dense", radius=None,
                             ms=round(ms, 1), repeats=reps, attn_flops=flops, attn_flops_ideal=flops))
            log(rows[-1])
        for r in (radii if "clear" in methods else ()):
            flops = path_flops(N_TEXT, grid, r, 0, HEADS, HEAD_DIM)
            with torch.no_grad():
                ms, reps = _time(lambda: clear_attention(q, k, v, n_text=N_TEXT, grid=grid, radius=r),
                                 flops / gflops_s / 1e9, repeats)
            rows.append(dict(kind="attention", grid=f"{g}x{g}", tokens=n, method="clear", radius=r, ms=round(ms, 1),
                             repeats=reps, attn_flops=flops, attn_flops_ideal=ideal_flops(N_TEXT, grid, r),
                             path=clear_path(N_TEXT, grid, r, 0)))
            log(rows[-1])
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


def block_rows(grids=BLOCK_GRIDS, radius: float = 16, repeats: int = 2, gflops_s: float = 10.0,
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
            for method in methods:
                block.attn.set_processor(FluxAttnProcessor() if method == "dense"
                                         else ClearFluxProcessor(N_TEXT, grid, radius))
                attn = dense_flops(n) if method == "dense" else path_flops(N_TEXT, grid, radius, 0, HEADS, HEAD_DIM)
                with torch.no_grad():
                    ms, reps = _time(lambda: block(x, enc, temb, image_rotary_emb=rope),
                                     (linear + attn) / gflops_s / 1e9, repeats)
                rows.append(dict(kind="block", block=name, grid=f"{g}x{g}", tokens=n, method=method,
                                 radius=None if method == "dense" else radius, ms=round(ms, 1), repeats=reps,
                                 attn_flops=attn))
                log(rows[-1])
    return rows


def scaling_rows(grids=GRIDS, radii=RADII, block_grids=BLOCK_GRIDS, block_radius: float = 16, repeats: int = 3,
                 log=print) -> list[dict]:
    """Every scaling row (attention, then blocks); tools/bench_clear.py imports this for its `scaling` rows."""
    return add_speedups(attention_rows(grids, radii, repeats, log=log) + block_rows(block_grids, block_radius, log=log))


def add_speedups(rows: list[dict]) -> list[dict]:
    """speedup_vs_dense = the dense row's ms / this row's ms, same kind, grid (and block)."""
    dense = {(r["kind"], r["grid"], r.get("block")): r["ms"] for r in rows if r["method"] == "dense"}
    for r in rows:
        d = dense.get((r["kind"], r["grid"], r.get("block")))
        r["speedup_vs_dense"] = round(d / r["ms"], 2) if d else None
    return rows


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# CLEAR scaling ({meta['device']}, {meta['threads']} thread(s), {meta['dtype']}, batch 1, "
             f"{HEADS} heads x {HEAD_DIM}, {N_TEXT} text tokens)", "",
             f"Command: `{meta['command']}`", "",
             "| grid | tokens | method | radius | path | ms | repeats | attn GFLOP | ideal GFLOP | speedup vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "attention":
            lines.append(f"| {r['grid']} | {r['tokens']} | {r['method']} | {r['radius'] or ''} | {r.get('path', 'sdpa')}"
                         f" | {r['ms']:.0f} | {r['repeats']} | {r['attn_flops'] / 1e9:.1f} | "
                         f"{r['attn_flops_ideal'] / 1e9:.1f} | {r['speedup_vs_dense'] or 0:.2f}x |")
    lines += ["", "FLUX-width blocks (random weights), dense processor vs CLEAR processor:", "",
              "| block | grid | tokens | method | radius | ms | repeats | attn GFLOP | speedup vs dense |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "block":
            lines.append(f"| {r['block']} | {r['grid']} | {r['tokens']} | {r['method']} | {r['radius'] or ''} | "
                         f"{r['ms']:.0f} | {r['repeats']} | {r['attn_flops'] / 1e9:.1f} | "
                         f"{r['speedup_vs_dense'] or 0:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    att = [r for r in rows if r["kind"] == "attention"]
    series = [("dense", None)] + sorted({("clear", r["radius"]) for r in att if r["method"] == "clear"})
    for method, radius in series:
        pts = sorted((r["tokens"], r["ms"]) for r in att if r["method"] == method and r["radius"] == radius)
        ax.loglog(*zip(*pts), marker="o", label="dense SDPA" if method == "dense" else f"CLEAR r={radius}")
    ax.set_xlabel("tokens (512 text + h x w image)")
    ax.set_ylabel("attention ms")
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
    ap.add_argument("--est-gflops", type=float, default=10.0,
                    help="GFLOP/s assumed to decide warm-up and repeats (calls estimated over 30 s run once, cold)")
    ap.add_argument("--methods", nargs="+", default=["dense", "clear"], choices=["dense", "clear"])
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of --out this run does not measure (same kind, grid, method, radius, block)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    radii = [int(r) if float(r).is_integer() else r for r in args.radii]
    out = Path(args.out)
    meta = dict(device=platform.processor() or platform.machine(), threads=torch.get_num_threads(), dtype="fp32",
                torch=torch.__version__, command="OMP_NUM_THREADS=1 python tools/bench_clear_scaling.py "
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(to_markdown(rows, meta))
    plot(rows, out.with_suffix(".png"), meta)


if __name__ == "__main__":
    main()
