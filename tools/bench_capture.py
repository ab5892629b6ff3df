"""Streamed calibration capture: what `calibration.block_batch` saves in block reads and time.

    python tools/bench_capture.py --out bench/capture.json      # also writes bench/capture.md (~2 min)

A random FLUX-width checkpoint (FLUX.1's block shapes: hidden 3072 = 24 x 128, MLP 4x; --double / --single
blocks; bf16 on disk; 4 input channels, see build_checkpoint) is captured the way a streamed run captures
it: the model skeleton with every block read from the checkpoint when it is called and released when it
returns (stream.offloaded), the real sampling loop (the embedded model's FluxPipeline loop on an
`embeddings` table of random prompt embeddings; 64 image + --text-tokens text tokens per sample), and the
first block's inputs stored (first_block_only).
Each setting captures the same (condition, seed) pairs:
    batch N        batch_size N: N samples per model call, so conditions / N calls per sampling step
    block_batch    batch_size = all conditions, block_batch N: one call per step, each block runs N at a time
Rows: model calls, block reads (Checkpoint.load_module calls), seconds spent reading blocks, capture
seconds, and a check that both settings stored the same rows (sums of the first block's inputs).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import flux_config, worker_build  # noqa: E402  (the same random FLUX-width checkpoints)


def build_checkpoint(out: Path, n_double: int, n_single: int, conditions: int, text_tokens: int) -> dict:
    """A random bf16 FLUX-width transformer and an embeddings table of `conditions` random prompts. 4 input
    channels: the embedded model's sampling loop packs 16x16 single-channel latents (64 tokens of 4 channels),
    and only the blocks' shapes matter for what is read."""
    from diffusers import FluxTransformer2DModel
    cfg = dict(flux_config(n_double, n_single, small=False), in_channels=4)
    worker_build(json.dumps(cfg), str(out / "model"), "0")
    g = torch.Generator().manual_seed(1)
    save_file({"prompt_embeds": torch.randn(conditions, text_tokens, 4096, generator=g),
               "pooled_prompt_embeds": torch.randn(conditions, 768, generator=g)}, str(out / "embeddings.safetensors"))
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    return {"params": sum(p.numel() for p in model.parameters()),
            "block_bytes_bf16": sum(p.numel() * 2 for b in blocks for p in b.parameters())}


def capture_streamed(model_dir: Path, embeddings: Path, store_dir: Path, **calibration) -> dict:
    from dicompress.arch import adapter_for
    from dicompress.calib import capture
    from dicompress.models import resolve_model
    from dicompress.recipe import CalibrationConfig
    from dicompress.stream import Checkpoint, offloaded, skeleton
    info = resolve_model(str(model_dir))
    ckpt = Checkpoint(info.path)
    model = skeleton(info.class_name, info.path)
    adapter = adapter_for(model)
    blocks = [b.name for b in adapter.blocks(model)]
    ckpt.load_root(model, blocks, torch.float32, "cpu")
    reads, read_s, calls = [], [0.0], [0]
    real = ckpt.load_module

    def counted(model_, name, *a):
        t = time.perf_counter()
        try:
            return real(model_, name, *a)
        finally:
            read_s[0] += time.perf_counter() - t
            reads.append(name)

    ckpt.load_module = counted
    model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    cfg = CalibrationConfig(source="embeddings", embeddings=str(embeddings), **calibration)
    t = time.perf_counter()
    with offloaded(model, blocks, ckpt, torch.float32, "cpu"):
        store = capture(model, adapter, cfg, {"name": "flux-width", "path": info.path}, store_dir,
                        block_inputs=False, progress=False, first_block_only=True)
    seconds = time.perf_counter() - t
    x = store.block_inputs(blocks[0])
    return {"calibration": calibration, "model_calls": calls[0], "block_reads": len(reads),
            "reads_per_block": len(reads) // len(blocks), "read_seconds": round(read_s[0], 2),
            "capture_seconds": round(seconds, 2), "rows": int(x["hidden_states"].shape[0]),
            "chunks": len(store.block_files(blocks[0])[0]),
            "check_sums": {k: float(x[k].double().sum()) for k in ("hidden_states", "encoder_hidden_states", "temb")}}


def markdown(res: dict) -> str:
    m = res["model"]
    lines = [f"FLUX-width {res['args']['double']}+{res['args']['single']} blocks ({m['params'] / 1e9:.2f} B params, "
             f"blocks {m['block_bytes_bf16'] / 2**30:.2f} GiB bf16), {res['args']['conditions']} conditions x "
             f"{res['args']['steps']} steps, {64 + res['args']['text_tokens']} tokens per sample; "
             f"{res['machine']}", "",
             "| setting | model calls | block reads | read s | capture s | rows | stored chunks |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['setting']} | {r['model_calls']} | {r['block_reads']} | {r['read_seconds']} | "
                     f"{r['capture_seconds']} | {r['rows']} | {r['chunks']} |")
    lines += ["", f"same rows stored: {res['same_rows']}; capture time {res['speedup']:.2f}x faster with block_batch"]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/capture.json")
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--conditions", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2, help="samples per model call (batch N) / per block piece")
    ap.add_argument("--text-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dicompress-bench-capture-") as tmp:
        tmp = Path(tmp)
        model = build_checkpoint(tmp, args.double, args.single, args.conditions, args.text_tokens)
        base = {"seeds": [0], "steps": args.steps}
        settings = [(f"batch {args.batch}", {"batch_size": args.batch}),
                    (f"batch {args.conditions}, block_batch {args.batch}",
                     {"batch_size": args.conditions, "block_batch": args.batch})]
        rows = []
        for label, extra in settings:
            row = capture_streamed(tmp / "model", tmp / "embeddings.safetensors", tmp / f"store{len(rows)}",
                                   **base, **extra)
            rows.append({"setting": label, **row})
            print(json.dumps(rows[-1]), flush=True)
    a, b = (r["check_sums"] for r in rows)
    same = all(abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])) for k in a)
    res = {"rows": rows, "model": model, "args": vars(args), "same_rows": same,
           "speedup": rows[0]["capture_seconds"] / rows[1]["capture_seconds"],
           "command": "python " + " ".join(sys.argv), "seconds": round(time.perf_counter() - t0, 1),
           "machine": f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
