"""Dense2MoE on CUDA: the MoE FFN's torch loop against its Triton grouped GEMM (dicompress/moe/grouped.py), and both
against the dense FFN, at FLUX width.

    python tools/bench_moe_gpu.py --out bench/gpu/moe.json        # also writes bench/gpu/moe.md
    python tools/bench_moe_gpu.py --out bench/gpu/moe.json --sweep   # + the routed experts per candidate tile

The FFN: 3072 -> 12288 -> 3072, GELU tanh, bf16 (--dtype), batch 1 at --tokens tokens. The MoEFFN holds the same
neurons in 8 equal slices of 1536: a shared expert + 7 routed experts, top-2 (3 of 8 slices per token, 0.375 of
the FFN's parameters), router weights random (near-uniform load; reported). Timed, each the median of --repeats
forwards in CUDA events, the three back to back in each round:
  dense_ms        the dense FFN (two cuBLAS GEMMs + GELU)
  moe_loop_ms     MoEFFN.forward with DICOMPRESS_KERNELS=reference: its torch loop (one gather / matmul pair /
                  scatter per expert)
  moe_triton_ms   route, shared expert and bias as MoEFFN.forward runs them, the routed experts through
                  grouped_routed_ffn (one grouped GEMM launch per projection)
and rel_err_*: the Frobenius error of the loop and of the Triton path against the fp32 torch loop on the same
weights, routed as the measured model routes (fp32_reference). `forward_takes_triton` says whether MoEFFN.forward
itself reaches grouped_routed_ffn (true once experts.py calls it). `pack_extra_mib`: GPU memory the packing
added (0: the experts' parameters now view the packed buffers).

Without CUDA the script exits with a message and status 2; --smoke runs all of it on the CPU through Triton's
interpreter at toy sizes (the check that it works before a GPU session spends time on it).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dense_parts(dim: int, hidden: int, device, dtype, seed: int = 0) -> dict:
    """A dense GELU-tanh FFN's weights as moe_from_dense takes them (nn.Linear's default initialisation scale)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def uniform(shape, fan_in):
        return ((torch.rand(shape, generator=g, device=device) * 2 - 1) / fan_in ** 0.5).to(dtype)

    return {"w1": uniform((hidden, dim), dim), "b1": uniform((hidden,), dim), "w2": uniform((dim, hidden), hidden),
            "b2": uniform((dim,), hidden), "approximate": "tanh"}


def dense_ffn(parts: dict, x: torch.Tensor) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, parts["w1"], parts["b1"]), approximate="tanh"), parts["w2"], parts["b2"])


def flux_moe(parts: dict, slices: int = 8, top_k: int = 2, seed: int = 0):
    """The MoEFFN of `parts`' neurons: slice 0 shared, slices 1.. routed, a random router."""
    from dicompress.moe import moe_from_dense
    hidden, dim = parts["w1"].shape
    width = hidden // slices
    dev = parts["w1"].device
    g = torch.Generator(device=dev).manual_seed(seed)
    router = ((torch.randn(slices - 1, dim, generator=g, device=dev) / dim ** 0.5).to(parts["w1"].dtype),
              torch.zeros(slices - 1, device=dev, dtype=parts["w1"].dtype))
    experts = [torch.arange(width * (i + 1), width * (i + 2), device=dev) for i in range(slices - 1)]
    return moe_from_dense(parts, torch.arange(width, device=dev), experts, top_k, router=router).eval()


def triton_forward(moe, x: torch.Tensor) -> torch.Tensor:
    """MoEFFN.forward's inference arithmetic with the routed experts through grouped_routed_ffn."""
    from dicompress.moe.grouped import grouped_routed_ffn
    idx, gates, _ = moe.route(x)
    out = moe.shared(x) if moe.shared is not None else x.new_zeros(x.shape)
    if moe.bias is not None:
        out.add_(moe.bias)
    routed = grouped_routed_ffn(moe, x, idx, gates)
    if routed is None:
        raise RuntimeError("grouped_routed_ffn did not apply (see dicompress/moe/grouped.py: applies)")
    return out.add_(routed)


@contextmanager
def kernels(value: str):
    before = os.environ.get("DICOMPRESS_KERNELS")
    os.environ["DICOMPRESS_KERNELS"] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DICOMPRESS_KERNELS", None)
        else:
            os.environ["DICOMPRESS_KERNELS"] = before


