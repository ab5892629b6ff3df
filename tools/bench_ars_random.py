"""LRQ-DiT's per-layer choices on random-initialised models of the real families and widths.

    python tools/bench_ars_random.py --out bench/ars_random.json      # also writes bench/ars_random.md

Builds (never downloads) a tiny random Qwen-Image and a stack of FLUX-width blocks (hidden 3072,
24 heads of 128, MLP 12288; 1 double + 1 single block), captures synthetic calibration, and runs the
`smooth` and `ars` passes: every layer's J and chosen transform come from the captured activations.
Random weights and synthetic inputs say nothing about quality; this shows plumbing, widths (3072,
12288, 15360 all get exact Hadamard orders) and that the choice is computed per layer.
"""
from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

import dicompress
from dicompress.arch import adapter_for
from dicompress.calib import capture
from dicompress.recipe import CalibrationConfig

# name -> (diffusers class, config, ars block size: the tiny Qwen-Image is 48 wide, so 16-channel blocks)
MODELS = {
    "qwenimage-tiny": ("QwenImageTransformer2DModel",
                       dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                            num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4)), 16),
    "qwenimage-width-1block": ("QwenImageTransformer2DModel",
                               dict(patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128,
                                    num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
                               128),
    "flux-width-1d1s": ("FluxTransformer2DModel",
                        dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                             axes_dims_rope=(16, 56, 56)), 128),
}


def run_one(name: str, cls_name: str, cfg: dict, block: int, smooth: bool) -> dict:
    import diffusers
    torch.manual_seed(0)
    model = getattr(diffusers, cls_name)(**cfg).eval()
    cal = CalibrationConfig(source="synthetic", seeds=[0], steps=4, batch_size=2)
    root = Path(tempfile.mkdtemp(prefix="dicompress-ars-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)      # the store is read until the bench ends
    t = time.perf_counter()
    store = capture(model, adapter_for(model), cal, {"name": name}, root, block_inputs=False, progress=False)
    passes = ([{"smooth": {"alpha": 0.5}}] if smooth else []) + [{"ars": {"threshold": 1.0, "block": block}}]
    state = dicompress.compress(model, passes, calibration=store, progress=False)
    rows = [r for r in state.report["layers"] if r.get("method") == "ars"]
    return {"model": name, "class": cls_name, "smooth": smooth, "seconds": round(time.perf_counter() - t, 1),
            "layers": len(rows), "transforms": dict(Counter(r["transform"] for r in rows)),
            "J_min": min(r["J"] for r in rows), "J_max": max(r["J"] for r in rows),
            "widths": sorted({r.get("in_features", r.get("shape", [0, 0])[-1]) for r in rows}),
            "per_layer": [{k: r.get(k) for k in ("module", "J", "transform", "in_features", "shape")} for r in rows]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/ars_random.json")
    args = ap.parse_args()
    results = [run_one(n, c, cfg, block, smooth) for n, (c, cfg, block) in MODELS.items() for smooth in (False, True)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "command": "python " + " ".join(sys.argv)}, indent=2) + "\n")
    lines = ["| model | smoothing first | layers | J range | transforms chosen | seconds |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {'yes' if r['smooth'] else 'no'} | {r['layers']} | "
                     f"{r['J_min']:.3g} .. {r['J_max']:.3g} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(r['transforms'].items()))} | {r['seconds']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