def loop_forward(moe, x: torch.Tensor) -> torch.Tensor:
    with kernels("reference"):
        return moe(x)


def time_ms(fns: dict, x: torch.Tensor, repeats: int, warmup: int = 3) -> dict:
    """Median milliseconds of each fn(x) (CUDA events; the wall clock on CPU), the fns back to back each round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn(x)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if x.device.type != "cuda":
                t = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - t) * 1e3)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(v) for name, v in times.items()}


def fp32_reference(moe, x: torch.Tensor) -> torch.Tensor:
    """The torch loop of an fp32 copy of `moe` on x, routed as `moe` routes x (a token whose top-k logits are
    near a tie may pick other experts at fp32 logits: one such token would outweigh all the rounding error)."""
    ref = copy.deepcopy(moe).float()
    idx, gates, probs = moe.route(x)
    ref.route = lambda _: (idx, gates.float(), probs.float())
    return loop_forward(ref, x.float())


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def forward_takes_triton(moe, x: torch.Tensor) -> bool:
    """Whether MoEFFN.forward calls the grouped GEMM (a spy on triton_moe.grouped_gemm for one forward)."""
    from dicompress.kernels import triton_moe
    real, calls = triton_moe.grouped_gemm, []

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    triton_moe.grouped_gemm = spy
    try:
        moe(x)
    finally:
        triton_moe.grouped_gemm = real
    return bool(calls)


@torch.no_grad()
def rows(tokens: list[int], repeats: int, dtype: torch.dtype, dim: int = 3072, hidden: int = 12288,
         slices: int = 8, top_k: int = 2, device: str = "cuda", warmup: int = 3) -> list[dict]:
    from dicompress.moe.grouped import pack_experts
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    parts = dense_parts(dim, hidden, dev, dtype)
    moe = flux_moe(parts, slices, top_k)
    before = torch.cuda.memory_allocated() if cuda else 0
    pack_experts(moe)
    extra = round((torch.cuda.memory_allocated() - before) / 2 ** 20, 1) if cuda else None
    out = []
    g = torch.Generator(device=dev).manual_seed(1)
    for n in tokens:
        x = torch.randn(n, dim, generator=g, device=dev).to(dtype)
        ref = fp32_reference(moe, x)
        loop, tri = loop_forward(moe, x), triton_forward(moe, x)
        ms = time_ms({"dense": lambda v: dense_ffn(parts, v), "loop": lambda v: loop_forward(moe, v),
                      "triton": lambda v: triton_forward(moe, v)}, x, repeats, warmup)
        counts = torch.bincount(moe.route(x)[0].reshape(-1), minlength=slices - 1).double()
        out.append({"kind": "moe_ffn_gpu", "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
                    "dtype": str(dtype)[6:], "dim": dim, "hidden": hidden, "shared": hidden // slices,
                    "experts": f"{slices - 1}x{hidden // slices}", "top_k": top_k, "tokens": n, "batch": 1,
                    "dense_ms": round(ms["dense"], 4), "moe_loop_ms": round(ms["loop"], 4),
                    "moe_triton_ms": round(ms["triton"], 4),
                    "loop_over_dense": round(ms["loop"] / ms["dense"], 3),
                    "triton_over_dense": round(ms["triton"] / ms["dense"], 3),
                    "triton_over_loop": round(ms["triton"] / ms["loop"], 3),
                    "rel_err_loop": rel_err(loop, ref), "rel_err_triton": rel_err(tri, ref),
                    "load": [round(v, 3) for v in (counts / counts.sum()).tolist()],
                    "pack_extra_mib": extra, "forward_takes_triton": forward_takes_triton(moe, x)})
        r = out[-1]
        print(f"{n} tokens: dense {ms['dense']:.3f} ms, MoE loop {ms['loop']:.3f} ms, MoE Triton {ms['triton']:.3f} "
              f"ms (Triton / loop {r['triton_over_loop']}, Triton / dense {r['triton_over_dense']}); rel err loop "
              f"{r['rel_err_loop']:.2e}, Triton {r['rel_err_triton']:.2e}", flush=True)
    return out


@torch.no_grad()
def sweep_rows(tokens: int, repeats: int, dtype: torch.dtype, dim: int = 3072, hidden: int = 12288,
               device: str = "cuda", warmup: int = 3) -> list[dict]:
    """The routed experts alone (grouped_routed_ffn, both launches) with each of triton_moe.TILE_CANDIDATES."""
    from dicompress.kernels.triton_moe import TILE_CANDIDATES
    from dicompress.moe.grouped import grouped_routed_ffn
    moe = flux_moe(dense_parts(dim, hidden, torch.device(device), dtype))
    x = torch.randn(tokens, dim, generator=torch.Generator(device=device).manual_seed(2), device=device).to(dtype)
    idx, gates, _ = moe.route(x)
    first = grouped_routed_ffn(moe, x, idx, gates)
    fns = {str(c or "default"): (lambda v, c=c: grouped_routed_ffn(moe, v, idx, gates, blocks=c))
           for c in TILE_CANDIDATES}
    ms = time_ms(fns, x, repeats, warmup)
    out = [{"kind": "moe_tile_sweep", "tokens": tokens, "tile": name, "routed_ms": round(t, 4),
            "vs_default": round(t / ms["default"], 3), "max_abs_diff_vs_default":
            float((fns[name](x).float() - first.float()).abs().max())} for name, t in ms.items()]
    for r in out:
        print(f"sweep {r['tile']}: {r['routed_ms']:.3f} ms ({r['vs_default']}x default)", flush=True)
    return out


def markdown(res: dict) -> str:
    lines = [f"MoE FFN on {res['device']} ({res['dtype']}, torch {res['torch']}, triton {res['triton']}): "
             f"`{res['command']}`", "",
             "| tokens | dense ms | MoE loop ms | MoE Triton ms | loop / dense | Triton / dense | Triton / loop "
             "| rel err loop | rel err Triton |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['tokens']} | {r['dense_ms']:.3f} | {r['moe_loop_ms']:.3f} | {r['moe_triton_ms']:.3f} | "
                     f"{r['loop_over_dense']:.3f} | {r['triton_over_dense']:.3f} | {r['triton_over_loop']:.3f} | "
                     f"{r['rel_err_loop']:.1e} | {r['rel_err_triton']:.1e} |")
    if res.get("sweep"):
        lines += ["", f"Routed experts alone at {res['sweep'][0]['tokens']} tokens, per tile:", "",
                  "| tile | ms | vs default |", "|---|---|---|"]
        lines += [f"| {r['tile']} | {r['routed_ms']:.3f} | {r['vs_default']:.3f} |" for r in res["sweep"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/gpu/moe.json")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, a 64 -> 256 FFN, 1 repeat: "
                    "the whole script runs without a GPU (tests/test_kernels_moe.py; timings meaningless)")
    ap.add_argument("--sweep", action="store_true", help="also time the routed experts with each tile of "
                    "triton_moe.TILE_CANDIDATES at the largest --tokens")
    args = ap.parse_args(argv)
    command = "python tools/bench_moe_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {"dtype": args.dtype, "torch": torch.__version__, "host": platform.node(), "command": command}
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")     # before triton is first imported
        from dicompress.moe.grouped import interpreted
        with interpreted():
            res.update(device="cpu (smoke: Triton's interpreter)", triton="interpreter",
                       rows=rows([37], 1, DTYPES[args.dtype], dim=64, hidden=256, device="cpu", warmup=0))
            if args.sweep:
                res["sweep"] = sweep_rows(37, 1, DTYPES[args.dtype], dim=64, hidden=256, device="cpu", warmup=0)
    elif not torch.cuda.is_available():
        print("bench_moe_gpu: no CUDA device visible; this benchmark times the Triton grouped GEMM on a GPU "
              "(the CPU numbers are tools/bench_moe.py's ffn_kernel rows)", file=sys.stderr)
        raise SystemExit(2)
    else:
        import triton
        res.update(device=torch.cuda.get_device_name(0), triton=triton.__version__,
                   rows=rows(args.tokens, args.repeats, DTYPES[args.dtype]))
        if args.sweep:
            res["sweep"] = sweep_rows(max(args.tokens), args.repeats, DTYPES[args.dtype])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
